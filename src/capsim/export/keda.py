"""The KEDA alternative to the HPA and adapter: a ScaledObject with one Prometheus trigger per metric.

KEDA (keda.sh/v1alpha1) creates and drives the HPA itself; its Prometheus scaler runs a query that must
return one number, compared with ``threshold``. With ``metricType: AverageValue`` the HPA divides that
number by the pod count, so the query sums the per-pod values the simulated HPA averaged
(``capsim.export.promql``). The HPA's ``behavior`` goes to ``advanced.horizontalPodAutoscalerConfig``.
``minReplicaCount`` is never 0: a scenario cannot scale to zero on Pods metrics alone (the API server's
rule, ``capsim.policy.autoscaling``), and scenarios with External metrics are not exported.
Fields as KEDA's CRD (kedacore/keda ``config/crd/bases/keda.sh_scaledobjects.yaml``) defines them.
"""

from __future__ import annotations

import math
from typing import Any

from capsim.export.adapter import hpa_queries
from capsim.export.hpa import require_autoscaler, scale_target_ref
from capsim.export.target import DeployTarget
from capsim.model.scenario import Scenario

API_VERSION = "keda.sh/v1alpha1"


def build_scaled_object(scenario: Scenario, target: DeployTarget) -> dict[str, Any]:
    """The ScaledObject (a dict ready for ``yaml.safe_dump``)."""
    auto = require_autoscaler(scenario)
    hpa = auto.to_hpa()
    triggers = []
    for q, metric in zip(hpa_queries(scenario), hpa.metrics, strict=True):
        triggers.append({
            "type": "prometheus",
            "name": q.metric.replace("_", "-"),
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": target.prometheus_url,
                "query": q.deployment_total(target.namespace, target.name),
                "threshold": f"{metric.target:g}",
            },
        })
    ref = scale_target_ref(scenario, target)
    spec: dict[str, Any] = {
        "scaleTargetRef": {k: ref[k] for k in ("apiVersion", "kind", "name") if k in ref},
        "pollingInterval": max(1, math.ceil(auto.sync_period_s)),
        "minReplicaCount": auto.min_replicas,
        "maxReplicaCount": auto.max_replicas,
        "triggers": triggers,
    }
    if auto.behavior is not None:
        spec["advanced"] = {"horizontalPodAutoscalerConfig": {"behavior": auto.behavior}}
    return {"apiVersion": API_VERSION, "kind": "ScaledObject",
            "metadata": target.metadata(f"{target.name}"), "spec": spec}

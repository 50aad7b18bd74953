"""The KEDA ScaledObject: the alternative to the HPA and adapter, or, with ``autoscaler.keda``, the plan itself.

KEDA (keda.sh/v1alpha1) creates and drives the HPA itself; its Prometheus scaler runs a query that must
return one number, compared with ``threshold``. With ``metricType: AverageValue`` the HPA divides that
number by the pod count, so the query sums the per-pod values the simulated HPA averaged
(``capsim.export.promql``). The HPA's ``behavior`` goes to ``advanced.horizontalPodAutoscalerConfig``.

A scenario without ``autoscaler.keda`` scales on Pods metrics: the ScaledObject is the HPA's equivalent
(``minReplicaCount`` never 0, the API server's rule for Pods metrics, ``capsim.policy.autoscaling``). A
scenario with it was simulated as KEDA runs (``capsim.policy.keda``): each External metric is a trigger
(a pod metric summed over the Deployment's pods, or the gateway's counter as ``DeployTarget.gateway_query``
asks Prometheus for it), with its ``metricType`` (``AverageValue`` or ``Value``), ``activationThreshold``,
``pollingInterval``, ``cooldownPeriod``, ``minReplicaCount`` (0 scales to zero), ``idleReplicaCount`` and
``fallback`` as simulated, and a ``cron`` trigger per ``autoscaler.keda.cron``. With
``autoscaler.keda.scaling_modifiers`` the triggers are named as its formula names them (``vllm_num_requests_waiting``,
``cron_0``: ``Autoscaler.trigger_names``) and ``advanced.scalingModifiers`` carries the formula, its target, activation
target and metric type.
Fields as KEDA's CRD (kedacore/keda ``config/crd/bases/keda.sh_scaledobjects.yaml``) defines them.
"""

from __future__ import annotations

import math
import re
from typing import Any

from capsim.export.hpa import require_autoscaler, scale_target_ref
from capsim.export.promql import PodQuery
from capsim.export.target import DeployTarget
from capsim.model.scenario import EXTERNAL_METRICS, Scenario

API_VERSION = "keda.sh/v1alpha1"
#: Files a scenario with ``autoscaler.keda`` has no use for: KEDA creates the HPA and queries Prometheus itself.
NOT_WITH_KEDA = ("hpa.yaml", "prometheus-adapter.yaml")


def build_scaled_object(scenario: Scenario, target: DeployTarget) -> dict[str, Any]:
    """The ScaledObject (a dict ready for ``yaml.safe_dump``)."""
    auto = require_autoscaler(scenario)
    keda = auto.keda
    hpa = auto.to_hpa()
    names = [m.name for m in hpa.metrics]
    cached = keda.cached(names) if keda is not None else frozenset()
    null_zero = keda.null_as_zero(names) if keda is not None else frozenset(names)
    modifiers = keda.scaling_modifiers if keda is not None else None
    # with scalingModifiers a formula names the triggers: identifiers of expr (capsim.policy.keda_formula)
    trigger_names = auto.trigger_names if modifiers is not None else [
        re.sub(r"[^a-z0-9-]", "-", m.name.lower()) for m in hpa.metrics] + [
        f"cron-{i}" for i in range(len(keda.cron) if keda is not None else 0)]
    triggers = []
    for metric, trigger_name in zip(hpa.metrics, trigger_names, strict=False):
        query, window_s, quantile = auto.query_of(metric.name)
        if EXTERNAL_METRICS.get(metric.name) == "gateway":
            promql = target.gateway_requests(PodQuery.duration(window_s))
        else:
            promql = PodQuery.of(metric.name, window_s, query, quantile).deployment_total(
                target.namespace, target.name, target.dcgm_labels)
        meta = {"serverAddress": target.prometheus_url, "query": promql, "threshold": f"{metric.target:g}"}
        if keda is not None and metric.name in keda.activation:
            meta["activationThreshold"] = f"{keda.activation[metric.name]:g}"
        if metric.name not in null_zero:  # an empty result is an error, as simulated (KEDA's default: 0)
            meta["ignoreNullValues"] = "false"
        trigger: dict[str, Any] = {
            "type": "prometheus",
            "name": trigger_name,
            "metricType": "Value" if metric.target_type == "Value" else "AverageValue",
            "metadata": meta,
        }
        if keda is not None and metric.name in cached:  # the HPA reads the value of KEDA's last poll
            trigger["useCachedMetrics"] = True
        triggers.append(trigger)
    for i, c in enumerate(keda.cron if keda is not None else ()):  # answered by KEDA itself, as simulated
        triggers.append({"type": "cron", "name": trigger_names[len(hpa.metrics) + i], "metadata": {
            "timezone": c.timezone, "start": c.start, "end": c.end, "desiredReplicas": str(c.desired_replicas)}})
    ref = scale_target_ref(scenario, target)
    spec: dict[str, Any] = {
        "scaleTargetRef": {k: ref[k] for k in ("apiVersion", "kind", "name") if k in ref},
        "pollingInterval": keda.polling_interval_s if keda is not None else max(1, math.ceil(auto.sync_period_s)),
    }
    if keda is not None:
        spec["cooldownPeriod"] = keda.cooldown_period_s
        if keda.initial_cooldown_period_s is not None:  # the deploy itself, as simulated
            spec["initialCooldownPeriod"] = keda.initial_cooldown_period_s
        if keda.fallback is not None:  # the replicas held while Prometheus is down, as simulated
            spec["fallback"] = {"failureThreshold": keda.fallback.failure_threshold,
                                "replicas": keda.fallback.replicas}
            if keda.fallback.behavior != "static":  # KEDA 2.17 on; static is its default
                spec["fallback"]["behavior"] = keda.fallback.behavior
    if keda is not None and keda.idle_replica_count is not None:  # idle mode: to zero whatever the minimum
        spec["idleReplicaCount"] = keda.idle_replica_count
    spec.update({"minReplicaCount": auto.min_replicas, "maxReplicaCount": auto.max_replicas, "triggers": triggers})
    advanced: dict[str, Any] = {}
    if auto.behavior is not None:
        advanced["horizontalPodAutoscalerConfig"] = {"behavior": auto.behavior}
    if modifiers is not None:  # one composite metric for the HPA and for activation, as simulated
        advanced["scalingModifiers"] = {"formula": modifiers.formula, "target": f"{modifiers.target:g}",
                                        "activationTarget": f"{modifiers.activation_target:g}",
                                        "metricType": modifiers.metric_type}
    if advanced:
        spec["advanced"] = advanced
    return {"apiVersion": API_VERSION, "kind": "ScaledObject",
            "metadata": target.metadata(f"{target.name}"), "spec": spec}

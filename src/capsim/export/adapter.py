"""prometheus-adapter rules that serve the pods' capsim series as the Pods metrics the HPA asks for.

The adapter's configuration format (kubernetes-sigs/prometheus-adapter, docs/config.md): each rule says
how to discover the series (``seriesQuery``), which labels name the Kubernetes objects (``resources``),
the name the custom metrics API gives it (``name.matches``/``name.as``) and how to compute it
(``metricsQuery``). The rules are written inside a ConfigMap under ``config.yaml``, the file the adapter
reads with ``--config``; merge them into an existing adapter's rules rather than replacing those.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from capsim.export.hpa import require_autoscaler
from capsim.export.promql import PodQuery
from capsim.export.target import DeployTarget
from capsim.model.scenario import DCGM_METRIC_KINDS, Scenario

ADAPTER_CONFIGMAP = "prometheus-adapter"
CONFIG_KEY = "config.yaml"


def hpa_queries(scenario: Scenario) -> list[PodQuery]:
    """One query per metric of the scenario's HPA, as the simulated adapter runs it (``Autoscaler.query_of``)."""
    auto = require_autoscaler(scenario)
    queries = []
    for m in auto.to_hpa().metrics:
        query, window_s, quantile = auto.query_of(m.name)
        queries.append(PodQuery.of(m.name, window_s, query, quantile))
    return queries


def adapter_rules(scenario: Scenario, target: DeployTarget | None = None) -> dict[str, Any]:
    """The adapter configuration: ``{"rules": [...]}``, one rule per HPA metric. dcgm-exporter's series name
    the GPU's pod in the labels ``target.dcgm_labels`` says (``exported_namespace``, ``exported_pod`` by
    default), which the rule maps to the namespace and pod resources."""
    dcgm = (target or DeployTarget()).dcgm_labels
    rules = []
    for q in hpa_queries(scenario):
        ns, pod = dcgm if q.kind in DCGM_METRIC_KINDS else ("namespace", "pod")
        rules.append({
            "seriesQuery": f'{q.series}{{{ns}!="",{pod}!=""}}',
            "resources": {"overrides": {ns: {"resource": "namespace"}, pod: {"resource": "pod"}}},
            "name": {"matches": f"^{re.escape(q.series)}$", "as": q.metric},
            "metricsQuery": q.adapter_query(),
        })
    return {"rules": rules}


def build_adapter_configmap(scenario: Scenario, target: DeployTarget) -> dict[str, Any]:
    """The ConfigMap with the adapter configuration, in the adapter's namespace."""
    config = yaml.safe_dump(adapter_rules(scenario, target), sort_keys=False)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": target.metadata(ADAPTER_CONFIGMAP, target.adapter_namespace),
            "data": {CONFIG_KEY: config}}

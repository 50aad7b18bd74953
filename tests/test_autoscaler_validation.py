"""What the API server refuses, capsim refuses: an HPA that scales to zero needs an Object or External metric."""

from __future__ import annotations

from typing import Any

import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.policy.autoscaling import HorizontalPodAutoscaler, pods_metric_replicas

QUEUE = {"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                  "target": {"type": "AverageValue", "averageValue": "8"}}}
EXTERNAL = {"type": "External", "external": {"metric": {"name": "gateway_requests_per_second"},
                                             "target": {"type": "AverageValue", "averageValue": "20"}}}
OBJECT = {"type": "Object", "object": {
    "describedObject": {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "name": "agents"},
    "metric": {"name": "requests_per_second"}, "target": {"type": "Value", "value": "100"}}}
#: kubernetes pkg/apis/autoscaling/validation/validation.go, validateMetrics (Apache-2.0)
UPSTREAM = "must specify at least one Object or External metric to support scaling to zero replicas"


def scenario(**autoscaler: Any) -> dict[str, Any]:
    return {"horizon_s": 600, "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 5}},
            "service": {"kind": "deterministic", "mean_s": 0.1}, "pods": {"replicas": 1},
            "autoscaler": {"maxReplicas": 4, "metrics": [QUEUE], **autoscaler}}


def test_the_old_acceptance_was_a_trap_a_pods_metric_cannot_wake_a_deployment_with_no_pod() -> None:
    # what the simulator did with minReplicas 0 on a Pods metric: at zero pods the metric has no pod to
    # read, the proposal fails, and the HPA keeps the count at zero for good (12,194 requests failed)
    with pytest.raises(ValueError, match="no pods returned by selector"):
        pods_metric_replicas(0, [], 8.0)
    hpa = HorizontalPodAutoscaler(0, 10)
    assert [hpa.reconcile(t, 0, [None]) for t in (0.0, 15.0, 3600.0)] == [0, 0, 0]


def test_min_replicas_0_with_only_pods_metrics_is_refused_as_the_api_server_refuses_it() -> None:
    with pytest.raises(ValueError, match=f"^metrics {UPSTREAM}"):
        HorizontalPodAutoscaler.from_k8s({"minReplicas": 0, "maxReplicas": 4, "metrics": [QUEUE]})
    with pytest.raises(SettingsError, match=f"autoscaler.metrics {UPSTREAM}"):
        Scenario.model_validate(scenario(minReplicas=0))
    with pytest.raises(SettingsError, match=f"autoscaler.metrics {UPSTREAM}"):
        Scenario.model_validate(scenario(minReplicas=1)).override({"autoscaler.minReplicas": 0})


@pytest.mark.parametrize("metric", [EXTERNAL, OBJECT], ids=["External", "Object"])
def test_min_replicas_0_with_an_object_or_external_metric_passes_the_api_rule(metric: dict[str, Any]) -> None:
    hpa = HorizontalPodAutoscaler.from_k8s({"minReplicas": 0, "maxReplicas": 4, "metrics": [QUEUE, metric]})
    assert hpa.min_replicas == 0
    # the simulator still runs Pods metrics only, and says so by its own rule, not the API server's
    with pytest.raises(SettingsError, match=r"autoscaler.metrics\[1\].type must be 'Pods' in the simulator"):
        Scenario.model_validate(scenario(minReplicas=0, metrics=[QUEUE, metric]))


def test_min_replicas_1_and_unset_are_untouched() -> None:
    assert Scenario.model_validate(scenario(minReplicas=1)).autoscaler is not None
    assert HorizontalPodAutoscaler.from_k8s({"maxReplicas": 4, "metrics": [QUEUE]}).min_replicas == 1

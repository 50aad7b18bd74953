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
    # past the API server's rule, the simulator's own: Object metrics are not simulated, and an External
    # one must name a series the simulation has
    why = {"External": r"metrics\[1\].external.metric.name must be a pod metric",
           "Object": r"metrics\[1\].type must be 'Pods' or 'External' in the simulator"}[metric["type"]]
    with pytest.raises(SettingsError, match=f"autoscaler.{why}"):
        Scenario.model_validate(scenario(minReplicas=0, metrics=[QUEUE, metric]))
    gateway = {"type": "External", "external": {"metric": {"name": "capsim_gateway_requests_total"},
                                                "target": {"type": "AverageValue", "averageValue": "20"}}}
    assert Scenario.model_validate(scenario(minReplicas=0, metrics=[QUEUE, gateway])).autoscaler is not None


def test_min_replicas_1_and_unset_are_untouched() -> None:
    assert Scenario.model_validate(scenario(minReplicas=1)).autoscaler is not None
    assert HorizontalPodAutoscaler.from_k8s({"maxReplicas": 4, "metrics": [QUEUE]}).min_replicas == 1


# ---- External metrics in the simulator ----------------------------------------------------------------
def bursts(metric: dict[str, Any], **changes: Any) -> Scenario:
    """Two bursts of agents with 20 quiet minutes between; an HPA that may scale to zero."""
    s = Scenario.model_validate({
        "horizon_s": 2400, "timeseries_interval_s": 10,
        "workload": {"arrivals": {"kind": "piecewise", "rate_per_s": [[0, 2], [300, 0], [1500, 2]]}},
        "service": {"kind": "deterministic", "mean_s": 0.05},
        "pods": {"replicas": 1, "startup_s": 20},
        "client": {"timeout_s": 30, "max_retries": 12, "backoff_s": 5, "backoff_multiplier": 1},
        "autoscaler": {"minReplicas": 0, "maxReplicas": 4, "metrics": [metric],
                       "queries": {metric["external"]["metric"]["name"]: {"query": "rate", "window_s": 30}}
                       if "gateway" in metric["external"]["metric"]["name"] else {},
                       "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}}},
    })
    return s.override(changes) if changes else s


GATEWAY = {"type": "External", "external": {"metric": {"name": "capsim_gateway_requests_total"},
                                            "target": {"type": "AverageValue", "averageValue": "1"}}}
QUEUE_SUM = {"type": "External", "external": {"metric": {"name": "capsim_queue_depth"},
                                              "target": {"type": "AverageValue", "averageValue": "1"}}}


def test_an_external_gateway_metric_scales_to_zero_and_back() -> None:
    from capsim.sim import simulate

    r = simulate(bursts(GATEWAY), seed=0)
    ts = r.timeseries.set_index("time_s")
    assert ts["ready_replicas"][200] >= 1
    assert (ts["ready_replicas"].loc[700:1490] == 0).all()  # nobody asks: no pod
    assert ts["ready_replicas"].loc[1600:2400].min() >= 1  # the gateway saw the second burst and woke it
    late = r.requests[r.requests["arrival_s"] >= 1500]
    assert (late["outcome"] == "ok").mean() > 0.99  # the first ones retried until a pod was ready
    # the quiet gap cost nothing: against minReplicas 1, about one pod for 20 minutes less
    floor = simulate(bursts(GATEWAY, **{"autoscaler.minReplicas": 1}), seed=0).summary
    assert floor.gpu_hours - r.summary.gpu_hours > 0.8 * 1200 / 3600


def test_a_pod_metric_summed_as_an_external_metric_cannot_wake_a_deployment_with_no_pod() -> None:
    # KEDA's prometheus trigger on the pods' own queue: at zero pods the sum is 0 for good
    from capsim.sim import simulate

    r = simulate(bursts(QUEUE_SUM), seed=0)
    ts = r.timeseries.set_index("time_s")
    assert ts["ready_replicas"][1000] == 0 and (ts["ready_replicas"].loc[1500:] == 0).all()
    late = r.requests[r.requests["arrival_s"] >= 1500]
    assert len(late) > 1000 and (late["outcome"] != "ok").all()


def test_external_metrics_are_simulated_not_exported(tmp_path: Any) -> None:
    from capsim.export import export_scenario

    with pytest.raises(SettingsError, match="autoscaler.metrics.0: without autoscaler.keda capsim exports Pods metrics only"):
        export_scenario(bursts(GATEWAY), tmp_path / "out")
    with pytest.raises(SettingsError, match=r"metrics\[0\].external.metric.name must be a pod metric"):
        Scenario.model_validate(bursts(GATEWAY).model_dump(by_alias=True) | {"autoscaler": {
            "maxReplicas": 2, "metrics": [{"type": "External", "external": {
                "metric": {"name": "nginx_requests"}, "target": {"type": "Value", "value": "5"}}}]}})

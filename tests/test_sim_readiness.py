"""Readiness, endpoints and the pods the HPA counts (issue 15 §5), against the upstream rules.

Upstream: the kubelet's readiness probe (``pkg/kubelet/prober/worker.go``), the HPA's ``groupPods``
(``pkg/controller/podautoscaler/replica_calculator.go``) and the ReplicaSet's victim ranking
(``pkg/controller/controller_utils.go``, ``ActivePodsWithRanks``). Kubernetes is Apache-2.0 (c) The
Kubernetes Authors.
"""

from __future__ import annotations

import math
from typing import Any

from capsim.model.scenario import Scenario
from capsim.policy.autoscaling import PodSample, pods_metric_replicas
from capsim.sim import Simulation
from capsim.sim.pod import Pod, PodState


def hpa_scenario(**pods: Any) -> Scenario:
    return Scenario.model_validate({
        "horizon_s": 600,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 0.001}},
        "service": {"kind": "deterministic", "mean_s": 0.1},
        "pods": {"replicas": 4, "startup_s": 60, **pods},
        "autoscaler": {
            "minReplicas": 1, "maxReplicas": 10,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                                  "target": {"type": "AverageValue", "averageValue": "2"}}}],
        },
    })


def _gauge_sample(t: float, queue_depth: int) -> tuple[Any, ...]:
    # time, queue depth, in flight, busy, TTFT sum and count, vLLM's six, TTFT buckets (see sim/hpa.py)
    return (t, queue_depth, queue_depth, math.nan, 0.0, 0, 0, 0, math.nan, 0.0, 0, 0, None)


def _half_target_plus_four_new(**pods: Any) -> tuple[list[PodSample], list[Pod]]:
    """4 ready pods at half the target (queue depth 1 of 2), and 4 pods just created by a scale to 8."""
    sim = Simulation(hpa_scenario(**pods), seed=0)
    auto = sim.autoscaling
    assert auto is not None
    sim.cluster.scale_to(8, 0.0)
    pods_ = [p for p in sim.cluster.pods if p.state != PodState.GONE]
    for p in pods_[:4]:
        assert p.state == PodState.READY
        p.samples.append(_gauge_sample(0.0, 1))
    return [auto._sample(p, "queue_depth", 0.0, "instant", 60.0, 0.99) for p in pods_], pods_[4:]


def test_pods_pulling_their_image_are_pending_and_left_out_of_a_scale_down() -> None:
    samples, new = _half_target_plus_four_new(image_pull_s=300)
    assert all(p.state == PodState.STARTING for p in new)
    assert [s.phase for s in samples] == ["Running"] * 4 + ["Pending"] * 4
    # upstream: the 4 Pending pods are unready, left out when scaling down: ceil(0.5 x 4) = 2
    assert pods_metric_replicas(8, samples, 2.0) == 2
    # the old feed reported them Running without a metric: a missing pod counts as the target, so 6
    old = samples[:4] + [PodSample(None, "Running", ready=False)] * 4
    assert pods_metric_replicas(8, old, 2.0) == 6


def test_pods_loading_the_model_are_running_without_metrics_as_upstream_counts_them() -> None:
    # no image to pull: the containers run at once (phase Running) but serve no /metrics until the model is
    # loaded, so upstream counts them as missing pods, at the target on a scale-down: (4 x 1 + 4 x 2) / 8 -> 6
    samples, new = _half_target_plus_four_new(image_pull_s=0)
    assert all(p.state == PodState.STARTING for p in new)
    assert [s.phase for s in samples] == ["Running"] * 8
    assert [s.value for s in samples[4:]] == [None] * 4
    assert pods_metric_replicas(8, samples, 2.0) == 6

"""Issue 15 §8 and the stale samples: endpoints after a crash or delete, and Prometheus's stale markers.

Upstream: a crashed or deleted pod leaves the Service's endpoints only when the endpoints controller and
kube-proxy have seen it (``pkg/controller/endpointslice``, kube-proxy's sync), about a second later; a
scrape that fails writes a stale marker (Prometheus ``scrape/scrape.go``), after which an instant query
returns nothing for the series. Kubernetes is Apache-2.0 (c) The Kubernetes Authors; Prometheus is
Apache-2.0 (c) The Prometheus Authors.
"""

from __future__ import annotations

from typing import Any

from capsim.model.scenario import Scenario
from capsim.sim import Simulation
from capsim.sim.pod import PodState


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


def test_a_crashed_pods_series_is_stale_for_an_instant_query() -> None:
    sim = Simulation(hpa_scenario(), seed=0)
    auto = sim.autoscaling
    assert auto is not None
    sim.env.run(until=40.0)
    pod = sim.cluster.pods[0]
    assert auto.value(pod, "queue_depth", 40.0, "instant", 60.0) == 0.0
    sim.cluster.crash(pod, 40.0)
    assert pod.state == PodState.STARTING  # the first exit restarts at once; loading the model for 60 s
    sim.env.run(until=56.0)  # every pod has been scraped since (15 s interval)
    # before: the last sample before the crash, still inside the 5-minute lookback, was returned, and the
    # HPA counted the restarting pod (phase Running, a metric) as a ready pod at that old value
    assert auto.value(pod, "queue_depth", 56.0, "instant", 60.0) is None
    assert auto._sample(pod, "queue_depth", 56.0, "instant", 60.0, 0.99).value is None
    # a range query still averages the real samples in its window, as Prometheus skips the markers
    assert auto.value(pod, "queue_depth", 56.0, "avg_over_time", 60.0) == 0.0
    # the other pods are untouched
    assert all(auto.value(p, "queue_depth", 56.0, "instant", 60.0) == 0.0 for p in sim.cluster.pods[1:])
    # one marker per failed series, and the pod's series resumes when it serves again
    assert sum(1 for s in pod.samples if len(s) == 1) == 1
    sim.env.run(until=140.0)
    assert sim.cluster.pods[0].state == PodState.READY  # (read again: mypy narrowed pod.state above)
    assert auto.value(pod, "queue_depth", 140.0, "instant", 60.0) == 0.0

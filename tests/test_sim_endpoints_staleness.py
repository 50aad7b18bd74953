"""Issue 15 §8 and the stale samples: endpoints after a crash or delete, cancel on timeout, stale series.

Upstream: a crashed or deleted pod leaves the Service's endpoints only when the endpoints controller and
kube-proxy have seen it (``pkg/controller/endpointslice``, kube-proxy's sync), about a second later; a
scrape that fails writes a stale marker (Prometheus ``scrape/scrape.go``), after which an instant query
returns nothing for the series. Kubernetes is Apache-2.0 (c) The Kubernetes Authors; Prometheus is
Apache-2.0 (c) The Prometheus Authors.
"""

from __future__ import annotations

from typing import Any

import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
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


def _served_scenario(**pods: Any) -> Scenario:
    return Scenario.model_validate({
        "horizon_s": 60,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 50}},
        "service": {"kind": "deterministic", "mean_s": 0.02},
        "pods": {"replicas": 4, "startup_s": 60, **pods},
        "router": {"kind": "random"},
    })


def test_a_crashed_pod_stays_in_the_endpoints_until_the_kubelet_and_the_endpoints_see_it() -> None:
    sim = Simulation(_served_scenario(), seed=0)  # crash_detection_s 1 + endpoints_propagation_s 1
    sim.env.run(until=10.0)
    pod = sim.cluster.pods[0]
    sim.cluster.crash(pod, 10.0)
    assert pod.state == PodState.STARTING and pod in sim.cluster.endpoints  # before: gone from them at once
    sim.env.run(until=11.99)
    assert pod in sim.cluster.endpoints
    sim.env.run(until=12.01)
    assert pod not in sim.cluster.endpoints and not pod.routable


def test_a_deleted_pod_leaves_one_propagation_later_and_refuses_what_it_gets_meanwhile() -> None:
    sim = Simulation(_served_scenario(), seed=0)
    sim.env.run(until=10.0)
    pod = sim.cluster.pods[0]
    sim.cluster.terminate(pod, 10.0)
    assert pod in sim.cluster.endpoints
    sim.env.run(until=11.01)
    assert pod not in sim.cluster.endpoints


def _retries_after_a_crash(**pods: Any) -> tuple[int, int]:
    """Run 60 s at 50 requests/s on 4 pods (random routing), pod 0 crashing at 10 s; retries and final
    failures."""
    sc = _served_scenario(**pods).model_copy(update={"faults": None})
    sc = Scenario.model_validate({**sc.model_dump(), "faults": {"crashes": [{"at_s": 10.0, "pod": 0}]}})
    sim = Simulation(sc, seed=0)
    sim.run()
    return sim.client.n_retries, sim.client.n_failed


def test_requests_routed_to_a_crashed_pod_meanwhile_are_refused_and_retried() -> None:
    late, late_failed = _retries_after_a_crash()
    instant, instant_failed = _retries_after_a_crash(crash_detection_s=0.0, endpoints_propagation_s=0.0)
    # the pod gets a quarter of 50/s for the 2 s it stays: about 25 refusals, each retried once (1 s backoff,
    # by when the pod has left or is about to); the requests it held at the crash are retried in both runs
    assert 10 <= late - instant <= 45
    assert late_failed == instant_failed == 0  # a retry on another pod succeeds


def test_a_crashed_container_being_torn_down_accepts_what_it_is_sent_and_fails_it_all_when_the_teardown_ends() -> None:
    # a SIGKILLed process's kernel still accepts connections while its memory is torn down, then resets them
    # all (data/validation/sessions/teardown-2026-12-05): pods.crash_teardown_s; refused after it, as before
    def run(teardown: float) -> Any:
        sc = _served_scenario(crash_detection_s=1.0, endpoints_propagation_s=0.0, crash_teardown_s=teardown)
        sc = Scenario.model_validate({**sc.model_dump(), "faults": {"crashes": [{"at_s": 10.0, "pod": 0}]},
                                      "client": {"max_retries": 0}})
        return Simulation(sc, seed=0).run().requests

    instant, torn = run(0.0), run(0.5)
    failed = torn[(torn.outcome == "failed")]
    assert set(failed.pod) == {0} and len(failed) >= 8  # a quarter of 50/s for the 1 s it stays
    held = failed[failed.arrival_s < 10.0]  # in the pod at the crash: lost at the teardown's end, not at once
    accepted = failed[(failed.arrival_s >= 10.0) & (failed.arrival_s < 10.5)]
    refused = failed[failed.arrival_s >= 10.5]
    assert len(accepted) >= 3 and len(refused) >= 3
    assert all(e == pytest.approx(10.5) for e in (*held.end_s, *accepted.end_s))
    assert (refused.end_s == refused.arrival_s).all() and (refused.arrival_s < 11.0).all()
    # the same requests go to the same pods: the teardown changes when they fail, not which
    lost = instant[instant.outcome == "failed"]
    assert sorted(lost.request_id) == sorted(failed.request_id)
    assert (lost[lost.arrival_s < 10.0].end_s == 10.0).all()
    assert (lost[lost.arrival_s >= 10.0].end_s == lost[lost.arrival_s >= 10.0].arrival_s).all()


def _burst(cancel: str) -> tuple[Simulation, Any]:
    """One pod serving 1 request/s (batches of one, 1 s each): a burst of 4/s for 10 s, then 0.5/s for
    50 s; clients give up after 5 s, without retrying."""
    sc = Scenario.model_validate({
        "horizon_s": 60,
        "workload": {"arrivals": {"kind": "piecewise", "rate_per_s": [[0, 4], [10, 0.5]]}},
        "service": {"kind": "deterministic", "mean_s": 1.0},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0},
        "pods": {"replicas": 1},
        "client": {"timeout_s": 5, "max_retries": 0, "cancel_on_timeout": cancel},
    })
    sim = Simulation(sc, seed=0)
    return sim, sim.run()  # run() checks that arrived = answered + failed + timed out + in flight


def test_a_request_whose_client_left_still_runs_when_the_pod_does_not_cancel_it() -> None:
    (cancel_sim, cancel), (keep_sim, keep) = _burst("all"), _burst("none")
    after = {name: r.requests[r.requests["arrival_s"].between(15.0, 35.0)]
             for name, r in (("all", cancel), ("none", keep))}
    assert len(after["all"]) == len(after["none"]) >= 5  # the same workload
    # removed from the queue (the old, default model), the burst's timed-out requests cost nothing: 5 s
    # after it the pod is free, and the later requests are answered
    assert (after["all"]["outcome"] == "ok").mean() >= 0.9
    # left queued (the reference pod), the ~30 orphans of the burst run first: the pod is busy with
    # answers nobody reads until ~40 s, and the requests sent meanwhile time out behind them
    assert (after["none"]["outcome"] == "ok").mean() <= 0.2
    assert keep_sim.cluster.pods[0].batch_s > cancel_sim.cluster.pods[0].batch_s + 15
    # the orphans are not requests: none appears in the frame, and the books balance (checked by run())
    assert len(keep.requests) == keep.summary.arrived
    assert keep.requests["request_id"].max() < keep.summary.arrived


def test_orphans_are_refused_for_continuous_batching() -> None:
    sc = Scenario.model_validate({
        "horizon_s": 10,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 1}},
        "service": {"kind": "deterministic", "mean_s": 0.1},
        "batching": {"mode": "continuous", "num_blocks": 64},
        "client": {"cancel_on_timeout": "none"},
    })
    with pytest.raises(SettingsError, match="client.cancel_on_timeout"):
        Simulation(sc, seed=0)


def test_least_outstanding_routes_to_a_crashed_pod_still_in_the_endpoints() -> None:
    # one pod, busy when it crashes: the router's heap must learn its new count (0) while it stays in the
    # endpoints, or the pick finds no valid entry (the bug this test caught: an AssertionError)
    sc = Scenario.model_validate({
        "horizon_s": 30,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 20}},
        "service": {"kind": "deterministic", "mean_s": 0.5},
        "batching": {"max_batch_size": 4, "max_wait_ms": 10},
        "pods": {"replicas": 1, "startup_s": 5},
        "router": {"kind": "least_outstanding"},
        "faults": {"crashes": [{"at_s": 10.0, "pod": 0}]},
    })
    r = Simulation(sc, seed=0).run()
    refused = r.requests[(r.requests["outcome"] == "failed")]
    assert r.summary.failed > 0 and (refused["end_s"] >= 10.0).all()

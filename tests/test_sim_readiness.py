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
from capsim.sim.replicaset import RankedPod, pods_to_delete


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


def _half_target_plus_four_new(at: float = 0.0, scrape_every_s: float | None = None,
                               **pods: Any) -> tuple[list[PodSample], list[Pod]]:
    """4 ready pods at half the target (queue depth 1 of 2), and 4 pods created by a scale to 8 at 0, as the HPA
    reads them at ``at`` (Prometheus scraping every ``scrape_every_s``, else the scenario's 15 s)."""
    scenario = hpa_scenario(**pods)
    if scrape_every_s is not None:
        scenario = scenario.override({"autoscaler.scrape_interval_s": scrape_every_s})
    sim = Simulation(scenario, seed=0)
    auto = sim.autoscaling
    assert auto is not None
    sim.cluster.scale_to(8, 0.0)
    if at > 0.0:
        sim.env.run(until=at)
    pods_ = [p for p in sim.cluster.pods if p.state != PodState.GONE]
    for p in pods_[:4]:
        assert p.state == PodState.READY
        p.samples.append(_gauge_sample(at, 1))
    return [auto._sample(p, "queue_depth", at, "instant", 60.0, 0.99) for p in pods_], pods_[4:]


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


def test_a_pod_whose_model_loaded_is_scraped_before_its_readiness_and_counted_with_its_empty_queue() -> None:
    # the model loads at 55, the probe (every 10 s from 0) passes at 60: from 55 the pod's server answers /metrics,
    # Prometheus scrapes it (every 1 s here), and groupPods counts a Running pod's custom metric ready or not. Its
    # empty queue enters the average: (4 x 1 + 4 x 0) / 8 = 0.5 of a target 2 -> 2 pods, where a pod without a
    # value counts as the target on a scale-down (6, the test above)
    early, _ = _half_target_plus_four_new(54.5, 1.0, image_pull_s=0, startup_s=55)
    assert [s.value for s in early[4:]] == [None] * 4
    samples, new = _half_target_plus_four_new(59.5, 1.0, image_pull_s=0, startup_s=55)
    assert all(p.state == PodState.STARTING and not p.ready_condition for p in new)
    assert [(s.value, s.phase, s.ready) for s in samples[4:]] == [(0.0, "Running", False)] * 4
    assert pods_metric_replicas(8, samples, 2.0) == 2
    new[0].sim.env.run(until=60.5)
    assert all(p.ready_s == 60.0 for p in new)


# ---- the readiness probe and the endpoints ----------------------------------------------------------------
def probe_scenario(**changes: Any) -> Scenario:
    s = Scenario.model_validate({
        "horizon_s": 300,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 2.0}},
        "service": {"kind": "deterministic", "mean_s": 4.0},
        "batching": {"max_batch_size": 8, "max_wait_ms": 0, "queue_capacity": 100000},
        "pods": {"replicas": 2, "startup_s": 25},
        "state": {"store": "redis"},
        "client": {"timeout_s": 1e6, "max_retries": 0},
    })
    return s.override(changes) if changes else s


def test_a_started_pod_is_ready_at_its_next_probe_and_gets_traffic_one_propagation_later() -> None:
    # placed at 0, the model loaded at 25: probes at 0, 10, 20 fail, the one at 30 passes (Kubernetes
    # defaults: every 10 s); the endpoints carry it from 31. The old model sent it traffic from 25.
    sim = Simulation(probe_scenario(), seed=0)
    sim.cluster.scale_to(3, 0.0)
    pod = sim.cluster.pods[2]
    seen = []
    for t in (29.5, 30.5, 31.5):
        sim.env.run(until=t)
        seen.append((pod.state, pod.ready_s, pod in sim.cluster.endpoints, pod.routable))
    assert seen == [(PodState.STARTING, None, False, False), (PodState.READY, 30.0, False, False),
                    (PodState.READY, 30.0, True, True)]


def test_probe_settings_move_readiness() -> None:
    s = probe_scenario().override({"pods.readiness_probe.period_s": 4, "pods.endpoints_propagation_s": 0.0})
    sim = Simulation(s, seed=0)
    sim.cluster.scale_to(3, 0.0)
    sim.env.run(until=28.5)  # the startup probe (the readiness probe's period, unset) at 24 fails, 28 passes
    assert sim.cluster.pods[2].ready_s == 28.0 and sim.cluster.pods[2] in sim.cluster.endpoints


def _ready_s(**changes: Any) -> float | None:
    sim = Simulation(probe_scenario(**{"pods.endpoints_propagation_s": 0.0, **changes}), seed=0)
    sim.cluster.scale_to(3, 0.0)
    sim.env.run(until=80.0)
    return sim.cluster.pods[2].ready_s


def test_the_pod_is_ready_at_the_first_startup_probe_that_finds_the_model_loaded() -> None:
    # upstream: the readiness probe is skipped until the startup probe passes, and then the kubelet runs it at once
    # (prober_manager.go, UpdatePodStatus), so readiness follows the startup probe's ticks, not its own. Placed at 0,
    # the model loaded at 25: a startup probe every 5 s passes at 25 (a tick at the load itself counts), every 3 s at
    # 27, every 20 s at 40, whatever the readiness probe's period
    assert _ready_s(**{"pods.startup_probe.period_s": 5}) == 25.0
    assert _ready_s(**{"pods.startup_probe.period_s": 3}) == 27.0
    assert _ready_s(**{"pods.startup_probe.period_s": 20}) == 40.0
    assert _ready_s(**{"pods.startup_probe.period_s": 3, "pods.readiness_probe.period_s": 7}) == 27.0
    assert _ready_s() == _ready_s(**{"pods.startup_probe.period_s": 10}) == 30.0  # unset: the readiness probe's


def test_a_startup_probe_passing_in_a_redis_outage_leaves_the_pod_to_its_readiness_probes() -> None:
    # the store is out from 20 to 33: the startup probe (every 5 s, /healthz) passes at 25, the readiness probe run
    # at once then fails (/readyz pings the store), so the pod waits for its own readiness ticks (0, 10, 20, 30 out;
    # 40 passes); an outage over by the startup probe's pass changes nothing
    outage = {"faults.redis_outages": [{"at_s": 20, "duration_s": 13}], "pods.replicas": 1}
    assert _ready_s(**{"pods.startup_probe.period_s": 5, **outage}) == 40.0
    over = {"faults.redis_outages": [{"at_s": 10, "duration_s": 14}], "pods.replicas": 1}
    assert _ready_s(**{"pods.startup_probe.period_s": 5, **over}) == 25.0


def _endpoints_at(sim: Simulation, times: list[float]) -> list[int]:
    out = []
    for t in times:
        sim.env.run(until=t)
        out.append(sum(1 for p in sim.cluster.endpoints if p.id > 0))  # the pods started at 0
    return out


def test_a_redis_outage_takes_pods_out_after_three_failed_probes_and_back_at_the_first_probe_after() -> None:
    # pods probed at 0, 10, 20 ...: the probes at 100, 110, 120 fail, so the pods are not ready at 120
    # and leave the endpoints at 121; the probe at 160 finds Redis back: ready, in the endpoints at 161
    # (pods 1 and 2, started at 0 and ready at 30; the warm pod 0 probes at a random phase)
    sim = Simulation(probe_scenario(**{"faults.redis_outages": [{"at_s": 100, "duration_s": 60}],
                                       "pods.replicas": 1}), seed=0)
    sim.cluster.scale_to(3, 0.0)
    assert _endpoints_at(sim, [119.5, 120.5, 121.5, 159.5, 160.5, 161.5]) == [2, 2, 0, 0, 0, 2]
    assert all(p.probe_failing is False and p.state == PodState.READY for p in sim.cluster.pods[1:])
    # the warm pod 0 probes at its own phase: out and back at its own probes, within one period of the others
    sim.env.run(until=172.0)
    assert sim.cluster.pods[0].routable and sim.cluster.pods[0].ready_s is not None
    assert 160.0 <= sim.cluster.pods[0].ready_s < 170.0


def test_pods_serving_local_copies_stay_ready_through_a_redis_outage() -> None:
    # the same 60 s outage as above, but state.on_unavailable: serve_local -- the real pod's /readyz passes
    # while it serves its local copies, so no pod leaves the endpoints
    sim = Simulation(probe_scenario(**{"faults.redis_outages": [{"at_s": 100, "duration_s": 60}],
                                       "pods.replicas": 1, "state.on_unavailable": "serve_local"}), seed=0)
    sim.cluster.scale_to(3, 0.0)
    assert _endpoints_at(sim, [119.5, 120.5, 121.5, 159.5, 160.5, 161.5]) == [2, 2, 2, 2, 2, 2]
    assert not any(p.probe_failing for p in sim.cluster.pods)


def test_an_outage_shorter_than_the_failure_threshold_keeps_the_pods_in_the_endpoints() -> None:
    sim = Simulation(probe_scenario(**{"faults.redis_outages": [{"at_s": 95, "duration_s": 20}],
                                       "pods.replicas": 1}), seed=0)
    sim.cluster.scale_to(3, 0.0)
    # failed probes at 100 and 110 only: two of three
    assert _endpoints_at(sim, [101.0, 111.0, 116.0, 125.0]) == [2, 2, 2, 2]


def test_answers_in_an_outage_fail_at_the_store_write_and_pods_rejoin_one_probe_later() -> None:
    sim = Simulation(probe_scenario(**{"faults.redis_outages": [{"at_s": 100, "duration_s": 60}]}), seed=0)
    r = sim.run()
    q = r.requests
    ok = q["outcome"] == "ok"
    # a request whose batch ran on the GPU and ended while Redis was out failed at its final store write
    in_flight = q[(q["start_s"] < 100) & (q["end_s"] >= 100) & (q["end_s"] < 160) & q["start_s"].notna()]
    assert len(in_flight) > 0
    assert (in_flight["outcome"] == "failed").all() and (in_flight["pod"] >= 0).all()
    assert (in_flight["end_s"] - in_flight["start_s"] >= 4.0 - 1e-9).all()  # the whole batch ran
    assert not (ok & (q["end_s"] >= 100) & (q["end_s"] < 160)).any()
    # each warm pod probes at its own phase: it is back at its first probe from 160 on, in the endpoints
    # one second later; a request sent after Redis came back but before the first pod rejoined finds no
    # endpoint (503), and every request sent once they are all back is served
    back = [sim.cluster._next_probe(p, 160.0) + 1.0 for p in sim.cluster.pods]
    assert all(160.0 < b <= 171.0 for b in back)
    gap = q[(q["arrival_s"] >= 160) & (q["arrival_s"] < min(back))]
    assert len(gap) > 0 and (gap["outcome"] == "failed").all() and (gap["pod"] == -1).all()
    later = q[(q["arrival_s"] >= max(back)) & (q["arrival_s"] < 250)]
    assert len(later) > 100 and later["outcome"].eq("ok").all()


# ---- which pods a scale-down deletes -----------------------------------------------------------------------
def _ranked(key: int, **kw: Any) -> RankedPod:
    base: dict[str, Any] = {"assigned": True, "phase": "Running", "ready": True, "rank": 1, "ready_s": 100.0,
                            "restarts": 0, "created_s": 50.0, "uid": key}
    base.update(kw)
    return RankedPod(key=key, **base)


def test_the_replicaset_ranks_unassigned_pending_not_ready_then_ready_pods() -> None:
    pods = [
        _ranked(0),
        _ranked(1, ready=False, ready_s=None),
        _ranked(2, phase="Pending", ready=False, ready_s=None),
        _ranked(3, assigned=False, phase="Pending", ready=False, ready_s=None, rank=0),
    ]
    assert [p.key for p in pods_to_delete(pods, 4, 1000.0)] == [3, 2, 1, 0]


def test_ready_pods_go_by_log2_buckets_of_their_ready_time_then_uid() -> None:
    now = 1000.0
    # 1000 - 600 = 400 s and 1000 - 500 = 500 s: both in bucket floor(log2(4e11)) = floor(log2(5e11)) = 38,
    # so the UID decides, not which became ready last; 1000 - 990 = 10 s is bucket 33: deleted first
    a, b, c = _ranked(0, ready_s=600.0, uid=9), _ranked(1, ready_s=500.0, uid=2), _ranked(2, ready_s=990.0, uid=5)
    assert [p.key for p in pods_to_delete([a, b, c], 3, now)] == [2, 1, 0]
    assert int(math.log2(400e9)) == int(math.log2(500e9)) == 38 and int(math.log2(10e9)) == 33


def test_more_pods_on_the_node_and_more_restarts_go_first() -> None:
    crowded, alone = _ranked(0, rank=3, uid=9), _ranked(1, rank=1, uid=1)
    assert pods_to_delete([alone, crowded], 1, 1000.0)[0].key == 0
    flaky, steady = _ranked(0, ready_s=None, ready=False, restarts=4, uid=9), _ranked(1, ready=False, ready_s=None)
    assert pods_to_delete([steady, flaky], 1, 1000.0)[0].key == 0


def test_scale_down_victims_are_not_simply_the_newest_ids() -> None:
    # 4 pods ready at 0, 2 more ready about 70 s later; at 1000 s all six are in the same log2 bucket of
    # time since ready (2^39 ns = 550 s to 1100 s), so the ReplicaSet's victims are the two lowest UIDs:
    # random pods. The old rule always deleted the newest ids (4 and 5).
    victim_sets = set()
    for seed in range(12):
        sim = Simulation(probe_scenario(), seed=seed)
        sim.cluster.scale_to(6, 0.0)
        sim.env.run(until=1000.0)
        live = [p for p in sim.cluster.pods if p.state == PodState.READY]
        assert len(live) == 6
        uids = sorted(sim.cluster._uid[p.id] for p in live)
        sim.cluster.scale_to(4, 1000.0)
        victims = {p.id for p in sim.cluster.pods if p.state in (PodState.TERMINATING, PodState.GONE)}
        assert {sim.cluster._uid[v] for v in victims} == set(uids[:2])
        victim_sets.add(frozenset(victims))
    assert len(victim_sets) > 3  # the victims vary with the seed: not always the newest ids, 4 and 5


def test_a_scale_down_takes_a_pod_from_the_most_crowded_node() -> None:
    # 4 pods on a 4-GPU node, a fifth on a second node: upstream deletes one of the four (rank 4 > 1), and
    # a ready one whose node keeps pods; the old rule deleted the newest id, the only pod on node 2
    s = probe_scenario().override({"cluster": {"max_gpus": 8, "node_gpus": 4, "node_provision_s": 10},
                                   "pods.replicas": 4})
    sim = Simulation(s, seed=0)
    sim.cluster.scale_to(5, 0.0)
    sim.env.run(until=1000.0)
    assert [p.state for p in sim.cluster.pods] == [PodState.READY] * 5
    sim.cluster.scale_to(4, 1000.0)
    gone = [p.id for p in sim.cluster.pods if p.state != PodState.READY]
    assert len(gone) == 1 and gone[0] in (0, 1, 2, 3)


def test_the_shipped_startup_probe_grid_on_the_keda_rush() -> None:
    """data/studies/startup_probe_grid.yaml (docs/studies.md, "The startup probe") on the H100 rush under KEDA on the
    waiting requests, seed 2: every new pod is ready on its own startup probe's grid (from its placement), and the
    2-s probe drains the backlog sooner: a lower p99 and none of the 10-s probe's refusals at full queues."""
    from capsim.sim import simulate
    from capsim.studies.sweep import expand_grid, load_grid

    periods = [s.changes["pods.startup_probe.period_s"]
               for s in expand_grid(load_grid("data/studies/startup_probe_grid.yaml"))]
    assert periods == [10, 5, 2]
    rush = Scenario.from_yaml("data/scenarios/h100_llama3_8b_rush.yaml").override({
        "autoscaler.minReplicas": 2, "cluster.billing": "pod", "autoscaler.keda": {"polling_interval_s": 15},
        "autoscaler.metrics": [{"type": "External", "external": {"metric": {"name": "vllm:num_requests_waiting"},
                                                                 "target": {"type": "AverageValue", "averageValue": "4"}}}]})
    runs = {}
    for period in (10, 2):
        sim = Simulation(rush.override({"pods.startup_probe.period_s": period}), seed=2)
        runs[period] = sim.run()
        placed = {pod_id: t for t, pod_id, _, _ in sim.cluster.placements}
        new = [p for p in sim.cluster.pods if p.first_ready_s is not None and p.first_ready_s > 0]
        assert len(new) > 20
        for p in new:
            ticks = (p.first_ready_s - placed[p.id]) / period
            assert abs(ticks - round(ticks)) < 1e-6, (p.id, p.first_ready_s, placed[p.id])
    slow, fast = runs[10].summary, runs[2].summary
    assert fast.ttft_p99_s < slow.ttft_p99_s
    assert (slow.failed, fast.failed) == (209, 0)
    assert simulate(rush, seed=2).summary == slow  # unset, the readiness probe's period: 10 s

"""A GPU node that dies (``faults.node_failures``): its pods stop answering without refusing, leave the
endpoints when the node is NotReady (``cluster.node_monitor_grace_s`` plus the propagation), are evicted and
replaced ``unreachable_toleration_s`` later, and the dead node is billed until cluster-autoscaler removes it
(``scale_down_unready_time_s``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim.pod import PodState
from capsim.sim.simulate import SimResult, Simulation, simulate

FAIL_S = 100.0
GRACE_S = 40.0
PROPAGATION_S = 1.0
TOLERATION_S = 300.0
TIMEOUT_S = 10.0


def _scenario(mode: str = "static", **over: Any) -> Scenario:
    batching: dict[str, Any] = {"max_batch_size": 8, "max_wait_ms": 5}
    if mode == "continuous":
        batching = {"mode": "continuous", "num_blocks": 2000, "max_num_seqs": 16, "max_num_batched_tokens": 512}
    base: dict[str, Any] = {
        "horizon_s": 900,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 40},
                     "prompt_tokens": {"kind": "constant", "value": 100},
                     "output_tokens": {"kind": "constant", "value": 10}},
        "service": {"kind": "deterministic", "mean_s": 0.05},
        "batching": batching,
        "pods": {"replicas": 8, "startup_s": {"kind": "constant", "value_s": 30},
                 "image_pull_s": {"kind": "constant", "value_s": 20},
                 "endpoints_propagation_s": PROPAGATION_S},
        "router": {"kind": "round_robin"},
        "cluster": {"max_gpus": 12, "node_gpus": 4, "node_provision_s": 120, "scale_down_unready_time_s": 500,
                    "node_monitor_grace_s": GRACE_S, "unreachable_toleration_s": TOLERATION_S},
        "client": {"timeout_s": TIMEOUT_S, "max_retries": 0},
        "faults": {"node_failures": [{"at_s": FAIL_S, "node": 0}]},
        "timeseries_interval_s": 10,
    }
    sc = Scenario.model_validate(base)
    return sc.override(over) if over else sc


def _lost(res: SimResult) -> set[int]:
    return set(res.crashes.loc[res.crashes["kind"] == "node", "pod"].tolist())


def test_node_failures_need_a_cluster_section() -> None:
    with pytest.raises(SettingsError, match="faults.node_failures needs a cluster section"):
        _scenario(cluster=None)


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_a_dead_node_blackholes_its_pods_until_they_leave_the_endpoints(mode: str) -> None:
    res = simulate(_scenario(mode), seed=1)
    lost = _lost(res)
    assert lost == {0, 1, 2, 3}  # node 0 held the first four pods
    assert (res.crashes["time_s"] == FAIL_S).all()
    df = res.requests
    on_lost = df[df["pod"].isin(lost)]
    left_s = FAIL_S + GRACE_S + PROPAGATION_S
    # after the failure the lost pods answer nothing: every request sent to one times out, at its timeout
    after = on_lost[on_lost["arrival_s"] >= FAIL_S]
    assert len(after) > 500  # round robin: about half of 41 s of 40 requests a second
    assert (after["outcome"] == "timed_out").all()
    np.testing.assert_allclose(after["end_s"], after["arrival_s"] + TIMEOUT_S, rtol=0, atol=1e-9)
    # ... and once the endpoints drop them (NotReady + propagation) nothing is sent there
    assert after["arrival_s"].max() < left_s
    assert after["arrival_s"].max() > left_s - 1.0
    # the other pods serve everything sent to them
    others = df[~df["pod"].isin(lost) & (df["arrival_s"] < 800)]
    assert (others["outcome"] == "ok").all()


def test_requests_held_by_a_dead_node_time_out_rather_than_fail_at_once() -> None:
    # a long service time: requests in service at the failure wait for their client's timeout, as nothing
    # refuses them (a crashed container's connection reset fails them at once)
    sc = _scenario(**{"service.mean_s": 3.0, "workload.arrivals.rate_per_s": 4})
    df = simulate(sc, seed=2).requests
    held = df[df["pod"].isin([0, 1, 2, 3]) & (df["arrival_s"] < FAIL_S) & (df["arrival_s"] + 3.0 > FAIL_S)]
    assert len(held) >= 3
    assert (held["outcome"] == "timed_out").all()
    np.testing.assert_allclose(held["end_s"], held["arrival_s"] + TIMEOUT_S, rtol=0, atol=1e-9)
    crashes = [{"at_s": FAIL_S, "pod": k} for k in range(4)]  # the same pods' containers crash instead
    crashed = simulate(sc.override({"faults.node_failures": [], "faults.crashes": crashes}), seed=2).requests
    cut = crashed[crashed["pod"].isin([0, 1, 2, 3]) & (crashed["arrival_s"] < FAIL_S)
                  & (crashed["arrival_s"] + 3.0 > FAIL_S)]
    assert len(cut) >= 3 and (cut["outcome"] == "failed").all() and (cut["end_s"] == FAIL_S).all()


def test_the_pods_are_replaced_after_the_toleration_and_the_dead_node_billed_until_removed() -> None:
    res = simulate(_scenario(), seed=1)
    ts = res.timeseries.set_index("time_s")
    evicted_s = FAIL_S + GRACE_S + TOLERATION_S
    # the lost pods count as replicas until evicted: nothing replaces them before; the API shows them Ready
    # until the node lifecycle controller marks them NotReady (the grace), as `kubectl get deploy` would
    assert (ts.loc[FAIL_S + 10:FAIL_S + GRACE_S - 10, "ready_replicas"] == 8).all()
    assert (ts.loc[FAIL_S + GRACE_S + 10:evicted_s - 10, "ready_replicas"] == 4).all()
    assert (ts.loc[:evicted_s - 10, ["pending_replicas", "starting_replicas"]] == 0).all().all()
    assert (ts.loc[FAIL_S + 10:evicted_s - 10, "crashed_replicas"] == 4).all()
    # evicted: four replacements; node 1's 4 GPUs are taken, the dead node still counts toward max_gpus 12,
    # so one node is provisioned (120 s), pulls the image (20 s) and starts them (30 s)
    assert ts.loc[evicted_s + 10, "pending_replicas"] == 4
    back_s = evicted_s + 120 + 20 + 30
    assert (ts.loc[back_s + 20:, "ready_replicas"] == 8).all()
    assert (ts.loc[evicted_s + 10:back_s - 10, "ready_replicas"] == 4).all()
    # billed: two nodes, then the replacement too, until the dead one goes 500 s after it failed
    gone_s = FAIL_S + 500
    assert (ts.loc[:FAIL_S, "node_gpus"] == 8).all()
    assert (ts.loc[evicted_s + 10:gone_s - 10, "node_gpus"] == 12).all()
    assert (ts.loc[gone_s + 10:, "node_gpus"] == 8).all()


def test_the_api_shows_the_lost_pods_ready_until_the_node_lifecycle_controller_marks_them_notready() -> None:
    # a dead kubelet reports nothing: the Ready condition of its pods turns false only when the controller
    # marks the node NotReady, after the grace. Until then the Deployment's ready count, the
    # PodDisruptionBudget and the ReplicaSet's ranking (a scale-down deletes not-ready pods first) see them ready
    def run_to(t: float) -> Simulation:
        sim = Simulation(_scenario(**{"horizon_s": t}), seed=1)
        sim.run()
        return sim

    for sim, ready in ((run_to(FAIL_S + GRACE_S - 5), True), (run_to(FAIL_S + GRACE_S + 5), False)):
        cluster = sim.cluster
        lost = cluster.pods[:4]
        assert all(p.state == PodState.CRASHED and p.node_lost for p in lost)  # their containers are gone either way
        assert [p.ready_condition for p in lost] == [ready] * 4
        assert [cluster._ranked(p, Counter()).ready for p in lost] == [ready] * 4
        assert cluster.ready_count() == (8 if ready else 4)
        assert all(p.ready_condition for p in cluster.pods[4:])


def test_a_least_outstanding_router_sends_a_dead_pod_less() -> None:
    # the router counts the requests a dead pod never answers as open: it stops picking those pods long
    # before the endpoints drop them; round robin keeps sending them their share
    rr = Simulation(_scenario(), seed=1)
    rr.run()
    lo = Simulation(_scenario(**{"router.kind": "least_outstanding"}), seed=1)
    lo.run()
    assert rr.client.n_blackholed > 500
    assert 0 < lo.client.n_blackholed < rr.client.n_blackholed / 10


def test_a_named_node_that_is_not_there_is_reported_not_dropped() -> None:
    res = simulate(_scenario(**{"faults.node_failures": [{"at_s": 50, "node": 7}, {"at_s": 60}]}), seed=1)
    assert res.skipped_crashes["why"].tolist() == ["node 7 not created (yet)"]
    assert len(_lost(res)) == 4  # the second, unnamed, picked a node with pods
    again = simulate(_scenario(**{"faults.node_failures": [{"at_s": 50, "node": 0}, {"at_s": 60, "node": 0}]}),
                     seed=1)
    assert again.skipped_crashes["why"].tolist() == ["node 0 failed already"]


def test_the_run_accounts_for_every_request() -> None:
    # arrived = ok + failed + timed out + rejected + in flight, with requests still waiting for a timeout
    res = simulate(_scenario(**{"horizon_s": FAIL_S + 5}), seed=3)
    s = res.summary
    assert s.in_flight > 0
    assert s.arrived == s.completed + s.failed + s.timed_out + s.rejected + s.in_flight
    assert isinstance(res.requests, pd.DataFrame)


def test_node_mtbf_fails_each_ready_node_after_its_own_exponential_draw() -> None:
    from capsim.sim.streams import Streams

    mtbf = 400.0
    sc = _scenario(**{"faults.node_failures": [], "faults.node_mtbf_s": mtbf, "horizon_s": 1500})
    res = simulate(sc, seed=7)
    draws = Streams(7)["node_failures"].exponential(mtbf, size=2)  # nodes 0 and 1, ready at time 0, in order
    node_of_pod = {p: p // 4 for p in range(8)}  # 4 one-GPU pods a node, placed in order
    log = res.crashes[res.crashes["kind"] == "node"]
    first = {n: g["time_s"].iloc[0] for n, g in log[log["pod"] < 8].groupby(log["pod"].map(node_of_pod))}
    expect = {n: float(t) for n, t in enumerate(draws) if t < sc.horizon_s}
    assert len(expect) == 2 and first == pytest.approx(expect, rel=1e-12)


def test_node_failure_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match="faults.node_mtbf_s needs a cluster section"):
        _scenario(**{"cluster": None, "faults.node_failures": [], "faults.node_mtbf_s": 100.0})
    with pytest.raises(SettingsError, match="faults.node_mtbf_s 1e-06 makes up to about .* raise node_mtbf_s"):
        _scenario(**{"faults.node_mtbf_s": 1e-6})
    with pytest.raises(SettingsError, match=r"faults\.node_failures\.0\.node must be >= 0"):
        _scenario(**{"faults.node_failures": [{"at_s": 1, "node": -1}]})


def test_check_warns_when_no_node_is_left_for_a_replacement() -> None:
    from capsim.studies.checks import run_checks

    def room(**over: Any) -> list[str]:
        return [f.message for f in run_checks(_scenario(**over)) if f.check == "node-failure-no-room"]

    assert room() == []  # 8 pods fill two 4-GPU nodes; max_gpus 12 leaves a third
    (msg,) = room(**{"cluster.max_gpus": 8})
    assert "8 GPUs hold 2 node(s) of 4, and the peak of 8 pods fills 2" in msg and "500 s after it fails" in msg
    assert room(**{"cluster.max_gpus": 8, "faults.node_failures": []}) == []  # no node can fail
    assert room(**{"cluster.max_gpus": 8, "faults.node_failures": [], "faults.node_mtbf_s": 1e5}) != []


def test_the_pods_own_toleration_replaces_them_sooner() -> None:
    # pods.unreachable_toleration_s (their own tolerations, which the export writes) wins over the cluster's
    res = simulate(_scenario(**{"pods.unreachable_toleration_s": 30}), seed=1)
    ts = res.timeseries.set_index("time_s")
    evicted_s = FAIL_S + GRACE_S + 30
    assert (ts.loc[:evicted_s - 10, "pending_replicas"] == 0).all()
    assert ts.loc[evicted_s + 10, "pending_replicas"] == 4
    assert (ts.loc[evicted_s + 120 + 20 + 30 + 20:, "ready_replicas"] == 8).all()


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_a_partition_that_heals_before_the_node_is_notready_loses_only_its_requests(mode: str) -> None:
    sim = Simulation(_scenario(mode, **{"faults.node_failures": [{"at_s": FAIL_S, "node": 0, "duration_s": 20}]}),
                     seed=1)
    res = sim.run()
    df = res.requests
    lost = df[df["pod"].isin([0, 1, 2, 3])]
    during = lost[(lost["arrival_s"] >= FAIL_S) & (lost["arrival_s"] < FAIL_S + 20)]
    assert len(during) > 100 and (during["outcome"] == "timed_out").all()
    after = lost[(lost["arrival_s"] >= FAIL_S + 20) & (lost["arrival_s"] < 800)]
    assert len(after) > 1000 and (after["outcome"] == "ok").all()  # back in service, never left the endpoints
    ts = res.timeseries.set_index("time_s")
    assert (ts["ready_replicas"] == 8).all() and (ts["pending_replicas"] == 0).all()  # never NotReady
    assert [p.ready_s for p in sim.cluster.pods[:4]] == [0.0] * 4  # their Ready condition never changed


def test_a_partition_that_heals_after_notready_but_before_eviction_brings_the_pods_back() -> None:
    sim = Simulation(_scenario(**{"faults.node_failures": [{"at_s": FAIL_S, "node": 0, "duration_s": 100}]}),
                     seed=1)
    res = sim.run()
    assert [p.ready_s for p in sim.cluster.pods[:4]] == [FAIL_S + 100] * 4  # Ready again when the kubelet is back
    ts = res.timeseries.set_index("time_s")
    assert (ts.loc[FAIL_S + 10:FAIL_S + GRACE_S - 10, "ready_replicas"] == 8).all()  # Ready in the API until NotReady
    assert (ts.loc[FAIL_S + GRACE_S + 10:FAIL_S + 90, "ready_replicas"] == 4).all()
    assert (ts.loc[FAIL_S + 110:, "ready_replicas"] == 8).all()  # the same pods, ready again: nothing evicted
    assert (ts["pending_replicas"] == 0).all() and (ts["node_gpus"] == 8).all()
    df = res.requests
    back = df[df["pod"].isin([0, 1, 2, 3]) & (df["arrival_s"] > FAIL_S + 100 + PROPAGATION_S)]
    assert len(back) > 1000 and (back["arrival_s"] < FAIL_S + 100 + PROPAGATION_S + 1).any()


def test_a_node_back_after_its_pods_were_replaced_takes_new_pods() -> None:
    # evicted at 440; the replacements wait for a new node (120 s) until node 0 is back at 500 and free
    res = simulate(_scenario(**{"faults.node_failures": [{"at_s": FAIL_S, "node": 0, "duration_s": 400}]}),
                   seed=1)
    ts = res.timeseries.set_index("time_s")
    evicted_s = FAIL_S + GRACE_S + TOLERATION_S
    assert ts.loc[evicted_s + 10, "pending_replicas"] == 4
    # placed on node 0 at 500 (its image is there): started 30 s later, before the new node is even up at 560
    assert (ts.loc[FAIL_S + 400 + 30 + 20:, "ready_replicas"] == 8).all()
    assert ts.loc[FAIL_S + 400 + 30 + 20, "node_gpus"] == 12  # the node provisioned meanwhile, still billed
    assert res.summary.crashes == 4


@pytest.mark.parametrize("mode", ["static", "continuous"])
@pytest.mark.parametrize("store", ["redis", "pod_local"])
@pytest.mark.parametrize("router", ["round_robin", "least_outstanding", "session_affinity"])
def test_sessions_through_a_node_failure_and_a_partition_balance_their_books(mode: str, store: str,
                                                                             router: str) -> None:
    # three-turn sessions with retries: every request that arrived is answered, failed, timed out, rejected or
    # still in flight, exactly once; with pod-local state the sessions on the dead node are lost
    over = {"horizon_s": 400, "client.max_retries": 2, "client.backoff_s": 0.5, "router.kind": router,
            "state.store": store, "workload.arrivals.rate_per_s": 8,
            "workload.sessions": {"turns": 3, "think_time_s": 2.0},
            "faults.node_failures": [{"at_s": 100, "node": 0}, {"at_s": 250, "node": 1, "duration_s": 30}]}
    res = simulate(_scenario(mode, **over), seed=4)
    s, df = res.summary, res.requests
    assert df["request_id"].is_unique
    assert s.arrived == len(df) == s.completed + s.failed + s.timed_out + s.rejected + s.in_flight
    assert (res.crashes["kind"] == "node").sum() == 8
    assert s.retries > 0
    if store == "pod_local":
        assert s.lost_sessions > 0
    else:
        assert s.lost_sessions == 0


def test_an_external_value_target_multiplies_by_the_pods_the_api_shows_ready() -> None:
    # upstream multiplies a Value target's ratio by the pods whose Ready condition holds: a dead node's
    # pods count until the node lifecycle controller marks them NotReady (twice the target: 2 x 8, then 2 x 4)
    gateway = {"type": "External", "external": {"metric": {"name": "capsim_gateway_requests_total"},
                                                "target": {"type": "Value", "value": "40"}}}
    sc = _scenario(**{"autoscaler": {"minReplicas": 8, "maxReplicas": 24, "metrics": [gateway]}})
    for end_s, ready in ((FAIL_S + GRACE_S - 10, 8), (FAIL_S + GRACE_S + 10, 4)):
        sim = Simulation(sc.override({"horizon_s": end_s}), seed=1)
        sim.run()
        hpa = sim.autoscaling
        assert hpa is not None
        proposal = hpa._external_replicas(sim.cluster.live_pods, 8, 80.0, 40.0, True, hpa.hpa.metric_tolerance)
        assert proposal == 2 * ready

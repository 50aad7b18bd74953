"""The node lifecycle controller's taint-based eviction (``capsim.sim.nodelifecycle``): NotReady nodes are
tainted through a rate-limited queue per zone whose rate follows the zone's health, so several dead nodes
are evicted 10 s apart, a zone that lost most of its nodes evicts nothing, and a cluster whose every node
is NotReady evicts nothing until one is back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from capsim.cli import app
from capsim.export.readme import render_readme
from capsim.export.target import DeployTarget
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim.nodelifecycle import TokenBucket, ZoneState, zone_state
from capsim.sim.pod import PodState
from capsim.sim.simulate import SimResult, Simulation
from capsim.studies.checks import run_checks
from cluster_scenarios import cluster_scenario

FAIL_S = 100.0
GRACE_S = 40.0
TOLERATION_S = 300.0


def _scenario(nodes: int = 4, **over: Any) -> Scenario:
    """``nodes`` 4-GPU nodes full of one-GPU pods, room for two more; no autoscaler; cluster-autoscaler's
    scale-down on (it removes dead nodes)."""
    return cluster_scenario(**{
        "horizon_s": 900, "pods.replicas": 4 * nodes, "pods.endpoints_propagation_s": 1.0,
        "cluster.max_gpus": 4 * (nodes + 2), "cluster.node_provision_s": 120, "cluster.scale_down_enabled": True,
        "cluster.node_monitor_grace_s": GRACE_S, "cluster.unreachable_toleration_s": TOLERATION_S,
        "timeseries_interval_s": 5, **over})


def _run(sc: Scenario) -> tuple[Simulation, SimResult]:
    sim = Simulation(sc, seed=0)
    return sim, sim.run()


def _log(sim: Simulation, event: str) -> list[tuple[float, int, str]]:
    lifecycle = sim.cluster.nodes.lifecycle
    assert lifecycle is not None
    return [(t, z, d) for t, e, z, d in lifecycle.log if e == event]


def _fail(*nodes: int, duration_s: float | None = None) -> dict[str, Any]:
    return {"faults.node_failures": [{"at_s": FAIL_S, "node": n, "duration_s": duration_s} for n in nodes]}


def test_zone_states_follow_the_upstream_thresholds() -> None:
    assert zone_state(0, 1, 0.55) == ZoneState.FULL  # no Ready node left
    assert zone_state(0, 0, 0.55) == ZoneState.NORMAL
    assert zone_state(1, 2, 0.55) == ZoneState.NORMAL  # at most 2 NotReady: healthy, whatever the share
    assert zone_state(2, 3, 0.55) == ZoneState.PARTIAL  # 3 of 5
    assert zone_state(3, 3, 0.55) == ZoneState.NORMAL  # half is under 0.55
    assert zone_state(3, 3, 0.5) == ZoneState.PARTIAL


def test_a_swapped_limiter_keeps_its_bucket_empty_when_it_had_no_token() -> None:
    b = TokenBucket(0.1, 0.0)
    assert b.try_accept(0.0) and not b.try_accept(9.9) and b.try_accept(10.0)
    assert b.swapped(0.1, 12.0) is b  # the same rate: the same limiter
    assert b.swapped(0.01, 12.0).token_at == pytest.approx(112.0)  # no token at 12: the new one starts empty
    assert b.swapped(0.01, 20.0).token_at == 20.0  # a token at 20: the new one starts full
    never = b.swapped(0.0, 12.0)
    assert not never.try_accept(1e9)
    assert never.swapped(0.1, 50.0).token_at == pytest.approx(60.0)  # out of "never": empty


def test_two_dead_nodes_are_tainted_ten_seconds_apart_and_their_pods_evicted_so() -> None:
    sim, res = _run(_scenario(**_fail(0, 1)))
    assert _log(sim, "taint") == [(FAIL_S + GRACE_S, 0, "node 0"), (FAIL_S + GRACE_S + 10, 0, "node 1")]
    assert _log(sim, "zone_state") == []  # 2 NotReady of 5 nodes (4 GPU nodes and 1 other): healthy
    ts = res.timeseries.set_index("time_s")
    evicted_s = FAIL_S + GRACE_S + TOLERATION_S
    assert (ts.loc[:evicted_s - 5, "pending_replicas"] == 0).all()
    assert ts.loc[evicted_s + 5, "pending_replicas"] == 4 and ts.loc[evicted_s + 15, "pending_replicas"] == 8


def test_a_zone_that_lost_most_of_its_nodes_evicts_nothing_and_its_pods_are_never_replaced() -> None:
    # 3 of the zone's 5 nodes NotReady (>= 0.55, more than 2) in a zone of at most 50 nodes: eviction stops, so
    # the 12 pods stay replicas that serve nothing, and the dead nodes (their pods' GPUs still requested)
    # stay too, billed, past cluster-autoscaler's unready time
    sc = _scenario(**_fail(0, 1, 2), **{"cluster.scale_down_unready_time_s": 300})
    sim, res = _run(sc)
    assert _log(sim, "zone_state") == [(FAIL_S + GRACE_S, 0, "partial_disruption")]
    assert _log(sim, "taint") == []
    ts = res.timeseries.set_index("time_s")
    assert (ts.loc[FAIL_S + GRACE_S + 5:, "ready_replicas"] == 4).all()
    assert (ts.loc[FAIL_S + GRACE_S + 5:, "crashed_replicas"] == 12).all()
    assert (ts["pending_replicas"] == 0).all()
    assert (res.nodes["removed_s"].isna()).all() and (ts["node_gpus"] == 16).all()
    assert all(p.state == PodState.CRASHED for p in sim.cluster.pods[:12])
    # three more nodes outside the GPU group keep the zone healthy (3 of 7): all three are evicted, 10 s apart
    sim, res = _run(sc.override({"cluster.other_nodes_per_zone": 3}))
    assert [t for t, _, _ in _log(sim, "taint")] == [FAIL_S + GRACE_S + k for k in (0, 10, 20)]
    # a zone larger than large_cluster_size_threshold evicts at the secondary rate: 100 s apart
    sim, res = _run(sc.override({"cluster.large_cluster_size_threshold": 4}))
    assert [t for t, _, _ in _log(sim, "taint")] == [FAIL_S + GRACE_S + k for k in (0, 100, 200)]
    # the dead nodes go with their last pod, once cluster-autoscaler's unready time has passed
    removed = res.nodes.set_index("node")["removed_s"]
    for k, t in enumerate(_log(sim, "taint")):
        assert removed[k] == pytest.approx(t[0] + TOLERATION_S)


def test_with_every_node_notready_nothing_is_evicted_until_one_is_back() -> None:
    # no node outside the GPU group: both nodes NotReady is every node of every zone, which the controller
    # takes for its own network failing. When node 1's partition heals, node 0 is queued afresh, tainted
    # on the next token (its bucket starts empty: 10 s) and its pods evicted a toleration later
    sc = _scenario(2, **{"cluster.other_nodes_per_zone": 0, "faults.node_failures": [
        {"at_s": FAIL_S, "node": 0}, {"at_s": FAIL_S, "node": 1, "duration_s": 100}]})
    sim, res = _run(sc)
    assert [(t, e) for t, e, _, _ in sim.cluster.nodes.lifecycle.log] == [  # type: ignore[union-attr]
        (FAIL_S + GRACE_S, "master_disruption"), (FAIL_S + 100, "master_disruption_over"), (FAIL_S + 100, "zone_state"),
        (FAIL_S + 110, "taint")]
    assert _log(sim, "taint") == [(FAIL_S + 100 + 10, 0, "node 0")]
    assert list(res.nodes["tainted_s"].fillna(-1))[:2] == [FAIL_S + 110, -1]  # node 1 back untainted
    ts = res.timeseries.set_index("time_s")
    evicted_s = FAIL_S + 100 + 10 + TOLERATION_S
    assert (ts.loc[:evicted_s - 5, "pending_replicas"] == 0).all() and ts.loc[evicted_s + 5, "pending_replicas"] == 4
    # one node outside the GPU group, Ready: no master disruption, node 0 is evicted at once
    sim, _ = _run(sc.override({"cluster.other_nodes_per_zone": 1}))
    assert _log(sim, "taint")[0] == (FAIL_S + GRACE_S, 0, "node 0")


def test_a_dark_zone_counts_its_other_nodes_notready_too() -> None:
    # zone 0 dark: its GPU node and its other node are NotReady, the zone fully disrupted; zone 1 is healthy,
    # so zone 0's node is evicted at the normal rate (at once)
    sc = _scenario(2, **{"cluster.zones": 2, "pods.zone_spread": {"max_skew": 1},
                         "faults.zone_failures": [{"at_s": FAIL_S, "zone": 0}]})
    sim, _ = _run(sc)
    assert _log(sim, "zone_state") == [(FAIL_S + GRACE_S, 0, "full_disruption")]
    assert [(t, z) for t, z, _ in _log(sim, "taint")] == [(FAIL_S + GRACE_S, 0)]


def test_the_controller_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match="cluster.node_eviction_rate"):
        _scenario(**{"cluster.node_eviction_rate": 0})
    with pytest.raises(SettingsError, match="cluster.unhealthy_zone_threshold"):
        _scenario(**{"cluster.unhealthy_zone_threshold": 1.5})
    with pytest.raises(SettingsError, match="cluster.other_nodes_per_zone"):
        _scenario(**{"cluster.other_nodes_per_zone": -1})


def test_the_export_readme_names_the_controller_flags_the_plan_assumed() -> None:
    def readme(sc: Scenario) -> str:
        return render_readme(sc, DeployTarget(name="agent", namespace="agents"), numbers=None, findings=[])

    failing = Scenario.from_yaml("data/scenarios/node_failure.yaml")
    text = readme(failing.override({"cluster.other_nodes_per_zone": 2}))
    assert ("`--node-eviction-rate=0.1`, `--secondary-node-eviction-rate=0.01`, `--unhealthy-zone-threshold=0.55`, "
            "`--large-cluster-size-threshold=50`") in text
    assert "counting 2 node(s) outside the GPU node group in each zone" in text and "no node auto-repair" in text
    assert "`--max-total-unready-percentage=45`, `--ok-total-unready-count=3`" in text
    repaired = readme(failing.override({"cluster.node_auto_repair_s": 600}))
    assert "the cloud's node auto-repair deleting a node NotReady for 600 s" in repaired
    calm = failing.override({"faults.node_failures": []})  # no node dies in the plan: nothing assumed
    assert "--node-eviction-rate" not in readme(calm)


def test_a_clouds_node_auto_repair_ends_the_stall() -> None:
    # the three nodes of the unhealthy zone are never tainted; the cloud deletes each 600 s after it went
    # NotReady, with its pods, which the ReplicaSet replaces on new nodes (120 s to provision, 30 s to start)
    sc = _scenario(**_fail(0, 1, 2), **{"cluster.node_auto_repair_s": 600, "horizon_s": 1000})
    sim, res = _run(sc)
    repaired_s = FAIL_S + GRACE_S + 600
    assert _log(sim, "taint") == []
    assert _log(sim, "auto_repair") == [(repaired_s, 0, f"node {k}") for k in range(3)]
    nodes = res.nodes.set_index("node")
    assert list(nodes.loc[[0, 1, 2], "removed_s"]) == [repaired_s] * 3
    ts = res.timeseries.set_index("time_s")
    assert (ts.loc[FAIL_S + GRACE_S + 5:repaired_s - 5, "ready_replicas"] == 4).all()
    assert ts.loc[repaired_s + 5, "pending_replicas"] == 12 and ts.loc[repaired_s + 5, "crashed_replicas"] == 0
    assert (ts.loc[repaired_s + 120 + 30 + 5:, "ready_replicas"] == 16).all()
    # a partition that heals first: nothing is repaired
    healed = _scenario(**_fail(0, 1, 2, duration_s=300), **{"cluster.node_auto_repair_s": 600, "horizon_s": 1000})
    sim, res = _run(healed)
    assert _log(sim, "auto_repair") == [] and res.nodes["removed_s"].isna().all()


def test_cluster_autoscaler_halts_while_too_many_nodes_are_notready() -> None:
    # two zones of 4 GPU nodes and one other node each; zone 0 goes dark: 5 of the 10 nodes NotReady, more
    # than 3 and than 45%, so cluster-autoscaler adds no node: the 16 evicted pods stay Pending, zone 1 full.
    # At 60% it would go on, and they run on new nodes in zone 1 by the toleration + 120 s + 30 s
    sc = _scenario(8, **{"cluster.zones": 2, "pods.zone_spread": {"max_skew": 8}, "horizon_s": 1000, "cluster.max_gpus": 64,
                         "faults.zone_failures": [{"at_s": FAIL_S, "zone": 0}]})
    (warned,) = [f for f in run_checks(sc) if f.check == "zone-failure-halts-autoscaler"]
    assert warned.path == "cluster.zones" and "about 5 of the cluster's 10 nodes NotReady" in warned.message
    assert not [f for f in run_checks(sc.override({"cluster.zones": 3})) if f.check == "zone-failure-halts-autoscaler"]
    sim, res = _run(sc)
    assert [(t, e) for t, e, _, _ in sim.cluster.nodes.lifecycle.log if e.startswith("autoscaler")] == [  # type: ignore[union-attr]
        (FAIL_S + GRACE_S, "autoscaler_halted")]
    evicted_s = FAIL_S + GRACE_S + 30 + TOLERATION_S  # the zone's four nodes tainted 10 s apart
    ts = res.timeseries.set_index("time_s")
    assert (ts.loc[evicted_s + 5:, "pending_replicas"] == 16).all() and (ts.loc[evicted_s + 5:, "ready_replicas"] == 16).all()
    assert len(res.nodes) == 8
    sim, res = _run(sc.override({"cluster.max_total_unready_percentage": 60}))
    assert not [e for _, e, _, _ in sim.cluster.nodes.lifecycle.log if e.startswith("autoscaler")]  # type: ignore[union-attr]
    ts = res.timeseries.set_index("time_s")
    assert (ts.loc[evicted_s + 120 + 30 + 10:, "ready_replicas"] == 32).all() and len(res.nodes) == 12
    # the zone back 600 s later: its nodes Ready again, cluster-autoscaler works again
    back = sc.override({"faults.zone_failures": [{"at_s": FAIL_S, "zone": 0, "duration_s": 600}]})
    sim, res = _run(back)
    assert [(t, e) for t, e, _, _ in sim.cluster.nodes.lifecycle.log if e.startswith("autoscaler")] == [  # type: ignore[union-attr]
        (FAIL_S + GRACE_S, "autoscaler_halted"), (FAIL_S + 600, "autoscaler_resumed")]
    assert res.timeseries.set_index("time_s").loc[FAIL_S + 600 + 30 + 10:, "ready_replicas"].eq(32).all()


def test_capsim_simulate_says_when_kubernetes_stopped_replacing_and_writes_the_events(tmp_path: Path) -> None:
    # node_failure.yaml's 12 pods on three 4-GPU nodes, all three dead at once: 3 of the zone's 4 nodes
    result = CliRunner().invoke(app, [
        "simulate", "data/scenarios/node_failure.yaml", "--set", "horizon_s=200", "--set", "warmup_s=0",
        "--set", "cluster.node_gpus=4", "--set", "faults.node_failures=[{at_s: 60, node: 0}, {at_s: 60, node: 1}, "
        "{at_s: 60, node: 2}]", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert ("note: at 100 s most of zone 0's nodes were NotReady: the node lifecycle controller evicts nothing more "
            "there") in result.output
    assert "node_events.csv" in result.output
    events = pd.read_csv(tmp_path / "node_events.csv")
    assert list(events.columns) == ["time_s", "event", "zone", "detail"]
    assert events.values.tolist() == [[100.0, "zone_state", 0, "partial_disruption"]]

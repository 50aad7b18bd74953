"""Spot GPU nodes (``cluster.spot``): beyond the on-demand node group's nodes, new nodes are spot and billed at
the spot price; the cloud reclaims one (``faults.spot_interruptions``, or at random with ``mtbf_s``) with a
notice: the node is drained at once, its pods replaced elsewhere, and it is gone at the notice's end with
whatever still runs there."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from capsim.export.readme import render_readme
from capsim.export.target import DeployTarget
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim.pod import PodState
from capsim.sim.simulate import SimResult, Simulation, simulate
from capsim.sim.streams import STREAM_NAMES
from capsim.studies.batch_modes import fixed_fleet
from capsim.studies.checks import run_checks
from capsim.studies.sweep import expand_grid, load_grid
from cluster_scenarios import cluster_scenario

NOTICE_S = 120.0
AT_S = 100.0


def _scenario(**over: Any) -> Scenario:
    """8 one-GPU pods on two 4-GPU nodes: node 0 on-demand, node 1 spot at 40% of the price."""
    return cluster_scenario(**{"pods.gpu_cost_per_hour": 2.0, "horizon_s": 900,
                               "cluster.spot": {"price_ratio": 0.4, "on_demand_nodes": 1, "notice_s": NOTICE_S},
                               **over})


def _run(sc: Scenario) -> SimResult:
    return simulate(sc, seed=0)


def test_nodes_beyond_the_on_demand_group_are_spot_and_billed_at_the_spot_price() -> None:
    res = _run(_scenario(**{"warmup_s": 0}))
    assert list(res.nodes["spot"]) == [False, True]
    # two 4-GPU nodes for 900 s: 1 GPU-hour each; the spot one at 0.4 of the 2.0 an hour
    assert res.summary.node_gpu_hours == pytest.approx(2.0)
    assert res.summary.cost == pytest.approx((1.0 + 0.4) * 2.0)
    on_demand = _run(_scenario(**{"warmup_s": 0, "cluster.spot": None}))
    assert on_demand.summary.cost == pytest.approx(4.0)


def test_an_interruption_drains_the_node_at_once_and_its_pods_are_replaced_on_a_new_spot_node() -> None:
    sc = _scenario(**{"warmup_s": 0, "faults.spot_interruptions": [{"at_s": AT_S, "node": 1}]})
    res = _run(sc)
    nodes = res.nodes.set_index("node")
    assert nodes.loc[1, "interrupted_s"] == AT_S
    assert AT_S <= nodes.loc[1, "removed_s"] < AT_S + 1  # drained in a batch's time: it goes before the notice ends
    assert bool(nodes.loc[2, "spot"]) and nodes.loc[2, "created_s"] == AT_S  # replacements pending at once
    ts = res.timeseries.set_index("time_s")
    assert (ts.loc[AT_S:AT_S + 50, "ready_replicas"] == 4).all()
    assert (ts.loc[AT_S + 60 + 30 + 10:, "ready_replicas"] == 8).all()  # provisioned, then started
    assert res.crashes.empty and res.summary.error_rate == 0  # a drain, not a crash: nothing failed
    assert res.summary.cost == pytest.approx((1.0 + 0.4 * 4 * (nodes.loc[1, "removed_s"]
                                                                + 900 - AT_S) / 3600) * 2.0)


def test_a_pod_still_draining_when_the_notice_ends_dies_with_the_node() -> None:
    # batches of 20 s, a notice of 5 s and a grace of 25 s: the pods on node 1 are mid-batch when it goes
    sc = _scenario(**{"service": {"kind": "deterministic", "mean_s": 20.0},
                      "workload.arrivals.rate_per_s": 0.3, "client.timeout_s": 60,
                      "cluster.spot.notice_s": 5, "faults.spot_interruptions": [{"at_s": AT_S, "node": 1}]})
    (f,) = [f for f in run_checks(sc) if f.check == "spot-notice-below-grace"]
    assert f.path == "pods.termination_grace_s" and f.level == "warn"
    res = _run(sc)
    killed = res.crashes[res.crashes["kind"] == "spot"]
    assert len(killed) >= 1 and (killed["time_s"] == AT_S + 5).all()
    assert res.nodes.set_index("node").loc[1, "removed_s"] == AT_S + 5
    assert not [f for f in run_checks(_scenario()) if f.check == "spot-notice-below-grace"]


def test_random_interruptions_take_spot_nodes_only_after_their_own_exponential_draw() -> None:
    mtbf = 400.0
    sc = _scenario(**{"cluster.spot.mtbf_s": mtbf, "cluster.spot.on_demand_nodes": 0, "horizon_s": 300})
    res = _run(sc)
    draws = np.random.Generator(np.random.PCG64(np.random.SeedSequence(0).spawn(len(STREAM_NAMES))[
        STREAM_NAMES.index("spot")]))
    first = [float(draws.exponential(mtbf)) for _ in range(2)]  # nodes 0 and 1, ready at time 0, in order
    got = res.nodes.set_index("node")["interrupted_s"]
    for node, t in enumerate(first):
        assert (got[node] == pytest.approx(t)) if t < 300 else np.isnan(got[node])
    on_demand = _run(_scenario(**{"cluster.spot.mtbf_s": 50.0, "cluster.spot.on_demand_nodes": 2}))
    assert on_demand.nodes["interrupted_s"].isna().all()  # no spot node, nothing to reclaim


def test_spot_settings_are_checked_and_a_missing_spot_node_reported() -> None:
    with pytest.raises(SettingsError, match="spot needs billing: node"):
        _scenario(**{"cluster.billing": "pod"})
    # interruptions without spot nodes are allowed (a study's stress may meet on-demand candidates), skipped
    # with their reason, and flagged by the check
    on_demand = _scenario(**{"cluster.spot": None, "faults.spot_interruptions": [{"at_s": 1}, {"at_s": 2, "node": 0}]})
    (f,) = [f for f in run_checks(on_demand) if f.check == "spot-interruptions-without-spot"]
    assert f.path == "faults.spot_interruptions" and f.level == "warn"
    assert list(_run(on_demand).skipped_crashes["why"]) == ["cluster.spot is not set: no spot node to reclaim"] * 2
    with pytest.raises(SettingsError, match="price_ratio"):
        _scenario(**{"cluster.spot.price_ratio": 0})
    # reclaims by the million (a runaway of replacements) are refused before the run, as node failures are
    with pytest.raises(SettingsError, match=r"cluster.spot.mtbf_s 1e-06 makes up to about .* spot reclaims in "
                                            r"horizon_s 900, over the limit of 1e\+06; raise mtbf_s"):
        _scenario(**{"cluster.spot.mtbf_s": 1e-6})
    res = _run(_scenario(**{"faults.spot_interruptions": [{"at_s": 10, "node": 0}, {"at_s": 20, "node": 7}]}))
    assert list(res.skipped_crashes["why"]) == ["spot node 0 not spot", "spot node 7 not created (yet)"]


def test_the_export_readme_names_the_spot_node_group_and_its_notice() -> None:
    sc = Scenario.from_yaml("data/scenarios/friday_rush.yaml").override(
        {"cluster.spot": {"price_ratio": 0.35, "on_demand_nodes": 1, "notice_s": 30}})
    readme = render_readme(sc, DeployTarget(name="agent", namespace="agents"), numbers=None, findings=[])
    assert ("- spot GPU nodes beyond an on-demand node group of 1 node(s) (cluster-autoscaler's priority expander "
            "filling the on-demand group first), at 0.35 of the on-demand price; a termination handler") in readme
    assert "which gives it 30 s: every pod deleted at once, whatever the PodDisruptionBudget" in readme
    evicting = render_readme(sc.override({"cluster.spot.drain": "eviction"}), DeployTarget(name="agent", namespace="agents"),
                             numbers=None, findings=[])
    assert "which gives it 30 s: through the eviction API, as AWS Node Termination Handler and Karpenter do" in evicting



def test_a_fixed_fleet_on_spot_keeps_its_nodes_and_a_spare_for_the_reclaims() -> None:
    # pod-shapes and the batch-mode what-if size a fixed fleet: with reclaims it keeps the cluster (and so the
    # spot nodes and their price), the nodes it fills and one spare; without, it drops the cluster as before
    sc = _scenario(**{"faults.spot_interruptions": [{"at_s": AT_S}]})
    fleet = fixed_fleet(sc, 6)
    assert fleet.cluster is not None and fleet.cluster.spot is not None
    assert (fleet.cluster.max_gpus, fleet.cluster.scale_down_enabled) == ((2 + 1) * 4, False)
    random_only = fixed_fleet(_scenario(**{"cluster.spot.mtbf_s": 600.0}), 6)
    assert random_only.cluster is not None and random_only.cluster.max_gpus == 12
    assert fixed_fleet(_scenario(), 6).cluster is None


def test_the_shipped_spot_grid_makes_nine_valid_rush_scenarios_with_the_same_stress() -> None:
    rush = Scenario.from_yaml("data/scenarios/friday_rush.yaml")
    settings = expand_grid(load_grid("data/studies/spot_grid.yaml"))
    assert len(settings) == 9
    scenarios = [rush.override(s.changes) for s in settings]
    assert [sc.cluster.spot is not None for sc in scenarios if sc.cluster] == [False] * 3 + [True] * 6
    assert all(sc.faults is not None and [i.at_s for i in sc.faults.spot_interruptions] == [1830.0]
               for sc in scenarios)


def test_a_run_that_replaces_nodes_all_the_time_looks_only_at_the_nodes_and_pods_still_there() -> None:
    # every node reclaimed about once a minute for an hour: a hundred nodes and hundreds of pods come and go, and
    # placement, scans and samples look at those not gone (a scan over all of them made such a run quadratic)
    sc = _scenario(**{"cluster.spot.mtbf_s": 60.0, "cluster.spot.on_demand_nodes": 0, "cluster.spot.notice_s": 30,
                      "cluster.node_provision_s": 10, "horizon_s": 3600})
    sim = Simulation(sc, seed=0)
    res = sim.run()
    pool, cluster = sim.cluster.nodes, sim.cluster
    assert len(res.nodes) > 50 and len(cluster.pods) > 200  # the churn the test is about
    assert pool._up == [n for n in pool.nodes if n.removed_s is None]
    assert len(pool._up) <= sc.cluster.max_gpus // sc.cluster.node_gpus  # type: ignore[union-attr]
    assert cluster.live_pods == [p for p in cluster.pods if p.state != PodState.GONE]
    assert len(cluster.live_pods) <= 2 * sc.pods.replicas  # the replicas and those draining
    # the busy seconds of the pods gone are kept: the time series' busy fraction counts every pod
    busy = sum(p.busy_total_s(sc.horizon_s) for p in cluster.pods)
    assert cluster.gone_busy_s + sum(p.busy_total_s(sc.horizon_s) for p in cluster.live_pods) == pytest.approx(busy)
    # and the bill still covers every node of the run, the removed ones too
    assert res.summary.node_gpu_hours == pytest.approx(res.nodes["gpu_hours"].sum())


def test_an_eviction_drain_takes_only_what_the_disruption_budget_allows_and_the_rest_die_with_the_node() -> None:
    pdb = {"pods.disruption_budget": {"max_unavailable": 1}, "warmup_s": 0,
           "faults.spot_interruptions": [{"at_s": AT_S, "node": 1}]}
    force = _run(_scenario(**pdb))
    evict = _run(_scenario(**pdb, **{"cluster.spot.drain": "eviction"}))
    # force (the default): the four pods on node 1 go at once, the node with them
    ts_f, ts_e = force.timeseries.set_index("time_s"), evict.timeseries.set_index("time_s")
    assert (ts_f.loc[AT_S + 10:AT_S + 50, "ready_replicas"] == 4).all()
    assert force.nodes.set_index("node").loc[1, "removed_s"] < AT_S + 1
    # eviction: one pod at a time, the next when the budget allows again (its replacement is ready, on a
    # node provisioned in 60 s and started in 30); the others serve on until the notice's end
    assert (ts_e.loc[AT_S + 10:AT_S + 80, "ready_replicas"] == 7).all()
    node1 = [p for t, p, n, _ in evict.placements.itertuples(index=False) if n == 1]
    assert len(node1) == 4
    assert evict.nodes.set_index("node").loc[1, "removed_s"] == AT_S + NOTICE_S
    # and fewer pods lost at once: the rush keeps more capacity than with force, at the same cost or less
    assert ts_e.loc[AT_S + 10:AT_S + 80, "ready_replicas"].min() > ts_f.loc[AT_S + 10:AT_S + 80, "ready_replicas"].min()
    # without a budget an eviction drain is the force one, event for event
    plain = {"warmup_s": 0, "faults.spot_interruptions": [{"at_s": AT_S, "node": 1}]}
    a, b = _run(_scenario(**plain)), _run(_scenario(**plain, **{"cluster.spot.drain": "eviction"}))
    assert a.requests.equals(b.requests) and a.timeseries.equals(b.timeseries)


def test_pods_a_budget_keeps_on_a_reclaimed_node_die_with_it_and_are_replaced() -> None:
    # a budget that allows no disruption (min_available: all 8): nothing is evicted; at the notice's end the
    # node goes with its four pods, which the ReplicaSet replaces on a new node
    sc = _scenario(**{"pods.disruption_budget": {"min_available": 8}, "warmup_s": 0, "cluster.spot.drain": "eviction",
                      "service": {"kind": "deterministic", "mean_s": 2.0}, "workload.arrivals.rate_per_s": 3.0,
                      "faults.spot_interruptions": [{"at_s": AT_S, "node": 1}]})
    res = _run(sc)
    ts = res.timeseries.set_index("time_s")
    assert (ts.loc[AT_S + 10:AT_S + NOTICE_S - 10, "ready_replicas"] == 8).all()  # all serve through the notice
    assert res.nodes.set_index("node").loc[1, "removed_s"] == AT_S + NOTICE_S
    killed = res.crashes[res.crashes["kind"] == "spot"]
    assert len(killed) >= 1 and (killed["time_s"] == AT_S + NOTICE_S).all()  # those with requests in flight
    assert (ts.loc[AT_S + NOTICE_S + 10:AT_S + NOTICE_S + 50, "ready_replicas"] == 4).all()
    assert (ts.loc[AT_S + NOTICE_S + 60 + 30 + 10:, "ready_replicas"] == 8).all()  # replaced on a new node


def test_the_budget_counts_a_dead_nodes_pods_healthy_until_they_are_notready() -> None:
    # node 0 dies shortly before node 1's notice: its four pods still show Ready (the node lifecycle
    # controller marks them NotReady only after the 40 s grace), so the budget (7 of 8 healthy) counts 8
    # and lets one of node 1's pods go. Had node 0 died 50 s before the notice, it would count 4: none
    def evicted(fail_s: float) -> int:
        sc = _scenario(**{"pods.disruption_budget": {"max_unavailable": 1}, "warmup_s": 0, "horizon_s": AT_S + 5,
                          "cluster.spot.drain": "eviction", "faults.node_failures": [{"at_s": fail_s, "node": 0}],
                          "faults.spot_interruptions": [{"at_s": AT_S, "node": 1}]})
        sim = Simulation(sc, seed=0)
        res = sim.run()
        node1 = [p for _, p, n, _ in res.placements.itertuples(index=False) if n == 1]
        assert len(node1) == 4
        return sum(sim.cluster.pods[p].state in (PodState.TERMINATING, PodState.GONE) for p in node1)

    assert evicted(AT_S - 10) == 1
    assert evicted(AT_S - 50) == 0


def test_an_eviction_drain_slower_than_the_notice_is_flagged() -> None:
    evict = {"cluster.spot.drain": "eviction"}
    (f,) = [f for f in run_checks(_scenario(**evict, **{"pods.disruption_budget": {"max_unavailable": 1}}))
            if f.check == "spot-eviction-outlasts-notice"]
    assert f.path == "cluster.spot.drain" and f.level == "warn" and "lets 1 go at a time, and a node holds 4" in f.message
    for quiet in ({**evict, "pods.disruption_budget": {"max_unavailable": 4}},  # a whole node at once
                  {"pods.disruption_budget": {"max_unavailable": 1}},  # force: the budget is not asked
                  evict):  # no budget
        assert not [f for f in run_checks(_scenario(**quiet)) if f.check == "spot-eviction-outlasts-notice"], quiet

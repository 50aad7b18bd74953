"""GPU nodes: billed from creation to removal, removed as cluster-autoscaler removes them, a later burst waits."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Generator
from typing import Any

import pytest

from capsim.errors import CapsimError
from capsim.model.scenario import Scenario
from capsim.sim.simulate import Simulation


def idle(horizon_s: float = 2000, **changes: Any) -> Scenario:
    """No traffic to speak of; pods start in 10 s; nodes of 4 GPUs, provisioned in 30 s."""
    s = Scenario.model_validate({
        "horizon_s": horizon_s,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 0.001}},
        "service": {"kind": "deterministic", "mean_s": 0.1},
        "pods": {"replicas": 1, "startup_s": 10, "gpu_cost_per_hour": 2.0},
        "cluster": {"max_gpus": 8, "node_gpus": 4, "node_provision_s": 30},
        "timeseries_interval_s": 1,
    })
    return s.override(changes) if changes else s


def at(sim: Simulation, *steps: tuple[float, Callable[[], None]]) -> None:
    """Run each action at its time (s)."""
    def proc() -> Generator[Any, Any, None]:
        for t, action in steps:
            yield sim.env.timeout(t - sim.env.now)
            action()
    sim.env.process(proc())


def test_nodes_are_billed_whole_and_pods_by_the_gpu() -> None:
    # one pod on a 4-GPU node for 2000 s: the node is the only one, so nothing can be removed
    r = Simulation(idle(), seed=0).run().summary
    assert r.gpu_hours == pytest.approx(2000 / 3600)
    assert r.node_gpu_hours == pytest.approx(4 * 2000 / 3600)
    assert r.cost == pytest.approx(2.0 * 4 * 2000 / 3600)  # billing: node (the default)
    pod_billed = Simulation(idle(**{"cluster.billing": "pod"}), seed=0).run().summary
    assert pod_billed.cost == pytest.approx(2.0 * 2000 / 3600)
    assert pod_billed.node_gpu_hours == r.node_gpu_hours  # both numbers are reported either way
    without = Simulation(idle(cluster=None), seed=0).run().summary
    assert math.isnan(without.node_gpu_hours) and without.cost == pytest.approx(2.0 * 2000 / 3600)


def test_a_node_is_billed_while_it_boots_and_goes_10_minutes_after_it_is_unneeded() -> None:
    sim = Simulation(idle(**{"cluster.scale_down_delay_after_add_s": 0}), seed=0)
    at(sim, (0.0, lambda: sim.cluster.scale_to(7, 0.0)),  # pods 4-6 need node 1: created at 0, ready at 30
       (105.0, lambda: sim.cluster.scale_to(4, 105.0)))
    # the ReplicaSet deletes from the more crowded node (node 0: 4 pods, node 1: 3; replicaset.py), so node 0
    # keeps one pod (0.25 of its GPUs), which fits on node 1: unneeded at the scan of 110 s, drained 600 s later
    ts = sim.run().timeseries.set_index("time_s")
    assert ts["pending_replicas"][29] == 3 and ts["ready_replicas"][41] == 7
    assert sim.cluster.nodes.removals == [(710.0, 0)]
    assert sim.cluster.nodes.node_gpu_seconds(2000) == pytest.approx(4 * 2000 + 4 * 710)


def test_empty_nodes_go_at_most_max_scale_down_parallelism_a_scan() -> None:
    def removals(**changes: Any) -> list[float]:
        sim = Simulation(idle(**{"cluster.node_gpus": 1, "cluster.max_gpus": 16,
                                 "cluster.scale_down_delay_after_add_s": 0, **changes}), seed=0)
        # 14 one-GPU nodes, then one pod: 13 nodes empty at once, unneeded from the scan of 110 s
        at(sim, (0.0, lambda: sim.cluster.scale_to(14, 0.0)), (105.0, lambda: sim.cluster.scale_to(1, 105.0)))
        sim.run()
        return [t for t, _ in sim.cluster.nodes.removals]
    # --max-scale-down-parallelism 10 (the default): ten at the scan 600 s later, the other three at the next
    assert removals() == [710.0] * 10 + [720.0] * 3
    assert removals(**{"cluster.max_scale_down_parallelism": 3}) == [710.0] * 3 + [720.0] * 3 + [730.0] * 3 + \
        [740.0] * 3 + [750.0]
    assert removals(**{"cluster.max_scale_down_parallelism": 20}) == [710.0] * 13
    # --scale-down-delay-after-delete: after the scan that deleted ten, none until 25 s have passed (the scan of
    # 740 s); 10 s (the scan interval) is the default's next scan, as 0 is
    assert removals(**{"cluster.scale_down_delay_after_delete_s": 25}) == [710.0] * 10 + [740.0] * 3
    assert removals(**{"cluster.scale_down_delay_after_delete_s": 10}) == [710.0] * 10 + [720.0] * 3
    # ... and a scan that removes nothing does not restart it (three at a time: 710, then 740, 770, 800, 830)
    assert removals(**{"cluster.max_scale_down_parallelism": 3, "cluster.scale_down_delay_after_delete_s": 25}) == \
        [710.0] * 3 + [740.0] * 3 + [770.0] * 3 + [800.0] * 3 + [830.0]


def test_a_drain_starts_the_delay_after_delete_as_a_deletion_does() -> None:
    # three full nodes; at 105 s seven pods are left (node 2 holds one), at 125 s three (node 0 empties): node 2
    # is unneeded from the scan of 110 s and drained at 710 s, its pod going to node 0, which is unneeded from
    # the scan of 130 s and drained in its turn at 730 s. With --scale-down-delay-after-delete 25 s the drain of
    # 710 s holds the next removal to the scan of 740 s (static_autoscaler.go: a drain started is a deletion)
    def removals(**changes: Any) -> tuple[list[tuple[float, int]], list[int]]:
        sim = Simulation(idle(**{"cluster.max_gpus": 12, "cluster.scale_down_delay_after_add_s": 0, **changes}),
                         seed=0)
        held: list[int] = []
        at(sim, (0.0, lambda: sim.cluster.scale_to(12, 0.0)), (105.0, lambda: sim.cluster.scale_to(7, 105.0)),
           (125.0, lambda: sim.cluster.scale_to(3, 125.0)),
           (709.0, lambda: held.extend(n.used for n in sim.cluster.nodes.nodes)))
        sim.run()
        return sim.cluster.nodes.removals, held

    gone, held = removals()
    assert held == [0, 2, 1]  # node 2 still held a pod: the scan of 710 s drains it, not an empty node
    assert gone == [(710.0, 2), (730.0, 0)]
    assert removals(**{"cluster.scale_down_delay_after_delete_s": 25})[0] == [(710.0, 2), (740.0, 0)]
    assert removals(**{"cluster.scale_down_delay_after_delete_s": 20})[0] == [(710.0, 2), (730.0, 0)]


def test_unneeded_time_counts_from_when_the_node_became_removable() -> None:
    # node 1 holds one pod of 4 GPUs from 30 s, under the threshold, but node 0 is full until the scale-down
    # at 105 s: no place to move the pod, so cluster-autoscaler's planner keeps node 1 among the unremovable
    # and its unneeded time does not run; the pod fits on node 0 from 105 s, but a node found unremovable (at
    # the scan of 30 s) is not looked at again for --unremovable-node-recheck-timeout (300 s): unneeded from
    # the scan of 330 s, removed 600 s later; with no recheck timeout, from the scan of 110 s
    def removals(**changes: Any) -> list[tuple[float, int]]:
        sim = Simulation(idle(**{"cluster.scale_down_delay_after_add_s": 0, **changes}), seed=0)
        at(sim, (0.0, lambda: sim.cluster.scale_to(5, 0.0)), (105.0, lambda: sim.cluster.scale_to(4, 105.0)))
        sim.run()
        return sim.cluster.nodes.removals

    assert removals() == [(930.0, 1)]
    assert removals(**{"cluster.unremovable_node_recheck_timeout_s": 0}) == [(710.0, 1)]
    # rechecked at 90 s, still no room: again at 150 s, removable then
    assert removals(**{"cluster.unremovable_node_recheck_timeout_s": 60}) == [(750.0, 1)]
    assert removals(**{"cluster.unremovable_node_recheck_timeout_s": 100}) == [(730.0, 1)]  # 30 + 100 = 130


def test_a_lone_node_is_unneeded_only_once_it_is_empty() -> None:
    # one node, one pod of 4 GPUs (0.25): under the threshold from the start, but its pod has nowhere to go:
    # unremovable at the scans of 10, 310, 610 and 910 s (each time not rechecked for 300 s); the Deployment
    # goes to zero at 1000 s, the empty node is next looked at in the scan of 1210 s: gone at 1810 s. Without
    # the recheck timeout unneeded from the scan of 1000 s, gone at 1600 s
    def removals(recheck_s: float) -> list[tuple[float, int]]:
        sim = Simulation(idle(**{"cluster.unremovable_node_recheck_timeout_s": recheck_s}), seed=0)
        at(sim, (1000.0, lambda: sim.cluster.scale_to(0, 1000.0)))
        sim.run()
        return sim.cluster.nodes.removals

    assert removals(300.0) == [(1810.0, 0)] and removals(0.0) == [(1600.0, 0)]


def test_a_node_at_the_utilization_threshold_stays() -> None:
    # node 1 keeps 2 of its 4 GPUs busy: 0.5 is not under the threshold
    sim = Simulation(idle(**{"cluster.scale_down_delay_after_add_s": 0}), seed=0)
    at(sim, (0.0, lambda: sim.cluster.scale_to(7, 0.0)), (105.0, lambda: sim.cluster.scale_to(6, 105.0)))
    sim.run()
    assert sim.cluster.nodes.removals == []
    sim = Simulation(idle(**{"cluster.scale_down_delay_after_add_s": 0,
                             "cluster.scale_down_utilization_threshold": 0.6}), seed=0)
    at(sim, (0.0, lambda: sim.cluster.scale_to(7, 0.0)), (105.0, lambda: sim.cluster.scale_to(6, 105.0)))
    sim.run()  # 0.5 < 0.6: unneeded, but its two pods cannot fit on the full node 0: it stays
    assert sim.cluster.nodes.removals == []


def test_no_scale_down_within_the_delay_after_a_node_was_added() -> None:
    sim = Simulation(idle(**{"cluster.scale_down_unneeded_time_s": 60}), seed=0)
    at(sim, (0.0, lambda: sim.cluster.scale_to(7, 0.0)), (105.0, lambda: sim.cluster.scale_to(4, 105.0)))
    sim.run()
    # node 0 (one pod left, see above) unneeded since 110 s, due at 170 s, but node 1 was added at 0 s:
    # nothing goes before 600 s
    assert sim.cluster.nodes.removals == [(600.0, 0)]


def test_a_node_with_pods_is_drained_when_they_fit_elsewhere() -> None:
    # node 0: pods 0-3, node 1: pod 4. Pod 1 crashes and restarts (Starting), so the ReplicaSet deletes it
    # first when the Deployment goes to 4: node 0 has a free GPU, node 1 one pod (0.25, unneeded).
    sim = Simulation(idle(**{"pods.replicas": 5}), seed=0)
    pods = sim.cluster.pods
    at(sim, (50.0, lambda: sim.cluster.crash(pods[1], 50.0)), (55.0, lambda: sim.cluster.scale_to(4, 55.0)))
    ts = sim.run().timeseries.set_index("time_s")
    # under the threshold from the first scan (10 s), but unremovable then (node 0 is full), so not looked at
    # again until the scan of 310 s; its pod fits in node 0's free GPU since 55 s: unneeded from 310 s, drained
    # at 910 s (with no recheck timeout from the scan of 60 s, at 660 s: _drained)
    assert sim.cluster.nodes.removals == [(910.0, 1)]
    assert len(pods) == 6 and pods[5].created_s == 910.0  # the evicted pod 4 was replaced on node 0
    assert ts["ready_replicas"][909] == 4 and ts["ready_replicas"][915] == 3 and ts["ready_replicas"][921] == 4
    no_room = Simulation(idle(**{"pods.replicas": 5}), seed=0)  # node 0 full: node 1 stays
    no_room.run()
    assert no_room.cluster.nodes.removals == []


def test_a_burst_after_a_node_was_removed_waits_for_a_new_node() -> None:
    sim = Simulation(idle(**{"cluster.scale_down_delay_after_add_s": 0}), seed=0)
    at(sim, (0.0, lambda: sim.cluster.scale_to(7, 0.0)), (105.0, lambda: sim.cluster.scale_to(4, 105.0)),
       (800.0, lambda: sim.cluster.scale_to(5, 800.0)))
    ts = sim.run().timeseries.set_index("time_s")
    assert sim.cluster.nodes.removals == [(710.0, 0)]  # its pod moved to node 1, which is now full
    assert ts["pending_replicas"][829] == 1 and ts["ready_replicas"][839] == 4 and ts["ready_replicas"][841] == 5
    never = Simulation(idle(**{"cluster.scale_down_enabled": False}), seed=0)
    at(never, (0.0, lambda: never.cluster.scale_to(7, 0.0)), (105.0, lambda: never.cluster.scale_to(4, 105.0)),
       (800.0, lambda: never.cluster.scale_to(5, 800.0)))
    ts = never.run().timeseries.set_index("time_s")
    assert never.cluster.nodes.removals == [] and ts["ready_replicas"][811] == 5  # the old model: at once


# ---- a PodDisruptionBudget on the drains ------------------------------------------------------------------
def _drained(**changes: Any) -> list[tuple[float, int]]:
    """The drain of test_a_node_with_pods_is_drained_when_they_fit_elsewhere (4 ready pods wanted, node 1's
    one pod fits on node 0 from 60 s, drained at 660 s with no recheck timeout, which these take) under
    ``changes``: the nodes removed."""
    sim = Simulation(idle(**{"pods.replicas": 5, "cluster.unremovable_node_recheck_timeout_s": 0, **changes}), seed=0)
    pods = sim.cluster.pods
    at(sim, (50.0, lambda: sim.cluster.crash(pods[1], 50.0)), (55.0, lambda: sim.cluster.scale_to(4, 55.0)))
    sim.run()
    return sim.cluster.nodes.removals


def test_a_disruption_budget_lets_a_drain_take_only_what_it_allows() -> None:
    assert _drained() == [(660.0, 1)]  # no budget
    # 4 ready of 4 desired: maxUnavailable 1 allows evicting the one pod, 0 allows nothing (the node is
    # unremovable, NotEnoughPdb, so it is never unneeded)
    assert _drained(**{"pods.disruption_budget": {"max_unavailable": 1}}) == [(660.0, 1)]
    assert _drained(**{"pods.disruption_budget": {"max_unavailable": 0}}) == []
    assert _drained(**{"pods.disruption_budget": {"min_available": 4}}) == []
    assert _drained(**{"pods.disruption_budget": {"min_available": 3}}) == [(660.0, 1)]


def test_a_budget_waits_for_the_pods_to_be_ready_again() -> None:
    # the rush: without a budget cluster-autoscaler drains two nodes within a cold start of each other (60 s apart
    # in seed 0; 10 s until stop 73, when the HPA began to read starting pods and its scale-downs moved) and 2 of
    # the 3 pods are down at once; with maxUnavailable 1 the planner finds only one of them removable at a time (the
    # budget covers one pod), so one node goes and ready pods never fall below 2
    rush = Scenario.from_yaml("data/scenarios/friday_rush.yaml").override({"autoscaler.minReplicas": 3})
    runs = {}
    for name, budget in (("none", None), ("one", {"max_unavailable": 1})):
        sim = Simulation(rush.override({"pods.disruption_budget": budget}), seed=0)
        ts = sim.run().timeseries
        runs[name] = (sim.cluster.nodes.removals, int(ts[ts.time_s >= 3000].ready_replicas.min()))
    (first, second), least = runs["none"]
    assert 0 < second[0] - first[0] <= 60.0 and least == 1
    removals_b, least_b = runs["one"]
    assert removals_b and least_b == 2
    assert all(b[0] - a[0] > 10.0 for a, b in itertools.pairwise(removals_b))


def test_disruptions_allowed_as_the_disruption_controller_counts_them() -> None:
    from capsim.model.scenario import DisruptionBudget

    one = DisruptionBudget(max_unavailable=1)
    assert [one.disruptions_allowed(ready, 4) for ready in (2, 3, 4)] == [0, 0, 1]
    assert DisruptionBudget(min_available=2).disruptions_allowed(4, 4) == 2
    assert DisruptionBudget(max_unavailable=3).disruptions_allowed(1, 0) == 0  # expectedCount 0: none


def test_a_budget_is_one_of_its_two_forms() -> None:
    with pytest.raises(CapsimError, match="give exactly one of max_unavailable and min_available"):
        idle(**{"pods.disruption_budget": {}})
    with pytest.raises(CapsimError, match="give exactly one"):
        idle(**{"pods.disruption_budget": {"max_unavailable": 1, "min_available": 2}})


def test_a_budget_that_forbids_every_drain_is_flagged() -> None:
    from capsim.studies.checks import run_checks

    def fired(**changes: Any) -> list[str]:
        return [f.message for f in run_checks(idle(**changes)) if f.check == "pdb-blocks-drains"]

    assert fired(**{"pods.disruption_budget": {"max_unavailable": 0}})
    assert fired(**{"pods.disruption_budget": {"min_available": 1}})  # the one pod must stay
    assert not fired(**{"pods.disruption_budget": {"max_unavailable": 1}})
    assert not fired(**{"pods.replicas": 2, "pods.disruption_budget": {"min_available": 1}})
    assert not fired(**{"pods.disruption_budget": {"max_unavailable": 0}, "cluster.scale_down_enabled": False})

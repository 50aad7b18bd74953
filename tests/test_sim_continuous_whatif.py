"""The batch-mode what-if: the fewest fixed pods meeting the SLO, static against continuous batching."""

from __future__ import annotations

import pytest

from capsim.model.scenario import Scenario
from capsim.studies.batch_modes import compare_batch_modes, fixed_fleet, format_comparison, pods_needed

SHORT = {"horizon_s": 90, "warmup_s": 10, "workload.arrivals.rate_per_s": [[0, 8], [30, 40], [60, 8]]}


def test_the_fewest_pods_pass_and_one_fewer_fails() -> None:
    sc = Scenario.from_yaml("data/scenarios/friday_rush_continuous.yaml").override(SHORT)
    r = pods_needed(sc, max_replicas=8)
    assert r.mode == "continuous" and r.pods is not None
    assert r.probes[r.pods] and r.summary["slo_met"]
    if r.pods > 1:
        assert r.probes[r.pods - 1] is False
    fleet = fixed_fleet(sc, 3)
    assert fleet.autoscaler is None and fleet.cluster is None and fleet.pods.replicas == 3


def test_compare_takes_static_then_continuous() -> None:
    st = Scenario.from_yaml("data/scenarios/friday_rush.yaml").override(SHORT)
    co = Scenario.from_yaml("data/scenarios/friday_rush_continuous.yaml").override(SHORT)
    with pytest.raises(ValueError, match="static-mode scenario, then a continuous-mode one"):
        compare_batch_modes(co, st)
    static, continuous = compare_batch_modes(st, co, max_replicas=8)
    assert (static.mode, continuous.mode) == ("static", "continuous")
    # continuous batching never needs more pods here: finished requests leave at once
    assert static.pods is not None and continuous.pods is not None and continuous.pods <= static.pods
    table = format_comparison([static, continuous]).splitlines()
    assert len(table) == 4 and table[2].startswith(f"| static | {static.pods} |")
    assert table[3].startswith(f"| continuous | {continuous.pods} |") and " ms |" in table[3]  # its ITL
    assert f"{continuous.pods}: pass" in table[3]


def test_a_fleet_that_must_survive_a_node_failure_keeps_its_nodes_and_needs_more_pods() -> None:
    # the fleet's nodes and one spare (for the replacements), none drained; and the fewest pods meeting the SLO
    # through a node failure at the peak are at least those without one
    sc = Scenario.from_yaml("data/scenarios/friday_rush_continuous.yaml").override(SHORT)
    tp_nodes = sc.override({"cluster.node_gpus": 2})  # two pods a node, so a failure takes two
    failing = tp_nodes.override({"faults": {"node_failures": [{"at_s": 35, "node": 0}]}})
    fleet = fixed_fleet(failing, 5)
    assert fleet.cluster is not None and fleet.autoscaler is None
    assert (fleet.cluster.max_gpus, fleet.cluster.scale_down_enabled) == ((3 + 1) * 2, False)
    # under Karpenter the same fleet keeps its nodes by consolidateAfter Never
    karpenter = fixed_fleet(failing.override({"cluster.karpenter": {}}), 5).cluster
    assert karpenter is not None and karpenter.karpenter is not None
    assert (karpenter.max_gpus, karpenter.scale_down_enabled, karpenter.karpenter.consolidate_after_s) == (8, True, None)
    spread = fixed_fleet(failing.override({"pods.spread": {"min_nodes": 5}}), 5)
    assert spread.cluster is not None and spread.cluster.max_gpus == (5 + 1) * 2
    plain, survive = pods_needed(tp_nodes, max_replicas=8), pods_needed(failing, max_replicas=8)
    assert plain.pods is not None and survive.pods is not None
    assert survive.pods > plain.pods  # 1 against 4: a node with the only pod takes the service down
    assert survive.summary["crashes"] == 2  # the failure took a node's two pods in the run that met the SLO


def test_a_fleet_that_must_survive_a_zone_outage_keeps_a_zones_share_of_nodes_spare() -> None:
    # three zones, two pods a node: 6 pods fill 3 nodes; a zone's outage needs room for a zone's share (one
    # node); spread over the zones with a node kept in each, 7 pods are 3, 2 and 2: two nodes in each zone
    sc = Scenario.from_yaml("data/scenarios/friday_rush_continuous.yaml").override(SHORT)
    failing = sc.override({"cluster.node_gpus": 2, "cluster.zones": 3,
                           "faults": {"zone_failures": [{"at_s": 35, "zone": 0}]}})
    fleet = fixed_fleet(failing, 6)
    assert fleet.cluster is not None and (fleet.cluster.max_gpus, fleet.cluster.scale_down_enabled) == ((3 + 1) * 2, False)
    spread = fixed_fleet(failing.override({"pods.zone_spread": {"max_skew": 1}, "cluster.min_nodes_per_zone": 1}), 7)
    assert spread.cluster is not None and spread.cluster.max_gpus == (6 + 2) * 2
    plain, survive = pods_needed(sc, max_replicas=8), pods_needed(failing, max_replicas=8)
    assert plain.pods is not None and survive.pods is not None and survive.pods > plain.pods
    assert survive.summary["crashes"] >= 1 and survive.summary["slo_met"]  # it ran with the zone dark

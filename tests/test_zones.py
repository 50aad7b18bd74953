"""Availability zones: ``cluster.zones`` spreads the node groups over zones (kept balanced, as
cluster-autoscaler's --balance-similar-node-groups does), ``pods.zone_spread`` spreads the pods over them (a
topology spread constraint on topology.kubernetes.io/zone), ``faults.zone_failures`` takes a zone down with
every node in it, ``capsim check`` flags a fleet a zone's outage leaves without room, and the export writes
the constraint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from capsim.cli import app
from capsim.export import build_all
from capsim.export.readme import render_readme
from capsim.export.target import DeployTarget
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim.nodes import NODE_COLUMNS
from capsim.sim.simulate import Simulation, simulate
from capsim.studies.checks import run_checks
from cluster_scenarios import cluster_scenario

FAIL_S = 100.0
EVICTED_S = FAIL_S + 40 + 300  # node_monitor_grace_s, then the default unreachable toleration


def _scenario(**over: Any) -> Scenario:
    """``cluster_scenario`` for 15 minutes on 8-GPU nodes over two zones."""
    return cluster_scenario(**{"horizon_s": 900, "cluster.max_gpus": 64, "cluster.node_gpus": 8, "cluster.zones": 2,
                               **over})


def _run(sc: Scenario) -> tuple[Simulation, Any]:
    sim = Simulation(sc, seed=0)
    return sim, sim.run()


def _pods_per_zone(sim: Simulation, zones: int) -> list[int]:
    nodes = sim.cluster.nodes
    per = [0] * zones
    for n in nodes.nodes:
        if n.removed_s is None and n.failed_s is None:
            per[n.zone] += n.used // nodes.pod_gpus
    return per


def test_new_nodes_go_to_the_zone_with_the_fewest() -> None:
    # 20 one-GPU pods on 4-GPU nodes: five nodes, alternating over two zones, then three
    sim, _ = _run(_scenario(**{"pods.replicas": 20, "cluster.node_gpus": 4}))
    assert [n.zone for n in sim.cluster.nodes.nodes] == [0, 1, 0, 1, 0]
    sim, _ = _run(_scenario(**{"pods.replicas": 20, "cluster.node_gpus": 4, "cluster.zones": 3}))
    assert [n.zone for n in sim.cluster.nodes.nodes] == [0, 1, 2, 0, 1]


def test_scale_down_keeps_each_zones_minimum_of_nodes() -> None:
    # two pods on zone 0's first node; three more nodes, empty, are the zones' minimum of 2: every node is
    # unneeded (under half its GPUs requested), but none goes
    sc = _scenario(**{"pods.replicas": 2, "cluster.min_nodes_per_zone": 2, "cluster.scale_down_enabled": True,
                      "cluster.scale_down_unneeded_time_s": 30, "cluster.scale_down_delay_after_add_s": 0,
                      "horizon_s": 300})
    sim, res = _run(sc)
    assert [(n.zone, n.used) for n in sim.cluster.nodes.nodes] == [(0, 2), (0, 0), (1, 0), (1, 0)]
    assert (res.timeseries["node_gpus"] == 32).all()
    # 40 pods fill five nodes; the HPA takes them down to 2 and the fifth node, above the minimum, goes
    sim, res = _run(sc.override({"pods.replicas": 40, "horizon_s": 900,
                                 "autoscaler": {"minReplicas": 2, "maxReplicas": 40, "metrics": [
                                     {"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                                               "target": {"type": "AverageValue",
                                                                          "averageValue": "50"}}}]}}))
    ts = res.timeseries
    assert ts["node_gpus"].iloc[0] == 40 and ts["node_gpus"].iloc[-1] == 32
    assert sorted(n.zone for n in sim.cluster.nodes.nodes if n.removed_s is None) == [0, 0, 1, 1]


@pytest.mark.parametrize(("zones", "zone_spread", "least", "per_zone"), [
    (2, None, 0, [8, 0]),  # packed: one 8-GPU node holds all 8
    (2, {"max_skew": 1}, 0, [8, 0]),  # zone 1 has no node: no domain, so no skew over it
    (2, {"max_skew": 1}, 1, [4, 4]),  # a node in each zone: both count
    (2, {"max_skew": 1, "min_zones": 2}, 0, [4, 4]),  # fewer than 2 zones count: each takes max_skew
    (3, {"max_skew": 1}, 1, [3, 3, 2]),
    (3, {"max_skew": 2, "min_zones": 3}, 0, [3, 3, 2]),  # a node in each zone for it, then a skew of 2 at most
    (3, {"max_skew": 1, "min_zones": 2}, 0, [4, 4, 0]),  # two zones count and stay balanced; zone 2 unused
])
def test_the_zone_spread_places_the_pods_over_the_zones(zones: int, zone_spread: dict[str, Any] | None, least: int,
                                                        per_zone: list[int]) -> None:
    sim, res = _run(_scenario(**{"cluster.zones": zones, "pods.zone_spread": zone_spread,
                                 "cluster.min_nodes_per_zone": least}))
    assert _pods_per_zone(sim, zones) == per_zone
    assert (res.timeseries["ready_replicas"] == 8).all()
    assert len(sim.cluster.nodes.nodes) == max(sum(1 for p in per_zone if p), zones * least)


def test_both_spreads_hold_at_once() -> None:
    # 8 pods, 4-GPU nodes, two zones: the zone spread alone packs 4 on one node in each zone; with the
    # hostname spread over at least 4 nodes as well, 2 on each of 4 nodes, two nodes in each zone
    sim, _ = _run(_scenario(**{"cluster.node_gpus": 4, "pods.zone_spread": {"max_skew": 1}}))
    assert sorted(n.used for n in sim.cluster.nodes.nodes) == [4, 4]
    sim, _ = _run(_scenario(**{"cluster.node_gpus": 4, "pods.zone_spread": {"max_skew": 1},
                               "pods.spread": {"min_nodes": 4}}))
    nodes = sim.cluster.nodes.nodes
    assert [n.used for n in nodes] == [2, 2, 2, 2] and sorted(n.zone for n in nodes) == [0, 0, 1, 1]


def test_a_zone_failure_takes_every_node_in_the_zone_and_the_replacements_go_elsewhere() -> None:
    # packed, all 8 pods are on zone 0's node and all are lost; the evicted pods are replaced on a new node
    # in zone 1 (none is added in the dark zone)
    fail = {"faults.zone_failures": [{"at_s": FAIL_S, "zone": 0}]}
    sim, packed = _run(_scenario(**fail))
    assert (packed.crashes["kind"] == "node").sum() == 8
    ts = packed.timeseries.set_index("time_s")
    assert (ts.loc[FAIL_S + 50:EVICTED_S, "ready_replicas"] == 0).all()
    assert (ts.loc[EVICTED_S + 60 + 30 + 20:, "ready_replicas"] == 8).all()
    nodes = sim.cluster.nodes.nodes
    assert nodes[0].failed_s == FAIL_S and [n.zone for n in nodes[1:]] == [1]
    # spread over three zones with a node in each (3, 3, 2), it takes 3; their replacements go to the two
    # zones left, on the nodes there, 30 s (the start) after the eviction
    spread_sc = _scenario(**fail, **{"cluster.zones": 3, "cluster.min_nodes_per_zone": 1,
                                     "pods.zone_spread": {"max_skew": 1}})
    sim, spread = _run(spread_sc)
    assert (spread.crashes["kind"] == "node").sum() == 3
    ts = spread.timeseries.set_index("time_s")
    assert (ts.loc[FAIL_S + 50:EVICTED_S, "ready_replicas"] == 5).all()
    assert (ts.loc[EVICTED_S + 30 + 20:, "ready_replicas"] == 8).all()
    assert _pods_per_zone(sim, 3) == [0, 4, 4] and len(sim.cluster.nodes.nodes) == 3
    assert spread.summary.error_rate < packed.summary.error_rate


def test_min_zones_over_every_zone_strands_the_replacements_while_a_zone_is_dark() -> None:
    # 4 and 4 over two zones with min_zones 2: once zone 0 is dark one zone counts, the fewest is counted as
    # 0, and zone 1 (4 pods) takes no more: the evicted pods stay Pending (Kubernetes does the same)
    sc = _scenario(**{"faults.zone_failures": [{"at_s": FAIL_S, "zone": 0}],
                      "pods.zone_spread": {"max_skew": 1, "min_zones": 2}})
    (f,) = [f for f in run_checks(sc) if f.check == "zone-failure-no-room"]
    assert "2 takes every zone" in f.message
    ts = _run(sc)[1].timeseries.set_index("time_s")
    assert (ts.loc[EVICTED_S + 10:, "pending_replicas"] == 4).all()
    assert (ts.loc[FAIL_S + 50:, "ready_replicas"] == 4).all()


def test_a_zone_that_comes_back_brings_its_nodes_and_unevicted_pods_back() -> None:
    # dark for 120 s: NotReady after 40 s, back before the 300 s toleration: the same pods are ready again
    sc = _scenario(**{"faults.zone_failures": [{"at_s": FAIL_S, "zone": 0, "duration_s": 120}],
                      "cluster.min_nodes_per_zone": 1, "pods.zone_spread": {"max_skew": 1}})
    sim, res = _run(sc)
    ts = res.timeseries.set_index("time_s")
    assert (ts.loc[FAIL_S + 50:FAIL_S + 110, "ready_replicas"] == 4).all()
    assert (ts.loc[FAIL_S + 130:, "ready_replicas"] == 8).all()
    assert (ts["pending_replicas"] == 0).all() and len(sim.cluster.nodes.nodes) == 2
    assert not sim.cluster.nodes.zones_down


def test_nodes_booting_in_a_zone_that_fails_are_lost_and_their_pods_placed_elsewhere() -> None:
    # the HPA's floor of 16 needs a second 8-GPU node at time 0+, provisioned in zone 1 (60 s); zone 1 goes
    # dark at 20 s: the booting node is lost, and a node in zone 0 is provisioned for its pods
    grow = {"autoscaler": {"minReplicas": 16, "maxReplicas": 16, "metrics": [
        {"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                  "target": {"type": "AverageValue", "averageValue": "8"}}}]}}
    sc = _scenario(**grow, **{"faults.zone_failures": [{"at_s": 20, "zone": 1}]})
    sim, res = _run(sc)
    nodes = sim.cluster.nodes.nodes
    assert [(n.zone, n.ready_s is not None, n.removed_s) for n in nodes] == [
        (0, True, None), (1, False, 20.0), (0, True, None)]
    assert nodes[2].created_s == 20.0
    assert res.timeseries["ready_replicas"].iloc[-1] == 16
    assert not len(res.crashes)  # no pod ran there


def test_a_partitioned_node_in_a_dark_zone_stays_down_until_the_zone_is_back() -> None:
    # node 0 is partitioned for 30 s at 100 s, its zone dark from 110 s to 250 s: it comes back at 250 s
    sc = _scenario(**{"faults.node_failures": [{"at_s": FAIL_S, "node": 0, "duration_s": 30}],
                      "faults.zone_failures": [{"at_s": FAIL_S + 10, "zone": 0, "duration_s": 140}]})
    sim, res = _run(sc)
    ts = res.timeseries.set_index("time_s")
    assert (ts.loc[FAIL_S + 50:FAIL_S + 140, "ready_replicas"] == 0).all()
    assert (ts.loc[FAIL_S + 160:, "ready_replicas"] == 8).all()
    assert sim.cluster.nodes.nodes[0].failed_s is None


def test_zone_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match=r"faults.zone_failures.0.zone must name a zone of the cluster "
                                            r"\(0..1, cluster.zones 2\), got 2"):
        _scenario(**{"faults.zone_failures": [{"at_s": 1, "zone": 2}]})
    with pytest.raises(SettingsError, match="faults.zone_failures needs a cluster section"):
        _scenario(**{"cluster": None, "faults.zone_failures": [{"at_s": 1}]})
    with pytest.raises(SettingsError, match="cluster.zones"):
        _scenario(**{"cluster.zones": 0})


def test_check_flags_zone_settings_that_cannot_spread_and_a_fleet_a_zone_outage_strands() -> None:
    def found(check: str, **over: Any) -> list[Any]:
        return [f for f in run_checks(_scenario(**over)) if f.check == check]

    (f,) = found("spread-over-zones", **{"pods.zone_spread": {"min_zones": 3}})
    assert f.path == "pods.zone_spread.min_zones" and f.level == "fail" and "cluster.zones is 2" in f.message
    (f,) = found("zone-spread-one-zone", **{"cluster.zones": 1, "pods.zone_spread": {"max_skew": 1}})
    assert f.level == "warn"
    (f,) = found("zone-spread-empty-zones", **{"pods.zone_spread": {"max_skew": 1}})
    assert f.path == "pods.zone_spread" and "min_nodes_per_zone" in f.message
    assert not found("zone-spread-empty-zones", **{"pods.zone_spread": {"max_skew": 1},
                                                   "cluster.min_nodes_per_zone": 1})
    # 8 one-GPU pods on 8-GPU nodes over 2 zones with max_gpus 16: a zone's outage leaves one node, which
    # holds the 8; 12 pods fill both nodes and leave none
    fail = {"cluster.max_gpus": 16, "faults.zone_failures": [{"at_s": 1}]}
    assert not found("zone-failure-no-room", **fail)
    (f,) = found("zone-failure-no-room", **fail, **{"pods.replicas": 12})
    assert f.path == "cluster.max_gpus" and f.level == "warn"
    (f,) = found("zone-failure-no-room", **{"cluster.zones": 1, "faults.zone_failures": [{"at_s": 1}]})
    assert f.path == "cluster.zones"


def test_the_export_writes_the_zone_constraint_beside_the_hostname_one() -> None:
    target = DeployTarget(name="agent", namespace="agents")
    sc = Scenario.from_yaml("data/scenarios/friday_rush.yaml").override(
        {"pods.zone_spread": {"max_skew": 1, "min_zones": 3}, "pods.spread": {"max_skew": 2}})
    spec = build_all(sc, target)["deployment-patch.yaml"]["spec"]["template"]
    host, zone = spec["spec"]["topologySpreadConstraints"]
    assert host["topologyKey"] == "kubernetes.io/hostname"
    assert zone == {"maxSkew": 1, "minDomains": 3, "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "DoNotSchedule", "nodeTaintsPolicy": "Honor",
                    "labelSelector": {"matchLabels": spec["metadata"]["labels"]}}
    readme = render_readme(sc, target, numbers=None, findings=[])
    assert "| spread over zones (`topologySpreadConstraints`) | maxSkew 1, minDomains 3 |" in readme
    assert "pin the pods to the GPU node group with a `nodeSelector`" in readme
    readme = render_readme(sc.override({"cluster.zones": 3, "cluster.min_nodes_per_zone": 1}), target, numbers=None,
                           findings=[])
    assert ("- the GPU nodes in 3 availability zones, one node group per zone of minimum size 1, kept balanced "
            "(cluster-autoscaler `--balance-similar-node-groups=true`)") in readme


def test_a_zones_gpu_cap_sends_new_nodes_elsewhere_and_leaves_the_rest_pending() -> None:
    # 24 one-GPU pods on 8-GPU nodes need three nodes: 16 GPUs a zone allow zones 0, 1, 0; 8 a zone only two
    # nodes, so 8 pods stay Pending, and the check counts the cap
    sim, _ = _run(_scenario(**{"pods.replicas": 24, "cluster.max_gpus_per_zone": 16}))
    assert [n.zone for n in sim.cluster.nodes.nodes] == [0, 1, 0]
    capped = _scenario(**{"pods.replicas": 24, "cluster.max_gpus_per_zone": 8})
    sim, res = _run(capped)
    assert [n.zone for n in sim.cluster.nodes.nodes] == [0, 1]
    assert (res.timeseries["ready_replicas"] == 16).all() and (res.timeseries["pending_replicas"] == 8).all()
    assert capped.cluster is not None and capped.cluster.pods_held(1) == 16
    grow = capped.override({"pods.replicas": 8, "autoscaler": {"minReplicas": 8, "maxReplicas": 24, "metrics": [
        {"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                  "target": {"type": "AverageValue", "averageValue": "8"}}}]}})
    (f,) = [f for f in run_checks(grow) if f.check == "max-replicas-over-gpus"]
    assert "the cluster holds 16" in f.message and "at most 8 in each of 2 zones" in f.message
    with pytest.raises(SettingsError, match="max_gpus_per_zone must hold"):
        _scenario(**{"cluster.max_gpus_per_zone": 4})


def test_the_run_lists_its_nodes_and_where_each_pod_went(tmp_path: Path) -> None:
    # zone 0 dark at 100 s for good, packed: node 0 (zone 0) fails and stays failed; its 8 pods' replacements
    # are placed on node 1 (zone 1) after the eviction; the nodes' GPU-hours are the summary's
    sc = _scenario(**{"faults.zone_failures": [{"at_s": FAIL_S, "zone": 0}], "warmup_s": 0})
    res = simulate(sc, seed=0)
    nodes = res.nodes.set_index("node")
    assert list(nodes["zone"]) == [0, 1] and list(nodes["failures"]) == [1, 0]
    assert list(nodes["failed_at_end"]) == [True, False] and nodes.loc[1, "ready_s"] == EVICTED_S + 60
    assert nodes["gpu_hours"].sum() == pytest.approx(res.summary.node_gpu_hours)
    p = res.placements
    assert len(p) == 16 and (p.loc[:7, ["time_s", "node", "zone"]].to_numpy() == [0.0, 0, 0]).all()
    assert (p.loc[8:, "node"] == 1).all() and (p.loc[8:, "time_s"] == EVICTED_S + 60).all()
    assert set(p.loc[8:, "pod"]) == set(range(8, 16))
    assert simulate(_scenario(**{"cluster": None}), seed=0).nodes.empty
    # capsim simulate --out writes both beside the requests
    result = CliRunner().invoke(app, ["simulate", "data/scenarios/zone_outage.yaml", "--set", "horizon_s=60",
                                      "--set", "warmup_s=0", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "nodes.csv, placements.csv" in result.output
    written = pd.read_csv(tmp_path / "nodes.csv")
    assert list(written.columns) == NODE_COLUMNS and list(written["zone"]) == [0, 1, 2]
    assert len(pd.read_csv(tmp_path / "placements.csv")) == 9


def test_a_schedule_anyway_zone_spread_prefers_the_emptier_zones_and_strands_nothing() -> None:
    soft = {"max_skew": 1, "when_unsatisfiable": "ScheduleAnyway"}
    sim, _ = _run(_scenario(**{"cluster.zones": 3, "cluster.min_nodes_per_zone": 1, "pods.zone_spread": soft}))
    assert _pods_per_zone(sim, 3) == [3, 3, 2]
    # zone 0 dark for good: where min_zones 2 (DoNotSchedule) strands the 4 evicted pods' replacements, the
    # preference places them in zone 1, 30 s (the start) after the eviction
    fail = {"faults.zone_failures": [{"at_s": FAIL_S, "zone": 0}], "cluster.min_nodes_per_zone": 1}
    ts = _run(_scenario(**fail, **{"pods.zone_spread": soft}))[1].timeseries.set_index("time_s")
    assert (ts.loc[FAIL_S + 50:EVICTED_S, "ready_replicas"] == 4).all()
    assert (ts.loc[EVICTED_S + 30 + 20:, "ready_replicas"] == 8).all() and (ts["pending_replicas"] == 0).all()
    with pytest.raises(SettingsError, match=r"min_zones \(minDomains\) needs when_unsatisfiable: DoNotSchedule"):
        _scenario(**{"pods.zone_spread": {**soft, "min_zones": 2}})
    with pytest.raises(SettingsError, match=r"min_nodes \(minDomains\) needs when_unsatisfiable: DoNotSchedule"):
        _scenario(**{"pods.spread": {"min_nodes": 2, "when_unsatisfiable": "ScheduleAnyway"}})
    target = DeployTarget(name="agent", namespace="agents")
    rush = Scenario.from_yaml("data/scenarios/friday_rush.yaml").override({"pods.zone_spread": soft})
    spec = build_all(rush, target)["deployment-patch.yaml"]["spec"]["template"]
    (c,) = spec["spec"]["topologySpreadConstraints"]
    assert c["whenUnsatisfiable"] == "ScheduleAnyway" and "minDomains" not in c


def test_a_schedule_anyway_node_spread_fills_the_emptiest_node_first() -> None:
    # four empty nodes kept (a minimum of 2 in each zone) and 8 pods: preferred on the emptiest, 2 on each;
    # DoNotSchedule without min_nodes does the same (the fewest is 0 until each has one); packed, 8 on one
    soft = {"pods.replicas": 8, "cluster.min_nodes_per_zone": 2,
            "pods.spread": {"max_skew": 1, "when_unsatisfiable": "ScheduleAnyway"}}
    sim, _ = _run(_scenario(**soft))
    assert [n.used for n in sim.cluster.nodes.nodes] == [2, 2, 2, 2]
    sim, _ = _run(_scenario(**{**soft, "pods.spread": None}))
    assert [n.used for n in sim.cluster.nodes.nodes] == [8, 0, 0, 0]

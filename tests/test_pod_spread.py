"""``pods.spread``: the pods spread over nodes as a topology spread constraint on the hostname places them
(maxSkew, minDomains, DoNotSchedule), cluster-autoscaler adds the nodes that needs, a node failure takes
fewer pods, ``capsim check`` flags a spread the cluster cannot hold, and the export writes the constraint."""

from __future__ import annotations

from typing import Any

import pytest

from capsim.export import build_all
from capsim.export.readme import render_readme
from capsim.export.target import DeployTarget
from capsim.model.scenario import Scenario
from capsim.sim.simulate import SimResult, simulate
from capsim.studies.checks import run_checks
from cluster_scenarios import cluster_scenario

_scenario = cluster_scenario


def _nodes_at_start(res: SimResult, node_gpus: int = 4) -> int:
    return int(res.timeseries["node_gpus"].iloc[0]) // node_gpus


@pytest.mark.parametrize(("spread", "nodes"), [
    (None, 2),  # packed: 8 one-GPU pods fill two 4-GPU nodes
    ({"max_skew": 1}, 2),  # 4 and 4 already differ by nothing: no node more
    ({"max_skew": 1, "min_nodes": 4}, 4),  # at least 4 nodes: 2 pods each
    ({"max_skew": 1, "min_nodes": 6}, 6),  # one each on 6 nodes first, then the skew lets 2 more on
    ({"max_skew": 2, "min_nodes": 3}, 3),  # 2, 2, 2 while fewer than 3 nodes count, then 3, 3, 2
])
def test_the_spread_decides_how_many_nodes_the_pods_take(spread: dict[str, Any] | None, nodes: int) -> None:
    res = simulate(_scenario(**{"pods.spread": spread}), seed=0)
    assert _nodes_at_start(res) == nodes
    assert (res.timeseries["ready_replicas"] == 8).all()


def test_a_node_failure_takes_only_the_pods_the_spread_left_on_it() -> None:
    fail = {"faults.node_failures": [{"at_s": 100, "node": 0}]}
    packed = simulate(_scenario(**fail), seed=0)
    spread = simulate(_scenario(**fail, **{"pods.spread": {"min_nodes": 4}}), seed=0)
    assert (packed.crashes["kind"] == "node").sum() == 4
    assert (spread.crashes["kind"] == "node").sum() == 2


def test_new_pods_follow_the_spread_and_cluster_autoscaler_adds_nodes_for_them() -> None:
    # the HPA's floor of 12 pods from 8: on 4 nodes of 2 pods the skew allows a third on each (no new node);
    # with max_skew 1 and 6 nodes asked, 12 pods are 2 on each of 6 nodes
    grow = {"autoscaler": {"minReplicas": 12, "maxReplicas": 12, "metrics": [
        {"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                  "target": {"type": "AverageValue", "averageValue": "8"}}}]}}
    res = simulate(_scenario(**grow, **{"pods.spread": {"min_nodes": 4}}), seed=0)
    ts = res.timeseries
    assert ts["ready_replicas"].iloc[-1] == 12
    assert (ts["node_gpus"] == 16).all()
    res6 = simulate(_scenario(**grow, **{"pods.spread": {"min_nodes": 6}}), seed=0)
    ts6 = res6.timeseries
    assert ts6["ready_replicas"].iloc[-1] == 12
    assert ts6["node_gpus"].iloc[0] == 24 and ts6["node_gpus"].iloc[-1] == 24


def test_too_few_nodes_for_the_spread_leave_pods_pending_and_the_check_says_so() -> None:
    # max_gpus holds 4 nodes; 6 asked: the fewest is counted as 0, so each node takes max_skew (1) pod
    sc = _scenario(**{"pods.spread": {"min_nodes": 6}, "cluster.max_gpus": 16})
    res = simulate(sc, seed=0)
    assert (res.timeseries["ready_replicas"] == 4).all()
    assert (res.timeseries["pending_replicas"] == 4).all()
    (finding,) = [f for f in run_checks(sc) if f.check == "spread-over-gpus"]
    assert finding.path == "pods.spread.min_nodes" and finding.level == "fail"
    assert "each takes at most max_skew (1) pods, 4 in all" in finding.message
    assert not [f for f in run_checks(_scenario(**{"pods.spread": {"min_nodes": 4}})) if f.check == "spread-over-gpus"]


def test_a_spread_without_nodes_to_spread_over_is_flagged() -> None:
    (finding,) = [f for f in run_checks(_scenario(**{"cluster": None, "pods.spread": {"min_nodes": 2}}))
                  if f.check == "spread-without-cluster"]
    assert finding.path == "pods.spread" and finding.level == "warn"
    assert not [f for f in run_checks(_scenario(**{"pods.spread": {"min_nodes": 2}}))
                if f.check == "spread-without-cluster"]


def test_the_export_writes_the_constraint_the_simulator_placed_by() -> None:
    target = DeployTarget(name="agent", namespace="agents")
    sc = Scenario.from_yaml("data/scenarios/friday_rush.yaml")
    spec = build_all(sc, target)["deployment-patch.yaml"]["spec"]["template"]
    assert "topologySpreadConstraints" not in spec["spec"]
    spec = build_all(sc.override({"pods.spread": {"max_skew": 2, "min_nodes": 3}}), target)[
        "deployment-patch.yaml"]["spec"]["template"]
    (c,) = spec["spec"]["topologySpreadConstraints"]
    assert c == {"maxSkew": 2, "minDomains": 3, "topologyKey": "kubernetes.io/hostname",
                 "whenUnsatisfiable": "DoNotSchedule", "nodeTaintsPolicy": "Honor",
                 "labelSelector": {"matchLabels": spec["metadata"]["labels"]}}
    readme = render_readme(sc.override({"pods.spread": {"max_skew": 2, "min_nodes": 3},
                                        "pods.unreachable_toleration_s": 60}), target, numbers=None, findings=[])
    assert "| spread over nodes (`topologySpreadConstraints`) | maxSkew 2, minDomains 3 |" in readme
    assert "| evicted from a NotReady node after (`tolerationSeconds`) | 60 s |" in readme


def test_a_spread_over_every_node_the_cluster_allows_blocks_placements_after_a_node_failure() -> None:
    # max_gpus 16 holds 4 nodes and min_nodes asks 4: after node 0 fails 3 nodes count, the fewest pods is
    # counted as 0, and no node that holds a pod takes another: the evicted pods' replacements wait
    # (DoNotSchedule with minDomains, as Kubernetes does) until the dead node goes; the check warns. With
    # room for a fifth node they get one and are ready 60 s (provisioning) + 30 s (start) later
    sc = _scenario(**{"pods.spread": {"min_nodes": 4}, "cluster.max_gpus": 16,
                      "faults.node_failures": [{"at_s": 100, "node": 0}]})
    findings = [f for f in run_checks(sc) if f.check == "node-failure-no-room"]
    assert len(findings) == 1 and "pods.spread.min_nodes 4 takes every node it allows" in findings[0].message
    evicted_s = 100 + 40 + 300
    ts = simulate(sc, seed=0).timeseries.set_index("time_s")
    assert (ts.loc[evicted_s + 10:, "pending_replicas"] == 2).all()
    assert (ts.loc[150:, "ready_replicas"] == 6).all()  # the lost pods Ready in the API until NotReady at 140
    roomy = sc.override({"cluster.max_gpus": 20})
    assert not [f for f in run_checks(roomy) if f.check == "node-failure-no-room"]
    ts = simulate(roomy, seed=0).timeseries.set_index("time_s")
    assert ts.loc[evicted_s + 10, "pending_replicas"] == 2
    assert (ts.loc[evicted_s + 60 + 30 + 20:, "ready_replicas"] == 8).all()


def test_cluster_autoscaler_drains_no_node_whose_pods_the_spread_keeps_there() -> None:
    # three pods, one on each of three 8-GPU nodes (min_nodes 3): every node is under the 0.5 threshold and
    # unneeded, but draining one would leave two nodes counted, so its pod could go nowhere: none is drained
    sc = _scenario(**{"pods.replicas": 3, "pods.spread": {"min_nodes": 3},
                      "cluster": {"max_gpus": 32, "node_gpus": 8, "scale_down_unneeded_time_s": 30,
                                  "scale_down_delay_after_add_s": 0}})
    res = simulate(sc, seed=0)
    assert (res.timeseries["node_gpus"] == 24).all() and (res.timeseries["ready_replicas"] == 3).all()
    # without the spread the same three pods fill one node, and nothing is left to drain
    packed = simulate(sc.override({"pods.spread": None}), seed=0)
    assert (packed.timeseries["node_gpus"] == 8).all()

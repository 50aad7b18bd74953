"""Karpenter removes the GPU nodes (``cluster.karpenter``): emptiness and consolidation after ``consolidateAfter``,
a 10-s poll and a 15-s validation, within the NodePool's disruption budget (``capsim.sim.karpenter``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from capsim.export.writer import export_scenario
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim.simulate import Simulation
from capsim.studies.checks import run_checks
from test_sim_nodes import at


def idle(karpenter: dict[str, Any] | None = None, **changes: Any) -> Scenario:
    """No traffic to speak of (a pod deleted goes at once); pods start in 10 s; nodes of 2 GPUs, provisioned in 30 s,
    removed by Karpenter with ``karpenter`` (its defaults: WhenEmptyOrUnderutilized, consolidateAfter 0, 10%)."""
    s = Scenario.model_validate({
        "horizon_s": 1000,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 0.001}},
        "service": {"kind": "deterministic", "mean_s": 0.1},
        "pods": {"replicas": 4, "startup_s": 10, "gpu_cost_per_hour": 2.0, "endpoints_propagation_s": 0.0},
        "cluster": {"max_gpus": 20, "node_gpus": 2, "node_provision_s": 30, "karpenter": karpenter or {}},
        "timeseries_interval_s": 1,
    })
    return s.override(changes) if changes else s


def scaled(s: Scenario, *steps: tuple[float, int]) -> Simulation:
    """Run ``s`` with the Deployment scaled to each count at its time: the finished simulation."""
    sim = Simulation(s, seed=0)
    at(sim, *((t, lambda t=t, n=n: sim.cluster.scale_to(n, t)) for t, n in steps))
    sim.run()
    return sim


def events(sim: Simulation, kind: str) -> list[tuple[float, str]]:
    log = sim.cluster.nodes.lifecycle.log  # type: ignore[union-attr]
    return [(t, detail) for t, event, _, detail in log if event == kind]


def test_an_empty_node_goes_at_the_poll_after_consolidate_after_and_a_validation() -> None:
    # 4 pods on nodes 0 and 1; down to 2 at 95 s: the ReplicaSet deletes node 0's pods, which go at once (nothing to
    # drain). The poll of 100 s finds node 0 empty; validated 15 s later, it goes at 115 s
    sim = scaled(idle(), (95.0, 2))
    assert sim.cluster.nodes.removals == [(115.0, 0)]
    assert events(sim, "consolidation") == [(115.0, "node 0: empty")]
    # consolidateAfter 60 s: a candidate from 155 s, found at the poll of 160 s, gone at 175 s
    late = idle({"consolidation_policy": "WhenEmpty", "consolidate_after_s": 60})
    assert scaled(late, (95.0, 2)).cluster.nodes.removals == [(175.0, 0)]
    # cluster-autoscaler: unneeded from its scan of 100 s, removed 10 minutes later
    assert scaled(idle(**{"cluster.karpenter": None}), (95.0, 2)).cluster.nodes.removals == [(700.0, 0)]
    # consolidateAfter Never: it stays
    assert scaled(idle({"consolidate_after_s": None}), (95.0, 2)).cluster.nodes.removals == []


def test_a_pod_placed_on_the_node_restarts_its_timer() -> None:
    # as above, but a third pod is placed on node 0 at 120 s and deleted at 121 s (the ReplicaSet deletes the
    # starting one first): the node's last pod event is 121 s, a candidate from 181 s, gone at the poll of 190 + 15
    s = idle({"consolidation_policy": "WhenEmpty", "consolidate_after_s": 60})
    assert scaled(s, (95.0, 2), (120.0, 3), (121.0, 2)).cluster.nodes.removals == [(205.0, 0)]


def test_a_command_is_dropped_when_a_pod_lands_on_the_node_before_it_is_validated() -> None:
    # node 0 found empty at 100 s; a pod placed on it at 105 s: at 115 s the command is dropped and node 0 stays
    # (its pod cannot move: node 1 is full)
    sim = scaled(idle(), (95.0, 2), (105.0, 3))
    assert events(sim, "consolidation_dropped") == [(115.0, "nodes 0: a candidate is no longer empty")]
    assert sim.cluster.nodes.removals == []


def test_consolidation_moves_running_pods_onto_a_node_that_is_not_yet_a_candidate() -> None:
    # consolidateAfter 60 s, node 0 emptied at 95 s: at the poll of 100 s it is no candidate yet, but node 1 is (its
    # last pod event at 0 s), and its two pods fit on node 0. WhenEmptyOrUnderutilized deletes node 1 at 115 s: its
    # serving pods are evicted and start again, cold, on node 0. WhenEmpty waits and removes node 0 at 175 s.
    sim = scaled(idle({"consolidate_after_s": 60}), (95.0, 2))
    assert sim.cluster.nodes.removals == [(115.0, 1)]
    assert events(sim, "consolidation") == [(115.0, "node 1: underutilized, 2 pod(s) evicted")]
    replacements = [p for p in sim.cluster.pods if p.created_s == 115.0]
    assert len(replacements) == 2 and all(p.first_ready_s == 125.0 for p in replacements)
    assert {sim.cluster._node[p.id].id for p in replacements} == {0}  # type: ignore[union-attr]
    when_empty = scaled(idle({"consolidation_policy": "WhenEmpty", "consolidate_after_s": 60}), (95.0, 2))
    assert when_empty.cluster.nodes.removals == [(175.0, 0)]
    # a PodDisruptionBudget that allows no disruption keeps node 1's pods where they are (no candidate)
    pdb = idle({"consolidate_after_s": 60}, **{"pods.disruption_budget": {"max_unavailable": 0}})
    assert scaled(pdb, (95.0, 2)).cluster.nodes.removals == [(175.0, 0)]


def test_the_budget_lets_one_node_in_ten_go_at_a_time() -> None:
    # 10 nodes of 2 pods; down to 2 at 95 s: the ReplicaSet keeps one pod on node 1 and one on node 3, so eight
    # nodes are empty. 10% of the ready nodes, rounded up, is 1: one node a command, each command 15 s after the last
    # (the controller looks again at once after one ran); last, node 1's pod moves to node 3's free GPU
    s = idle(**{"pods.replicas": 20})
    empty = [0, 2, 4, 5, 6, 7, 8, 9]
    assert scaled(s, (95.0, 2)).cluster.nodes.removals == [(115.0 + 15.0 * k, n) for k, n in enumerate([*empty, 1])]
    everything = scaled(s.override({"cluster.karpenter.budget_nodes": "100%"}), (95.0, 2)).cluster.nodes.removals
    assert everything == [(115.0, n) for n in empty] + [(130.0, 1)]
    three = scaled(s.override({"cluster.karpenter.budget_nodes": 3}), (95.0, 2)).cluster.nodes.removals
    assert [t for t, _ in three] == [115.0] * 3 + [130.0] * 3 + [145.0] * 2 + [160.0]


def test_settings_name_the_field() -> None:
    with pytest.raises(SettingsError, match=r"cluster\.karpenter\.budget_nodes must be a count of nodes or a "
                                            r"percentage from 0% to 100%, got 'ten'"):
        idle({"budget_nodes": "ten"})
    with pytest.raises(SettingsError, match=r"cluster\.karpenter: Karpenter removes the nodes by its consolidation, "
                                            r"so scale_down_unneeded_time_s \(cluster-autoscaler's scale-down\)"):
        idle(**{"cluster.scale_down_unneeded_time_s": 60})
    with pytest.raises(SettingsError, match=r"cluster\.karpenter: a Karpenter NodePool keeps no minimum of nodes"):
        idle(**{"cluster.min_nodes_per_zone": 1})
    with pytest.raises(SettingsError, match=r"cluster\.karpenter: spot nodes under Karpenter"):
        idle(**{"cluster.spot": {"price_ratio": 0.4}})
    assert idle({"budget_nodes": "0%"}).cluster.karpenter.allowed(7) == 0  # type: ignore[union-attr]
    assert idle({"budget_nodes": "15%"}).cluster.karpenter.allowed(7) == 2  # type: ignore[union-attr]


# The NodePool fields capsim writes, as Karpenter's v1 CRD defines them (kubernetes-sigs/karpenter,
# pkg/apis/crds/karpenter.sh_nodepools.yaml, Apache-2.0): nodeClassRef needs group, kind and name; requirements'
# operators are an enum; consolidationPolicy WhenEmpty or WhenEmptyOrUnderutilized; consolidateAfter a duration of
# whole units or Never; a budget's nodes a count or a percentage up to 100%; limits are quantities. Strict about
# the fields capsim writes (additionalProperties false), as the KEDA schema in test_export.py is.
_QUANTITY = {"type": "string", "pattern": r"^[0-9]+$"}
NODEPOOL = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "karpenter.sh/v1"}, "kind": {"const": "NodePool"},
        "metadata": {"type": "object", "required": ["name"], "not": {"required": ["namespace"]}},  # cluster-scoped
        "spec": {"type": "object", "required": ["template", "disruption"], "additionalProperties": False, "properties": {
            "template": {"type": "object", "required": ["spec"], "properties": {"spec": {
                "type": "object", "required": ["nodeClassRef", "requirements"], "additionalProperties": False,
                "properties": {
                    "nodeClassRef": {"type": "object", "required": ["group", "kind", "name"],
                                     "additionalProperties": False,
                                     "properties": {k: {"type": "string"} for k in ("group", "kind", "name")}},
                    "requirements": {"type": "array", "items": {
                        "type": "object", "required": ["key", "operator"], "additionalProperties": False,
                        "properties": {"key": {"type": "string"},
                                       "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]},
                                       "values": {"type": "array", "items": {"type": "string"}}}}}}}}},
            "limits": {"type": "object", "additionalProperties": _QUANTITY},
            "disruption": {"type": "object", "required": ["consolidateAfter"], "additionalProperties": False,
                           "properties": {
                               "consolidationPolicy": {"enum": ["WhenEmpty", "WhenEmptyOrUnderutilized"]},
                               "consolidateAfter": {"type": "string", "pattern": r"^(([0-9]+(s|m|h))+|Never)$"},
                               "budgets": {"type": "array", "maxItems": 50, "items": {
                                   "type": "object", "required": ["nodes"], "additionalProperties": False,
                                   "properties": {"nodes": {"type": "string",
                                                            "pattern": r"^((100|[0-9]{1,2})%|[0-9]+)$"},
                                                  "reasons": {"type": "array", "items": {
                                                      "enum": ["Underutilized", "Empty", "Drifted"]}}}}}}},
        }},
    },
}


@pytest.mark.parametrize(("karpenter", "policy", "after", "nodes"), [
    ({}, "WhenEmptyOrUnderutilized", "0s", "10%"),
    ({"consolidation_policy": "WhenEmpty", "consolidate_after_s": 300, "budget_nodes": 2}, "WhenEmpty", "300s", "2"),
    ({"consolidate_after_s": None}, "WhenEmptyOrUnderutilized", "Never", "10%"),
])
def test_the_export_writes_the_nodepool_the_plan_simulated(tmp_path: Path, karpenter: dict[str, Any], policy: str,
                                                           after: str, nodes: str) -> None:
    s = Scenario.from_yaml("data/scenarios/h100_llama3_8b_rush.yaml").override({"cluster.karpenter": karpenter})
    export_scenario(s, tmp_path, force=True)
    pool = yaml.safe_load((tmp_path / "karpenter-nodepool.yaml").read_text())
    jsonschema.validate(pool, NODEPOOL)
    with pytest.raises(jsonschema.ValidationError):  # the schema tells a wrong duration
        jsonschema.validate({**pool, "spec": {**pool["spec"], "disruption": {"consolidateAfter": "1.5s"}}}, NODEPOOL)
    assert pool["spec"]["disruption"] == {"consolidationPolicy": policy, "consolidateAfter": after,
                                          "budgets": [{"nodes": nodes}]}
    assert pool["spec"]["limits"] == {"nvidia.com/gpu": "32"}
    assert {"key": "karpenter.k8s.aws/instance-gpu-count", "operator": "In", "values": ["8"]} in \
        pool["spec"]["template"]["spec"]["requirements"]
    readme = (tmp_path / "README.md").read_text()
    assert f"Karpenter removes the nodes, not cluster-autoscaler: `karpenter-nodepool.yaml`, with `consolidationPolicy: " \
           f"{policy}`" in readme
    assert "kubectl apply -f karpenter-nodepool.yaml" in readme and "--scale-down-unneeded-time" not in readme
    # a NodePool duration is whole seconds: the scenario refuses a fraction
    with pytest.raises(SettingsError, match=r"cluster\.karpenter\.consolidate_after_s must be whole seconds"):
        s.override({"cluster.karpenter.consolidate_after_s": 1.5})


def test_without_karpenter_the_export_writes_no_nodepool(tmp_path: Path) -> None:
    export_scenario(Scenario.from_yaml("data/scenarios/h100_llama3_8b_rush.yaml"), tmp_path, force=True)
    assert not (tmp_path / "karpenter-nodepool.yaml").exists()
    assert "--scale-down-unneeded-time=600s" in (tmp_path / "README.md").read_text()


def test_the_check_warns_of_consolidation_without_a_disruption_budget() -> None:
    found = [f for f in run_checks(idle()) if f.check == "karpenter-evicts-all-at-once"]
    assert [(f.path, f.level) for f in found] == [("cluster.karpenter.consolidation_policy", "warn")]
    assert "evicts every serving pod of a node whose pods fit elsewhere at once" in found[0].message
    for quiet in (idle({"consolidation_policy": "WhenEmpty"}), idle({"consolidate_after_s": None}),
                  idle(**{"pods.disruption_budget": {"max_unavailable": 1}}), idle(**{"cluster.karpenter": None})):
        assert not [f for f in run_checks(quiet) if f.check == "karpenter-evicts-all-at-once"]


def test_the_export_readme_speaks_of_karpenter_where_the_plan_did(tmp_path: Path) -> None:
    # zones, dying nodes and stockouts under Karpenter: no node groups, no halt on NotReady nodes, and the stockout
    # backoff said to be cluster-autoscaler's as simulated
    zones = Scenario.from_yaml("data/scenarios/zone_outage.yaml").override(
        {"cluster.min_nodes_per_zone": 0, "cluster.karpenter": {}, "faults.gpu_stockouts": [{"at_s": 100}]})
    export_scenario(zones, tmp_path, force=True)
    readme = (tmp_path / "README.md").read_text()
    assert "Karpenter picks a node's zone by the pending pods' topology spread" in readme
    assert "Karpenter, which does not halt on NotReady nodes" in readme
    assert "(simulated so under Karpenter too: its own retry in another zone or instance type is not)" in readme
    assert "--balance-similar-node-groups" not in readme and "--max-total-unready-percentage" not in readme


def test_the_node_checks_name_karpenter_where_it_removes_the_nodes() -> None:
    # a budget that allows no eviction: consolidation can never drain a node with a pod (WhenEmpty never tries)
    blocked = idle(**{"pods.disruption_budget": {"max_unavailable": 0}})
    found = [f.message for f in run_checks(blocked) if f.check == "pdb-blocks-drains"]
    assert len(found) == 1 and "Karpenter's consolidation can never drain a node that holds a pod" in found[0]
    when_empty = blocked.override({"cluster.karpenter.consolidation_policy": "WhenEmpty"})
    assert not [f for f in run_checks(when_empty) if f.check == "pdb-blocks-drains"]
    # a node failure with no room for another node: under Karpenter the dead node goes only by a node repair
    full = idle(**{"cluster.max_gpus": 4, "faults": {"node_failures": [{"at_s": 50}]}})
    found = [f.message for f in run_checks(full) if f.check == "node-failure-no-room"]
    assert len(found) == 1 and "never under Karpenter without a node repair (cluster.node_auto_repair_s)" in found[0]
    repaired = full.override({"cluster.node_auto_repair_s": 600})
    found = [f.message for f in run_checks(repaired) if f.check == "node-failure-no-room"]
    assert len(found) == 1 and "600 s after it is NotReady (cluster.node_auto_repair_s)" in found[0]


def test_the_shipped_grid_on_scaling_to_zero() -> None:
    """data/studies/node_autoscaler_grid.yaml (docs/studies.md, "Who removes the nodes") on scale_to_zero.yaml, seed
    0, no budget: with one pod there is only the empty node to remove, so the two policies give the same run;
    consolidateAfter 0s is the cheapest and makes every wake wait for a new node, 5m is cheaper than
    cluster-autoscaler and keeps its wakes."""
    from capsim.studies.sweep import expand_grid, load_grid

    settings_ = expand_grid(load_grid("data/studies/node_autoscaler_grid.yaml"))
    assert len(settings_) == 10
    zero = Scenario.from_yaml("data/scenarios/scale_to_zero.yaml")
    runs = {s.values["nodes"]: Simulation(zero.override(s.changes), seed=0).run() for s in settings_
            if s.values["pods.disruption_budget"] is None}
    ca, e0, e5, u0, u5 = (runs[k] for k in ("cluster-autoscaler", "karpenter WhenEmpty 0s", "karpenter WhenEmpty 5m",
                                             "karpenter Underutilized 0s", "karpenter Underutilized 5m"))
    assert e0.summary.cost == u0.summary.cost and e5.summary.cost == u5.summary.cost
    assert u0.summary.cost < u5.summary.cost < ca.summary.cost
    waited = {k: int((r.wakes.placed_s > r.wakes.woke_s).sum()) for k, r in (("ca", ca), ("0s", u0), ("5m", u5))}
    assert waited["0s"] == len(u0.wakes) > waited["5m"] == waited["ca"] == 1
    assert all(r.summary.slo_met for r in runs.values())


def test_multi_node_consolidation_deletes_two_nodes_in_one_command() -> None:
    # nodes of 4 GPUs, 12 pods; down to 4 at 95 s leaves one pod on node 0, two on node 1 and one on node 2: the pods
    # of nodes 0 and 2 fit in node 1's two free GPUs, so one command (100% budget) taints both, evicts their two pods,
    # whose replacements start on node 1, and deletes both nodes at 115 s
    sim = scaled(idle({"budget_nodes": "100%"}, **{"pods.replicas": 12, "cluster.node_gpus": 4}), (95.0, 4))
    assert sim.cluster.nodes.removals == [(115.0, 0), (115.0, 2)]
    assert events(sim, "consolidation") == [(115.0, "node 0: underutilized, 1 pod(s) evicted"),
                                            (115.0, "node 2: underutilized, 1 pod(s) evicted")]
    replacements = [p for p in sim.cluster.pods if p.created_s == 115.0]
    assert len(replacements) == 2 and {sim.cluster._node[p.id].id for p in replacements} == {1}  # type: ignore[union-attr]


# ---- drift (cluster.karpenter.drift_at_s) -----------------------------------------------------------------------
def nodes_of(sim: Simulation) -> list[tuple[int, float, float | None, float | None]]:
    return [(n.id, n.created_s, n.ready_s, n.removed_s) for n in sim.cluster.nodes.nodes]


@pytest.mark.parametrize("after", [0, None])
def test_drift_replaces_each_node_after_its_replacement_is_ready(after: int | None) -> None:
    # 4 pods on nodes 0 and 1 (2 GPUs each); the template changes at 100 s. The budget (10% of 2, rounded up) lets one
    # node be disrupted: node 0 is tainted and node 2 launched at 100 s; at 130 s node 2 is ready, node 0's pods are
    # evicted (they start on node 2) and node 0 goes. Then node 1, the same way; nodes 2 and 3 came after the change
    # and are not drifted. consolidateAfter: Never changes nothing (drift is not consolidation)
    sim = Simulation(idle({"drift_at_s": [100], "consolidate_after_s": after}), seed=0)
    result = sim.run()
    assert events(sim, "drift") == [(100.0, "node 0: drifted, 2 pod(s); replacement node(s) 2 launched"),
                                    (130.0, "node 1: drifted, 2 pod(s); replacement node(s) 3 launched")]
    assert nodes_of(sim) == [(0, 0.0, 0.0, 130.0), (1, 0.0, 0.0, 160.0), (2, 100.0, 130.0, None),
                             (3, 130.0, 160.0, None)]
    moved = [(t, pod, node) for t, pod, node, _ in sim.cluster.placements if t > 0]
    assert moved == [(130.0, 4, 2), (130.0, 5, 2), (160.0, 6, 3), (160.0, 7, 3)]
    # the replacement was up before the pods were evicted: two of the four pods start again (10 s) at a time
    ready = result.timeseries.set_index("time_s").ready_replicas
    assert ready.min() == 2 and list(ready[ready < 4].index) == [*range(130, 140), *range(160, 170)]


def test_drift_takes_as_many_nodes_at_once_as_the_budgets_allow() -> None:
    # 10 nodes of 2 pods, drifted at 100 s. 10%: one node a command, each 30 s (a replacement's provisioning) after
    # the last. budget_nodes 3: three at once. A drift budget of 2 beside 100%: two at once (the least of the
    # budgets that apply to drift)
    s = idle(**{"pods.replicas": 20, "cluster.max_gpus": 40})

    def drifted(karpenter: dict[str, Any]) -> list[float]:
        sim = Simulation(s.override({"cluster.karpenter": {"drift_at_s": [100], **karpenter}}), seed=0)
        sim.run()
        return [t for t, _ in events(sim, "drift")]

    assert drifted({}) == [100.0 + 30.0 * k for k in range(10)]
    assert drifted({"budget_nodes": 3}) == [100.0] * 3 + [130.0] * 3 + [160.0] * 3 + [190.0]
    assert drifted({"budget_nodes": "100%", "drift_budget_nodes": 2}) == [100.0 + 30.0 * (k // 2) for k in range(10)]


def test_a_disruption_budget_takes_the_pods_one_at_a_time_and_one_that_allows_none_blocks_drift() -> None:
    # maxUnavailable 1: at 130 s one of node 0's pods is evicted; the other is refused until the first one's
    # replacement is ready on node 2 (10 s start, at 140 s), asked again every 5 s, and node 0 goes with it at 140 s
    one = Simulation(idle({"drift_at_s": [100]}, **{"pods.disruption_budget": {"max_unavailable": 1}}), seed=0)
    one.run()
    assert [t for t, pod, node, _ in one.cluster.placements if node == 2] == [130.0, 140.0]
    assert one.cluster.nodes.removals[0] == (140.0, 0)
    # maxUnavailable 0: no drifted node is a candidate (no terminationGracePeriod to force it), nothing moves
    none = Simulation(idle({"drift_at_s": [100]}, **{"pods.disruption_budget": {"max_unavailable": 0}}), seed=0)
    none.run()
    assert events(none, "drift") == [] and none.cluster.nodes.removals == [] and len(none.cluster.nodes.nodes) == 2


def test_at_the_gpu_limit_drift_waits_for_room_for_a_replacement() -> None:
    # max_gpus 4 holds the two nodes: no replacement fits the NodePool's limit, so drift is blocked (logged once per
    # node). Down to 2 pods at 150 s empties node 0, which emptiness removes at 165 s (found at the poll of 150 s,
    # validated 15 s later); then node 1's replacement fits: launched at once, ready at 195 s, node 1 gone then
    s = idle({"drift_at_s": [100]}, **{"cluster.max_gpus": 4})
    sim = scaled(s, (150.0, 2))
    assert [(t, d.split(":")[0]) for t, d in events(sim, "drift_blocked")] == [(100.0, "node 0"), (100.0, "node 1")]
    assert events(sim, "drift") == [(165.0, "node 1: drifted, 2 pod(s); replacement node(s) 2 launched")]
    assert sim.cluster.nodes.removals == [(165.0, 0), (195.0, 1)]
    found = [f for f in run_checks(s) if f.check == "karpenter-drift-no-room"]
    assert [(f.path, f.level) for f in found] == [("cluster.max_gpus", "warn")]
    assert "the peak of 4 pods fills 2: drift launches a replacement before it deletes" in found[0].message
    assert not [f for f in run_checks(idle({"drift_at_s": [100]})) if f.check == "karpenter-drift-no-room"]


def test_a_replacement_the_cloud_cannot_create_fails_the_command_and_untaints_the_node() -> None:
    # a GPU stockout from 90 s to 300 s: node 0's replacement (node 2) is never created; the cloud says so at 160 s
    # (stockout_error_s 60 s), the queue sees it gone and untaints node 0, whose pods never moved. The zone is backed
    # off for 300 s (cluster-autoscaler's backoff, kept under Karpenter), so drift is blocked until 460 s, when node 3
    # is launched, and node 0 goes at 490 s
    s = idle({"drift_at_s": [100]}, **{"faults": {"gpu_stockouts": [{"at_s": 90, "duration_s": 210}]}})
    sim = Simulation(s, seed=0)
    sim.run()
    assert events(sim, "drift")[0] == (100.0, "node 0: drifted, 2 pod(s); replacement node(s) 2 launched")
    assert events(sim, "drift_failed") == [
        (160.0, "node 0: a replacement was not created or not ready in time; untainted")]
    assert not [p for p in sim.cluster.pods if 0 < p.created_s < 460.0]  # no pod moved meanwhile
    assert [t for t, _ in events(sim, "drift_blocked")] == [170.0, 170.0]
    assert events(sim, "drift")[1] == (460.0, "node 0: drifted, 2 pod(s); replacement node(s) 3 launched")
    assert sim.cluster.nodes.removals == [(160.0, 2), (490.0, 0), (520.0, 1)]  # node 2: the cloud's failure


def test_an_empty_drifted_node_is_left_to_emptiness_and_counts_as_room() -> None:
    # down to 2 pods at 95 s empties node 0. With consolidateAfter 0, emptiness (first in the controller's order)
    # removes it at 115 s, and drift then replaces node 1 (ready at 145 s). Under Never drift skips the empty node 0,
    # but its scheduling simulation counts it as room: node 1's pods move onto it at 100 s with no replacement, and
    # node 0, drifted too, is replaced at the next poll (the pods move twice, as in Karpenter)
    s = idle({"drift_at_s": [100]})
    assert scaled(s, (95.0, 2)).cluster.nodes.removals == [(115.0, 0), (145.0, 1)]
    never = scaled(s.override({"cluster.karpenter.consolidate_after_s": None}), (95.0, 2))
    assert events(never, "drift") == [(100.0, "node 1: drifted, 2 pod(s); its pods fit on the other nodes"),
                                      (110.0, "node 0: drifted, 2 pod(s); replacement node(s) 2 launched")]
    assert never.cluster.nodes.removals == [(100.0, 1), (140.0, 0)]


def test_drift_settings_name_the_field() -> None:
    with pytest.raises(SettingsError, match=r"cluster\.karpenter\.drift_budget_nodes must be a count of nodes or a "
                                            r"percentage from 0% to 100%, got '101%'"):
        idle({"drift_budget_nodes": "101%"})
    with pytest.raises(SettingsError, match=r"cluster\.karpenter\.drift_at_s\[1\] must not be negative, got -5"):
        idle({"drift_at_s": [100, -5]})
    k = idle({"budget_nodes": "50%", "drift_budget_nodes": 1}).cluster.karpenter
    assert k is not None and (k.allowed(10), k.allowed(10, drift=True)) == (5, 1)
    assert (k.drifted_s(0.0), idle({"drift_at_s": [300, 100]}).cluster.karpenter.drifted_s(150.0)) == (None, 300.0)  # type: ignore[union-attr]


def test_the_export_writes_the_drift_budget_and_the_check_warns_of_drift_without_a_disruption_budget(
        tmp_path: Path) -> None:
    s = Scenario.from_yaml("data/scenarios/h100_llama3_8b_rush.yaml").override(
        {"cluster.karpenter": {"drift_budget_nodes": 1, "drift_at_s": [1800]}})
    export_scenario(s, tmp_path, force=True)
    pool = yaml.safe_load((tmp_path / "karpenter-nodepool.yaml").read_text())
    jsonschema.validate(pool, NODEPOOL)
    assert pool["spec"]["disruption"]["budgets"] == [{"nodes": "10%"}, {"nodes": "1", "reasons": ["Drifted"]}]
    readme = (tmp_path / "README.md").read_text()
    assert 'drift has its own budget, `nodes: "1"` for `reasons: [Drifted]`' in readme
    assert "the plan simulated it at 1800 s, each node replaced by a new one launched first" in readme
    found = [f for f in run_checks(idle({"drift_at_s": [100], "consolidation_policy": "WhenEmpty"}))
             if f.check == "karpenter-evicts-all-at-once"]
    assert [(f.path, f.level) for f in found] == [("cluster.karpenter.drift_at_s", "warn")]
    assert "every serving pod on the node is evicted at once" in found[0].message
    guarded = idle({"drift_at_s": [100]}, **{"pods.disruption_budget": {"max_unavailable": 1}})
    assert not [f for f in run_checks(guarded) if f.check == "karpenter-evicts-all-at-once"]


def test_capsim_simulate_notes_what_drift_did(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from capsim.cli import app

    path = tmp_path / "drift.yaml"
    s = idle({"drift_at_s": [100]}, **{"faults": {"gpu_stockouts": [{"at_s": 90, "duration_s": 210}]}})
    path.write_text(yaml.safe_dump(s.model_dump(mode="json", exclude_none=True)))
    res = CliRunner().invoke(app, ["simulate", str(path)])
    assert res.exit_code == 0, res.output
    note = next(line for line in res.output.splitlines() if "cluster.karpenter.drift_at_s" in line)
    assert note == ("note: the node template changed at 100 s (cluster.karpenter.drift_at_s): Karpenter replaced 2 of "
                    "2 drifted node(s), the last gone at 520 s; 1 command(s) failed, a replacement not created or not "
                    "ready in time; 2 node(s) could not be replaced for a while (drift_blocked: the GPU limit, or no "
                    "zone could take a new node) (node_events.csv: drift, drift_blocked, drift_failed)")

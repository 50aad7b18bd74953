"""GPU stockouts (``faults.gpu_stockouts``): nodes the cloud cannot create, and cluster-autoscaler's backoff of
the node group (``capsim.policy.node_group_backoff``, upstream's cases ported)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.policy.node_group_backoff import NodeGroupBackoff
from capsim.sim.simulate import simulate

MIN = 60.0


# ---- the rule: cluster-autoscaler's utils/backoff/exponential_backoff_test.go ----------------------------
def test_backoff_two_keys() -> None:
    b = NodeGroupBackoff(10 * MIN, 60 * MIN, 180 * MIN)
    assert not b.backed_off(1, 0) and not b.backed_off(2, 0)
    b.backoff(1, 1 * MIN)
    assert b.backed_off(1, 2 * MIN)
    assert not b.backed_off(2, 0)
    assert not b.backed_off(1, 11 * MIN)


def test_max_backoff() -> None:
    b = NodeGroupBackoff(1 * MIN, 3 * MIN, 180 * MIN)
    b.backoff(1, 0)
    assert b.backed_off(1, 0)
    assert not b.backed_off(1, 1 * MIN)  # the end itself is free (strictly after)
    b.backoff(1, 1 * MIN)  # its backoff ends now, not before: the duration stays
    assert b.backed_off(1, 1 * MIN)
    assert not b.backed_off(1, 3 * MIN)
    b.backoff(1, 3 * MIN)  # ended before now: doubled
    assert b.backed_off(1, 3 * MIN)
    assert not b.backed_off(1, 6 * MIN)
    assert b.backoff(1, 7 * MIN) == 7 * MIN + 3 * MIN  # doubled again, capped at the maximum


def test_reset_stale_backoff_data() -> None:
    b = NodeGroupBackoff(1 * MIN, 3 * MIN, 180 * MIN)
    b.backoff(1, 0)
    b.backoff(2, 60 * MIN)
    assert b.entries(60 * MIN) == 2
    assert b.entries(240 * MIN) == 1
    assert b.entries(300 * MIN) == 0
    assert b.backoff(1, 300 * MIN) == 301 * MIN  # a fresh entry: the initial duration


def test_concurrent_failures_do_not_double_the_backoff() -> None:
    b = NodeGroupBackoff()  # cluster-autoscaler's flags' defaults: 5 min, 30 min, 3 h
    assert b.backoff(0, 100) == 400 and b.backoff(0, 115) == 415  # still backed off: 300 s again
    assert b.backoff(0, 475) == 1075  # failed after the backoff ended: 600 s
    assert b.until(0, 500) == 1075 and b.until(0, 1075) is None
    with pytest.raises(ValueError, match="initial_s <= max_s"):
        NodeGroupBackoff(600, 300)


# ---- in the simulator ------------------------------------------------------------------------------------
def scenario(**over: Any) -> Scenario:
    """A load two pods cannot carry: the HPA asks for more, on 4-GPU nodes that take 240 s to come."""
    sc = Scenario.model_validate({
        "horizon_s": 2400,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 40}},
        "service": {"kind": "deterministic", "mean_s": 1.0},
        "batching": {"max_batch_size": 8, "max_wait_ms": 10},
        "pods": {"replicas": 2, "startup_s": 30},
        "router": {"kind": "least_outstanding"},
        "autoscaler": {"minReplicas": 2, "maxReplicas": 16, "metrics": [
            {"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                      "target": {"type": "AverageValue", "averageValue": "4"}}}]},
        "cluster": {"max_gpus": 16, "node_gpus": 4, "node_provision_s": 240},
        "faults": {"gpu_stockouts": [{"at_s": 0, "duration_s": 1000}]},
        "client": {"timeout_s": 60, "max_retries": 0},
    })
    return sc.override(over) if over else sc


def test_nodes_asked_for_in_a_stockout_fail_and_back_the_node_group_off() -> None:
    r = simulate(scenario(), 1)
    nodes, events = r.nodes, r.node_events
    failed = nodes[nodes["unfulfilled"]]
    assert len(failed) >= 4
    assert (failed["created_s"] < 1000).all() and failed["ready_s"].isna().all()
    assert np.allclose(failed["removed_s"] - failed["created_s"], 60.0)  # cluster.stockout_error_s
    assert (failed["gpu_hours"] == 0).all()  # never created, never billed
    fails = events[events["event"] == "scale_up_failed"]
    assert len(fails) == len(failed)
    first = float(fails["time_s"].iloc[0])
    # the first failure backs the group off 5 min; the next asks come when the last backoff ends, the one after
    # that fails after it ended: 10 min
    after = nodes[(nodes["created_s"] > first)]
    second = float(after["created_s"].iloc[0])
    before = fails[fails["time_s"] < second]
    until = float(before["detail"].iloc[-1].split("until ")[1].split(" s")[0])
    assert until == pytest.approx(float(before["time_s"].iloc[-1]) + 300.0, abs=0.01)  # printed to 6 digits
    assert second == math.ceil((float(before["time_s"].iloc[-1]) + 300.0) / 10) * 10  # cluster-autoscaler's first loop (every 10 s) once it may
    later = fails[fails["time_s"] > second]
    assert f"until {float(later['time_s'].iloc[0]) + 600:g} s" in later["detail"].iloc[0]
    # capacity is back at 1,000 s, but the group is backed off until then: the first real node comes after
    made = nodes[~nodes["unfulfilled"] & (nodes["created_s"] > 0)]
    assert len(made) > 0 and (made["created_s"] >= 1000).all()
    assert np.allclose(made["ready_s"] - made["created_s"], 240.0)
    assert float(made["created_s"].iloc[0]) == pytest.approx(float(later["time_s"].iloc[0]) + 600)
    plain = simulate(scenario(faults=None), 1)
    assert plain.summary.ttft_p99_s < r.summary.ttft_p99_s
    assert not plain.nodes["unfulfilled"].any()


def test_another_zones_node_group_takes_the_pods_while_one_is_backed_off() -> None:
    r = simulate(scenario(**{"cluster.zones": 2, "faults.gpu_stockouts": [{"at_s": 0, "duration_s": 1000,
                                                                            "zone": 1}]}), 1)
    nodes = r.nodes
    failed = nodes[nodes["unfulfilled"]]
    assert len(failed) > 0 and (failed["zone"] == 1).all()
    first_fail = float(failed["removed_s"].min())
    # at the failure zone 1 is backed off: at cluster-autoscaler's next loop (every 10 s) the node goes to zone 0
    loop = (first_fail // 10 + 1) * 10
    replaced = nodes[(nodes["created_s"] == loop) & (nodes["zone"] == 0)]
    assert len(replaced) == 1 and not replaced["unfulfilled"].iloc[0]
    assert float(replaced["ready_s"].iloc[0]) == pytest.approx(loop + 240)
    assert not nodes[(nodes["zone"] == 1) & (nodes["created_s"] > first_fail)
                     & (nodes["created_s"] < first_fail + 300)].shape[0]  # none in zone 1 while backed off


def test_a_failure_the_cloud_never_reports_times_out_after_max_node_provision_s() -> None:
    r = simulate(scenario(**{"cluster.stockout_error_s": None, "cluster.max_node_provision_s": 700}), 1)
    failed = r.nodes[r.nodes["unfulfilled"]]
    assert len(failed) > 0 and np.allclose(failed["removed_s"] - failed["created_s"], 700.0)
    assert r.node_events["detail"].str.contains("timed out").all()


def test_a_failure_known_at_once_with_no_backoff_asks_again_one_loop_later() -> None:
    # the cloud says no at once and the group is never backed off: cluster-autoscaler asks again at each loop
    # (scan_interval_s), not in a loop of its own at one instant
    r = simulate(scenario(**{"cluster.stockout_error_s": 0, "cluster.initial_node_group_backoff_s": 0,
                             "cluster.max_node_group_backoff_s": 0, "horizon_s": 300}), 1)
    failed = r.nodes[r.nodes["unfulfilled"]]
    asks = [a for a in sorted(set(failed["created_s"])) if a > 60]  # once the HPA's own asks are past
    assert len(asks) > 5 and np.allclose(np.diff(asks), 10.0)  # each loop, on its 10-s grid
    assert all(a % 10 == 0 for a in asks)
    assert np.allclose(failed["removed_s"], failed["created_s"])


def test_a_stockout_that_ends_before_the_ask_changes_nothing() -> None:
    # the initial nodes exist before it, and the HPA asks for nodes only after it ended
    a = simulate(scenario(**{"faults.gpu_stockouts": [{"at_s": 0, "duration_s": 1}]}), 2)
    b = simulate(scenario(faults=None), 2)
    assert a.requests.equals(b.requests) and a.nodes.equals(b.nodes)


@pytest.mark.parametrize("over, message", [
    ({"cluster": None}, "faults.gpu_stockouts needs a cluster section"),
    ({"faults.gpu_stockouts": [{"at_s": 0, "zone": 3}]}, "faults.gpu_stockouts.0.zone must name a zone"),
    ({"faults.gpu_stockouts": [{"at_s": 0, "duration_s": 0}]}, "faults.gpu_stockouts.0.duration_s"),
    ({"cluster.initial_node_group_backoff_s": 3600}, "initial_node_group_backoff_s .* must not pass"),
])
def test_bad_stockout_settings_name_their_field(over: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        scenario(**over)


def test_capsim_simulate_notes_the_failed_nodes_and_the_shipped_stockout_keeps_its_slo(tmp_path: Any) -> None:
    from pathlib import Path

    from typer.testing import CliRunner

    from capsim.cli import app

    path = Path(__file__).resolve().parent.parent / "data" / "scenarios" / "gpu_stockout.yaml"
    warm = simulate(Scenario.from_yaml(path), 0).summary
    assert warm.slo_met  # one warm pod keeps its node: the stockout costs nothing
    res = CliRunner().invoke(app, ["simulate", str(path), "--set", "autoscaler.minReplicas=0", "--out",
                                   str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "note: 1 GPU node asked for was not created (faults.gpu_stockouts)" in res.output
    assert "backed the node groups off, last zone 0 until" in res.output
    slo = next(line.split() for line in res.output.splitlines() if line.startswith("slo_met "))
    assert slo == ["slo_met", "False"]  # scaled to zero, its wake waits out the stockout and the backoff


def test_the_shipped_stockout_space_keeps_a_warm_pod(tmp_path: Any) -> None:
    from capsim.studies.space import load_space
    from capsim.studies.tune import tune

    space = load_space("data/studies/scale_to_zero_stockout_space.yaml")
    assert set(space.stresses) == {"gpu-stockout", "quiet-hours"}
    base = Scenario.from_yaml("data/scenarios/scale_to_zero.yaml")
    small = {"params": {"autoscaler.minReplicas": {"choices": [0, 1]}},
             "stresses": {"gpu-stockout": space.stresses["gpu-stockout"], "quiet-hours": {}}}
    r = tune(base, small, seeds=1, budget=2, executor="serial", cache=tmp_path, progress=False)
    assert r.best_params == {"autoscaler.minReplicas": 1}  # zero pods wait out the stockout and the backoff
    zero = r.trials[r.trials["autoscaler.minReplicas"] == 0]
    assert len(zero) and (zero["status"] == "rejected").all()
    assert zero["reason"].str.contains("stress 'gpu-stockout'").all()


def test_capsim_check_warns_a_plan_that_scales_to_zero_into_a_stockout() -> None:
    from pathlib import Path

    from capsim.studies.checks import run_checks

    path = Path(__file__).resolve().parent.parent / "data" / "scenarios" / "gpu_stockout.yaml"
    warm = Scenario.from_yaml(path)
    assert not [f for f in run_checks(warm) if f.check == "stockout-at-wake"]  # a warm pod keeps its node
    zero = warm.override({"autoscaler.minReplicas": 0})
    (f,) = [f for f in run_checks(zero) if f.check == "stockout-at-wake"]
    assert f.level == "warn" and f.path == "autoscaler.minReplicas"
    assert "waits at least 600 s" in f.message and "over slo.max_wake_s (420 s)" in f.message
    # the simulated wake is that long at least: 609 s to a node for the request at 4,804 s (docs/studies.md)
    assert not [f for f in run_checks(zero.override({"slo.max_wake_s": 900})) if f.check == "stockout-at-wake"]
    assert not [f for f in run_checks(zero.override({"faults.gpu_stockouts": []})) if f.check == "stockout-at-wake"]

"""``--set PATH=VALUE`` overrides a scenario's setting from the command line (simulate, capacity, sweep), and
``capsim simulate --seeds N`` reports each summary field's median and range over N seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim import simulate
from capsim.studies.study_cli import load_scenario, parse_sets
from test_inputs_cli import one_line_error, run, scenario


def test_parse_sets_reads_values_as_yaml() -> None:
    got = parse_sets(["pods.replicas=4", "batching.max_wait_ms=2.5", "client.cancel_on_timeout=none",
                      "workload.prompt_tokens={kind: constant, value: 64}", "service.extrapolate=true",
                      "pods.replicas=5"])
    assert got == {"pods.replicas": 5, "batching.max_wait_ms": 2.5, "client.cancel_on_timeout": "none",
                   "workload.prompt_tokens": {"kind": "constant", "value": 64}, "service.extrapolate": True}


@pytest.mark.parametrize(("item", "needle"), [
    ("pods.replicas", "expected PATH=VALUE"),
    ("=4", "expected PATH=VALUE"),
    ("pods.replicas=", "no value after '='"),
    ("pods.replicas=[1", "is not YAML"),
    ("pods.replica=3", "pods.replica is not a known setting (did you mean replicas?)"),
    ("hpa.max_replicas=3", "(did you mean autoscaler?)"),
])
def test_a_bad_set_is_a_settings_error_naming_it(item: str, needle: str) -> None:
    with pytest.raises(SettingsError, match="--set") as exc:
        parse_sets([item])
    assert needle in str(exc.value)


def test_load_scenario_applies_the_sets_and_names_a_value_that_does_not_validate(tmp_path: Path) -> None:
    path = scenario(tmp_path)
    sc = load_scenario(path, ["pods.replicas=3", "horizon_s=30"])
    assert (sc.pods.replicas, sc.horizon_s) == (3, 30.0)
    assert load_scenario(path) == Scenario.from_yaml(path)
    with pytest.raises(SettingsError, match=r"s\.yaml: with --set pods\.replicas=-1: pods\.replicas must be >= 0"):
        load_scenario(path, ["pods.replicas=-1"])
    # null clears a setting that may be none, and is refused, naming the field, where one is required
    assert load_scenario(path, ["autoscaler={minReplicas: 1, maxReplicas: 2, metrics: [{type: Pods, pods: {"
                                "metric: {name: capsim_queue_depth}, target: {type: AverageValue, "
                                "averageValue: '4'}}}]}"]).autoscaler is not None
    sc = load_scenario(path, ["router.outlier_ejection=null"])
    assert Scenario.from_yaml(path).router.outlier_ejection is not None and sc.router.outlier_ejection is None
    with pytest.raises(SettingsError, match=r"with --set pods\.replicas=None: pods\.replicas"):
        load_scenario(path, ["pods.replicas=null"])


def test_simulate_with_a_set_is_the_overridden_scenario(tmp_path: Path) -> None:
    path = scenario(tmp_path)
    code, _out, err = run(["simulate", str(path), "--set", "pods.replicas=3", "--set", "horizon_s=20",
                          "--out", str(tmp_path / "o")])
    assert code == 0, err
    want = simulate(Scenario.from_yaml(path).override({"pods.replicas": 3, "horizon_s": 20}), seed=0).summary
    got = json.loads((tmp_path / "o" / "summary.json").read_text())["summary"]
    assert got["arrived"] == want.arrived and got["ttft_p99_s"] == pytest.approx(want.ttft_p99_s, rel=1e-12)
    one_line_error(["simulate", str(path), "--set", "pods.replicaz=3"], "did you mean replicas?")
    one_line_error(["capacity", str(path), "--set", "slo.ttft_p99=0.5"], "did you mean ttft_p99_s?")


def test_simulate_seeds_reports_the_median_and_range_over_the_seeds(tmp_path: Path) -> None:
    path = scenario(tmp_path)
    code, out, err = run(["simulate", str(path), "--seeds", "3", "--seed", "4", "--out", str(tmp_path / "o")])
    assert code == 0, err
    runs = pd.read_csv(tmp_path / "o" / "runs.csv")
    assert runs["seed"].tolist() == [4, 5, 6]
    p99 = [simulate(Scenario.from_yaml(path), seed=s).summary.ttft_p99_s for s in (4, 5, 6)]
    assert runs["ttft_p99_s"].tolist() == pytest.approx(p99, rel=1e-12)
    stats = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert stats["seeds"] == [4, 5, 6]
    assert stats["summary"]["ttft_p99_s"] == pytest.approx(
        {"median": sorted(p99)[1], "min": min(p99), "max": max(p99)}, rel=1e-12)
    assert stats["summary"]["slo_met"]["of"] == 3
    row = next(line for line in out.splitlines() if line.startswith("ttft_p99_s"))
    assert row.split()[1:] == [f"{sorted(p99)[1]:.4g}", f"{min(p99):.4g}", f"{max(p99):.4g}"]
    assert len({round(v, 12) for v in p99}) == 3  # the seeds differ, so the range says something


def test_simulate_seeds_tells_an_error_every_seed_shares_once(tmp_path: Path) -> None:
    # a trace that is not there is found only when a run builds its workload: every seed fails the same way
    path = scenario(tmp_path, workload=f"{{arrivals: {{kind: trace, path: {tmp_path / 'gone.csv'}}}}}")
    line = one_line_error(["simulate", str(path), "--seeds", "2"], "gone.csv")
    assert "seed 0" not in line and line.count("gone.csv") == 1  # the same error for every seed, told once


def test_sweep_and_capacity_take_the_sets(tmp_path: Path) -> None:
    path = scenario(tmp_path)
    grid = tmp_path / "grid.yaml"
    grid.write_text("pods.replicas: [1, 2]\n")
    code, out, err = run(["sweep", str(path), "--grid", str(grid), "--seeds", "1", "--no-cache",
                          "--set", "horizon_s=20", "--out", str(tmp_path / "sw")])
    assert code == 0, err
    runs = pd.read_csv(tmp_path / "sw" / "runs.csv")
    base = Scenario.from_yaml(path).override({"horizon_s": 20})
    for replicas, arrived in zip(runs["pods.replicas"], runs["arrived"], strict=True):
        assert arrived == simulate(base.override({"pods.replicas": int(replicas)}), seed=0).summary.arrived
    assert runs["arrived"].max() < simulate(Scenario.from_yaml(path), seed=0).summary.arrived  # 20 s, not 60
    code, out, err = run(["capacity", str(path), "--no-cache", "--rel-tol", "0.2",
                          "--set", "slo.ttft_p99_s=0.5", "--set", "horizon_s=30"])
    assert code == 0, err
    assert "SLO p99 TTFT 0.5 s" in out


def test_check_and_export_take_the_sets(tmp_path: Path) -> None:
    rush = Path(__file__).resolve().parent.parent / "data" / "scenarios" / "friday_rush.yaml"
    assert run(["check", str(rush)])[0] == 0
    code, out, _err = run(["check", str(rush), "--set", "autoscaler.maxReplicas=40"])  # 4 nodes of 8 hold 32
    assert code == 1 and "FAIL autoscaler.maxReplicas: 40 pods" in out
    code, out, err = run(["export", str(rush), "--out", str(tmp_path / "k8s"), "--no-simulate",
                          "--set", "pods.unreachable_toleration_s=45", "--set", "autoscaler.minReplicas=6"])
    assert code == 0, err
    import yaml

    patch = yaml.safe_load((tmp_path / "k8s" / "deployment-patch.yaml").read_text())
    assert patch["spec"]["template"]["spec"]["tolerations"][0]["tolerationSeconds"] == 45
    hpa = yaml.safe_load((tmp_path / "k8s" / "hpa.yaml").read_text())
    assert hpa["spec"]["minReplicas"] == 6
    one_line_error(["export", str(rush), "--out", str(tmp_path / "k2"), "--set", "pods.tolerations=1"],
                   "pods.tolerations is not a known setting")

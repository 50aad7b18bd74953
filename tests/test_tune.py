"""Tuning: a small space, fail-fast candidates, the checks, the Pareto front, and a winner that holds on
seeds the search never saw."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from capsim.cli import app
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim import simulate
from capsim.studies.space import load_space, parse_space
from capsim.studies.tune import _changes, evaluate, pareto, tune

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "data" / "profiles" / "cpu-tiny-float32.csv"
STRESSES = {"crash": {"faults.crashes": [{"at_s": 30, "pods": 1}]},
            "steady": {}}
SPACE = {"params": {"pods.replicas": {"low": 1, "high": 3},
                    "batching.max_batch_size": {"choices": [4, 16]},
                    "batching.queue_capacity": {"choices": [2, 256]}},
         "stresses": STRESSES}


def small() -> Scenario:
    return Scenario.model_validate({
        "horizon_s": 60.0, "warmup_s": 5.0,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 30},
                     "prompt_tokens": {"kind": "constant", "value": 64},
                     "output_tokens": {"kind": "constant", "value": 8}},
        "service": {"kind": "profile", "profile": str(PROFILE)},
        "batching": {"max_batch_size": 16, "max_wait_ms": 5, "queue_capacity": 256},
        "pods": {"replicas": 2, "startup_s": 20, "gpu_cost_per_hour": 2.5},
        # round robin: a least-outstanding router sends nearly every request to a crashed pod while it
        # is still in the endpoints (it has none in flight), which no setting of this small space survives
        "router": {"kind": "round_robin"},
        "client": {"timeout_s": 10, "max_retries": 2, "backoff_s": 0.5},
        "slo": {"ttft_p99_s": 1.0, "max_error_rate": 0.001},
    })


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache = tmp_path_factory.mktemp("cache")
    return tune(small(), SPACE, seeds=2, budget=10, executor="serial", cache=cache, progress=False)


def test_the_winner_meets_the_slo_on_unseen_seeds_under_every_stress(result: Any) -> None:
    assert result.best is not None
    assert result.best.pods.replicas >= 2  # one pod cannot survive its own crash
    for name, changes in STRESSES.items():
        for seed in (101, 202, 303):  # the search used seeds 0 and 1
            s = simulate(result.best.override(changes), seed).summary
            assert s.slo_met and s.lost_sessions == 0, (name, seed, s)


def test_trials_record_every_run_and_why_a_candidate_was_rejected(result: Any) -> None:
    t = result.trials
    assert {"trial", "pods.replicas", "status", "reason", "stress", "seed", "ttft_p99_s", "cost"} <= set(t.columns)
    accepted = t[t["status"] == "accepted"]
    # an accepted candidate ran every stress under every seed
    for _, runs in accepted.groupby("trial"):
        assert len(runs) == len(STRESSES) * 2 and runs["slo_met"].astype(bool).all()
    rejected = t[t["status"] != "accepted"].drop_duplicates("trial")
    assert (rejected["reason"].str.len() > 0).all()
    checked = rejected[rejected["batching.queue_capacity"] == 2]
    assert len(checked) and checked["reason"].str.startswith("check: batching.queue_capacity").all()
    assert checked["stress"].isna().all()  # rejected before any run
    assert result.provenance["accepted"] == accepted["trial"].nunique()


def test_a_candidate_stops_at_its_first_missed_run() -> None:
    out = evaluate(small(), {"pods.replicas": 1}, STRESSES, [0, 1], None)
    assert out["status"] == "rejected"
    assert out["reason"].startswith("stress 'crash' seed 0: ")
    assert len(out["runs"]) == 1 and out["constraint"] > 0
    ok = evaluate(small(), {"pods.replicas": 3}, STRESSES, [0, 1], None)
    assert ok["status"] == "accepted" and len(ok["runs"]) == 4 and ok["constraint"] == 0
    assert ok["ttft_p99_s"] == max(r["ttft_p99_s"] for r in ok["runs"])


def test_a_passing_candidate_beaten_by_an_accepted_one_stops_after_one_seed() -> None:
    ok = evaluate(small(), {"pods.replicas": 3}, STRESSES, [0, 1], None)
    cheaper_and_faster = [(ok["cost"] / 2, ok["ttft_p99_s"] / 2)]
    out = evaluate(small(), {"pods.replicas": 3}, STRESSES, [0, 1], None, front=cheaper_and_faster)
    assert out["status"] == "dominated" and out["reason"].startswith("after seed 0:")
    assert len(out["runs"]) == len(STRESSES) and out["constraint"] == 0
    # not beaten on both: it goes on to every seed
    cheaper_only = [(ok["cost"] / 2, ok["ttft_p99_s"] * 10)]
    assert evaluate(small(), {"pods.replicas": 3}, STRESSES, [0, 1], None, front=cheaper_only)["status"] == "accepted"


def test_front_is_the_pareto_front_and_the_best_is_the_cheapest(result: Any) -> None:
    f = result.front
    assert len(f) >= 1
    for _, a in f.iterrows():  # no point of the front is dominated by another passing candidate
        assert not ((f["cost"] <= a["cost"]) & (f["ttft_p99_s"] <= a["ttft_p99_s"])
                    & ((f["cost"] < a["cost"]) | (f["ttft_p99_s"] < a["ttft_p99_s"]))).any()
    assert result.best.pods.replicas == result.best_params["pods.replicas"]
    costs = result.trials[result.trials["status"] == "accepted"].groupby("trial")["cost"].mean()
    assert f["cost"].iloc[0] == pytest.approx(costs.min())


def test_pareto_helper() -> None:
    import pandas as pd

    frame = pd.DataFrame({"cost": [1, 2, 2, 3, 4], "ttft_p99_s": [0.9, 0.5, 0.7, 0.6, 0.1]})
    assert pareto(frame)[["cost", "ttft_p99_s"]].values.tolist() == [[1, 0.9], [2, 0.5], [4, 0.1]]


def test_write_gives_a_best_yaml_that_simulate_runs_from_anywhere(result: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "tune-out"
    files = result.write(out)
    assert {p.name for p in files} == {"best.yaml", "trials.csv", "front.csv", "front.png", "provenance.json"}
    assert (out / "front.png").stat().st_size > 1000
    text = (out / "best.yaml").read_text()
    assert text.startswith("# capsim tune:")
    assert not Path(yaml.safe_load(text)["service"]["profile"]).is_absolute()
    loaded = Scenario.from_yaml(out / "best.yaml")
    assert loaded.pods == result.best.pods and loaded.batching == result.best.batching
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = CliRunner().invoke(app, ["simulate", str(out / "best.yaml")])
    assert run.exit_code == 0, run.output
    assert "slo_met" in run.output and "True" in run.output


def test_quantity_targets_keep_the_kubernetes_spelling() -> None:
    rush = Scenario.from_yaml(ROOT / "data" / "scenarios" / "friday_rush.yaml")
    sp = parse_space({"autoscaler.metrics.0.pods.target.averageValue": {"low": 2, "high": 40, "step": 2},
                      "pods.startup_s": {"low": 0.5, "high": 0.9}})
    dumped = rush.model_dump(mode="json", by_alias=True)
    ch = _changes(sp.params, {"autoscaler.metrics.0.pods.target.averageValue": 12, "pods.startup_s": 0.75}, dumped)
    assert ch["autoscaler.metrics.0.pods.target.averageValue"] == "12"
    assert ch["pods.startup_s"] == 0.75  # no string in the base at that path: stays a number


def test_the_friday_space_file_applies_to_its_scenario() -> None:
    sp = load_space(ROOT / "data" / "studies" / "friday_space.yaml")
    assert sp.scenario is not None and sp.seeds == 3 and sp.budget == 200
    base = Scenario.from_yaml(sp.scenario)
    assert next(iter(sp.stresses)) == "pod-crash"
    for changes in sp.stresses.values():
        base.override(changes)
    assert math.isinf(sp.size()) or sp.size() > 1000


def test_the_llama70b_space_tries_three_pod_shapes_that_each_pass_the_checks() -> None:
    from capsim.studies.checks import run_checks

    sp = load_space(ROOT / "data" / "studies" / "llama70b_space.yaml")
    assert sp.scenario is not None
    base = Scenario.from_yaml(sp.scenario)
    (shapes,) = [p for p in sp.params if p.path == "pod_shape"]
    assert shapes.labels() == ["4xh100", "8xh100", "2xh200"] and shapes.choices is not None
    for bundle in shapes.choices:
        shaped = base.override(bundle["set"])
        # each bundle's profile was estimated for its pod's GPUs, its cache sized for its GPU, and its
        # maxReplicas fits the 64 GPUs: nothing fails, only the estimate is flagged
        assert [f.check for f in run_checks(shaped)] == ["estimated-profile"], bundle["name"]
        for changes in sp.stresses.values():
            shaped.override(changes)


def test_the_llama70b_agents_space_tries_three_routers_under_the_same_stresses() -> None:
    from capsim.studies.checks import run_checks

    sp = load_space(ROOT / "data" / "studies" / "llama70b_agents_space.yaml")
    assert sp.scenario is not None and sp.scenario.name == "h100x4_llama3_70b_agents.yaml"
    base = Scenario.from_yaml(sp.scenario)
    assert base.batching.enable_prefix_caching and base.workload.sessions.new_tokens is not None
    (routers,) = [p for p in sp.params if p.path == "router.kind"]
    assert routers.choices == ("prefix_aware", "session_affinity", "least_outstanding")
    assert list(sp.stresses) == ["pod-crash", "redis-outage", "rush"]
    for kind in routers.choices:
        routed = base.override({"router.kind": kind})
        assert [f.check for f in run_checks(routed)] == ["estimated-profile"], kind
        for changes in sp.stresses.values():
            routed.override(changes)


@pytest.mark.parametrize(("space", "words"), [
    ({"params": {"pods.replicas": {"low": 3, "high": 1}}}, "high must be >= low"),
    ({"params": {"pods.replicas": {"choices": []}}}, "choices must be a non-empty list"),
    ({"params": {}, "stresses": {"x": 3}}, "stresses.x must be a mapping"),
    ({"params": {}, "objective": "speed"}, "objective must be one of"),
    ({"params": {}, "objective": {"x": 1}}, r"objective must be one of .*got \{'x': 1\}"),  # not a TypeError
    # a path that names no setting: refused before any trial, with the setting closest to it
    ({"params": {"batching.max_wait": {"low": 1, "high": 5}}},
     r"space.params.batching.max_wait: batching.max_wait is not a known setting \(did you mean max_wait_ms\?\)"),
    ({"params": {"pods.replica": [1, 2]}}, r"pods.replica is not a known setting \(did you mean replicas\?\)"),
    ({"params": {"hpa": {"choices": [{"name": "a", "set": {"autoscaler.minReplicass": 2}}]}}},
     r"space.params.hpa: bundle 'a': autoscaler.minReplicass is not a known setting \(did you mean minReplicas\?\)"),
    ({"params": {}, "stresses": {"crash": {"faults.crash.0.at_s": 3}}},
     r"space.stresses.crash: faults.crash is not a known setting \(did you mean crashes\?\)"),
])
def test_space_errors_name_the_field(space: dict[str, Any], words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        parse_space(space)


def test_a_stress_that_does_not_apply_is_an_error() -> None:
    with pytest.raises(SettingsError, match="stress 'bad'"):
        tune(small(), {"params": {"pods.replicas": {"low": 1, "high": 2}},
                       "stresses": {"bad": {"pods.replicas": -1}}}, budget=1, executor="serial", cache=False,
             progress=False)


def _space_naming_small(tmp_path: Path, budget: int) -> Path:
    """A space file that names the small scenario, written beside it; one seed, ``budget`` settings."""
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small().model_dump(mode="json", by_alias=True)))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"scenario": "small.yaml", "seeds": 1, "budget": budget,
                                                         **SPACE}))
    return tmp_path / "space.yaml"


def _tune_cli(space: Path, out: Path, *more: str) -> Any:
    return CliRunner().invoke(app, ["tune", "--space", str(space), "--out", str(out), "--workers", "1",
                                    "--no-cache", "--stress", "steady", *more])


def test_capsim_tune_writes_its_files_from_a_space_that_names_the_scenario(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = _tune_cli(_space_naming_small(tmp_path, 3), out)
    assert run.exit_code == 0, run.output
    assert "3 settings:" in run.output and "wrote" in run.output
    for name in ("trials.csv", "front.csv", "front.png", "provenance.json"):
        assert (out / name).exists()
    prov = yaml.safe_load((out / "provenance.json").read_text())
    assert list(prov["stresses"]) == ["steady"] and prov["seeds"] == [0] and prov["budget"] == 3


def test_capsim_tune_sets_change_the_base_scenario(tmp_path: Path) -> None:
    space, out = _space_naming_small(tmp_path, 2), tmp_path / "out"
    run = _tune_cli(space, out, "--set", "slo.ttft_p99_s=7.5")
    assert run.exit_code == 0, run.output
    assert yaml.safe_load((out / "best.yaml").read_text())["slo"]["ttft_p99_s"] == 7.5
    bad = CliRunner().invoke(app, ["tune", "--space", str(space), "--out", str(tmp_path / "o2"),
                                   "--set", "slo.ttft=1"])
    assert bad.exit_code == 2 and "did you mean ttft_p99_s?" in bad.output

"""Sweeps: tidy rows, common random numbers, identical frames on every executor, errors as rows, the cache."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim import simulate
from capsim.studies.runs import SUMMARY_FIELDS, run_key
from capsim.studies.sweep import aggregate, expand_grid, load_grid, sweep

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "data" / "profiles" / "cpu-tiny-float32.csv"


def small(horizon_s: float = 20.0, **extra: Any) -> Scenario:
    """A one-pod Poisson scenario on the measured profile: a fraction of a second to simulate."""
    data: dict[str, Any] = {
        "horizon_s": horizon_s, "warmup_s": 2.0,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 30},
                     "prompt_tokens": {"kind": "lognormal", "mean": 128, "sigma": 0.5, "max": 512},
                     "output_tokens": {"kind": "lognormal", "mean": 16, "sigma": 0.5, "max": 64}},
        "service": {"kind": "profile", "profile": str(PROFILE)},
        "batching": {"max_batch_size": 8, "max_wait_ms": 5},
        "pods": {"replicas": 1, "gpu_cost_per_hour": 2.5},
        "slo": {"ttft_p99_s": 1.0},
    }
    data.update(extra)
    return Scenario.model_validate(data)


GRID = {"batching.max_batch_size": [1, 16],
        "tier": [{"name": "one", "set": {"pods.replicas": 1}},
                 {"name": "two", "set": {"pods.replicas": 2, "router.kind": "round_robin"}}]}


def test_grid_expands_to_the_cartesian_product_with_bundles_by_name() -> None:
    settings = expand_grid(GRID)
    assert [s.values for s in settings] == [
        {"batching.max_batch_size": 1, "tier": "one"}, {"batching.max_batch_size": 1, "tier": "two"},
        {"batching.max_batch_size": 16, "tier": "one"}, {"batching.max_batch_size": 16, "tier": "two"}]
    assert settings[3].changes == {"batching.max_batch_size": 16, "pods.replicas": 2, "router.kind": "round_robin"}
    with pytest.raises(SettingsError, match=r"grid.pods.replicas must be a non-empty list"):
        expand_grid({"pods.replicas": []})


def test_one_tidy_row_per_setting_and_seed() -> None:
    frame = sweep(small(), GRID, [3, 5], executor="serial", progress=False, cache=False)
    assert len(frame) == 4 * 2
    assert list(frame.columns[:4]) == ["setting", "batching.max_batch_size", "tier", "seed"]
    assert set(SUMMARY_FIELDS) <= set(frame.columns)
    assert frame["seed"].tolist() == [3, 5] * 4
    assert frame["error"].isna().all()
    # the settings took effect: two pods cost twice as much as one for the same horizon
    cost = frame.groupby("tier")["cost"].mean()
    assert cost["two"] == pytest.approx(2 * cost["one"])
    assert frame.attrs["runs"] == {"computed": 8, "cached": 0, "failed": 0}
    assert frame.attrs["provenance"]["seeds"] == [3, 5]
    assert frame.attrs["provenance"]["profile_sha256"]


def test_common_random_numbers_same_seed_same_arrivals_under_every_setting() -> None:
    base = small()
    a, b = (base.override(s.changes) for s in expand_grid({"batching.max_batch_size": [1, 16]}))
    ra, rb = simulate(a, seed=7), simulate(b, seed=7)
    cols = ["request_id", "arrival_s", "prompt_tokens", "output_tokens"]
    pd.testing.assert_frame_equal(ra.requests[cols], rb.requests[cols])
    # ... and the settings really differ in what happened to those requests
    assert not np.allclose(ra.requests["start_s"], rb.requests["start_s"], equal_nan=True)
    frame = sweep(base, {"batching.max_batch_size": [1, 16]}, [7], executor="serial", progress=False, cache=False)
    assert frame["arrived"].nunique() == 1
    assert frame["mean_batch_size"].iloc[0] == 1.0 < frame["mean_batch_size"].iloc[1]


@pytest.mark.slow
def test_serial_process_pool_and_dask_give_identical_frames() -> None:
    sc = small(horizon_s=10.0)
    grid = {"batching.max_batch_size": [1, 8], "batching.max_wait_ms": [0, 20]}
    serial = sweep(sc, grid, 2, executor="serial", progress=False, cache=False)
    pool = sweep(sc, grid, 2, executor="processes:2", progress=False, cache=False)
    dask = sweep(sc, grid, 2, executor="local:2", progress=False, cache=False)
    pd.testing.assert_frame_equal(serial, pool)
    pd.testing.assert_frame_equal(serial, dask)


def test_a_bad_setting_and_a_failing_run_become_rows(tmp_path: Path) -> None:
    broken = tmp_path / "broken.csv"
    broken.write_text("not,a,profile\n1,2,3\n")
    grid = {"pods.replicas": [1, 0], "service.profile": [str(PROFILE), str(broken)]}
    frame = sweep(small(), grid, 1, executor="serial", progress=False, cache=False)
    errors = dict(zip(zip(frame["pods.replicas"], frame["service.profile"], strict=True), frame["error"],
                      strict=True))
    assert pd.isna(errors[(1, str(PROFILE))])
    assert "pods.replicas must be >= 1" in errors[(0, str(PROFILE))]
    assert errors[(1, str(broken))].startswith(("ProfileError", "SettingsError", "ValueError", "KeyError"))
    assert frame.loc[frame["pods.replicas"] == 0, "ttft_p99_s"].isna().all()
    # failed: the run that raised and the two settings that did not validate (their runs never started)
    assert frame.attrs["runs"] == {"computed": 2, "cached": 0, "failed": 3}


def test_a_deprecated_key_a_section_still_takes_is_a_known_path() -> None:
    # faults.restart_s loads with a warning and no effect; a grid naming it is not a typo
    assert expand_grid({"faults.restart_s": [10, 20]})[1].changes == {"faults.restart_s": 20}


@pytest.mark.parametrize(("grid", "message"), [
    ({"batching.max_batch_szie": [8, 16]},
     r"grid.batching.max_batch_szie: batching.max_batch_szie is not a known setting \(did you mean max_batch_size\?\)"),
    ({"pods.replicas": [1], "hpa": [{"name": "floor-2", "set": {"hpa.minReplicas": 2}}]},
     r"grid.hpa: bundle 'floor-2': hpa is not a known setting \(did you mean autoscaler\?\)"),
])
def test_a_grid_path_that_names_no_setting_is_refused_before_any_run(grid: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        sweep(small(), grid, 3, executor="serial", progress=False, cache=False)


def test_cache_reuses_unchanged_runs_and_sees_a_changed_profile(tmp_path: Path) -> None:
    profile = tmp_path / "profile.csv"
    shutil.copy(PROFILE, profile)
    sc = small(service={"kind": "profile", "profile": str(profile)})
    cache = tmp_path / "cache"
    first = sweep(sc, {"batching.max_batch_size": [1, 8]}, 2, executor="serial", progress=False, cache=cache)
    assert first.attrs["runs"] == {"computed": 4, "cached": 0, "failed": 0}
    again = sweep(sc, {"batching.max_batch_size": [1, 8, 16]}, 2, executor="serial", progress=False, cache=cache)
    assert again.attrs["runs"] == {"computed": 2, "cached": 4, "failed": 0}
    pd.testing.assert_frame_equal(first, again.iloc[:4].reset_index(drop=True), check_like=False)
    # a moved profile with the same bytes keeps the keys; edited bytes change them
    moved = tmp_path / "moved.csv"
    shutil.copy(profile, moved)
    assert run_key(sc, 0) == run_key(sc.override({"service.profile": str(moved)}), 0)
    with profile.open("a") as fh:
        fh.write("\n")
    assert run_key(sc, 0) != first["key"].iloc[0]


def test_aggregate_student_t_interval() -> None:
    frame = pd.DataFrame({
        "setting": [0, 0, 0, 1, 1, 1], "x": ["a", "a", "a", "b", "b", "b"], "seed": [0, 1, 2] * 2,
        **{f: [0.0] * 6 for f in SUMMARY_FIELDS},
        "error": [None] * 5 + ["boom"],
    })
    frame["ttft_p99_s"] = [1.0, 2.0, 3.0, 1.0, 1.0, np.nan]
    frame["slo_met"] = True
    agg = aggregate(frame, metrics=["ttft_p99_s"])
    a = agg.iloc[0]
    assert a["x"] == "a" and a["n"] == 3 and a["errors"] == 0 and bool(a["slo_met_all"])
    assert a["ttft_p99_s_mean"] == pytest.approx(2.0)
    assert a["ttft_p99_s_std"] == pytest.approx(1.0)
    # t(0.975, 2 dof) = 4.3027 (any t table): half-width 4.3027 * 1 / sqrt(3)
    assert a["ttft_p99_s_ci_high"] - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    b = agg.iloc[1]
    assert b["n"] == 2 and b["errors"] == 1 and not bool(b["slo_met_all"])


def test_grid_file_loads(tmp_path: Path) -> None:
    grid = load_grid(ROOT / "data" / "studies" / "batching_grid.yaml")
    assert len(expand_grid(grid)) == 12
    bad = tmp_path / "g.yaml"
    bad.write_text("batching.max_batch_size: 8\n")
    with pytest.raises(SettingsError, match=r"g.yaml: grid.batching.max_batch_size must be a non-empty list"):
        load_grid(bad)


def test_capsim_sweep_writes_runs_settings_and_provenance(tmp_path: Path) -> None:
    import json

    import yaml
    from typer.testing import CliRunner

    from capsim.cli import app

    scenario = tmp_path / "small.yaml"
    scenario.write_text(yaml.safe_dump(small(horizon_s=10.0).model_dump(mode="json", by_alias=True)))
    grid = tmp_path / "grid.yaml"
    grid.write_text("grid:\n  batching.max_batch_size: [1, 8]\n")
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["sweep", str(scenario), "--grid", str(grid), "--seeds", "2", "--out", str(out),
                                   "--workers", "1", "--no-cache"])
    assert run.exit_code == 0, run.output
    runs = pd.read_csv(out / "runs.csv")
    settings = pd.read_csv(out / "settings.csv")
    assert len(runs) == 4 and len(settings) == 2
    assert settings["n"].tolist() == [2, 2]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seeds"] == [0, 1] and prov["runs"]["computed"] == 4
    assert "4 runs: 4 computed, 0 from the cache, 0 failed" in run.output

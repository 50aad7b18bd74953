"""scripts/study_runs.py: it finds every documented study sweep in the grids' headers, runs one, and tells which
runs two folders differ in."""

from __future__ import annotations

import csv
import importlib.util
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("study_runs", ROOT / "scripts" / "study_runs.py")
assert _spec is not None and _spec.loader is not None
study_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study_runs)


def test_every_sweep_command_in_a_grid_header_is_found_with_its_arguments() -> None:
    found = study_runs.sweeps()
    # each grid whose header runs a shipped scenario, under the command's own scenario
    headed = {p.stem for p in (ROOT / "data" / "studies").glob("*_grid.yaml")
              if "capsim sweep data/scenarios/" in p.read_text()}
    assert {name.split("--")[0] for name in found} == headed
    assert "batching_grid--SCENARIO" not in found  # a grid for any scenario: no file to run
    assert found["canary_grid--rollout_rush"] == ["data/scenarios/rollout_rush.yaml", "--grid",
                                                  "data/studies/canary_grid.yaml", "--seeds", "5"]  # --out left out
    # a command over three lines, one break inside a quoted value: the value whole, read as capsim reads it
    rush = found["startup_probe_grid--h100_llama3_8b_rush"]
    metrics = [w for w in rush if w.startswith("autoscaler.metrics=")]
    assert len(metrics) == 1 and rush[rush.index(metrics[0]) - 1] == "--set"
    (trigger,) = yaml.safe_load(metrics[0].split("=", 1)[1])
    assert trigger["external"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    for args in found.values():
        assert (ROOT / args[0]).is_file() and (ROOT / args[args.index("--grid") + 1]).is_file()


def test_a_sweep_runs_and_a_changed_run_is_listed(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    before = tmp_path / "before"
    study_runs.run_all(before, "startup_probe_grid--scale_to_zero")
    assert "startup_probe_grid--scale_to_zero: ok" in capsys.readouterr().out
    runs = before / "startup_probe_grid--scale_to_zero" / "runs.csv"
    with runs.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15 and {r["pods.startup_probe.period_s"] for r in rows} == {"10", "5", "2"}
    after = tmp_path / "after"
    shutil.copytree(before, after)
    assert study_runs.compare(before, after) == 0
    rows[4]["cost"] = "1.0"
    with (after / "startup_probe_grid--scale_to_zero" / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert study_runs.compare(before, after) == 1
    out = capsys.readouterr().out
    assert f"setting {rows[4]['setting']} seed {rows[4]['seed']}: cost " in out and "-> 1.0" in out
    assert "1 of 15 runs changed" in out

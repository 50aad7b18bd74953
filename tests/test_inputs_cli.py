"""Every capsim command turns a bad input into one line naming the file, field or line, and exit code 2."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capsim.cli import app

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "data" / "profiles" / "cpu-tiny-float32.csv"
TRACE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def run(args: Sequence[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def one_line_error(args: Sequence[str], *needles: str) -> str:
    """Run a command that must fail: exit 2, no traceback, exactly one stderr line holding every needle."""
    code, out, err = run(args)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def scenario(tmp_path: Path, service: str | None = None, workload: str | None = None, extra: str = "") -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(
        "horizon_s: 60\n"
        f"workload: {workload or '{arrivals: {kind: poisson, rate_per_s: 5}}'}\n"
        f"service: {service or '{kind: exponential, mean_s: 0.05}'}\n" + extra
    )
    return path


def trace_scenario(tmp_path: Path, trace: Path) -> Path:
    return scenario(tmp_path, workload=f"{{arrivals: {{kind: trace, path: {trace}}}}}")


# ---- the reproductions of issue 12 §5, one per bad input --------------------------------------------
def test_missing_profile_names_the_file(tmp_path: Path) -> None:
    s = scenario(tmp_path, service="{kind: profile, profile: missing.csv}")
    one_line_error(["simulate", str(s)], "profile file not found", "missing.csv")
    assert "capsim ships" not in one_line_error(["simulate", str(s)], "missing.csv")


def test_a_shipped_file_named_without_its_folder_is_pointed_to(tmp_path: Path) -> None:
    # a bare name is looked up by the scenario's folder and up, then the repository root, not data/'s subfolders
    s = scenario(tmp_path, service="{kind: profile, profile: cpu-tiny-float32.csv}")
    hint = "profile file not found: {} (capsim ships data/profiles/cpu-tiny-float32.csv: name it by that path)"
    one_line_error(["simulate", str(s)], hint.format(tmp_path / "cpu-tiny-float32.csv"))
    code, out, _ = run(["check", str(s)])  # the check reports it as a failed check
    assert code == 1 and "FAIL service.profile: " + hint.format(tmp_path / "cpu-tiny-float32.csv") in out, out


def test_a_shipped_scenario_or_grid_named_from_elsewhere_is_pointed_to(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # a path on the command line resolves against the working directory alone: the hint names the absolute path
    monkeypatch.chdir(tmp_path)
    rush = ROOT / "data" / "scenarios" / "friday_rush.yaml"
    one_line_error(["simulate", "friday_rush.yaml"], f"scenario file not found: friday_rush.yaml (capsim ships {rush}: "
                   "name it by that path)")
    one_line_error(["check", "data/scenarios/friday_rsh.yaml"], f"(did you mean {rush}?)")
    one_line_error(["sweep", str(rush), "--grid", "batching_grid.yaml", "--out", "x"],
                   f"grid file not found: batching_grid.yaml (capsim ships {ROOT / 'data' / 'studies' / 'batching_grid.yaml'}")
    assert "(" not in one_line_error(["simulate", "nothing_like_any.yaml"], "scenario file not found")


def test_malformed_profile_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    text = PROFILE.read_text().splitlines()
    bad.write_text("\n".join([*text[:3], "prefill,1,64,5,not-a-number,1,1,1,0", *text[4:]]) + "\n")
    s = scenario(tmp_path, service=f"{{kind: profile, profile: {bad}}}")
    one_line_error(["simulate", str(s)], "bad.csv", "line 4", "mean_ms")


def test_trace_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "trace.csv").mkdir()
    one_line_error(["simulate", str(trace_scenario(tmp_path, tmp_path / "trace.csv"))], "is a directory", "trace.csv")


def test_trace_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_bytes(TRACE_HEADER.encode() + b"2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:47,\xff\xfe,44\n")
    one_line_error(["simulate", str(trace_scenario(tmp_path, trace))], "t.csv", "line 3", "UTF-8")


def test_token_counts_past_int32(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text(TRACE_HEADER + "2023-11-16 18:15:46,374,44\n2023-11-16 18:15:47,3000000000,44\n")
    one_line_error(["simulate", str(trace_scenario(tmp_path, trace))], "t.csv", "line 3", "2147483647")


def test_mixed_time_zones_in_a_trace(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text(TRACE_HEADER + "2023-11-16 18:15:46,374,44\n2023-11-16 18:15:47+00:00,30,44\n")
    one_line_error(["simulate", str(trace_scenario(tmp_path, trace))], "t.csv", "line 3", "time zone")


def test_negative_seed(tmp_path: Path) -> None:
    one_line_error(["simulate", str(scenario(tmp_path)), "--seed", "-1"], "--seed")


def test_out_that_is_a_file_is_refused_before_the_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("keep me")
    code, stdout, err = run(["simulate", str(scenario(tmp_path)), "--out", str(out)])
    assert code == 2 and "--out" in err and "is a file" in err
    assert stdout == "" and out.read_text() == "keep me"  # refused before simulating (no summary printed)


def test_out_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    one_line_error(["simulate", str(scenario(tmp_path)), "--out", str(tmp_path / "f" / "out")], "--out", "is a file")


def test_scenario_problems_are_one_line(tmp_path: Path) -> None:
    s = tmp_path / "dup.yaml"
    s.write_text("horizon_s: 60\nhorizon_s: 30\n")
    one_line_error(["simulate", str(s)], "dup.yaml", "line 2", "horizon_s", "twice")
    one_line_error(["simulate", str(tmp_path)], "is a directory")
    s.write_bytes(b"horizon_s: 60\n\xff\n")
    one_line_error(["simulate", str(s)], "dup.yaml", "UTF-8")


def test_a_profile_that_does_not_cover_the_scenario_is_refused_before_the_run(tmp_path: Path) -> None:
    s = scenario(tmp_path, service=f"{{kind: profile, profile: {PROFILE}}}", extra="batching: {max_batch_size: 64}\n")
    one_line_error(["simulate", str(s)], "does not cover", "batch sizes 1..64", "service.extrapolate")


def test_every_command_shares_the_error_policy(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    for command in (["simulate", missing], ["check", missing], ["loadgen", missing],
                    ["export", missing, "--out", str(tmp_path / "x")]):
        one_line_error(command, "missing.yaml", f"capsim {command[0]}: error:")


def test_a_good_run_still_works_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = ROOT / "data" / "scenarios" / "steady_poisson.yaml"
    short = tmp_path / "short.yaml"
    # the profile is named as shipped data (data/profiles/...): it resolves against capsim, not the cwd
    short.write_text(shipped.read_text().replace("horizon_s: 3600", "horizon_s: 30").replace("warmup_s: 300", "warmup_s: 5"))
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["simulate", "short.yaml", "--out", "out"])
    assert code == 0, err
    assert "requests" in out and (tmp_path / "out" / "summary.json").exists()
    assert str(PROFILE) in (tmp_path / "out" / "summary.json").read_text()


# ---- profile and validate: nothing overwritten by surprise, arguments checked first -----------------
def test_profile_sweep_option_that_parses_to_nothing() -> None:
    one_line_error(["profile", "--prompt-tokens", ","], "--prompt-tokens", "no lengths")
    one_line_error(["profile", "--context-tokens", "16,x"], "--context-tokens", "'x'")
    one_line_error(["profile", "--prompt-tokens", "0,16"], "--prompt-tokens", ">= 1")


def test_profile_keeps_an_existing_profile_unless_forced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    kept = tmp_path / "data" / "profiles" / "cpu-tiny-float32-quick.csv"
    kept.parent.mkdir(parents=True)
    shutil.copy(PROFILE, kept)
    before = kept.read_bytes()
    started = time.perf_counter()
    one_line_error(["profile", "--quick", "--device", "cpu"], str(Path("data/profiles/cpu-tiny-float32-quick.csv")),
                   "--force", "--out-dir")
    assert kept.read_bytes() == before
    assert time.perf_counter() - started < 20  # refused before the sweep (which takes ~20 s here)


def test_validate_checks_its_arguments_before_profiling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "data" / "validation" / "results.csv"
    results.parent.mkdir(parents=True)
    results.write_text("committed")
    one_line_error(["validate", "--quick"], "results.csv", "--force")
    assert results.read_text() == "committed"
    (tmp_path / "file").write_text("")
    one_line_error(["validate", "--quick", "--out-dir", str(tmp_path / "file")], "--out-dir", "is a file")
    one_line_error(["validate", "--requests-per-level", "0", "--out-dir", str(tmp_path / "v")], "--requests-per-level")
    one_line_error(["validate", "--prompt-tokens", "3000", "--out-dir", str(tmp_path / "v")],
                   "--prompt-tokens must be <= 2048 (the validated pod's limit), got 3000")
    one_line_error(["validate", "--prompt-tokens", "2048", "--output-tokens", "512", "--out-dir", str(tmp_path / "v")],
                   "--prompt-tokens + --output-tokens must be <= 2047", "got 2560")
    assert not (tmp_path / "v").exists()
    # simulating a validation's kept runs again takes their folder and an output folder only
    one_line_error(["validate", "--from-runs", str(tmp_path / "v"), "--quick"], "--from-runs", "not --quick")
    one_line_error(["validate", "--from-runs", str(tmp_path / "v"), "--mode", "continuous"], "--from-runs")
    one_line_error(["validate", "--from-runs", str(tmp_path), "--out-dir", str(tmp_path)], "--out-dir must differ")
    one_line_error(["validate", "--from-runs", str(tmp_path / "v"), "--out-dir", str(tmp_path / "w")],
                   "provenance.json", "cannot read")
    assert not (tmp_path / "w").exists()


def test_simulate_says_when_a_scheduled_crash_found_no_pod(tmp_path: Path) -> None:
    hpa = ("autoscaler: {minReplicas: 1, maxReplicas: 4, metrics: [{type: Pods, pods: {metric: {name: "
           "capsim_queue_depth}, target: {type: AverageValue, averageValue: '100'}}}]}\n")
    s = scenario(tmp_path, extra=hpa + "faults: {crashes: [{at_s: 5, pod: 3}]}\n")
    code, out, err = run(["simulate", str(s)])
    assert code == 0, err
    assert "note: the crash scheduled at 5 s found no pod to crash: pod 3 not created (yet)" in out


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    # `capsim simulate ... | head`: the pipe closes while capsim still writes; a shell tool stops with 141
    # and says nothing, where capsim printed "capsim simulate: error: Broken pipe"
    import subprocess
    import sys

    capsim = Path(sys.executable).parent / "capsim"
    proc = subprocess.Popen([str(capsim), "simulate", str(scenario(tmp_path))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()  # nobody reads: the command's first write finds the pipe closed
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err
    assert err.decode().strip() == ""


def test_a_bad_ejection_setting_of_the_router_names_its_option() -> None:
    """``capsim router``'s outlier-ejection options are the scenario's ``router.outlier_ejection``: a value it
    refuses names the option, before anything serves."""
    pod = ["router", "--pod", "http://127.0.0.1:9", "--policy", "least_outstanding"]
    one_line_error([*pod, "--max-ejection-percent", "150"], "--max-ejection-percent", "must be <= 100")
    one_line_error([*pod, "--consecutive-failures", "0"], "--consecutive-failures", "must be >= 1")
    one_line_error([*pod, "--max-ejection-s", "-1"], "--max-ejection-s", "must be >= 0")
    one_line_error([*pod, "--ejection-interval-s", "0"], "--ejection-interval-s", "must be > 0")
    one_line_error([*pod, "--max-ejection-time-jitter-s", "-1"], "--max-ejection-time-jitter-s", "must be >= 0")

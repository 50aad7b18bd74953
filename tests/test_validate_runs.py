"""A validation's kept real runs: written and read back exactly, bad files named, and simulated again."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from capsim.model.request import requests_frame
from capsim.studies.validate_runs import (
    RUNS_DIR,
    KeptRunsError,
    RealRun,
    calibration_fields,
    load_runs,
    run_caveats,
    save_run,
    spec_fields,
    ttft_from,
)


def frame(n: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    arrival = np.sort(rng.random(n)) * 10
    cols = {"request_id": np.arange(n), "session_id": np.arange(n), "pod": np.zeros(n, dtype=np.int32),
            "arrival_s": arrival, "start_s": arrival + 0.1, "first_token_s": arrival + 1 / 3,
            "end_s": arrival + 0.7, "batch_size": np.full(n, 4), "prompt_tokens": np.full(n, 64),
            "output_tokens": np.full(n, 128), "attempts": np.ones(n, dtype=np.int32),
            "outcome": ["ok"] * (n - 1) + ["timed_out"]}
    df = requests_frame(cols)
    df.loc[n - 1, ["start_s", "first_token_s"]] = np.nan  # a request that never started
    df.attrs.update({"t0_monotonic": 12345.678901234, "send_error_s": [0.001, 1e-7, 0.25],
                     "token_span_s": [0.5, float("nan")], "failures": {"timed_out": 1}})
    return df


def test_a_kept_run_reads_back_exactly_its_frame_its_clock_and_its_trace(tmp_path: Path) -> None:
    trace = [[100.0, 100.2, 2, [99.9, 100.05], 100.01, 100.19], [100.2, 100.4, 1, [100.1], 0.0, 0.0]]
    runs = [RealRun(0.85, 1, 1, 31.835747276849144, frame(), trace), RealRun(0.3, 0, 0, 11.2, frame(3), [])]
    for run in runs:
        save_run(tmp_path, run)
    back = load_runs(tmp_path)
    assert [(r.level, r.replication) for r in back] == [(0.3, 0), (0.85, 1)]  # by level, then replication
    got, want = back[1], runs[0]
    pd.testing.assert_frame_equal(got.requests, want.requests)  # every float to the last bit, and the dtypes
    assert got.requests.outcome.dtype == want.requests.outcome.dtype
    assert got.seed == 1 and got.rate_per_s == want.rate_per_s and got.trace == trace
    assert got.requests.attrs["t0_monotonic"] == want.requests.attrs["t0_monotonic"]
    assert got.requests.attrs["send_error_s"] == want.requests.attrs["send_error_s"]
    assert got.requests.attrs["failures"] == {"timed_out": 1}
    assert math.isnan(got.requests.attrs["token_span_s"][1])


def test_unreadable_kept_runs_name_the_file_and_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(KeptRunsError, match=f"{tmp_path / RUNS_DIR}: no kept runs"):
        load_runs(tmp_path)
    save_run(tmp_path, RealRun(0.6, 0, 0, 20.0, frame(), []))
    meta = tmp_path / RUNS_DIR / "0.6-0.json"
    good = meta.read_text()
    meta.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "seed"}))
    with pytest.raises(KeptRunsError, match=r"0\.6-0\.json: not a kept run \(KeyError: 'seed'\)"):
        load_runs(tmp_path)
    meta.write_text(good)
    csv = tmp_path / RUNS_DIR / "0.6-0.csv"
    csv.write_text(pd.read_csv(csv).drop(columns=["end_s"]).to_csv(index=False))
    with pytest.raises(KeptRunsError, match=r"0\.6-0\.csv: lacks the request columns end_s"):
        load_runs(tmp_path)


def test_the_spec_and_calibration_come_back_from_the_provenance_as_they_were() -> None:
    from dataclasses import asdict

    from capsim.studies.validate import Calibration, ValidationSpec

    spec = ValidationSpec(levels=(0.3, 0.85), requests_per_level=300)
    cal = Calibration(1.1, 0.002, ((1.0, 0.05, 0.06), (4.0, 0.07, 0.08)), (0.001, -0.001), ("poor fit",),
                      (0.9, 1.0, 1.1), 0.003, 0.004)
    prov = json.loads(json.dumps({"spec": {**asdict(spec), "batching": spec.batching.model_dump()},
                                  "calibration": asdict(cal)}))
    assert ValidationSpec(**spec_fields(prov["spec"])) == spec
    assert Calibration(**calibration_fields(prov["calibration"])) == cal


def test_the_real_ttft_counts_from_the_send_only_when_every_answer_is_on_the_pods_clock() -> None:
    def run(rows: int | None) -> RealRun:
        df = frame()  # 4 answered, 1 timed out
        if rows is not None:
            df.attrs.update({"pod_clock_rows": rows, "pod_clock_rejected": 0})
        return RealRun(0.3, 0, 0, 10.0, df, [])

    assert ttft_from([run(4), run(4)]) == "send"
    assert ttft_from([run(4), run(3)]) == "the pod's receipt"  # one answer left on the pod's receipt
    assert ttft_from([run(None)]) == "the pod's receipt"  # kept before the pod's clock was used


def test_the_pod_clocks_counts_are_kept(tmp_path: Path) -> None:
    df = frame()
    df.attrs.update({"pod_clock_rows": 4, "pod_clock_rejected": 1})
    save_run(tmp_path, RealRun(0.3, 0, 0, 10.0, df, []))
    attrs = load_runs(tmp_path)[0].requests.attrs
    assert (attrs["pod_clock_rows"], attrs["pod_clock_rejected"]) == (4, 1)


def test_the_generators_own_cpu_is_kept_and_its_caveats_are_warned_and_named(tmp_path: Path) -> None:
    df = frame()
    df.attrs.update({"pod_clock_rows": 2, "pod_clock_rejected": 0, "generator_cpu_s": 0.02,
                     "generator_busy": [0.4, 0.95, 0.3]})
    save_run(tmp_path, RealRun(0.6, 0, 7, 10.0, df, []))
    back = load_runs(tmp_path)[0].requests
    assert back.attrs["generator_busy"] == [0.4, 0.95, 0.3] and back.attrs["generator_cpu_s"] == 0.02
    said: list[str] = []
    off, busy = run_caveats(back, "60%, seed 7", said.append)
    assert off is not None and "2 of 4 answers not on this host's clock" in off
    assert busy is not None and busy.startswith("60%, seed 7: the load generator used 90% of a core or more in 1 of 3")
    assert said == [f"  WARNING: {off}", f"  WARNING: {busy.removeprefix('60%, seed 7: ')}"]
    # a run that did not ask for the pod's clock is not warned about it; a calm generator is not named
    df.attrs.update({"generator_busy": [0.4, 0.5]})
    said.clear()
    assert run_caveats(df, "x", said.append, pod_clock=False) == (None, None) and said == []

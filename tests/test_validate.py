"""The validation study's pure parts (fit, capacity, summaries), and a short real run end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from capsim.model.profile import ServiceTimeProfile
from capsim.model.request import requests_frame
from capsim.model.settings import BatchSettings
from capsim.studies.validate import (
    METRICS,
    Calibration,
    ValidationSpec,
    capacity_per_s,
    fit_cycle,
    level_scenario,
    run_validation,
    sim_batches,
    summarize_frame,
    worst_errors,
)

PROFILE = Path(__file__).resolve().parents[1] / "data" / "profiles" / "cpu-tiny-float32.csv"


def test_fit_recovers_scale_and_overhead():
    scale, overhead = 1.2, 0.002
    points = [(b, t, scale * t + b * overhead) for b, t in ((2.0, 0.05), (16.0, 0.12))]
    cal = fit_cycle(points)
    assert cal.time_scale == pytest.approx(scale)
    assert cal.overhead_s == pytest.approx(overhead)


def test_fit_falls_back_to_a_pure_scale_when_noise_makes_overhead_negative():
    cal = fit_cycle([(2.0, 0.05, 0.065), (16.0, 0.12, 0.13)])
    assert cal.overhead_s == 0.0
    assert cal.time_scale == pytest.approx((0.065 / 0.05 + 0.13 / 0.12) / 2)


def test_capacity_shrinks_with_calibration():
    prof = ServiceTimeProfile.from_csv(PROFILE)
    b = BatchSettings(max_batch_size=16)
    raw = capacity_per_s(prof, b, 64, 128)
    slower = capacity_per_s(prof, b, 64, 128, Calibration(1.2, 0.002, ()))
    assert slower < raw
    # at the best batch size (16 here, since batching pays), capacity is 16 / cycle(16)
    cycle16 = 1.2 * prof.batch_timing(16, 64, 128).total_s + 16 * 0.002
    assert slower == pytest.approx(16 / cycle16)


def test_level_scenario_carries_the_calibration_and_the_pod_settings():
    spec = ValidationSpec(requests_per_level=100)
    sc = level_scenario(spec, PROFILE, rate=50.0, calibration=Calibration(1.3, 0.001, ()))
    assert sc.horizon_s == pytest.approx(2.0)
    assert sc.service.time_scale == 1.3 and sc.service.request_overhead_ms == pytest.approx(1.0)
    assert sc.batching == spec.batching and sc.pods.replicas == 1


def frame(rows):
    cols = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    return requests_frame(cols)


def test_summaries_use_the_window_and_successes_only():
    base = {"session_id": 0, "pod": 0, "prompt_tokens": 4, "output_tokens": 4, "attempts": 1}
    rows = [
        {**base, "request_id": 0, "arrival_s": 0.5, "start_s": 0.6, "first_token_s": 0.7, "end_s": 0.9,
         "batch_size": 1, "outcome": "ok"},  # before the window
        {**base, "request_id": 1, "arrival_s": 1.0, "start_s": 1.1, "first_token_s": 1.2, "end_s": 1.5,
         "batch_size": 2, "outcome": "ok"},
        {**base, "request_id": 2, "arrival_s": 1.0, "start_s": 1.1, "first_token_s": 1.3, "end_s": 1.5,
         "batch_size": 2, "outcome": "ok"},
        {**base, "request_id": 3, "arrival_s": 1.5, "start_s": np.nan, "first_token_s": np.nan,
         "end_s": 1.6, "batch_size": 0, "outcome": "rejected"},
    ]
    df = frame(rows)
    out = summarize_frame(df, warmup_s=1.0, end_s=3.0)
    assert out["requests"] == 3 and out["ok"] == 2
    assert out["ttft_p50_s"] == pytest.approx(0.25)
    assert out["e2e_p50_s"] == pytest.approx(0.5)
    assert out["throughput_per_s"] == pytest.approx(1.0)
    assert out["mean_batch_size"] == 2
    size, seconds = sim_batches(df)
    assert size == pytest.approx(1.5) and seconds == pytest.approx((0.3 + 0.4) / 2)


def test_worst_errors():
    results = pd.DataFrame({"metric": ["a", "a", "b"], "rel_error": [0.1, -0.3, 0.05]})
    assert worst_errors(results, ["a", "b"]) == {"a": pytest.approx(0.3), "b": pytest.approx(0.05)}


@pytest.mark.slow
def test_quick_validation_runs_end_to_end(tmp_path):
    spec = ValidationSpec(levels=(0.4,), requests_per_level=150, calibration_s=1.5)
    lines: list[str] = []
    results = run_validation(spec, out_dir=tmp_path, echo=lines.append)
    assert set(results.metric) == set(METRICS)
    assert all(math.isfinite(v) for v in results.real) and all(math.isfinite(v) for v in results.sim)
    # throughput is set by the offered load in both worlds: they must agree closely
    thr = results[results.metric == "throughput_per_s"].iloc[0]
    assert abs(thr.rel_error) < 0.15
    for name in ("results.csv", "validation.png", "provenance.json", "profile.csv"):
        assert (tmp_path / name).exists()
    assert any(line.startswith("calibration:") for line in lines)

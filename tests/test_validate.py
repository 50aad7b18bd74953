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
from capsim.sim.simulate import simulate
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
from capsim.studies.validate_calibrate import CalibrationError, CalibrationWarning, cycle_noise, cycle_points

PROFILE = Path(__file__).resolve().parents[1] / "data" / "profiles" / "cpu-tiny-float32.csv"


SIZES = (1.0, 2.0, 4.0, 8.0, 16.0)


def profile_points(scale, overhead, noise=(0.0,) * 5):
    return [(b, t, scale * t + b * overhead + e) for (b, t), e in zip(
        ((1.0, 0.050), (2.0, 0.054), (4.0, 0.067), (8.0, 0.090), (16.0, 0.128)), noise, strict=True)]


def test_fit_recovers_scale_and_overhead_exactly_over_five_sizes():
    cal = fit_cycle(profile_points(1.2, 0.002))
    assert cal.time_scale == pytest.approx(1.2)
    assert cal.overhead_s == pytest.approx(0.002)
    assert max(abs(r) for r in cal.residuals_s) < 1e-9 and cal.warnings == ()


def test_fit_is_least_squares_through_noisy_points():
    noise = (0.001, -0.002, 0.0015, -0.001, 0.0005)
    cal = fit_cycle(profile_points(1.3, 0.0015, noise))
    a = np.array([[t, b] for b, t, _ in cal.points])
    y = np.array([w for _, _, w in cal.points])
    expected, *_ = np.linalg.lstsq(a, y, rcond=None)
    assert (cal.time_scale, cal.overhead_s) == pytest.approx(tuple(expected))
    assert sum(cal.residuals_s) == pytest.approx(float(np.sum(y - a @ expected)))


def test_a_fit_with_its_overhead_at_the_bound_warns_that_it_is_degenerate():
    # the cycle grows slower with size than the profile does: the unbounded fit wants a negative overhead
    points = [(b, t, 1.3 * t - b * 0.0005) for b, t, _ in profile_points(1.0, 0.0)]
    with pytest.warns(CalibrationWarning, match="degenerate fit: the per-request overhead sits at its bound 0"):
        cal = fit_cycle(points)
    assert cal.overhead_s == 0.0 and cal.warnings and "degenerate" in cal.warnings[0]


def test_a_poor_fit_warns_with_its_residual():
    noise = (0.02, -0.02, 0.02, -0.02, 0.02)  # 20 ms swings around cycles of 60 to 190 ms
    with pytest.warns(CalibrationWarning, match="poor fit: rms residual"):
        cal = fit_cycle(profile_points(1.2, 0.002, noise))
    assert cal.rel_rms_residual > 0.05


def test_fewer_than_four_sizes_are_refused():
    with pytest.raises(CalibrationError, match="at least 4 batch sizes, got 3"):
        fit_cycle(profile_points(1.2, 0.002)[:3])
    with pytest.raises(CalibrationError, match="at least 4 batch sizes, got 2"):
        fit_cycle(profile_points(1.2, 0.002)[:2] * 3)


def test_collinear_points_are_refused():
    with pytest.raises(CalibrationError, match="collinear"):
        fit_cycle([(b, 0.01 * b, 0.012 * b) for b in SIZES])


def test_cycle_points_and_noise_come_from_the_batch_trace():
    cal = fit_cycle(profile_points(1.0, 0.0), warn=False)  # the overhead is 0 here by construction
    trace = [[0.0, w * f, int(b)] for b, _, w in cal.points for f in (0.9, 1.0, 1.1, 1.0, 1.0)]
    by_size = {b: t for b, t, _ in cal.points}
    points = cycle_points(trace, lambda b: by_size[float(b)])
    assert [p[0] for p in points] == list(SIZES)
    assert [p[2] for p in points] == pytest.approx([w for _, _, w in cal.points])
    noise = cycle_noise(trace, cal, lambda b: by_size[float(b)], n=100)
    assert np.mean(noise) == pytest.approx(1.0)
    assert min(noise) == pytest.approx(0.9) and max(noise) == pytest.approx(1.1)
    assert cycle_points(trace[:3], lambda b: by_size[float(b)]) == []  # under 5 batches a size


def test_the_simulator_draws_the_measured_cycle_noise():
    spec = ValidationSpec(requests_per_level=600)
    plain = level_scenario(spec, PROFILE, rate=20.0, calibration=Calibration(1.0, 0.0, ()))
    doubled = level_scenario(spec, PROFILE, rate=20.0, calibration=Calibration(1.0, 0.0, (), cycle_noise=(2.0,)))
    assert doubled.service.cycle_noise == [2.0]
    prof = ServiceTimeProfile.from_csv(PROFILE)
    for scenario, factor in ((doubled, 2.0), (plain, 1.0)):
        ok = simulate(scenario, seed=0).requests.query("outcome == 'ok'")
        batches = ok.groupby("start_s").agg(size=("batch_size", "first"), end=("end_s", "max"))
        walls = batches.end.to_numpy() - batches.index.to_numpy()
        means = [factor * prof.batch_timing(int(b), 64, 128).total_s for b in batches["size"]]
        if factor == 2.0:  # the measured factor replaces the profile's gamma noise: exactly twice the mean
            assert walls == pytest.approx(means, rel=1e-9)
        else:  # the profile's own noise, as before: around the mean, not on it
            assert walls != pytest.approx(means, rel=1e-9) and walls == pytest.approx(means, rel=0.05)


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
    spec = ValidationSpec(requests_per_level=300)  # 3 replications of 100
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
    spec = ValidationSpec(levels=(0.4,), requests_per_level=240, calibration_s=5.0)
    lines: list[str] = []
    results = run_validation(spec, out_dir=tmp_path, echo=lines.append)
    assert set(results.metric) == set(METRICS)
    assert all(math.isfinite(v) for v in results.real) and all(math.isfinite(v) for v in results.sim)
    # throughput is set by the offered load in both worlds: they must agree closely
    thr = results[results.metric == "throughput_per_s"].iloc[0]
    assert abs(thr.rel_error) < 0.15
    for name in ("results.csv", "replications.csv", "validation.png", "provenance.json", "profile.csv"):
        assert (tmp_path / name).exists()
    assert any(line.startswith("calibration:") for line in lines)
    row = results[results.metric == "ttft_p99_s"].iloc[0]
    assert row.real_low <= row.real <= row.real_high and row.err_low <= row.rel_error <= row.err_high
    assert any(line.startswith("targets: ") for line in lines)

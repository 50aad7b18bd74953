"""The step-time model: the fit recovers known coefficients, and on the real engine the overhead is measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from capsim.core.engine import ReferenceEngine
from capsim.core.step_profile import fit_steps, measure_steps, probe_steps
from capsim.model.step_model import FEATURES, StepFitError, StepTimeFit, fit_step_time


def test_the_fit_recovers_known_coefficients_and_its_overhead() -> None:
    rng = np.random.default_rng(0)
    n = 400
    x = np.column_stack([rng.integers(0, 512, n), rng.integers(0, 200_000, n), rng.integers(0, 64, n),
                         rng.integers(0, 60_000, n)]).astype(float)
    true = (2e-3, 4e-6, 1e-9, 5e-5, 2e-8)
    y = true[0] + x @ np.array(true[1:]) + rng.normal(0, 1e-5, n)
    fit = fit_step_time(x, y)
    assert fit.coefficients == pytest.approx(true, rel=0.05)
    assert fit.overhead_s == pytest.approx(2e-3, rel=0.02) and fit.c0_stderr_s < 1e-4
    assert fit.r2 > 0.99 and fit.residual_rms_s < 2e-5 and fit.n_steps == n
    assert fit.ranges["decodes"] == (x[:, 2].min(), x[:, 2].max())
    assert set(fit.ranges) == set(FEATURES)
    assert StepTimeFit.from_dict(fit.to_dict()) == fit
    assert fit.residuals_by_kind["mixed"][0] > 0 and abs(fit.residuals_by_kind["mixed"][1]) < 0.01
    assert fit.predict(*x[0]) == pytest.approx(y[0], abs=1e-4)


def test_a_fit_with_no_overhead_finds_none_and_bad_input_is_named() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(1, 100, (50, 4)).astype(float)
    y = x @ np.array([1e-4, 1e-7, 1e-4, 1e-7])
    assert fit_step_time(x, y).overhead_s == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(StepFitError, match="at least 10 measured steps"):
        fit_step_time(x[:5], y[:5])
    with pytest.raises(StepFitError, match=r"features must be \(n, 4\)"):
        fit_step_time(x[:, :3], y)
    with pytest.raises(StepFitError, match="lacks 'r2'"):
        StepTimeFit.from_dict({"coefficients": [0, 0, 0, 0, 0], "residual_rms_s": 0})


def test_the_real_engine_profile_measures_mixed_steps_and_fits_them() -> None:
    """The overhead is measured: with the probe steps (one decode, single prefills) the CPU engine's fitted
    ``c0`` is positive, several standard errors from 0, and close to what a one-decode step costs."""
    engine = ReferenceEngine("tiny", device="cpu", dtype="float32", seed=0, threads=1)
    samples = measure_steps(engine, workloads=3, requests=12, max_prompt=96, max_output=12, seed=2, repeats=2)
    assert len(samples) > 40
    assert any(s.prefill_tokens and s.decodes for s in samples), "no step mixed a prefill chunk with decodes"
    assert all(s.seconds > 0 for s in samples)
    probes = probe_steps(engine, max_decodes=16, repeats=3)
    one = next(p for p in probes if p.decodes == 1 and p.prefill_tokens == 0)
    fit = fit_steps(samples + probes)
    assert all(c >= 0 for c in fit.coefficients) and np.isfinite(fit.c0_stderr_s)
    c = fit.coefficients
    assert c[1] > 0 and (c[3] > 0 or c[4] > 0)  # prefill tokens cost time, and so do decodes
    assert fit.overhead_s > 2 * fit.c0_stderr_s > 0, (fit.overhead_s, fit.c0_stderr_s)
    assert 0.2 * one.seconds < fit.overhead_s < 1.5 * one.seconds  # most of a one-decode step is overhead
    assert fit.ranges["decodes"][1] >= 2 and fit.ranges["decodes"][0] == 0
    assert set(fit.residuals_by_kind) == {"decode", "prefill", "mixed"}
    assert abs(fit.residuals_by_kind["decode"][1]) < 0.25  # decode-only steps: the median within 25%
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure_steps(engine, repeats=0)


def test_plain_least_squares_lets_long_steps_swallow_the_overhead() -> None:
    """Why the fit is relative by default: a few long steps the linear form misses (the padded mixed steps
    of ``ContinuousEngine``) pull the absolute fit's overhead to 0, the relative fit keeps it."""
    rng = np.random.default_rng(3)
    d = rng.integers(1, 33, 200).astype(float)
    x = np.column_stack([np.zeros(200), np.zeros(200), d, d * 100]).astype(float)
    y = 1e-3 + 1e-4 * d + 1e-8 * x[:, 3]
    mixed = np.column_stack([np.full(20, 64.0), np.zeros(20), d[:20], d[:20] * 100])
    y_mixed = 1e-3 + 64 * d[:20] * 2e-5 + 1e-4 * d[:20]  # padded: every row pays for the chunk
    xs, ys = np.vstack([x, mixed]), np.concatenate([y, y_mixed])
    assert fit_step_time(xs, ys, relative=False).overhead_s < 0.5e-3
    rel = fit_step_time(xs, ys)
    assert rel.overhead_s == pytest.approx(1e-3, rel=0.3)
    assert rel.residuals_by_kind["mixed"][1] > 0.1  # and the misfit shows: mixed steps under-predicted


def test_capsim_profile_steps_writes_a_profile_the_simulator_times_steps_with(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from capsim.cli import app
    from capsim.model.profile import ServiceTimeProfile

    out = tmp_path / "fitted.csv"
    res = CliRunner().invoke(app, ["profile-steps", "data/profiles/cpu-tiny-float32.csv", "--out", str(out),
                                   "--device", "cpu", "--threads", "1", "--workloads", "1"])
    assert res.exit_code == 0, res.output
    assert "overhead +-" in res.output
    prof = ServiceTimeProfile.from_csv(out)
    fit = StepTimeFit.from_dict(prof.metadata["step_model"])
    assert fit.n_steps > 10 and len(prof.points) == len(ServiceTimeProfile.from_csv(
        "data/profiles/cpu-tiny-float32.csv").points)

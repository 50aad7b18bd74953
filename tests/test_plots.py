"""capsim.plots on real frames: a simulated rush with a crash, the committed profile and validation results."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.colors import to_hex

from capsim import plots
from capsim.model.profile import ServiceTimeProfile
from capsim.model.scenario import Scenario
from capsim.plots.common import CRASH, DOWN, UP
from capsim.sim import simulate

PROFILE = "data/profiles/cpu-tiny-float32.csv"


@pytest.fixture(scope="module")
def rush():
    sc = Scenario.from_yaml("data/scenarios/friday_rush.yaml").override({
        "horizon_s": 600, "warmup_s": 30, "workload.arrivals.rate_per_s": [[0, 4], [60, 96], [240, 4]],
        "faults": {"crashes": [{"at_s": 400}]},
        "autoscaler.minReplicas": 3,  # the floor before tuning: the HPA has to follow the rush
    })
    return simulate(sc, seed=0)


@pytest.fixture(scope="module")
def profile():
    return ServiceTimeProfile.from_csv(PROFILE)


def _png(fig, tmp_path, name):
    path = plots.save(fig, tmp_path / "sub" / f"{name}.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # a drawn figure, not an empty canvas
    return path


def _labelled(ax):
    return ax.get_xlabel() and ax.get_ylabel()


def test_profile_curves_draw_every_measured_length(profile, tmp_path):
    fig = plots.profile_curves(profile)
    lat_prefill, lat_decode, thr_prefill, thr_decode = fig.axes
    frame = profile.to_frame()
    assert len(lat_prefill.lines) == frame[frame.phase == "prefill"].tokens.nunique()
    assert len(lat_decode.lines) == frame[frame.phase == "decode"].tokens.nunique()
    line = lat_prefill.lines[0]  # 16-token prompts: the profile's medians at each batch size
    sub = frame[(frame.phase == "prefill") & (frame.tokens == 16)].sort_values("batch_size")
    np.testing.assert_allclose(line.get_xdata(), sub.batch_size)
    np.testing.assert_allclose(line.get_ydata(), sub.p50_ms)
    # decode throughput is sequences per step time
    dec = frame[(frame.phase == "decode") & (frame.tokens == 16)].sort_values("batch_size")
    np.testing.assert_allclose(thr_decode.lines[0].get_ydata(), dec.batch_size / (dec.p50_ms / 1000))
    assert all(_labelled(ax) for ax in (thr_prefill, thr_decode))
    assert "ms" in lat_prefill.get_ylabel() and "tokens/s" in thr_prefill.get_ylabel()
    _png(fig, tmp_path, "profile")


def test_compare_profiles_one_line_per_profile(profile, tmp_path):
    fig = plots.compare_profiles({"a": profile, "b": profile}, prompt_tokens=64, context_tokens=64)
    assert all(len(ax.lines) == 2 for ax in fig.axes)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a", "b"]
    with pytest.raises(ValueError, match="at least one"):
        plots.compare_profiles({})
    _png(fig, tmp_path, "compare")


def test_batching_speedup_relative_to_the_smallest_batch(profile, tmp_path):
    measured = pd.DataFrame({"max_batch_size": [1, 8, 32], "requests_per_s": [50.0, 200.0, 400.0],
                             "p50_latency_s": [0.5, 0.1, 0.05]})
    fig = plots.batching_speedup(measured, profile)
    left, right = fig.axes
    np.testing.assert_allclose(left.lines[0].get_ydata(), [1.0, 4.0, 8.0])
    predicted = left.lines[1].get_ydata()
    assert predicted[0] == pytest.approx(1.0) and predicted[-1] > predicted[1] > 1.0
    np.testing.assert_allclose(right.lines[0].get_ydata(), [500.0, 100.0, 50.0])
    with pytest.raises(KeyError, match="requests_per_s"):
        plots.batching_speedup(measured.drop(columns="requests_per_s"))
    _png(fig, tmp_path, "speedup")


def _vlines(ax):
    out = []
    for line in ax.lines:
        x = line.get_xdata()
        if len(x) == 2 and x[0] == x[1] and tuple(line.get_ydata()) == (0, 1):
            out.append((float(x[0]), to_hex(line.get_color())))
    return out


def test_run_timeline_marks_every_scale_event_and_crash(rush, tmp_path):
    fig = plots.run_timeline(rush, title="rush", slo_s=1.0, bin_s=30)
    _load, reps, _queue, ttft = fig.axes
    ev = rush.scale_events
    assert len(ev) >= 3 and len(rush.crashes) == 1
    expected = sorted([(t / 60, UP if b > a else DOWN) for t, a, b, _by in ev.itertuples(index=False)]
                      + [(t / 60, CRASH) for t in rush.crashes.time_s])
    for ax in fig.axes:
        assert sorted(_vlines(ax)) == expected
        assert ax.get_ylabel()
    assert ttft.get_xlabel() == "time (min)"
    desired = reps.lines[0].get_ydata()
    assert max(desired) == rush.summary.max_replicas
    # the cluster's room, in pods: whole 8-GPU nodes of one-GPU pods, never below the ready pods
    (room,) = [line for line in reps.lines if line.get_label() == "pods the nodes hold (booting ones too)"]
    held = np.asarray(room.get_ydata(), dtype=float)
    assert set(held) <= {8.0, 16.0, 24.0, 32.0} and max(held) > min(held)  # nodes came (and went)
    assert (held >= rush.timeseries["ready_replicas"].to_numpy()).all()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["scale up", "scale down", "crash"]
    assert any("SLO" in t.get_text() for t in ttft.get_legend().get_texts())
    assert len(ttft.patches) == 0  # no Redis outage in this run
    _png(fig, tmp_path, "timeline")


def test_ttft_p99_over_time_matches_numpy(rush):
    p99 = plots.ttft_p99_over_time(rush.requests, bin_s=60)
    req = rush.requests
    window = req[(req.arrival_s >= 0) & (req.arrival_s < 60)]
    ttft = np.where(window.outcome == "ok", window.first_token_s - window.arrival_s, np.inf)
    assert p99.ttft_p99_s.iloc[0] == pytest.approx(np.quantile(ttft, 0.99, method="higher"))
    assert p99.time_s.iloc[0] == 60
    assert np.isinf(p99.ttft_p99_s).any()  # the rush rejects requests: those minutes fail the SLO outright


def test_run_timeline_shades_redis_outages():
    sc = Scenario.from_yaml("data/scenarios/crash_study.yaml").override({
        "horizon_s": 300, "warmup_s": 30, "faults.pod_mtbf_s": None, "faults.crashes": [],
        "faults.redis_outages": [{"at_s": 120, "duration_s": 30}]})
    fig = plots.run_timeline(simulate(sc, seed=0))
    assert not [line for line in fig.axes[1].lines if line.get_label() == "pods the nodes hold (booting ones too)"]  # no cluster
    for ax in fig.axes:
        (span,) = ax.patches
        assert (span.get_x(), span.get_x() + span.get_width()) == pytest.approx((2.0, 2.5))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Redis outage"]


def test_latency_cdfs_end_at_the_share_that_succeeded(rush, tmp_path):
    req = rush.requests
    calm = req[req.arrival_s < 60]
    fig = plots.latency_cdfs({"whole run": req, "first minute": calm}, slo_s=1.0)
    left, right = fig.axes
    whole, first = left.lines[:2]
    finished = req.outcome.notna()
    assert whole.get_ydata()[-1] == pytest.approx((req.outcome == "ok").sum() / finished.sum())
    assert first.get_ydata()[-1] == pytest.approx(1.0)
    assert "(s)" in left.get_xlabel() and "(s)" in right.get_xlabel()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["whole run", "first minute", "SLO 1 s"]
    _png(fig, tmp_path, "cdf")


def test_sim_vs_real_on_the_committed_validation(tmp_path):
    results = pd.read_csv("data/validation/results.csv")
    fig = plots.sim_vs_real(results)
    ttft, e2e, err = fig.axes
    assert len(ttft.lines) == 6 and len(e2e.lines) == 6  # real and sim at p50, p95, p99
    p99_real = results[results.metric == "ttft_p99_s"].sort_values("level").real.to_numpy() * 1000
    np.testing.assert_allclose(ttft.lines[4].get_ydata(), p99_real)
    assert len(err.patches) == len(results)  # one bar per level and metric
    with pytest.raises(KeyError, match="rel_error"):
        plots.sim_vs_real(results.drop(columns="rel_error"))
    _png(fig, tmp_path, "svr")


def test_cost_vs_ttft_draws_the_front(tmp_path):
    points = pd.DataFrame({"name": list("abcde"), "cost": [10.0, 8.0, 12.0, 9.0, 20.0],
                           "ttft_p99_s": [0.5, 2.0, 0.4, 3.0, 0.45], "slo_met": [True, False, True, False, True]})
    fig = plots.cost_vs_ttft(points, label="name", slo_s=1.0, highlight={"baseline": 4}, feasible="slo_met")
    (ax,) = fig.axes
    front = next(line for line in ax.lines if line.get_label() == "Pareto front")
    assert sorted(front.get_xdata()) == [0.4, 0.5, 2.0]  # d is dominated by b, e by a
    assert {t.get_text() for t in ax.texts} == {"a", "b", "c"}
    assert plots.front_rows(points) == [1, 0, 2]
    _png(fig, tmp_path, "pareto")


def test_pareto_mask_example():
    assert plots.pareto_mask([1, 2, 3, np.nan], [3, 2, 4, 0]).tolist() == [True, True, False, False]


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=30))
def test_pareto_front_is_exactly_the_undominated_points(pts):
    x, y = np.array(pts, dtype=float).T
    mask = plots.pareto_mask(x, y)
    for i in range(len(pts)):
        dominated = any(x[j] <= x[i] and y[j] <= y[i] and (x[j], y[j]) != (x[i], y[i]) for j in range(len(pts)))
        assert mask[i] == (not dominated)

"""capsim.plots.sessions on real frames: agent sessions under two routers with a crash, and hand-made loads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from capsim import plots
from capsim.model.scenario import Scenario
from capsim.plots.common import CRASH
from capsim.sim import simulate

CRASH_AT = 60.0


@pytest.fixture(scope="module")
def runs():
    sc = Scenario.from_yaml("data/scenarios/agent_sessions.yaml").override({
        "horizon_s": 120, "warmup_s": 10, "faults.crashes": [{"at_s": CRASH_AT, "pod": 0}]})
    return {kind: simulate(sc.override({"router.kind": kind}), seed=0) for kind in ("session_affinity", "round_robin")}


def test_imbalance_of_even_and_uneven_loads():
    assert plots.imbalance([5, 5, 5, 5]) == {"max_over_mean": 1.0, "cv": 0.0}
    out = plots.imbalance([6, 2, 2, 2])  # mean 3, population sd sqrt(3)
    assert out["max_over_mean"] == pytest.approx(2.0)
    assert out["cv"] == pytest.approx(np.sqrt(3) / 3)
    assert np.isnan(plots.imbalance([])["cv"]) and np.isnan(plots.imbalance([0, 0])["max_over_mean"])


def test_pod_load_counts_the_ok_requests_in_the_window(runs):
    req = runs["round_robin"].requests
    load = plots.pod_load(req, 10, CRASH_AT)
    ok = req[(req.outcome.astype(str) == "ok") & (req.arrival_s >= 10) & (req.arrival_s < CRASH_AT)]
    assert load.requests.sum() == len(ok) > 100
    assert load.prefill_tokens.sum() == int((ok.prompt_tokens - ok.cached_tokens).sum())
    assert sorted(load.index) == [0, 1, 2, 3]
    assert plots.imbalance(load.requests)["max_over_mean"] < 1.05  # round robin: even by construction


def test_ttft_around_bins_relative_to_the_crash(runs):
    req = runs["session_affinity"].requests
    around = plots.ttft_around(req, CRASH_AT, before_s=20, after_s=30, bin_s=10)
    assert list(around.time_s) == [-20, -10, 0, 10, 20]
    ok = req[(req.outcome.astype(str) == "ok") & (req.arrival_s >= CRASH_AT) & (req.arrival_s < CRASH_AT + 10)]
    assert around.ttft_mean_s[2] == pytest.approx((ok.first_token_s - ok.arrival_s).mean())
    # re-prefill only from the crash on (a turn in flight at the crash, retried, counts in the bin it arrived in)
    assert around.reprefill_tokens.sum() > 0 and around.reprefill_tokens[0] == 0
    assert around.reprefill_tokens[2:].sum() > 0
    assert (around.ttft_p99_s >= around.ttft_mean_s).all()


def test_router_bars_draw_the_table(tmp_path):
    table = pd.DataFrame({"router": ["a", "a", "b", "b"], "state": ["redis", "pod_local"] * 2,
                          "prefix_hit_rate": [0.9, 0.8, 0.6, 0.7], "ttft_p50_s": [1.0, 2.0, 3.0, 4.0],
                          "ttft_p99_s": [5.0, 6.0, 7.0, 8.0], "load_max_over_mean": [1.1, 1.2, 1.3, 1.4]})
    fig = plots.router_bars(table, title="t")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 4
    heights = sorted(round(p.get_height(), 3) for p in axes[0].patches)
    assert heights == [0.6, 0.7, 0.8, 0.9]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["a", "b"]
    assert "hit rate" in axes[0].get_ylabel() and "(s)" in axes[1].get_ylabel()
    one = plots.router_bars(table, metrics={"ttft_p99_s": "p99 (s)"})
    assert [round(p.get_height(), 3) for p in one.axes[0].patches] == [5.0, 7.0, 6.0, 8.0]  # redis bars first
    data = plots.save(fig, tmp_path / "bars.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_crash_ttft_draws_a_line_per_run_and_marks_the_crash(runs, tmp_path):
    fig = plots.crash_ttft({k: r.requests for k, r in runs.items()}, CRASH_AT, before_s=30, after_s=40, bin_s=10)
    ttft, tokens = fig.axes
    assert ttft.get_yscale() == "log" and "(s)" in ttft.get_ylabel() and "tokens" in tokens.get_ylabel()
    for ax in (ttft, tokens):
        crash = [ln for ln in ax.get_lines() if ln.get_label() == "crash"]
        assert len(crash) == 1 and crash[0].get_color() == CRASH and list(crash[0].get_xdata()) == [0.0, 0.0]
    drawn = {ln.get_label(): ln for ln in tokens.get_lines()}
    expected = plots.ttft_around(runs["round_robin"].requests, CRASH_AT, before_s=30, after_s=40, bin_s=10)
    assert list(drawn["round_robin"].get_ydata()[:-1]) == list(expected.reprefill_tokens)
    assert drawn["round_robin"].get_xdata()[-1] == expected.time_s.iloc[-1] + 10  # the last bin drawn to its end
    assert plots.save(fig, tmp_path / "crash.png").stat().st_size > 10_000

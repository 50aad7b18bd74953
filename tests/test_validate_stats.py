"""The validation's confidence intervals: block bootstrap, paired errors, replications pooled."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from capsim.studies.validate_stats import (
    Interval,
    cut_blocks,
    error_interval,
    iid_sample_needed,
    interval,
    pool,
    statistic,
    t_interval,
    tail_sample,
)


def frame(arrival, ttft, e2e=None, outcome=None, batch=None):
    arrival = np.asarray(arrival, dtype=float)
    ttft = np.asarray(ttft, dtype=float)
    n = len(arrival)
    return pd.DataFrame({
        "arrival_s": arrival,
        "first_token_s": arrival + ttft,
        "end_s": arrival + (ttft * 2 if e2e is None else np.asarray(e2e, dtype=float)),
        "outcome": ["ok"] * n if outcome is None else outcome,
        "batch_size": np.ones(n, dtype=int) if batch is None else batch,
    })


def test_blocks_cut_the_window_by_arrival_and_keep_successes_only():
    df = frame([0.5, 1.0, 1.2, 2.5, 3.9, 4.0], [0.1] * 6, outcome=["ok", "ok", "failed", "ok", "ok", "ok"],
               batch=[1, 2, 3, 4, 5, 6])
    b = cut_blocks(df, warmup_s=1.0, end_s=4.0, block_s=1.0)
    assert len(b) == 3
    assert b.ok.tolist() == [1, 1, 1]  # the failure at 1.2 and the arrivals outside [1, 4) are left out
    assert b.span_s.tolist() == [1.0, 1.0, 1.0]
    assert b.batch.tolist() == [2.0, 4.0, 5.0] and b.start.tolist() == [0, 1, 2]
    assert statistic("throughput_per_s")(b, np.arange(3)) == pytest.approx(1.0)
    assert statistic("mean_batch_size")(b, np.arange(3)) == pytest.approx(11 / 3)
    assert statistic("e2e_p50_s")(b, np.arange(3)) == pytest.approx(0.2)


def test_a_short_last_block_counts_its_own_length():
    b = cut_blocks(frame([0.1, 1.1, 2.1], [0.1] * 3), 0.0, 2.5, block_s=1.0)
    assert b.span_s.tolist() == [1.0, 1.0, 0.5]


def test_the_interval_holds_the_true_p99_of_independent_draws_and_narrows_with_more():
    rng = np.random.default_rng(1)
    true_p99 = np.log(100) * 0.05  # exponential, mean 50 ms

    def run(n):
        arrival = np.sort(rng.uniform(0, 100, n))
        return interval(cut_blocks(frame(arrival, rng.exponential(0.05, n)), 0, 100), "ttft_p99_s", seed=2)

    small, large = run(1_000), run(20_000)
    assert large.low < true_p99 < large.high
    assert large.rel_half_width < small.rel_half_width / 2  # about sqrt(20) narrower
    # repeats of a block, in any order, are its requests again
    b = cut_blocks(frame([0.1, 0.2, 1.5], [0.1, 0.2, 0.3]), 0, 2)
    assert b.rows(np.array([1, 0, 1])).tolist() == [2, 0, 1, 2]


def test_blocks_widen_the_interval_when_neighbours_are_correlated():
    # each second of arrivals shares one slow-down, as requests queued behind one slow batch do
    rng = np.random.default_rng(3)
    arrival = np.sort(rng.uniform(0, 100, 5_000))
    shared = rng.lognormal(0, 1.0, 100)[arrival.astype(int)]
    df = frame(arrival, 0.05 * shared * rng.uniform(0.9, 1.1, len(arrival)))
    per_request = interval(cut_blocks(df, 0, 100, block_s=0.02), "ttft_p99_s", seed=4)
    per_second = interval(cut_blocks(df, 0, 100, block_s=1.0), "ttft_p99_s", seed=4)
    assert per_second.rel_half_width > 2 * per_request.rel_half_width


def test_the_paired_error_of_a_scaled_copy_is_exact():
    rng = np.random.default_rng(5)
    arrival = np.sort(rng.uniform(0, 50, 5_000))
    ttft = rng.exponential(0.05, len(arrival))
    real = cut_blocks(frame(arrival, ttft), 0, 50)
    sim = cut_blocks(frame(arrival, 1.1 * ttft), 0, 50)
    err = error_interval(real, sim, "ttft_p99_s")
    # the same blocks in both: every resample gives the same +10%, so the interval is a point
    assert err.value == pytest.approx(0.1) and err.low == pytest.approx(0.1) and err.high == pytest.approx(0.1)
    with pytest.raises(ValueError, match="same blocks"):
        error_interval(real, cut_blocks(frame(arrival, ttft), 0, 25), "ttft_p99_s")


def test_pooled_replications_are_one_sample_of_all_their_blocks():
    rng = np.random.default_rng(6)
    runs = [cut_blocks(frame(np.sort(rng.uniform(0, 10, 500)), rng.exponential(0.05, 500)), 0, 10)
            for _ in range(3)]
    pooled = pool(runs)
    assert len(pooled) == 30 and pooled.ok.sum() == 1500
    everything = np.concatenate([r.ttft for r in runs])
    assert statistic("ttft_p95_s")(pooled, np.arange(30)) == pytest.approx(np.percentile(everything, 95))


def test_t_interval_and_overlap():
    iv = t_interval([1.0, 2.0, 3.0])
    assert iv.value == 2.0
    assert iv.high - 2.0 == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-5)
    assert Interval(1, 0.9, 1.1).overlaps(Interval(1.2, 1.05, 1.3))
    assert not Interval(1, 0.9, 1.1).overlaps(Interval(1.3, 1.2, 1.4))


def test_tail_sample():
    assert tail_sample(1350, 99) == pytest.approx(13.5)


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric"):
        statistic("queue_p99_s")


def test_iid_sample_needed_matches_a_simulated_exponential():

    n = iid_sample_needed(99, 0.15)
    assert 780 < n < 820  # (1.96 / 0.15)^2 x 99 / ln(100)^2
    assert iid_sample_needed(50, 0.10) > iid_sample_needed(95, 0.15)
    rng = np.random.default_rng(7)
    p99s = np.percentile(rng.exponential(1.0, (2000, n)), 99, axis=1)
    half = (np.percentile(p99s, 97.5) - np.percentile(p99s, 2.5)) / 2 / np.log(100)
    assert half == pytest.approx(0.15, rel=0.15)

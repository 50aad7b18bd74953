"""Confidence intervals for the validation's metrics: a block bootstrap over time, paired between real and sim.

Latencies in a queue are not independent: a slow batch delays every request queued behind it, so
resampling single requests (the textbook bootstrap) makes a p99's interval far too narrow. The requests of
each run are cut into blocks of consecutive arrivals (``block_s`` seconds of the schedule), and
``scipy.stats.bootstrap`` resamples whole blocks. Replications (runs with different seeds) are pooled:
their blocks enter one pool, and a metric is the statistic of the pooled requests; this is "a percentile
of the pooled replications", with the replication-to-replication spread inside the block resampling.

Real and simulated runs of a replication share the arrival schedule, so their blocks cover the same
arrivals; the relative error's interval resamples the same blocks in both (``paired=True``), which keeps
the workload's own noise, common to both, out of the error's interval.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 1000
BLOCK_S = 1.0  # a few batch cycles at 85% load; docs/validation.md checks it against the runs' spread


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval."""

    value: float
    low: float
    high: float

    @property
    def rel_half_width(self) -> float:
        """Half the interval's width over the estimate (nan when the estimate is 0 or nan)."""
        return (self.high - self.low) / 2 / abs(self.value) if self.value else float("nan")

    def overlaps(self, other: Interval) -> bool:
        return bool(self.low <= other.high and other.low <= self.high)


@dataclass(frozen=True)
class Blocks:
    """One run's (or a pool of runs') successful requests cut into blocks, stored flat in block order:
    their TTFT, end-to-end latency and batch size; per block, where its requests start in the flat
    arrays, how many there are, and the block's length in seconds."""

    ttft: np.ndarray
    e2e: np.ndarray
    batch: np.ndarray
    start: np.ndarray
    ok: np.ndarray
    span_s: np.ndarray

    def __len__(self) -> int:
        return len(self.ok)

    def __add__(self, other: Blocks) -> Blocks:
        return Blocks(np.concatenate([self.ttft, other.ttft]), np.concatenate([self.e2e, other.e2e]),
                      np.concatenate([self.batch, other.batch]),
                      np.concatenate([self.start, other.start + len(self.ttft)]),
                      np.concatenate([self.ok, other.ok]), np.concatenate([self.span_s, other.span_s]))

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Positions in the flat arrays of the requests of blocks ``idx`` (repeats allowed), vectorized."""
        counts = self.ok[idx].astype(np.int64)
        total = int(counts.sum())
        if total == 0:
            return np.empty(0, dtype=np.int64)
        ends = np.cumsum(counts)
        shift = np.repeat(self.start[idx] - (ends - counts), counts)
        return shift + np.arange(total)


def cut_blocks(df: Any, warmup_s: float, end_s: float, block_s: float = BLOCK_S) -> Blocks:
    """Cut a request frame's window ``[warmup_s, end_s)`` into blocks of ``block_s`` seconds of arrivals."""
    if block_s <= 0 or end_s <= warmup_s:
        raise ValueError(f"need block_s > 0 and end_s > warmup_s, got {block_s}, [{warmup_s}, {end_s})")
    window = df[(df.arrival_s >= warmup_s) & (df.arrival_s < end_s)]
    n = max(int(np.ceil((end_s - warmup_s) / block_s)), 1)
    edges = warmup_s + block_s * np.arange(n + 1)
    edges[-1] = end_s
    ok = window[window.outcome == "ok"]
    which = np.clip(np.searchsorted(edges, ok.arrival_s.to_numpy(), side="right") - 1, 0, n - 1)
    order = np.argsort(which, kind="stable")
    counts = np.bincount(which, minlength=n)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    ttft = (ok.first_token_s - ok.arrival_s).to_numpy(dtype=float)[order]
    e2e = (ok.end_s - ok.arrival_s).to_numpy(dtype=float)[order]
    batch = ok.batch_size.to_numpy(dtype=float)[order]
    return Blocks(ttft, e2e, batch, start, counts.astype(float), np.diff(edges))


def statistic(metric: str) -> Callable[[Blocks, np.ndarray], float]:
    """The function computing ``metric`` (``ttft_p99_s``, ``throughput_per_s``, ``mean_batch_size``...)
    over the blocks ``idx`` (indices, repeats allowed) of ``blocks``."""
    if metric == "throughput_per_s":
        return lambda b, idx: float(b.ok[idx].sum() / b.span_s[idx].sum())
    if metric == "mean_batch_size":
        def mean_batch(b: Blocks, idx: np.ndarray) -> float:
            rows = b.rows(idx)
            return float(b.batch[rows].mean()) if len(rows) else float("nan")
        return mean_batch
    kind, _, q = metric.removesuffix("_s").partition("_p")
    if kind not in ("ttft", "e2e") or not q.isdigit():
        raise ValueError(f"unknown metric {metric!r}")

    def pct(b: Blocks, idx: np.ndarray) -> float:
        rows = b.rows(idx)
        return float(np.percentile(getattr(b, kind)[rows], float(q))) if len(rows) else float("nan")
    return pct


def interval(blocks: Blocks, metric: str, *, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
             seed: int = 0) -> Interval:
    """``metric`` over all of ``blocks`` with a percentile block-bootstrap interval."""
    from scipy.stats import DegenerateDataWarning, bootstrap

    stat = statistic(metric)
    every = np.arange(len(blocks))
    value = stat(blocks, every)
    if len(blocks) < 2:
        return Interval(value, float("nan"), float("nan"))
    with warnings.catch_warnings():  # a constant statistic: scipy warns, the interval is that constant
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap((every,), lambda idx: stat(blocks, idx.astype(int)), vectorized=False,
                        n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                        random_state=np.random.default_rng(seed))
    return Interval(value, *_percentiles(res.bootstrap_distribution, confidence))


def error_interval(real: Blocks, sim: Blocks, metric: str, *, confidence: float = CONFIDENCE,
                   n_resamples: int = N_RESAMPLES, seed: int = 0) -> Interval:
    """The relative error ``(sim - real) / real`` of ``metric``, resampling the same blocks in both
    (their blocks must cover the same arrivals: the same schedule cut the same way)."""
    from scipy.stats import DegenerateDataWarning, bootstrap

    if len(real) != len(sim):
        raise ValueError(f"real and sim need the same blocks to pair, got {len(real)} and {len(sim)}")
    stat = statistic(metric)

    def err(idx: np.ndarray) -> float:
        r = stat(real, idx)
        return (stat(sim, idx) - r) / r if r else float("nan")

    every = np.arange(len(real))
    value = err(every)
    if len(real) < 2:
        return Interval(value, float("nan"), float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap((every,), lambda idx: err(idx.astype(int)), vectorized=False, n_resamples=n_resamples,
                        confidence_level=confidence, method="percentile", random_state=np.random.default_rng(seed))
    return Interval(value, *_percentiles(res.bootstrap_distribution, confidence))


def _percentiles(distribution: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval of a bootstrap distribution, leaving out resamples whose statistic is
    undefined (every block drawn empty: a run that served nothing for a while)."""
    d = np.asarray(distribution, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(d, [tail, 100 - tail])
    return float(low), float(high)


def pool(runs: Sequence[Blocks]) -> Blocks:
    """The blocks of several replications as one pool."""
    if not runs:
        raise ValueError("no runs to pool")
    out = runs[0]
    for b in runs[1:]:
        out = out + b
    return out


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Student-t interval of the mean of per-replication values (the across-run check of the bootstrap)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, float("nan"), float("nan"))
    half = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half)


def tail_sample(n: int, q: float) -> float:
    """How many of ``n`` requests lie beyond the ``q``-th percentile: what a p99 estimate rests on."""
    return n * (1 - q / 100)


def iid_sample_needed(q: float, rel_half_width: float, confidence: float = CONFIDENCE) -> int:
    """Independent draws from an exponential tail that put the ``q``-th percentile's interval within
    ``+-rel_half_width`` of it: from the quantile's asymptotic variance ``q (1 - q) / (n f(x_q)^2)``, which
    for an exponential is ``x_q^2 q / ((1 - q) n ln(1 / (1 - q))^2)`` relative. Queueing correlates
    neighbours, so a run needs more (docs/validation.md measures how many more)."""
    from scipy import stats

    p = q / 100
    z = float(stats.norm.ppf((1 + confidence) / 2))
    return int(np.ceil((z / rel_half_width) ** 2 * p / (1 - p) / np.log(1 / (1 - p)) ** 2))

"""Prometheus's range functions, as the simulated adapter evaluates its queries over the scraped samples.

``rate()`` is not the slope between a window's first and last sample: Prometheus extrapolates that increase to
the window's edges, all the way where the samples come close to an edge (within 1.1 average scrape intervals),
by half an interval where they do not (the series starts or ends inside the window: a new pod, a crashed one,
a Prometheus outage), never below a counter's zero, and divides by the window's length. A pod that became
ready 20 s before the HPA's read of a 60-s rate of its token counter reads about half of what it serves.
``histogram_quantile`` takes its quantile of each bucket's own extrapolated rate, made monotonic.

Re-implemented from prometheus/prometheus ``promql/functions.go`` (``extrapolatedRate``, ``funcMaxOverTime``)
and ``promql/quantile.go`` (``ensureMonotonic``), Apache-2.0, (c) The Prometheus Authors, as of 3.x; a test
(``tests/test_prometheus_parity.py``) runs the same samples through a real Prometheus server. Prometheus 2.x
differed in one corner: it capped the extrapolation at a counter's zero before testing the threshold, so a
series that starts inside the window with its zero between half and 1.1 intervals before its first sample
extrapolated to the zero rather than half an interval.

The series these functions read are kept as Prometheus holds them (``Samples``): scraped on a grid
(``first_scrape``), ended by a stale marker (``mark_stale``), read by a range query's window (``in_window``) and
dropped once no window holds them (``trim``); the autoscaler's adapter (``capsim.sim.hpa``) and the canary's
analysis (``capsim.sim.analysis``) keep theirs so.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

from capsim.model.buckets import bucket_quantile

Samples = deque[tuple[Any, ...]]  # a series as Prometheus holds it, oldest first; a 1-tuple (time,): a stale marker


def first_scrape(offset: float, every: float, now: float) -> float:
    """The first time on a target's scrape grid (``offset + k * every``) at or after ``now``."""
    return offset + max(0.0, math.ceil((now - offset) / every)) * every


def mark_stale(samples: Samples, at: float) -> None:
    """The series ends at ``at`` (its target failed or left): one stale marker, as Prometheus writes."""
    if samples and len(samples[-1]) > 1:
        samples.append((at,))


def trim(samples: Samples, old: float) -> None:
    """Drop the samples from before ``old``, which no query reads any longer."""
    while samples and samples[0][0] < old:
        samples.popleft()


def in_window(samples: Samples, a: float, window_s: float) -> list[tuple[Any, ...]]:
    """The samples a range query at ``a`` over ``window_s`` reads: those in ``(a - window_s, a]``, markers skipped."""
    return [s for s in samples if a - window_s < s[0] <= a and len(s) > 1]


def extrapolated_rate(times: Sequence[float], values: Sequence[float], start: float, end: float) -> float | None:
    """``rate(counter[end - start])`` evaluated at ``end`` over a counter's samples (``times`` ascending, all in
    ``(start, end]``): the increase, counter resets included (a value below the one before it: the counter
    restarted from 0), extrapolated to the window's edges as Prometheus does, per second of the window.
    None with fewer than two samples (Prometheus's result holds no series)."""
    n = len(times)
    if n < 2:
        return None
    first = float(values[0])
    increase = float(values[-1]) - first
    prev = first
    for v in values[1:]:
        if v < prev:  # a reset: the counter restarted; what it held before counts as increase
            increase += prev
        prev = v
    sampled = times[-1] - times[0]
    average = sampled / (n - 1)
    threshold = 1.1 * average
    to_start = times[0] - start
    to_end = end - times[-1]
    if to_start >= threshold:  # the series starts inside the window: half an interval before its first sample
        to_start = average / 2
    if increase > 0 and first >= 0:  # not before the counter's zero
        to_start = min(to_start, sampled * first / increase)
    if to_end >= threshold:  # the series ends inside the window
        to_end = average / 2
    return increase * (sampled + to_start + to_end) / sampled / (end - start)


def max_over_time(values: Sequence[float]) -> float:
    """``max_over_time``: the highest value; a NaN gives way to any number that follows it, and is the answer
    only when every value is one."""
    top = values[0]
    for v in values:
        if v > top or math.isnan(top):
            top = v
    return top


def rate_quantile(q: float, bounds: Sequence[float], times: Sequence[float],
                  counts: Sequence[Sequence[int]], start: float, end: float) -> float | None:
    """``histogram_quantile(q, sum(rate(x_bucket[end - start])) by (le))`` over one histogram's samples:
    ``counts[i][k]``, the observations in bucket ``k`` (not cumulative, the last +Inf) at ``times[i]``. Each
    ``le`` series (the cumulative count) gets its own extrapolated rate; their quantile is taken after making
    them monotonic in ``le``, as Prometheus's ``ensureMonotonic`` does. None with fewer than two samples; NaN
    where nothing was observed in the window."""
    if len(times) < 2:
        return None
    n_buckets = len(bounds) + 1
    cumulative = []
    for row in counts:
        run, acc = 0, []
        for c in row:
            run += c
            acc.append(run)
        cumulative.append(acc)
    per_le = []
    for k in range(n_buckets):
        r = extrapolated_rate(times, [acc[k] for acc in cumulative], start, end)
        assert r is not None
        per_le.append(r)
    return summed_quantile(q, bounds, per_le)


def summed_quantile(q: float, bounds: Sequence[float], per_le: Sequence[float]) -> float:
    """``histogram_quantile(q, ...)`` of one ``le`` series per bucket, their values ``per_le`` (cumulative, the last
    +Inf; a ``sum by (le)`` of rates or increases): made monotonic in ``le`` as Prometheus's ``ensureMonotonic``
    does, then the quantile. NaN where the +Inf bucket holds nothing."""
    per_bucket, top = [], 0.0
    for v in per_le:
        v = max(v, top)  # monotonic in le
        per_bucket.append(v - top)
        top = v
    return bucket_quantile(q, bounds, per_bucket)

"""Histogram bucket bounds shared by the real pod's metrics and the simulated pod, and Prometheus's quantile.

The real pod (``capsim.core.metrics``) exports its TTFT histogram with ``TTFT_BUCKETS_S``; the simulated
pod counts its TTFT observations in the same buckets, so a ``histogram_quantile`` query reads the same
interpolated number from either. ``bucket_quantile`` is Prometheus's ``histogram_quantile`` over one
histogram (prometheus/prometheus ``promql/quantile.go``, ``bucketQuantile``, Apache-2.0): linear
interpolation inside the bucket that holds the rank, the highest finite bound when the rank falls in +Inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

# Time to first token is prefill plus queueing: the SLO region (50 ms to 2 s) is finely split.
TTFT_BUCKETS_S: Final = (
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
)  # fmt: skip


def bucket_quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float:
    """The ``q`` quantile of observations counted per bucket (``counts[k]``: observations in bucket ``k``,
    not cumulative; ``len(counts) == len(bounds) + 1``, the last the +Inf bucket). NaN without observations."""
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"counts needs {len(bounds) + 1} entries (the last +Inf), got {len(counts)}")
    if not 0.0 <= q <= 1.0:
        return math.inf if q > 1 else -math.inf  # as Prometheus answers a quantile outside [0, 1]
    total = float(sum(counts))
    if total <= 0:
        return math.nan
    rank = q * total
    below = 0.0
    for k, c in enumerate(counts):
        if below + c >= rank and c > 0:
            if k == len(bounds):  # the +Inf bucket: the highest finite bound
                return float(bounds[-1])
            start = 0.0 if k == 0 else float(bounds[k - 1])
            if k == 0 and bounds[0] <= 0:
                return float(bounds[0])
            return start + (float(bounds[k]) - start) * (rank - below) / c
        below += c
    return float(bounds[-1])

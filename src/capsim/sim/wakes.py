"""Where a wake from zero pods goes: the first request, the controller's step, the node, the pod, the first token.

A Deployment that scaled to zero (KEDA, or the HPA with ``minReplicas: 0``) wakes when its controller sets
a count above zero. For each such step :func:`wakes` gives one row: the first request that came while the
Deployment was at zero (and no pod was serving), when the controller woke it, when the first pod it then
created was placed on a node (with a ``cluster`` section: after a node was provisioned if none had room),
when that pod was ready, and the earliest first token of the requests that came meanwhile. The
differences say which part of the wait to shorten: the controller's polling and its metric's window, the
node's provisioning, or the pod's start (image pull, model load, probes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from capsim.model.scenario import Slo
from capsim.sim.pod import Pod
from capsim.sim.recorder import percentiles
from capsim.sim.summary import Summary

#: Columns of ``SimResult.wakes``.
WAKE_COLUMNS = ("to_zero_s", "first_request_s", "woke_s", "by", "pod", "placed_s", "ready_s", "first_token_s",
                "waited_s")


def wakes(scale_events: Sequence[tuple[float, int, int, str]], pods: Sequence[Pod],
          placements: Sequence[tuple[float, int, int, int]], requests: pd.DataFrame) -> pd.DataFrame:
    """One row per step from zero replicas (``WAKE_COLUMNS``; NaN or -1 where a part did not happen)."""
    if not any(before == 0 and after > 0 for _, before, after, _ in scale_events):
        return pd.DataFrame([], columns=list(WAKE_COLUMNS))  # no wake (most runs): nothing to read
    placed: dict[int, float] = {}
    for t, pod_id, _node, _zone in placements:
        placed.setdefault(pod_id, t)  # its first placement
    arrival = requests["arrival_s"].to_numpy()
    first_token = requests["first_token_s"].to_numpy(dtype=float)
    rows: list[dict[str, Any]] = []
    to_zero = math.nan
    for t, before, after, by in scale_events:
        if after == 0:
            to_zero = t
            continue
        if before != 0:
            continue
        # requests that came while at zero: after the step to zero (or from the start) until the wake's pod
        # was ready; the wake's pod: the first created at the step
        pod = next((p for p in pods if p.created_s >= t), None)
        ready = pod.first_ready_s if pod is not None and pod.first_ready_s is not None else math.nan
        came = _came(arrival, to_zero, ready)
        first_req = float(arrival[came].min()) if came.any() else math.nan
        tokens = first_token[came]
        tokens = tokens[~np.isnan(tokens)]
        first_tok = float(tokens.min()) if len(tokens) else math.nan
        rows.append({"to_zero_s": to_zero, "first_request_s": first_req, "woke_s": t, "by": by,
                     "pod": pod.id if pod is not None else -1,
                     "placed_s": placed.get(pod.id, math.nan) if pod is not None else math.nan,
                     "ready_s": ready, "first_token_s": first_tok, "waited_s": first_tok - first_req})
    return pd.DataFrame(rows, columns=list(WAKE_COLUMNS))


def _came(arrival: np.ndarray, to_zero_s: float, ready_s: float) -> np.ndarray:
    """Which requests came during one wake: after the step to zero (NaN: from the start) until the wake's pod
    was first ready (NaN: to the end, it never was)."""
    lo = to_zero_s if not math.isnan(to_zero_s) else -math.inf
    hi = ready_s if not math.isnan(ready_s) else math.inf
    return (arrival > lo) & (arrival <= hi)


def wake_mask(arrival: np.ndarray, frame: pd.DataFrame) -> np.ndarray:
    """Which requests came while the Deployment was at zero or waking (any row of ``frame``, :func:`wakes`)."""
    mask = np.zeros(len(arrival), dtype=bool)
    for w in frame.itertuples():
        mask |= _came(arrival, w.to_zero_s, w.ready_s)
    return mask


def wake_results(summary: Summary, requests: pd.DataFrame, frame: pd.DataFrame, slo: Slo,
                 warmup_s: float) -> Summary:
    """The summary with the wake numbers: the TTFT p99 of the measured ok requests that came while pods
    served, the longest TTFT of those that came during a wake, and with ``slo.max_wake_s`` the SLO judged
    on those two (``ttft_p99_s`` on the first, ``max_wake_s`` on the second) instead of the p99 of all."""
    arrival = requests["arrival_s"].to_numpy()
    measured = (arrival >= warmup_s) & (requests["outcome"] == "ok").to_numpy()
    ttft = requests["first_token_s"].to_numpy(dtype=float) - arrival
    during = wake_mask(arrival, frame)
    warm = ttft[measured & ~during]
    waking = ttft[measured & during]
    warm_p99 = percentiles(warm)[2] if len(warm) else math.nan
    longest = float(waking.max()) if len(waking) else math.nan
    changes: dict[str, Any] = {"ttft_p99_warm_s": warm_p99, "longest_wake_s": longest}
    if slo.max_wake_s is not None:
        wake_ok = math.isnan(longest) or longest <= slo.max_wake_s
        warm_ok = not math.isnan(warm_p99) and warm_p99 <= slo.ttft_p99_s
        changes["wake_slo_met"] = bool(wake_ok)
        changes["slo_met"] = bool(wake_ok and warm_ok and summary.error_rate <= slo.max_error_rate
                                  and summary.session_slo_met)
    return replace(summary, **changes)

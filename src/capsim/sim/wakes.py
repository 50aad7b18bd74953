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
from typing import Any

import numpy as np
import pandas as pd

from capsim.sim.pod import Pod

#: Columns of ``SimResult.wakes``.
WAKE_COLUMNS = ("to_zero_s", "first_request_s", "woke_s", "by", "pod", "placed_s", "ready_s", "first_token_s",
                "waited_s")


def wakes(scale_events: Sequence[tuple[float, int, int, str]], pods: Sequence[Pod],
          placements: Sequence[tuple[float, int, int, int]], requests: pd.DataFrame) -> pd.DataFrame:
    """One row per step from zero replicas (``WAKE_COLUMNS``; NaN or -1 where a part did not happen)."""
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
        lo = to_zero if not math.isnan(to_zero) else -math.inf
        hi = ready if not math.isnan(ready) else math.inf
        came = (arrival > lo) & (arrival <= hi)
        first_req = float(arrival[came].min()) if came.any() else math.nan
        tokens = first_token[came]
        tokens = tokens[~np.isnan(tokens)]
        first_tok = float(tokens.min()) if len(tokens) else math.nan
        rows.append({"to_zero_s": to_zero, "first_request_s": first_req, "woke_s": t, "by": by,
                     "pod": pod.id if pod is not None else -1,
                     "placed_s": placed.get(pod.id, math.nan) if pod is not None else math.nan,
                     "ready_s": ready, "first_token_s": first_tok, "waited_s": first_tok - first_req})
    return pd.DataFrame(rows, columns=list(WAKE_COLUMNS))

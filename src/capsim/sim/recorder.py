"""The columnar records of a run -- one slot per request, one row per batch -- and the frames built from them.

Per-request state lives in preallocated numpy arrays, never in one Python object per request, so ten
million requests fit in memory. A request served normally is written once, when its batch starts (its
batch id); its start, first-token and end times are the batch's and are joined in when the frame is
built. Only requests that end otherwise (rejected, timed out, failed) get their own end time and pod.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from capsim.model.request import OUTCOMES, requests_frame

if TYPE_CHECKING:
    from capsim.sim.pod import Batch

OK, REJECTED, TIMED_OUT, FAILED = (OUTCOMES.index(o) for o in ("ok", "rejected", "timed_out", "failed"))
PENDING = -1  # no final outcome (yet): served ones are resolved through their batch


class Records:
    """Per-request arrays (index = request id) and the batch table."""

    def __init__(self, prompt: np.ndarray, output: np.ndarray, turns: int) -> None:
        n = len(prompt)
        self.n = n
        self.turns = turns
        self.prompt = prompt
        self.output = output
        self.arrival = np.full(n, np.nan)  # first send by the client; NaN: never sent
        self.send = np.full(n, np.nan)  # send time of the current attempt
        self.bid = np.full(n, -1, dtype=np.int64)  # batch of the current attempt
        self.attempts = np.ones(n, dtype=np.int32)
        self.outcome = np.full(n, PENDING, dtype=np.int8)  # set only for outcomes other than ok
        self.end = np.full(n, np.nan)  # end of requests that did not end in their batch
        self.pod = np.full(n, -1, dtype=np.int32)  # pod of requests that did not end in a batch
        self.batches: list[Batch] = []

    def add_batch(self, batch: Batch) -> None:
        """Record a batch as it starts, giving it its id."""
        batch.bid = len(self.batches)
        self.batches.append(batch)
        self.bid[batch.idx] = batch.bid

    def finish(self, i: int, t: float, outcome: int, pod: int) -> None:
        """Give request ``i`` a final outcome other than ok at time ``t``."""
        self.outcome[i] = outcome
        self.end[i] = t
        self.pod[i] = pod

    def columns(self) -> dict[str, np.ndarray]:
        """The request columns of every request that was sent (``REQUEST_COLUMNS``; outcome as codes).

        ``outcome`` is -1 (missing) for requests still in flight at the horizon.
        """
        sent = np.flatnonzero(~np.isnan(self.arrival))
        nb = len(self.batches)
        bs = self.batches
        # one extra slot at the end stands for "no batch" (bid -1)
        b_start = _column(bs, "start", float, np.nan)
        b_first = _column(bs, "first", float, np.nan)
        b_end = _column(bs, "end", float, np.nan)
        b_size = _column(bs, "size", np.int32, 0)
        b_done = _column(bs, "done", bool, False)
        b_pod = np.append(np.fromiter((b.pod.id for b in bs), np.int32, nb), np.int32(-1))
        bid = self.bid[sent]
        bidx = np.where(bid >= 0, bid, nb)
        outcome = self.outcome[sent].copy()
        served = (outcome == PENDING) & b_done[bidx]
        outcome[served] = OK
        end = np.where(served, b_end[bidx], self.end[sent])
        first = b_first[bidx]
        first = np.where(first <= end, first, np.nan)  # a client gone before the first token never saw it
        pod = np.where(self.pod[sent] >= 0, self.pod[sent], b_pod[bidx])
        return {
            "request_id": sent,
            "session_id": sent // self.turns,
            "pod": pod,
            "arrival_s": self.arrival[sent],
            "start_s": b_start[bidx],
            "first_token_s": first,
            "end_s": end,
            "batch_size": b_size[bidx],
            "prompt_tokens": self.prompt[sent],
            "output_tokens": self.output[sent],
            "attempts": self.attempts[sent],
            "outcome": outcome,
        }

    def frame(self) -> Any:
        """The requests DataFrame (``capsim.model.request`` schema)."""
        return requests_frame(self.columns())


def _column(batches: list[Batch], name: str, dtype: Any, missing: Any) -> np.ndarray:
    """One attribute of every batch as an array, plus ``missing`` at the end (for bid -1)."""
    col = np.fromiter((getattr(b, name) for b in batches), dtype, len(batches))
    return np.append(col, np.array(missing, dtype=dtype))


def percentiles(values: np.ndarray, qs: Sequence[float] = (50, 95, 99)) -> list[float]:
    """Percentiles of the finite values, NaN when there are none."""
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return [math.nan for _ in qs]
    return [float(x) for x in np.percentile(v, qs)]


class Timeseries:
    """Rows sampled every interval: replicas by state, queue, in flight, busy fraction, the HPA's view."""

    COLUMNS = ("time_s", "arrivals", "arrival_rate_per_s", "completed", "errors", "desired_replicas",
               "ready_replicas", "starting_replicas", "pending_replicas", "terminating_replicas",
               "queue_depth", "in_flight", "busy_fraction", "hpa_metric")

    def __init__(self) -> None:
        self.rows: list[tuple[float, ...]] = []

    def add(self, row: tuple[float, ...]) -> None:
        self.rows.append(row)

    def frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(self.COLUMNS))

"""The columnar records of a run -- one slot per request, one row per batch -- and the frames built from them.

Per-request state lives in preallocated numpy arrays, never in one Python object per request, so ten
million requests fit in memory. A request served normally is written once, when its batch starts (its
batch id); its start, first-token and end times are the batch's and are joined in when the frame is
built. Only requests that end otherwise (rejected, timed out, failed) get their own end time and pod.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import attrgetter
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
        self.bid = np.full(n, -1, dtype=np.int32)  # batch of the current attempt
        self.attempts = np.ones(n, dtype=np.int32)
        self.outcome = np.full(n, PENDING, dtype=np.int8)  # set only for outcomes other than ok
        # end and pod of requests that did not end in a batch: few, so kept sparse
        self.end_of: dict[int, float] = {}
        self.pod_of: dict[int, int] = {}
        self.batches: list[Batch] = []
        # running static batches by (end, SimPy event id, batch): completed by Client.run, outside SimPy's
        # event queue (Pod._end_at)
        self.ending: list[tuple[float, int, Batch]] = []
        # static batches: their answers reach the clients answer_s + size x answer_per_request_s after the
        # batch ends (service.answer_ms, answer_per_request_ms; a continuous pod's runs end at the answer)
        self.answer_s = 0.0
        self.answer_per_request_s = 0.0

    def way_out(self, size: Any) -> Any:
        """From a static batch's end to its answers at the clients, for a batch of ``size`` (or an array)."""
        return self.answer_s + self.answer_per_request_s * size

    def add_batch(self, batch: Batch, i: int | None = None) -> None:
        """Record a batch as it starts, giving it its id; ``i``: its one request (filed by a scalar index)."""
        batch.bid = bid = len(self.batches)
        self.batches.append(batch)
        self.bid[batch.idx if i is None else i] = bid

    def finish(self, i: int, t: float, outcome: int, pod: int) -> None:
        """Give request ``i`` a final outcome other than ok at time ``t``."""
        self.outcome[i] = outcome
        self.end_of[i] = t
        self.pod_of[i] = pod

    def columns(self) -> dict[str, np.ndarray]:
        """The request columns of every request that was sent (``REQUEST_COLUMNS``; outcome as codes).

        ``outcome`` is -1 (missing) for requests still in flight when the run ended (the horizon, plus
        ``scenario.drain_s``). This consumes the records: the per-request arrays and the batch table are
        released as the columns are built, so ten million requests never exist three times over.
        """
        mask = ~np.isnan(self.arrival)
        everyone = bool(mask.all())
        sent = np.arange(self.n, dtype=np.int64) if everyone else np.flatnonzero(mask)
        del mask

        def pick(a: np.ndarray) -> np.ndarray:
            return a if everyone else a[sent]

        bs = self.batches
        nb = len(bs)
        bid = pick(self.bid)
        self.bid = _RELEASED.astype(np.int32)
        bidx = np.where(bid >= 0, bid, nb)  # slot nb stands for "no batch"
        del bid
        outcome = pick(self.outcome)
        self.outcome = _RELEASED.astype(np.int8)
        served = (outcome == PENDING) & _column(bs, "done", bool, False)[bidx]
        outcome[served] = OK
        size = _column(bs, "size", np.int32, 0)[bidx]
        end = np.where(served, _column(bs, "end", float, np.nan)[bidx], np.nan)
        if self.answer_s or self.answer_per_request_s:
            end += self.way_out(size)
        del served
        own_pod = np.full(len(sent), -1, dtype=np.int32)
        if self.end_of:
            keys = np.fromiter(self.end_of, np.int64, len(self.end_of))
            rows = keys if everyone else np.searchsorted(sent, keys)
            end[rows] = np.fromiter(self.end_of.values(), float, len(keys))
            own_pod[rows] = np.fromiter(self.pod_of.values(), np.int32, len(keys))
        self.end_of, self.pod_of = {}, {}
        first = _column(bs, "first", float, np.nan)[bidx]
        first[~(first <= end)] = np.nan  # a client gone before the first token never saw it
        b_pod = np.append(np.fromiter((b.pod.id for b in bs), np.int32, nb), np.int32(-1))
        pod = np.where(own_pod >= 0, own_pod, b_pod[bidx])
        del own_pod, b_pod
        start = _column(bs, "start", float, np.nan)[bidx]
        del bidx
        self.send = _RELEASED.astype(float)
        cols = {
            "request_id": sent,
            "session_id": sent // self.turns if self.turns > 1 else sent,
            "pod": pod,
            "arrival_s": pick(self.arrival),
            "start_s": start,
            "first_token_s": first,
            "end_s": end,
            "batch_size": size,
            "prompt_tokens": pick(self.prompt),
            "output_tokens": pick(self.output),
            "attempts": pick(self.attempts),
            "outcome": outcome,
        }
        return cols

    def frame(self) -> Any:
        """The requests DataFrame (``capsim.model.request`` schema)."""
        return requests_frame(self.columns())


_RELEASED = np.empty(0, dtype=np.int64)


def _column(batches: list[Batch], name: str, dtype: Any, missing: Any) -> np.ndarray:
    """One attribute of every batch as an array, plus ``missing`` at the end (for bid -1)."""
    col = np.fromiter(map(attrgetter(name), batches), dtype, len(batches))
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
               "queue_depth", "in_flight", "busy_fraction", "hpa_metric", "crashed_replicas", "gpus_held",
               "node_gpus")

    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        self.rows: list[tuple[float, ...]] = []
        self.columns = self.COLUMNS + extra  # a mode's own columns (continuous batching: KV-cache use)

    def add(self, row: tuple[float, ...]) -> None:
        self.rows.append(row)

    def frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(self.columns))

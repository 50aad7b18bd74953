"""InferenceMetrics records one pod's inference and state-store metrics in its own Prometheus registry.

The batcher reports each batch and each request's fate; the session store reports each operation; a
scrape (``render()``) reads the queue depth at that moment. Every metric is defined once in
``docs/metrics.md`` with its symbol, unit and the simulator column it corresponds to.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Final

import pandas as pd
from prometheus_client import CONTENT_TYPE_LATEST as _CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from capsim.model.buckets import TTFT_BUCKETS_S as SHARED_TTFT_BUCKETS_S

CONTENT_TYPE: Final[str] = _CONTENT_TYPE
"""The HTTP Content-Type of ``render()``'s text."""

REQUEST_OUTCOMES: Final = ("ok", "failed", "rejected", "cancelled", "closed")
#: the turn route, as http_requests_total's handler label names it, and the status classes published at zero
TURN_HANDLER: Final = "/v1/sessions/{session_id}/turns"
HTTP_STATUS_CLASSES: Final = ("2xx", "4xx", "5xx")
STORE_OPS: Final = ("get", "put", "update", "delete", "ping")
STORE_OUTCOMES: Final = (
    "ok",
    "not_found",
    "conflict",
    "unavailable",
    "corrupt",
    "too_large",
    "invalid_id",
    "error",
    "cancelled",
)

# Seconds. LLM serving spans a few ms (a queue hop, a short decode) to tens of seconds (long
# generations under load); roughly x1.5-2 steps keep quantile interpolation error near 25%.
LATENCY_BUCKETS_S: Final = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# Time to first token: the simulated pod counts its observations in the same buckets (capsim.model.buckets).
TTFT_BUCKETS_S: Final = SHARED_TTFT_BUCKETS_S
# Queue wait is often sub-millisecond when idle and bounded by max_wait plus backlog when busy.
QUEUE_WAIT_BUCKETS_S: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_SERVICE_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Requests per batch: powers of two, the sizes batchers and GPU kernels favour.
BATCH_SIZE_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# A store operation is a loopback round trip (~0.1-1 ms) up to the 1.5 s unavailability deadline.
STORE_OP_BUCKETS_S: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


class InferenceMetrics:
    """The metrics of one pod; implements the batcher's and the session store's metrics protocols."""

    def __init__(self, namespace: str = "capsim", const_labels: dict[str, str] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        kw: dict[str, Any] = {"namespace": namespace, "registry": self.registry}
        lab = dict(const_labels or {})
        self._latency = Histogram(
            "request_latency_seconds",
            "Arrival to last token of a completed request.",
            buckets=LATENCY_BUCKETS_S,
            **kw,
        )
        self._ttft = Histogram(
            "time_to_first_token_seconds",
            "Arrival to first token of a request that produced one.",
            buckets=TTFT_BUCKETS_S,
            **kw,
        )
        self._queue_wait = Histogram(
            "queue_wait_seconds",
            "Arrival to the start of the batch that served the request.",
            buckets=QUEUE_WAIT_BUCKETS_S,
            **kw,
        )
        self._batch_size = Histogram(
            "batch_size", "Requests per dispatched batch.", buckets=BATCH_SIZE_BUCKETS, **kw
        )
        self._batch_service = Histogram(
            "batch_service_seconds",
            "Time the runner took for one batch.",
            buckets=BATCH_SERVICE_BUCKETS_S,
            **kw,
        )
        self._queue_depth = Gauge(
            "queue_depth", "Requests waiting in the batcher queue at scrape time.", **kw
        )
        self._queue_depth.set_function(lambda: math.nan)  # until a batcher binds its queue
        self._in_flight = Gauge(
            "requests_in_flight", "Requests the pod has accepted and not yet answered.", **kw
        )
        self._busy_s = 0.0  # runner seconds so far
        # (monotonic time, busy seconds) at the last scrape; the first scrape reads from here, the start
        self._busy_mark = (time.monotonic(), 0.0)
        self._busy_ratio = Gauge(
            "gpu_busy_ratio",
            "Share of wall time the model ran batches since the previous scrape (the accelerator's duty cycle).",
            **kw,
        )
        self._busy_ratio.set_function(self._busy_since_last_scrape)
        self._requests = Counter(
            "requests", "Requests that left the pod, by outcome.", labelnames=("outcome",), **kw
        )
        self._store_ops = Counter(
            "state_store_operations",
            "Session-store operations, by operation and outcome.",
            labelnames=("op", "outcome"),
            **kw,
        )
        self._store_seconds = Histogram(
            "state_store_operation_seconds",
            "Duration of session-store operations, retries included.",
            labelnames=("op",),
            buckets=STORE_OP_BUCKETS_S,
            **kw,
        )
        # What the pod's HTTP server answered, by handler, method and status class: the counter vLLM's server
        # exports (prometheus-fastapi-instrumentator's http_requests_total, status grouped as "2xx"), which a
        # canary's error rate reads from the pods themselves (capsim export's analysis-template.yaml). A request
        # the server never took (a refused connection while it shuts down) is not in it.
        self._http = Counter(
            "http_requests", "Requests the pod's HTTP server answered, by handler, method and status class.",
            labelnames=("handler", "method", "status"), registry=self.registry,
        )
        # Publish every known series at zero, so rates and absent() work before the first event (the turn route's
        # children bound once: a label lookup per turn is the pod's hot path, issue 11).
        self._turn_http = {s: self._http.labels(handler=TURN_HANDLER, method="POST", status=s)
                           for s in HTTP_STATUS_CLASSES}
        for outcome in REQUEST_OUTCOMES:
            self._requests.labels(outcome=outcome)
        for op in STORE_OPS:
            self._store_seconds.labels(op=op)
            for outcome in STORE_OUTCOMES:
                self._store_ops.labels(op=op, outcome=outcome)
        self._const_labels = lab

    # -- the batcher's protocol (capsim.core.batcher.BatcherMetrics) -----------------------------

    def bind_queue_depth(self, read: Callable[[], int]) -> None:
        """Read the queue depth from ``read()`` at every scrape (a failing read reports NaN)."""

        def sample() -> float:
            try:
                return float(read())
            except Exception:  # a scrape must not fail because the batcher is shutting down
                return math.nan

        self._queue_depth.set_function(sample)

    def observe_batch(self, size: int, service_s: float) -> None:
        """One dispatched batch of ``size`` requests that the runner served in ``service_s`` seconds."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self._batch_size.observe(size)
        self._batch_service.observe(service_s)
        self._busy_s += service_s

    def _busy_since_last_scrape(self) -> float:
        now = time.monotonic()
        mark, self._busy_mark = self._busy_mark, (now, self._busy_s)
        if now <= mark[0]:
            return math.nan  # no time since the previous scrape
        return min(max((self._busy_s - mark[1]) / (now - mark[0]), 0.0), 1.0)

    # -- the pod's own gauges ------------------------------------------------------------------------

    def request_started(self) -> None:
        """The pod accepted a request (``capsim_requests_in_flight`` goes up)."""
        self._in_flight.inc()

    def request_finished(self) -> None:
        """The pod answered (or failed) a request it had accepted."""
        self._in_flight.dec()

    def observe_request(
        self,
        outcome: str,
        queue_wait_s: float | None,
        ttft_s: float | None,
        latency_s: float | None,
    ) -> None:
        """One request leaving the pod; None for a time that did not happen (e.g. no first token)."""
        if outcome not in REQUEST_OUTCOMES:
            raise ValueError(f"request outcome must be one of {REQUEST_OUTCOMES}, got {outcome!r}")
        self._requests.labels(outcome=outcome).inc()
        if queue_wait_s is not None:
            self._queue_wait.observe(queue_wait_s)
        if ttft_s is not None:
            self._ttft.observe(ttft_s)
        if latency_s is not None and outcome == "ok":
            self._latency.observe(latency_s)

    def observe_turn(self, status_code: int) -> None:
        """One answer of the turn route (``http_requests_total``, its status as its class: ``4xx``)."""
        status = f"{status_code // 100}xx"
        child = self._turn_http.get(status)
        if child is None:  # a 1xx or 3xx: the route answers none, but a count must not be lost
            child = self._turn_http[status] = self._http.labels(handler=TURN_HANDLER, method="POST", status=status)
        child.inc()

    # -- the session store's protocol (capsim.core.state.StoreMetrics) -----------------------------

    def observe_store_op(self, op: str, outcome: str, seconds: float) -> None:
        """One session-store operation (``get``, ``put``, ``update``, ``delete``, ``ping``)."""
        self._store_ops.labels(op=op, outcome=outcome).inc()
        self._store_seconds.labels(op=op).observe(seconds)

    # -- reading -----------------------------------------------------------------------------------

    def render(self) -> str:
        """The Prometheus text exposition of every metric (serve with ``CONTENT_TYPE``)."""
        return generate_latest(self.registry).decode("utf-8")

    def snapshot(self) -> pd.DataFrame:
        """Every current sample as a frame: metric, type, sample, one column per label, value.

        ``*_created`` timestamps are left out; histogram buckets carry their bound in column ``le``.
        """
        rows: list[dict[str, Any]] = []
        for family in self.registry.collect():
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                rows.append(
                    {
                        "metric": family.name,
                        "type": family.type,
                        "sample": s.name,
                        **s.labels,
                        "value": s.value,
                    }
                )
        frame = pd.DataFrame(rows)
        front = ["metric", "type", "sample"]
        labels = sorted(c for c in frame.columns if c not in (*front, "value"))
        return frame[[*front, *labels, "value"]]

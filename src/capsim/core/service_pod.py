"""The pod's live parts (``PodState``) and its drain: on SIGTERM every turn in flight is bounded by
``drain_timeout_s``; it finishes, or answers 503 with ``Retry-After``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from capsim.core.batcher import DynamicBatcher
from capsim.core.continuous_batcher import ContinuousBatcher
from capsim.core.engine import GenerationRequest, GenerationResult, ReferenceEngine
from capsim.core.metrics import InferenceMetrics
from capsim.core.service_config import PodConfig
from capsim.core.state import SessionStore

RETRY_AFTER = {"Retry-After": "1"}  # on every 503: the pod or its store should be back, or another pod up


class HTTPError(Exception):
    """An answer other than 200: status, the ``detail`` a client sees, and headers (``Retry-After``)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}



@dataclass
class PodState:
    """The pod's live parts, created by the app's lifespan."""

    config: PodConfig
    engine: ReferenceEngine
    store: SessionStore
    batcher: DynamicBatcher[GenerationRequest, GenerationResult] | ContinuousBatcher
    metrics: InferenceMetrics
    ready: bool = False
    draining: bool = False
    store_ok_until: float = 0.0
    started: float = field(default_factory=time.monotonic)
    loop: asyncio.AbstractEventLoop | None = None
    drain_deadline: float | None = None  # loop time at which turns still running answer 503
    dead: str | None = None  # why the engine died (a step or forward pass raised): the pod refuses turns and exits
    bounds: set[asyncio.Timeout] = field(default_factory=set)  # one per turn in flight

    def begin_drain(self) -> None:
        """Go unready and refuse new turns at once; bound every turn in flight by ``drain_timeout_s``.

        Safe to call from a signal handler: it only sets flags and hands the rest to the event loop.
        """
        self.ready = False
        self.draining = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._bound_in_flight)

    def engine_died(self, exc: Exception) -> None:
        """A step or forward pass raised ``exc`` and the requests it held failed with it: the pod is dead, as
        vLLM's server is once its engine dies. Unready, unhealthy, new turns refused with 503; the server (when
        one runs the app) shuts down and ``serve`` exits 1."""
        self.dead = f"{type(exc).__name__}: {exc}"
        self.begin_drain()

    def _bound_in_flight(self) -> None:
        if self.drain_deadline is None:
            self.drain_deadline = asyncio.get_running_loop().time() + self.config.drain_timeout_s
        for bound in list(self.bounds):
            bound.reschedule(self.drain_deadline)

    def drain_left_s(self) -> float:
        """Seconds left of the drain budget (the whole budget before a drain began)."""
        if self.drain_deadline is None or self.loop is None:
            return self.config.drain_timeout_s
        return max(0.0, self.drain_deadline - self.loop.time())

    @asynccontextmanager
    async def drain_bound(self) -> AsyncIterator[None]:
        """Run a turn; if the pod drains and the budget runs out first, raise the documented 503."""
        bound: asyncio.Timeout | None = None
        try:
            async with asyncio.timeout(self.drain_deadline) as bound:
                self.bounds.add(bound)
                yield
        except TimeoutError:
            if bound is None or not bound.expired():
                raise
            raise HTTPError(
                503,
                f"pod drained (drain_timeout_s={self.config.drain_timeout_s:g}) before this turn finished; "
                "retry on another pod (with the same Idempotency-Key, a turn that was stored is not stored twice)",
                RETRY_AFTER,
            ) from None
        finally:
            if bound is not None:
                self.bounds.discard(bound)

"""An asyncio dynamic batcher: groups concurrent requests into one runner call by the shared policy.

Requests wait in a bounded FIFO queue; ``capsim.policy.batching.decide`` (the same rule the simulated
pod runs) says, on the loop's monotonic clock, when the head of the queue leaves as one batch.
Every submitted request resolves exactly once: with its result, its own exception, its batch's
exception, or ``BatcherClosedError``; and it reports exactly one outcome to the metrics, whichever
of the caller, the dispatcher, a batch or ``aclose`` ends it first (a cancelled request included).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Generic, NamedTuple, Protocol, TypeVar

from capsim.errors import CapsimError
from capsim.model.settings import BatchSettings
from capsim.policy.batching import decide

P = TypeVar("P")
R = TypeVar("R")

Runner = Callable[[list[P]], Awaitable[Sequence[R | BaseException]]]
"""An async callable that takes a batch of payloads and returns one result per payload, in order.

A result that is an exception instance fails only that request."""


class BatcherError(CapsimError, RuntimeError):
    """Base class of the batcher's own errors."""


class QueueFullError(BatcherError):
    """The queue is at capacity (overflow 'reject', or a 'wait' that timed out).

    ``retry_after_s`` is a hint for clients (the pod maps this error to 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatcherClosedError(BatcherError):
    """The batcher is closed, or closed before this request could run."""


class BatchResultMismatchError(BatcherError):
    """The runner returned a different number of results than the batch had payloads."""


TRACE_BATCHES = 8192  # the last batches kept for ``DynamicBatcher.trace`` by default (about 2 minutes at full load)


class BatchRecord(NamedTuple):
    """One finished batch, on the loop's clock (``time.monotonic``, the clock ``time.perf_counter`` also
    reads on Linux, so other processes can line it up with theirs): what ``capsim validate`` reads to
    see the pod's batch cycle and which requests each batch took."""

    start: float  # the dispatcher handed it to the runner
    end: float  # the loop saw the runner return
    size: int
    enqueued: tuple[float, ...]  # when each of its requests entered the queue
    engine_start: float  # the engine's own start and end (perf_counter; 0 if the results do not say)
    engine_end: float


class BatcherMetrics(Protocol):
    """What the batcher reports; ``capsim.core.metrics.InferenceMetrics`` implements it."""

    def bind_queue_depth(self, read: Callable[[], int]) -> None:
        """Register a callable the metrics read the current queue depth from."""

    def observe_batch(self, size: int, service_s: float) -> None:
        """One batch of ``size`` requests ran for ``service_s`` seconds."""

    def observe_request(
        self, outcome: str, queue_wait_s: float | None, ttft_s: float | None, latency_s: float | None
    ) -> None:
        """A request ended ('ok', 'failed', 'rejected', 'cancelled' or 'closed'); None: did not happen."""


class _Entry(Generic[P, R]):
    """One submitted request.

    ``dispatched``: the dispatcher took it off the queue into a batch (or dropped it as cancelled),
    so a cancelled caller's handler leaves the queue alone. ``settled``: its one metrics outcome has
    been reported; every path that ends a request reports through ``DynamicBatcher._settle``, which
    reports only once (so a caller cancelled after ``aclose`` or an expiry failed it counts once).
    """

    __slots__ = ("dispatched", "enqueued_at", "future", "payload", "settled")

    def __init__(self, payload: P, future: asyncio.Future[R], enqueued_at: float) -> None:
        self.payload = payload
        self.future = future
        self.enqueued_at = enqueued_at
        self.dispatched = False
        self.settled = False


class DynamicBatcher(Generic[P, R]):
    """Batch concurrent ``submit`` calls into runner calls.

    ``async with DynamicBatcher(runner, settings) as batcher: result = await batcher.submit(payload)``

    ``close_timeout_s`` bounds how long ``aclose`` drains queued and running work before failing what
    is left with ``BatcherClosedError``; ``trace_batches`` is how many of the last batches ``trace`` keeps.
    """

    def __init__(
        self,
        runner: Runner[P, R],
        settings: BatchSettings | None = None,
        metrics: BatcherMetrics | None = None,
        *,
        close_timeout_s: float = 30.0,
        trace_batches: int = TRACE_BATCHES,
    ) -> None:
        if close_timeout_s < 0:
            raise ValueError(f"close_timeout_s must be >= 0, got {close_timeout_s}")
        if isinstance(trace_batches, bool) or not isinstance(trace_batches, int) or trace_batches < 1:
            raise ValueError(f"trace_batches must be a whole number >= 1, got {trace_batches!r}")
        self._runner = runner
        self.settings = settings or BatchSettings()
        self._metrics = metrics
        self._close_timeout_s = close_timeout_s
        self._queue: deque[_Entry[P, R]] = deque()
        self._space_waiters: deque[_Entry[P, R]] = deque()  # 'wait' callers not yet in the queue
        self._batches: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._closing = False
        self._closed = False
        self.batches_run = 0
        # a ring of the last batches (one tuple per batch, not per request: cheap enough to keep on)
        self.trace: deque[BatchRecord] = deque(maxlen=trace_batches)
        self.trace_total = 0  # batches ever appended to the trace (those it no longer holds included)
        #: called with the error after a runner call raised and its batch failed with it (the pod: its engine
        #: died, as vLLM's, and it exits unless kept alive); None: serve on
        self.on_failure: Callable[[Exception], None] | None = None
        if metrics is not None:
            metrics.bind_queue_depth(self.queue_depth)

    # ---- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> DynamicBatcher[P, R]:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start the dispatcher on the running loop."""
        if self._dispatcher is not None:
            raise RuntimeError("batcher already started")
        if self._closing:
            raise BatcherClosedError("batcher is closed")
        self._loop = asyncio.get_running_loop()
        self._dispatcher = self._loop.create_task(self._dispatch_loop(), name="capsim-batcher")

    async def aclose(self, timeout_s: float | None = None) -> None:
        """Stop intake, drain queued and running work within ``timeout_s`` (default: the
        constructor's ``close_timeout_s``), then fail whatever is left with ``BatcherClosedError``."""
        if self._closed:
            return
        self._closing = True
        timeout = self._close_timeout_s if timeout_s is None else timeout_s
        while self._space_waiters:
            entry = self._space_waiters.popleft()
            self._fail(entry, BatcherClosedError("batcher closed while waiting for queue space"), "closed")
        self._poke()
        if self._dispatcher is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._dispatcher), timeout)
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for task in list(self._batches):
            task.cancel()
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        while self._queue:
            entry = self._queue.popleft()
            self._fail(entry, BatcherClosedError("batcher closed before the request ran"), "closed")
        self._closed = True

    # ---- public state ----------------------------------------------------------------------
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting those running)."""
        return len(self._queue)

    @property
    def in_flight_batches(self) -> int:
        """Batches currently running."""
        return len(self._batches)

    @property
    def closed(self) -> bool:
        return self._closing

    # ---- intake ----------------------------------------------------------------------------
    async def submit(self, payload: P, *, space_timeout_s: float | None = None) -> R:
        """Queue one payload and return its result once its batch has run.

        With overflow 'reject' a full queue raises ``QueueFullError`` at once; with 'wait' the call
        waits for space, FIFO behind earlier waiters, up to ``space_timeout_s`` seconds (None: no
        bound) before raising it. A request's batching timer starts when it enters the queue.
        """
        if self._closing or self._loop is None:
            raise BatcherClosedError("batcher is not running" if not self._closing else "batcher is closed")
        loop = self._loop
        settings = self.settings
        future: asyncio.Future[R] = loop.create_future()
        entry = _Entry(payload, future, loop.time())
        timer = None
        if len(self._queue) >= settings.queue_capacity or self._space_waiters:
            if settings.overflow == "reject":
                self._observe("rejected", None, None, None)
                raise QueueFullError(
                    f"queue is full ({settings.queue_capacity} requests)",
                    retry_after_s=max(settings.max_wait_s, 1.0),
                )
            self._space_waiters.append(entry)
            if space_timeout_s is not None:
                timer = loop.call_later(space_timeout_s, self._expire_waiter, entry, space_timeout_s)
        else:
            self._queue.append(entry)
            self._poke()
        try:
            return await future
        except asyncio.CancelledError:
            if not entry.dispatched:
                with contextlib.suppress(ValueError):
                    self._space_waiters.remove(entry)
                with contextlib.suppress(ValueError):
                    self._queue.remove(entry)
                    self._release_space(1)
                self._settle(entry, "cancelled", None, None, None)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire_waiter(self, entry: _Entry[P, R], timeout_s: float) -> None:
        """A 'wait' caller's space timeout: if it is still outside the queue, it is rejected."""
        try:
            self._space_waiters.remove(entry)
        except ValueError:
            return  # already queued, or gone
        if not entry.future.done():
            entry.future.set_exception(
                QueueFullError(
                    f"queue stayed full ({self.settings.queue_capacity} requests) for {timeout_s:g} s",
                    retry_after_s=max(self.settings.max_wait_s, 1.0),
                )
            )
            # its caller may still be cancelled before it resumes; _settle keeps this the one outcome
            self._settle(entry, "rejected", None, None, None)

    def _release_space(self, n: int) -> None:
        """Move up to ``n`` waiting 'wait' callers into freed queue slots, oldest first."""
        assert self._loop is not None
        moved = False
        while n > 0 and self._space_waiters:
            entry = self._space_waiters.popleft()
            if entry.future.done():
                continue
            entry.enqueued_at = self._loop.time()
            self._queue.append(entry)
            moved = True
            n -= 1
        if moved:
            self._poke()

    # ---- dispatch --------------------------------------------------------------------------
    def _poke(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _dispatch_loop(self) -> None:
        loop = self._loop
        assert loop is not None
        try:
            await self._dispatch_forever(loop)
        except Exception as exc:  # a bug here must not leave callers hanging
            self._closing = True
            while self._queue:
                self._fail(self._queue.popleft(), BatcherClosedError(f"batcher failed: {exc!r}"), "closed")
            raise

    async def _dispatch_forever(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            wake_at = self._dispatch_ready(loop)
            if self._closing and not self._queue and not self._batches:
                return
            self._wake = loop.create_future()
            timer = loop.call_at(wake_at, self._poke) if wake_at is not None else None
            try:
                await self._wake
            finally:
                if timer is not None:
                    timer.cancel()

    def _dispatch_ready(self, loop: asyncio.AbstractEventLoop) -> float | None:
        """Start every batch the policy allows now; return when to ask again (None: on an event)."""
        settings = self.settings
        queue = self._queue
        while True:
            while queue and queue[0].future.done():  # cancelled before its coroutine could unqueue it
                entry = queue.popleft()
                entry.dispatched = True
                self._settle(entry, "cancelled", None, None, None)  # its handler will see it dispatched
                self._release_space(1)
            if not queue:
                return None
            decision = decide(loop.time(), len(queue), queue[0].enqueued_at, settings, len(self._batches))
            size = decision.size
            if size == 0 and self._closing and len(self._batches) < settings.max_concurrent_batches:
                size = min(len(queue), settings.max_batch_size)  # draining: nothing more will arrive
            if size == 0:
                return decision.wake_at
            batch: list[_Entry[P, R]] = []
            for _ in range(size):
                entry = queue.popleft()
                entry.dispatched = True
                if entry.future.done():
                    self._settle(entry, "cancelled", None, None, None)
                else:
                    batch.append(entry)
            self._release_space(size)
            if batch:
                task = loop.create_task(self._run_batch(batch))
                self._batches.add(task)
                task.add_done_callback(self._batch_done)

    def _release_slot(self) -> None:
        """The model is free: let the dispatcher start the next batch before this batch's callers resume.

        Waking the dispatcher first puts it ahead of the callers' continuations in the loop's queue, so
        the model starts on the next batch while the loop answers this one (store writes, responses).
        """
        task = asyncio.current_task()
        if task is not None:
            self._batches.discard(task)  # type: ignore[arg-type]
        self._poke()

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._poke()

    async def _run_batch(self, batch: list[_Entry[P, R]]) -> None:
        loop = self._loop
        assert loop is not None
        started = loop.time()
        try:
            results = await self._runner([e.payload for e in batch])
            if len(results) != len(batch):
                raise BatchResultMismatchError(
                    f"runner returned {len(results)} results for a batch of {len(batch)}"
                )
        except asyncio.CancelledError:
            for entry in batch:
                self._fail(entry, BatcherClosedError("batcher closed while the batch was running"), "closed")
            raise
        except Exception as exc:
            self.batches_run += 1
            ended = loop.time()
            self._release_slot()
            self._observe_batch(len(batch), ended - started)
            for entry in batch:
                self._fail(entry, exc, "failed", started - entry.enqueued_at, ended - entry.enqueued_at)
            if self.on_failure is not None:
                self.on_failure(exc)
            return
        self.batches_run += 1
        self._release_slot()
        self._record(batch, started, loop.time(), results)
        if self._metrics is None:  # the hot path: no timing bookkeeping per request
            for entry, result in zip(batch, results, strict=True):
                if entry.future.done():
                    continue
                if isinstance(result, BaseException):
                    entry.future.set_exception(result)
                else:
                    entry.future.set_result(result)  # type: ignore[arg-type]
            return
        ended = loop.time()
        self._observe_batch(len(batch), ended - started)
        for entry, result in zip(batch, results, strict=True):
            wait = started - entry.enqueued_at
            if isinstance(result, BaseException):
                self._fail(entry, result, "failed", wait, ended - entry.enqueued_at)
                continue
            if entry.future.done():  # cancelled by its caller while the batch ran
                self._settle(entry, "cancelled", wait, None, None)
                continue
            entry.future.set_result(result)  # type: ignore[arg-type]
            first = getattr(result, "first_token_s", None)
            ttft = wait + first if isinstance(first, int | float) else None
            self._settle(entry, "ok", wait, ttft, ended - entry.enqueued_at)

    def _record(self, batch: list[_Entry[P, R]], started: float, ended: float,
                results: Sequence[R | BaseException]) -> None:
        first = results[0] if results else None
        engine_start = getattr(first, "started_at", None)
        total = getattr(first, "total_s", None)
        if isinstance(engine_start, float) and isinstance(total, float):
            engine_end = engine_start + total
        else:
            engine_start = engine_end = 0.0
        self.trace.append(BatchRecord(started, ended, len(batch), tuple(e.enqueued_at for e in batch),
                                      engine_start, engine_end))
        self.trace_total += 1

    def _fail(
        self,
        entry: _Entry[P, R],
        exc: BaseException,
        outcome: str,
        wait: float | None = None,
        latency: float | None = None,
    ) -> None:
        """Fail one request with ``exc`` (unless its caller cancelled it first) and report it once."""
        if entry.future.cancelled():
            self._settle(entry, "cancelled", wait, None, None)
            return
        if not entry.future.done():
            entry.future.set_exception(exc)
        self._settle(entry, outcome, wait, None, latency)

    def _settle(
        self,
        entry: _Entry[P, R],
        outcome: str,
        wait: float | None,
        ttft: float | None,
        latency: float | None,
    ) -> None:
        """Report ``entry``'s one outcome; a second report of the same request is dropped."""
        if entry.settled:
            return
        entry.settled = True
        self._observe(outcome, wait, ttft, latency)

    def _observe(self, outcome: str, wait: float | None, ttft: float | None, latency: float | None) -> None:
        if self._metrics is not None:
            self._metrics.observe_request(outcome, wait, ttft, latency)

    def _observe_batch(self, size: int, service_s: float) -> None:
        if self._metrics is not None:
            self._metrics.observe_batch(size, service_s)


def as_runner(fn: Callable[[list[P]], Sequence[R | BaseException]]) -> Runner[P, R]:
    """Wrap a blocking batch function as a runner that runs in a worker thread, off the event loop."""

    async def run(items: list[P]) -> Sequence[R | BaseException]:
        return await asyncio.to_thread(fn, items)

    return run


__all__: list[str] = [
    "BatchRecord",
    "BatchResultMismatchError",
    "BatcherClosedError",
    "BatcherError",
    "BatcherMetrics",
    "DynamicBatcher",
    "QueueFullError",
    "Runner",
    "as_runner",
]

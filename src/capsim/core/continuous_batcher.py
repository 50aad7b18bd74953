"""The asyncio shell of continuous batching, a drop-in for the pod's ``DynamicBatcher``: one task steps a
``capsim.core.continuous.ContinuousEngine`` (each step in a worker thread) while there is work, requests join
at the next step and are answered as they finish; every step is kept in a trace (``StepRecord``, served at
``GET /debug/batches``), and the engine's numbers are exported under vLLM's metric names (``VllmMetrics``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from capsim.core.continuous import ContinuousEngine, RequestTooLargeError, StepReport
from capsim.core.engine import GenerationRequest, GenerationResult, ReferenceEngine
from capsim.policy.scheduling import Scheduler, SchedulerLimits

TRACE_STEPS = 16384  # the last steps kept for ``ContinuousBatcher.trace`` by default (10 s of 0.6-ms steps)


class StepRecord(NamedTuple):
    """One engine step as the pod ran it (``GET /debug/batches``), on ``time.perf_counter``: what the
    continuous validation fits the pod's step cycle from. Between two steps the event loop does the
    pod's other work (HTTP parsing, the store, answering); ``start - previous end`` is that gap, and
    ``engine_s - engine_cpu_s`` what the engine's thread waited (the GIL, the core) while it ran."""

    start: float  # the loop handed the step to the worker thread
    end: float  # the loop saw it return
    engine_s: float  # the step's own wall time, in the worker thread
    engine_cpu_s: float  # the worker thread's CPU time for the step
    prefill_tokens: int
    prefill_context: int  # sum over prefill chunks of tokens x context
    decodes: int
    decode_context: int
    arrivals: int  # requests submitted since the previous step ended (their HTTP work ran meanwhile)
    emitted: int  # tokens this step produced (each handed to its request's stream or answer)
    finished: int  # requests answered after this step
    after_idle: bool  # the loop waited for work before this step (the cycle to the previous end is no step)
    cached_tokens: int = 0  # prompt tokens this step's admissions found in the prefix cache (their KV copied in)

    @classmethod
    def fields(cls) -> list[str]:
        return list(cls._fields)


class ContinuousBatcher:
    """Serves ``submit(request)`` with continuous batching: one task steps the engine (each step in a
    worker thread) while there is work; requests join at the next step and are answered as they finish.

    Same surface as ``DynamicBatcher`` where the pod uses it (``async with``, ``submit``, ``aclose``,
    ``queue_depth``, ``closed``): a full waiting queue raises ``QueueFullError`` (429), a closed batcher
    ``BatcherClosedError`` (503), a request the engine can never fit ``ValueError`` with the reason.
    ``GenerationResult`` times run from the request's first step; ``batch_size`` is the number running
    when it was admitted. New requests are handed to the engine between steps, on the event loop, so the
    engine is only ever touched by one thread at a time.
    """

    def __init__(self, engine: ReferenceEngine, limits: SchedulerLimits, *, queue_capacity: int = 1024,
                 metrics: Any = None, trace_steps: int = TRACE_STEPS) -> None:
        self.engine = ContinuousEngine(engine, limits)
        self.queue_capacity = queue_capacity
        #: called with the error after a failed step has failed every request the engine held (the pod: its
        #: engine died, as vLLM's, and it exits unless kept alive); None: serve on
        self.on_failure: Callable[[Exception], None] | None = None
        self._metrics = metrics
        if metrics is not None and hasattr(metrics, "bind_queue_depth"):
            metrics.bind_queue_depth(self.queue_depth)
        self.vllm: VllmMetrics | None = None
        if metrics is not None and hasattr(metrics, "registry"):  # the pod's registry: vLLM's names too
            self.vllm = VllmMetrics(metrics.registry, engine.config.name, self)
        self._incoming: list[tuple[int, GenerationRequest, asyncio.Future[GenerationResult], float]] = []
        self._futures: dict[int, tuple[asyncio.Future[GenerationResult], float]] = {}
        self._started: dict[int, tuple[float, int]] = {}  # request -> (perf_counter at first step, running)
        self._first: dict[int, float] = {}
        self._times: dict[int, list[float]] = {}
        self._prompt_len: dict[int, int] = {}
        self._next_id = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: the last ``trace_steps`` steps (``StepRecord``), served by the pod at ``GET /debug/batches``
        self.trace: deque[StepRecord] = deque(maxlen=trace_steps)
        self.trace_total = 0  # steps ever appended to the trace (those it no longer holds included)
        self._arrivals = 0  # submitted since the last step ended

    async def __aenter__(self) -> ContinuousBatcher:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def closed(self) -> bool:
        return self._closed

    def queue_depth(self) -> int:
        """Requests waiting for the engine (never admitted, or preempted): vllm:num_requests_waiting."""
        return len(self._incoming) + len(self.engine.scheduler.waiting)

    def in_flight_batches(self) -> int:
        return 1 if self.engine.scheduler.running else 0

    async def submit(self, request: GenerationRequest, *, space_timeout_s: float | None = None) -> GenerationResult:
        from capsim.core.batcher import BatcherClosedError, QueueFullError

        if self._closed:
            raise BatcherClosedError("the batcher is closed")
        why = self.engine.scheduler.limits.rejection(len(request.prompt), request.max_new_tokens)
        if why is not None:
            raise RequestTooLargeError(f"request can never run on this engine: {why.value} "
                                       f"({len(request.prompt)} prompt + {request.max_new_tokens} new tokens)")
        if self.queue_depth() >= self.queue_capacity:
            self._observe("rejected", None)
            raise QueueFullError(f"queue full ({self.queue_capacity} waiting)")
        fut: asyncio.Future[GenerationResult] = asyncio.get_running_loop().create_future()
        rid = self._next_id
        self._next_id += 1
        self._incoming.append((rid, request, fut, time.perf_counter()))
        self._arrivals += 1
        assert self._wake is not None, "use the batcher inside 'async with' (or call start())"
        self._wake.set()
        return await fut

    async def aclose(self, timeout_s: float | None = None) -> None:
        """Refuse new requests; let the engine finish what it holds (within ``timeout_s``), then stop."""
        from capsim.core.batcher import BatcherClosedError

        self._closed = True
        if self._task is None:
            return
        assert self._wake is not None
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            self._task.cancel()
        held = [(rid, fut) for rid, (fut, _) in self._futures.items()]
        held += [(rid, fut) for rid, _, fut, _ in self._incoming]
        for rid, fut in held:
            self._end(rid, fut, BatcherClosedError("the pod shut down before the answer"), "closed")
        self._futures.clear()
        self._incoming.clear()

    def _observe(self, outcome: str, wait_s: float | None) -> None:
        """A request's one outcome to the pod's metrics (``capsim_requests_total``), with its queue wait if it
        started; the latency is observed for ``ok`` answers only (``_answer``)."""
        if self._metrics is not None:
            self._metrics.observe_request(outcome, wait_s, None, None)

    def _wait_of(self, rid: int) -> float | None:
        """Request ``rid``'s queue wait (received to its first step), or None if it never started."""
        started = self._started.get(rid)
        entry = self._futures.get(rid)
        return None if started is None or entry is None else started[0] - entry[1]

    def _end(self, rid: int, fut: asyncio.Future[GenerationResult], exc: Exception, outcome: str) -> None:
        """Request ``rid`` ends unanswered: its caller gets ``exc`` and the metrics ``outcome``, unless the caller
        has left already (then it was cancelled)."""
        wait = self._wait_of(rid)
        if fut.cancelled():
            self._observe("cancelled", wait)
        elif not fut.done():
            fut.set_exception(exc)
            self._observe(outcome, wait)

    def _forget(self, rid: int) -> None:
        del self._futures[rid]
        self._started.pop(rid, None)
        self._times.pop(rid, None)
        self._prompt_len.pop(rid, None)

    def _fail_all(self, exc: Exception) -> None:
        """A step raised ``exc``: the engine's state is not to be trusted, so every request it holds fails with
        it (the pod answers 500) and the engine starts again empty, as vLLM's requests fail when its engine
        dies; then ``on_failure`` hears of it (the pod exits, as vLLM's server does, unless kept alive)."""
        self.engine.reset()
        for rid in list(self._futures):
            self._end(rid, self._futures[rid][0], exc, "failed")
            self._forget(rid)
        if self.on_failure is not None:
            self.on_failure(exc)

    def _timed_step(self) -> tuple[StepReport, float]:
        """One engine step, in the worker thread, and that thread's CPU seconds for it."""
        c0 = time.thread_time()
        report = self.engine.step()
        return report, time.thread_time() - c0

    async def _loop(self) -> None:
        assert self._wake is not None
        ce = self.engine
        idle = True
        while True:
            for rid, req, fut, received in self._incoming:
                if fut.cancelled():
                    self._observe("cancelled", None)
                    continue
                ce.add(rid, req)  # submit checked that it fits
                self._futures[rid] = (fut, received)
                self._prompt_len[rid] = len(req.prompt)
            self._incoming.clear()
            for rid in [r for r, (f, _) in self._futures.items() if f.cancelled()]:  # clients gone
                ce.abort(rid)
                self._observe("cancelled", self._wait_of(rid))
                self._forget(rid)
            if not ce.has_work:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                idle = True
                continue
            t0 = time.perf_counter()
            try:
                report, cpu_s = await asyncio.to_thread(self._timed_step)
            except Exception as exc:  # a failed forward pass (out of memory, a driver error): no hang
                self._fail_all(exc)
                idle = True
                continue
            now = time.perf_counter()
            plan = report.plan
            self.trace.append(StepRecord(t0, now, report.seconds, cpu_s, plan.prefill_tokens, plan.prefill_context,
                                         plan.decodes, plan.decode_context, self._arrivals, len(report.emitted),
                                         len(report.finished), idle, sum(plan.cached.values())))
            self.trace_total += 1
            self._arrivals = 0
            idle = False
            for rid in report.plan.started:
                self._started[rid] = (t0, len(ce.scheduler.running))
            dropped = 0
            for rid in report.emitted:
                times = self._times.setdefault(rid, [])
                if self.vllm is not None:
                    entry = self._futures.get(rid)
                    if entry is not None and entry[0].cancelled():
                        # its client left while the step ran: vLLM's output processor drops an aborted
                        # request's output, so this token counts nowhere (no gap, first token or prompt)
                        dropped += 1
                    elif times:
                        self.vllm.itl.observe(now - times[-1])
                    elif entry is not None:
                        self.vllm.ttft.observe(now - entry[1])
                        self.vllm.prompt_tokens.inc(self._prompt_len[rid])  # as vLLM: at the first token
                times.append(now)
            if self.vllm is not None:
                if len(report.emitted) > dropped:
                    self.vllm.generation_tokens.inc(len(report.emitted) - dropped)
                if report.preempted:
                    self.vllm.preemptions.inc(len(report.preempted))
                self.vllm.sync_prefix(ce.scheduler)
            for rid in report.finished:
                self._answer(rid, now)

    def _answer(self, rid: int, now: float) -> None:
        fut, received = self._futures.pop(rid)
        start, running = self._started.pop(rid)
        times = self._times.pop(rid)
        tokens = self.engine.results.pop(rid)
        result = GenerationResult(tokens=tokens, first_token_s=times[0] - start, total_s=now - start,
                                  batch_size=running, prompt_tokens=self._prompt_len.pop(rid), token_times_s=[t - start for t in times],
                                  started_at=start, cached_tokens=self.engine.cached_tokens.pop(rid, 0))
        if fut.cancelled():  # its client left while the step that finished it ran
            self._observe("cancelled", start - received)
            return
        if self._metrics is not None:
            self._metrics.observe_request("ok", start - received, times[0] - received, now - received)
        if not fut.done():
            fut.set_result(result)


#: vLLM's TTFT buckets (s), from its V1 metrics (see /work/shared/reference/serving_engines.md).
VLLM_TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
#: Inter-token latency buckets (s): milliseconds to seconds, about 2x apart (chosen here).
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class VllmMetrics:
    """vLLM's metric names and meanings on a continuous-batching pod's registry (docs/metrics.md), labelled
    ``model_name`` as vLLM labels them, so an HPA or KEDA object written for vLLM reads this pod."""

    def __init__(self, registry: Any, model_name: str, batcher: ContinuousBatcher) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        sched = batcher.engine.scheduler
        lab = {"model_name": model_name}
        kw: dict[str, Any] = {"registry": registry, "labelnames": ("model_name",)}
        waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for the engine (new or preempted).", **kw)
        waiting.labels(**lab).set_function(lambda: float(batcher.queue_depth()))
        running = Gauge("vllm:num_requests_running", "Requests in the engine's running batch.", **kw)
        running.labels(**lab).set_function(lambda: float(len(sched.running)))
        kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache use: 1 - free / total blocks (0-1).", **kw)
        kv.labels(**lab).set_function(lambda: sched.kv_cache_usage)
        self.preemptions = Counter("vllm:num_preemptions", "Requests preempted (recompute).", **kw).labels(**lab)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival to first token.",
                              buckets=VLLM_TTFT_BUCKETS_S, **kw).labels(**lab)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between a request's successive tokens.",
                             buckets=ITL_BUCKETS_S, **kw).labels(**lab)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens, a request's counted at its first token.",
                                     **kw).labels(**lab)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", **kw).labels(**lab)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      **kw).labels(**lab)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                                   **kw).labels(**lab)
        self._prefix_seen = (0, 0)

    def sync_prefix(self, sched: Scheduler) -> None:
        """Bring the prefix-cache counters up to the scheduler's (cumulative) counts."""
        q, h = sched.prefix_queries_tokens, sched.prefix_hit_tokens
        q0, h0 = self._prefix_seen
        if q > q0:
            self.prefix_queries.inc(q - q0)
        if h > h0:
            self.prefix_hits.inc(h - h0)
        self._prefix_seen = (q, h)

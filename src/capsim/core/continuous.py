"""The reference model served by continuous batching: each engine step, as the shared scheduler decides it,
runs every scheduled prefill chunk and decode token.

``ContinuousEngine`` wraps a ``ReferenceEngine``'s model. Each request keeps its own KV cache in plain
torch (one ``(1, heads, slots, head_dim)`` tensor per layer for keys and for values, sized for its prompt
plus its output), freed when it finishes or is preempted; the scheduler (``capsim.policy.scheduling``)
counts the same cache in blocks. A step runs its decode rows (one new token each) as one batched pass and
each prefill chunk as its own pass, every row's new keys and values written into its own cache in place
(``capsim.core.continuous_forward``). A request whose computed tokens reach its known
tokens emits the greedy next token, streamed through its ``on_token`` hook. A preempted request is
recomputed from its prompt and the tokens it already emitted, so its output is what it would have been.

With prefix caching (``limits.enable_prefix_caching``) the engine hashes each full block of a request's
tokens, chained (block ``j``'s hash covers blocks ``0..j``), gives the hashes to the scheduler, and keeps
the keys and values of every computed full block by hash (one ``(heads, block_size, head_dim)`` tensor per
layer), dropping a hash when the scheduler evicts it. An admission that hits gets those blocks copied
into its own cache before the step, and computes only the rest of its prompt.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from capsim.core.continuous_forward import Row, forward_split
from capsim.core.engine import GenerationRequest, GenerationResult, ReferenceEngine
from capsim.policy.scheduling import Rejection, Scheduler, SchedulerLimits, Step


class RequestTooLargeError(ValueError):
    """A request can never run on this engine (longer than ``max_model_len``, or more KV blocks than the
    cache holds); the pod answers 413."""


@dataclass
class _Active:
    """A request's tokens so far and its own KV cache (``None`` while it holds none)."""

    request: GenerationRequest
    tokens: list[int]  # prompt + generated
    generated: list[int] = field(default_factory=list)
    k: list[torch.Tensor] | None = None
    v: list[torch.Tensor] | None = None
    hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks so far


@dataclass(frozen=True)
class StepReport:
    """What one engine step did: tokens emitted (request id -> token), and who finished or was preempted."""

    emitted: dict[int, int]
    finished: list[int]
    preempted: list[int]
    scheduled_tokens: int
    seconds: float  # scheduling, the forward pass and the bookkeeping: the whole step
    plan: Step  # the scheduler's step: its composition, for the step-time model


class ContinuousEngine:
    """Continuous-batching greedy generation of the reference model (see the module docstring)."""

    def __init__(self, engine: ReferenceEngine, limits: SchedulerLimits, *, cpu_clock: bool = False) -> None:
        """``cpu_clock``: time steps with this thread's CPU time (``time.thread_time``) instead of the wall
        clock -- on a shared CPU with torch on one thread, what the step would take on an idle machine."""
        cfg = engine.config
        if cpu_clock and (engine.device.type != "cpu" or torch.get_num_threads() != 1):
            raise ValueError("cpu_clock needs the CPU with torch on one thread (ReferenceEngine(threads=1))")
        self._clock = time.thread_time if cpu_clock else time.perf_counter
        if limits.max_model_len > cfg.max_seq_len:
            raise ValueError(f"max_model_len ({limits.max_model_len}) exceeds the model's max_seq_len "
                             f"({cfg.max_seq_len})")
        self.engine = engine
        self.model = engine.model
        self.scheduler = Scheduler(limits)
        self.active: dict[int, _Active] = {}
        self.results: dict[int, list[int]] = {}
        self._heads = cfg.n_heads
        self._head_dim = cfg.d_model // cfg.n_heads
        self._bs = limits.block_size
        #: keys and values of cached full blocks by hash (prefix caching), per layer
        self.kv_blocks: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._pool = self.scheduler.pool
        if self._pool is not None:
            self._pool.evicted = []  # the scheduler logs evictions so the KV store follows them

    # ---- queue -------------------------------------------------------------------------------------
    def add(self, request_id: int, request: GenerationRequest) -> Rejection | None:
        """Queue a request; the reason it can never run when it cannot (then it is not queued)."""
        a = _Active(request, list(request.prompt))
        if self._pool is not None:
            self._hash_blocks(a)
        why = self.scheduler.add(request_id, len(request.prompt), request.max_new_tokens, a.hashes)
        if why is None:
            self.active[request_id] = a
        return why

    def _hash_blocks(self, a: _Active) -> list[int]:
        """Hash ``a``'s full blocks not hashed yet (chained: each hash covers the whole prefix); the new ones."""
        bs = self._bs
        toks = a.tokens
        new = []
        prev = a.hashes[-1] if a.hashes else 0
        for j in range(len(a.hashes), len(toks) // bs):
            # Python's hash of a tuple of ints is deterministic across runs (no hash seed for ints)
            prev = hash((prev, *toks[j * bs : (j + 1) * bs]))
            new.append(prev)
        a.hashes.extend(new)
        return new

    def abort(self, request_id: int) -> None:
        """Drop a request (its client went away): its cache is freed at once."""
        self.scheduler.remove(request_id)
        del self.active[request_id]

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- one step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> StepReport:
        """Run one engine step: schedule, the forward passes, emit and stream tokens, free finished caches."""
        t0 = self._clock()
        plan = self.scheduler.step()
        for rid in plan.preempted:  # recompute: the scheduler reset its computed tokens to 0
            a = self.active[rid]
            a.k = a.v = None
        for rid, hit in plan.cached.items():  # prefix hits: their cached blocks' KV into their own cache
            self._load_hit(self.active[rid], hit)
        emitted: dict[int, int] = {}
        if plan.request_ids:
            nxt = self._forward(plan.request_ids, plan.num_tokens, plan.contexts)
            for rid, n, c, tok in zip(plan.request_ids, plan.num_tokens, plan.contexts, nxt, strict=True):
                a = self.active[rid]
                if c + n == len(a.tokens):  # every known token is computed: the next one is emitted
                    a.tokens.append(tok)
                    a.generated.append(tok)
                    emitted[rid] = tok
        if self._pool is not None:
            self._cache_blocks(plan)
            ext = self.scheduler.extend_hashes
            for rid in emitted:
                if rid in self.scheduler.requests:
                    more = self._hash_blocks(self.active[rid])
                    if more:
                        ext(rid, more)
        self.engine.synchronize()
        seconds = self._clock() - t0
        for rid, tok in emitted.items():
            req = self.active[rid].request
            if req.on_token is not None:
                req.on_token(len(self.active[rid].generated) - 1, tok, seconds)
        for rid in plan.finished:
            self.results[rid] = self.active.pop(rid).generated
        return StepReport(emitted, list(plan.finished), list(plan.preempted), plan.total_tokens, seconds, plan)

    def _new_cache(self, a: _Active) -> None:
        cap = len(a.request.prompt) + a.request.max_new_tokens
        shape = (1, self._heads, cap, self._head_dim)
        dev, dtype = self.engine.device, self.engine.dtype
        n_layers = len(self.model.blocks)
        a.k = [torch.zeros(shape, device=dev, dtype=dtype) for _ in range(n_layers)]
        a.v = [torch.zeros(shape, device=dev, dtype=dtype) for _ in range(n_layers)]

    def _load_hit(self, a: _Active, hit: int) -> None:
        """Copy the cached KV of ``a``'s first ``hit`` tokens (whole blocks) into a fresh cache of its own."""
        self._new_cache(a)
        assert a.k is not None and a.v is not None
        bs = self._bs
        for j in range(hit // bs):
            bk, bv = self.kv_blocks[a.hashes[j]]
            for layer, (k, v) in enumerate(zip(bk, bv, strict=True)):
                a.k[layer][0, :, j * bs : (j + 1) * bs] = k
                a.v[layer][0, :, j * bs : (j + 1) * bs] = v

    def _cache_blocks(self, plan: Step) -> None:
        """Keep the KV of the full blocks this step computed (by hash), and drop what the scheduler evicted."""
        pool = self._pool
        assert pool is not None and pool.evicted is not None
        store = self.kv_blocks
        for h in pool.evicted:
            store.pop(h, None)
        pool.evicted.clear()
        bs = self._bs
        for rid, n, c in zip(plan.request_ids, plan.num_tokens, plan.contexts, strict=True):
            a = self.active[rid]
            if a.k is None or a.v is None:
                continue
            for j in range(c // bs, min((c + n) // bs, len(a.hashes))):
                h = a.hashes[j]
                if h not in store and h in pool.users:
                    sl = slice(j * bs, (j + 1) * bs)
                    store[h] = ([k[0, :, sl].clone() for k in a.k], [v[0, :, sl].clone() for v in a.v])

    def _forward(self, ids: list[int], counts: list[int], contexts: list[int]) -> list[int]:
        """The step's forward passes (``continuous_forward.forward_split``); each row's greedy next token."""
        return forward_split(self.model, self._rows(ids, counts, contexts))

    def _rows(self, ids: list[int], counts: list[int], contexts: list[int]) -> list[Row]:
        """The scheduled rows, each with its own cache (a fresh one for a request that holds none)."""
        rows = []
        for rid, n, c in zip(ids, counts, contexts, strict=True):
            a = self.active[rid]
            if a.k is None or a.v is None:
                self._new_cache(a)
                assert a.k is not None and a.v is not None
            rows.append(Row(a.tokens[c : c + n], c, a.k, a.v))
        return rows

    # ---- convenience ---------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[list[int] | Rejection]:
        """Add ``requests`` (ids 0..n-1) and step until every one has finished; their tokens in order."""
        out: dict[int, Rejection] = {}
        for i, r in enumerate(requests):
            why = self.add(i, r)
            if why is not None:
                out[i] = why
        while self.has_work:
            self.step()
        return [out[i] if i in out else self.results.pop(i) for i in range(len(requests))]



# ---- the asyncio shell: a drop-in for the pod's DynamicBatcher ---------------------------------------------
TRACE_STEPS = 16384  # the last steps kept for ``ContinuousBatcher.trace`` (about a minute at full load)


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
                 metrics: Any = None) -> None:
        self.engine = ContinuousEngine(engine, limits)
        self.queue_capacity = queue_capacity
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
        #: the last ``TRACE_STEPS`` steps (``StepRecord``), served by the pod at ``GET /debug/batches``
        self.trace: deque[StepRecord] = deque(maxlen=TRACE_STEPS)
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
        for fut, _ in self._futures.values():
            if not fut.done():
                fut.set_exception(BatcherClosedError("the pod shut down before the answer"))
        self._futures.clear()

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
                    continue
                ce.add(rid, req)  # submit checked that it fits
                self._futures[rid] = (fut, received)
                self._prompt_len[rid] = len(req.prompt)
            self._incoming.clear()
            for rid in [r for r, (f, _) in self._futures.items() if f.cancelled()]:  # clients gone
                ce.abort(rid)
                del self._futures[rid]
                self._started.pop(rid, None)
                self._times.pop(rid, None)
                self._prompt_len.pop(rid, None)
            if not ce.has_work:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                idle = True
                continue
            t0 = time.perf_counter()
            report, cpu_s = await asyncio.to_thread(self._timed_step)
            now = time.perf_counter()
            plan = report.plan
            self.trace.append(StepRecord(t0, now, report.seconds, cpu_s, plan.prefill_tokens, plan.prefill_context,
                                         plan.decodes, plan.decode_context, self._arrivals, len(report.emitted),
                                         len(report.finished), idle))
            self._arrivals = 0
            idle = False
            for rid in report.plan.started:
                self._started[rid] = (t0, len(ce.scheduler.running))
            for rid in report.emitted:
                times = self._times.setdefault(rid, [])
                if self.vllm is not None:
                    if times:
                        self.vllm.itl.observe(now - times[-1])
                    elif rid in self._futures:
                        self.vllm.ttft.observe(now - self._futures[rid][1])
                times.append(now)
            if self.vllm is not None:
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
                                  started_at=start)
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

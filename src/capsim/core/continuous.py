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

import time
from dataclasses import dataclass, field

import torch

from capsim.core.continuous_forward import Row, forward_split
from capsim.core.engine import GenerationRequest, ReferenceEngine
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
    cached: int = 0  # prompt tokens its (last) admission found in the prefix cache


@dataclass(frozen=True)
class StepReport:
    """What one engine step did: tokens emitted (request id -> token), and who finished or was preempted."""

    emitted: dict[int, int]
    finished: list[int]
    preempted: list[int]
    scheduled_tokens: int
    seconds: float  # scheduling, the forward pass and the bookkeeping: the whole step
    plan: Step  # the scheduler's step: its composition, for the step-time model
    hit_copy_s: float = 0.0  # of ``seconds``, copying prefix hits' cached KV (``plan.cached``) into their caches


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
        self.cached_tokens: dict[int, int] = {}  # finished requests' prefix hits (tokens), beside results
        self._heads = cfg.n_heads
        self._head_dim = cfg.d_model // cfg.n_heads
        self._bs = limits.block_size
        #: keys and values of cached full blocks by hash (prefix caching), per layer
        self.kv_blocks: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._pool = self.scheduler.pool
        if self._pool is not None:
            self._pool.log_evictions()  # the scheduler logs evictions so the KV store follows them

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

    def reset(self) -> None:
        """Drop every request, finished outputs not yet collected and all cached KV (a step failed part-way: nothing
        it held can be trusted). The engine then serves new requests from an empty cache."""
        self.scheduler.clear()
        self.active.clear()
        self.results.clear()
        self.cached_tokens.clear()
        self.kv_blocks.clear()
        if self._pool is not None and self._pool.evicted is not None:
            self._pool.evicted.clear()  # the blocks ``clear`` evicted: their KV is gone with ``kv_blocks``

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- one step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> StepReport:
        """Run one engine step: schedule, the forward passes, emit and stream tokens, free finished caches."""
        t0 = self._clock()
        began = time.perf_counter()
        plan = self.scheduler.step()
        for rid in plan.preempted:  # recompute: the scheduler reset its computed tokens to 0
            a = self.active[rid]
            a.k = a.v = None
        copy_s = 0.0
        if plan.cached:  # prefix hits: their cached blocks' KV into their own cache
            t1 = self._clock()
            for rid, hit in plan.cached.items():
                a = self.active[rid]
                a.cached = hit
                self._load_hit(a, hit)
            copy_s = self._clock() - t1
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
        self.engine.hold(began)  # a slowed engine (ReferenceEngine.slowdown) holds the model longer
        seconds = self._clock() - t0
        for rid, tok in emitted.items():
            req = self.active[rid].request
            if req.on_token is not None:
                req.on_token(len(self.active[rid].generated) - 1, tok, seconds)
        for rid in plan.finished:
            done = self.active.pop(rid)
            self.results[rid] = done.generated
            self.cached_tokens[rid] = done.cached
        return StepReport(emitted, list(plan.finished), list(plan.preempted), plan.total_tokens, seconds, plan,
                          copy_s)

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
        cached = pool.cached
        bs = self._bs
        for rid, n, c in zip(plan.request_ids, plan.num_tokens, plan.contexts, strict=True):
            a = self.active[rid]
            if a.k is None or a.v is None:
                continue
            for j in range(c // bs, min((c + n) // bs, len(a.hashes))):
                h = a.hashes[j]
                if h not in store and h in cached:
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
        for i in range(len(requests)):
            self.cached_tokens.pop(i, None)
        return [out[i] if i in out else self.results.pop(i) for i in range(len(requests))]

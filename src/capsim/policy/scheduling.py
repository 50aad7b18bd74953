"""Continuous batching: one engine step under a token budget and a KV-block cache, as vLLM V1 schedules it.

The same deterministic, clock-free scheduler drives the real engine and the simulated pod: a shell adds
requests, asks :meth:`Scheduler.step` what runs next, runs or times that step, and repeats. Semantics
follow vLLM V1's ``Scheduler.schedule`` (vllm/v1/core/sched/scheduler.py, FCFS policy), as summarised in ``/work/shared/reference/serving_engines.md``:

- A request tracks only ``num_computed_tokens`` and ``num_tokens`` (prompt plus generated). A decode
  asks for one token; a partly computed prompt for its next chunk. No separate phases.
- Running requests are served first, in order, each taking ``min(num_tokens - num_computed_tokens,
  long_prefill_token_threshold (if > 0), token budget)`` tokens and the KV blocks those tokens need.
  When a block is missing, the *last* running request is preempted by recompute (its blocks freed,
  its computed tokens reset to 0, put back at the head of the waiting queue) until the block fits; if
  the victim is the request itself, phase 1 stops.
- Only in a step with no preemption, waiting requests are admitted first come, first served, while
  the token budget is positive, fewer than ``max_num_seqs`` run and their first chunk's blocks are free.
  Admission never preempts.
- After the step, a request whose known tokens are all computed emits one token; it finishes when it
  has emitted its ``max_tokens``, and its blocks return at once.

Prefix caching (``enable_prefix_caching``): a shell gives each request the chained hashes of its full
blocks (:meth:`Scheduler.add`, :meth:`Scheduler.extend_hashes`). An admission with no computed token
reuses the longest run of leading cached blocks, capped so one token is computed
(``num_computed_tokens`` starts at the hit, reported in ``Step.cached``); blocks register their hash
once computed and full, and freed ones stay cached in :class:`~capsim.policy.block_pool.BlockPool`'s
LRU list until reallocated. Unlike vLLM, which registers a block as it is allocated (a request admitted
later in the same step may hit it), blocks register after the step: the real engine copies a hit's KV
from blocks already computed.

Unlike vLLM, which truncates generation at ``max_model_len``, a request whose prompt plus output could
never fit (longer than ``max_model_len``, or more blocks than the whole cache) is rejected when added,
with a typed :class:`Rejection`, so no request starves. The scheduler allocates blocks by count (no
block ids): enough for timing and for the engine's per-request caches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from capsim.policy.block_pool import BlockPool
from capsim.policy.decode_runs import DecodeRuns
from capsim.policy.sched_types import Rejection, Request, SchedulerError, SchedulerLimits, Step

__all__ = ["Rejection", "Request", "Scheduler", "SchedulerError", "SchedulerLimits", "Step"]


class Scheduler(DecodeRuns):
    """The waiting and running queues and the block pool of one engine; see the module docstring (runs of
    decode steps taken at once: :class:`~capsim.policy.decode_runs.DecodeRuns`)."""

    def __init__(self, limits: SchedulerLimits, detail: bool = True) -> None:
        self.limits = limits
        self.detail = detail  # list every scheduled request in Step (an engine needs it; a timer does not)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self.free_blocks = limits.num_blocks
        self.num_preemptions = 0  # counter, as vllm:num_preemptions
        #: tokens emitted, counted as each step (or run of decode steps) is scheduled: vllm:generation_tokens
        #: counts them as the step ends, which a shell timing the steps does (the simulated pod)
        self.emitted = 0
        self.steps = 0
        #: the prefix cache (``None`` with caching off); a shell keeping KV by hash calls ``pool.log_evictions()``
        self.pool: BlockPool | None = BlockPool() if limits.enable_prefix_caching else None
        # what the last step or run left, so a shell's next questions cost O(1) instead of a pass over
        # running: the contexts summed, the fewest tokens any has left to emit, whether all are plain
        # decodes (``_left`` is 0 when unknown, e.g. after a remove or a step that ran out of budget)
        self._ctx = 0
        self._left = 0
        self._ready = False

    # ---- queue ------------------------------------------------------------------------------------
    def add(self, request_id: int, prompt_tokens: int, max_tokens: int,
            block_hashes: Iterable[int] = ()) -> Rejection | None:
        """Queue a request at the tail of waiting, or say why it can never run (then it is not queued).

        ``block_hashes[j]``: chained hash of full block ``j`` of its tokens (prompt, then output), as far
        as known; ignored with prefix caching off."""
        if prompt_tokens < 1 or max_tokens < 1:
            raise SchedulerError(f"request {request_id}: prompt_tokens and max_tokens must be >= 1, "
                                 f"got {prompt_tokens} and {max_tokens}")
        if request_id in self.requests:
            raise SchedulerError(f"request {request_id} is already queued or running")
        why = self.limits.rejection(prompt_tokens, max_tokens)
        if why is None:
            hs = None
            if self.pool is not None:
                tolist = getattr(block_hashes, "tolist", None)  # a numpy array: plain ints hash faster
                hs = tolist() if tolist is not None else list(block_hashes)
            r = Request(request_id, prompt_tokens, max_tokens, hs)
            self.requests[request_id] = r
            self.waiting.append(r)
        return why

    def extend_hashes(self, request_id: int, more: Iterable[int]) -> None:
        """Append hashes of further full blocks of a request (the engine hashes tokens as it emits them)."""
        r = self.requests.get(request_id)
        if r is None:
            raise SchedulerError(f"request {request_id} is not queued or running")
        if self.pool is not None:
            r.hashes.extend(more)

    def remove(self, request_id: int) -> Request:
        """Abort a request (its client went away, or the engine stopped it early); frees its blocks."""
        r = self.requests.pop(request_id, None)
        if r is None:
            raise SchedulerError(f"request {request_id} is not queued or running")
        if self.pool is not None:
            self.pool.register(r, r.computed // self.limits.block_size)
            self.free_blocks += self.pool.release(r)
        elif r.blocks:
            self.free_blocks += r.blocks
        r.blocks = 0
        try:
            self.running.remove(r)
            self._left = 0
        except ValueError:
            self.waiting.remove(r)
        return r

    def clear(self) -> list[int]:
        """Drop every request (the engine died); return their ids, running first, then waiting."""
        ids = [r.request_id for r in self.running] + [r.request_id for r in self.waiting]
        self.running.clear()
        self.waiting.clear()
        self.requests.clear()
        self.free_blocks = self.limits.num_blocks
        self._left = 0
        if self.pool is not None:
            self.pool.reset()
        return ids

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def used_blocks(self) -> int:
        return self.limits.num_blocks - self.free_blocks

    @property
    def prefix_queries_tokens(self) -> int:
        """Prompt tokens looked up in the prefix cache (vllm:prefix_cache_queries, cumulative)."""
        return self.pool.queries if self.pool is not None else 0

    @property
    def prefix_hit_tokens(self) -> int:
        """Of those, tokens served from the cache (vllm:prefix_cache_hits, cumulative)."""
        return self.pool.hits if self.pool is not None else 0

    @property
    def kv_cache_usage(self) -> float:
        """One minus free over total blocks (vllm:kv_cache_usage_perc, 0-1)."""
        return 1.0 - self.free_blocks / self.limits.num_blocks

    # ---- one step ---------------------------------------------------------------------------------
    def step(self) -> Step:
        """Schedule one step, apply its result (tokens computed and emitted), and return it.

        An empty step (nothing scheduled) means there is no work: with any request queued or running,
        at least the head of ``running`` (or of ``waiting``) is always scheduled. Each scheduled
        request's result is applied as it is scheduled (a scheduled request is never preempted later in
        the same step); blocks of requests that finish return after the step, as in vLLM.
        """
        lim = self.limits
        bs = lim.block_size
        thr = lim.long_prefill_token_threshold
        budget = lim.max_num_batched_tokens
        free = self.free_blocks
        running = self.running
        waiting = self.waiting
        detail = self.detail
        out = Step()
        ids, toks, ctxs = out.request_ids, out.num_tokens, out.contexts
        preempted = out.preempted
        first, finished = out.first_token, out.finished
        requests = self.requests
        pool = self.pool
        pending: list[Request] = []  # requests that may have new full blocks to register
        done: list[Request] = []  # finished requests, released after registration
        freed = 0
        decodes = decode_ctx = prefills = pre_tokens = pre_max = pre_ctx = 0
        completed = 0  # prefill chunks that completed their request's tokens (each emits one)
        ctx = 0  # contexts of the requests still running after the step
        left = 1 << 62  # fewest tokens one of them has left to emit
        ready = True  # all of them are plain decodes now
        this_step = self.steps + 1  # what ``steps`` will be after this one
        # phase 1: running requests, in order
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            c = r.computed
            n = r.num_tokens - c
            decode = n == 1 and r.generated  # a plain decode (then c + 1 == num_tokens: it emits)
            if n > 1:
                if thr and n > thr:
                    n = thr
                if n > budget:
                    n = budget
            need = (c + n + bs - 1) // bs - r.blocks
            if need > free:
                victim = None
                while need > free:
                    victim = running.pop()
                    free += victim.blocks if pool is None else pool.release(victim)
                    victim.blocks = 0
                    victim.computed = 0
                    victim.num_tokens = victim.prompt + victim.generated
                    victim.preemptions += 1
                    self.num_preemptions += 1
                    waiting.appendleft(victim)
                    preempted.append(victim.request_id)
                    if victim is r:
                        break
                if victim is r:
                    break
                r.blocks += need
                free -= need
                if pool is not None and pool.n_idle > free:
                    pool.evict(pool.n_idle - free)
            elif need:
                r.blocks += need
                free -= need
                if pool is not None and pool.n_idle > free:
                    pool.evict(pool.n_idle - free)
            budget -= n
            if detail:
                ids.append(r.request_id)
                toks.append(n)
                ctxs.append(c)
            if decode:  # the common case, without the prefill's checks (its first token came before)
                decodes += 1
                decode_ctx += c
                c += 1
                r.computed = c
                if pool is not None and c // bs > r.reg < len(r.hashes):
                    pending.append(r)
                g = r.generated = r.generated + 1
                r.num_tokens = c + 1
                r.emitted_step = this_step
                if g == r.max_tokens:
                    if pool is None:
                        freed += r.blocks
                        r.blocks = 0
                    else:
                        done.append(r)  # released after the step's registrations
                    finished.append(r.request_id)
                    del requests[r.request_id]
                else:
                    ctx += c
                    if r.max_tokens - g < left:
                        left = r.max_tokens - g
                i += 1
                continue
            prefills += 1
            pre_tokens += n
            pre_ctx += n * c
            if n > pre_max:
                pre_max = n
            c += n
            r.computed = c
            if pool is not None and c // bs > r.reg < len(r.hashes):
                pending.append(r)
            if c == r.num_tokens:
                g = r.generated = r.generated + 1
                completed += 1  # a prompt (or a recompute) done: it emits
                r.num_tokens = c + 1
                r.emitted_step = this_step
                if g == 1:
                    first.append(r.request_id)
                if g == r.max_tokens:
                    if pool is None:
                        freed += r.blocks
                        r.blocks = 0
                    else:
                        done.append(r)  # released after the step's registrations
                    finished.append(r.request_id)
                    del requests[r.request_id]
                else:
                    ctx += c
                    if r.max_tokens - g < left:
                        left = r.max_tokens - g
            else:
                ctx += c
                if c + 1 == r.num_tokens and r.generated:  # a preempted one recomputed up to its last token
                    if r.max_tokens - r.generated < left:
                        left = r.max_tokens - r.generated
                else:
                    ready = False
            i += 1
        if i < len(running):  # the budget ran out before the last running requests: not known
            left = 0
        # phase 2: admission, first come first served, only if nothing was preempted
        if not preempted:
            max_seqs = lim.max_num_seqs
            while waiting and budget > 0 and len(running) < max_seqs:
                r = waiting[0]
                c = r.computed
                hit = hit_free = 0
                if pool is not None and not c and r.hashes:
                    hit, hit_free = pool.lookup(r.hashes, (r.num_tokens - 1) // bs)
                    c = hit * bs
                n = r.num_tokens - c
                if thr and n > thr:
                    n = thr
                if n > budget:
                    n = budget
                need = (c + n + bs - 1) // bs - r.blocks - hit
                if need + hit_free > free:
                    break
                waiting.popleft()
                if pool is not None:
                    if hit:
                        pool.acquire(r, hit)
                        r.blocks = hit
                        free -= hit_free
                        out.cached[r.request_id] = c
                    pool.queries += r.num_tokens
                    pool.hits += c
                    if not r.started:
                        r.cached = c
                free -= need
                r.blocks += need
                if pool is not None and pool.n_idle > free:
                    pool.evict(pool.n_idle - free)
                running.append(r)
                budget -= n
                if detail:
                    ids.append(r.request_id)
                    toks.append(n)
                    ctxs.append(c)
                if not r.started:
                    r.started = True
                    out.started.append(r.request_id)
                prefills += 1
                pre_tokens += n
                pre_ctx += n * c
                if n > pre_max:
                    pre_max = n
                c += n
                r.computed = c
                if pool is not None and c // bs > r.reg < len(r.hashes):
                    pending.append(r)
                if c == r.num_tokens:
                    g = r.generated = r.generated + 1
                    completed += 1  # a prompt (or a recompute) done: it emits
                    r.num_tokens = c + 1
                    r.emitted_step = this_step
                    if g == 1:
                        first.append(r.request_id)
                    if g == r.max_tokens:
                        if pool is None:
                            freed += r.blocks
                            r.blocks = 0
                        else:
                            done.append(r)
                        finished.append(r.request_id)
                        del requests[r.request_id]
                    else:
                        ctx += c
                        if r.max_tokens - g < left:
                            left = r.max_tokens - g
                else:
                    ctx += c
                    if c + 1 == r.num_tokens and r.generated:
                        if r.max_tokens - r.generated < left:
                            left = r.max_tokens - r.generated
                    else:
                        ready = False
        if pool is not None:
            for r in pending:
                pool.register(r, r.computed // bs)
            for r in done:
                freed += pool.release(r)
                r.blocks = 0
        out.decodes, out.decode_context = decodes, decode_ctx
        out.prefills, out.prefill_tokens, out.prefill_max_tokens, out.prefill_context = (
            prefills, pre_tokens, pre_max, pre_ctx)
        if finished:
            self.running = [r for r in running if r.generated < r.max_tokens]
        self.free_blocks = free + freed
        self.steps += 1
        self.emitted += decodes + completed
        self._ctx, self._left, self._ready = ctx, left, ready
        return out

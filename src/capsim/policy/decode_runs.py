"""Runs of plain decode steps taken at once: how many are next, and applying them (a mixin of ``Scheduler``).

A shell that only times steps (the simulated pod) asks :meth:`DecodeRuns.decode_run_length` how many of
the next steps are plain decodes of the same requests and applies them with
:meth:`DecodeRuns.advance_decodes`, one event instead of one per step. The scheduler keeps what its last
step or run left (``_ctx``, ``_left``, ``_ready``) so both questions cost O(1) between runs.
"""

from __future__ import annotations

from collections import deque

from capsim.policy.block_pool import BlockPool
from capsim.policy.sched_types import Request, SchedulerError, SchedulerLimits


class DecodeRuns:
    """The decode-run methods of :class:`~capsim.policy.scheduling.Scheduler`, on its state."""

    limits: SchedulerLimits
    waiting: deque[Request]
    running: list[Request]
    requests: dict[int, Request]
    free_blocks: int
    steps: int
    emitted: int
    pool: BlockPool | None
    # what the last step or run left: the running requests' contexts summed, the fewest tokens one has
    # left to emit (0: not known, recompute), whether all are plain decodes
    _ctx: int
    _left: int
    _ready: bool

    def decode_run_length(self, max_steps: int) -> int:
        """How many of the next steps (at most ``max_steps``) are plain decode steps of the same requests.

        That is: nothing waits, every running request is decoding (one token a step), they fit the token
        budget, none finishes before the last of those steps, and the KV blocks they need meanwhile are
        free. Then each of those steps is what :meth:`step` would return, with ``decodes`` equal to the
        running count and the decode context growing by that count each step, and
        :meth:`advance_decodes` applies them at once. 0 when the next step is not such a step.
        """
        running = self.running
        if self.waiting or not running or len(running) > self.limits.max_num_batched_tokens:
            return 0
        if not self._left:
            self._refresh()
        if not self._ready:
            return 0
        k = min(max_steps, self._left)
        if k < 1:
            return 0
        bs = self.limits.block_size
        free = self.free_blocks
        if len(running) * -(-k // bs) <= free:  # each request crosses at most that many block boundaries
            return k

        def need(m: int) -> int:
            return sum(-(-(r.computed + m) // bs) - r.blocks for r in running)

        if need(k) <= free:
            return k
        lo, hi = 0, k  # need(lo) <= free < need(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if need(mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def _refresh(self) -> None:
        """Recompute what the last step left (after a remove, or a step that did not reach every request)."""
        running = self.running
        self._ctx = sum(r.computed for r in running)
        self._ready = all(r.computed == r.num_tokens - 1 and r.generated for r in running)
        self._left = min((r.max_tokens - r.generated for r in running), default=1 << 62)

    @property
    def decode_context(self) -> int:
        """The running requests' contexts summed (the ``decode_context`` of a decode step now)."""
        if not self._left:
            self._refresh()
        return self._ctx

    def advance_decodes(self, steps: int) -> list[int]:
        """Apply ``steps`` plain decode steps (at most :meth:`decode_run_length` said, fewer if requests
        were removed meanwhile); return the requests that finished, in running order."""
        bs = self.limits.block_size
        free = self.free_blocks
        pool = self.pool
        running = self.running
        self.emitted += steps * len(running)
        finished = []
        done = []
        regs = []  # requests with blocks to register, in running order (registered after the loop)
        ctx = 0
        left = 1 << 62
        for r in running:
            c = r.computed + steps
            r.computed = c
            g = r.generated = r.generated + steps
            r.num_tokens += steps
            b = -(-c // bs)
            free -= b - r.blocks
            r.blocks = b
            if pool is not None and c // bs > r.reg < len(r.hashes):
                regs.append(r)
            if g >= r.max_tokens:
                if pool is None:
                    free += b
                    r.blocks = 0
                else:
                    done.append(r)
                finished.append(r.request_id)
                del self.requests[r.request_id]
            else:
                ctx += c
                if r.max_tokens - g < left:
                    left = r.max_tokens - g
        if finished:
            self.running = [r for r in self.running if r.generated < r.max_tokens]
        if free < 0:
            raise SchedulerError(f"advance_decodes({steps}) needs {-free} more KV blocks than are free")
        if pool is not None:
            # blocks allocated in these steps came from hashless ones, then from the LRU head; the
            # finished requests' blocks return after the last step, as in step()
            evicting = pool.n_idle > free
            if regs:
                if (len(regs) > 1 or evicting) and self._order_matters(regs, evicting):
                    self._replay_pool(running, steps)
                    evicting = False
                else:
                    for r in regs:
                        pool.register(r, r.computed // bs)
            if evicting:
                pool.evict(pool.n_idle - free)
            for r in done:
                free += pool.release(r)
                r.blocks = 0
        self.free_blocks = free
        self.steps += steps
        self._ctx, self._left, self._ready = ctx, left, True
        return finished

    def _order_matters(self, regs: list[Request], evicting: bool) -> bool:
        """Whether registering ``regs``' new full blocks at the run's end can differ from step() doing it
        step by step: two of them fill blocks of the same hash (the earlier one in step order owns it),
        or a block they fill has the hash of a free cached block that the run's allocations evict first
        (then step() registers it anew)."""
        bs = self.limits.block_size
        # chained hashes: two requests with a block hash in common agree from their first block on, so
        # requests whose first blocks all differ (sessions, nearly always) cannot fill the same hash
        if len({r.hashes[0] for r in regs}) < len(regs):
            new: list[int] = []
            for r in regs:
                new += r.hashes[r.reg:r.computed // bs]
            if len(set(new)) < len(new):
                return True
        if evicting:
            pool = self.pool
            assert pool is not None
            return any(pool.any_free(r, r.computed // bs) for r in regs)
        return False

    def _replay_pool(self, running: list[Request], steps: int) -> None:
        """Apply the run's block allocations (evicting from the LRU head) and registrations to the pool in
        the order ``steps`` calls of step() would: step by step; in each, allocations then registrations,
        each in running order. ``running`` has already advanced ``steps`` tokens; nothing registered yet."""
        pool = self.pool
        assert pool is not None
        bs = self.limits.block_size
        events: list[tuple[int, int, int, int]] = []  # (step, 0 alloc | 1 register, running index, blocks)
        for i, r in enumerate(running):
            c0 = r.computed - steps
            for m in range(-(-c0 // bs), r.blocks):  # block m is allocated when token m*bs+1 is computed
                events.append((m * bs + 1 - c0, 0, i, 0))
            for j in range(r.reg, min(r.computed // bs, len(r.hashes))):  # block j is full at token (j+1)*bs
                events.append(((j + 1) * bs - c0, 1, i, j + 1))
        events.sort()
        free = self.free_blocks
        for _, kind, i, blocks in events:
            if kind == 0:
                free -= 1
                if pool.n_idle > free:
                    pool.evict(pool.n_idle - free)
            else:
                pool.register(running[i], blocks)

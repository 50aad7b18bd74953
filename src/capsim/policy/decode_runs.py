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
        finished = []
        done = []
        ctx = 0
        left = 1 << 62
        for r in self.running:
            c = r.computed + steps
            r.computed = c
            g = r.generated = r.generated + steps
            r.num_tokens += steps
            b = -(-c // bs)
            free -= b - r.blocks
            r.blocks = b
            if pool is not None and c // bs > r.reg < len(r.hashes):
                pool.register(r, c // bs)
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
            if pool.n_idle > free:
                pool.evict(pool.n_idle - free)
            for r in done:
                free += pool.release(r)
                r.blocks = 0
        self.free_blocks = free
        self.steps += steps
        self._ctx, self._left, self._ready = ctx, left, True
        return finished

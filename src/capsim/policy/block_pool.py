"""The prefix cache of a KV-block pool: full blocks by chained hash, and a least-recently-used free list.

vLLM V1's ``BlockPool`` (vllm/v1/core/block_pool.py) in counts: the scheduler keeps the number of free
blocks; this pool keeps which blocks hold a hash, how many running requests use each, and which of them
are free (no user) in eviction order. A free cached block still counts as free and is evicted only when
a new block is needed and no block without a hash is free (vLLM takes the free queue's head whatever it
holds; taking hashless blocks first only spares a reusable block, it never changes counts). The
semantics are per block (``tests/test_block_pool.py`` holds the plain definition, one counter per block
and one ordered dict of free ones); the state is kept per run of blocks, so that a request's whole
prompt is registered, released and evicted in a few operations instead of a few per block.

Blocks are identified by chained hashes: a hash fixes its block's place in the token stream and every
block before it (vLLM hashes each block with its parent's hash; capsim's simulated streams and the
Mooncake trace's ids have the same property). So the cached blocks form a tree of chains, and a
:class:`Run` is a stretch ``lo .. hi-1`` of one chain whose blocks share their users (the same running
requests hold all of them) or, free, one place in the LRU list (evicted from ``hi - 1`` down, as a release
frees a request's last blocks first). Runs are found by the hash of their first block only: the run
holding block ``j`` of a chain starts at ``j`` or also holds block ``j - 1``. A request's references are
stretches of its own chain (``Request.refs``: flat ``[lo0, hi0, lo1, hi1, ...]``); every run lies
inside or outside each of them (a run is split where a hit ends inside it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol


class Cached(Protocol):
    """What the pool reads and writes on a request (``capsim.policy.scheduling.Request``)."""

    hashes: list[int]  # chained hashes of the request's full blocks, as far as known
    refs: list[int]  # the stretches of its blocks it holds a reference on: [lo0, hi0, lo1, hi1, ...]
    tail: Run | None  # the run holding its last referenced block (it may extend it)
    reg: int  # blocks considered for registration so far
    blocks: int  # blocks it holds, shared ones included


class Run:
    """Blocks ``lo .. hi-1`` of the chain ``hs`` (a list holding their hashes at those places): all used by
    ``users`` running requests, or free (``users`` 0) at one place in the LRU list (``gen``: which)."""

    __slots__ = ("gen", "hi", "hs", "lo", "users")

    def __init__(self, hs: list[int], lo: int, hi: int, users: int) -> None:
        self.hs = hs
        self.lo = lo
        self.hi = hi
        self.users = users
        self.gen = 0  # bumped each time the run is freed; an LRU entry with an older one is stale

    def __repr__(self) -> str:
        return f"Run({self.lo}..{self.hi}, users={self.users})"


def _diverge(a: Sequence[int], b: Sequence[int], j: int, k: int) -> int:
    """The first place in ``j+1 .. k`` where the chains ``a`` and ``b`` differ, given that they agree at ``j``
    and differ at ``k`` (chained hashes: they agree up to a place, and differ from there on)."""
    lo, hi = j, k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[mid] == b[mid]:
            lo = mid
        else:
            hi = mid
    return hi


def _live(run: Run, gen: int) -> bool:
    """Whether an LRU entry still stands for its run: freed no later than that entry, and not emptied."""
    return gen == run.gen and not run.users and run.lo < run.hi


class BlockPool:
    """The cached blocks as runs keyed by their first block's hash, and the free runs in LRU order."""

    __slots__ = ("_free_runs", "_lru", "_set", "closed", "compact_slack", "evicted", "hits", "n_idle", "queries",
                 "start")

    def __init__(self, log_evictions: bool = False, compact_slack: int = 4096) -> None:
        # stale LRU entries tolerated beyond twice the free runs (0: compact after most releases)
        self.compact_slack = compact_slack
        #: the hash of each run's first block -> the run
        self.start: dict[int, Run] = {}
        self._lru: deque[tuple[Run, int]] = deque()  # (run, its gen when freed), head: next evicted
        self._free_runs = 0
        #: every cached block's parent is cached: true while every request's references are a prefix of its
        #: chain (a release frees a block no later than its parent, and evicts deeper blocks first); false
        #: for good once a request registers a block after a plain copy of a block cached elsewhere
        self.closed = True
        self.n_idle = 0  # free cached blocks (in the LRU list)
        self.queries = 0  # prompt tokens looked up (vllm:prefix_cache_queries)
        self.hits = 0  # of those, served from the cache (vllm:prefix_cache_hits)
        self.evicted: list[int] | None = [] if log_evictions else None  # for a shell that keeps the KV
        self._set: set[int] | None = set() if log_evictions else None  # every cached hash, for that shell

    def log_evictions(self) -> None:
        """From now on, list evicted hashes in ``evicted`` and keep ``cached`` as blocks come and go."""
        if self.evicted is None:
            self.evicted = []
            self._set = set(self.users)

    # ---- views for checks and for a shell ------------------------------------------------------------
    @property
    def users(self) -> dict[int, int]:
        """Cached block's hash -> running requests using it (0: free); built on demand (for checks)."""
        return {h: r.users for r in self.start.values() for h in r.hs[r.lo:r.hi]}

    @property
    def idle(self) -> dict[int, int]:
        """The free cached blocks' hashes (-> 0); built on demand (for checks)."""
        return {h: 0 for r in self.start.values() if not r.users for h in r.hs[r.lo:r.hi]}

    @property
    def lru(self) -> list[int]:
        """The free cached blocks' hashes in eviction order (head first); built on demand (for checks)."""
        out: list[int] = []
        for r, g in self._lru:
            if _live(r, g):
                out += reversed(r.hs[r.lo:r.hi])
        return out

    @property
    def cached(self) -> set[int]:
        """Every cached block's hash (kept as it changes when evictions are logged, else built)."""
        return self._set if self._set is not None else set(self.users)

    def __len__(self) -> int:
        """Blocks that hold a hash (in use or free)."""
        return sum(r.hi - r.lo for r in self.start.values())

    # ---- finding blocks ------------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[int], max_blocks: int) -> tuple[int, int]:
        """The longest run of leading cached blocks (at most ``max_blocks``) and how many of them are free."""
        start = self.start
        n = min(len(hashes), max_blocks)
        j = free = 0
        while j < n:
            r = start.get(hashes[j])
            if r is None:
                break
            e = r.hi if r.hi < n else n
            if e - j > 1 and hashes[e - 1] != r.hs[e - 1]:
                e = _diverge(hashes, r.hs, j, e - 1)
            if not r.users:
                free += e - j
            j = e
        return j, free

    def _run_at(self, hashes: Sequence[int], k: int) -> Run | None:
        """The run holding block ``k`` of the chain ``hashes``, if it is cached (the nearest run starting at
        or before ``k`` on the chain is the only one that can)."""
        start = self.start
        for i in range(k, -1, -1):
            r = start.get(hashes[i])
            if r is not None:
                return r if r.hi > k and r.hs[k] == hashes[k] else None
        return None

    def any_free(self, r: Cached, end: int) -> bool:
        """Whether one of ``r``'s blocks ``r.reg .. end-1`` (not yet registered) is cached and free."""
        hashes, start, refs = r.hashes, self.start, r.refs
        k = r.reg
        end = min(end, len(hashes))
        p = None if not k or (refs and refs[-1] == k) else self._run_at(hashes, k - 1)
        closed = self.closed
        while k < end:
            h = hashes[k]
            if p is None or k >= p.hi or p.hs[k] != h:
                p = start.get(h)
                if p is None and closed:  # block k is not cached, nor is any block after it
                    return False
            if p is not None and not p.users:
                return True
            k += 1
        return False

    # ---- a request's references ----------------------------------------------------------------------
    def acquire(self, r: Cached, blocks: int) -> None:
        """Give ``r`` (holding no block) a reference on its first ``blocks`` cached blocks (a hit)."""
        hashes, start = r.hashes, self.start
        j = 0
        run = None
        while j < blocks:
            run = start[hashes[j]]
            e = run.hi if run.hi < blocks else blocks
            if e - j > 1 and hashes[e - 1] != run.hs[e - 1]:
                e = _diverge(hashes, run.hs, j, e - 1)
            if e < run.hi:  # the hit ends inside the run: its front becomes a run of its own
                front = Run(hashes, j, e, run.users + 1)
                if not run.users:
                    self.n_idle -= e - j  # the rest stays free, at its place in the LRU list
                start[hashes[j]] = front
                run.lo = e
                start[run.hs[e]] = run
                run = front
            elif run.users:
                run.users += 1
            else:  # a free run taken whole: its LRU entry goes stale
                run.users = 1
                run.hs = hashes
                self.n_idle -= e - j
                self._free_runs -= 1
            j = e
        r.refs = [0, blocks] if blocks else []
        r.reg = blocks
        r.tail = run

    def register(self, r: Cached, full_blocks: int) -> None:
        """Cache ``r``'s blocks up to ``full_blocks`` (computed, full) whose hashes are known.

        A hash already cached (another request computed the same block meanwhile) leaves ``r``'s copy
        a plain block, as vLLM keeps one block per hash."""
        hashes = r.hashes
        k = r.reg
        end = min(full_blocks, len(hashes))
        if end <= k:
            return
        refs, start = r.refs, self.start
        own = bool(refs) and refs[-1] == k  # r holds block k-1 (its tail run ends at k)
        # a cached block k would then start a run; and while the cache is prefix-closed (or for one block),
        # block k uncached means none after it is: one check, not one a block
        if ((k and not own)
                or (hashes[k] in start if self.closed or end == k + 1
                    else not start.keys().isdisjoint(hashes[k:end]))):
            self._register_each(r, end)
            return
        t = r.tail
        if own and t is not None and t.hi == k and t.users == 1 and t.hs is hashes:
            t.hi = end  # its own run grows (nearly always: a decode fills one block after another)
            refs[-1] = end
        else:
            t = r.tail = Run(hashes, k, end, 1)
            start[hashes[k]] = t
            refs += (k, end)
        r.reg = end
        if self._set is not None:
            self._set.update(hashes[k:end])

    def _register_each(self, r: Cached, end: int) -> None:
        """``register`` block by block, for a stretch with blocks already cached elsewhere (plain copies)."""
        hashes, start, refs = r.hashes, self.start, r.refs
        k = r.reg
        own = bool(refs) and refs[-1] == k  # r holds block k-1
        p = None if own or not k else self._run_at(hashes, k - 1)  # the run elsewhere holding block k-1
        while k < end:
            h = hashes[k]
            if p is None or k >= p.hi or p.hs[k] != h:
                p = start.get(h)
            if p is not None:  # cached already: r's copy is plain
                own = False
                k += 1
                continue
            t = r.tail
            if own and t is not None and t.hi == k and t.users == 1 and t.hs is hashes:
                t.hi = k + 1
                refs[-1] = k + 1
            else:
                if k and not own:  # r holds block k but not block k-1: the cache may have holes from now on
                    self.closed = False
                t = r.tail = Run(hashes, k, k + 1, 1)
                start[h] = t
                refs += (k, k + 1)
            own = True
            if self._set is not None:
                self._set.add(h)
            k += 1
        r.reg = end

    def release(self, r: Cached) -> int:
        """Drop ``r``'s blocks (``r.blocks`` is left to the caller); return how many became free.

        Its cached blocks that nobody else uses go to the LRU tail, its last blocks first (evicted
        first); shared ones stay in use; hashless ones are simply free."""
        refs = r.refs
        if not refs:  # no cached block (a request without hashes): all simply free
            r.reg = 0
            r.tail = None
            return r.blocks
        hashes, start, lru = r.hashes, self.start, self._lru
        freed = r.blocks
        for i in range(len(refs) - 2, -1, -2):
            a, b = refs[i], refs[i + 1]
            freed -= b - a
            run = start[hashes[a]]
            runs = [run]
            if run.hi < b:  # the stretch spans runs (split where other requests' hits ended): last first
                while run.hi < b:
                    run = start[hashes[run.hi]]
                    runs.append(run)
                runs.reverse()
            for run in runs:
                u = run.users = run.users - 1
                if not u:
                    run.gen = g = run.gen + 1
                    lru.append((run, g))
                    n = run.hi - run.lo
                    freed += n
                    self.n_idle += n
                    self._free_runs += 1
        r.refs = []
        r.reg = 0
        r.tail = None
        if len(lru) > 2 * self._free_runs + self.compact_slack:
            self._lru = deque(e for e in lru if _live(*e))
        return freed

    def evict(self, count: int) -> None:
        """Forget the hashes of the ``count`` least recently freed cached blocks (they are reallocated)."""
        self.n_idle -= count
        lru, log = self._lru, self.evicted
        while count:
            run, g = lru[0]
            lo, hi = run.lo, run.hi
            if g != run.gen or run.users or lo >= hi:  # stale: taken (or freed again) since
                lru.popleft()
                continue
            if hi - lo > count:  # its last blocks go first
                run.hi = hi - count
                if log is not None:
                    self._forget(run.hs, hi - count, hi)
                return
            lru.popleft()
            del self.start[run.hs[lo]]
            run.hi = lo
            self._free_runs -= 1
            count -= hi - lo
            if log is not None:
                self._forget(run.hs, lo, hi)

    def _forget(self, hs: list[int], lo: int, hi: int) -> None:
        """Log the eviction of blocks ``lo .. hi-1`` of the chain ``hs``, last first (evictions are logged)."""
        gone = hs[lo:hi]
        gone.reverse()
        assert self.evicted is not None
        self.evicted += gone
        if self._set is not None:
            self._set.difference_update(gone)

    def reset(self) -> None:
        """Forget everything cached (the engine died); counters stay, as a pod's counters would restart."""
        if self.evicted is not None:
            for r in self.start.values():
                self.evicted.extend(r.hs[r.lo:r.hi])
        if self._set is not None:
            self._set.clear()
        self.start.clear()
        self._lru.clear()
        self._free_runs = 0
        self.n_idle = 0
        self.closed = True  # nothing cached, no request left holding blocks

    @property
    def hit_rate(self) -> float:
        """Hit tokens over queried tokens (0 before any query)."""
        return self.hits / self.queries if self.queries else 0.0

"""The prefix cache of a KV-block pool: full blocks by chained hash, and a least-recently-used free list.

vLLM V1's ``BlockPool`` (vllm/v1/core/block_pool.py) in counts: the scheduler keeps the number of free
blocks; this pool keeps the hashes of cached blocks, how many running requests use each, and which of
them are free (no user) in eviction order. A free cached block still counts as free and is evicted
only when a new block is needed and no block without a hash is free (vLLM takes the free queue's head
whatever it holds; taking hashless blocks first only spares a reusable block, it never changes counts).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from itertools import islice
from typing import Protocol


class Cached(Protocol):
    """What the pool reads and writes on a request (``capsim.policy.scheduling.Request``)."""

    hashes: list[int]  # chained hashes of the request's full blocks, as far as known
    refs: list[int]  # hashes of its blocks it holds a reference on, in block order
    reg: int  # blocks considered for registration so far
    blocks: int  # blocks it holds, shared ones included


class BlockPool:
    """Hashes of cached blocks with their user counts, and the free ones in LRU order (head: next evicted)."""

    __slots__ = ("evicted", "hits", "lru", "queries", "users")

    def __init__(self, log_evictions: bool = False) -> None:
        self.users: dict[int, int] = {}  # hash -> running requests using its block (0: free, in lru)
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.queries = 0  # prompt tokens looked up (vllm:prefix_cache_queries)
        self.hits = 0  # of those, served from the cache (vllm:prefix_cache_hits)
        self.evicted: list[int] | None = [] if log_evictions else None  # for a shell that keeps the KV

    def __len__(self) -> int:
        """Blocks that hold a hash (in use or free)."""
        return len(self.users)

    def lookup(self, hashes: Sequence[int], max_blocks: int) -> tuple[int, int]:
        """The longest run of leading cached blocks (at most ``max_blocks``) and how many of them are free."""
        users = self.users
        j = free = 0
        n = min(len(hashes), max_blocks)
        while j < n:
            u = users.get(hashes[j])
            if u is None:
                break
            if not u:
                free += 1
            j += 1
        return j, free

    def acquire(self, r: Cached, blocks: int) -> None:
        """Give ``r`` (holding no block) a reference on its first ``blocks`` cached blocks (a hit)."""
        users, lru = self.users, self.lru
        hs = r.hashes[:blocks]
        for h in hs:
            u = users[h]
            if not u:
                del lru[h]
            users[h] = u + 1
        r.refs = hs
        r.reg = blocks

    def register(self, r: Cached, full_blocks: int) -> None:
        """Cache ``r``'s blocks up to ``full_blocks`` (computed, full) whose hashes are known.

        A hash already cached (another request computed the same block meanwhile) leaves ``r``'s copy
        a plain block, as vLLM keeps one block per hash."""
        users = self.users
        hs = r.hashes
        reg = r.reg
        end = min(full_blocks, len(hs))
        if end == reg + 1:  # one new block, as a decode completes one: no slice, no list
            h = hs[reg]
            if h not in users:
                users[h] = 1
                r.refs.append(h)
            r.reg = end
        elif end > reg:
            new = [h for h in hs[reg:end] if h not in users]
            users.update(dict.fromkeys(new, 1))
            r.refs += new
            r.reg = end

    def release(self, r: Cached) -> int:
        """Drop ``r``'s blocks (``r.blocks`` is left to the caller); return how many became free.

        Its cached blocks that nobody else uses go to the LRU tail, its last blocks first (evicted
        first); shared ones stay in use; hashless ones are simply free."""
        users = self.users
        refs = r.refs
        freed = r.blocks - len(refs)
        refs.reverse()
        last = [h for h in refs if users[h] == 1]  # blocks only r uses (nearly all)
        if len(last) < len(refs):
            for h in refs:
                u = users[h]
                if u > 1:
                    users[h] = u - 1
        users.update(dict.fromkeys(last, 0))
        self.lru.update(dict.fromkeys(last))
        freed += len(last)
        r.refs = []
        r.reg = 0
        return freed

    def evict(self, count: int) -> None:
        """Forget the hashes of the ``count`` least recently freed cached blocks (they are reallocated)."""
        lru, log = self.lru, self.evicted
        gone = list(islice(lru, count))
        # the deletions run in C (map consumed by an empty deque): no Python loop per block
        deque(map(lru.__delitem__, gone), 0)
        deque(map(self.users.__delitem__, gone), 0)
        if log is not None:
            log += gone

    def reset(self) -> None:
        """Forget everything cached (the engine died); counters stay, as a pod's counters would restart."""
        if self.evicted is not None:
            self.evicted.extend(self.users)
        self.users.clear()
        self.lru.clear()

    @property
    def hit_rate(self) -> float:
        """Hit tokens over queried tokens (0 before any query)."""
        return self.hits / self.queries if self.queries else 0.0

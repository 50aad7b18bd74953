"""The prefix cache of a KV-block pool: full blocks by chained hash, and a least-recently-used free list.

vLLM V1's ``BlockPool`` (vllm/v1/core/block_pool.py) in counts: the scheduler keeps the number of free
blocks; this pool keeps the hashes of cached blocks, how many running requests use each, and which of
them are free (no user) in eviction order. A free cached block still counts as free and is evicted
only when a new block is needed and no block without a hash is free (vLLM takes the free queue's head
whatever it holds; taking hashless blocks first only spares a reusable block, it never changes counts).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from operator import itemgetter
from typing import Any, Protocol


class Cached(Protocol):
    """What the pool reads and writes on a request (``capsim.policy.scheduling.Request``)."""

    hashes: list[int]  # chained hashes of the request's full blocks, as far as known
    refs: list[int]  # hashes of its blocks it holds a reference on, in block order
    reg: int  # blocks considered for registration so far
    blocks: int  # blocks it holds, shared ones included


class BlockPool:
    """Hashes of cached blocks with their user counts, and the free ones in LRU order (head: next evicted).

    The LRU list is kept as segments, one per release (its blocks in eviction order), and a free cached
    block's entry in ``users`` is minus the id of the segment that freed it last: a release and an
    eviction are a few bulk dict operations on one dict instead of one ordered-dict node per block. A
    segment entry whose block was taken again (a hit) or freed again later is stale and skipped; stale
    entries are dropped once they outnumber the live ones (then the segments are rewritten, in order).
    """

    COMPACT_SLACK = 4096  # stale entries tolerated beyond twice the live ones

    __slots__ = ("_entries", "_segments", "_sid", "evicted", "hits", "n_idle", "queries", "users")

    def __init__(self, log_evictions: bool = False) -> None:
        #: hash -> running requests using its block; a free block (in the LRU list): minus its segment's id
        self.users: dict[int, int] = {}
        self.n_idle = 0  # free cached blocks (in the LRU list)
        self._segments: deque[list[Any]] = deque()  # [segment id, hashes, next entry], oldest first
        self._sid = 0  # the last segment's id
        self._entries = 0  # entries in the segments not yet passed by evictions, stale ones included
        self.queries = 0  # prompt tokens looked up (vllm:prefix_cache_queries)
        self.hits = 0  # of those, served from the cache (vllm:prefix_cache_hits)
        self.evicted: list[int] | None = [] if log_evictions else None  # for a shell that keeps the KV

    @property
    def idle(self) -> dict[int, int]:
        """Free cached block's hash -> the id of the LRU segment holding it; built on demand (for checks)."""
        return {h: -u for h, u in self.users.items() if u <= 0}

    @property
    def lru(self) -> list[int]:
        """The free cached blocks' hashes in eviction order (head first); built on demand (for checks)."""
        users = self.users
        return list(dict.fromkeys(h for sid, hs, off in self._segments for h in hs[off:] if users.get(h) == -sid))

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
            if u <= 0:
                free += 1
            j += 1
        return j, free

    def acquire(self, r: Cached, blocks: int) -> None:
        """Give ``r`` (holding no block) a reference on its first ``blocks`` cached blocks (a hit)."""
        users = self.users
        hs = r.hashes[:blocks]
        for h in hs:
            u = users[h]
            if u <= 0:  # free: its segment's entry goes stale
                users[h] = 1
                self.n_idle -= 1
            else:
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
            seg = hs[reg:end]
            if users.keys().isdisjoint(seg):  # none cached yet (nearly always): no Python loop per block
                users.update(dict.fromkeys(seg, 1))
                r.refs += seg
            else:
                new = [h for h in seg if h not in users]
                users.update(dict.fromkeys(new, 1))
                r.refs += new
            r.reg = end

    def release(self, r: Cached) -> int:
        """Drop ``r``'s blocks (``r.blocks`` is left to the caller); return how many became free.

        Its cached blocks that nobody else uses go to the LRU tail, its last blocks first (evicted
        first); shared ones stay in use; hashless ones are simply free."""
        refs = r.refs
        if not refs:  # no cached block (a request without hashes): all simply free
            r.reg = 0
            return r.blocks
        users = self.users
        freed = r.blocks - len(refs)
        refs.reverse()
        if len(refs) > 1:
            # blocks only r uses (nearly all): when every count is 1, all of them, without a loop per block
            counts = itemgetter(*refs)(users)
            last = refs if max(counts) == 1 else [h for h, u in zip(refs, counts, strict=True) if u == 1]
        else:
            last = [h for h in refs if users[h] == 1]
        if len(last) < len(refs):
            for h in refs:
                u = users[h]
                if u > 1:
                    users[h] = u - 1
        freed += len(last)
        if last:
            self._sid = sid = self._sid + 1
            free = dict.fromkeys(last, -sid)
            users.update(free)
            if len(free) < len(last):  # a hash listed twice: once in the LRU list (evict takes it once)
                last = list(free)
            self._segments.append([sid, last, 0])
            self._entries += len(last)
            self.n_idle += len(last)
            if self._entries > 2 * self.n_idle + self.COMPACT_SLACK:
                self._compact()
        r.refs = []
        r.reg = 0
        return freed

    def evict(self, count: int) -> None:
        """Forget the hashes of the ``count`` least recently freed cached blocks (they are reallocated)."""
        users, segments, log = self.users, self._segments, self.evicted
        self.n_idle -= count
        if count <= 4:
            # a decode crossing into a new block evicts one or two: a plain walk beats building lists
            while count:
                seg = segments[0]
                sid, hs, off = seg
                msid = -sid
                j, n = off, len(hs)
                while j < n:
                    h = hs[j]
                    j += 1
                    if users.get(h) == msid:
                        del users[h]
                        if log is not None:
                            log.append(h)
                        count -= 1
                        if not count:
                            break
                if j >= n:
                    segments.popleft()
                else:
                    seg[2] = j
                self._entries -= j - off
            return
        gone: list[int] = []
        while len(gone) < count:
            seg = segments[0]
            sid, hs, off = seg
            msid = -sid
            end = off + count - len(gone)
            chunk = hs[off:end]
            if list(map(users.get, chunk)).count(msid) == len(chunk):  # all live (a segment has no repeats)
                deque(map(users.__delitem__, chunk), 0)  # the deletions run in C: no Python loop per block
                gone += chunk
            else:  # live entries leave users as they are taken (pop)
                gone += [h for h in chunk if users.get(h) == msid and users.pop(h)]
            if end >= len(hs):
                segments.popleft()
                self._entries -= len(hs) - off
            else:
                seg[2] = end
                self._entries -= end - off
        if log is not None:
            log += gone

    def _compact(self) -> None:
        """Drop the stale entries: one segment of the live ones, in eviction order."""
        live = self.lru
        self._sid = sid = self._sid + 1
        self.users.update(dict.fromkeys(live, -sid))
        self._segments = deque([[sid, live, 0]]) if live else deque()
        self._entries = len(live)

    def reset(self) -> None:
        """Forget everything cached (the engine died); counters stay, as a pod's counters would restart."""
        if self.evicted is not None:
            self.evicted.extend(self.users)
        self.users.clear()
        self.n_idle = 0
        self._segments.clear()
        self._entries = 0

    @property
    def hit_rate(self) -> float:
        """Hit tokens over queried tokens (0 before any query)."""
        return self.hits / self.queries if self.queries else 0.0

"""BlockPool's runs of blocks behave exactly as per-block counters and one ordered dict of free blocks would."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsim.policy.block_pool import BlockPool
from capsim.policy.sched_types import Request


class ModelPool:
    """The plain definition: per-block user counts and one OrderedDict of free cached blocks."""

    def __init__(self) -> None:
        self.users: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.evicted: list[int] = []

    def acquire(self, r: Request, blocks: int) -> None:
        for h in r.hashes[:blocks]:
            if self.users[h] == 0:
                del self.lru[h]
            self.users[h] += 1
        r.refs, r.reg = r.hashes[:blocks], blocks

    def register(self, r: Request, full: int) -> None:
        end = min(full, len(r.hashes))
        if end > r.reg:
            new = [h for h in r.hashes[r.reg:end] if h not in self.users]
            for h in new:
                self.users[h] = 1
            r.refs, r.reg = r.refs + new, end

    def release(self, r: Request) -> int:
        freed = r.blocks - len(r.refs)
        for h in reversed(r.refs):
            self.users[h] -= 1
            if self.users[h] == 0:
                self.lru[h] = None
                freed += 1
        r.refs, r.reg = [], 0
        return freed

    def evict(self, count: int) -> None:
        for _ in range(count):
            h = self.lru.popitem(last=False)[0]
            del self.users[h]
            self.evicted.append(h)


_ids: dict[tuple[int, ...], int] = {}


def chain(path: list[int]) -> list[int]:
    """Chained hashes of a path in a tree of token streams (branch choices): block j's hash fixes blocks
    0..j, as vLLM's parent-chained hashes do. Small ints, so that streams share and diverge often."""
    return [_ids.setdefault(tuple(path[:j + 1]), len(_ids)) for j in range(len(path))]


def held(r: Request) -> list[int]:
    """The hashes of the blocks ``r`` references, in block order (the pool keeps stretches)."""
    return [r.hashes[j] for i in range(0, len(r.refs), 2) for j in range(r.refs[i], r.refs[i + 1])]


ops = st.lists(st.tuples(st.sampled_from(["admit", "register", "release", "evict"]), st.integers(0, 5),
                         st.lists(st.integers(0, 1), max_size=6), st.integers(0, 7)),
               max_size=60)


def EagerPool(log_evictions: bool = False) -> BlockPool:
    """A pool that compacts its LRU list after most releases (a factory: the compiled BlockPool,
    capsim.native, cannot be subclassed by interpreted code)."""
    return BlockPool(log_evictions=log_evictions, compact_slack=0)


@pytest.mark.parametrize("log", [True, False])
@pytest.mark.parametrize("kind", [BlockPool, EagerPool], ids=["BlockPool", "EagerPool"])
@settings(max_examples=500, deadline=None)
@given(ops=ops)
def test_segmented_lru_matches_an_ordered_dict(kind: Callable[..., BlockPool], log: bool,
                                               ops: list[tuple[str, int, list[int], int]]) -> None:
    pool, model = kind(log_evictions=log), ModelPool()
    reqs: dict[int, tuple[Request, Request]] = {}
    for op, k, path, n in ops:
        hashes = chain(path)
        if op == "admit" and k not in reqs:  # a new request takes its leading cached blocks
            a, b = Request(k, 1, 1, list(hashes)), Request(k, 1, 1, list(hashes))
            hit, free = pool.lookup(a.hashes, len(hashes))
            assert free == sum(1 for h in hashes[:hit] if model.users[h] == 0)
            if hit:
                pool.acquire(a, hit)
                model.acquire(b, hit)
            a.blocks = b.blocks = hit
            reqs[k] = (a, b)
        elif op == "register" and k in reqs:
            a, b = reqs[k]
            pool.register(a, n)
            model.register(b, n)
            a.blocks = b.blocks = max(a.blocks, n)
        elif op == "release" and k in reqs:
            a, b = reqs.pop(k)
            assert pool.release(a) == model.release(b)
        elif op == "evict":
            m = min(n, len(model.lru))
            pool.evict(m)
            model.evict(m)
        assert {h: max(u, 0) for h, u in pool.users.items()} == model.users  # free: 0
        assert pool.lru == list(model.lru) and len(pool.idle) == pool.n_idle == len(model.lru)
        assert pool.evicted == (model.evicted if log else None)
        assert all(held(a) == b.refs for a, b in reqs.values())
        assert len(pool) == len(model.users) and pool.cached == set(model.users)
        if pool.closed:  # what the flag promises: no cached block without its parent
            paths = {v: p for p, v in _ids.items()}
            assert all(len(paths[h]) == 1 or _ids[paths[h][:-1]] in model.users for h in model.users)
        for a, _ in reqs.values():  # the decode runs' question: is one of its next blocks cached and free?
            for end in range(a.reg, len(a.hashes) + 1):
                assert pool.any_free(a, end) == any(model.users.get(h) == 0 for h in a.hashes[a.reg:end])
        probe = hashes or chain([0])
        assert pool.lookup(probe, len(probe))[0] == next(
            (j for j, h in enumerate(probe) if h not in model.users), len(probe))


def test_a_block_taken_and_freed_again_moves_to_the_tail() -> None:
    """A hit makes the block's old entry stale: it is evicted after what was freed meanwhile."""
    pool = BlockPool(log_evictions=True)
    r1, r2, r3 = Request(1, 1, 1, [7]), Request(2, 1, 1, [8]), Request(3, 1, 1, [7])
    for r in (r1, r2):
        pool.register(r, 1)
        r.blocks = 1
        assert pool.release(r) == 1
    pool.acquire(r3, pool.lookup(r3.hashes, 1)[0])
    r3.blocks = 1
    pool.release(r3)
    assert pool.lru == [8, 7]
    pool.evict(1)
    assert pool.evicted == [8] and pool.lru == [7] and 7 in pool.users and 8 not in pool.users


def test_a_hit_that_ends_inside_a_run_splits_it_and_the_release_keeps_block_order() -> None:
    """B's hit on A's first 3 of 5 blocks splits A's run; once both leave, A's blocks are freed last first
    (the back part before the front), as one release of 5 plain blocks would."""
    pool = BlockPool(log_evictions=True)
    hs = chain([1, 1, 1, 1, 1])
    a, b = Request(1, 1, 1, list(hs)), Request(2, 1, 1, chain([1, 1, 1, 2]))  # b diverges at block 3
    pool.register(a, 5)
    a.blocks = 5
    assert pool.lookup(b.hashes, 4) == (3, 0)
    pool.acquire(b, 3)
    b.blocks = 3
    assert len(pool.start) == 2 and pool.users == {**dict.fromkeys(hs[:3], 2), **dict.fromkeys(hs[3:], 1)}
    assert pool.release(b) == 0 and pool.release(a) == 5
    assert pool.lru == hs[::-1]
    pool.evict(4)
    assert pool.evicted == hs[:0:-1] and pool.lookup(hs, 5) == (1, 1)


def test_a_block_registered_after_a_plain_copy_can_outlive_its_parent() -> None:
    """B computes A's chain alongside A (no hit), so its first blocks are plain copies and only its third is
    cached by it. Once A leaves and its blocks are evicted, B's block is cached without its parent: the pool
    stops assuming prefix-closure, and a later request on the chain registers its first two blocks and
    keeps a plain copy of the third."""
    hs = chain([4, 4, 4])
    pool = BlockPool()
    a, b, d = Request(1, 1, 1, hs[:2]), Request(2, 1, 1, list(hs)), Request(3, 1, 1, list(hs))
    pool.register(a, 2)
    a.blocks = 2
    assert pool.closed
    pool.register(b, 3)
    b.blocks = 3
    assert held(b) == hs[2:] and not pool.closed
    assert pool.release(a) == 2
    pool.evict(2)
    assert pool.users == {hs[2]: 1} and pool.lookup(d.hashes, 3) == (0, 0)
    pool.register(d, 3)
    d.blocks = 3
    assert held(d) == hs[:2] and pool.users == {hs[0]: 1, hs[1]: 1, hs[2]: 1}
    pool.reset()  # the engine died: nothing cached, nobody holding, so prefix-closed again
    assert pool.closed and not pool.users and pool.n_idle == 0 and not pool.lru

"""The states a store holds: exact bytes only, least recently used out first, bounded in entries and bytes."""

from __future__ import annotations

from capsim.core.state_cache import StateCache
from capsim.core.state_model import SessionState


def _state(sid: str) -> SessionState:
    return SessionState.new(sid, now_s=1.0)


def test_only_the_exact_bytes_give_the_state_back() -> None:
    cache = StateCache(4, 1 << 20)
    s = _state("a")
    cache.put("k", b"{one}", s)
    assert cache.decoded("k", b"{one}") is s
    assert cache.decoded("k", b"{two}") is None and cache.decoded("other", b"{one}") is None


def test_only_a_write_that_lost_no_race_is_a_start_for_the_next_update() -> None:
    cache = StateCache(4, 1 << 20)
    cache.put("read", b"r", _state("a"))
    cache.put("won", b"w", _state("b"), optimistic=True)
    assert cache.optimistic("read") is None
    held = cache.optimistic("won")
    assert held is not None and held[0] == b"w"


def test_the_least_recently_used_goes_first_by_count_and_by_bytes() -> None:
    cache = StateCache(2, 10)
    cache.put("a", b"aaa", _state("a"))
    cache.put("b", b"bbb", _state("b"))
    assert cache.decoded("a", b"aaa") is not None  # a is now the most recent
    cache.put("c", b"ccc", _state("c"))
    assert len(cache) == 2 and cache.decoded("b", b"bbb") is None
    cache.put("d", b"dddddddd", _state("d"))  # 3 + 8 bytes > 10: the oldest goes
    assert cache.decoded("a", b"aaa") is None and cache.decoded("d", b"dddddddd") is not None
    cache.put("huge", b"x" * 11, _state("e"))  # over the byte bound alone: not kept
    assert cache.decoded("huge", b"x" * 11) is None


def test_zero_entries_keeps_nothing_and_forget_drops_one() -> None:
    off = StateCache(0, 1 << 20)
    off.put("k", b"v", _state("a"), optimistic=True)
    assert len(off) == 0 and off.optimistic("k") is None
    on = StateCache(4, 1 << 20)
    on.put("k", b"v", _state("a"))
    on.forget("k")
    on.forget("never")
    assert len(on) == 0

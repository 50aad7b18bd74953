"""SessionPrefix.block_hash_list (the continuous pod's fast path) gives exactly block_hashes' values."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from capsim.sim.sessions import SessionPrefix, stream_hash_list, stream_hashes


@settings(max_examples=200, deadline=None)
@given(session=st.integers(0, 2**27 - 1), epoch=st.integers(0, 4095), start=st.integers(0, 300),
       count=st.integers(0, 40))
def test_stream_hashes_are_the_list_as_int64(session: int, epoch: int, start: int, count: int) -> None:
    assert stream_hash_list(session, epoch, start + count, start) == \
        stream_hashes(session, epoch, start + count, start).tolist()


@settings(max_examples=100, deadline=None)
@given(turns=st.integers(1, 5), sizes=st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 300)),
                                                min_size=1, max_size=12),
       epochs=st.lists(st.integers(0, 2), min_size=12, max_size=12), bs=st.sampled_from([16, 32]))
def test_block_hash_list_matches_block_hashes(turns: int, sizes: list[tuple[int, int]], epochs: list[int],
                                              bs: int) -> None:
    n = len(sizes)
    fast, ref = SessionPrefix(turns, n), SessionPrefix(turns, n)
    prompt = np.array([p for p, _ in sizes], dtype=np.int32)
    output = np.array([o for _, o in sizes], dtype=np.int32)
    for p in (fast, ref):
        p.bind(prompt, output)
        p.epoch[:] = epochs[:n]
    for i in range(n):  # in request order, as the pod feeds them (the caches carry across turns)
        assert fast.block_hash_list(i, bs) == ref.block_hashes(i, bs).tolist()
    assert fast.block_hash_list(n, bs) == []  # a spare slot shares nothing

"""Where a simulated request's prompt repeats earlier tokens: the chained hashes of its full KV blocks.

The scheduler reuses cached blocks by hash (vLLM's prefix caching), so a workload only has to say, per
request, which full blocks of its token stream (prompt, then output) equal blocks of earlier requests.
:class:`NoPrefix` says "none" (every request independent, the behaviour before prefix caching);
:class:`TracePrefix` takes a Mooncake trace's ``hash_ids`` (ids of 512-token prompt blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

_EMPTY = np.zeros(0, dtype=np.int64)


@runtime_checkable
class PrefixSource(Protocol):
    """Full-block hashes of each request's token stream (equal hash = equal tokens and equal prefix)."""

    def block_hashes(self, request: int, block_size: int) -> np.ndarray:
        """Request ``request``'s chained hashes of its full blocks of ``block_size`` tokens (int64)."""
        ...


class NoPrefix:
    """No request shares a block with another: nothing is ever reused."""

    def block_hashes(self, request: int, block_size: int) -> np.ndarray:
        return _EMPTY

    def __repr__(self) -> str:
        return "NoPrefix()"


class TracePrefix:
    """Block hashes from a trace's ids of ``trace_block``-token prompt blocks (Mooncake: 512).

    Each trace id stands for ``trace_block / block_size`` scheduler blocks; sub-block ``k`` of id ``h``
    hashes to ``h * ratio + k`` (ids are already chained: an id fixes its whole prefix). Only blocks that
    lie fully inside the prompt are hashed: the trace says nothing about outputs, and a prompt's last,
    partial block is never reusable.
    """

    def __init__(self, hash_ids: Sequence[np.ndarray], input_lengths: np.ndarray, trace_block: int = 512) -> None:
        if len(hash_ids) != len(input_lengths):
            raise ValueError(f"{len(hash_ids)} hash lists for {len(input_lengths)} requests")
        self.hash_ids = hash_ids
        self.input_lengths = np.asarray(input_lengths, dtype=np.int64)
        self.trace_block = trace_block

    def block_hashes(self, request: int, block_size: int) -> np.ndarray:
        tb = self.trace_block
        if tb % block_size:
            raise ValueError(f"block_size {block_size} does not divide the trace's {tb}-token blocks")
        ratio = tb // block_size
        ids = np.asarray(self.hash_ids[request], dtype=np.int64)
        full = int(self.input_lengths[request]) // block_size
        sub = (ids[:, None] * ratio + np.arange(ratio, dtype=np.int64)[None, :]).ravel()
        return sub[:full]

    def __repr__(self) -> str:
        return f"TracePrefix({len(self.hash_ids)} requests, {self.trace_block}-token blocks)"

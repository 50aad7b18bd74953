"""Prefix-aware endpoint scoring, as the Kubernetes inference gateway's endpoint picker weighs pods.

The gateway's endpoint picker (gateway-api-inference-extension, its default scheduling profile) sums
weighted scorers, each in [0, 1], and picks the highest total: a prefix-cache scorer (the share of the
prompt's blocks the pod is expected to hold), a queue scorer (the pod's waiting requests, min-max
normalised over the candidates: the shortest queue scores 1) and a KV-cache-utilization scorer
(1 - KV use). Ties go to the first candidate (the lowest pod id), so a choice is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """What the picker knows of one endpoint."""

    queue: int  # requests queued or running on it
    kv_cache_usage: float  # 0-1 (0 for a pod without a KV cache)
    prefix_hit: float  # expected share of the prompt already cached there, 0-1


@dataclass(frozen=True)
class Weights:
    prefix: float = 3.0
    queue: float = 1.0
    kv_cache: float = 1.0


def scores(candidates: Sequence[Candidate], weights: Weights) -> list[float]:
    """Each candidate's weighted score (higher is better)."""
    if not candidates:
        return []
    lo = min(c.queue for c in candidates)
    hi = max(c.queue for c in candidates)
    span = hi - lo
    out = []
    for c in candidates:
        queue_score = 1.0 if span == 0 else (hi - c.queue) / span
        kv_score = 1.0 - min(max(c.kv_cache_usage, 0.0), 1.0)
        out.append(weights.prefix * c.prefix_hit + weights.queue * queue_score + weights.kv_cache * kv_score)
    return out


def pick(candidates: Sequence[Candidate], weights: Weights) -> int:
    """The index of the best candidate; the first among equals. ``candidates`` must not be empty."""
    if not candidates:
        raise ValueError("no candidate endpoint to pick from")
    s = scores(candidates, weights)
    best = 0
    for j in range(1, len(s)):
        if s[j] > s[best]:
            best = j
    return best

"""Prefix-aware endpoint scoring, as the Kubernetes inference gateway's endpoint picker weighs pods.

The gateway's endpoint picker (gateway-api-inference-extension, its default scheduling profile) sums
weighted scorers, each in [0, 1], and picks the highest total: a prefix-cache scorer (the share of the
prompt's blocks the pod is expected to hold), a queue scorer (the pod's waiting requests, min-max
normalised over the candidates: the shortest queue scores 1) and a KV-cache-utilization scorer
(1 - KV use). The picker chooses at random among the best scores (the endpoint picker's ``max-score``
picker shuffles the candidates before it takes the best); here the caller passes the random draw ``u``,
from the simulation's seeded stream, so a run stays reproducible. Ties to the lowest pod id instead would
send every idle moment's request to pod 0 (in the simulator, 8 pods: 5.7 times the mean load at 4 requests/s,
2.7 at 20/s; issue 14 §3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: The HTTP header that carries a turn's session id, for a proxy that hashes sessions onto pods (Envoy's ring
#: hash, Istio's ``consistentHash.httpHeaderName``): the load generator sends it, the export's DestinationRule
#: hashes on it.
SESSION_HEADER = "x-session-id"
#: the header ``capsim router`` puts on every answer, naming the pod that served it (its URL)
SERVED_BY = "X-Capsim-Pod"


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


def pick(candidates: Sequence[Candidate], weights: Weights, u: float = 0.0) -> int:
    """The index of the best candidate; among equals (within 1e-9) the ``int(u * ties)``-th, ``u`` a uniform
    draw in [0, 1) (0: the first). ``candidates`` must not be empty."""
    if not candidates:
        raise ValueError("no candidate endpoint to pick from")
    return among_best(scores(candidates, weights), u)


def among_best(values: Sequence[float], u: float, tol: float = 1e-9) -> int:
    """The index of a highest value, the ``int(u * ties)``-th of those within ``tol`` of it (``u`` in [0, 1)):
    a seeded random tie-break, as load balancers pick among equals."""
    if not values:
        raise ValueError("no value to pick from")
    top = max(values)
    ties = [j for j, v in enumerate(values) if v >= top - tol]
    return ties[min(int(u * len(ties)), len(ties) - 1)]

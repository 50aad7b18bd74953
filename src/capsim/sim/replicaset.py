"""Which pods a ReplicaSet deletes when it scales down: upstream's victim ranking, as a pure rule.

Upstream (Kubernetes ``pkg/controller/replicaset/replica_set.go``, ``getPodsToDelete`` and
``getPodsRankedByRelatedPodsOnSameNode``; ``pkg/controller/controller_utils.go``, ``ActivePodsWithRanks.Less``)
sorts the active pods and deletes the first ones. A pod comes before another when, at the first rule
that tells them apart:

1. it is unassigned (no node) and the other is assigned;
2. its phase is earlier: Pending < Unknown < Running;
3. it is not ready and the other is ready;
4. its ``pod-deletion-cost`` is lower (capsim sets none: all 0);
5. more active pods of the ReplicaSet share its node (its rank is higher);
6. both are ready and it became ready more recently, compared in log2 buckets of the time since
   (``LogarithmicScaleDown``, on by default since 1.22, GA in 1.31): pods in the same bucket are ordered
   by UID, a random string, so among them the victim is random;
7. its containers restarted more often;
8. it was created more recently, in log2 buckets again, then by UID.

Pods that no rule tells apart stay in the order the controller listed them, an informer cache's map
order, which is arbitrary; capsim orders them by UID too (random, from the seed).
Timestamps are API times with whole seconds (``metav1.Time`` serializes to RFC 3339 seconds) and the
buckets are ``floor(log2(nanoseconds since))`` (``logarithmicRankDiff``; -1 for no time elapsed).
Kubernetes is Apache-2.0 (c) The Kubernetes Authors; the rule is re-implemented from its source, no code
is copied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cmp_to_key

PHASE_ORDER = {"Pending": 0, "Unknown": 1, "Running": 2}


@dataclass(frozen=True)
class RankedPod:
    """What the ReplicaSet controller sees of one active pod (times in simulated seconds)."""

    key: int  # the caller's handle (a pod id)
    assigned: bool  # bound to a node (spec.nodeName set)
    phase: str  # Pending, Unknown or Running
    ready: bool  # the Ready condition is true
    rank: int  # active pods of the ReplicaSet on its node
    ready_s: float | None  # when the Ready condition last turned true (None: not ready)
    restarts: int  # the highest restart count of its containers
    created_s: float
    uid: int  # stands for the pod's random UID


def _bucket(t_s: float, now_s: float) -> int:
    d_ns = (now_s - math.floor(t_s)) * 1e9
    return int(math.log2(d_ns)) if d_ns > 0 else -1


def less(a: RankedPod, b: RankedPod, now_s: float) -> bool:
    """Whether ``a`` is deleted before ``b`` at ``now_s`` (upstream ``ActivePodsWithRanks.Less``)."""
    if a.assigned != b.assigned:
        return not a.assigned
    if a.phase != b.phase:
        return PHASE_ORDER[a.phase] < PHASE_ORDER[b.phase]
    if a.ready != b.ready:
        return not a.ready
    if a.rank != b.rank:
        return a.rank > b.rank
    if a.ready and b.ready and a.ready_s is not None and b.ready_s is not None \
            and math.floor(a.ready_s) != math.floor(b.ready_s):
        diff = _bucket(a.ready_s, now_s) - _bucket(b.ready_s, now_s)
        return a.uid < b.uid if diff == 0 else diff < 0
    if a.restarts != b.restarts:
        return a.restarts > b.restarts
    if math.floor(a.created_s) != math.floor(b.created_s):
        diff = _bucket(a.created_s, now_s) - _bucket(b.created_s, now_s)
        return a.uid < b.uid if diff == 0 else diff < 0
    return False


def pods_to_delete(pods: Sequence[RankedPod], n: int, now_s: float) -> list[RankedPod]:
    """The ``n`` pods a ReplicaSet deletes at ``now_s`` (the first ``n`` in ``less`` order)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")

    def cmp(a: RankedPod, b: RankedPod) -> int:
        if less(a, b, now_s):
            return -1
        if less(b, a, now_s):
            return 1
        return (a.uid > b.uid) - (a.uid < b.uid)  # a tie: the lister's arbitrary order

    return sorted(pods, key=cmp_to_key(cmp))[:n]

"""Which ready pod gets a request: random, round robin, least outstanding, session affinity, or prefix-aware.

The router sees only pods that receive traffic (ready and not terminating), as a Kubernetes Service
sees its endpoints. Session affinity (and pod-local session state, which requires it) sends a session's
later turns to the pod that served its first; the first turn is placed at random, as kube-proxy does
(``router.fallback: least_outstanding``: on the endpoint with the fewest requests), and so is a session
whose pod is gone.

Least outstanding picks the endpoint with the fewest requests queued or running, ties to the lowest pod
id -- exactly ``min(endpoints, key=outstanding)``, but kept in a heap of ``(outstanding, pod id)`` that
pods refresh (``touch``) whenever their count changes, with stale entries dropped when met: a scan over
dozens of pods per request would cost more than the rest of the request's simulation.

Prefix-aware scores every endpoint as the Kubernetes inference gateway's endpoint picker does
(``capsim.policy.routing``): the expected prefix hit (the share of the prompt the pod that served the
session's last turn still holds, if it has lived since), a short queue and free KV cache. When a session's
pod is gone (crashed, scaled down, draining) the scorer simply places it elsewhere. The client counts
such moves (``affinity_fallbacks``) and the history they re-prefill (``reprefill_tokens``; docs/sessions.md).
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Literal

from capsim.policy.routing import Candidate, Weights, pick
from capsim.sim.streams import BufferedDraws

if TYPE_CHECKING:
    from capsim.sim.pod import Pod

RouterKind = Literal["random", "round_robin", "least_outstanding", "session_affinity", "prefix_aware"]
KINDS = ("random", "round_robin", "least_outstanding", "session_affinity", "prefix_aware")


class Router:
    """Picks a pod from ``endpoints`` (kept sorted by pod id by the cluster) among ``pods`` (all, by id)."""

    def __init__(self, kind: RouterKind, endpoints: list[Pod], pods: list[Pod], draws: BufferedDraws,
                 weights: Weights | None = None, fallback: str = "random") -> None:
        if kind not in KINDS:
            raise ValueError(f"router.kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.weights = weights if weights is not None else Weights()
        self.prefix_aware = kind == "prefix_aware"
        self.least_fallback = kind == "session_affinity" and fallback == "least_outstanding"
        self.kind = kind
        self.endpoints = endpoints
        self._pods = pods
        self._draws = draws
        self._next = 0
        self.least = kind == "least_outstanding"
        self._heap: list[tuple[int, int]] = []

    def touch(self, pod: Pod) -> None:
        """A pod's outstanding count changed, or it became an endpoint."""
        if self.least:
            heapq.heappush(self._heap, (pod.outstanding, pod.id))

    def pick(self) -> Pod | None:
        """A pod for a request without a home pod; ``None`` when there is no endpoint.

        With least outstanding the caller must enqueue on the pod, or ``touch`` it if it does not.
        """
        eps = self.endpoints
        if not eps:
            return None
        if self.least:
            heap = self._heap
            pods = self._pods
            while heap:
                out, pid = heap[0]
                pod = pods[pid]
                if pod.outstanding == out and pod.routable:
                    heapq.heapreplace(heap, (out + 1, pid))  # the enqueue that follows
                    return pod
                heapq.heappop(heap)
            raise AssertionError("least-outstanding heap lost an endpoint")  # every change is touched
        if self.prefix_aware:  # a turn with no session history: the queue and KV scorers decide
            return self.pick_scored(-1, 0, 0.0)
        if self.least_fallback:  # a session placed anew, rarely: a scan, no heap to keep
            return min(eps, key=lambda p: (p.outstanding, p.id))
        if self.kind == "round_robin":
            self._next = (self._next + 1) % len(eps)
            return eps[self._next]
        return eps[int(self._draws.next() * len(eps))]

    def pick_scored(self, home: int, home_life: int, hit: float) -> Pod | None:
        """Prefix-aware: the best-scored endpoint, where pod ``home`` in incarnation ``home_life`` is
        expected to hold a share ``hit`` of the prompt (``home`` -1: no pod holds any)."""
        eps = self.endpoints
        if not eps:
            return None
        cands = [Candidate(p.outstanding, _kv_use(p), hit if p.id == home and p.incarnation == home_life else 0.0)
                 for p in eps]
        return eps[pick(cands, self.weights)]


def _kv_use(pod: Pod) -> float:
    use = getattr(pod, "kv_cache_usage", 0.0)  # a static pod has no KV cache to fill
    return float(use)

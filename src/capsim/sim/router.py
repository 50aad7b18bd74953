"""Which ready pod gets a request: random, round robin, least outstanding, or by session affinity.

The router sees only pods that receive traffic (ready and not terminating), as a Kubernetes Service
sees its endpoints. Session affinity (and pod-local session state, which requires it) sends a session's
later turns to the pod that served its first; the first turn is placed at random, as kube-proxy does.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Literal

from capsim.sim.pod import Pod
from capsim.sim.streams import BufferedDraws

RouterKind = Literal["random", "round_robin", "least_outstanding", "session_affinity"]
_OUTSTANDING = attrgetter("outstanding")


class Router:
    """Picks a pod from ``endpoints`` (kept sorted by pod id by the cluster)."""

    def __init__(self, kind: RouterKind, endpoints: list[Pod], draws: BufferedDraws) -> None:
        if kind not in ("random", "round_robin", "least_outstanding", "session_affinity"):
            raise ValueError(f"router.kind must be random, round_robin, least_outstanding or session_affinity, got {kind!r}")
        self.kind = kind
        self.endpoints = endpoints
        self._draws = draws
        self._next = 0

    def pick(self) -> Pod | None:
        """A pod for a request without a home pod; ``None`` when there is no endpoint."""
        eps = self.endpoints
        if not eps:
            return None
        if self.kind == "least_outstanding":
            # ties go to the lowest pod id: deterministic, and what a scan over endpoints does
            return min(eps, key=_OUTSTANDING)
        if self.kind == "round_robin":
            self._next = (self._next + 1) % len(eps)
            return eps[self._next]
        return eps[int(self._draws.next() * len(eps))]

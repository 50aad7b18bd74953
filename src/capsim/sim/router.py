"""Which ready pod gets a request: random, round robin, least outstanding, session affinity, or prefix-aware.

The router sees only pods that receive traffic (ready and not terminating), as a Kubernetes Service
sees its endpoints. Session affinity (and pod-local session state, which requires it) sends a session's
later turns to the pod that served its first; the first turn is placed at random, as kube-proxy does
(``router.fallback: least_outstanding``: on the endpoint with the fewest requests), and so is a session
whose pod is gone.

Least outstanding picks an endpoint with the fewest requests queued or running, at random among equals
(Envoy's least-request balancer and the inference gateway's picker choose at random among ties; ties to
the lowest pod id would give pod 0 every request that finds the pods idle: on 8 pods 5.7 times the mean
load at 4 requests/s, 2.7 at 20/s). The random choice uses the ``routing`` stream, so a seed gives the same assignment. The endpoints
are filed by count (``capsim.policy.least.LeastBuckets``), and pods refile themselves (``touch``) whenever
their count changes: a scan over dozens of pods per request would cost more than the rest of the
request's simulation.

Outlier ejection (``router.outlier_ejection``, least outstanding and prefix-aware, the kinds that stand
for an Envoy proxy or gateway; kube-proxy's random, round-robin and ClientIP affinity have none): a
crashed pod still in the endpoints has no outstanding requests, so least outstanding would send it
everything until the endpoints drop it. Each request it gets is refused at once and retried by the
client (``client.py``), and after ``consecutive_failures`` refusals in a row the router ejects it for
``base_ejection_s`` x its ejections (``capsim.policy.outlier``, Envoy's passive outlier detection). Only
failures the router sees when it connects count (a refused connection, a draining pod's 503), not a
pod's later 5xx (a store write in a Redis outage). Time is the send time the client passes (not the SimPy
clock, which lags the arrivals by up to an event gap, a gap that depends on how many events the run has).

Prefix-aware scores every endpoint as the Kubernetes inference gateway's endpoint picker does
(``capsim.policy.routing``): the expected prefix hit (the share of the prompt the pod that served the
session's last turn still holds, if it has lived since), a short queue and free KV cache. When a session's
pod is gone (crashed, scaled down, draining) the scorer simply places it elsewhere. The client counts
such moves (``affinity_fallbacks``) and the history they re-prefill (``reprefill_tokens``; docs/sessions.md).
"""

from __future__ import annotations

from collections.abc import Container
from typing import TYPE_CHECKING, Literal

from capsim.model.scenario import router_ejects
from capsim.policy.least import LeastBuckets
from capsim.policy.outlier import OutlierDetector, OutlierSettings
from capsim.policy.routing import Candidate, Weights, among_best, pick
from capsim.sim.pod import PodState
from capsim.sim.streams import BufferedDraws

if TYPE_CHECKING:
    from capsim.model.scenario import OutlierEjection
    from capsim.sim.pod import Pod

_READY = PodState.READY
_TERMINATING = PodState.TERMINATING
RouterKind = Literal["random", "round_robin", "least_outstanding", "session_affinity", "prefix_aware"]
KINDS = ("random", "round_robin", "least_outstanding", "session_affinity", "prefix_aware")


class Router:
    """Picks a pod from ``endpoints`` (kept sorted by pod id by the cluster) among ``pods`` (all, by id)."""

    def __init__(self, kind: RouterKind, endpoints: list[Pod], pods: list[Pod], draws: BufferedDraws,
                 weights: Weights | None = None, fallback: str = "random",
                 outlier: OutlierSettings | None = None, jitter: BufferedDraws | None = None) -> None:
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
        self._by_count = LeastBuckets()  # least outstanding: pod ids by their count
        # an ejection's jitter from its own stream (``jitter``), so turning it on moves no other draw
        self.outliers = OutlierDetector(outlier, draw=jitter.next if jitter is not None else None) \
            if outlier is not None and router_ejects(kind, outlier) else None
        self._count_answered = outlier is None or outlier.count_answered_5xx

    def touch(self, pod: Pod) -> None:
        """A pod's outstanding count changed, or it became an endpoint."""
        if self.least:
            self._by_count.set(pod.id, pod.outstanding)

    def pick(self, now: float, answers: bool = True) -> Pod | None:
        """A pod for a request sent at ``now`` without a home pod; ``None`` when there is no endpoint.

        With least outstanding the caller must enqueue on the pod, or ``touch`` it if it does not. Outlier
        detection counts the attempt's outcome as the request is sent: a failure if the pod is not ready
        (refused) or if ``answers`` is false (a ready pod that answers it 503: Redis is out), else a success.
        """
        eps = self.endpoints
        if not eps:
            return None
        if self.least:
            out = self.outliers
            if out is None:
                return self._least(())
            ejected = self._ejected(now) if out.ejected_ids else out.ejected_ids
            if ejected and self._panic(ejected):
                for p in eps:  # Envoy's panic mode: too few left, balance over all (rare: a scan)
                    if self._by_count.count_of(p.id) is None:
                        self._by_count.set(p.id, p.outstanding)
                ejected = {}
            return self._observe(self._least(ejected), now, answers)
        if self.prefix_aware:  # a turn with no session history: the queue and KV scorers decide
            return self.pick_scored(-1, 0, 0.0, now, answers)
        if self.least_fallback:  # a session placed anew, rarely: a scan, no buckets to keep
            return eps[among_best([-p.outstanding for p in eps], self._draws.next())]
        if self.kind == "round_robin":
            self._next = (self._next + 1) % len(eps)
            return eps[self._next]
        return eps[int(self._draws.next() * len(eps))]

    def _least(self, ejected: Container[int]) -> Pod:
        """A uniform pod among the emptiest not ``ejected``, counted as holding one more (the enqueue that
        follows)."""
        by_count = self._by_count
        pods = self._pods
        draw = self._draws.next
        while (low := by_count.lowest()) is not None:
            count, bucket = low
            pid = bucket[int(draw() * len(bucket))] if len(bucket) > 1 else bucket[0]
            pod = pods[pid]
            if pod.outstanding != count:  # a change nobody touched: filed under its count, never lost
                by_count.set(pid, pod.outstanding)
            elif pod.routable and pid not in ejected:
                by_count.set(pid, count + 1)
                return pod
            else:
                by_count.remove(pid)  # gone from the endpoints, or ejected: filed again when it returns
        # every endpoint ejected, their entries dropped before the panic rule let them back: a scan
        eps = self.endpoints
        pod = eps[among_best([-p.outstanding for p in eps], draw())]
        by_count.set(pod.id, pod.outstanding + 1)
        return pod

    def _ejected(self, now: float) -> dict[int, float]:
        """The ejected pods now, after refiling those whose ejection is over."""
        out = self.outliers
        assert out is not None
        if out.ejected_ids:
            for pid in out.expire(now):
                if self.least:
                    self.touch(self._pods[pid])
        return out.ejected_ids

    def _observe(self, pod: Pod | None, now: float, answers: bool) -> Pod | None:
        """Outlier detection sees the attempt the caller makes on ``pod``: refused unless it is ready, and a
        503 from a ready pod unless it ``answers`` (a pod on a dead node refuses nothing: its attempt fails when
        it times out, ``lost``)."""
        out = self.outliers
        if out is None or pod is None:
            return pod
        if pod.state is _READY and answers:  # the common case first
            if pod.id in out.failures:
                out.succeeded(pod.id)
        elif self._fails(pod, answers):
            out.failed(pod.id, now, len(self.endpoints))
        elif not pod.node_lost:
            out.succeeded(pod.id)
        return pod

    def _panic(self, ejected: Container[int]) -> bool:
        """Envoy's panic mode with ``ejected`` out: too few endpoints left, so it balances over all of them."""
        assert self.outliers is not None
        eps = self.endpoints
        return self.outliers.panic(sum(1 for p in eps if p.id in ejected), len(eps))

    def _fails(self, pod: Pod, answers: bool) -> bool:
        """Whether outlier detection counts an attempt on ``pod`` sent now as failed: refused (not ready; a pod
        on a dead node refuses nothing, its attempt fails when it times out), or answered 503 (a draining pod,
        or a ready one that does not ``answers``) where the pods' own 5xx count."""
        if pod.state is _READY:
            return not answers and self._count_answered
        if pod.node_lost:
            return False
        return pod.state is not _TERMINATING or self._count_answered

    def ejected(self, pod: Pod, now: float) -> bool:
        """Whether outlier detection keeps ``pod`` out of the balancing set at ``now`` (not in Envoy's panic mode)."""
        out = self.outliers
        if out is None or not out.ejected_ids:
            return False
        ejected = self._ejected(now)
        return pod.id in ejected and not self._panic(ejected)

    def served(self, pod: Pod, now: float) -> None:
        """A ready pod took an attempt the router did not pick (the pod holding the session's only copy in a Redis
        outage, ``state.on_unavailable: serve_local``): it answers, which ends its run of failures."""
        self._observe(pod, now, True)

    def failed(self, pod: Pod, now: float) -> None:
        """A ready pod answered an attempt 503 at ``now`` after it was picked (its final store write failed:
        Redis went out while it ran): outlier detection counts it, as Envoy's ``consecutive_5xx`` counts every
        5xx."""
        if self._count_answered:
            self.lost(pod, now)

    def lost(self, pod: Pod, now: float) -> None:
        """An attempt on ``pod`` failed at ``now`` as the proxy itself saw it, after it was sent: reset (the pod
        died holding it) or timed out (a pod on a dead node: Envoy's 504 at the route's timeout). Outlier detection
        counts it then, whichever failures count (a local-origin failure). No pick may have come since a pod's
        ejection ended: those pods return first, so the failure counts and no stale ejection takes the room."""
        out = self.outliers
        if out is not None and pod.routable:
            self._ejected(now)
            out.failed(pod.id, now, len(self.endpoints))

    def pick_scored(self, home: int, home_life: int, hit: float, now: float, answers: bool = True) -> Pod | None:
        """Prefix-aware, at ``now``: the best-scored endpoint, where pod ``home`` in incarnation ``home_life`` is
        expected to hold a share ``hit`` of the prompt (``home`` -1: no pod holds any); at random among
        equal scores. Ejected pods are left out (all of them in Envoy's panic mode). ``answers``: as ``pick``."""
        eps = self.endpoints
        if not eps:
            return None
        if self.outliers is not None:
            ejected = self._ejected(now)
            if ejected:
                kept = [p for p in eps if p.id not in ejected]
                if not self.outliers.panic(len(eps) - len(kept), len(eps)):
                    eps = kept
        cands = [Candidate(p.outstanding, _kv_use(p), hit if p.id == home and p.incarnation == home_life else 0.0)
                 for p in eps]
        return self._observe(eps[pick(cands, self.weights, self._draws.next())], now, answers)


def _kv_use(pod: Pod) -> float:
    use = getattr(pod, "kv_cache_usage", 0.0)  # a static pod has no KV cache to fill
    return float(use)


def outlier_settings(section: OutlierEjection | None) -> OutlierSettings | None:
    """The policy's settings from the scenario's ``router.outlier_ejection`` (None: no ejection)."""
    return None if section is None else section.settings()

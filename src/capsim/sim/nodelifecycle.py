"""The node lifecycle controller's taint-based eviction: when the pods of a NotReady node are evicted.

A node whose kubelet has been silent for ``cluster.node_monitor_grace_s`` is NotReady (``Cluster.node_failed``
marks it and its pods). The controller does not evict its pods itself: it queues the node in its zone's
NoExecute tainter, a rate-limited queue, and each node taken off the queue gets the
``node.kubernetes.io/unreachable:NoExecute`` taint; the taint manager evicts its pods their
``tolerationSeconds`` after (``Cluster._node_tainted``). The queue's limiter is a token bucket of burst 1
whose rate follows the zone's state, computed from the Ready conditions of every node in the zone (the GPU
nodes and ``cluster.other_nodes_per_zone`` others: a system pool, CPU workers):

- normal: ``cluster.node_eviction_rate`` (``--node-eviction-rate``, 0.1 nodes a second: one node every 10 s);
- partial disruption, more than 2 nodes NotReady and at least ``cluster.unhealthy_zone_threshold`` (0.55) of
  the zone: ``cluster.secondary_node_eviction_rate`` (0.01) if the zone has more than
  ``cluster.large_cluster_size_threshold`` (50) nodes, else 0: nothing more is evicted there;
- full disruption, no node of the zone Ready: the normal rate, unless every zone is fully disrupted; then the
  controller takes its own network for the culprit, removes every taint (the evictions scheduled are
  cancelled) and evicts nothing until a node is Ready again, when every NotReady node is queued afresh.

A node Ready again (a partition that heals) leaves the queue and loses its taint, and its pods' evictions
are cancelled. A limiter swapped for another rate while it had no token gives the new one none either.

Upstream: kubernetes ``pkg/controller/nodelifecycle/node_lifecycle_controller.go`` (``ComputeZoneState``,
``handleDisruption``, ``setLimiterInZone``, ``ReducedQPSFunc``, ``processTaintBaseEviction``,
``doNoExecuteTaintingPass``) and ``scheduler/rate_limited_queue.go`` (``SwapLimiter``, ``Try``; burst 1);
Apache-2.0, (c) The Kubernetes Authors; re-implemented, no code copied. Simplified: the zone states are
recomputed whenever a node's Ready condition or a zone's nodes change (all the changes of one instant
together), not at the controller's ``--node-monitor-period`` passes (5 s); a node is tainted as soon as its
bucket has a token, not at the next tainting pass (every 100 ms).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, cast

from simpy.events import Timeout

if TYPE_CHECKING:
    from capsim.model.scenario import ClusterSpec
    from capsim.sim.nodes import Node, NodePool


class ZoneState(Enum):
    NORMAL = "normal"
    PARTIAL = "partial_disruption"
    FULL = "full_disruption"


def zone_state(ready: int, not_ready: int, unhealthy_threshold: float) -> ZoneState:
    """A zone's state from its nodes' Ready conditions (upstream ``ComputeZoneState``)."""
    if ready == 0 and not_ready > 0:
        return ZoneState.FULL
    if not_ready > 2 and not_ready / (not_ready + ready) >= unhealthy_threshold:
        return ZoneState.PARTIAL
    return ZoneState.NORMAL


class TokenBucket:
    """A token bucket of burst 1 (client-go's ``NewTokenBucketRateLimiter(qps, 1)``; rate 0: never accepts),
    kept as the time its token is (or will be) there."""

    __slots__ = ("rate", "token_at")

    def __init__(self, rate: float, now: float, full: bool = True) -> None:
        self.rate = rate
        self.token_at = (now if full else now + 1.0 / rate) if rate > 0 else math.inf

    def try_accept(self, now: float) -> bool:
        if now < self.token_at:
            return False
        self.token_at = now + 1.0 / self.rate
        return True

    def swapped(self, rate: float, now: float) -> TokenBucket:
        """The limiter that replaces this one at ``now`` (``SwapLimiter``): the same one at the same rate; a
        new one, full unless this one has no token now."""
        if rate == self.rate:
            return self
        return TokenBucket(rate, now, full=now >= self.token_at)


class NodeLifecycle:
    """The taint queues of the zones, their states, and the master-disruption mode; see the module doc."""

    def __init__(self, pool: NodePool, spec: ClusterSpec, on_taint: Callable[[Node, float], None]) -> None:
        self.pool = pool
        self.spec = spec
        self._on_taint = on_taint
        self._env = pool.sim.env
        self.zones = spec.zones
        self.states = [ZoneState.NORMAL] * self.zones
        self.buckets = [TokenBucket(spec.node_eviction_rate, 0.0) for _ in range(self.zones)]
        self.queues: list[list[Node]] = [[] for _ in range(self.zones)]
        self.not_ready: set[int] = set()  # ids of the GPU nodes whose Ready condition is false
        self.tainted: dict[int, float] = {}  # node id -> when it was tainted (not removed since)
        self.dark: set[int] = set()  # zones whose other nodes are NotReady (the zone went dark)
        self.master_disruption = False
        self.log: list[tuple[float, str, int, str]] = []  # (time, event, zone, detail): states and taints
        self._pass_at: float | None = None  # a pass is scheduled at this time
        self.autoscaler_halted = False  # cluster-autoscaler finds too many nodes NotReady (``unhealthy``)
        self._wake_at = math.inf  # a token is awaited at this time

    # ---- what changes ---------------------------------------------------------------------------------
    def mark_not_ready(self, node: Node, now: float) -> None:
        """``node``'s Ready condition turned false (unknown: its kubelet is silent): it is queued for the taint."""
        self.not_ready.add(node.id)
        self._enqueue(node)
        self._soon(now)

    def ready_again(self, node: Node, now: float) -> None:
        """``node`` is Ready again: off the queue, its taint removed (its pods' evictions are cancelled)."""
        self.not_ready.discard(node.id)
        self._dequeue(node)
        self.tainted.pop(node.id, None)
        self._soon(now)

    def zone_dark(self, zone: int, now: float) -> None:
        """The other nodes of ``zone`` are NotReady (it went dark a grace ago)."""
        self.dark.add(zone)
        self._soon(now)

    def zone_back(self, zone: int, now: float) -> None:
        self.dark.discard(zone)
        self._soon(now)

    def nodes_changed(self, node: Node, now: float) -> None:
        """A node joined (ready) or left the cluster: the zones' sizes change; a removed node leaves its queue."""
        had = bool(self.not_ready or self.dark)
        if node.removed_s is not None:
            self.not_ready.discard(node.id)
            self._dequeue(node)
            self.tainted.pop(node.id, None)
        if had or self.not_ready or self.dark:
            self._soon(now)

    def is_tainted(self, node: Node, since: float) -> bool:
        """Whether ``node`` still carries the taint it got at ``since`` (its pods' evictions stand)."""
        return self.tainted.get(node.id) == since

    # ---- the controller's pass ----------------------------------------------------------------------------
    def _enqueue(self, node: Node) -> None:
        q = self.queues[node.zone]
        if node.id not in self.tainted and node not in q:
            q.append(node)

    def _dequeue(self, node: Node) -> None:
        q = self.queues[node.zone]
        if node in q:
            q.remove(node)

    def _soon(self, now: float) -> None:
        """A pass at ``now``, after every other change of this instant (one pass for all of them)."""
        if self._pass_at != now:
            self._pass_at = now
            Timeout(self._env, 0.0, now).callbacks.append(self._pass)

    def _pass(self, ev: Timeout) -> None:
        now = self._env.now
        if self._pass_at == cast(float, ev.value):
            self._pass_at = None
        counts = self._counts()  # tainting changes no Ready condition: one count serves the whole pass
        self._handle_disruption(now, counts)
        self._taint(now)
        unready, total = sum(nr for _, nr in counts), sum(r + nr for r, nr in counts)
        halted = self.unhealthy(unready, total)
        if halted != self.autoscaler_halted:
            self.autoscaler_halted = halted
            self.log.append((now, "autoscaler_halted" if halted else "autoscaler_resumed", -1,
                             f"{unready} of {total} nodes NotReady"))
            if not halted:
                self.pool.resume(now)  # the pods that waited get nodes

    def unhealthy(self, unready: int, total: int) -> bool:
        """cluster-autoscaler's ``IsClusterHealthy``, negated, for ``unready`` of the cluster's ``total`` registered
        nodes NotReady: more than ``ok_total_unready_count`` and more than ``max_total_unready_percentage`` of
        them. Then it adds and removes no node. (Simplified: a node NotReady within 15 minutes of registering,
        which it counts as not started, counts here.)"""
        spec = self.spec
        return unready > spec.ok_total_unready_count and unready > spec.max_total_unready_percentage / 100.0 * total

    def _counts(self) -> list[tuple[int, int]]:
        """(Ready, NotReady) nodes in each zone: the GPU nodes registered and not removed, and the others."""
        other = self.spec.other_nodes_per_zone
        counts = [[0, other] if z in self.dark else [other, 0] for z in range(self.zones)]
        for n in self.pool._up:
            if n.ready_s is not None:
                counts[n.zone][1 if n.id in self.not_ready else 0] += 1
        return [(r, nr) for r, nr in counts]

    def _handle_disruption(self, now: float, counts: list[tuple[int, int]]) -> None:
        """Upstream ``handleDisruption``: each zone's state and its limiter's rate; master disruption.
        ``counts``: (Ready, NotReady) nodes of each zone (``_counts``)."""
        spec = self.spec
        present = [z for z in range(self.zones) if sum(counts[z]) > 0]  # zones with no node are not seen
        new = {z: zone_state(*counts[z], spec.unhealthy_zone_threshold) for z in present}
        all_full = bool(present) and all(s == ZoneState.FULL for s in new.values())
        was_full = self.master_disruption
        if all_full and was_full:
            return
        if all_full:  # every node NotReady: the controller's own network is suspect; no eviction at all
            self.master_disruption = True
            self.log.append((now, "master_disruption", -1, "taints removed, evictions stopped"))
            for z in range(self.zones):
                self.buckets[z] = self.buckets[z].swapped(0.0, now)
                self.states[z] = ZoneState.FULL
            self.tainted.clear()
            for n in self.pool._up:  # re-queued untainted, as the next monitor pass does
                if n.id in self.not_ready:
                    self._enqueue(n)
            return
        self.master_disruption = False
        if was_full:
            self.log.append((now, "master_disruption_over", -1, "limiters reset to the zones' states"))
        for z in present:
            state = new[z]
            if state == self.states[z] and not was_full:
                continue
            if state != self.states[z]:
                self.log.append((now, "zone_state", z, state.value))
            self.states[z] = state
            size = sum(counts[z])
            if state == ZoneState.PARTIAL:
                rate = spec.secondary_node_eviction_rate if size > spec.large_cluster_size_threshold else 0.0
            else:  # normal, and full disruption of some zones only
                rate = spec.node_eviction_rate
            self.buckets[z] = self.buckets[z].swapped(rate, now)

    def _taint(self, now: float) -> None:
        """The tainting pass: each zone's queue, as far as its limiter allows now; a wake for the next token."""
        wake = math.inf
        for z in range(self.zones):
            q = self.queues[z]
            bucket = self.buckets[z]
            while q and bucket.try_accept(now):
                node = q.pop(0)
                self.tainted[node.id] = node.tainted_s = now
                self.log.append((now, "taint", z, f"node {node.id}"))
                self._on_taint(node, now)
            if q:
                wake = min(wake, bucket.token_at)
        if wake < math.inf and wake != self._wake_at:
            self._wake_at = wake
            Timeout(self._env, wake - now, wake).callbacks.append(self._woken)

    def _woken(self, ev: Timeout) -> None:
        if self._wake_at == cast(float, ev.value):
            self._wake_at = math.inf
        now = self._env.now
        self._taint(now)

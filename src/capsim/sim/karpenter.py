"""Karpenter's disruption controller for the GPU nodes (``cluster.karpenter``): consolidation instead of
cluster-autoscaler's scale-down.

Re-implemented from kubernetes-sigs/karpenter (Apache-2.0, (c) The Kubernetes Authors; no code copied):
``pkg/controllers/disruption`` (``controller.go``, ``emptiness.go``, ``multinodeconsolidation.go``,
``singlenodeconsolidation.go``, ``validation.go``, ``helpers.go``) and the NodeClaim's ``Consolidatable``
condition (``pkg/controllers/nodeclaim/disruption/consolidation.go``):

* A node is consolidatable once ``consolidateAfter`` has passed since the last pod event on it: a pod placed
  there, or one that began terminating there (``lastPodEventTime``); a node that never had one counts from
  when it was ready (initialized). ``consolidateAfter: Never`` (``consolidate_after_s: null``) turns it off.
* The controller polls every 10 s (``pollingPeriod``) and tries its methods in order, acting on the first
  command one yields: emptiness (consolidatable nodes with no pod but terminating ones), then, under
  ``WhenEmptyOrUnderutilized``, multi-node consolidation (the largest run of candidates, cheapest to disrupt
  first, whose pods all fit on the other nodes) and single-node consolidation (the first candidate whose pods
  fit). A candidate with pods needs the PodDisruptionBudget to allow a disruption. With one node type a
  replacement is never cheaper, so a command only deletes (no replacement node is launched).
* A command waits 15 s (``consolidationTTL``) and is validated against the cluster then: every candidate still
  one (consolidatable, empty for emptiness, nothing placed on it meanwhile when that resets its timer), the
  budget still allowing each, and their pods still fitting elsewhere. If any fails, the command is dropped.
  After a command runs the controller looks again at once, otherwise at its next poll.
* The budget (``budgets[].nodes``): a count, or a percentage of the ready nodes rounded up, less the nodes
  NotReady or already being deleted (``BuildDisruptionBudgetMapping``).
* A command's nodes are tainted together (no pod placed on any of them), then each one's pods evicted through the eviction API (the
  PodDisruptionBudget holds some back, asked again every 5 s) and replaced on the other nodes by the
  ReplicaSet, and the instance goes, no longer billed, when its last pod has left.

Not modelled: drift, expiration (``expireAfter``, 720 h by default, passes no run) and Karpenter's choice of
instance types; provisioning, zones and a GPU stockout's backoff stay as ``capsim.sim.nodes`` models them
(``node_provision_s`` includes Karpenter's 1 to 10 s batching of pending pods).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capsim.model.scenario import Karpenter
    from capsim.sim.nodes import Node, NodePool

#: the disruption controller's polling period (``pollingPeriod``, s)
POLL_S = 10.0
#: between computing a command and validating it (``consolidationTTL``, s)
VALIDATION_S = 15.0
#: candidates multi-node consolidation considers at once (``MaxParallel``)
MAX_PARALLEL = 100


class Disruption:
    """Karpenter's disruption controller over ``pool``'s nodes: ``drain(node, now)`` evicts a node's pods and
    ``pods_by_node()`` counts each node's pods that are not terminating (one pass over the pods; a node with none
    may be missing)."""

    def __init__(self, pool: NodePool, spec: Karpenter, drain: Callable[[Node, float], None],
                 pods_by_node: Callable[[], Mapping[Node, int]]) -> None:
        self.pool = pool
        self.spec = spec
        self._drain = drain
        self._pods_by_node = pods_by_node
        self.log = pool.lifecycle.log if pool.lifecycle is not None else []

    def run(self) -> Generator[Any, Any, None]:
        env = self.pool.sim.env
        while True:
            yield env.timeout(POLL_S)
            while (yield from self._disrupt()):
                pass  # a command ran: look again at once

    # ---- one pass of the methods --------------------------------------------------------------------------
    def _disrupt(self) -> Generator[Any, Any, bool]:
        env = self.pool.sim.env
        methods: list[tuple[str, Callable[[float, Mapping[Node, int]], list[Node]]]] = [("empty", self._empty_command)]
        if self.spec.consolidation_policy == "WhenEmptyOrUnderutilized":
            methods.append(("underutilized", self._consolidation_command))
        for reason, compute in methods:
            command = compute(env.now, self._pods_by_node())
            if command:
                yield env.timeout(VALIDATION_S)
                pods = self._pods_by_node()
                if self._valid(command, env.now, pods, empty=reason == "empty"):
                    self._execute(command, env.now, pods, reason)
                    return True
        return False

    def consolidatable(self, node: Node, now: float) -> bool:
        """The NodeClaim's ``Consolidatable`` condition: ``consolidateAfter`` since its last pod event (since it
        was ready, if none)."""
        after = self.spec.consolidate_after_s
        since = node.pod_event_s if node.pod_event_s is not None else node.ready_s
        return after is not None and since is not None and now - since >= after

    def _candidates(self, now: float, pods: Mapping[Node, int]) -> list[Node]:
        """Ready nodes taking pods (not tainted, failed or being deleted) that are consolidatable, their pods
        evictable (a node with pods needs the PodDisruptionBudget to allow a disruption)."""
        return [n for n in self.pool.up if n.schedulable and not n.remove_when_empty and self.consolidatable(n, now)
                and (not pods.get(n, 0) or self.pool.may_evict(1))]

    def allowed(self) -> int:
        """Disruptions the budget allows now: of the ready nodes, the budget's count or rounded-up share, less
        those NotReady (failed) or being deleted."""
        ready = [n for n in self.pool.up if n.ready_s is not None and not n.unfulfilled]
        disrupting = sum(1 for n in ready if n.cordoned or n.remove_when_empty or n.failed_s is not None)
        return max(self.spec.allowed(len(ready)) - disrupting, 0)

    def _empty_command(self, now: float, pods: Mapping[Node, int]) -> list[Node]:
        """Emptiness: the consolidatable nodes with no pod (terminating ones aside), as many as the budget allows."""
        empty = [n for n in self._candidates(now, pods) if not pods.get(n, 0)]
        return empty[:self.allowed()]

    def _consolidation_command(self, now: float, pods: Mapping[Node, int]) -> list[Node]:
        """Multi-node consolidation's largest run of candidates (fewest pods first) whose pods fit on the nodes
        left, within the budget; else single-node consolidation's first candidate whose pods fit."""
        candidates = sorted((n for n in self._candidates(now, pods) if pods.get(n, 0)), key=lambda n: (pods[n], n.id))
        room = min(self.allowed(), MAX_PARALLEL)
        for k in range(min(room, len(candidates)), 1, -1):
            if self._fits(candidates[:k], pods):
                return candidates[:k]
        if room:
            for n in candidates:
                if self._fits([n], pods):
                    return [n]
        return []

    def _fits(self, nodes: list[Node], pods: Mapping[Node, int]) -> bool:
        """Whether the pods of ``nodes`` fit on the other nodes (their free GPUs, under the spreads)."""
        leaving = set(nodes)
        return self.pool.fit_on(sum(pods.get(n, 0) for n in nodes), [m for m in self.pool.up if m not in leaving])

    def _valid(self, command: list[Node], now: float, pods: Mapping[Node, int], empty: bool) -> bool:
        """The command still holds ``VALIDATION_S`` later (``Validation.IsValid``); logs why when it does not."""
        candidates = set(self._candidates(now, pods))
        why = None
        if any(n not in candidates for n in command):
            why = "a candidate is no longer one (a pod placed on it, or it went)"
        elif self.allowed() < len(command):
            why = "the budget no longer allows it"
        elif empty and any(pods.get(n, 0) for n in command):
            why = "a candidate is no longer empty"
        elif not empty and not self._fits(command, pods):
            why = "its pods no longer fit on the other nodes"
        if why is not None:
            self.log.append((now, "consolidation_dropped", -1,
                             f"nodes {', '.join(str(n.id) for n in command)}: {why}"))
            return False
        return True

    def _execute(self, command: list[Node], now: float, pods: Mapping[Node, int], reason: str) -> None:
        """Taint the command's nodes together (so no evicted pod's replacement lands on one), then evict each one's
        pods (replaced elsewhere); a node goes now if no pod holds its GPUs, else with its last pod."""
        for node in command:
            node.cordoned = True
        for node in command:
            n = pods.get(node, 0)
            self.log.append((now, "consolidation", node.zone,
                             f"node {node.id}: {reason}" + (f", {n} pod(s) evicted" if n else "")))
            if node.used == 0:
                self.pool.remove(node, now)
            elif n:
                self._drain(node, now)  # the node goes with its last pod (NodePool.release)
        self.pool.resume(now)

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

Drift (``drift_at_s``: the NodePool's node template changed, a new AMI say), from ``drift.go`` and the orchestration
queue (``queue.go``):

* A node created before a template change is drifted from that moment. Between emptiness and consolidation, the
  controller takes the drifted node with pods that drifted first (the oldest of those), if the budget allows one
  more disruption (the least of the budgets that apply to drift) and no PodDisruptionBudget blocks its pods (there
  is no ``terminationGracePeriod`` here). Its pods are simulated onto the other nodes; the new nodes they need
  beyond those are its replacements, and if even they cannot take the pods (the NodePool's GPU limit, no zone) it
  is skipped (a ``drift_blocked`` row, once). A drifted node with no pods is left to emptiness (under
  ``consolidateAfter: Never`` it stays). No validation wait: the command starts at once, one node per command.
* The node is tainted and its replacements launched; the queue checks every second (``queueBaseDelay``) and, when
  every replacement is ready, deletes the node: its pods are evicted as consolidation's are, and it goes with its
  last. A replacement that fails (a GPU stockout, its zone lost) or is not ready within 10 minutes
  (``minRetryDuration``) fails the command: the node is untainted and a later pass tries again.

Not modelled: expiration (``expireAfter``, 720 h by default, passes no run), ``terminationGracePeriod`` and
Karpenter's choice of instance types; provisioning, zones and a GPU stockout's backoff stay as ``capsim.sim.nodes``
models them (``node_provision_s`` includes Karpenter's 1 to 10 s batching of pending pods).
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
#: how often the orchestration queue looks whether a command's replacements are ready (``queueBaseDelay``, s)
QUEUE_RETRY_S = 1.0
#: a command whose replacements are not ready this long after it started fails (``minRetryDuration``, s)
QUEUE_TIMEOUT_S = 600.0


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
        self._blocked: dict[int, str] = {}  # node id -> why drift could not replace it, as last logged

    def run(self) -> Generator[Any, Any, None]:
        env = self.pool.sim.env
        while True:
            yield env.timeout(POLL_S)
            while (yield from self._disrupt()):
                pass  # a command ran: look again at once

    # ---- one pass of the methods --------------------------------------------------------------------------
    def _disrupt(self) -> Generator[Any, Any, bool]:
        """The methods in Karpenter's order (emptiness, drift, multi- and single-node consolidation): whether one
        acted."""
        env = self.pool.sim.env
        if (yield from self._consolidate("empty", self._empty_command)):
            return True
        if self._drift(env.now, self._pods_by_node()):
            return True
        if self.spec.consolidation_policy == "WhenEmptyOrUnderutilized":
            return (yield from self._consolidate("underutilized", self._consolidation_command))
        return False

    def _consolidate(self, reason: str, compute: Callable[[float, Mapping[Node, int]], list[Node]]
                     ) -> Generator[Any, Any, bool]:
        """A consolidation method: its command, validated ``VALIDATION_S`` later and then executed."""
        env = self.pool.sim.env
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

    def _disruptable(self, node: Node, pods: Mapping[Node, int]) -> bool:
        """A ready node taking pods (not tainted, failed or being deleted) whose pods are evictable: one with pods
        needs the PodDisruptionBudget to allow a disruption (``NewCandidate``)."""
        return (node.schedulable and not node.remove_when_empty
                and (not pods.get(node, 0) or self.pool.may_evict(1)))

    def _candidates(self, now: float, pods: Mapping[Node, int]) -> list[Node]:
        """Consolidation's candidates: the disruptable nodes that are consolidatable."""
        return [n for n in self.pool.up if self.consolidatable(n, now) and self._disruptable(n, pods)]

    def allowed(self, drift: bool = False) -> int:
        """Disruptions the budget allows now (``drift``: the budgets that apply to drift): of the ready nodes, the
        budget's count or rounded-up share, less those NotReady (failed) or being disrupted."""
        ready = [n for n in self.pool.up if n.ready_s is not None and not n.unfulfilled]
        disrupting = sum(1 for n in ready if n.cordoned or n.remove_when_empty or n.failed_s is not None)
        return max(self.spec.allowed(len(ready), drift) - disrupting, 0)

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

    # ---- drift ------------------------------------------------------------------------------------------------
    def _drift(self, now: float, pods: Mapping[Node, int]) -> bool:
        """Drift's command (``drift.go``): the first drifted node with pods (drifted first, then the oldest) that
        the budget allows and whose pods' PodDisruptionBudget allows a disruption, if its pods fit on the other
        nodes with the replacements it needs; started at once. Whether one started."""
        if not self.spec.drift_at_s or self.allowed(drift=True) < 1:
            return False
        drifted = []
        for n in self.pool.up:
            since = self.spec.drifted_s(n.created_s)
            if since is not None and since <= now and pods.get(n, 0) and self._disruptable(n, pods):
                drifted.append((since, n.id, n))
        for _, _, node in sorted(drifted):
            zones = self.pool.nodes_needed(pods[node], [m for m in self.pool.up if m is not node])
            if zones is None:
                why = "its pods fit nowhere, even on new nodes (the NodePool's GPU limit, or no zone can take one)"
                if self._blocked.get(node.id) != why:
                    self._blocked[node.id] = why
                    self.log.append((now, "drift_blocked", node.zone, f"node {node.id}: {why}"))
                continue
            self._blocked.pop(node.id, None)
            self._replace(node, zones, now, pods[node])
            return True
        return False

    def _replace(self, node: Node, zones: list[int], now: float, pods: int) -> None:
        """Taint ``node`` and launch its replacements in ``zones``; the queue deletes it once they are ready."""
        node.cordoned = True
        new = []
        for zone in zones:
            launched = self.pool.launch(now, zone)
            assert launched is not None, "nodes_needed checked max_gpus and the zones"
            new.append(launched)
        what = (f"replacement node(s) {', '.join(str(n.id) for n in new)} launched" if new
                else "its pods fit on the other nodes")
        self.log.append((now, "drift", node.zone, f"node {node.id}: drifted, {pods} pod(s); {what}"))
        self.pool.sim.env.process(self._orchestrate(node, new, now))

    def _orchestrate(self, node: Node, new: list[Node], started: float) -> Generator[Any, Any, None]:
        """The orchestration queue's command: every ``QUEUE_RETRY_S`` it looks whether the replacements are ready;
        then it deletes ``node`` (its pods evicted, and it goes with its last). A replacement gone, or not all of
        them ready within ``QUEUE_TIMEOUT_S``, fails the command: ``node`` is untainted."""
        env = self.pool.sim.env
        if new:
            yield env.timeout(self.pool.provision_s)
        while node.removed_s is None:
            if any(n.removed_s is not None for n in new) or env.now - started >= QUEUE_TIMEOUT_S:
                node.cordoned = False
                self.log.append((env.now, "drift_failed", node.zone,
                                 f"node {node.id}: a replacement was not created or not ready in time; untainted"))
                self.pool.resume(env.now)
                return
            if all(n.ready_s is not None for n in new):
                break
            yield env.timeout(QUEUE_RETRY_S)
        if node.removed_s is not None:
            return  # it went meanwhile, its pods gone
        if node.failed_s is not None:  # it died: the node lifecycle's path takes it, and if it comes back it is
            node.cordoned = False      # a drifted node like any other
            return
        if node.used == 0:
            self.pool.remove(node, env.now)
        else:
            self._drain(node, env.now)  # the node goes with its last pod (NodePool.release)
        self.pool.resume(env.now)

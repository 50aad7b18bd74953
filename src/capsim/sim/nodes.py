"""The GPU nodes under the Deployment: where a pod gets its GPU, which nodes hold the image, node provisioning.

With a ``cluster`` section the GPUs are finite and live on nodes of ``node_gpus`` GPUs. A pod holds
``batching.tensor_parallel_size`` GPUs (one by default), all on one node (``nvidia.com/gpu: N`` is one
container's request, which the kubelet's device plugin serves from its own node). A pending pod takes free
GPUs on the oldest ready node that has enough (a bin-packing placement, as kube-scheduler's
``MostAllocated`` scoring would give; the default profile scores CPU and memory only). With ``pods.spread``
(a topology spread constraint on the hostname: ``_pick``) it goes only where the Deployment's pods would
number at most ``max_skew`` above the fewest on a schedulable node, that fewest counted as 0 while fewer
than ``min_nodes`` count, and to the emptiest such node; provisioning and drains follow the same rule
(``_new_nodes_for``). Missing nodes are
provisioned, ``node_provision_s`` later, as cluster-autoscaler scales a node group up: whole nodes, as many
as the waiting pods need, while their GPUs stay within ``max_gpus`` (its ``--gpu-total`` maximum; a node
that would pass it is not added, so ``max_gpus`` not a multiple of ``node_gpus`` leaves the rest unused). A
new node has no image: the first pod placed on it pulls it (``pods.image_pull_s``), and pods placed while the
pull runs wait for the same pull. Without a ``cluster``
section a GPU is always free and every new pod pulls its image once (it lands on a node of its own).

Scale-down follows cluster-autoscaler (``cluster-autoscaler/FAQ.md``, "How does scale-down work?", and its
flags; Apache-2.0 (c) The Kubernetes Authors, the rule re-implemented, no code copied): every
``scan_interval_s`` (``--scan-interval``, 10 s) a ready node whose pods request less than
``scale_down_utilization_threshold`` of its GPUs (``--scale-down-gpu-utilization-threshold``, 0.5) is
unneeded; one unneeded for ``scale_down_unneeded_time_s`` (``--scale-down-unneeded-time``, 10 min) is
removed, unless a node was added in the last ``scale_down_delay_after_add_s`` (``--scale-down-delay-after-add``,
10 min). Empty nodes go at once; a node with pods is removed only if they fit on the other nodes and the
Deployment's PodDisruptionBudget (``pods.disruption_budget``) allows evicting them all, one at a time: it
is cordoned, its pods are evicted (they drain within their grace period and the ReplicaSet replaces them
elsewhere, with a cold start), and it goes when the last one has left. A node is billed
from its creation (booting included) to its removal. A later burst waits for new nodes again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, cast

from simpy.events import Timeout

if TYPE_CHECKING:
    from capsim.sim.simulate import Simulation


class Node:
    """One GPU node: its size, the GPUs its pods hold, whether it has the image, and its life times (s)."""

    __slots__ = ("cordoned", "created_s", "failed_s", "gpus", "id", "image_at_s", "ready_s", "removed_s",
                 "unneeded_since", "used")  # used: GPUs its pods hold

    def __init__(self, node_id: int, gpus: int, created_s: float, ready_s: float | None) -> None:
        self.id = node_id
        self.gpus = gpus
        self.used = 0
        self.created_s = created_s  # billed from here
        self.ready_s = ready_s  # None while it is provisioned
        self.removed_s: float | None = None  # billed until here
        self.image_at_s: float | None = None  # when the image is (or will be) on the node
        self.cordoned = False  # being drained by the cluster-autoscaler: takes no new pod
        self.unneeded_since: float | None = None
        self.failed_s: float | None = None  # when it died (faults.node_failures): no pod is placed on it again

    @property
    def schedulable(self) -> bool:
        """Ready and not cordoned, removed or failed: a node that takes pods, and that a spread counts
        (nodeTaintsPolicy Honor)."""
        return self.ready_s is not None and not self.cordoned and self.removed_s is None and self.failed_s is None

    @property
    def free(self) -> int:
        return self.gpus - self.used if self.schedulable else 0

    def __repr__(self) -> str:
        return f"Node({self.id}, {self.used}/{self.gpus} GPUs)"


class NodePool:
    """The nodes of the cluster section, or an unlimited supply of GPUs without one; a pod takes ``pod_gpus``."""

    def __init__(self, sim: Simulation, on_node_ready: Callable[[float], None],
                 evict: Callable[[Node, float], None], may_evict: Callable[[int], bool] = lambda _: True) -> None:
        self.sim = sim
        spec = sim.scenario.cluster
        self.limited = spec is not None
        self.node_gpus = spec.node_gpus if spec else 0
        self.max_gpus = spec.max_gpus if spec else 0
        self.provision_s = spec.node_provision_s if spec else 0.0
        self.pod_gpus = sim.scenario.batching.tensor_parallel_size
        self.pods_per_node = spec.pods_per_node(self.pod_gpus) if spec else 0  # >= 1: the scenario checks a pod fits
        spread = sim.scenario.pods.spread
        # pods.spread: (maxSkew, minDomains); none packs. Only the Deployment's pods use the GPUs, so a node's
        # pods are its used GPUs over a pod's
        self._skew = spread.max_skew if spread is not None else None
        self._min_nodes = sim.scenario.pods.spread_min_nodes
        self.nodes: list[Node] = []
        self._on_node_ready = on_node_ready
        self._evict = evict
        self._may_evict = may_evict  # whether k of the Deployment's pods may be evicted now (its PDB)
        self._spec = spec
        self.last_add_s = -math.inf  # the last scale-up (a node added), for the delay after add
        self.removals: list[tuple[float, int]] = []  # (time, node id) when a node went
        if spec is not None and spec.scale_down_enabled:
            sim.env.process(self._scan())

    # ---- capacity --------------------------------------------------------------------------------
    def _live(self) -> list[Node]:
        return [n for n in self.nodes if n.removed_s is None]

    def _add(self, now: float, ready: bool) -> Node | None:
        if sum(n.gpus for n in self._live()) + self.node_gpus > self.max_gpus:
            return None  # a whole node more would pass max_gpus
        node = Node(len(self.nodes), self.node_gpus, now, now if ready else None)
        self.nodes.append(node)
        return node

    def start(self, replicas: int) -> None:
        """Time 0: enough ready nodes, with the image, for ``replicas`` pods (within ``max_gpus``; spread
        over as many as ``pods.spread`` needs)."""
        if not self.limited:
            return
        wanted = self._new_nodes_for(replicas, []) if self._skew is not None else -(-replicas // self.pods_per_node)
        while len(self.nodes) < wanted:
            node = self._add(0.0, ready=True)
            if node is None:
                break
            node.image_at_s = 0.0
            self.sim.faults.node_ready(node)

    def take(self) -> Node | None:
        """Free GPUs for a pod: its node (``None`` without a cluster section); raises if none has enough."""
        if not self.limited:
            return None
        node = self._choose()
        if node is None:
            raise LookupError("no node with free GPUs for a pod")  # callers ask has_free() first
        node.used += self.pod_gpus  # the next scan decides whether it is still unneeded
        return node

    def has_free(self) -> bool:
        """Whether a pod can be placed now."""
        return not self.limited or self._choose() is not None

    def _choose(self) -> Node | None:
        """The node the next pod goes to: packed, the oldest with room; with ``pods.spread``, among those with
        room that the skew allows, the one with the fewest pods (the oldest of them), as PodTopologySpread
        filters and scores (``pkg/scheduler/framework/plugins/podtopologyspread``, re-implemented)."""
        pg = self.pod_gpus
        if self._skew is None:
            for node in self.nodes:
                if node.free >= pg:
                    return node
            return None
        domains = [n for n in self.nodes if n.schedulable]
        k = self._pick([self._slot(n) for n in domains])
        return None if k is None else domains[k]

    def _pick(self, slots: list[list[int]]) -> int | None:
        """Which of ``slots`` (``[pods on a node, free pod slots]``) the spread puts the next pod on: one with a
        free slot whose pods would be at most ``max_skew`` above the fewest (0 while fewer than ``min_nodes``
        nodes count), the one with the fewest pods, the first of those; ``None`` when none may take it."""
        assert self._skew is not None
        counts = [c for c, _ in slots]
        floor = 0 if len(counts) < self._min_nodes or not counts else min(counts)
        best = None
        for k, (count, room) in enumerate(slots):
            if room > 0 and count + 1 - floor <= self._skew and (best is None or count < counts[best]):
                best = k
        return best

    def _new_nodes_for(self, pods: int, slots: list[list[int]]) -> int:
        """How many new, empty nodes ``pods`` more pods need under the spread, beyond ``slots`` (one
        ``[pods on it, free pod slots]`` per node counted; changed in place), as cluster-autoscaler's
        simulation of the scheduler would find."""
        new = 0
        for _ in range(pods):
            k = self._pick(slots)
            if k is None:
                slots.append([0, self.pods_per_node])
                k = len(slots) - 1
                new += 1
            slots[k][0] += 1
            slots[k][1] -= 1
        return new

    def _slots(self) -> list[list[int]]:
        """``[pods, free pod slots]`` of each counted node and each node being provisioned."""
        return [self._slot(n) for n in self.nodes if n.schedulable or (n.ready_s is None and n.removed_s is None)]

    def _slot(self, n: Node) -> list[int]:
        """``[pods on n, free pod slots on n]``, for ``_new_nodes_for``."""
        pg = self.pod_gpus
        return [n.used // pg, (n.gpus - n.used) // pg]

    def release(self, node: Node | None, now: float) -> None:
        """A pod on ``node`` gave its GPUs back at ``now``; a drained node goes with its last pod."""
        if node is not None:
            node.used -= self.pod_gpus
            if node.cordoned and node.used == 0 and node.removed_s is None:
                self._remove(node, now)

    def provision_for(self, waiting: int, now: float) -> None:
        """Provision nodes for ``waiting`` pods beyond what nodes being provisioned will hold."""
        if not self.limited or waiting <= 0:
            return
        if self._skew is not None:  # where the skew lets them go, on the nodes there and those coming
            needed = self._new_nodes_for(waiting, self._slots())
        else:
            coming = self.pods_per_node * sum(1 for n in self.nodes if n.ready_s is None and n.removed_s is None)
            needed = math.ceil(max(waiting - coming, 0) / self.pods_per_node)
        for _ in range(needed):
            node = self._add(now, ready=False)
            if node is None:
                return
            self.last_add_s = now
            ev = Timeout(self.sim.env, self.provision_s, node)
            ev.callbacks.append(self._node_ready)

    def _node_ready(self, ev: Timeout) -> None:
        node = cast(Node, ev.value)
        now = self.sim.env.now
        node.ready_s = now
        self.sim.faults.node_ready(node)
        self._on_node_ready(now)

    # ---- cluster-autoscaler's scale-down ------------------------------------------------------------
    def _scan(self) -> Generator[Any, Any, None]:
        spec = self._spec
        assert spec is not None
        env = self.sim.env
        while True:
            yield env.timeout(spec.scan_interval_s)
            self.scale_down(env.now)

    def scale_down(self, now: float) -> None:
        """One scan: mark unneeded nodes, and remove those unneeded long enough (see the module doc)."""
        spec = self._spec
        assert spec is not None
        live = [n for n in self.nodes if n.removed_s is None and n.ready_s is not None and not n.cordoned
                and n.failed_s is None]  # a failed node goes by its own timer (fail)
        for n in live:
            if n.used / n.gpus < spec.scale_down_utilization_threshold:
                if n.unneeded_since is None:
                    n.unneeded_since = now
            else:
                n.unneeded_since = None
        if now - self.last_add_s < spec.scale_down_delay_after_add_s:
            return
        due = [n for n in live if n.unneeded_since is not None
               and now - n.unneeded_since >= spec.scale_down_unneeded_time_s]
        for n in due:
            if n.used == 0:
                self._remove(n, now)
        # a node with pods: only if they fit on the nodes that stay, one drain at a time
        if any(n.cordoned and n.removed_s is None for n in self.nodes):
            return
        for n in due:
            if n.used == 0:
                continue
            pods = n.used // self.pod_gpus
            if self._skew is not None:  # they must fit the spread on the nodes that stay
                stay = [self._slot(m) for m in self.nodes if m is not n and m.schedulable
                        and not (m in due and m.used == 0)]
                fits = self._new_nodes_for(pods, stay) == 0
            else:
                room = sum(m.free // self.pod_gpus for m in self.nodes if m is not n and m.removed_s is None
                           and not (m in due and m.used == 0))  # pods the other nodes can take
                fits = room >= pods
            if fits and self._may_evict(pods):
                n.cordoned = True
                self._evict(n, now)
                return

    # ---- a node that dies ---------------------------------------------------------------------------
    def fail(self, node: Node, now: float) -> None:
        """``node`` dies at ``now``: it takes no pod from now on; with scale-down enabled cluster-autoscaler
        removes it (and its billing ends) ``scale_down_unready_time_s`` later; without, it stays, billed. Until
        it goes it counts toward ``max_gpus``, as the node group's size does."""
        spec = self._spec
        assert spec is not None
        node.failed_s = now
        if spec.scale_down_enabled:
            ev = Timeout(self.sim.env, spec.scale_down_unready_time_s, (node, now))
            ev.callbacks.append(self._unready_gone)

    def _unready_gone(self, ev: Timeout) -> None:
        node, failed_s = cast(tuple[Node, float], ev.value)
        if node.removed_s is None and node.failed_s == failed_s:  # not back meanwhile
            self._remove(node, self.sim.env.now)
            self._on_node_ready(self.sim.env.now)  # max_gpus has room again: waiting pods may get a node

    def healed(self, node: Node) -> None:
        """A failed node is reachable again (a partition healed): schedulable, and it may fail again."""
        node.failed_s = None
        self.sim.faults.node_ready(node)

    def failable(self) -> list[Node]:
        """Nodes a node failure may pick: ready, not removed or failed, holding pods."""
        return [n for n in self.nodes if n.ready_s is not None and n.removed_s is None and n.failed_s is None
                and n.used > 0]

    def _remove(self, node: Node, now: float) -> None:
        node.removed_s = now
        node.cordoned = True
        self.removals.append((now, node.id))

    # ---- the image -------------------------------------------------------------------------------
    def image_wait_s(self, node: Node | None, now: float, pull_s: Callable[[], float]) -> float:
        """How long a pod placed on ``node`` at ``now`` waits for the image (pulls it if nobody has)."""
        if node is None:
            return pull_s()
        if node.image_at_s is None:
            node.image_at_s = now + pull_s()
        return max(node.image_at_s - now, 0.0)

    # ---- accounting ------------------------------------------------------------------------------
    def gpus_now(self) -> float:
        """GPUs of the nodes that exist now, booting included (billed); NaN without a cluster section."""
        return float(sum(n.gpus for n in self._live())) if self.limited else math.nan

    def node_gpu_seconds(self, now: float) -> float:
        """GPU-seconds of the nodes from their creation to their removal (or ``now``)."""
        return sum(n.gpus * (min(n.removed_s if n.removed_s is not None else now, now) - n.created_s)
                   for n in self.nodes if n.created_s < now)

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
pull runs wait for the same pull. With ``pods.node_model_cache`` the node also keeps the model's files once a
container of an image has loaded it there: a later pod of that image placed on it starts in
``pods.restart_startup_s``. Without a ``cluster``
section a GPU is always free and every new pod pulls its image once and loads its model cold (it lands on a node of
its own).

Scale-down follows cluster-autoscaler (``cluster-autoscaler/FAQ.md``, "How does scale-down work?", and its
flags; ``core/scaledown/planner/planner.go`` ``categorizeNodes``; Apache-2.0 (c) The Kubernetes Authors, the
rule re-implemented, no code copied): every ``scan_interval_s`` (``--scan-interval``, 10 s) a ready node whose
pods request less than ``scale_down_utilization_threshold`` of its GPUs
(``--scale-down-gpu-utilization-threshold``, 0.5) and that the removal simulation finds removable (empty, or
its pods fit elsewhere and the PodDisruptionBudget has a disruption left: ``NodePool._removable``) is
unneeded, its unneeded time kept from scan to scan while it stays so; one unneeded for
``scale_down_unneeded_time_s`` (``--scale-down-unneeded-time``, 10 min) is removed, unless a node was added in the last ``scale_down_delay_after_add_s`` (``--scale-down-delay-after-add``,
10 min) or a scan deleted one or started a drain in the last ``scale_down_delay_after_delete_s``
(``--scale-down-delay-after-delete``, 0). Empty nodes go at once, at most ``max_scale_down_parallelism`` (``--max-scale-down-parallelism``, 10)
deletions at a time, a drain in progress among them; a node with pods is removed only if they fit on the other nodes and the
Deployment's PodDisruptionBudget (``pods.disruption_budget``) allows evicting them all, one at a time: it
is cordoned, its pods are evicted (they drain within their grace period and the ReplicaSet replaces them
elsewhere, with a cold start), and it goes when the last one has left. A node is billed
from its creation (booting included) to its removal. A later burst waits for new nodes again.

With ``cluster.karpenter`` a Karpenter NodePool removes the nodes instead, by consolidation
(``capsim.sim.karpenter``): cluster-autoscaler's scans do not run, nor does its halt on NotReady nodes.

Zones (``cluster.zones``): one node group per zone, kept balanced (``--balance-similar-node-groups``): a
new node goes to the zone with the fewest nodes (``_balanced_zone``), within each group's minimum
(``min_nodes_per_zone``, never scaled below) and maximum (``max_gpus_per_zone``). ``pods.zone_spread`` is
the topology spread on the zone, in ``_pick`` beside the hostname one; a zone with no schedulable node is
no domain of it. A zone that fails (``zone_failed``) takes no node until it is back, and its booting nodes
are lost. Spot nodes (``cluster.spot``): beyond ``on_demand_nodes`` a new node is spot, billed at the spot
price (``node_gpu_seconds(priced=True)``); a reclaimed one is cordoned and goes when its last pod has left
or at the notice's end (``reclaim``; the cluster drains its pods).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any, cast

from simpy.events import Timeout

from capsim.policy.node_group_backoff import NodeGroupBackoff
from capsim.sim.karpenter import Disruption
from capsim.sim.nodelifecycle import NodeLifecycle

if TYPE_CHECKING:
    from capsim.sim.simulate import Simulation


NODE_COLUMNS = ["node", "zone", "spot", "gpus", "created_s", "ready_s", "removed_s", "failures", "failed_at_end",
                "interrupted_s", "tainted_s", "gpu_hours", "unfulfilled"]


class Node:
    """One GPU node: its size, the GPUs its pods hold, whether it has the image, and its life times (s)."""

    __slots__ = ("cordoned", "created_s", "failed_s", "failures", "gpus", "id", "images", "interrupted_s", "models",
                 "pod_event_s", "ready_s", "remove_when_empty", "removed_s", "spot", "tainted_s", "unfulfilled",
                 "unneeded_since", "unremovable_until", "used", "zone")  # used: GPUs its pods hold

    def __init__(self, node_id: int, gpus: int, created_s: float, ready_s: float | None, zone: int = 0,
                 spot: bool = False) -> None:
        self.id = node_id
        self.zone = zone  # its availability zone (its node group), 0 .. cluster.zones - 1
        self.spot = spot  # a spot node (cluster.spot): cheaper, and the cloud may reclaim it
        self.gpus = gpus
        self.used = 0
        self.created_s = created_s  # billed from here
        self.ready_s = ready_s  # None while it is provisioned
        self.removed_s: float | None = None  # billed until here
        self.images: dict[int, float] = {}  # image (0: the first template's) -> when it is (or will be) on the node
        # images whose model a container has loaded here (pods.node_model_cache: its files stay)
        self.models: set[int] = set()
        self.cordoned = False  # being drained by the cluster-autoscaler: takes no new pod
        self.unneeded_since: float | None = None
        # cluster-autoscaler's removal simulation found it unremovable: no scale-down candidate before this
        self.unremovable_until = -math.inf
        self.failed_s: float | None = None  # when it died (faults.node_failures): no pod is placed on it again
        self.failures = 0  # how often it failed (a partition that heals may be followed by another)
        self.interrupted_s: float | None = None  # a spot node's interruption notice (cluster.spot)
        # a failed node cluster-autoscaler would remove but for the pods still on it (never evicted): it goes
        # with the last of them
        self.remove_when_empty = False
        self.tainted_s: float | None = None  # when the node lifecycle controller last tainted it unreachable
        # the last time a pod was placed on it or began terminating there (Karpenter's lastPodEventTime)
        self.pod_event_s: float | None = None
        # asked for during a GPU stockout (faults.gpu_stockouts): never created, never billed; it counts toward
        # its node group's size and max_gpus until cluster-autoscaler learns of the failure
        self.unfulfilled = False

    @property
    def schedulable(self) -> bool:
        """Ready and not cordoned, removed or failed: a node that takes pods, and that a spread counts
        (nodeTaintsPolicy Honor)."""
        return self.ready_s is not None and not self.cordoned and self.removed_s is None and self.failed_s is None

    def gpu_seconds(self, now: float) -> float:
        """GPU-seconds billed from its creation to its removal (or ``now``, if that comes first); none for a node
        the cloud never created (``unfulfilled``)."""
        if self.unfulfilled:
            return 0.0
        return self.gpus * (min(self.removed_s if self.removed_s is not None else now, now) - self.created_s)

    @property
    def free(self) -> int:
        return self.gpus - self.used if self.schedulable else 0

    def __repr__(self) -> str:
        return f"Node({self.id}, zone {self.zone}, {self.used}/{self.gpus} GPUs)"


class NodePool:
    """The nodes of the cluster section, or an unlimited supply of GPUs without one; a pod takes ``pod_gpus``."""

    def __init__(self, sim: Simulation, on_node_ready: Callable[[float], None],
                 evict: Callable[[Node, float], None], may_evict: Callable[[int], bool] = lambda _: True,
                 on_taint: Callable[[Node, float], None] = lambda node, now: None,
                 drain: Callable[[Node, float], None] | None = None,
                 pods_by_node: Callable[[], Mapping[Node, int]] = dict) -> None:
        self.sim = sim
        spec = sim.scenario.cluster
        self.limited = spec is not None
        self.node_gpus = spec.node_gpus if spec else 0
        self.max_gpus = spec.max_gpus if spec else 0
        self.provision_s = spec.node_provision_s if spec else 0.0
        self.pod_gpus = sim.scenario.batching.tensor_parallel_size
        self.pods_per_node = spec.pods_per_node(self.pod_gpus) if spec else 0  # >= 1: the scenario checks a pod fits
        pods = sim.scenario.pods
        # pods.spread and pods.zone_spread: (maxSkew, minDomains); none packs. Only the Deployment's pods use
        # the GPUs, so a node's pods are its used GPUs over a pod's
        self._skew = pods.spread.max_skew if pods.spread is not None else None
        self._min_nodes = pods.spread_min_nodes
        self._zskew = pods.zone_spread.max_skew if pods.zone_spread is not None else None
        self._min_zones = pods.spread_min_zones
        # whenUnsatisfiable ScheduleAnyway: the spread scores the nodes instead of filtering them
        self._soft = pods.spread is not None and pods.spread.when_unsatisfiable == "ScheduleAnyway"
        self._zsoft = pods.zone_spread is not None and pods.zone_spread.when_unsatisfiable == "ScheduleAnyway"
        self._spreading = self._skew is not None or self._zskew is not None
        self.zones = spec.zones if spec else 1
        self.zones_down: dict[int, float] = {}  # zone -> when it is back (inf: never), for zones failed now
        self.nodes: list[Node] = []  # every node of the run, by id (the nodes frame, the bill)
        self._up: list[Node] = []  # those not removed, oldest first: what placement and scans look at
        self._on_node_ready = on_node_ready
        self._evict = evict
        self.may_evict = may_evict  # whether k of the Deployment's pods may be evicted now (its PDB)
        self._spec = spec
        self.last_add_s = -math.inf  # the last scale-up (a node added), for the delay after add
        self.last_delete_s = -math.inf  # the last scan that deleted a node or started a drain, the delay after delete
        self.removals: list[tuple[float, int]] = []  # (time, node id) when a node went
        # the node lifecycle controller: which NotReady nodes are tainted (their pods evicted), and when
        self.lifecycle = NodeLifecycle(self, spec, on_taint) if spec is not None else None
        # GPU stockouts (faults.gpu_stockouts): (start, end, zone or None for every zone); a node asked for in one
        # fails, and cluster-autoscaler backs its zone's node group off
        faults = sim.scenario.faults
        self._stockouts = [(o.at_s, o.at_s + o.duration_s if o.duration_s is not None else math.inf, o.zone)
                           for o in (faults.gpu_stockouts if faults is not None else ())]
        self.backoff = NodeGroupBackoff(spec.initial_node_group_backoff_s, spec.max_node_group_backoff_s,
                                        spec.node_group_backoff_reset_s) if spec is not None else None
        self.failed_scale_ups = 0  # nodes asked for that the cloud did not create
        self._loops: set[float] = set()  # cluster-autoscaler loops at which pending pods are asked for again
        self.karpenter: Disruption | None = None
        if spec is not None and spec.karpenter is not None:  # Karpenter removes the nodes
            self.karpenter = Disruption(self, spec.karpenter, drain or evict, pods_by_node)
            if spec.karpenter.consolidate_after_s is not None or spec.karpenter.drift_at_s:
                sim.env.process(self.karpenter.run())
        elif spec is not None and spec.scale_down_enabled:
            sim.env.process(self._scan())

    # ---- capacity --------------------------------------------------------------------------------
    @property
    def up(self) -> list[Node]:
        """The nodes not removed, oldest first."""
        return self._up

    def _add(self, now: float, ready: bool, zone: int | None = None) -> Node | None:
        """A new node (in ``zone``, or the zone with the fewest nodes), or ``None`` when a whole node more
        would pass ``max_gpus`` or every zone is down."""
        if sum(n.gpus for n in self.up) + self.node_gpus > self.max_gpus:
            return None  # a whole node more would pass max_gpus
        if zone is None:
            zone = self._balanced_zone([])
            if zone is None:
                return None
        elif not self._zone_has_room(zone, []):
            return None
        spot = self._spec is not None and self._spec.spot is not None and sum(
            1 for n in self._up if not n.spot) >= self._spec.spot.on_demand_nodes
        node = Node(len(self.nodes), self.node_gpus, now, now if ready else None, zone, spot)
        self.nodes.append(node)
        self._up.append(node)
        return node

    def _balanced_zone(self, added: list[int], pods: list[int] | None = None) -> int | None:
        """The zone cluster-autoscaler adds the next node in: among the zones up with room for a node
        (``max_gpus_per_zone``), the one with the fewest nodes (the node groups kept balanced), the first of
        those; with ``pods`` (the Deployment's pods per zone, for ``pods.zone_spread``) the one with the fewest
        pods first. ``added``: zones of nodes about to be added. ``None`` when no zone can take a node."""
        count = self._nodes_per_zone()
        for z in added:
            count[z] += 1
        now = self.sim.env.now
        up = [z for z in range(self.zones) if z not in self.zones_down and self._zone_has_room(z, added)
              and not (self.backoff is not None and self.backoff.backed_off(z, now))]
        if not up:
            return None
        if pods is None:
            return min(up, key=lambda z: (count[z], z))
        return min(up, key=lambda z: (pods[z], count[z], z))

    def _nodes_per_zone(self) -> list[int]:
        """Each zone's node group size: its nodes not removed (booting and failed ones included)."""
        count = [0] * self.zones
        for n in self._up:
            count[n.zone] += 1
        return count

    def _zone_has_room(self, zone: int, added: list[int]) -> bool:
        """Whether a whole node more in ``zone`` stays within ``cluster.max_gpus_per_zone`` (``added``: zones of
        nodes about to be added)."""
        cap = self._spec.max_gpus_per_zone if self._spec is not None else None
        if cap is None:
            return True
        held = sum(n.gpus for n in self._up if n.zone == zone)
        return held + (added.count(zone) + 1) * self.node_gpus <= cap

    def start(self, replicas: int) -> None:
        """Time 0: each zone's minimum of nodes (``min_nodes_per_zone``), then enough ready nodes, with the
        image, for ``replicas`` pods (within ``max_gpus``; spread over as many as ``pods.spread`` needs, in
        the zones ``pods.zone_spread`` needs; balanced over the zones otherwise)."""
        if not self.limited:
            return
        assert self._spec is not None
        self._ready_nodes([z for z in range(self.zones) for _ in range(self._spec.min_nodes_per_zone)])
        if self._spreading:
            more: list[int | None] = list(self._new_nodes_for(replicas, self._slots())[0])
        else:
            more = [None] * (-(-replicas // self.pods_per_node) - len(self.nodes))
        self._ready_nodes(more)

    def _ready_nodes(self, zones: list[int] | list[int | None]) -> None:
        """Nodes ready at time 0 with the image, one in each of ``zones`` (``None``: balanced)."""
        for zone in zones:
            node = self._add(0.0, ready=True, zone=zone)
            if node is None:
                break
            node.images[0] = 0.0
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
        if not self._spreading:
            for node in self._up:
                if node.free >= pg:
                    return node
            return None
        domains = [n for n in self._up if n.schedulable]
        k = self._pick([self._slot(n) for n in domains])
        return None if k is None else domains[k]

    def _zone_pods(self, slots: list[list[int]]) -> list[int]:
        """The Deployment's pods in each zone, over ``slots``."""
        pods = [0] * self.zones
        for count, _, zone in slots:
            pods[zone] += count
        return pods

    def _pick(self, slots: list[list[int]]) -> int | None:
        """Which of ``slots`` (``[pods on a node, free pod slots, zone]``) the spreads put the next pod on, as
        PodTopologySpread filters and scores (re-implemented): a node with a free slot; under a DoNotSchedule
        ``pods.spread`` one whose pods would be at most ``max_skew`` above the fewest on a node (0 while fewer
        than ``min_nodes`` nodes count), under a DoNotSchedule ``pods.zone_spread`` one in a zone whose pods
        would be at most ``max_skew`` above the fewest in a zone (0 while fewer than ``min_zones`` zones
        count). Among those, the lowest score of the ScheduleAnyway spreads (the pods in the node's domain
        times log(domains + 2), summed: upstream's ``scoreForCount``), then with ``pods.spread`` the fewest
        pods on the node, then the first (packed: the oldest); ``None`` when none may take it."""
        skew, zskew = self._skew, self._zskew
        allowed_zone = None
        zpods: list[int] = []
        if zskew is not None:
            zpods = self._zone_pods(slots)
            domains = {zone for _, _, zone in slots}
            if not self._zsoft:
                zfloor = 0 if len(domains) < self._min_zones or not domains else min(zpods[z] for z in domains)
                allowed_zone = [zpods[z] + 1 - zfloor <= zskew for z in range(self.zones)]
            zweight = math.log(len(domains) + 2)
        floor = 0
        if skew is not None and not self._soft:
            floor = 0 if len(slots) < self._min_nodes or not slots else min(c for c, _, _ in slots)
        nweight = math.log(len(slots) + 2)
        best = None
        best_key: tuple[float, int] = (0.0, 0)
        for k, (count, room, zone) in enumerate(slots):
            if room <= 0 or (allowed_zone is not None and not allowed_zone[zone]):
                continue
            if skew is not None and not self._soft and count + 1 - floor > skew:
                continue
            score = 0.0
            if self._zsoft:
                score += zpods[zone] * zweight
            if self._soft:
                score += count * nweight
            key = (score, count if skew is not None else 0)
            if best is None or key < best_key:
                best, best_key = k, key
        return best

    def _new_nodes_for(self, pods: int, slots: list[list[int]]) -> tuple[list[int], int]:
        """The zones of the new, empty nodes ``pods`` more pods need under the spreads, beyond ``slots`` (one
        ``[pods on it, free pod slots, zone]`` per node counted; changed in place), as cluster-autoscaler's
        simulation of the scheduler would find: a new node goes to the zone with the fewest of the pods
        (under ``pods.zone_spread``) or the fewest nodes; and how many pods no node could take (every zone
        down, or the spreads allow none even on a new node)."""
        new: list[int] = []
        for placed in range(pods):
            k = self._pick(slots)
            if k is None:
                zone = self._balanced_zone(new, self._zone_pods(slots) if self._zskew is not None else None)
                if zone is None:
                    return new, pods - placed
                slots.append([0, self.pods_per_node, zone])
                k = len(slots) - 1
                if self._pick(slots) != k:  # the spreads allow no pod even on a new node
                    slots.pop()
                    return new, pods - placed
                new.append(zone)
            slots[k][0] += 1
            slots[k][1] -= 1
        return new, 0

    def _slots(self) -> list[list[int]]:
        """``[pods, free pod slots, zone]`` of each counted node and each node being provisioned in a zone up."""
        return [self._slot(n) for n in self._up if n.schedulable or (
            n.ready_s is None and n.zone not in self.zones_down)]

    def _slot(self, n: Node) -> list[int]:
        """``[pods on n, free pod slots on n, its zone]``, for ``_new_nodes_for``."""
        pg = self.pod_gpus
        return [n.used // pg, (n.gpus - n.used) // pg, n.zone]

    @staticmethod
    def pod_event(node: Node | None, now: float) -> None:
        """A pod was placed on ``node``, or began terminating there, at ``now`` (Karpenter's lastPodEventTime)."""
        if node is not None:
            node.pod_event_s = now

    def release(self, node: Node | None, now: float) -> None:
        """A pod on ``node`` gave its GPUs back at ``now``; a drained node goes with its last pod."""
        if node is not None:
            node.used -= self.pod_gpus
            if (node.cordoned or node.remove_when_empty) and node.used == 0 and node.removed_s is None:
                self.remove(node, now)

    def provision_for(self, waiting: int, now: float) -> None:
        """Provision nodes for ``waiting`` pods beyond what nodes being provisioned will hold (none while
        cluster-autoscaler halts on too many NotReady nodes: ``NodeLifecycle.unhealthy``)."""
        if not self.limited or waiting <= 0 or self._autoscaler_halted:
            return
        if self._spreading:  # where the skews let them go, on the nodes there and those coming
            zones: list[int | None] = list(self._new_nodes_for(waiting, self._slots())[0])
        else:
            coming = self.pods_per_node * sum(1 for n in self._up if n.ready_s is None
                                              and n.zone not in self.zones_down)
            zones = [None] * math.ceil(max(waiting - coming, 0) / self.pods_per_node)
        for zone in zones:
            if self.launch(now, zone) is None:
                return
            self.last_add_s = now

    def launch(self, now: float, zone: int | None) -> Node | None:
        """Ask the cloud for a node in ``zone`` (``None``: balanced) at ``now``: ready ``node_provision_s`` later,
        or, in a GPU stockout, never created and known as failed later (``_creation_failed``). ``None`` when a
        whole node more would pass ``max_gpus`` or no zone can take it."""
        node = self._add(now, ready=False, zone=zone)
        if node is None:
            return None
        if self._stocked_out(node.zone, now):  # the cloud cannot create it: the failure comes back later
            assert self._spec is not None
            node.unfulfilled = True
            Timeout(self.sim.env, self._spec.stockout_known_s, node).callbacks.append(self._creation_failed)
        else:
            Timeout(self.sim.env, self.provision_s, node).callbacks.append(self._node_ready)
        return node

    def nodes_needed(self, pods: int, nodes: list[Node]) -> list[int] | None:
        """The zones of the new nodes ``pods`` pods need beyond the free GPUs of ``nodes`` (under the spreads when
        there are any; a new node goes where cluster-autoscaler's would), or ``None`` when they cannot all be
        placed: the spreads allow none, no zone can take a node, or the nodes would pass ``max_gpus``."""
        if self._spreading:
            new, unplaced = self._new_nodes_for(pods, [self._slot(m) for m in nodes if m.schedulable])
            if unplaced:
                return None
        else:
            new = []
            for _ in range(math.ceil(max(pods - sum(m.free // self.pod_gpus for m in nodes), 0) / self.pods_per_node)):
                zone = self._balanced_zone(new)
                if zone is None:
                    return None
                new.append(zone)
        if sum(n.gpus for n in self._up) + len(new) * self.node_gpus > self.max_gpus:
            return None
        return new

    def _stocked_out(self, zone: int, now: float) -> bool:
        """Whether the cloud has no GPU node to give in ``zone`` at ``now`` (``faults.gpu_stockouts``)."""
        return any(a <= now < b and (z is None or z == zone) for a, b, z in self._stockouts)

    def _creation_failed(self, ev: Timeout) -> None:
        """cluster-autoscaler learns that a node it asked for was not created (the cloud's out-of-capacity
        error, or ``max_node_provision_s`` without one): the request is dropped, its zone's node group backed
        off (``NodeGroupBackoff``), and at its next loop (``scan_interval_s`` on) the pods still pending go
        where another group can take them, or wait for the backoff's end."""
        node = cast(Node, ev.value)
        if node.removed_s is not None:
            return  # its zone went dark meanwhile, which removed it
        assert self._spec is not None and self.backoff is not None
        now = self.sim.env.now
        self.remove(node, now)
        self.failed_scale_ups += 1
        until = self.backoff.backoff(node.zone, now)
        how = ("the cloud reported it out of capacity" if self._spec.stockout_reported
               else "timed out (max_node_provision_s)")
        if self.lifecycle is not None:
            self.lifecycle.log.append((now, "scale_up_failed", node.zone,
                                       f"node {node.id}: {how}; node group backed off until {until:g} s"))
        # cluster-autoscaler's loops run every scan_interval_s (from 0 here): at the next one another zone's group
        # takes the pods, if one may scale, and at the first one the backoff allows this group is asked again
        scan = self._spec.scan_interval_s
        next_loop = math.floor(now / scan + 1) * scan
        self._at_loop(next_loop)
        self._at_loop(max(math.ceil(until / scan) * scan, next_loop))

    def _at_loop(self, t: float) -> None:
        """Ask for nodes for the pods still pending at cluster-autoscaler's loop at ``t`` (one wake-up per loop)."""
        if t not in self._loops:
            self._loops.add(t)
            Timeout(self.sim.env, t - self.sim.env.now, t).callbacks.append(self._loop)

    def _loop(self, ev: Timeout) -> None:
        self._loops.discard(cast(float, ev.value))
        self._on_node_ready(self.sim.env.now)

    def _node_ready(self, ev: Timeout) -> None:
        node = cast(Node, ev.value)
        if node.removed_s is not None:
            return  # lost with its zone while it booted
        now = self.sim.env.now
        node.ready_s = now
        self.sim.faults.node_ready(node)
        if self.lifecycle is not None:
            self.lifecycle.nodes_changed(node, now)
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
        """One scan: mark unneeded nodes, and remove those unneeded long enough (see the module doc). While
        cluster-autoscaler halts on too many NotReady nodes it removes none and forgets which were unneeded."""
        spec = self._spec
        assert spec is not None
        if self._autoscaler_halted:
            for n in self._up:
                n.unneeded_since = None
            return
        live = [n for n in self._up if n.ready_s is not None and not n.cordoned
                and n.failed_s is None]  # a failed node goes by its own timer (fail)
        # the candidates under the threshold, those unneeded at the last scan first (the previous-candidates
        # sorting processor), so a budget or the room a node takes does not reset a running timer
        # (a node found unremovable within --unremovable-node-recheck-timeout is no candidate: the eligibility
        # checker's RecentlyUnremovable)
        under = [n for n in live if n.used / n.gpus < spec.scale_down_utilization_threshold
                 and now >= n.unremovable_until]
        removable = self._removable(sorted(under, key=lambda n: n.unneeded_since is None))
        recheck = now + spec.unremovable_node_recheck_timeout_s
        for n in under:
            if n not in removable:  # the simulation's unremovable: AddTimeout(now + the recheck timeout)
                n.unremovable_until = recheck
        for n in live:  # unneeded: under the threshold and removable (the planner's categorizeNodes)
            if n in removable:
                if n.unneeded_since is None:
                    n.unneeded_since = now
            else:
                n.unneeded_since = None
        # in cooldown (static_autoscaler.go isScaleDownInCooldown): the unneeded times above still run
        if (now - self.last_add_s < spec.scale_down_delay_after_add_s
                or now - self.last_delete_s < spec.scale_down_delay_after_delete_s):
            return
        due = [n for n in live if n.unneeded_since is not None
               and now - n.unneeded_since >= spec.scale_down_unneeded_time_s]
        if spec.min_nodes_per_zone:  # no node group below its minimum size
            size = self._nodes_per_zone()
            keep = []
            for n in due:
                if size[n.zone] > spec.min_nodes_per_zone:
                    size[n.zone] -= 1
                    keep.append(n)
            due = keep
        # at most --max-scale-down-parallelism deletions at once, a drain in progress among them (budgets.go
        # CropNodes: the empty nodes first, within what the deletions in progress leave)
        draining = sum(1 for n in self._up if n.cordoned)
        room = spec.max_scale_down_parallelism - draining
        for n in due:
            if n.used == 0 and room > 0:
                self.remove(n, now)
                self.last_delete_s = now
                room -= 1
        # a node with pods: only if they fit on the nodes that stay, one drain at a time (--max-drain-parallelism 1)
        if draining or room <= 0:
            return
        for n in due:
            if n.used == 0:
                continue
            pods = n.used // self.pod_gpus
            stay = [m for m in self._up if m is not n and not (m in due and m.used == 0)]
            if self.fit_on(pods, stay) and self.may_evict(pods):
                n.cordoned = True
                self._evict(n, now)
                self.last_delete_s = now
                return

    def _removable(self, candidates: list[Node]) -> set[Node]:
        """The ``candidates`` (nodes under the utilization threshold) that cluster-autoscaler's removal
        simulation finds removable, in order, as the planner's ``categorizeNodes`` does: a node is, when
        empty, or when its pods fit on the nodes not already found removable (under the spreads) and the
        PodDisruptionBudget has a disruption left after the pods of the nodes found before it
        (``RemainingPdbTracker.CanRemovePods``; the drain itself still waits until the budget covers all of
        the node's pods). The others are unremovable (``NoPlaceToMovePods``, ``NotEnoughPdb``) and their
        unneeded time does not run: a lone node's starts when its last pod leaves."""
        found: set[Node] = set()
        evicting = 0
        for n in candidates:
            if n.used == 0:
                found.add(n)
                continue
            pods = n.used // self.pod_gpus
            others = [m for m in self._up if m is not n and m not in found]
            if self.fit_on(pods, others) and self.may_evict(evicting + 1):  # a disruption left (CanRemovePods)
                found.add(n)
                evicting += pods  # RemovePods: what the next candidates have left
        return found

    def fit_on(self, pods: int, nodes: list[Node]) -> bool:
        """Whether ``pods`` pods fit on ``nodes`` (their free GPUs, under the spreads when there are any)."""
        if self._spreading:
            new, unplaced = self._new_nodes_for(pods, [self._slot(m) for m in nodes if m.schedulable])
            return not new and not unplaced
        return sum(m.free // self.pod_gpus for m in nodes) >= pods

    # ---- a node that dies ---------------------------------------------------------------------------
    def fail(self, node: Node, now: float) -> None:
        """``node`` dies at ``now``: it takes no pod from now on; with scale-down enabled cluster-autoscaler
        removes it (and its billing ends) ``scale_down_unready_time_s`` later, or when its last pod goes if
        some are still there then (never evicted: their GPU requests keep it over the utilization threshold);
        without, or under Karpenter, it stays, billed, unless ``node_auto_repair_s`` deletes it. Until it goes it
        counts toward ``max_gpus``, as the node group's size does."""
        spec = self._spec
        assert spec is not None
        node.failed_s = now
        node.failures += 1
        if spec.scale_down_enabled and spec.karpenter is None:
            ev = Timeout(self.sim.env, spec.scale_down_unready_time_s, (node, now))
            ev.callbacks.append(self._unready_gone)

    def _unready_gone(self, ev: Timeout) -> None:
        node, failed_s = cast(tuple[Node, float], ev.value)
        if node.removed_s is None and node.failed_s == failed_s:  # not back meanwhile
            if self._autoscaler_halted:  # asked again an unready time on
                spec = self._spec
                assert spec is not None
                wait = max(spec.scale_down_unready_time_s, spec.scan_interval_s)  # a scan at the soonest
                Timeout(self.sim.env, wait, ev.value).callbacks.append(self._unready_gone)
                return
            if node.used:
                node.remove_when_empty = True
                return
            self.remove(node, self.sim.env.now)
            self._on_node_ready(self.sim.env.now)  # max_gpus has room again: waiting pods may get a node

    @property
    def _autoscaler_halted(self) -> bool:
        """cluster-autoscaler halts on too many NotReady nodes (``NodeLifecycle.unhealthy``); Karpenter does not."""
        return self.karpenter is None and self.lifecycle is not None and self.lifecycle.autoscaler_halted

    def resume(self, now: float) -> None:
        """Pods waiting for a node may get one now: cluster-autoscaler works again, or nodes went (room in
        max_gpus)."""
        self._on_node_ready(now)

    def repaired(self, node: Node, now: float) -> None:
        """The cloud's node auto-repair deleted the failed ``node`` (its pods are gone): it is no longer billed
        and leaves room in ``max_gpus`` for a new one."""
        if node.removed_s is None:
            self.remove(node, now)
            if self.lifecycle is not None:
                self.lifecycle.log.append((now, "auto_repair", node.zone, f"node {node.id}"))
            self._on_node_ready(now)

    def zone_failed(self, zone: int, now: float, duration_s: float | None) -> None:
        """``zone`` is dark from ``now`` (for ``duration_s``, or for good): no node is added there, and the
        nodes booting there are lost (removed now: the cloud reports the instances failed, and
        cluster-autoscaler provisions elsewhere for their pods). Its ready nodes are failed by the caller."""
        back = math.inf if duration_s is None else now + duration_s
        if back > self.zones_down.get(zone, -math.inf):
            self.zones_down[zone] = back
            if duration_s is not None:
                Timeout(self.sim.env, duration_s, (zone, back)).callbacks.append(self._zone_back)
            assert self._spec is not None
            grace = self._spec.node_monitor_grace_s  # the zone's other nodes go silent too
            Timeout(self.sim.env, grace, (zone, back)).callbacks.append(self._zone_not_ready)
        booting = [n for n in self._up if n.zone == zone and n.ready_s is None]
        for n in booting:
            self.remove(n, now)
        if booting:
            self._on_node_ready(now)  # their pods wait for nodes elsewhere

    def _zone_back(self, ev: Timeout) -> None:
        zone, back = cast(tuple[int, float], ev.value)
        if self.zones_down.get(zone) == back:  # not failed again for longer meanwhile
            del self.zones_down[zone]
            if self.lifecycle is not None:
                self.lifecycle.zone_back(zone, self.sim.env.now)
            self._on_node_ready(self.sim.env.now)  # nodes may be added there again

    def _zone_not_ready(self, ev: Timeout) -> None:
        zone, back = cast(tuple[int, float], ev.value)
        if self.zones_down.get(zone) == back and self.lifecycle is not None:  # still dark
            self.lifecycle.zone_dark(zone, self.sim.env.now)

    def healed(self, node: Node) -> None:
        """A failed node is reachable again (a partition healed): schedulable, and it may fail again."""
        node.failed_s = None
        node.remove_when_empty = False
        self.sim.faults.node_ready(node)

    def spot_nodes(self) -> list[Node]:
        """Spot nodes an unnamed interruption may pick: ready, not cordoned, removed or failed, holding pods."""
        return [n for n in self.failable() if n.spot and not n.cordoned]

    def failable(self) -> list[Node]:
        """Nodes a node failure may pick: ready, not removed or failed, holding pods."""
        return [n for n in self._up if n.ready_s is not None and n.failed_s is None
                and n.used > 0]

    def remove(self, node: Node, now: float) -> None:
        """Delete ``node`` now (no pod holds its GPUs): no longer billed, and off the nodes up."""
        node.removed_s = now
        node.cordoned = True
        self._up.remove(node)
        self.removals.append((now, node.id))
        if self.lifecycle is not None:
            self.lifecycle.nodes_changed(node, now)

    # ---- the image -------------------------------------------------------------------------------
    def image_wait_s(self, node: Node | None, now: float, pull_s: Callable[[], float], image: int = 0) -> float:
        """How long a pod placed on ``node`` at ``now`` waits for ``image`` (pulls it if nobody has)."""
        if node is None:
            return pull_s()
        at = node.images.get(image)
        if at is None:
            at = node.images[image] = now + pull_s()
        return max(at - now, 0.0)

    # ---- the model's files (pods.node_model_cache) -----------------------------------------------------
    @staticmethod
    def model_loaded(node: Node | None, image: int) -> None:
        """A container of ``image`` has loaded its model on ``node``: the files stay on the node's volume."""
        if node is not None:
            node.models.add(image)

    @staticmethod
    def holds_model(node: Node | None, image: int) -> bool:
        """Whether a container of ``image`` has loaded its model on ``node`` before (never without a node)."""
        return node is not None and image in node.models

    # ---- accounting ------------------------------------------------------------------------------
    def frame(self, horizon_s: float) -> Any:
        """The nodes of the run, one row each (``SimResult.nodes``): when each was created, ready and removed
        (NaN: not in the run), its zone, whether it is spot, its GPUs, failures, interruption notice (spot), when
        the node lifecycle controller last tainted it unreachable (NaN: never; its pods are evicted a toleration
        later unless it is back first), GPU-hours to ``horizon_s`` and whether the cloud never created it (asked
        for in a GPU stockout: removed when cluster-autoscaler learned it, never billed)."""
        import pandas as pd

        nan = math.nan
        rows = [(n.id, n.zone, n.spot, n.gpus, n.created_s, nan if n.ready_s is None else n.ready_s,
                 nan if n.removed_s is None else n.removed_s, n.failures, n.failed_s is not None,
                 nan if n.interrupted_s is None else n.interrupted_s, nan if n.tainted_s is None else n.tainted_s,
                 n.gpu_seconds(horizon_s) / 3600.0, n.unfulfilled)
                for n in self.nodes]
        return pd.DataFrame(rows, columns=NODE_COLUMNS)

    def gpus_now(self) -> float:
        """GPUs of the nodes that exist now, booting included (billed); NaN without a cluster section."""
        return float(sum(n.gpus for n in self.up if not n.unfulfilled)) if self.limited else math.nan

    def node_gpu_seconds(self, now: float, priced: bool = False) -> float:
        """GPU-seconds of the nodes from their creation to their removal (or ``now``); ``priced``: a spot
        node's at ``cluster.spot.price_ratio`` (on-demand GPU-seconds the bill is worth)."""
        ratio = self._spec.spot.price_ratio if priced and self._spec is not None and self._spec.spot else 1.0
        return sum(n.gpu_seconds(now) * (ratio if n.spot else 1.0) for n in self.nodes if n.created_s < now)

    def reclaim(self, node: Node, now: float) -> None:
        """A spot node's interruption notice: cordoned (no pod placed on it again); it goes when its last pod
        has left or at the notice's end (``_reclaimed``), whichever comes first."""
        assert self._spec is not None and self._spec.spot is not None
        node.cordoned = True
        node.unneeded_since = None
        if node.used == 0:
            self.remove(node, now)
        else:
            Timeout(self.sim.env, self._spec.spot.notice_s, node).callbacks.append(self._reclaimed)

    def _reclaimed(self, ev: Timeout) -> None:
        node = cast(Node, ev.value)
        if node.removed_s is None:
            now = self.sim.env.now
            self.sim.cluster.node_gone(node, now)  # what still runs there dies with it
            if node.removed_s is None:
                self.remove(node, now)
            self._on_node_ready(now)  # max_gpus has room again

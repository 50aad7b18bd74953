"""Faults injected into a run: random pod crashes (MTBF), scheduled crashes, node and zone failures, spot
nodes reclaimed, slow pods, Redis outages, Prometheus outages (what they do to the autoscalers:
``capsim.sim.hpa``).

A random crash is drawn per run of a container: when a pod's container starts (a first start or a
kubelet restart) it draws its time to failure from an exponential of mean ``pod_mtbf_s`` (the
``crashes`` stream); if the container still runs then (starting, ready or draining), it crashes. A
container can so crash before it is ready, and a flaky pod crash-loops. A scheduled crash picks its
victims among the ready pods with the same stream (or takes the pod id given). What a crash does to
requests and sessions is the client's business (``client.py``); what it does to the pod (the kubelet's
restart) the cluster's.

A slow pod (``faults.slow_pods``, a gray failure) stays ready and passes its probes; its batches or steps
take ``factor`` times as long from the entry's ``at_s`` (those already on the model keep their end; a
continuous pod's run of decode steps is cut at the step in progress), until ``duration_s`` after. The factor
belongs to the pod, as its GPU does: a container restart keeps it, a replacement pod (a new id) runs at
full speed. ``pods: all`` slows the whole fleet, pods started during the spell too. Entries that overlap on a
pod multiply. ``faults.random_slowdowns`` draws such spells for every pod, one after the other from its creation:
an exponential time of mean ``mtbf_s``, then ``duration_s`` at ``factor`` (the ``slow_spells`` stream).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
from simpy.events import Timeout

from capsim.model.scenario import Crash, NodeFailure, SlowPod, SpotInterruption, ZoneFailure
from capsim.sim.cluster import draw_duration
from capsim.sim.nodes import Node
from capsim.sim.pod import Pod, PodState

if TYPE_CHECKING:
    from capsim.sim.simulate import Simulation


def merged_spans(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """(start, end) spans in time order, overlapping ones joined (so a bisect on the starts finds the one)."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _within(starts: list[float], ends: list[float], t: float) -> bool:
    """Whether ``t`` falls in one of the merged spans ``[starts[k], ends[k])``."""
    k = bisect.bisect_right(starts, t) - 1
    return k >= 0 and t < ends[k]


class Faults:
    """Schedules the crashes of a scenario and answers whether Redis and Prometheus are up."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        spec = sim.scenario.faults
        self._mtbf = spec.pod_mtbf_s if spec else None
        self._gen = sim.streams["crashes"]
        self._node_mtbf = spec.node_mtbf_s if spec else None
        self._node_gen = sim.streams["node_failures"]
        spot = self._spot = sim.scenario.cluster.spot if sim.scenario.cluster is not None else None
        self._spot_mtbf = spot.mtbf_s if spot is not None else None
        self._spot_gen = sim.streams["spot"]
        self._spot_drawn: set[int] = set()  # nodes whose random interruption is drawn
        outages = merged_spans((o.at_s, o.at_s + o.duration_s) for o in spec.redis_outages) if spec else []
        self._out_start = [a for a, _ in outages]
        self._out_end = [b for _, b in outages]
        self.has_redis_outages = bool(outages) and sim.scenario.state.store == "redis"
        down = merged_spans((o.at_s, o.at_s + o.duration_s) for o in spec.metrics_outages) if spec else []
        self._m_start = [a for a, _ in down]
        self._m_end = [b for _, b in down]
        self.has_metrics_outages = bool(down)
        # faults.trigger_outages: metric name -> its query's outages, merged, as (starts, ends) for _within
        spans: dict[str, list[tuple[float, float]]] = {}
        for o in spec.trigger_outages if spec else ():
            for name in o.metrics:
                spans.setdefault(name, []).append((o.at_s, o.at_s + o.duration_s))
        self._trigger_down = {name: ([a for a, _ in m], [b for _, b in m])
                              for name, m in ((n, merged_spans(v)) for n, v in spans.items())}
        #: the metrics whose own source can fail (faults.trigger_outages)
        self.trigger_outage_metrics = frozenset(self._trigger_down)
        self.crash_log: list[tuple[float, int, str]] = []  # (time, pod, kind: random, scheduled, node, spot, rollout)
        # scheduled crashes that found no pod to crash: (time, pod or -1, why); reported, never dropped
        self.skipped: list[tuple[float, int, str]] = []
        # faults.slow_pods: (start, end (inf: to the end of the run), pod (-1: all), factor), one row per pod
        # slowed; the slowdowns that found no pod, as ``skipped`` (time, pod or -1, why)
        self.slow_log: list[tuple[float, float, int, float]] = []
        self.slow_skipped: list[tuple[float, int, str]] = []
        self._slow_gen = sim.streams["slow_pods"]
        self._pod_slow: dict[int, list[float]] = {}  # pod id -> the factors in force on it
        self._fleet_slow: list[float] = []  # the factors of the fleet-wide spells in force
        self._spells = spec.random_slowdowns if spec else None  # faults.random_slowdowns: each pod's spells
        self._spell_gen = sim.streams["slow_spells"]
        if spec:  # each scheduled fault, in this order when two come at the same time
            scheduled: tuple[tuple[Sequence[Crash | NodeFailure | SpotInterruption | ZoneFailure | SlowPod],
                                   Callable[[Timeout], None]], ...] = (
                (spec.crashes, self._scheduled), (spec.node_failures, self._node_failure),
                (spec.spot_interruptions, self._spot_interruption), (spec.zone_failures, self._zone_failure),
                (spec.slow_pods, self._slow_begins))
            for events, handler in scheduled:
                for event in events:
                    Timeout(sim.env, event.at_s, event).callbacks.append(handler)

    def container_started(self, pod: Pod, now: float) -> None:
        """Draw the random crash of this container run, if crashes are random."""
        if self._mtbf is None:
            return
        delay = float(self._gen.exponential(self._mtbf))
        ev = Timeout(self.sim.env, delay, (pod, pod.incarnation))
        ev.callbacks.append(self._random)

    def _random(self, ev: Timeout) -> None:
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.incarnation == incarnation and pod.state in (PodState.STARTING, PodState.READY,
                                                            PodState.TERMINATING):
            self.crash_pod(pod, "random")

    def _scheduled(self, ev: Timeout) -> None:
        crash = cast(Crash, ev.value)
        cluster = self.sim.cluster
        if crash.pod is not None:
            if crash.pod < len(cluster.pods):
                self.crash_pod(cluster.pods[crash.pod], "scheduled")
            else:
                self.skipped.append((self.sim.env.now, crash.pod, f"pod {crash.pod} not created (yet)"))
            return
        ready = [p for p in cluster.endpoints if p.state == PodState.READY]  # not one on its way out
        k = min(crash.pods, len(ready))
        if k:
            picks = self._gen.choice(len(ready), size=k, replace=False)
            for j in sorted(int(x) for x in picks):
                self.crash_pod(ready[j], "scheduled")
        if k < crash.pods:
            self.skipped.append((self.sim.env.now, -1, f"{crash.pods} pods asked, {k} ready"))

    def node_ready(self, node: Node) -> None:
        """A GPU node is ready: draw when it fails, if nodes fail at random (``faults.node_mtbf_s``), and when
        the cloud reclaims it, if it is a spot node interrupted at random (``cluster.spot.mtbf_s``)."""
        if self._spot_mtbf is not None and node.spot and node.id not in self._spot_drawn:
            self._spot_drawn.add(node.id)  # once: a partition that heals does not draw it again
            delay = float(self._spot_gen.exponential(self._spot_mtbf))
            Timeout(self.sim.env, delay, node).callbacks.append(self._spot_random)
        if self._node_mtbf is None:
            return
        delay = float(self._node_gen.exponential(self._node_mtbf))
        Timeout(self.sim.env, delay, node).callbacks.append(self._node_random)

    def _spot_random(self, ev: Timeout) -> None:
        node = cast(Node, ev.value)
        if node.removed_s is None and node.interrupted_s is None:
            self.sim.cluster.spot_interrupted(node, self.sim.env.now)

    def _spot_interruption(self, ev: Timeout) -> None:
        """The cloud reclaims a spot node (``faults.spot_interruptions``): the one named, or a spot node holding
        pods drawn from the ``spot`` stream; one that is not there (or not spot) is reported, not dropped."""
        interruption = cast(SpotInterruption, ev.value)
        now = self.sim.env.now
        nodes = self.sim.cluster.nodes
        if self._spot is None:  # allowed, so that a study's stress can apply to on-demand candidates too
            self.skipped.append((now, -1, "cluster.spot is not set: no spot node to reclaim"))
            return
        node = self._target(interruption.node, "spot node", nodes.spot_nodes, self._spot_gen,
                            lambda n: ("not spot" if not n.spot else "interrupted already"
                                       if n.interrupted_s is not None else None))
        if node is not None:
            self.sim.cluster.spot_interrupted(node, now)

    def _target(self, named: int | None, what: str, candidates: Callable[[], list[Node]], gen: np.random.Generator,
                unfit: Callable[[Node], str | None]) -> Node | None:
        """The node a scheduled fault takes: node ``named``, or one of ``candidates()`` drawn from ``gen``;
        ``None`` (and a row of ``skipped`` saying why) when the named one is not there or ``unfit`` says why
        not, or there is no candidate."""
        now = self.sim.env.now
        nodes = self.sim.cluster.nodes.nodes
        if named is None:
            pool = candidates()
            if not pool:
                self.skipped.append((now, -1, f"no ready {what} holds a pod"))
                return None
            return pool[int(gen.integers(len(pool)))]
        node = nodes[named] if named < len(nodes) else None
        state = ("not created (yet)" if node is None else "still provisioning" if node.ready_s is None
                 else "removed" if node.removed_s is not None else unfit(node))
        if state is not None:
            self.skipped.append((now, -1, f"{what} {named} {state}"))
            return None
        return node

    def _node_random(self, ev: Timeout) -> None:
        node = cast(Node, ev.value)
        if node.removed_s is None and node.failed_s is None:
            self._fail_node(node)

    def _fail_node(self, node: Node, duration_s: float | None = None) -> None:
        """``node`` fails now (back ``duration_s`` later, if given); each pod it held is logged as a crash of
        kind ``node``."""
        now = self.sim.env.now
        for pod in self.sim.cluster.node_failed(node, now, duration_s):
            self.crash_log.append((now, pod.id, "node"))

    def _node_failure(self, ev: Timeout) -> None:
        """A node dies (``faults.node_failures``): the one named, or a ready node holding pods drawn from the
        ``node_failures`` stream; each pod it held is logged as a crash of kind ``node``."""
        failure = cast(NodeFailure, ev.value)
        node = self._target(failure.node, "node", self.sim.cluster.nodes.failable, self._node_gen,
                            lambda n: "failed already" if n.failed_s is not None else None)
        if node is not None:
            self._fail_node(node, failure.duration_s)

    def _zone_failure(self, ev: Timeout) -> None:
        """A zone goes dark (``faults.zone_failures``): every ready node in it fails, back with the zone; nodes
        booting there are lost and no node is added there meanwhile (``NodePool.zone_failed``); the pods
        waiting for the lost nodes get nodes in the other zones."""
        failure = cast(ZoneFailure, ev.value)
        now = self.sim.env.now
        nodes = self.sim.cluster.nodes
        nodes.zone_failed(failure.zone, now, failure.duration_s)
        hit = [n for n in nodes.nodes if n.zone == failure.zone and n.ready_s is not None
               and n.removed_s is None and n.failed_s is None]
        if not hit:
            self.skipped.append((now, -1, f"zone {failure.zone} has no ready node"))
        for node in hit:
            self._fail_node(node, failure.duration_s)

    def crash_pod(self, pod: Pod, why: str) -> None:
        """Crash ``pod``'s container now, logged with ``why`` (``random``, ``scheduled``; the cluster's ``rollout``,
        a bad template's exit)."""
        now = self.sim.env.now
        self.crash_log.append((now, pod.id, why))
        self.sim.cluster.crash(pod, now)

    # ---- slow pods ---------------------------------------------------------------------------------------
    def _slow_begins(self, ev: Timeout) -> None:
        """A ``faults.slow_pods`` entry begins: slow the pod named, ``pods`` ready pods drawn from the
        ``slow_pods`` stream, or the fleet; its end is scheduled when it has a ``duration_s``."""
        slow = cast(SlowPod, ev.value)
        now = self.sim.env.now
        end = now + slow.duration_s if slow.duration_s is not None else math.inf
        if slow.pods == "all":
            self._fleet_slow.append(slow.factor)
            self.slow_log.append((now, end, -1, slow.factor))
            hit = self._live_pods()
            for pod in hit:
                self._refresh(pod, now)
        else:
            hit = self._slow_targets(slow, now)
            for pod in hit:
                self._slow(pod, slow.factor, now, end)
        if slow.duration_s is not None and (hit or slow.pods == "all"):  # a fleet's spell ends, pods or none
            Timeout(self.sim.env, slow.duration_s, (slow, hit)).callbacks.append(self._slow_ends)

    def _slow_targets(self, slow: SlowPod, now: float) -> list[Pod]:
        """The pods a ``faults.slow_pods`` entry that is not the fleet's slows: the one named, or ``pods`` ready
        ones drawn from the ``slow_pods`` stream; what it could not slow goes to ``slow_skipped``."""
        pods = self.sim.cluster.pods
        if slow.pod is not None:
            pod = pods[slow.pod] if slow.pod < len(pods) else None
            if pod is not None and pod.state != PodState.GONE:
                return [pod]
            self.slow_skipped.append(
                (now, slow.pod, f"pod {slow.pod} {'gone' if pod is not None else 'not created (yet)'}: nothing slowed"))
            return []
        ready = [p for p in self.sim.cluster.endpoints if p.state == PodState.READY]
        want = cast(int, slow.pods)
        k = min(want, len(ready))
        if k < want:
            self.slow_skipped.append((now, -1, f"{want} pods asked, {k} ready: those slowed"))
        if not k:
            return []
        return [ready[j] for j in sorted(int(x) for x in self._slow_gen.choice(len(ready), size=k, replace=False))]

    def _slow_ends(self, ev: Timeout) -> None:
        slow, hit = cast(tuple[SlowPod, list[Pod]], ev.value)
        now = self.sim.env.now
        if slow.pods == "all":
            self._fleet_slow.remove(slow.factor)
            for pod in self._live_pods():
                self._refresh(pod, now)
        else:
            for pod in hit:
                self._unslow(pod, slow.factor, now)

    def _live_pods(self) -> list[Pod]:
        return [p for p in self.sim.cluster.pods if p.state != PodState.GONE]

    def _slow(self, pod: Pod, factor: float, now: float, end: float) -> None:
        """``pod`` runs ``factor`` times slower from ``now`` to ``end`` (a scheduled entry's, or a random spell)."""
        self._pod_slow.setdefault(pod.id, []).append(factor)
        self.slow_log.append((now, end, pod.id, factor))
        self._refresh(pod, now)

    def _unslow(self, pod: Pod, factor: float, now: float) -> None:
        """The slowdown ``factor`` on ``pod`` ends at ``now`` (others in force stay)."""
        self._pod_slow[pod.id].remove(factor)
        self._refresh(pod, now)

    def _refresh(self, pod: Pod, now: float) -> None:
        """Give ``pod`` the product of the slowdowns in force on it, if that changed."""
        factor = (math.prod(self._pod_slow.get(pod.id, ())) * math.prod(self._fleet_slow)
                  * self.sim.cluster.template_slowdown(pod))
        if factor != pod.slow:
            pod.set_slow(factor, now)

    def pod_created(self, pod: Pod) -> None:
        """A new pod: slowed at once if a fleet-wide spell is in force or its template is slower
        (``pods.rollouts[].slowdown``); its first random spell drawn (``faults.random_slowdowns``)."""
        if self._fleet_slow or self.sim.cluster.template_slowdown(pod) != 1.0:  # a spell, or its template's speed
            self._refresh(pod, self.sim.env.now)
        if self._spells is not None:
            self._next_spell(pod)

    def _next_spell(self, pod: Pod) -> None:
        assert self._spells is not None
        Timeout(self.sim.env, float(self._spell_gen.exponential(self._spells.mtbf_s)), pod).callbacks.append(
            self._spell_begins)

    def _spell_begins(self, ev: Timeout) -> None:
        """A pod's random slow spell begins (``faults.random_slowdowns``): as a ``slow_pods`` entry on it alone."""
        pod = cast(Pod, ev.value)
        if pod.state == PodState.GONE:
            return
        spells = self._spells
        assert spells is not None
        now = self.sim.env.now
        duration = draw_duration(spells.duration_s, self._spell_gen)
        self._slow(pod, spells.factor, now, now + duration)
        Timeout(self.sim.env, duration, pod).callbacks.append(self._spell_ends)

    def _spell_ends(self, ev: Timeout) -> None:
        pod = cast(Pod, ev.value)
        assert self._spells is not None
        self._unslow(pod, self._spells.factor, self.sim.env.now)
        if pod.state != PodState.GONE:
            self._next_spell(pod)

    def redis_down(self, t: float) -> bool:
        """Whether Redis is unreachable at time ``t`` (s)."""
        return _within(self._out_start, self._out_end, t)

    def metrics_down(self, t: float) -> bool:
        """Whether Prometheus is down at time ``t`` (s): no scrape, no query answered."""
        return _within(self._m_start, self._m_end, t)

    def trigger_down(self, name: str, t: float) -> bool:
        """Whether metric ``name``'s query fails at ``t`` (``faults.trigger_outages``), Prometheus up or not."""
        spans = self._trigger_down.get(name)
        return spans is not None and _within(*spans, t)

    def outages(self) -> list[tuple[float, float]]:
        """The Redis outages that pods see, as (start, end) (s), in time order (none without a Redis store)."""
        return list(zip(self._out_start, self._out_end, strict=True)) if self.has_redis_outages else []

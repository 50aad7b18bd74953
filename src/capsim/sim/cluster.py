"""The Deployment and the GPU nodes under it: creates and deletes pods and moves them through their lives.

``scale_to(n)`` is what the HPA (or the initial spec) asks; the cluster adds pods (Pending until a GPU is
free, then a cold start) or removes them (the least useful first: pending, then starting, then the
newest ready ones, as a ReplicaSet does). With a ``cluster`` section the GPUs are finite: missing nodes
are provisioned, ``node_provision_s`` later, up to ``max_gpus``; without one a GPU is always free.
Nodes are never removed within a run. A pod holds its GPU from its cold start until it is gone.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

from simpy.events import Timeout

from capsim.model.scenario import ConstantDuration, LognormalDuration, UniformDuration
from capsim.sim.continuous import ContinuousPod
from capsim.sim.pod import Pod, PodState

if TYPE_CHECKING:
    from capsim.sim.simulate import Simulation

_LIVE = (PodState.PENDING, PodState.STARTING, PodState.READY, PodState.CRASHED)


class Cluster:
    """All pods ever created (``pods[id]``), the ready endpoints, and the GPU supply."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.pods: list[Pod] = []
        self.endpoints: list[Pod] = []  # ready, receiving traffic, sorted by id
        self.desired = 0
        spec = sim.scenario.cluster
        self._node_gpus = spec.node_gpus if spec else 0
        self._max_gpus = spec.max_gpus if spec else math.inf
        self._provision_s = spec.node_provision_s if spec else 0.0
        self.gpus = math.inf if spec is None else 0  # GPUs on provisioned nodes
        self.gpus_used = 0
        self._provisioning = 0  # GPUs on nodes being provisioned
        self._pending: list[Pod] = []
        self.scale_events: list[tuple[float, int, int]] = []

    # ---- the Deployment ---------------------------------------------------------------------------
    def start(self, replicas: int) -> None:
        """Time 0: ``replicas`` pods already ready (warm), on enough nodes for them."""
        if self._node_gpus:
            nodes = math.ceil(replicas / self._node_gpus)
            self.gpus = min(nodes * self._node_gpus, self._max_gpus)
        self.desired = replicas
        for _ in range(replicas):
            pod = self._new_pod(0.0)
            if self.gpus_used < self.gpus:
                self._take_gpu(pod, 0.0)
                self._ready(pod, 0.0)
            else:
                self._pending.append(pod)

    def scale_to(self, n: int, now: float) -> None:
        """Set the desired replica count at ``now``."""
        if n != self.desired:
            self.scale_events.append((now, self.desired, n))
        self.desired = n
        live = [p for p in self.pods if p.state in _LIVE]
        if len(live) < n:
            for _ in range(n - len(live)):
                self._pending.append(self._new_pod(now))
            self._place(now)
        elif len(live) > n:
            # a ReplicaSet deletes unscheduled pods first, then not-ready ones, then the newest ready ones
            rank = {PodState.PENDING: 0, PodState.STARTING: 1, PodState.CRASHED: 1, PodState.READY: 2}
            victims = sorted(live, key=lambda p: (rank[p.state], -p.id))[: len(live) - n]
            for pod in victims:
                self.terminate(pod, now)

    def _new_pod(self, now: float) -> Pod:
        cls = ContinuousPod if self.sim.continuous is not None else Pod
        pod = cls(self.sim, len(self.pods), now)
        self.pods.append(pod)
        return pod

    def _place(self, now: float) -> None:
        """Start pending pods on free GPUs; provision nodes for the rest, within max_gpus."""
        while self._pending and self.gpus_used < self.gpus:
            pod = self._pending.pop(0)
            self._take_gpu(pod, now)
            self._cold_start(pod, now)
        if self._pending and self._node_gpus:
            short = len(self._pending) - self._provisioning
            room = self._max_gpus - self.gpus - self._provisioning
            nodes = min(math.ceil(max(short, 0) / self._node_gpus), int(room // self._node_gpus))
            for _ in range(max(nodes, 0)):
                self._provisioning += self._node_gpus
                ev = Timeout(self.sim.env, self._provision_s)
                ev.callbacks.append(self._node_ready)

    def _node_ready(self, ev: Timeout) -> None:
        self._provisioning -= self._node_gpus
        self.gpus += self._node_gpus
        self._place(self.sim.env.now)

    def _take_gpu(self, pod: Pod, now: float) -> None:
        self.gpus_used += 1
        pod.gpu_since = now

    def _release_gpu(self, pod: Pod, now: float) -> None:
        if pod.gpu_since is not None:
            pod.gpu_s += now - pod.gpu_since
            pod.gpu_since = None
            self.gpus_used -= 1
            self._place(now)

    # ---- a pod's life -------------------------------------------------------------------------------
    def _cold_start(self, pod: Pod, now: float, delay_s: float = 0.0) -> None:
        pod.state = PodState.STARTING
        ev = Timeout(self.sim.env, delay_s + self._startup_s(), (pod, pod.incarnation))
        ev.callbacks.append(self._started)

    def _startup_s(self) -> float:
        d = self.sim.scenario.pods.startup_s
        gen = self.sim.streams["startup"]
        if isinstance(d, ConstantDuration):
            return d.value_s
        if isinstance(d, UniformDuration):
            return float(gen.uniform(d.low_s, d.high_s))
        assert isinstance(d, LognormalDuration)
        mu = math.log(d.mean_s) - d.sigma**2 / 2.0
        return float(gen.lognormal(mu, d.sigma))

    def _started(self, ev: Timeout) -> None:
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.state == PodState.STARTING and pod.incarnation == incarnation:
            self._ready(pod, self.sim.env.now)

    def _ready(self, pod: Pod, now: float) -> None:
        pod.state = PodState.READY
        self.endpoints.append(pod)
        self.endpoints.sort(key=lambda p: p.id)
        self.sim.router.touch(pod)
        self.sim.faults.pod_ready(pod, now)

    def _leave_endpoints(self, pod: Pod) -> None:
        if pod in self.endpoints:
            self.endpoints.remove(pod)

    def crash(self, pod: Pod, now: float) -> None:
        """The pod's container dies at ``now``: its requests fail; it restarts and cold-starts."""
        if pod.state not in (PodState.READY, PodState.STARTING, PodState.TERMINATING):
            return
        terminating = pod.state == PodState.TERMINATING
        self._leave_endpoints(pod)
        held = pod.kill(now)
        self.sim.client.pod_lost(pod, held, now, crashed=True)
        if terminating:
            self._gone(pod, now)
            return
        pod.state = PodState.CRASHED
        self._cold_start(pod, now, delay_s=self.sim.scenario.faults.restart_s if self.sim.scenario.faults else 0.0)

    def terminate(self, pod: Pod, now: float) -> None:
        """Delete a pod: it leaves the endpoints, drains its queue, and is killed after the grace period."""
        if pod.state == PodState.PENDING:
            self._pending.remove(pod)
            pod.state = PodState.GONE
            return
        if pod.state != PodState.READY:  # starting or crashed: nothing to drain
            pod.kill(now)
            self._gone(pod, now)
            return
        self._leave_endpoints(pod)
        pod.state = PodState.TERMINATING
        if pod.outstanding == 0 and not pod.running:
            self._gone(pod, now)
            return
        ev = Timeout(self.sim.env, self.sim.scenario.pods.termination_grace_s, (pod, pod.incarnation))
        ev.callbacks.append(self._grace_over)

    def _grace_over(self, ev: Timeout) -> None:
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.state == PodState.TERMINATING and pod.incarnation == incarnation:
            now = self.sim.env.now
            held = pod.kill(now)
            self.sim.client.pod_lost(pod, held, now, crashed=False)
            self._gone(pod, now)

    def pod_drained(self, pod: Pod, now: float) -> None:
        """A terminating pod finished its last batch."""
        self._gone(pod, now)

    def _gone(self, pod: Pod, now: float) -> None:
        pod.state = PodState.GONE
        self._release_gpu(pod, now)
        self.sim.client.pod_gone(pod, now)

    # ---- accounting ---------------------------------------------------------------------------------
    def count(self, state: PodState) -> int:
        return sum(1 for p in self.pods if p.state == state)

    def gpu_seconds(self, now: float) -> float:
        """GPU-seconds held by all pods up to ``now``."""
        return sum(p.gpu_s + (now - p.gpu_since if p.gpu_since is not None else 0.0) for p in self.pods)

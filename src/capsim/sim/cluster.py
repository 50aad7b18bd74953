"""The Deployment and the kubelets under it: creates and deletes pods and moves them through their lives.

``scale_to(n)`` is what the HPA (or the initial spec) asks; the cluster adds pods (Pending until a GPU is
free) or removes them (the least useful first: pending, then starting, then the newest ready ones, as a
ReplicaSet does). Where GPUs come from is ``nodes.py``. A placed pod pulls its image unless its node has
it (``pods.image_pull_s``), then its container starts and is ready ``pods.startup_s`` later. A container
can crash while it starts or serves; the kubelet restarts it in place (same node, image already there)
after the CrashLoopBackOff delay of ``kubelet.py``, and it starts again (``startup_s``). A pod holds its
GPU from its placement until it is gone.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

from simpy.events import Timeout

from capsim.model.scenario import ConstantDuration, Duration, LognormalDuration, UniformDuration
from capsim.sim.continuous import ContinuousPod
from capsim.sim.kubelet import ContainerBackOff
from capsim.sim.nodes import Node, NodePool
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
        self.nodes = NodePool(sim, self._place, self._evict)
        self._pending: list[Pod] = []
        self._node: dict[int, Node | None] = {}  # pod id -> the node it runs on
        self._backoff: dict[int, ContainerBackOff] = {}  # pod id -> the kubelet's backoff entry
        self._running: set[int] = set()  # pods whose container runs (started, not crashed)
        self.restarts = 0  # container restarts by the kubelet
        self.scale_events: list[tuple[float, int, int]] = []

    # ---- the Deployment ---------------------------------------------------------------------------
    def start(self, replicas: int) -> None:
        """Time 0: ``replicas`` pods already ready (warm), on enough nodes for them."""
        self.nodes.start(replicas)
        self.desired = replicas
        for _ in range(replicas):
            pod = self._new_pod(0.0)
            if self.nodes.has_free():
                self._take_gpu(pod, 0.0)
                self._running.add(pod.id)
                self.sim.faults.container_started(pod, 0.0)
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
        while self._pending and self.nodes.has_free():
            pod = self._pending.pop(0)
            self._take_gpu(pod, now)
            self._cold_start(pod, now)
        self.nodes.provision_for(len(self._pending), now)

    def _take_gpu(self, pod: Pod, now: float) -> None:
        self._node[pod.id] = self.nodes.take()
        pod.gpu_since = now

    def _release_gpu(self, pod: Pod, now: float) -> None:
        if pod.gpu_since is not None:
            pod.gpu_s += now - pod.gpu_since
            pod.gpu_since = None
            self.nodes.release(self._node.pop(pod.id, None), now)
            self._place(now)

    def _evict(self, node: Node, now: float) -> None:
        """cluster-autoscaler drains ``node``: its pods are evicted (terminated with their grace period)
        and the ReplicaSet replaces them on other nodes."""
        evicted = (PodState.STARTING, PodState.READY, PodState.CRASHED)  # terminating ones are leaving already
        for pod in [p for p in self.pods if p.state in evicted and self._node.get(p.id) is node]:
            self.terminate(pod, now)
        self.scale_to(self.desired, now)

    # ---- a pod's life -------------------------------------------------------------------------------
    def _cold_start(self, pod: Pod, now: float) -> None:
        """A placed pod: it pulls the image unless its node has it, then its container starts."""
        pod.state = PodState.STARTING
        wait = self.nodes.image_wait_s(self._node.get(pod.id), now,
                                       lambda: self._draw(self.sim.scenario.pods.image_pull_s, "image_pull"))
        if wait > 0.0:
            ev = Timeout(self.sim.env, wait, (pod, pod.incarnation))
            ev.callbacks.append(self._pulled)
        else:
            self._start_container(pod, now)

    def _pulled(self, ev: Timeout) -> None:
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.state == PodState.STARTING and pod.incarnation == incarnation:
            self._start_container(pod, self.sim.env.now)

    def _start_container(self, pod: Pod, now: float) -> None:
        """The container starts (a first start or a kubelet restart): it is ready ``startup_s`` later,
        and may crash from now on."""
        pod.state = PodState.STARTING
        self._running.add(pod.id)
        self.sim.faults.container_started(pod, now)
        ev = Timeout(self.sim.env, self._draw(self.sim.scenario.pods.startup_s, "startup"), (pod, pod.incarnation))
        ev.callbacks.append(self._started)

    def _draw(self, d: Duration, stream: str) -> float:
        gen = self.sim.streams[stream]
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

    def _leave_endpoints(self, pod: Pod) -> None:
        if pod in self.endpoints:
            self.endpoints.remove(pod)

    def crash(self, pod: Pod, now: float) -> None:
        """The pod's container dies at ``now`` (starting or serving): its requests fail; the kubelet
        restarts it after the CrashLoopBackOff delay, CRASHED until then."""
        if pod.id not in self._running or pod.state not in (PodState.READY, PodState.STARTING,
                                                              PodState.TERMINATING):
            return  # no container runs: still pulling its image, or waiting for a restart
        self._running.discard(pod.id)
        terminating = pod.state == PodState.TERMINATING
        self._leave_endpoints(pod)
        held = pod.kill(now)
        self.sim.client.pod_lost(pod, held, now, crashed=True)
        if terminating:
            self._gone(pod, now)
            return
        pod.state = PodState.CRASHED
        backoff = self._backoff.get(pod.id)
        if backoff is None:
            b = self.sim.scenario.pods.crash_loop_backoff
            backoff = self._backoff[pod.id] = ContainerBackOff(b.initial_s, b.max_s, b.reset_s)
        delay = backoff.exited(now)
        if delay == 0.0:
            self._restart(pod, now)
        else:
            ev = Timeout(self.sim.env, delay, (pod, pod.incarnation))
            ev.callbacks.append(self._backoff_over)

    def _backoff_over(self, ev: Timeout) -> None:
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.state == PodState.CRASHED and pod.incarnation == incarnation:
            self._restart(pod, self.sim.env.now)

    def _restart(self, pod: Pod, now: float) -> None:
        self.restarts += 1
        self._start_container(pod, now)

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
        self._running.discard(pod.id)
        self._release_gpu(pod, now)
        self.sim.client.pod_gone(pod, now)

    # ---- accounting ---------------------------------------------------------------------------------
    def container_running(self, pod: Pod) -> bool:
        """Whether ``pod``'s container runs: started, not crashed (the pod's phase is Running, not Pending)."""
        return pod.id in self._running

    def count(self, state: PodState) -> int:
        return sum(1 for p in self.pods if p.state == state)

    def gpu_seconds(self, now: float) -> float:
        """GPU-seconds held by all pods up to ``now``."""
        return sum(p.gpu_s + (now - p.gpu_since if p.gpu_since is not None else 0.0) for p in self.pods)

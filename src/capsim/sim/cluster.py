"""The Deployment and the kubelets under it: creates and deletes pods and moves them through their lives.

``scale_to(n)`` is what the HPA (or the initial spec) asks; the cluster adds pods (Pending until a GPU is
free) or removes them in the ReplicaSet's order (``replicaset.py``: unassigned, Pending, not ready, then
ready pods by the log2 bucket of their time since ready, ties at random). Where GPUs come from is ``nodes.py``. A placed pod pulls its image unless its node has
it (``pods.image_pull_s``), then its container starts and is ready ``pods.startup_s`` later. A container
can crash while it starts or serves; the kubelet restarts it in place (same node, image already there)
after the CrashLoopBackOff delay of ``kubelet.py``, and it starts again (``pods.restart_startup_s``, which a
volume or the node's page cache may make shorter than a first start; unset, ``startup_s``); with
``pods.node_model_cache`` a new pod placed on a node where a container of its image has loaded the model starts so
too. A pod holds its
GPUs (``batching.tensor_parallel_size``, all on its node) from its placement until it is gone.

Readiness, as the kubelet and the endpoints controller run it: the startup probe (``/healthz``) and the readiness
probe (``/readyz``) run every ``pods.startup_probe.period_s`` and ``pods.readiness_probe.period_s`` from the pod's
admission on its node (each prober worker's ticker starts with the pod and probes at once; initialDelaySeconds 0;
the pods already running at time 0 probe at random phases). The readiness probe is skipped until the startup
probe passes; then the kubelet runs it at once (``prober_manager.go``, ``UpdatePodStatus``: a started container
without a passing readiness result triggers a manual run). So a started container is ready at the first startup
probe after its ``startup_s`` (its Ready condition: ``READY``; with the two periods equal, the default, that is the
first readiness probe's time) and receives traffic ``pods.endpoints_propagation_s`` later (EndpointSlice
controller and kube-proxy). With ``pods.startup_probe.failure_threshold`` set, a container whose model has not
loaded by that many startup probes of it (from the first tick after its start) is killed by the kubelet, a crash of
kind ``startup_probe``, and restarted under CrashLoopBackOff (``_startup_kill_at``). The real pod's ``/readyz``
fails while the session store does not answer (``capsim.core.service``), so during a Redis outage a ready pod
fails its probes (not with ``state.on_unavailable: serve_local``: such a pod still serves, and stays ready); after
``failure_threshold`` failures in a row it is not ready (``probe_failing``) and leaves the endpoints one
propagation later; it is ready again at its first probe after the outage (a pod whose startup probe passes in
the outage fails that first readiness probe, and is ready at its first readiness probe after). Upstream:
``pkg/kubelet/prober/worker.go`` (``run``, ``doProbe``: failureThreshold / successThreshold 1; readiness skipped
until started), ``pkg/kubelet/prober/prober_manager.go`` (``UpdatePodStatus``),
``pkg/apis/core/v1/defaults.go`` (periodSeconds 10, failureThreshold 3).

A failed node (``faults.node_failures``) takes its pods down without a word: see ``node_failed``.

A rolling update (``pods.rollouts``) gives the pod template a new revision: while it runs the Deployment has a
ReplicaSet per revision, the Deployment controller's rules (``capsim.policy.rollout``) size them and each runs
its own pods (``_sync_deployment``); between rollouts there is one, and ``scale_to`` sizes it directly.

A crashed or deleted pod leaves the endpoints late too. A deleted pod is marked terminating at once and
leaves the endpoints ``endpoints_propagation_s`` later; a crashed container is seen by the kubelet at
its next PLEG relist (``pods.crash_detection_s``, ``plegRelistPeriod`` 1 s in ``pkg/kubelet/kubelet.go``),
which turns the pod not ready, and it leaves one propagation after that. Meanwhile the router still
sends it requests, which are refused at once (the real pod answers 503 while it drains; a dead
container refuses the connection) and retried by the client (``client.py``). Kubernetes is Apache-2.0
(c) The Kubernetes Authors; the rules are re-implemented from its source, no code is copied.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, cast

import numpy as np
from simpy.events import Timeout

from capsim.model.scenario import ConstantDuration, Duration, LognormalDuration, Rollout, UniformDuration
from capsim.policy.rollout import Recreate, ReplicaSetState, RollingUpdate, Strategy, complete, progressing
from capsim.policy.rollout import scale as scale_deployment
from capsim.policy.rollout import sync as sync_deployment
from capsim.policy.sched_types import SchedulerLimits
from capsim.sim.analysis import AnalysisProm
from capsim.sim.continuous import ContinuousPod
from capsim.sim.kubelet import ContainerBackOff
from capsim.sim.nodes import Node, NodePool
from capsim.sim.pod import Pod, PodState
from capsim.sim.replicaset import RankedPod, pods_to_delete

if TYPE_CHECKING:
    from capsim.sim.simulate import Simulation

_LIVE = (PodState.PENDING, PodState.STARTING, PodState.READY, PodState.CRASHED)
#: the pods a drain takes off a node (terminating ones are leaving already)
_DRAINED = (PodState.STARTING, PodState.READY, PodState.CRASHED)
#: kubectl drain asks again for an eviction the PodDisruptionBudget refused after this long
#: (``k8s.io/kubectl/pkg/drain``: the 429 retry of ``evictPods``)
EVICTION_RETRY_S = 5.0


def draw_duration(d: Duration, gen: np.random.Generator) -> float:
    """One draw of a duration setting (s): its constant, or from ``gen``."""
    if isinstance(d, ConstantDuration):
        return d.value_s
    if isinstance(d, UniformDuration):
        return float(gen.uniform(d.low_s, d.high_s))
    assert isinstance(d, LognormalDuration)
    mu = math.log(d.mean_s) - d.sigma**2 / 2.0
    return float(gen.lognormal(mu, d.sigma))


@dataclass
class RolloutRecord:
    """One rolling update (``pods.rollouts``, an undo too): when it began, its revision, the Deployment's replicas
    then, when it was done (None: not yet), the fewest pods ready and the most alive (Pending to draining) at its
    syncs, when it last made progress (``DeploymentProgressing``: more pods on its template, fewer on the others, or
    more pods ready or available than at the sync before: what resets the Deployment's ``progressDeadlineSeconds``),
    and when an undo left its template."""

    at_s: float
    revision: int
    pods: int
    min_ready: int
    most_pods: int
    done_s: float | None = None
    progress_s: float = 0.0
    deadline_exceeded_s: float | None = None  # progressDeadlineSeconds after a progress, with none since
    undo: bool = False  # kubectl rollout undo: back to the template before
    template: int = 0  # the template (its ReplicaSet) it rolls the pods to
    undone_s: float | None = None  # when an undo left its template (before it was done, or after)
    undo_refused_s: float | None = None  # when the pipeline's undo of it was refused: the Deployment was paused
    canary_ttft_p99_s: float | None = None  # the canary's p99 TTFT at its last measurement (NaN: nothing answered)
    baseline_ttft_p99_s: float | None = None  # the same over the other templates' pods, for comparison
    canary_itl_mean_s: float | None = None  # the canary's mean ITL at its last measurement (NaN: nothing answered)
    baseline_itl_mean_s: float | None = None  # the same over the other templates' pods
    canary_checked_s: float | None = None  # when the pipeline's check of it as a canary decided (resume or earlier)
    canary_error_rate: float | None = None  # its attempts ended in error, a share (as error_rate_source counts)
    baseline_error_rate: float | None = None  # the same over the other templates' pods
    canary_measurements: int = 0  # the measurements of it (the resume's, and check_interval_s' in the pause)
    canary_failures: int = 0  # how many of them failed
    canary_failed_by: str = ""  # what undid it: undo_if_restarted, or the limits whose failures passed the limit

    @property
    def canary_failed(self) -> bool:
        """Whether the pipeline's check of it as a canary failed (it was undone then): something undid it."""
        return bool(self.canary_failed_by)

    @property
    def open(self) -> bool:
        """Still running: neither done nor left by an undo."""
        return self.done_s is None and self.undone_s is None


class Cluster:
    """All pods ever created (``pods[id]``), the ready endpoints, and the GPU supply."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.pods: list[Pod] = []
        self._alive: dict[int, Pod] = {}  # pods not gone, by id in creation order: what the scans look at
        self.gone_busy_s = 0.0  # busy seconds of the pods gone (theirs no longer change)
        self.endpoints: list[Pod] = []  # ready, receiving traffic, sorted by id
        self.desired = 0
        self.nodes = NodePool(sim, self._place, self._evict, self._may_evict, self._node_tainted,
                              drain=self._karpenter_drain,
                              pods_by_node=self._pods_by_node)
        self._lost: dict[int, tuple[Node, float, list[Pod]]] = {}  # node id -> (node, failed at, its pods then)
        self._pending: list[Pod] = []
        self._node: dict[int, Node | None] = {}  # pod id -> the node it runs on
        self.placements: list[tuple[float, int, int, int]] = []  # (time, pod, node, zone), with a cluster section
        self._backoff: dict[int, ContainerBackOff] = {}  # pod id -> the kubelet's backoff entry
        self._running: set[int] = set()  # pods whose container runs (started, not crashed)
        self.restarts = 0  # container restarts by the kubelet
        self._restarts_of: dict[int, int] = {}  # pod id -> its container's restart count
        self._uids = sim.streams["pod_uids"]
        self._uid: list[int] = []  # per pod id: its random UID (a 62-bit integer)
        probe = sim.scenario.pods.readiness_probe
        self._probe_period = float(probe.period_s)
        self._startup_period = float(sim.scenario.pods.startup_probe.period(probe))
        self._probe_failures = probe.failure_threshold
        self._startup_failures = sim.scenario.pods.startup_probe.failure_threshold  # None: no start is killed
        self._propagation_s = sim.scenario.pods.endpoints_propagation_s
        self._crash_leave_s = sim.scenario.pods.crash_detection_s + self._propagation_s
        self._probe_origin: dict[int, float] = {}  # pod id -> when its prober started (its placement)
        # (start, end): /readyz fails while Redis is out -- unless the pods serve from their local copies
        # (state.on_unavailable: serve_local), whose /readyz stays passing, as the real pod's does
        self._outages = sim.faults.outages() if sim.scenario.state.on_unavailable == "fail" else []
        for a, b in self._outages:
            Timeout(sim.env, a, (a, b)).callbacks.append(self._outage_begins)
        self.scale_events: list[tuple[float, int, int, str]] = []  # (time, from, to, by: hpa or keda)
        # rolling updates (pods.rollouts): the template new pods get (``revision``: a pod template, and its ReplicaSet,
        # numbered as created), each template's revision number (Kubernetes' revision annotation: the higher the
        # newer; an undo gives an old template the next one), and while a rollout runs its ReplicaSets (template ->
        # the controller's view: spec replicas and annotations); None between rollouts, when the one ReplicaSet's
        # replicas are ``desired``
        ru = sim.scenario.pods.rolling_update
        self._strategy: Strategy = (Recreate() if sim.scenario.pods.strategy == "Recreate"
                                    else RollingUpdate(ru.max_surge, ru.max_unavailable))
        self.revision = 0
        self._templates: list[Rollout | None] = [None]  # per template: the rollout that made it (None: the first)
        self._limits: dict[int, SchedulerLimits] = {}  # per template with engine flags: its scheduler's limits
        self._image: list[int] = [0]  # per template: its image (a new one is numbered as the template)
        self._order: dict[int, int] = {0: 0}  # template -> its revision number (the first template's 0)
        self._ticker = 0  # the controller's resync ticker in force (one at a time)
        self._rs: dict[int, ReplicaSetState] | None = None
        self._syncing = False
        self._sync_again = False
        self._status = (0, 0, 0, 0)  # the Deployment's status at the last sync (``_deployment_status``)
        self._deadline_s = float(sim.scenario.pods.progress_deadline_s)
        self._min_ready_s = sim.scenario.pods.min_ready_s
        self.rollouts: list[RolloutRecord] = []
        self._undo_on_deadline = sim.scenario.pods.undo_on_deadline
        self._undo_after_s = sim.scenario.pods.undo_after_s
        # kubectl rollout pause (spec.paused): the controller only scales, a deploy meanwhile waits for the resume
        # (its ReplicaSet is not created: getAllReplicaSetsAndSyncRevision(createIfNotExisted=false)), and kubectl
        # refuses an undo
        self.paused = False
        self._waiting: Rollout | None = None  # the deploy made while paused: it begins at the resume
        self._record_of: dict[int, RolloutRecord] = {}  # id of a deploy entry -> its record, once it began
        self.undos_refused: list[float] = []  # when the pipeline's undo was refused (the Deployment paused)
        # the canary analysis's Prometheus (a metric check's measurements read its scrapes), when one is checked
        self.analysis = AnalysisProm(sim) if any(ro.metrics_checked for ro in sim.scenario.pods.rollouts) else None
        self._resumed_early: set[int] = set()  # ids of resume entries whose restart poll already resumed and undid
        self._failures: dict[tuple[int, str], int] = {}  # (a resume's id, a limit) -> measurements it failed
        rollouts = sim.scenario.pods.rollouts
        checks = sim.scenario.pods.check_times()
        for i, r in enumerate(rollouts):
            Timeout(sim.env, r.at_s, r).callbacks.append(self._rollout_begins)
            for t in checks.get(i, ()):  # the measurements during the pause, then the resume's
                if t != r.at_s:
                    Timeout(sim.env, t, (r, t)).callbacks.append(self._analysis_measures)
        for pause, resume, _ in sim.scenario.pods.pause_pairs():  # the restart polls: every restart_poll_s of a pause
            poll = None if resume is None else rollouts[resume].restart_poll_s
            if resume is not None and poll is not None:
                began = rollouts[pause].at_s
                n = math.ceil((rollouts[resume].at_s - began) / poll)  # the ticks before the resume
                for k in range(1, n):
                    Timeout(sim.env, began + k * poll, rollouts[resume]).callbacks.append(self._restart_poll)

    # ---- the Deployment ---------------------------------------------------------------------------
    def start(self, replicas: int) -> None:
        """Time 0: ``replicas`` pods already ready (warm), on enough nodes for them."""
        self.nodes.start(replicas)
        self.desired = replicas
        for _ in range(replicas):
            pod = self._new_pod(0.0)
            if self.nodes.has_free():
                self._take_gpu(pod, 0.0)
                # a warm pod was admitted to its node some time before: its probes run at a random phase
                phase = float(self.sim.streams["probe_phases"].random())
                self._probe_origin[pod.id] = -self._probe_period * phase
                self._running.add(pod.id)
                pod.container_started(0.0)
                self.sim.faults.container_started(pod, 0.0)
                self.nodes.model_loaded(self._node.get(pod.id), self._image[pod.revision])
                self._ready(pod, 0.0, join_after_s=0.0)
            else:
                self._pending.append(pod)

    def scale_to(self, n: int, now: float, by: str = "hpa") -> None:
        """Set the desired replica count at ``now`` (``by``: the controller that set it, for ``scale_events``)."""
        if n != self.desired:
            self.scale_events.append((now, self.desired, n, by))
        self.desired = n
        if self._rs is not None:  # mid-rollout: the Deployment controller shares them out among its ReplicaSets
            self._sync_deployment(now)
            return
        # between rollouts every live pod runs the current template: its one ReplicaSet takes the count
        self._replicaset_to(self.revision, n, now)

    # ---- rolling updates (capsim.policy.rollout) ---------------------------------------------------------
    def _rollout_begins(self, ev: Timeout) -> None:
        """An entry of ``pods.rollouts``: a deploy (waiting for the resume while paused), an undo, a pause or a
        resume (the scenario refuses an undo while paused, as kubectl does)."""
        ro = cast(Rollout, ev.value)
        now = self.sim.env.now
        if ro.pause:  # the update syncs the Deployment: scale only, from now on (a rollout's total may move to
            self.paused = True  # replicas + maxSurge, as upstream's proportional scaling takes it)
            if self._rs is not None:
                self._sync_deployment(now)
            return
        if ro.resume and id(ro) in self._resumed_early:  # its restart poll resumed (and undid) already
            return
        if ro.resume:  # with a canary check first (on the rollout the pause held, not a deploy that waited)
            held = self._held_canary()
            failed = False
            if held is not None and (ro.undo_if_restarted or ro.metrics_checked):
                failed = ro.undo_if_restarted and self._restarted(held.template)
                if failed:
                    held.canary_failed_by = "undo_if_restarted"
                if ro.metrics_checked:
                    failed |= self._measure(ro, held, now)
                held.canary_checked_s = now
            self._resume(now)
            if held is not None and failed and held.open:  # `kubectl rollout resume && kubectl rollout undo`
                self._pipeline_undo(now, held)
            return
        if not ro.undo and self._undo_after_s is not None:  # the pipeline's `kubectl rollout status --timeout`
            Timeout(self.sim.env, self._undo_after_s, ro).callbacks.append(self._timed_out)
        if self.paused and not ro.undo:
            self._waiting = ro  # a later deploy while paused replaces it: the resume rolls out the newest template
            return
        self._begin(ro)

    def _resume(self, now: float) -> None:
        """kubectl rollout resume: the deploy that waited begins; else the rollout under way goes on, its progress
        deadline counted afresh (the Progressing condition's DeploymentResumed, updated now)."""
        self.paused = False
        if self._waiting is not None:
            ro, self._waiting = self._waiting, None
            self._begin(ro)
            return
        if self._rs is not None:
            for r in self.rollouts:
                if r.open:
                    r.progress_s = now
            self._status = self._deployment_status()
            self._sync_deployment(now)

    def _restart_poll(self, ev: Timeout) -> None:
        """The pipeline's look at the canary during the pause (``restart_poll_s``: a ``kubectl get pods`` loop): at
        the first restart of a pod of the rollout the pause holds, ``kubectl rollout resume && kubectl rollout undo``
        at once; the resume entry then does nothing."""
        ro = cast(Rollout, ev.value)
        record = self._held_canary()
        if id(ro) in self._resumed_early or not self.paused or record is None or not self._restarted(record.template):
            return
        record.canary_failed_by = "undo_if_restarted"
        self._undo_early(ro, record)

    def _analysis_measures(self, ev: Timeout) -> None:
        """A measurement of the canary during the pause (``check_interval_s``: an Argo Rollouts analysis'
        interval): once one limit has failed more than ``check_failure_limit`` measurements, ``kubectl rollout resume
        && kubectl rollout undo`` at once; the resume entry then does nothing."""
        ro, at = cast(tuple[Rollout, float], ev.value)
        record = self._held_canary()
        if id(ro) in self._resumed_early or not self.paused or record is None:
            return
        if self._measure(ro, record, at):
            self._undo_early(ro, record)

    def _undo_early(self, ro: Rollout, record: RolloutRecord) -> None:
        """The pipeline's check during the pause failed: resume and undo now, and the resume entry ``ro`` does
        nothing when it comes."""
        now = self.sim.env.now
        record.canary_checked_s = now
        self._resumed_early.add(id(ro))
        self._resume(now)
        if record.open:
            self._pipeline_undo(now, record)

    def _held_canary(self) -> RolloutRecord | None:
        """The rollout a pause holds as a canary: the last one still running on the current template, unless a deploy
        made while paused waits for the resume (then nothing of it runs to check)."""
        if self._waiting is not None:
            return None
        held = [r for r in self.rollouts if r.open and not r.undo and r.template == self.revision]
        return held[-1] if held else None

    def _measure(self, ro: Rollout, record: RolloutRecord, at: float) -> bool:
        """One measurement of ``record``'s canary for the resume ``ro``, over the window that ends at ``at`` (now),
        counted on the record and, for each limit it fails, among that limit's failures (each limit counts its own,
        as each metric of an Argo Rollouts analysis has its own failureLimit); whether one limit has now failed more
        than ``check_failure_limit`` times (the pipeline undoes). Each side's values are what the exported
        AnalysisTemplate's queries answer over Prometheus's scrapes (``capsim.sim.analysis``). A limit fails when the
        p99 TTFT its pods answered over the window is unknown (nothing answered: ``histogram_quantile`` of an empty
        histogram), over ``undo_if_ttft_p99_over_s`` or over ``undo_if_ttft_p99_over_baseline`` times the old pods'
        (which passes when they answered nothing), likewise for the mean inter-token latency, and when the share of
        their attempts ended with an error is unknown (none), over ``undo_if_error_rate_over`` or more than
        ``undo_if_error_rate_over_baseline_by`` above the old pods' (NaN, none reached them: it passes)."""
        assert self.analysis is not None
        canary, base = (_Window(*r) for r in self.analysis.measure(record.template, at, ro.check_window_s,
                                                                     ro.error_rate_source))
        if ro.ttft_checked:
            record.canary_ttft_p99_s, record.baseline_ttft_p99_s = canary.ttft_p99_s, base.ttft_p99_s
        if ro.itl_checked:
            record.canary_itl_mean_s, record.baseline_itl_mean_s = canary.itl_mean_s, base.itl_mean_s
        if ro.error_checked:
            record.canary_error_rate, record.baseline_error_rate = canary.error_rate, base.error_rate
        failed = [name for name, quantity, kind, limit in ro.limits()
                  if _fails(getattr(canary, quantity), getattr(base, quantity), limit, kind)]
        record.canary_measurements += 1
        if failed:
            record.canary_failures += 1
        over = []
        for name in failed:  # each limit counts its own failures, as each metric of an Argo Rollouts analysis does
            n = self._failures[id(ro), name] = self._failures.get((id(ro), name), 0) + 1
            if n > ro.check_failure_limit:
                over.append(name)
        if over:
            record.canary_failed_by = " and ".join(filter(None, [record.canary_failed_by, *over]))
        return bool(over)

    def _restarted(self, template: int) -> bool:
        """Whether a container of ``template``'s pods has exited: restarted (their RESTARTS column above 0) or down
        now, waiting for its restart (CrashLoopBackOff)."""
        return any(self.restart_count(p) > 0 or p.state == PodState.CRASHED
                   for p in self.pods if p.revision == template)

    def _pipeline_undo(self, now: float, record: RolloutRecord) -> None:
        """The deploy pipeline's ``kubectl rollout undo`` of ``record``'s rollout: refused while the Deployment is
        paused (kubectl: "you cannot rollback a paused deployment; resume it first"), the rollout left as it is."""
        if self.paused:
            record.undo_refused_s = now
            self.undos_refused.append(now)
            return
        self._begin(Rollout(at_s=now, undo=True))

    def _begin(self, ro: Rollout) -> None:
        """A new pod template (``pods.rollouts``): a new ReplicaSet, to which the controller moves the pods; or an
        undo: the template before the current one, whose ReplicaSet becomes the new one with the pods it has."""
        now = self.sim.env.now
        d = self.desired
        if self._rs is None:  # the one ReplicaSet, annotated with the replicas the last scale gave it
            self._rs = {self.revision: ReplicaSetState(self._order[self.revision], d, 0, d, d + self._strategy.surge(d))}
        newest = max(self._order.values())
        if ro.undo:
            # kubectl rollout undo: the template of the revision before the current one (the second newest)
            target = sorted(self._order, key=self._order.__getitem__)[-2]
            for r in self.rollouts:
                if r.template == self.revision and r.undone_s is None:
                    r.undone_s = now
        else:
            target = len(self._templates)
            self._templates.append(ro)
            self._image.append(target if ro.new_image else self._image[self.revision])
        self._order[target] = newest + 1
        self.revision = target
        if target not in self._rs:
            self._rs[target] = ReplicaSetState(newest + 1, 0, 0, d, d + self._strategy.surge(d))
        self._status = self._deployment_status()
        self.rollouts.append(RolloutRecord(now, newest + 1, d, self.ready_count(), len(self._alive), progress_s=now,
                                           undo=ro.undo, template=target))
        if not ro.undo:
            self._record_of[id(ro)] = self.rollouts[-1]
        self._sync_deployment(now)
        self._ticker += 1
        Timeout(self.sim.env, 1.0, self._ticker).callbacks.append(self._resync)

    def _stalled(self, ev: Timeout) -> None:
        """``pods.undo_on_deadline``: the pipeline undoes the rollout Kubernetes reported stalled, if it still runs."""
        r = cast(RolloutRecord, ev.value)
        if r.open and r.template == self.revision:
            self._pipeline_undo(self.sim.env.now, r)

    def _timed_out(self, ev: Timeout) -> None:
        """The pipeline's timeout (``pods.undo_after_s``) for a deploy: undone if its rollout is still running on the
        current template (not done, not undone, not overtaken by a later deploy); refused while paused (a deploy
        that still waits for the resume too: ``kubectl rollout status`` times out on a paused Deployment)."""
        ro = cast(Rollout, ev.value)
        now = self.sim.env.now
        r = self._record_of.get(id(ro))
        if r is None:  # never began: it waits for the resume (or a later deploy replaced it while paused)
            if self._waiting is ro:
                self.undos_refused.append(now)  # refused; no record to note it on: the rollout has not begun
            return
        if r.open and r.template == self.revision:
            self._pipeline_undo(now, r)

    def _resync(self, ev: Timeout) -> None:
        """The controller's requeue while a rollout runs: every second, as pods become available or fail (one
        ticker: a rollout begun over another takes it over)."""
        if self._rs is not None and ev.value == self._ticker:
            self._sync_deployment(self.sim.env.now)
            if self._rs is not None:
                Timeout(self.sim.env, 1.0, ev.value).callbacks.append(self._resync)

    def _members(self, revision: int) -> list[Pod]:
        """The ReplicaSet's active pods: its live pods of ``revision`` not terminating."""
        return [p for p in self._alive.values() if p.revision == revision and p.state in _LIVE]

    def _sync_deployment(self, now: float) -> None:
        """The Deployment controller syncs (``capsim.policy.rollout.sync``) until nothing changes; the ReplicaSet
        controller creates and deletes each ReplicaSet's pods to its replicas (its victims ranked as ``scale_to``)."""
        if self._syncing:
            self._sync_again = True
            return
        assert self._rs is not None
        self._syncing = True
        try:
            for _ in range(64):
                self._sync_again = False
                templates = self._by_revision()
                rss = self._replicasets(templates)
                after = (scale_deployment(rss, self.desired, self._strategy) if self.paused  # sync(): scale only
                         else sync_deployment(rss, self.desired, self._strategy, self._old_pods_running()))
                self._rs = dict(zip(templates, after, strict=True))
                for t, rs in zip(templates, after, strict=True):
                    self._replicaset_to(t, rs.replicas, now)
                if after == rss and not self._sync_again:
                    break
            # read again: the last pass may still have created or deleted pods to match sizes that did not change
            ready, pods, final = self.ready_count(), len(self._alive), self._replicasets(self._by_revision())
            status = self._deployment_status()
            # paused, the controller does not check progress (checkPausedConditions; syncRolloutStatus is the
            # rollout's path only): neither progress nor the deadline until the resume, which counts afresh
            moved = not self.paused and progressing(self._status, status)
            self._status = status
            stalled: RolloutRecord | None = None
            for r in self.rollouts:
                if r.open:  # the fewest pods ready and the most alive (Pending to draining) meanwhile
                    r.min_ready = min(r.min_ready, ready)
                    r.most_pods = max(r.most_pods, pods)
                    if self.paused:
                        continue
                    if moved:
                        r.progress_s = now
                    elif r.deadline_exceeded_s is None and now - r.progress_s >= self._deadline_s:
                        r.deadline_exceeded_s = r.progress_s + self._deadline_s
                        if not r.undo and r.template == self.revision:
                            stalled = r
            if complete(final, self.desired):
                for r in self.rollouts:
                    if r.open:
                        r.done_s = now
                self._rs = None
            elif stalled is not None and self._undo_on_deadline:  # `kubectl rollout status || kubectl rollout undo`
                Timeout(self.sim.env, 0.0, stalled).callbacks.append(self._stalled)
        finally:
            self._syncing = False

    def _deployment_status(self) -> tuple[int, int, int, int]:
        """The Deployment's status as ``DeploymentProgressing`` compares it from one sync to the next: its pods of the
        current template (updated), its other pods, and its ready and available pods, none terminating."""
        live = [p for p in self._alive.values() if p.state in _LIVE]
        updated = sum(1 for p in live if p.revision == self.revision)
        ready = sum(1 for p in live if p.ready_condition)
        return updated, len(live) - updated, ready, sum(1 for p in live if self._available(p))

    def _by_revision(self) -> list[int]:
        """The rollout's templates (ReplicaSets), oldest revision first: the current one last."""
        assert self._rs is not None
        return sorted(self._rs, key=self._order.__getitem__)

    def _old_pods_running(self) -> bool:
        """``oldPodsRunning``: a pod of an older template is still there (Pending to terminating, not yet gone)."""
        return any(p.revision != self.revision for p in self._alive.values())

    def _replicasets(self, templates: list[int]) -> list[ReplicaSetState]:
        """The ReplicaSets of ``templates`` (in that order) with their revisions and their available pods: ready, not
        terminating, for at least ``pods.min_ready_s`` (the Deployment's minReadySeconds)."""
        assert self._rs is not None
        return [replace(self._rs[t], revision=self._order[t],
                        available=sum(1 for p in self._members(t) if self._available(p))) for t in templates]

    def _available(self, pod: Pod) -> bool:
        """Whether ``pod`` is available: ready for ``pods.min_ready_s`` by now (``podutil.IsPodAvailable``)."""
        if not pod.ready_condition:
            return False
        wait = self._min_ready_s
        # the warm pods of time 0 were ready before the run began (``start``)
        return wait == 0 or (pod.ready_s is not None and (pod.ready_s <= 0.0 or self.sim.env.now - pod.ready_s >= wait))

    def _replicaset_to(self, revision: int, n: int, now: float) -> None:
        """The ReplicaSet of ``revision`` runs ``n`` pods: new ones Pending, or victims in upstream's order."""
        live = self._members(revision)
        if len(live) < n:
            for _ in range(n - len(live)):
                self._pending.append(self._new_pod(now, revision))
            self._place(now)
        elif len(live) > n:
            on_node = Counter(id(self._node.get(p.id)) for p in live if p.state != PodState.PENDING)
            for victim in pods_to_delete([self._ranked(p, on_node) for p in live], len(live) - n, now):
                self.terminate(self.pods[victim.key], now)

    def _ranked(self, pod: Pod, on_node: Counter[int]) -> RankedPod:
        """``pod`` as the ReplicaSet controller ranks it; ``on_node``: active pods per node (by ``id``)."""
        assigned = pod.state != PodState.PENDING
        node = self._node.get(pod.id)
        pulling = pod.state == PodState.STARTING and pod.id not in self._running
        ready = pod.ready_condition
        return RankedPod(
            key=pod.id, assigned=assigned, phase="Running" if assigned and not pulling else "Pending",
            ready=ready, rank=on_node[id(node)] if assigned else 0,
            ready_s=pod.ready_s if ready else None, restarts=self.restart_count(pod),
            created_s=pod.created_s, uid=self._uid[pod.id],
        )

    def _new_pod(self, now: float, revision: int | None = None) -> Pod:
        cls = ContinuousPod if self.sim.continuous is not None else Pod
        pod = cls(self.sim, len(self.pods), now)
        pod.revision = self.revision if revision is None else revision
        template = self._templates[pod.revision]
        if template is not None and template.batching is not None:  # its engine flags: the scheduler's limits
            cast(ContinuousPod, pod).use_limits(self._template_limits(pod.revision, template))
        self.pods.append(pod)
        self._alive[pod.id] = pod
        self._uid.append(int(self._uids.integers(0, 2**62)))
        self.sim.faults.pod_created(pod)
        if self.analysis is not None:
            self.analysis.pod_created(pod, now)
        return pod

    def _place(self, now: float) -> None:
        """Start pending pods on free GPUs; provision nodes for the rest, within max_gpus."""
        while self._pending and self.nodes.has_free():
            pod = self._pending.pop(0)
            self._take_gpu(pod, now)
            self._cold_start(pod, now)
        self.nodes.provision_for(len(self._pending), now)

    def _take_gpu(self, pod: Pod, now: float) -> None:
        node = self._node[pod.id] = self.nodes.take()
        if node is not None:
            self.placements.append((now, pod.id, node.id, node.zone))
        self.nodes.pod_event(node, now)
        pod.gpu_since = now
        self._probe_origin[pod.id] = now

    def _release_gpu(self, pod: Pod, now: float) -> None:
        if pod.gpu_since is not None:
            pod.gpu_s += now - pod.gpu_since
            pod.gpu_since = None
            self.nodes.release(self._node.pop(pod.id, None), now)
            self._place(now)

    def _may_evict(self, pods: int) -> bool:
        """Whether ``pods`` pods may be evicted now: the PodDisruptionBudget's allowed disruptions (ready pods
        above the desired healthy) cover them; without a budget, always."""
        budget = self.sim.scenario.pods.disruption_budget
        if budget is None:
            return True
        return budget.disruptions_allowed(self.ready_count(), self.desired) >= pods

    def restart_count(self, pod: Pod) -> int:
        """How many times the kubelet has restarted ``pod``'s container (its ``restartCount``, kubectl's RESTARTS)."""
        return self._restarts_of.get(pod.id, 0)

    def ready_count(self) -> int:
        """Pods whose Ready condition holds (``Pod.ready_condition``): ready and not failing their probes, or
        on a dead node not yet NotReady."""
        return sum(1 for p in self._alive.values() if p.ready_condition)

    def _evict(self, node: Node, now: float) -> None:
        """cluster-autoscaler drains ``node``: its pods are evicted (terminated with their grace period)
        and the ReplicaSet replaces them on other nodes."""
        for pod in self._pods_on(node, _DRAINED):
            self.terminate(pod, now)
        self.scale_to(self.desired, now)

    def _pods_by_node(self) -> Counter[Node]:
        """Each node's pods that are not terminating (starting, ready or crashed), in one pass over the pods."""
        return Counter(node for p in self._alive.values() if p.state in _DRAINED
                       and (node := self._node.get(p.id)) is not None)

    def _pods_on(self, node: Node, states: tuple[PodState, ...]) -> list[Pod]:
        """The pods on ``node`` in one of ``states``, by id."""
        return [p for p in self._alive.values() if p.state in states and self._node.get(p.id) is node]

    # ---- a pod's life -------------------------------------------------------------------------------
    def _cold_start(self, pod: Pod, now: float) -> None:
        """A placed pod: it pulls its template's image unless its node has it, then its container starts."""
        pod.state = PodState.STARTING
        wait = self.nodes.image_wait_s(self._node.get(pod.id), now,
                                       lambda: self._draw(self.sim.scenario.pods.image_pull_s, "image_pull"),
                                       self._image[pod.revision])
        if wait > 0.0:
            ev = Timeout(self.sim.env, wait, (pod, pod.incarnation))
            ev.callbacks.append(self._pulled)
        else:
            self._start_container(pod, now)

    def _pulled(self, ev: Timeout) -> None:
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.state == PodState.STARTING and pod.incarnation == incarnation:
            self._start_container(pod, self.sim.env.now)

    def _start_container(self, pod: Pod, now: float, restart: bool = False) -> None:
        """The container starts: its model loads ``pods.startup_s`` later (a kubelet ``restart`` in place, or with
        ``pods.node_model_cache`` a first start on a node where its image's model has loaded before:
        ``pods.restart_startup_s`` where set, the caches that outlive the container warm), and it may crash from
        now on."""
        pod.state = PodState.STARTING
        pod.probe_failing = False
        pod.server_up = False
        self._running.add(pod.id)
        pod.container_started(now)
        self.sim.faults.container_started(pod, now)
        template = self._templates[pod.revision]
        if template is not None and template.crash_after_s is not None:  # a bad template's container exits
            Timeout(self.sim.env, template.crash_after_s, (pod, pod.incarnation)).callbacks.append(self._template_exits)
        pods = self.sim.scenario.pods
        warm = restart or (pods.node_model_cache
                           and self.nodes.holds_model(self._node.get(pod.id), self._image[pod.revision]))
        load = self._draw(pods.restart_start if warm else pods.startup_s, "startup")
        killed = self._startup_kill_at(pod, now, load)
        if killed is not None:
            Timeout(self.sim.env, killed - now, (pod, pod.incarnation)).callbacks.append(self._startup_probe_failed)
            return
        ev = Timeout(self.sim.env, load, (pod, pod.incarnation))
        ev.callbacks.append(self._started)

    def _startup_kill_at(self, pod: Pod, now: float, load: float) -> float | None:
        """When the kubelet kills a container started at ``now`` whose model loads ``load`` s later: at its
        ``pods.startup_probe.failure_threshold``-th startup probe, if the model has not loaded by then (a probe at
        the load itself passes); None when a probe passes first, or no threshold is set. The prober's ticker runs
        from the pod's placement, across restarts, and probes a new container from the first tick after its start
        (a tick at the start itself found no container running yet, or was the probe that killed the last one;
        ``worker.go``, ``doProbe``: on hold until a new container ID, ``resultRun`` counting its failures)."""
        if self._startup_failures is None:
            return None
        first = self._next_probe(pod, now, self._startup_period)
        if first <= now + 1e-9:  # that tick's probe found no container yet (or was the one that killed the last)
            first += self._startup_period
        last = first + (self._startup_failures - 1) * self._startup_period
        return last if now + load > last + 1e-9 else None

    def _startup_probe_failed(self, ev: Timeout) -> None:
        """The container failed ``failure_threshold`` startup probes in a row: the kubelet kills it ("failed startup
        probe, will be restarted"), a crash of kind ``startup_probe``, restarted under CrashLoopBackOff."""
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.state == PodState.STARTING and pod.incarnation == incarnation:
            self.sim.faults.crash_pod(pod, "startup_probe")

    def _template_limits(self, revision: int, template: Rollout) -> SchedulerLimits:
        """The scheduler's limits of a template with engine flags (``pods.rollouts[].batching``), made once."""
        limits = self._limits.get(revision)
        if limits is None:
            assert template.batching is not None
            limits = self._limits[revision] = SchedulerLimits.from_settings(
                template.batching.apply(self.sim.scenario.batching))
        return limits

    def template_slowdown(self, pod: Pod) -> float:
        """How many times as long ``pod``'s model steps take for its template (``pods.rollouts[].slowdown``)."""
        template = self._templates[pod.revision]
        return 1.0 if template is None else template.slowdown

    def _template_exits(self, ev: Timeout) -> None:
        """A container of a broken template (``pods.rollouts[].crash_after_s``) exits: a crash of kind ``rollout``."""
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.incarnation == incarnation and pod.state in (PodState.STARTING, PodState.READY, PodState.TERMINATING):
            self.sim.faults.crash_pod(pod, "rollout")

    def _draw(self, d: Duration, stream: str) -> float:
        return draw_duration(d, self.sim.streams[stream])

    def _started(self, ev: Timeout) -> None:
        """The model is loaded: the pod is ready at its first passing readiness probe from now."""
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.state == PodState.STARTING and pod.incarnation == incarnation:
            now = self.sim.env.now
            pod.server_up = True  # its server answers (/metrics too) before its readiness probe passes
            self.nodes.model_loaded(self._node.get(pod.id), self._image[pod.revision])
            at = self._ready_at(pod, now)
            if at <= now:
                self._ready(pod, now)
            else:
                probe = Timeout(self.sim.env, at - now, (pod, incarnation))
                probe.callbacks.append(self._probe_passed)

    def _probe_passed(self, ev: Timeout) -> None:
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.state == PodState.STARTING and pod.incarnation == incarnation:
            self._ready(pod, self.sim.env.now)

    def _next_probe(self, pod: Pod, t: float, period: float | None = None) -> float:
        """The time of ``pod``'s first readiness probe (or probe every ``period`` s) at or after ``t``."""
        every = self._probe_period if period is None else period
        origin = self._probe_origin.get(pod.id, 0.0)
        k = math.ceil((t - origin) / every - 1e-9)
        return origin + max(k, 0) * every

    def _ready_at(self, pod: Pod, t: float) -> float:
        """When a pod whose model loaded at ``t`` is ready: at its first startup probe from ``t``, where the kubelet
        runs the readiness probe at once; if the session store is out then, at its first passing readiness probe."""
        started = self._next_probe(pod, t, self._startup_period)
        if any(a <= started < b for a, b in self._outages):
            return self._passing_probe(pod, started)
        return started

    def _passing_probe(self, pod: Pod, t: float) -> float:
        """The first probe at or after ``t`` that finds the session store up (``/readyz`` pings it)."""
        at = self._next_probe(pod, t)
        for a, b in self._outages:  # in time order
            if a <= at < b:
                at = self._next_probe(pod, b)
        return at

    def _ready(self, pod: Pod, now: float, join_after_s: float | None = None) -> None:
        """The Ready condition turns true at ``now``; the pod joins the endpoints after the propagation."""
        pod.state = PodState.READY
        pod.server_up = True
        pod.ready_s = now
        if pod.first_ready_s is None:
            pod.first_ready_s = now
        pod.probe_failing = False
        self._join_later(pod, self._propagation_s if join_after_s is None else join_after_s)
        if self._rs is not None:  # one more available pod: the rollout may move on
            self._sync_deployment(now)

    def _join_later(self, pod: Pod, after_s: float) -> None:
        if after_s <= 0.0:
            self._join(pod)
            return
        ev = Timeout(self.sim.env, after_s, (pod, pod.incarnation))
        ev.callbacks.append(self._join_event)

    def _join_event(self, ev: Timeout) -> None:
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.incarnation == incarnation:
            self._join(pod)

    def _join(self, pod: Pod) -> None:
        if pod.state == PodState.READY and not pod.probe_failing and not pod.routable:
            pod.routable = True
            self.endpoints.append(pod)
            self.endpoints.sort(key=lambda p: p.id)
            self.sim.router.touch(pod)
            if self.sim.client.held:  # a gateway held requests while the Service had no endpoint
                self.sim.client.release_held(self.sim.env.now)

    def _leave_endpoints(self, pod: Pod) -> None:
        pod.routable = False
        if pod in self.endpoints:
            self.endpoints.remove(pod)

    def _leave_later(self, pod: Pod, after_s: float) -> None:
        """A crashed or deleted pod leaves the endpoints ``after_s`` from now, unless it is ready again by
        then (a restarted container that passed its probe stays)."""
        if after_s <= 0.0 or not pod.routable:
            self._leave_endpoints(pod)
            return
        Timeout(self.sim.env, after_s, pod).callbacks.append(self._left)

    def _left(self, ev: Timeout) -> None:
        pod = cast(Pod, ev.value)
        if pod.routable and (pod.state != PodState.READY or pod.probe_failing):
            self._leave_endpoints(pod)

    # ---- readiness during a Redis outage --------------------------------------------------------------
    def _outage_begins(self, ev: Timeout) -> None:
        """Redis is out from now to ``end``: each ready pod fails ``failure_threshold`` probes in a row
        (if the outage lasts that long) and is not ready from the last of them."""
        start, end = cast(tuple[float, float], ev.value)
        env = self.sim.env
        for pod in list(self._alive.values()):
            if pod.state == PodState.READY and not pod.probe_failing:
                at = self._next_probe(pod, start) + (self._probe_failures - 1) * self._probe_period
                if at < end:
                    fail = Timeout(env, at - env.now, (pod, pod.incarnation))
                    fail.callbacks.append(self._probe_failed)

    def _probe_failed(self, ev: Timeout) -> None:
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.state != PodState.READY or pod.incarnation != incarnation or pod.probe_failing:
            return
        env = self.sim.env
        pod.probe_failing = True
        leave = Timeout(env, self._propagation_s, (pod, incarnation))
        leave.callbacks.append(self._leave_event)
        back = Timeout(env, self._passing_probe(pod, env.now) - env.now, (pod, incarnation))
        back.callbacks.append(self._probe_recovered)

    def _leave_event(self, ev: Timeout) -> None:
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.state == PodState.READY and pod.incarnation == incarnation and pod.probe_failing:
            self._leave_endpoints(pod)

    def _probe_recovered(self, ev: Timeout) -> None:
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.state == PodState.READY and pod.incarnation == incarnation and pod.probe_failing:
            self._ready(pod, self.sim.env.now)

    def crash(self, pod: Pod, now: float) -> None:
        """The pod's container dies at ``now`` (starting or serving): its requests fail; the kubelet
        restarts it after the CrashLoopBackOff delay, CRASHED until then."""
        if pod.id not in self._running or pod.state not in (PodState.READY, PodState.STARTING,
                                                              PodState.TERMINATING):
            return  # no container runs: still pulling its image, or waiting for a restart
        self._running.discard(pod.id)
        terminating = pod.state == PodState.TERMINATING
        if not terminating:  # a terminating pod is on its way out already
            self._leave_later(pod, self._crash_leave_s)
        held = self._kill(pod, now)
        teardown = self.sim.scenario.pods.crash_teardown_s
        if teardown > 0:  # its kernel still accepts until the process is gone; all of it fails then
            pod.teardown_until = now + teardown
            pod.dying = held
            Timeout(self.sim.env, teardown, (pod, held)).callbacks.append(self._torn_down)
        else:
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

    def _torn_down(self, ev: Timeout) -> None:
        """A crashed container's teardown ended (``pods.crash_teardown_s``): what it held at its crash and what
        it accepted since fail now (the connections reset), and it refuses from now on."""
        pod, dying = cast(tuple[Pod, list[int]], ev.value)
        if pod.dying is dying:
            pod.dying = []
        self.sim.client.pod_lost(pod, dying, self.sim.env.now, crashed=True)

    def _backoff_over(self, ev: Timeout) -> None:
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.state == PodState.CRASHED and pod.incarnation == incarnation:
            self._restart(pod, self.sim.env.now)

    def _restart(self, pod: Pod, now: float) -> None:
        self.restarts += 1
        self._restarts_of[pod.id] = self._restarts_of.get(pod.id, 0) + 1
        self._start_container(pod, now, restart=True)

    # ---- a node that dies --------------------------------------------------------------------------
    def node_failed(self, node: Node, now: float, duration_s: float | None = None) -> list[Pod]:
        """``node`` dies at ``now``; returns the pods it held. Their containers stop with it, but nothing says
        so: the requests they held, and those the endpoints still send them, get no answer (the client times
        out: ``Client.node_lost``, ``Client.blackhole``). The node lifecycle controller marks the node NotReady
        after ``cluster.node_monitor_grace_s`` and its pods not ready (until then their Ready condition holds:
        ``Pod.lost_ready``), which takes them out of the endpoints one propagation later. It taints the node
        through its zone's rate-limited queue (``capsim.sim.nodelifecycle``: perhaps never, in an unhealthy
        zone), and ``unreachable_toleration_s`` after the taint (``pods.unreachable_toleration_s``, the pods'
        own tolerations, when set) the taint manager evicts them and the ReplicaSet replaces them on other
        nodes (new ones if none is free), as it does when the cloud's node auto-repair deletes the node
        (``cluster.node_auto_repair_s``). Until then they count as
        replicas, so nothing replaces them sooner unless the HPA asks for more. A pod being deleted already
        goes at once. (``pkg/controller/nodelifecycle``: ``MarkPodsNotReady``, the NoExecute taint
        ``node.kubernetes.io/unreachable``; the DefaultTolerationSeconds admission plugin's 300 s;
        ``FilterActivePods`` in the ReplicaSet controller. Re-implemented, no code copied.)

        With ``duration_s`` (a network partition) the node is back that long after: its pods not evicted by
        then are ready again at once (their containers ran on; what they held is lost all the same) and
        rejoin the endpoints one propagation later, nothing is evicted after; pods evicted before leave the
        node with free GPUs, schedulable again."""
        spec = self.sim.scenario.cluster
        assert spec is not None
        self.nodes.fail(node, now)
        lost = self._pods_on(node, (*_DRAINED, PodState.TERMINATING))
        for pod in lost:
            # its Ready condition stays true until the node lifecycle controller marks it NotReady
            pod.lost_ready = pod.ready_condition
            self._running.discard(pod.id)
            held = self._kill(pod, now)
            pod.node_lost = True
            self.sim.client.node_lost(pod, held, now)
            if pod.state == PodState.TERMINATING:
                self._gone(pod, now)
            else:
                pod.state = PodState.CRASHED  # Running in the API, its container gone; no kubelet to restart it
        env = self.sim.env
        failure = self._lost[node.id] = (node, now, lost)
        Timeout(env, spec.node_monitor_grace_s, failure).callbacks.append(self._node_not_ready)
        if duration_s is not None:
            Timeout(env, duration_s, failure).callbacks.append(self._node_back)
        return lost

    # ---- a spot node the cloud reclaims ----------------------------------------------------------------
    def spot_interrupted(self, node: Node, now: float) -> None:
        """A spot node's interruption notice at ``now``: it is cordoned and drained (a termination handler
        deletes or evicts its pods, which drain within their grace period, and the ReplicaSet replaces them
        elsewhere); at the notice's end the node is gone (``node_gone``). ``cluster.spot.drain``: ``force``
        takes every pod at once; ``eviction`` only those the PodDisruptionBudget lets go, the rest retried."""
        node.interrupted_s = now
        self.nodes.reclaim(node, now)
        spot = self.sim.scenario.cluster.spot  # type: ignore[union-attr]
        if spot is not None and spot.drain == "eviction" and self.sim.scenario.pods.disruption_budget is not None:
            self._evict_allowed(node, now)
        else:
            self._evict(node, now)

    def _karpenter_drain(self, node: Node, now: float) -> None:
        """Karpenter's termination controller drains a node it deletes through the eviction API (the
        PodDisruptionBudget's refusals asked again), or, without a budget, evicts every pod at once."""
        if self.sim.scenario.pods.disruption_budget is not None:
            self._evict_allowed(node, now)
        else:
            self._evict(node, now)

    def _evict_allowed(self, node: Node, now: float) -> None:
        """kubectl drain's eviction loop (what AWS's Node Termination Handler and Karpenter run): each pod on
        ``node`` is evicted through the eviction API, which the PodDisruptionBudget refuses (429) while it
        allows no disruption; a refused one is asked again 5 s later (``drain.Helper``'s retry), until the
        node is gone. A pod not ready may go while the budget is met (``unhealthyPodEvictionPolicy:
        IfHealthyBudget``, the default)."""
        if node.removed_s is not None:
            return
        budget = self.sim.scenario.pods.disruption_budget
        assert budget is not None
        left = 0
        for pod in self._pods_on(node, _DRAINED):
            if pod.ready_condition:
                allowed = self._may_evict(1)
            else:
                allowed = self.desired > 0 and self.ready_count() >= budget.desired_healthy(self.desired)
            if allowed:
                self.terminate(pod, now)
            else:
                left += 1
        self.scale_to(self.desired, now)
        if left and node.removed_s is None:
            Timeout(self.sim.env, EVICTION_RETRY_S, node).callbacks.append(
                lambda ev: self._evict_allowed(cast(Node, ev.value), self.sim.env.now))

    def node_gone(self, node: Node, now: float) -> None:
        """A reclaimed node goes at ``now``: the pods still there die with it, their requests failed (logged as
        crashes of kind ``spot``): those draining, and those a PodDisruptionBudget kept from being evicted."""
        if self._pods_on(node, _DRAINED):  # deleted now with their node object: they leave the endpoints
            self._evict(node, now)  # and are replaced
        for pod in self._pods_on(node, (PodState.TERMINATING,)):
            self.sim.faults.crash_log.append((now, pod.id, "spot"))
            self._drain_cut(pod, now)

    def _node_not_ready(self, ev: Timeout) -> None:
        node, failed_s, lost = cast(tuple[Node, float, list[Pod]], ev.value)
        if node.failed_s != failed_s or node.removed_s is not None:
            return  # back before the controller noticed
        for pod in lost:
            pod.lost_ready = False  # MarkPodsNotReady
            if pod.state != PodState.GONE:
                self._leave_later(pod, self._propagation_s)
        assert self.nodes.lifecycle is not None
        self.nodes.lifecycle.mark_not_ready(node, self.sim.env.now)  # queued for the NoExecute taint
        repair_s = self.sim.scenario.cluster.node_auto_repair_s  # type: ignore[union-attr]
        if repair_s is not None:
            Timeout(self.sim.env, repair_s, ev.value).callbacks.append(self._node_repaired)

    def _node_repaired(self, ev: Timeout) -> None:
        """The cloud's node auto-repair deletes ``node``, NotReady for ``cluster.node_auto_repair_s``: the pods
        still there go with it (the pod garbage collector deletes a deleted node's pods) and are replaced, on
        free GPUs or on new nodes, whatever the taint queue did."""
        node, failed_s, lost = cast(tuple[Node, float, list[Pod]], ev.value)
        if node.failed_s != failed_s or node.removed_s is not None:
            return  # back, or removed by cluster-autoscaler, first
        now = self.sim.env.now
        for pod in lost:
            if pod.state != PodState.GONE:
                self.terminate(pod, now)
        self.nodes.repaired(node, now)
        self.scale_to(self.desired, now)

    def _node_tainted(self, node: Node, now: float) -> None:
        """The node lifecycle controller tainted ``node`` unreachable at ``now``: the taint manager evicts its
        pods their toleration later (``pods.unreachable_toleration_s``, the pods' own, or the cluster's
        default), unless the taint is gone by then."""
        failure = self._lost.get(node.id)
        if failure is None or failure[0].failed_s != failure[1]:
            return
        own = self.sim.scenario.pods.unreachable_toleration_s  # the pods' tolerations win over the default
        spec = self.sim.scenario.cluster
        assert spec is not None
        toleration = spec.unreachable_toleration_s if own is None else float(own)
        Timeout(self.sim.env, toleration, (failure, now)).callbacks.append(self._node_pods_evicted)

    def _node_pods_evicted(self, ev: Timeout) -> None:
        failure, tainted_s = cast(tuple[tuple[Node, float, list[Pod]], float], ev.value)
        node, failed_s, lost = failure
        lifecycle = self.nodes.lifecycle
        assert lifecycle is not None
        if node.failed_s != failed_s or not lifecycle.is_tainted(node, tainted_s):
            return  # back, or its taint removed, before the toleration ran out: nothing is evicted
        now = self.sim.env.now
        for pod in lost:
            if pod.state != PodState.GONE:
                self.terminate(pod, now)
        self.scale_to(self.desired, now)

    def _node_back(self, ev: Timeout) -> None:
        node, failed_s, lost = cast(tuple[Node, float, list[Pod]], ev.value)
        if node.failed_s != failed_s or node.removed_s is not None:
            return  # removed by cluster-autoscaler first: it stays gone
        now = self.sim.env.now
        down = self.nodes.zones_down.get(node.zone)
        if down is not None:  # its partition healed, but its zone is dark: back with the zone, if ever
            if not math.isinf(down):
                Timeout(self.sim.env, down - now, ev.value).callbacks.append(self._node_back)
            return
        self.nodes.healed(node)
        assert self.nodes.lifecycle is not None
        self.nodes.lifecycle.ready_again(node, now)
        for pod in lost:
            if pod.state == PodState.CRASHED and pod.node_lost:
                pod.node_lost = False
                self._running.add(pod.id)
                since = pod.ready_s if pod.lost_ready else None
                pod.lost_ready = False
                self._ready(pod, now)
                if since is not None:  # back before NotReady: its Ready condition never changed
                    pod.ready_s = since
        self._place(now)

    def terminate(self, pod: Pod, now: float) -> None:
        """Delete a pod: it leaves the endpoints, drains its queue, and is killed after the grace period."""
        if pod.state == PodState.PENDING:
            self._pending.remove(pod)
            pod.state = PodState.GONE
            self._forget(pod, now)
            return
        self.nodes.pod_event(self._node.get(pod.id), now)  # it begins terminating there
        if pod.state != PodState.READY:  # starting or crashed: nothing to drain
            self._kill(pod, now)
            self._gone(pod, now)
            return
        self._leave_later(pod, self._propagation_s)
        pod.state = PodState.TERMINATING
        if pod.outstanding == 0 and not pod.running:
            self._gone(pod, now)
            return
        ev = Timeout(self.sim.env, self.sim.scenario.pods.termination_grace_s, (pod, pod.incarnation))
        ev.callbacks.append(self._grace_over)

    def _grace_over(self, ev: Timeout) -> None:
        pod, incarnation = cast(tuple[Pod, int], ev.value)
        if pod.state == PodState.TERMINATING and pod.incarnation == incarnation:
            self._drain_cut(pod, self.sim.env.now)

    def _drain_cut(self, pod: Pod, now: float) -> None:
        """A terminating pod is killed before it drained (its grace period, or its node, ran out): what it
        still held fails, and it is gone."""
        held = self._kill(pod, now)
        self.sim.client.pod_lost(pod, held, now, crashed=False)
        self._gone(pod, now)

    def _kill(self, pod: Pod, now: float) -> list[int]:
        """``pod.kill``; a pod still in the endpoints (until they see it) is touched: the router's
        least-outstanding heap learns its count, now 0."""
        held = pod.kill(now)
        if pod.routable:
            self.sim.router.touch(pod)
        return held

    def pod_drained(self, pod: Pod, now: float) -> None:
        """A terminating pod finished its last batch."""
        self._gone(pod, now)

    def _gone(self, pod: Pod, now: float) -> None:
        pod.state = PodState.GONE
        pod.lost_ready = False
        self._forget(pod, now)
        self._running.discard(pod.id)
        self._release_gpu(pod, now)
        self.sim.client.pod_gone(pod, now)
        if self._rs is not None and isinstance(self._strategy, Recreate) and not self._alive:
            # the Deployment controller's deletePod: a Recreate Deployment left with no pod syncs at once
            self._sync_deployment(now)

    # ---- accounting ---------------------------------------------------------------------------------
    @property
    def live_pods(self) -> list[Pod]:
        """The pods not gone, by id: a run that replaces pods often (crashing nodes, spot reclaims) creates
        tens of thousands, and what looks at pods each event or sample looks at these."""
        return list(self._alive.values())

    def _forget(self, pod: Pod, now: float) -> None:
        """``pod`` is gone at ``now``: off the live pods, its busy seconds kept in ``gone_busy_s``."""
        if self._alive.pop(pod.id, None) is not None:
            self.gone_busy_s += pod.busy_total_s(now)
            if self.sim.autoscaling is not None:  # Prometheus keeps its series: range queries still read them
                self.sim.autoscaling.retire(pod)

    def container_running(self, pod: Pod) -> bool:
        """Whether ``pod``'s container runs: started, not crashed (the pod's phase is Running, not Pending)."""
        return pod.id in self._running

    def count(self, state: PodState) -> int:
        return sum(1 for p in self.pods if p.state == state)

    def gpus_held(self) -> int:
        """GPUs the pods hold now: placed, not yet gone (``tensor_parallel_size`` each)."""
        return sum(1 for p in self._alive.values() if p.gpu_since is not None) * self.nodes.pod_gpus

    def gpu_seconds(self, now: float) -> float:
        """GPU-seconds held by all pods up to ``now`` (each holds ``tensor_parallel_size`` GPUs)."""
        held = sum(p.gpu_s + (now - p.gpu_since if p.gpu_since is not None else 0.0) for p in self.pods)
        return held * self.nodes.pod_gpus


@dataclass(frozen=True)
class _Window:
    """What a canary's pods (or the old ones) did over a measurement's window (NaN: nothing observed)."""

    ttft_p99_s: float
    itl_mean_s: float
    error_rate: float


def _fails(value: float, old: float, limit: float, kind: str) -> bool:
    """One limit of a canary's measurement (``CANARY_LIMITS``) fails: the canary observed nothing (``value`` NaN), or
    it is over ``limit`` (``kind`` ``limit``), over ``limit`` times the old pods' ``old`` (``times``) or more than
    ``limit`` above it (``plus``); against the old pods it passes when they observed nothing (``old`` NaN)."""
    if math.isnan(value):
        return True
    if kind == "limit":
        return value > limit
    return not math.isnan(old) and value > (limit * old if kind == "times" else old + limit)

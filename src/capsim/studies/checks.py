"""Checks before deploy: settings of a scenario that cannot work, each named by its field path and reason.

``run_checks(scenario)`` is pure arithmetic on the scenario (and the mean batch times of its service
model, from the profile when it has one): no simulation, a millisecond or so, so ``tune`` runs it on
every candidate and ``capsim check`` gates CI on it. Each check below says what it compares and why the
setting cannot work; a ``fail`` finding is a setting that cannot work, a ``warn`` one is suspicious.

* ``hpa-target-unreachable``: a Pods metric can never rise far enough above its target to scale up. The
  HPA scales up only when value / target > 1 + scale-up tolerance (upstream
  ``pkg/controller/podautoscaler/replica_calculator.go``); a pod's queue depth never exceeds the queue
  capacity and its busy ratio never exceeds 1, so a target above ``bound / (1 + tolerance)`` never scales.
* ``max-wait-over-slo``: the batcher may hold the first request of a batch ``max_wait_ms`` before the
  batch starts; at light load every batch waits that long, so ``max_wait + first token of a one-request
  batch >= slo.ttft_p99_s`` misses the SLO for nearly every request.
* ``queue-below-batch``: a queue holding fewer requests than ``max_batch_size`` never fills a batch.
* ``client-timeout-below-batch``: a client that gives up before one batch at ``max_batch_size`` has run
  times out on every full batch (and retries into the next one). Full batches come under load, where
  every request arrives while a batch runs: the batch is longer by ``arrival_overhead_ms`` per request
  and a request reaches the queue ``ingress_ms`` late, so both count.
* ``max-replicas-over-gpus``: ``maxReplicas`` above the pods the cluster section can hold (whole nodes of
  ``node_gpus`` within ``max_gpus``, each holding ``node_gpus // tensor_parallel_size`` pods) leaves the
  extra pods Pending for ever.
* ``profile-gpu-memory`` (warn): a continuous scenario sizes its KV cache from ``batching.gpu_memory_gb``
  more than 1% away from the memory of the GPU its estimated profile was made for.
* ``profile-tensor-parallel`` (fail): an estimated profile made for N GPUs a pod
  (``capsim estimate-profile --tensor-parallel N``) in a scenario whose pods hold another number
  (``batching.tensor_parallel_size``): the step times would be one pod's and the GPUs another's.
* ``pdb-blocks-drains`` (warn): a PodDisruptionBudget (``pods.disruption_budget``) that allows no eviction
  even with all the HPA's floor of pods ready: cluster-autoscaler never drains a node with a pod.
* ``node-failure-no-room`` (warn): nodes can fail (``faults.node_failures`` or ``node_mtbf_s``) but
  ``cluster.max_gpus`` holds no node beyond those the fleet's peak (``maxReplicas`` or ``pods.replicas``, the larger)
  fills, or beyond ``pods.spread.min_nodes`` (then after a failure the spread places no new pod at all). A failed node counts toward ``max_gpus`` until cluster-autoscaler removes it
  (``scale_down_unready_time_s`` after it failed), so the evicted pods' replacements stay Pending until then.
* ``spread-over-gpus`` (fail): ``pods.spread.min_nodes`` more nodes than ``cluster.max_gpus`` holds: while
  fewer nodes than that are schedulable the spread counts the fewest pods on a node as 0, so each node
  takes at most ``max_skew`` pods and the rest of the peak stays Pending.
* ``spread-without-cluster`` (warn): ``pods.spread`` or ``pods.zone_spread`` without a ``cluster`` section,
  where every simulated pod has a node of its own and the spread changes nothing (the export still writes it).
* ``node-cache-without-cluster`` (warn): ``pods.node_model_cache`` without a ``cluster`` section: every simulated
  pod has a node of its own, so no new pod finds the model's files on its node (the export still mounts the hostPath).
* ``karpenter-evicts-all-at-once`` (warn): ``cluster.karpenter`` consolidating under ``WhenEmptyOrUnderutilized``
  without ``pods.disruption_budget``: a node whose pods fit elsewhere has all its serving pods evicted at once,
  and they start again cold; likewise a drifted node's (``cluster.karpenter.drift_at_s``) once its replacement is
  ready.
* ``karpenter-drift-no-room`` (warn): ``cluster.karpenter.drift_at_s`` with a ``cluster.max_gpus`` that holds no
  node beyond those the peak of pods fills: drift launches a replacement before it deletes a drifted node, so at
  the peak no full node can be replaced.
* ``spread-over-zones`` (fail): ``pods.zone_spread.min_zones`` more zones than ``cluster.zones``: each zone
  then takes at most ``max_skew`` pods and the rest of the peak stays Pending.
* ``zone-spread-one-zone`` (warn): ``pods.zone_spread`` in a cluster of one zone, where it changes nothing.
* ``zone-spread-empty-zones`` (warn): ``pods.zone_spread`` with neither ``min_zones`` nor
  ``cluster.min_nodes_per_zone``: a zone with no GPU node is no domain of the constraint, so the pods fill
  the zones that have nodes before cluster-autoscaler adds one elsewhere.
* ``spot-interruptions-without-spot`` (warn): ``faults.spot_interruptions`` without ``cluster.spot``: each is
  skipped (allowed so that a study's stress can apply to on-demand candidates).
* ``spot-eviction-outlasts-notice`` (warn): ``cluster.spot.drain: eviction`` under a PodDisruptionBudget that
  lets fewer of the floor's pods go at a time than a node holds: a reclaimed node's other pods wait for their
  replacements, and those still there at the notice's end die with it.
* ``spot-notice-below-grace`` (warn): ``pods.termination_grace_s`` above ``cluster.spot.notice_s``: a spot
  node goes at its notice's end, so a pod still draining then dies with it and what it runs fails.
* ``zone-failure-no-room`` (warn): a zone can fail (``faults.zone_failures``) but the nodes left beyond those
  the fleet's peak fills cannot hold the pods of the failed zone (its nodes count toward ``max_gpus`` until
  cluster-autoscaler removes them), or ``pods.zone_spread.min_zones`` takes every zone (after a zone fails
  fewer count, and each zone takes at most ``max_skew`` pods), or the cluster has one zone (nothing is left).
* ``zone-failure-halts-autoscaler`` (warn): a zone can fail and its nodes at the peak (with
  ``cluster.other_nodes_per_zone``) are more than ``ok_total_unready_count`` and
  ``max_total_unready_percentage`` of the cluster's: cluster-autoscaler halts while it is dark, so the
  evicted pods' replacements get no new node.
* ``scale-to-zero-cannot-wake`` (fail): ``minReplicas: 0`` (the HPA's ``HPAScaleToZero``, or KEDA's
  ``minReplicaCount``) or KEDA's ``idle_replica_count`` with no metric that has a value at zero pods: a pod
  metric summed over the Deployment's pods is 0 when there is none, so once at zero it never comes back and
  every later request fails. Only the gateway's counter (``capsim_gateway_requests_total``) counts requests that no pod took.
* ``keda-outage-to-zero`` (warn): a Deployment that goes to zero (``minReplicas: 0``, or KEDA's
  ``idle_replica_count``) under KEDA 2.16 (``keda.release``) with no ``fallback`` (or ``replicas: 0``), or
  under 2.17 and later with a ``fallback`` of ``replicas: 0``, in a scenario whose Prometheus outage
  (``faults.metrics_outages``) outlasts ``cooldown_period_s``: a poll whose queries fail finds no trigger
  active, so KEDA takes a serving Deployment to zero mid-outage (kedacore/keda#965) and nothing wakes it
  until Prometheus is back. An outage of every trigger's own source at once (``faults.trigger_outages``
  naming all the metrics, in one entry or in several that overlap: the overlap counts) counts as one of
  Prometheus, here and below; one of some triggers leaves the others to find activity. Outages that touch
  or overlap are one wait, their spans joined.
* ``keda-outage-at-zero`` (warn): KEDA 2.17 and later with ``minReplicas: 0`` (or idle mode) in a scenario
  with a Prometheus outage (or of every trigger's source): a Deployment at zero when the outage starts stays at zero until it ends, fallback or
  not (the operator changes nothing on a poll in error, and the HPA that applies the fallback is disabled
  at zero: kedacore/keda#7239), so requests that come meanwhile find no pod.
* ``stockout-at-wake`` (warn): a Deployment that goes to zero on nodes cluster-autoscaler removes when empty, in
  a scenario with GPU stockouts (``faults.gpu_stockouts``) and a wake budget (``slo.max_wake_s``) shorter than a
  wake that meets one takes at least: the failed ask (``cluster.stockout_error_s``, or ``max_node_provision_s``
  when never reported), the node group's first backoff (``initial_node_group_backoff_s``) and a new node's
  provisioning (``node_provision_s``).
* ``gpu-util-signal`` (warn): an HPA or KEDA trigger on a GPU's busy share (dcgm-exporter's ``DCGM_FI_DEV_GPU_UTIL``
  or ``DCGM_FI_PROF_GR_ENGINE_ACTIVE``, or ``capsim_gpu_busy_ratio``) on continuous-batching pods, which read busy
  whenever one request runs.
* ``cron-never-opens`` (warn): a KEDA cron trigger (``autoscaler.keda.cron``) whose window is never open in the run
  (from ``clock_start`` for ``horizon_s``): a schedule, a time zone or a clock that does not meet the load.
* ``cron-outside-bounds`` (warn): a cron trigger's ``desired_replicas`` above ``maxReplicas`` (the HPA holds the
  maximum) or not above the HPA's floor (it raises nothing; it only wakes a Deployment at zero).
* ``keda-empty-after-outage`` (warn): KEDA whose triggers all keep ``ignoreNullValues`` (``keda.ignore_null_values``,
  KEDA's default) in a scenario with a Prometheus outage: when Prometheus answers again each trigger's query is
  empty until it has scraped afresh (a rate twice), which KEDA reads as 0. A Deployment that goes to zero whose
  outage outlasts ``cooldown_period_s`` (and that the outage itself did not take to zero) is taken to zero at
  the first poll after, traffic or not; else, without a fallback, an outage longer than the HPA's scale-down
  window lets the HPA scale down to its minimum for those syncs (its failed reads left nothing in the window).
* ``keda-fallback-fractional-target`` (warn): a ``fallback`` on a target that is not a whole number under KEDA
  2.17 or 2.16 (``keda.release``): their fallback value is ``int(target) x replicas``, so the HPA proposes
  ``ceil(int(target) x replicas / target)`` pods (none for a target below 1), not ``replicas``; fires when the
  two differ.
* ``keda-formula-idle`` (warn): a ``keda.scaling_modifiers`` formula whose run fails, or gives no finite number,
  with every trigger at 0 (a division by a trigger, ``%`` by one): each HPA read of the composite fails while
  there is no traffic, so the HPA holds its count (no scale-down) and KEDA finds the ScaledObject not active.
* ``keda-fallback-sum`` (warn): a ``keda.fallback`` with ``keda.scaling_modifiers`` and more than one Prometheus
  trigger: in an outage (or past ``failure_threshold`` failed reads of several triggers) KEDA 2.17 and 2.18 skip
  the formula and answer each failed trigger's fallback value, which the HPA sums: it proposes the triggers times
  ``fallback.replicas`` (kedacore/keda#5371; 2.20 answers one, ``keda.release: "2.20"``).
* ``scale-down-window-below-lag``: a scale-down stabilization window shorter than the age of the data
  the HPA reads (one scrape interval plus the adapter lag) scales down on stale numbers.
* ``rate-window-short`` (warn): a query built on ``rate()`` (a counter's, a histogram's mean or quantile) over a
  window shorter than two scrape intervals: some reads hold one sample, so a pod has no value (a rate needs two).
* ``ttft-target-over-slo`` (warn): an HPA that targets a mean TTFT above the p99 SLO scales only once
  the SLO is already broken.
* ``service-model`` (fail): the service model cannot give a batch time (profile missing or out of range).
* ``continuous-only-setting`` (warn): ``service.cached_token_us`` set in a static-batching scenario, where
  the simulator ignores it (``service.answer_ms`` applies to both modes since stop 38).
* ``static-only-setting`` (warn): ``service.answer_per_request_ms`` or ``service.first_token_scale`` set in
  a continuous-batching scenario, where the simulator ignores it.
* ``rollout-no-room`` (warn): ``pods.rollouts`` under a ``pods.rolling_update`` whose ``max_unavailable`` resolves to
  0 at the plan's most pods, on node groups (``cluster.max_gpus``) that hold no pod more: a rollout that starts
  there never ends (its first surge pod stays Pending and no old pod leaves for it).
* ``rollout-budget-short`` (warn): a deploy budget (``slo.max_rollout_s``) shorter than the least a rollout of the
  plan's floor takes: waves of maxSurge + maxUnavailable pods, each at least the shortest cold start (a constant,
  a uniform's bottom) plus ``pods.min_ready_s`` (under ``pods.strategy: Recreate``, one wave of every pod).
* ``rollout-timeout-short`` (warn): a pipeline timeout (``pods.undo_after_s``) shorter than the least a rollout of
  the plan's floor takes (as ``rollout-budget-short`` counts it): every deploy, good or not, is undone.
* ``rollout-deadline-short`` (warn): ``pods.rollouts`` with a ``pods.progress_deadline_s`` shorter than a good
  rollout's longest step without progress, a new pod's creation to its being available: the image pull (a new image),
  the longest cold start (a uniform's top, a lognormal's 99.9th percentile), a startup probe period and
  ``pods.min_ready_s``; Kubernetes reports such a rollout stalled, and ``pods.undo_on_deadline`` undoes it.
* ``startup-probe-short`` (fail or warn): a startup probe ``failure_threshold`` set (``pods.startup_probe``) that
  kills slow starts. A container's probes run on the pod's ticker, the first after its start, so its model has
  between (threshold - 1) and threshold periods to load: a cold start longer than that is killed by the kubelet and
  restarted under CrashLoopBackOff, its restart taking ``pods.restart_startup_s`` where set. ``fail`` when the
  shortest cold start (a constant, a uniform's bottom) is longer than threshold periods (a uniform's bottom equal to
  it too), and so is the shortest restart: every start is killed and no new or restarted pod ever serves; ``warn``
  when every first start is killed but a restart may pass (a new pod serves only from its restart, or with
  ``pods.node_model_cache`` from a warm start on a node that ran the model), or when the
  longest start or restart (a uniform's top, a lognormal's 99.9th percentile) is longer than threshold - 1 periods.
* ``deadline-under-autoscaler`` (warn): ``pods.undo_on_deadline`` without ``pods.undo_after_s`` under an autoscaler:
  each scale mid-rollout is progress, so a broken rollout under a busy HPA may never reach its deadline.
* ``undo-while-paused`` (warn): a pipeline timeout (``pods.undo_after_s``) that falls while ``pods.rollouts`` keep
  the Deployment paused: kubectl refuses to undo a paused Deployment, so a broken canary stays (unless a look at the
  canary during the pause, ``restart_poll_s`` or ``check_interval_s``, resumes and undoes it first: said so).
* ``pause-holds-no-canary`` (warn): ``pods.rollouts`` pause a deploy under ``Recreate`` or a maxSurge of the whole
  fleet: the first sync gives the new ReplicaSet every replica, and a working version finishes inside the pause.
* ``canary-window-before-ready`` (warn): a resume whose latency check (``undo_if_ttft_p99_over_s``,
  ``undo_if_ttft_p99_over_baseline``, the ITL's; with ``check_interval_s``, its first measurement of the pause)
  looks back ``check_window_s`` to before the canary's pods can all be ready
  (the pause plus a new pod's longest way to ready: the new image's pull, the longest cold start, a startup
  probe period, ``pods.min_ready_s``): the window holds their first requests, which the router treats unlike a warm
  pod's (least outstanding sends a burst to a new pod: the canary's TTFT reads slow; round robin gives it no
  backlog: it reads fast; an emptier batch makes its inter-token latency read fast), so the check judges the
  router, not the version; a check before they can be ready may find no answer, and fails.
* ``restart-poll-never-looks`` (warn): a resume's ``restart_poll_s`` as long as its pause or longer: the pipeline's
  first look would come at or after the resume, so the poll never looks and a broken canary waits for the resume.
* ``analysis-never-measures`` (warn): a resume's ``check_interval_s`` whose first measurement (the pause plus
  ``check_initial_delay_s``) comes at or after the resume: the latency is measured once, at the resume, and
  ``check_failure_limit`` above 0 can never be passed, so the canary is never undone by a measurement.
* ``error-gate-in-store-outage`` (warn): a resume's error-rate check against a fixed limit
  (``undo_if_error_rate_over``) with a measurement whose window (``check_window_s`` back from it) holds a session
  store's outage (``faults.redis_outages``, with ``state.store: redis``): every pod's store writes fail then, the old
  pods' as the canary's, so the check reads the outage as the canary's errors; one against the old pods'
  (``undo_if_error_rate_over_baseline_by``) does not.
* ``ejection-in-store-outage`` (warn): a session store's outage (``faults.redis_outages``, ``state.store: redis``)
  behind a router whose outlier ejection counts the pods' own 5xx (least outstanding or prefix-aware,
  ``router.outlier_ejection.count_answered_5xx``, Envoy's default): every pod answers 503 to each turn it cannot
  read, so the first pods to fail five in a row are ejected for ``base_ejection_s`` and stay out after the store is
  back; counting only the proxy's own failures ejects a crashed pod as before and none in the outage.
* ``ejection-inert-at-floor`` (warn): outlier ejection by Envoy's own rule (``always_eject_one_host: false``, all an
  Istio DestinationRule can say) at a ``max_ejection_percent`` under one pod of the plan's floor: Envoy since 1.27
  ejects a pod only if, with it, at most that share of the pods are out, so a failing pod of that fleet is never
  ejected; the finding names the whole percentage that ejects one at the floor.
* ``gateway-errors-under-autoscaler`` (warn): a resume's error-rate check that counts the gateway's codes
  (``error_rate_source: gateway``, the default) on a canary whose pause an autoscaler may scale down through
  (``minReplicas`` below ``maxReplicas``): the ReplicaSets' shares take canary pods too, and a pod on its way out of
  the endpoints refuses what it is sent, which the gateway counts as the canary's errors; the pods' own count
  (``error_rate_source: pod``) leaves the refusals out.
* ``requests-unservable`` (warn): continuous batching whose ``max_model_len``, or KV cache, turns away a share of
  the workload's requests (prompt plus answer, drawn from ``workload.prompt_tokens`` and ``output_tokens``; one in a
  thousand or more): the scenario's own settings, or a deploy's engine flags (``pods.rollouts[].batching``). The pod
  rejects them as unservable (vLLM's 400), an error every latency reads fast. Not for traces or growing sessions
  (their contexts follow ``sessions.on_context_overflow``).
* ``recreate-outage`` (warn): ``pods.rollouts`` under ``pods.strategy: Recreate``: every rollout takes all the old pods
  down before it creates a new one, so no pod serves for at least the shortest cold start; what is sent then
  waits for the client's timeout and fails (the run counts it).
* ``estimated-profile`` (warn): the service profile was estimated (``capsim estimate-profile``, a roofline
  of the GPU's datasheet), not measured: its efficiencies and step overhead are assumptions.

The batch checks (max wait, queue below batch, client timeout, service model) apply to static batching
(``batching.mode: static``, the default); continuous batching has no max wait or batch size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from capsim.model.profile import ProfileError, ServiceTimeProfile
from capsim.model.scenario import (
    DCGM_METRIC_KINDS,
    METRIC_TYPES,
    POD_METRIC_ALIASES,
    Autoscaler,
    ClusterSpec,
    Rollout,
    Scenario,
    Tokens,
    TraceArrivals,
    metric_kind,
)
from capsim.model.scenario_limits import max_pods, min_pods
from capsim.policy.keda import release_at_least
from capsim.policy.keda_formula import FormulaError
from capsim.policy.outlier import ejects_one_of, fewest_ejecting, fewest_percent
from capsim.policy.rollout import RollingUpdate
from capsim.sim.faults import merged_spans

Level = Literal["fail", "warn"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem: the dotted field path (as ``Scenario.override`` takes it) and the reason."""

    path: str
    message: str
    level: Level = "fail"
    check: str = ""

    def __str__(self) -> str:
        return f"{self.level.upper()} {self.path}: {self.message}"


def failed(findings: Iterable[Finding]) -> bool:
    """True when any finding is a failure (``warn`` findings do not fail)."""
    return any(f.level == "fail" for f in findings)


def run_checks(scenario: Scenario) -> list[Finding]:
    """Every check on ``scenario``; an empty list means none fired."""
    findings: list[Finding] = []
    findings += _hpa_targets(scenario)
    findings += _gpu_util_signal(scenario)
    # max wait, batch size and a batch's time are static batching's; continuous batching schedules per step
    if scenario.batching.mode == "static":
        findings += _queue_capacity(scenario)
        times = _BatchTimes.of(scenario)
        if isinstance(times, Finding):
            findings.append(times)
        else:
            findings += _max_wait(scenario, times)
            findings += _client_timeout(scenario, times)
        findings += _continuous_only(scenario)
    else:
        findings += _static_only(scenario)
    findings += _estimated_profile(scenario)
    findings += _gpus(scenario)
    findings += _disruption_budget(scenario)
    findings += _node_failure_room(scenario)
    findings += _spread_over_gpus(scenario)
    findings += _node_cache_without_cluster(scenario)
    findings += _karpenter_evicts_all_at_once(scenario)
    findings += _karpenter_drift_no_room(scenario)
    findings += _zones(scenario)
    findings += _spot(scenario)
    findings += _scale_down_window(scenario)
    findings += _rate_window(scenario)
    findings += _scale_to_zero(scenario)
    findings += _keda_fallback(scenario)
    findings += _keda_cron(scenario)
    findings += _stockout_at_wake(scenario)
    findings += _rollout_room(scenario)
    findings += _rollout_budget(scenario)
    findings += _recreate_outage(scenario)
    findings += _rollout_deadline(scenario)
    findings += _startup_probe_short(scenario)
    findings += _undo_while_paused(scenario)
    findings += _pause_holds_no_canary(scenario)
    findings += canary_window_before_ready(scenario)
    findings += _restart_poll_never_looks(scenario)
    findings += _analysis_never_measures(scenario)
    findings += _error_gate_in_store_outage(scenario)
    findings += _ejection_in_store_outage(scenario)
    findings += _ejection_inert_at_floor(scenario)
    findings += _gateway_errors_under_autoscaler(scenario)
    findings += requests_unservable(scenario)
    findings += _deadline_under_autoscaler(scenario)
    return findings


def _estimated_profile(scenario: Scenario) -> list[Finding]:
    """A warning when the scenario's profile is a roofline estimate, and a failure when the estimate is for
    another number of GPUs a pod than the scenario's (an unreadable profile is the service model check's)."""
    from capsim.model.roofline import is_estimate

    svc = scenario.service
    if svc.kind != "profile" or svc.profile is None:
        return []
    path = scenario.resolve(svc.profile)
    try:
        profile = _load_profile(str(path.resolve()), path.stat().st_mtime_ns)
    except (OSError, ProfileError):
        return []
    if not is_estimate(profile):
        return []
    est = profile.metadata["estimate"]
    gpu = est.get("gpu", {})
    tp, pod_tp = int(est.get("tensor_parallel", 1)), scenario.batching.tensor_parallel_size
    # the all-reduces' latency is a published measurement's, not an assumption, but still not this GPU's
    link = f", {gpu.get('link_latency_us', 0.0):g} us an all-reduce" if tp > 1 else ""
    findings = [Finding("service.profile", f"{svc.profile} is estimated by a {est.get('method', 'roofline')} of "
                        f"{gpu.get('name', 'a GPU')}'s datasheet, not measured (mfu {gpu.get('mfu')}, mbu "
                        f"{gpu.get('mbu')}, {gpu.get('step_overhead_ms')} ms a step assumed{link}): measure the "
                        "GPU before deploying on this plan", level="warn", check="estimated-profile")]
    if tp != pod_tp:
        findings.append(Finding(
            "batching.tensor_parallel_size", f"{pod_tp}, but {svc.profile} estimates pods of {tp} GPU"
            f"{'s' if tp > 1 else ''} (--tensor-parallel {tp}): set it to {tp}, or estimate the profile for "
            f"{pod_tp}", check="profile-tensor-parallel"))
    memory, gib = scenario.batching.gpu_memory_gb, gpu.get("memory_gib")
    if scenario.batching.mode == "continuous" and memory is not None and gib and abs(memory - gib) > 0.01 * gib:
        findings.append(Finding(
            "batching.gpu_memory_gb", f"{memory:g} GiB, but {svc.profile} estimates {gpu.get('name', 'a GPU')} of "
            f"{gib:g} GiB: the KV cache is sized for another GPU than the step times", level="warn",
            check="profile-gpu-memory"))
    return findings


def _continuous_only(scenario: Scenario) -> list[Finding]:
    """Settings only the continuous pod reads, set in a static scenario (``run_checks`` calls it for those)."""
    svc = scenario.service
    return [Finding(f"service.{name}", f"{value} is ignored: only continuous batching (batching.mode: continuous) "
                    "reads it", level="warn", check="continuous-only-setting")
            for name, value, default in (("cached_token_us", svc.cached_token_us, 0.0),) if value != default]


def _static_only(scenario: Scenario) -> list[Finding]:
    """Settings only the static pod reads, set in a continuous scenario (``run_checks`` calls it for those)."""
    svc = scenario.service
    return [Finding(f"service.{name}", f"{value} is ignored: only static batching (batching.mode: static) "
                    "reads it", level="warn", check="static-only-setting")
            for name, value, default in (("answer_per_request_ms", svc.answer_per_request_ms, 0.0),
                                         ("first_token_scale", svc.first_token_scale, 1.0)) if value != default]


# ---- the service model's mean batch times -----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _BatchTimes:
    """Mean (prefill_s, total_s) of a batch of the workload's mean request, by size, as the pod runs it."""

    scenario: Scenario
    profile: ServiceTimeProfile | None

    @classmethod
    def of(cls, scenario: Scenario) -> _BatchTimes | Finding:
        svc = scenario.service
        if svc.kind != "profile":
            return cls(scenario, None)
        assert svc.profile is not None
        path = scenario.resolve(svc.profile)
        if not path.exists():
            from capsim.paths import shipped_hint

            return Finding("service.profile", f"profile file not found: {path}{shipped_hint(path)}",
                           check="service-model")
        try:
            profile = _load_profile(str(path.resolve()), path.stat().st_mtime_ns)
        except (OSError, ProfileError) as exc:
            return Finding("service.profile", f"cannot read the profile {path}: {exc}", check="service-model")
        times = cls(scenario, profile)
        try:
            times.at(scenario.batching.max_batch_size)
        except ProfileError as exc:
            return Finding("service.profile", f"no batch time at batching.max_batch_size: {exc}",
                           check="service-model")
        return times

    def at(self, size: int) -> tuple[float, float]:
        """Mean seconds to the first token and to the end of a batch of ``size`` mean requests, with the
        calibration's terms as the simulator applies them (``capsim.sim.service.calibrated``)."""
        from capsim.sim.service import calibrated

        wl = self.scenario.workload
        return calibrated(self, self.scenario.service).batch_time(
            size, _mean_tokens(wl.prompt_tokens), _mean_tokens(wl.output_tokens))

    def batch_time(self, size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
        """The uncalibrated mean batch (a ``ServiceModel``): the profile's, or ``mean_s`` for both."""
        svc = self.scenario.service
        if self.profile is None:
            assert svc.mean_s is not None
            return svc.mean_s, svc.mean_s  # exponential and deterministic: the answer comes at the end
        bt = self.profile.batch_timing(size, prompt_tokens, output_tokens, extrapolate=svc.extrapolate)
        return bt.prefill_s, bt.total_s


@functools.lru_cache(maxsize=16)
def _load_profile(path: str, mtime_ns: int) -> ServiceTimeProfile:
    # keyed by the modification time too, so an edited profile is read again
    return ServiceTimeProfile.from_csv(Path(path))


def _mean_tokens(tokens: Tokens) -> int:
    if tokens.kind == "constant":
        return tokens.value
    mean = round(tokens.mean)
    return max(1, min(mean, tokens.max) if tokens.max is not None else mean)


# ---- the checks ---------------------------------------------------------------------------------------
def _gpu_util_signal(scenario: Scenario) -> list[Finding]:
    auto = scenario.autoscaler
    if auto is None or scenario.batching.mode != "continuous":
        return []
    out = []
    for i, m in enumerate(auto.to_hpa().metrics):
        if POD_METRIC_ALIASES.get(m.name) in DCGM_METRIC_KINDS | {"busy"}:
            out.append(Finding(
                f"autoscaler.metrics.{i}", f"{m.name} on continuous-batching pods: the engine steps whenever one "
                "request runs, so the GPU reads busy at a fraction of what it can serve, and the HPA holds pods for "
                "it (on the H100 rush, 2 to 3 times the cost of one on vLLM's waiting requests: docs/studies.md, "
                "\"Scaling on GPU utilisation\"); scale on vllm:num_requests_waiting, vllm:num_requests_running or "
                "vllm:kv_cache_usage_perc, with a floor for a known rush", level="warn", check="gpu-util-signal"))
    return out


def _hpa_targets(scenario: Scenario) -> list[Finding]:
    auto = scenario.autoscaler
    if auto is None:
        return []
    hpa = auto.to_hpa()
    up_tol = hpa.metric_tolerance.scale_up
    batching = scenario.batching
    out: list[Finding] = []
    for i, metric in enumerate(hpa.metrics):
        if metric.type != "Pods":  # an External metric's target is a total (or a share of one), not a pod's
            continue
        kind = POD_METRIC_ALIASES[metric.name]
        path = f"autoscaler.metrics.{i}.pods.target.averageValue"
        if kind == "queue_depth":
            bound, what = float(batching.queue_capacity), f"batching.queue_capacity ({batching.queue_capacity})"
        elif kind in ("busy", "gr_active"):
            bound, what = 1.0, "1 (the share of time the model runs)"
        elif kind == "gpu_util":
            bound, what = 100.0, "100 (percent of the time a kernel runs)"
        else:
            if kind == "ttft" and metric.target > scenario.slo.ttft_p99_s:
                out.append(Finding(
                    path, f"a mean TTFT target of {metric.target:g} s is above slo.ttft_p99_s "
                    f"({scenario.slo.ttft_p99_s:g} s): the HPA scales up only once the SLO is already broken",
                    level="warn", check="ttft-target-over-slo"))
            continue
        reach = bound / (1.0 + up_tol)
        if metric.target >= reach:
            out.append(Finding(
                path, f"{metric.name} can never exceed {what}, and the HPA scales up only when the value "
                f"is above target x (1 + tolerance {up_tol:g}); a target of {metric.target:g} needs a value "
                f"above {metric.target * (1 + up_tol):g}, so it never scales up (keep it below {reach:.4g})",
                check="hpa-target-unreachable"))
    return out


def _max_wait(scenario: Scenario, times: _BatchTimes) -> list[Finding]:
    wait_s = scenario.batching.max_wait_s
    first_s, _ = times.at(1)
    slo = scenario.slo.ttft_p99_s
    if wait_s + first_s < slo:
        return []
    return [Finding(
        "batching.max_wait_ms", f"a batch may wait {wait_s:g} s for company and its first token then takes "
        f"{first_s:.4g} s even with one request: {wait_s + first_s:.4g} s, no room under slo.ttft_p99_s "
        f"({slo:g} s); keep max_wait_ms below {max(slo - first_s, 0.0) * 1000:.4g}", check="max-wait-over-slo")]


def _queue_capacity(scenario: Scenario) -> list[Finding]:
    b = scenario.batching
    if b.queue_capacity >= b.max_batch_size:
        return []
    return [Finding(
        "batching.queue_capacity", f"{b.queue_capacity} is below batching.max_batch_size ({b.max_batch_size}): "
        "the queue can never hold a full batch", check="queue-below-batch")]


def _client_timeout(scenario: Scenario, times: _BatchTimes) -> list[Finding]:
    size = scenario.batching.max_batch_size
    _, total_s = times.at(size)
    svc = scenario.service
    # under load each request lands on a running batch (lengthening it) and waits ingress_ms to be queued
    total_s += (size * svc.arrival_overhead_ms + svc.ingress_ms) / 1000.0
    timeout = scenario.client.timeout_s
    if timeout > total_s:
        return []
    return [Finding(
        "client.timeout_s", f"{timeout:g} s is not longer than one batch at batching.max_batch_size ({size}): "
        f"{total_s:.4g} s for the workload's mean request (with the per-arrival overhead and ingress delay under "
        "load); every full batch times out",
        check="client-timeout-below-batch")]


def _gpus(scenario: Scenario) -> list[Finding]:
    auto, cluster = scenario.autoscaler, scenario.cluster
    if auto is None or cluster is None:
        return []
    tp = scenario.batching.tensor_parallel_size
    holds = cluster.pods_held(tp)
    if auto.max_replicas <= holds:
        return []
    each = "one GPU" if tp == 1 else f"{tp} GPUs (batching.tensor_parallel_size)"
    return [Finding(
        "autoscaler.maxReplicas", f"{auto.max_replicas} pods of {each} each, but the cluster holds {holds} "
        f"(cluster.max_gpus {cluster.max_gpus} in whole nodes of {cluster.node_gpus}"
        + (f", at most {cluster.max_gpus_per_zone} in each of {cluster.zones} zones"
           if cluster.max_gpus_per_zone is not None else "") + "): the rest stay Pending",
        check="max-replicas-over-gpus")]


def _rollout_room(scenario: Scenario) -> list[Finding]:
    """A rolling update that may take no pod down (maxUnavailable 0 at the plan's most pods) where the node groups
    hold no pod more: its first surge pod stays Pending, no old pod leaves for it, and the rollout never ends."""
    cluster, ru = scenario.cluster, scenario.pods.rolling_update
    if cluster is None or not scenario.pods.template_changes or scenario.pods.strategy == "Recreate":
        return []
    peak = max_pods(scenario)
    held = cluster.pods_held(scenario.batching.tensor_parallel_size)
    if RollingUpdate(ru.max_surge, ru.max_unavailable).unavailable(peak) > 0 or peak < held:
        return []
    return [Finding(
        "pods.rolling_update.max_unavailable", f"{ru.max_unavailable} takes no pod down at the plan's most, {peak} pods, "
        f"and the cluster holds {held} (cluster.max_gpus {cluster.max_gpus}): a rollout (pods.rollouts) then finds no "
        "GPU for its first surge pod, no old pod leaves for it, and it never ends; allow one pod down "
        "(max_unavailable 1) or leave room for the surge (docs/simulator.md, \"Rolling updates\")",
        level="warn", check="rollout-no-room")]


def _rollout_budget(scenario: Scenario) -> list[Finding]:
    """A deploy budget (``slo.max_rollout_s``) or a pipeline timeout (``pods.undo_after_s``) shorter than the least a
    rollout of the plan's floor can take: its pods move in waves of maxSurge + maxUnavailable, each at least the
    shortest cold start (``pods.startup_s``: a constant, or a uniform's bottom; a lognormal has none) plus
    ``pods.min_ready_s``."""
    pods = scenario.pods
    low = _shortest_start(scenario)
    n = min_pods(scenario)
    if not pods.template_changes or n == 0 or low + pods.min_ready_s == 0:
        return []
    ru = RollingUpdate(pods.rolling_update.max_surge, pods.rolling_update.max_unavailable)
    recreate = pods.strategy == "Recreate"
    step = n if recreate else ru.surge(n) + ru.unavailable(n)
    waves = -(-n // step)
    least = waves * (low + pods.min_ready_s)
    how = ("Recreate" if recreate
           else f"maxSurge {pods.rolling_update.max_surge}, maxUnavailable {pods.rolling_update.max_unavailable}")
    why = (f"a rollout of the floor's {n} pods moves {step} at a time ({how}): {waves} wave{'s' if waves > 1 else ''} "
           f"of at least {low + pods.min_ready_s:g} s (the shortest cold start"
           + (" and minReadySeconds" if pods.min_ready_s else "") + f"), {least:g} s")
    fix = ("a Recreate rollout is one wave: only a faster cold start shortens it" if recreate
           else "surge more pods or allow more down")
    out = []
    budget = scenario.slo.max_rollout_s
    if budget is not None and least > budget:
        out.append(Finding("slo.max_rollout_s", f"{budget:g} s, but {why}: every deploy misses the SLO; {fix}",
                           level="warn", check="rollout-budget-short"))
    timeout = pods.undo_after_s
    if timeout is not None and least > timeout:
        out.append(Finding("pods.undo_after_s", f"{timeout:g} s, but {why}: the pipeline undoes every deploy, good "
                           f"or not; give it longer, or {fix}", level="warn", check="rollout-timeout-short"))
    return out


def _shortest_start(scenario: Scenario) -> float:
    """The shortest cold start ``pods.startup_s`` allows: a constant, a uniform's bottom; a lognormal has none (0)."""
    return scenario.pods.startup_s.range_s[0]


def _rollout_deadline(scenario: Scenario) -> list[Finding]:
    """A progress deadline shorter than a good rollout's longest step: between a new pod's creation and its being
    available nothing progresses (``DeploymentProgressing``), and that takes up to the image pull (a new image),
    the longest cold start, a startup probe period and ``min_ready_s``."""
    pods = scenario.pods
    if not pods.template_changes:
        return []
    step, parts = _to_available(scenario, any(r.new_image and r.action == "deploy" for r in pods.rollouts))
    if pods.progress_deadline_s >= step:
        return []
    then = ("; with pods.undo_on_deadline the pipeline undoes it: every deploy is rolled back" if pods.undo_on_deadline
            else "; `kubectl rollout status` fails though the rollout is fine")
    return [Finding(
        "pods.progress_deadline_s", f"{pods.progress_deadline_s} s, but a good rollout's new pod may take {step:g} s "
        f"from its creation to available ({', '.join(parts)}; a node to provision comes on top), with no progress "
        f"meanwhile: Kubernetes reports the rollout stalled (ProgressDeadlineExceeded){then}", level="warn",
        check="rollout-deadline-short")]


def _startup_probe_short(scenario: Scenario) -> list[Finding]:
    """A startup probe ``failure_threshold`` too short for the cold start: the kubelet kills a container whose model
    has not loaded after threshold failed probes, which is (threshold - 1) to threshold periods from its start. A
    restart in place takes ``pods.restart_startup_s`` where set, so a pod whose first start is always killed may
    still serve from its restart."""
    pods = scenario.pods
    probe = pods.startup_probe
    n = probe.failure_threshold
    if n is None:
        return []
    period = float(probe.period(pods.readiness_probe))
    (low, high), (again_low, again_high) = pods.startup_s.range_s, pods.restart_start.range_s
    warm = pods.restart_startup_s is not None
    safe, doomed = (n - 1) * period, n * period
    window = f"{n} probes every {period:g} s give a model {safe:g} to {doomed:g} s to load (by the probe's phase)"
    slowest = max(high, again_high)
    fix = f"set it to at least {probe.outlasting(pods.readiness_probe, slowest)} (or unset, and the export writes that)"
    backoff = pods.crash_loop_backoff

    def all_killed(lo: float, hi: float) -> bool:  # a spread from the last probe's instant: all later
        return lo > doomed or (lo == doomed and hi > lo)

    if all_killed(low, high) and all_killed(again_low, again_high):
        shortest = f"the shortest cold start (pods.startup_s) is {low:g} s" + (
            f" and the shortest restart (pods.restart_startup_s) {again_low:g} s" if warm else "")
        return [Finding("pods.startup_probe.failure_threshold",
                        f"{n}, but {window}, and {shortest}: the kubelet "
                        f"kills every start, and no new or restarted pod ever serves; {fix}", check="startup-probe-short")]
    retry = (f"each try a restart of {again_low:g} to {again_high:g} s (pods.restart_startup_s)" if warm
             else "each try a new cold start")
    if all_killed(low, high):
        node = (", or from a warm start on a node that ran the model (pods.node_model_cache)" if pods.node_model_cache
                else "")
        return [Finding("pods.startup_probe.failure_threshold",
                        f"{n}, but {window}, and the shortest cold start (pods.startup_s) is {low:g} s: the kubelet "
                        f"kills every first start, {safe:g} to {doomed:g} s in, so a new pod serves only from a "
                        f"restart ({retry}){node}; {fix}", level="warn", check="startup-probe-short")]
    if slowest > safe:
        slow = (f"a cold start (pods.startup_s) may take {high:g} s" if high > safe
                else f"a restart (pods.restart_startup_s) may take {again_high:g} s")
        return [Finding("pods.startup_probe.failure_threshold",
                        f"{n}, but {window}, and {slow}: the kubelet kills "
                        f"the slower starts and restarts them under CrashLoopBackOff (at once, then {backoff.initial_s:g}, "
                        f"{2 * backoff.initial_s:g} ... {backoff.max_s:g} s after, {retry}) "
                        f"until one loads in time; {fix}", level="warn",
                        check="startup-probe-short")]
    return []


def _to_available(scenario: Scenario, new_image: bool) -> tuple[float, list[str]]:
    """The longest a new pod of a rollout takes from its creation to available, and its parts as words: the image
    pull (``new_image``), the longest cold start, a startup probe period (the readiness probe runs as it passes)
    and ``pods.min_ready_s``."""
    pods = scenario.pods
    pull = pods.image_pull_s.range_s[1] if new_image else 0.0
    start, probe = pods.startup_s.range_s[1], float(pods.startup_probe.period(pods.readiness_probe))
    parts = ([f"the new image's pull {pull:g} s"] if pull else []) + [f"a cold start {start:g} s",
                                                                       f"a startup probe period {probe:g} s"]
    if pods.min_ready_s:
        parts.append(f"minReadySeconds {pods.min_ready_s} s")
    return pull + start + probe + pods.min_ready_s, parts


def _undo_while_paused(scenario: Scenario) -> list[Finding]:
    """The pipeline's timeout (``pods.undo_after_s``) of a deploy falls while ``pods.rollouts`` keep the Deployment
    paused: kubectl refuses the undo of a paused Deployment, so a broken canary stays where the pipeline meant to
    undo it (the rollout is still under way there: paused, it cannot finish unless its new ReplicaSet holds every
    replica)."""
    pods = scenario.pods
    timeout, spans = pods.undo_after_s, pods.pauses()
    if timeout is None or not spans:
        return []
    # the pauses whose pipeline looks at the canary before the resume, and may resume (and undo) it earlier
    early = {pods.rollouts[a].at_s for a, r, _ in pods.pause_pairs()
             if r is not None and (pods.rollouts[r].restart_poll_s is not None
                                   or pods.rollouts[r].check_interval_s is not None)}
    out = []
    for i, ro in enumerate(pods.rollouts):
        at = ro.at_s + timeout
        if ro.action != "deploy" or at >= scenario.horizon_s:
            continue
        for a, b in spans:
            if a <= at < b and ro.at_s < b:
                until = "the end of the run" if math.isinf(b) else f"{b:g} s"
                unless = (" (unless the pipeline's look at the canary during the pause, restart_poll_s or "
                          "check_interval_s, resumes it first)" if a in early else "")
                out.append(Finding(
                    "pods.undo_after_s", f"{timeout:g} s: the pipeline's undo of the deploy at {ro.at_s:g} s "
                    f"(pods.rollouts.{i}) comes at {at:g} s, while the Deployment is paused from {a:g} s to {until}, "
                    "and kubectl refuses to undo a paused Deployment (\"resume it first\"): a broken canary stays"
                    f"{unless}. Resume before the timeout, or have the pipeline resume and then undo", level="warn",
                    check="undo-while-paused"))
                break
    return out


def _pause_holds_no_canary(scenario: Scenario) -> list[Finding]:
    """A pause meant to hold a canary (``pods.rollouts``: a pause while a deploy rolls out) under a strategy whose
    first sync gives the new ReplicaSet every replica: ``Recreate`` (the old ReplicaSets go to zero, and the paused
    controller's ``scale`` gives the newest every replica) or a maxSurge of the whole fleet (once the new pods are
    available the paused controller takes the old ones to zero): a working version's rollout finishes paused."""
    pods = scenario.pods
    held = any(last is not None and last.action == "deploy" for _, _, last in pods.pause_pairs())
    n = min_pods(scenario)
    ru = RollingUpdate(pods.rolling_update.max_surge, pods.rolling_update.max_unavailable)
    if not held or n == 0:
        return []
    if pods.strategy == "Recreate":
        why = ("Recreate takes the old ReplicaSets to zero in its first sync, and paused, the controller's scale gives "
               "the new one every replica (no ReplicaSet active: the newest takes them)")
    elif ru.surge(n) >= n:
        why = (f"maxSurge {pods.rolling_update.max_surge} gives the new ReplicaSet all {n} replicas of the floor in "
               "its first sync, and once they are available the paused controller takes the old ones to zero "
               "(a saturated new ReplicaSet)")
    else:
        return []
    return [Finding(
        "pods.rollouts", f"a pause after a deploy holds no canary here: {why}, so a working version's rollout "
        "finishes inside the pause and a check at the resume finds nothing to check (a broken one never turns "
        "available and is held). Use a rolling update with a surge under the replicas (docs/studies.md, \"A canary "
        "by pause\")", level="warn", check="pause-holds-no-canary")]


def canary_window_before_ready(scenario: Scenario) -> list[Finding]:
    """A canary's latency check whose window reaches back before its pods can all be ready. The canary's pods are
    made by the deploy's syncs up to the pause, and each takes up to the new image's pull, the longest cold start, a
    startup probe period and ``min_ready_s`` to be available (``_rollout_deadline``'s step; a node to provision
    comes on top). A window that starts earlier holds the pods' first requests, which the router treats unlike a
    warm pod's: least outstanding sends a new pod the gateway's requests until it holds as many as the others (a
    burst: the canary reads slow), round robin gives it none of the others' backlog (it reads fast). In the H100
    rush (docs/studies.md, "A canary by pause") a good version checked at 2,200 s over 300 s read 0.71 to 3.01 times
    the old pods' p99 and was undone in 4 seeds of 5; over 120 s (its pods ready by 2,030 s) 0.93 to 0.99."""
    out = []
    for w in _canary_windows(scenario):
        if w.early:
            out += _canary_window(scenario, w)
    return out


@dataclass(frozen=True)
class CanaryWindow:
    """A resume entry (``index``) whose pipeline measures the canary a pause holds (a deploy): when the pause began,
    when a new pod can be available (``ready_s``: the pause plus ``_to_available``'s step, with its ``parts``; a node
    to provision comes on top), the measurements during the pause (``check_interval_s``) and the first of all."""

    index: int
    resume: Rollout
    began: float
    step: float
    parts: tuple[str, ...]
    during: tuple[float, ...]

    @property
    def ready_s(self) -> float:
        return self.began + self.step

    @property
    def first_s(self) -> float:
        """The first measurement: the pause's first, or the resume's."""
        return self.during[0] if self.during else self.resume.at_s

    @property
    def early(self) -> bool:
        """Whether the first measurement's window starts before the canary's pods can all be ready."""
        return self.first_s - self.resume.check_window_s < self.ready_s


def _canary_windows(scenario: Scenario) -> list[CanaryWindow]:
    """Each resume with a metric check of a pause that holds a deploy (``CanaryWindow``)."""
    rollouts = scenario.pods.rollouts
    analysis = scenario.pods.analysis_times()
    out = []
    for a, b, last in scenario.pods.pause_pairs():
        if b is not None and rollouts[b].metrics_checked and last is not None and last.action == "deploy":
            step, parts = _to_available(scenario, last.new_image)
            out.append(CanaryWindow(b, rollouts[b], rollouts[a].at_s, step, tuple(parts), tuple(analysis.get(b, []))))
    return out


def early_canary_checks(scenario: Scenario) -> set[int]:
    """The resume entries whose first measurement looks back before the canary's pods can all be ready
    (``canary_window_before_ready`` warns of each): what they read is the pods' first requests."""
    return {w.index for w in _canary_windows(scenario) if w.early}


def _canary_window(scenario: Scenario, w: CanaryWindow) -> list[Finding]:
    """``canary_window_before_ready``'s finding for one early resume ``w``."""
    i, resume, began, step, ready, first, during = w.index, w.resume, w.began, w.step, w.ready_s, w.first_s, w.during
    window_start = first - resume.check_window_s
    why = (f"the pause at {began:g} s holds the pods the deploy made by then, and a new pod may take {step:g} s to be "
           f"available ({', '.join(w.parts)}; a node to provision comes on top)")
    router = ("The window holds the new pods' first requests, which the router treats unlike a warm pod's (least "
              "outstanding sends a new pod a burst: a good canary's TTFT reads slow; round robin gives it no backlog: "
              "a slower one's reads fast; an emptier batch makes the inter-token latency read fast under either), so "
              "the check judges the router, not the version")
    if during:  # the first measurement of the pause is the earliest
        delay = ready + resume.check_window_s - began
        return [Finding(
            f"pods.rollouts.{i}.check_initial_delay_s", f"{resume.check_initial_delay_s:g} s: the first "
            f"measurement of the pause, at {first:g} s, looks back to {window_start:g} s, before the canary's pods can "
            f"all be ready ({why}: until {ready:g} s); a canary that answered nothing fails a measurement, and one that "
            f"just began is judged on its first requests. {router}. Wait {delay:g} s or more (the readiness plus the "
            "window), so every measurement's window starts after it (docs/studies.md, \"A canary by pause\")",
            level="warn", check="canary-window-before-ready")]
    if resume.at_s < ready:
        return [Finding(
            f"pods.rollouts.{i}.at_s", f"{resume.at_s:g} s: the latency check at this resume may come before the "
            f"canary's pods are ready ({why}: until {ready:g} s); a canary that answered nothing fails the check, and "
            f"one that just began is judged on its first requests. {router}. Resume after {ready:g} s plus the "
            "window (docs/studies.md, \"A canary by pause\")", level="warn", check="canary-window-before-ready")]
    return [Finding(
        f"pods.rollouts.{i}.check_window_s", f"{resume.check_window_s:g} s: the latency check at the resume "
        f"({resume.at_s:g} s) looks back to {window_start:g} s, before the canary's pods can all be ready ({why}: "
        f"until {ready:g} s). {router}. Start the window after {ready:g} s (check_window_s "
        f"{resume.at_s - ready:g} s or less), or resume later (docs/studies.md, \"A canary by pause\")",
        level="warn", check="canary-window-before-ready")]


def _restart_poll_never_looks(scenario: Scenario) -> list[Finding]:
    """A restart poll (``restart_poll_s``) no shorter than the pause it runs in: its first look is due at or after
    the resume, so it never looks (the resume's own restart check still runs)."""
    rollouts = scenario.pods.rollouts
    out = []
    for a, i, _ in scenario.pods.pause_pairs():
        if i is None or rollouts[i].restart_poll_s is None:
            continue
        ro, began = rollouts[i], rollouts[a].at_s
        if ro.restart_poll_s is not None and ro.restart_poll_s >= ro.at_s - began:
            out.append(Finding(
                f"pods.rollouts.{i}.restart_poll_s", f"{ro.restart_poll_s:g} s, but the pause it looks through lasts "
                f"{ro.at_s - began:g} s (from {began:g} s to this resume at {ro.at_s:g} s): its first look would come "
                "at or after the resume, so it never looks and a broken canary crash-loops until the resume's own "
                "check; look more often than the pause is long", level="warn", check="restart-poll-never-looks"))
    return out


def _analysis_never_measures(scenario: Scenario) -> list[Finding]:
    """A latency analysis (``check_interval_s``) whose first measurement, the pause plus ``check_initial_delay_s``,
    comes at or after the resume: only the resume measures."""
    rollouts = scenario.pods.rollouts
    out = []
    for i, times in scenario.pods.analysis_times().items():
        if times:
            continue
        ro = rollouts[i]
        began = next(rollouts[a].at_s for a, b, _ in scenario.pods.pause_pairs() if b == i)
        never = (f"so only the resume measures, and with a failure limit of {ro.check_failure_limit} the canary is "
                 "never undone by a measurement" if ro.check_failure_limit else "so only the resume measures")
        out.append(Finding(
            f"pods.rollouts.{i}.check_initial_delay_s", f"{ro.check_initial_delay_s:g} s: the first measurement of the "
            f"pause from {began:g} s would come at {began + ro.check_initial_delay_s:g} s, at or after this resume "
            f"({ro.at_s:g} s), {never}; wait less, or resume later", level="warn", check="analysis-never-measures"))
    return out


def _error_gate_in_store_outage(scenario: Scenario) -> list[Finding]:
    """An error-rate check against a fixed limit (``undo_if_error_rate_over``) with a measurement whose window holds
    a session store's outage (``faults.redis_outages``): every pod's store writes fail then, the old pods' as the
    canary's, so the check reads the outage as the canary's errors."""
    faults = scenario.faults
    outages = [] if faults is None else [(o.at_s, o.at_s + o.duration_s) for o in faults.redis_outages]
    if not outages or scenario.state.store != "redis":
        return []
    out = []
    for w in _canary_windows(scenario):
        ro = w.resume
        if ro.undo_if_error_rate_over is None:
            continue
        measured = scenario.pods.check_times()[w.index]
        hit = [(m, a, b) for m in measured for a, b in outages if a < m and b > m - ro.check_window_s]
        if not hit:
            continue
        _, a, b = hit[0]
        times = sorted({m for m, _, _ in hit})
        at = f"{times[0]:g}" if len(times) == 1 else f"{', '.join(f'{m:g}' for m in times[:-1])} and {times[-1]:g}"
        out.append(Finding(
            f"pods.rollouts.{w.index}.undo_if_error_rate_over", f"{ro.undo_if_error_rate_over:g}: the session store is "
            f"out from {a:g} to {b:g} s, inside the window of the canary's measurement{'s' if len(times) > 1 else ''} "
            f"at {at} s: every pod's session reads and store writes fail then, the old pods' as the "
            "canary's, and a fixed limit reads the outage as the canary's errors (a good canary is undone). "
            "Compare with the old pods' instead (undo_if_error_rate_over_baseline_by) (docs/studies.md, \"A store "
            "outage during a canary\")", level="warn", check="error-gate-in-store-outage"))
    return out


def _ejection_in_store_outage(scenario: Scenario) -> list[Finding]:
    """A session store's outage behind a router whose outlier ejection counts the pods' own 5xx: every pod answers
    503 to each turn it cannot read, the first to fail five in a row is ejected, and it stays out after the store is
    back."""
    faults, router = scenario.faults, scenario.router
    e = router.outlier_ejection
    if (faults is None or not faults.redis_outages or scenario.state.store != "redis" or not router.ejects
            or e is None or not e.count_answered_5xx):
        return []
    o = faults.redis_outages[0]
    return [Finding(
        "router.outlier_ejection.count_answered_5xx", f"true: the session store is out from {o.at_s:g} s "
        f"(faults.redis_outages) and every pod answers 503 to each turn it cannot read; outlier detection counts those "
        f"as Envoy's consecutive_5xx does, so the first pods to fail {e.consecutive_failures} in a row (up to "
        f"{e.max_ejection_percent:g}% of them{', at least one' if e.always_eject_one_host else ''}) are ejected for {e.base_ejection_s:g} s and stay out after "
        "the store is back, which mends nothing (every pod fails alike) and costs their capacity (docs/studies.md, "
        "\"Tuning\": a 2-s outage in the Friday rush raised its p99 TTFT from 0.07 to 0.36 s). Count only the proxy's "
        "own failures (count_answered_5xx: false), which still ejects a crashed pod", level="warn",
        check="ejection-in-store-outage")]


def _ejection_inert_at_floor(scenario: Scenario) -> list[Finding]:
    """Envoy's own rule (``always_eject_one_host: false``) at a percentage under one pod of the plan's floor: a
    failing pod of that fleet is never ejected."""
    router, e = scenario.router, scenario.router.outlier_ejection
    if not router.ejects or e is None or e.always_eject_one_host:
        return []
    floor = max(min_pods(scenario), 1)
    if ejects_one_of(e.max_ejection_percent, floor):
        return []
    least = fewest_ejecting(e.max_ejection_percent)
    under = "never ejects a pod (0 %)" if least is None else (
        f"ejects a pod only if, with it, at most {e.max_ejection_percent:g}% of the pods are out: none of fewer than "
        f"{least}")
    return [Finding(
        "router.outlier_ejection.always_eject_one_host", f"false (Envoy's own rule, as an Istio DestinationRule "
        f"leaves it): the router {under}, and the plan runs {floor} pods at its floor, where a crashed or failing pod "
        f"stays in the endpoints until Kubernetes removes it. If the plan counts on ejecting it, set "
        f"max_ejection_percent to {fewest_percent(floor)} (one of {floor}) or always_eject_one_host to true "
        "(docs/studies.md, \"Envoy's own default\")", level="warn", check="ejection-inert-at-floor")]


def _gateway_errors_under_autoscaler(scenario: Scenario) -> list[Finding]:
    """An error-rate check that counts the gateway's codes (``error_rate_source: gateway``) on a canary whose pause
    an autoscaler may scale down through: the ReplicaSets' shares take canary pods too, and a pod on its way out of
    the endpoints refuses what it is sent (503), which the gateway counts as the canary's errors."""
    auto = scenario.autoscaler
    if auto is None or auto.min_replicas >= auto.max_replicas:
        return []
    return [Finding(
        f"pods.rollouts.{w.index}.error_rate_source", f"gateway: the canary's error rate counts the gateway's codes, "
        f"and the autoscaler may scale the Deployment down during the pause (from {w.began:g} s; replicas "
        f"{auto.min_replicas} to {auto.max_replicas}): the ReplicaSets' shares take canary pods too, and a pod on its "
        "way out of the endpoints refuses what it is sent (503), which the gateway counts as the canary's errors (a "
        "good canary undone in one seed of five, docs/studies.md, \"A canary of engine flags\"). Count them from "
        "the pods' own servers (error_rate_source: pod), which leave a refusal out", level="warn",
        check="gateway-errors-under-autoscaler")
        for w in _canary_windows(scenario) if w.resume.error_checked and w.resume.error_rate_source == "gateway"]


#: requests drawn to estimate the share a setting turns away, and the least share worth a warning
UNSERVABLE_DRAWS = 100_000
UNSERVABLE_SHARE = 0.001


def requests_unservable(scenario: Scenario) -> list[Finding]:
    """Continuous batching that turns away a share of the workload's requests: longer than ``max_model_len``, or more
    KV blocks than the pod's cache (``SchedulerLimits.rejection``), for the scenario's settings and each deploy's
    engine flags. The share is estimated from ``UNSERVABLE_DRAWS`` requests of the workload's token distributions (a
    fixed seed: the same answer every time)."""
    import numpy as np

    from capsim.policy.sched_types import Rejection, SchedulerLimits
    from capsim.sim.arrivals import draw_tokens

    w = scenario.workload
    if (scenario.batching.mode != "continuous" or isinstance(w.arrivals, TraceArrivals)
            or w.sessions.new_tokens is not None):
        return []
    gen = np.random.default_rng(0)
    prompt = draw_tokens(w.prompt_tokens, UNSERVABLE_DRAWS, gen).astype(np.int64)
    output = draw_tokens(w.output_tokens, UNSERVABLE_DRAWS, gen).astype(np.int64)
    # the scheduler's own rule decides (SchedulerLimits.rejection), which reads the prompt plus the answer only: once
    # for each length drawn
    lengths, counts = np.unique(prompt + output, return_counts=True)
    longest = int(lengths[-1])
    settings = [("batching", "", scenario.batching)]
    settings += [(f"pods.rollouts.{i}.batching", f"the engine flags deployed at {ro.at_s:g} s",
                  ro.batching.apply(scenario.batching))
                 for i, ro in enumerate(scenario.pods.rollouts) if ro.batching is not None]
    out = []
    for path, whose, b in settings:
        limits = SchedulerLimits.from_settings(b)
        turned = {Rejection.TOO_LONG: 0, Rejection.EXCEEDS_CACHE: 0}
        for n, k in zip(lengths.tolist(), counts.tolist(), strict=True):
            reason = limits.rejection(n, 0)
            if reason is not None:
                turned[reason] += k
        share = sum(turned.values()) / UNSERVABLE_DRAWS
        if share < UNSERVABLE_SHARE:
            continue
        field, why = ((f"{path}.max_model_len", f"longer than max_model_len {limits.max_model_len}"
                       + (f" ({whose})" if whose else ""))
                      if turned[Rejection.TOO_LONG] >= turned[Rejection.EXCEEDS_CACHE] else
                      (f"{path}.num_blocks", "in need of more KV blocks than the pod's cache holds ("
                       f"{limits.num_blocks} blocks of {limits.block_size} tokens" + (f", {whose}" if whose else "")
                       + ")"))
        out.append(Finding(
            field, f"{share:.1%} of the workload's requests (prompt plus answer, up to {longest:,} tokens here) are "
            f"{why}: the pod turns them away (vLLM's 400), errors that every latency reads fast (what it answers is "
            "shorter); raise it, or cap the workload (docs/studies.md, \"A canary of engine flags\")",
            level="warn", check="requests-unservable"))
    return out


def _recreate_outage(scenario: Scenario) -> list[Finding]:
    """Rollouts under ``Recreate``: each leaves the Deployment with no pod from the old pods' going to the first new
    pod's ready, at least the shortest cold start (the old pods' drain and the image pull come on top)."""
    pods = scenario.pods
    if pods.strategy != "Recreate" or not pods.template_changes:
        return []
    low = _shortest_start(scenario)
    least = f"at least {low:g} s, the shortest cold start," if low > 0 else "a cold start"
    n = len(pods.template_changes)
    return [Finding(
        "pods.strategy", f"Recreate takes every pod down before it starts a new one: every rollout ({n} in "
        f"pods.rollouts) leaves no pod serving for {least} and what is sent then fails "
        "or waits for the client's timeout; RollingUpdate with a surge keeps serving (docs/simulator.md, "
        "\"Rolling updates\")", level="warn", check="recreate-outage")]


def _deadline_under_autoscaler(scenario: Scenario) -> list[Finding]:
    """The pipeline undoes at the progress deadline alone (``pods.undo_on_deadline``, no ``pods.undo_after_s``) under
    an autoscaler: each scale mid-rollout is progress (``DeploymentProgressing``), so a broken rollout under a busy
    HPA may never reach its deadline and never be undone."""
    pods = scenario.pods
    if not (pods.template_changes and pods.undo_on_deadline and pods.undo_after_s is None and scenario.autoscaler):
        return []
    return [Finding(
        "pods.undo_on_deadline", "the pipeline undoes a rollout only at its progress deadline, and the autoscaler's "
        "scales mid-rollout count as progress (more pods on the new template, fewer on the old), each starting the "
        f"{pods.progress_deadline_s} s again: a broken deploy under a busy autoscaler may never be undone; add a "
        "timeout of the pipeline's own (pods.undo_after_s, above the slowest good rollout; docs/studies.md, \"A bad "
        "deploy\")", level="warn", check="deadline-under-autoscaler")]


def _disruption_budget(scenario: Scenario) -> list[Finding]:
    """A PodDisruptionBudget that never allows an eviction at the HPA's floor keeps every node that holds a
    pod: cluster-autoscaler cannot drain one, and the nodes stay billed."""
    budget, cluster = scenario.pods.disruption_budget, scenario.cluster
    if budget is None or cluster is None or not _removes_nodes(cluster, drains=True):
        return []
    floor = min_pods(scenario)
    if budget.disruptions_allowed(floor, floor) > 0:
        return []
    return [Finding(
        "pods.disruption_budget", f"{budget.model_dump(exclude_none=True)} allows no eviction with all {floor} pods "
        f"of the floor ready: {_remover(cluster)} can never drain a node that holds a pod, so partly used nodes "
        "stay billed", level="warn", check="pdb-blocks-drains")]


def _removes_nodes(cluster: ClusterSpec, drains: bool = False) -> bool:
    """Whether the cluster's node autoscaler removes nodes at all (``drains``: nodes that hold pods too)."""
    k = cluster.karpenter
    if k is None:
        return bool(cluster.scale_down_enabled)
    return k.consolidate_after_s is not None and (not drains or k.consolidation_policy == "WhenEmptyOrUnderutilized")


def _remover(cluster: ClusterSpec) -> str:
    """Who removes the nodes, for a finding's words."""
    return "Karpenter's consolidation" if cluster.karpenter is not None else "cluster-autoscaler"


def _peak_nodes(scenario: Scenario, cluster: ClusterSpec) -> tuple[int, int]:
    """The plan's peak of pods and the whole nodes it fills."""
    peak = max_pods(scenario)
    return peak, -(-peak // cluster.pods_per_node(scenario.batching.tensor_parallel_size))


def _node_failure_room(scenario: Scenario) -> list[Finding]:
    """Nodes that can fail with no room for a replacement node: the dead one counts toward ``max_gpus`` until
    cluster-autoscaler removes it, and the evicted pods wait for that."""
    faults, cluster = scenario.faults, scenario.cluster
    if cluster is None or faults is None or not (faults.node_failures or faults.node_mtbf_s):
        return []
    peak, needed = _peak_nodes(scenario, cluster)
    min_nodes = scenario.pods.spread_min_nodes
    nodes = cluster.max_nodes
    if nodes > max(needed, min_nodes):
        return []
    if cluster.karpenter is not None:  # Karpenter removes no failed node; only a node repair deletes it
        gone = (f"{cluster.node_auto_repair_s:g} s after it is NotReady (cluster.node_auto_repair_s)"
                if cluster.node_auto_repair_s is not None else
                "never under Karpenter without a node repair (cluster.node_auto_repair_s)")
    else:
        gone = (f"{cluster.scale_down_unready_time_s:g} s after it fails (cluster.scale_down_unready_time_s)"
                if cluster.scale_down_enabled else "never (cluster.scale_down_enabled is off)")
    if min_nodes >= nodes and min_nodes > needed:
        why = (f"pods.spread.min_nodes {min_nodes} takes every node it allows: when a node fails fewer than "
               f"min_nodes are left, the spread counts the fewest pods as 0 and no node with a pod takes another")
    else:
        why = (f"the peak of {peak} pods fills {needed}: when a node fails, its evicted pods are replaced only "
               "once the dead node is removed")
    return [Finding(
        "cluster.max_gpus", f"{cluster.max_gpus} GPUs hold {nodes} node(s) of {cluster.node_gpus}, and {why}, "
        f"{gone}; leave room for one more node", level="warn", check="node-failure-no-room")]


def _node_cache_without_cluster(scenario: Scenario) -> list[Finding]:
    if not scenario.pods.node_model_cache or scenario.cluster is not None:
        return []
    return [Finding(
        "pods.node_model_cache", "set without a cluster section: every simulated pod has a node of its own, so no "
        "new pod finds the model's files on its node and only restarts start warm here (the export still mounts "
        "the hostPath); add a cluster section to plan it", level="warn", check="node-cache-without-cluster")]


def _karpenter_evicts_all_at_once(scenario: Scenario) -> list[Finding]:
    k = scenario.cluster.karpenter if scenario.cluster is not None else None
    if k is None or scenario.pods.disruption_budget is not None:
        return []
    found = []
    if k.consolidation_policy == "WhenEmptyOrUnderutilized" and k.consolidate_after_s is not None:
        found.append(Finding(
            "cluster.karpenter.consolidation_policy", "WhenEmptyOrUnderutilized without a PodDisruptionBudget: "
            "consolidation evicts every serving pod of a node whose pods fit elsewhere at once, and they start again "
            "cold; set pods.disruption_budget (max_unavailable: 1) to take them one at a time, or WhenEmpty",
            level="warn", check="karpenter-evicts-all-at-once"))
    if k.drift_at_s:
        found.append(Finding(
            "cluster.karpenter.drift_at_s", "drift without a PodDisruptionBudget: once a drifted node's replacement "
            "is ready, every serving pod on the node is evicted at once and they start again cold on the new node; "
            "set pods.disruption_budget (max_unavailable: 1) to take them one at a time",
            level="warn", check="karpenter-evicts-all-at-once"))
    return found


def _karpenter_drift_no_room(scenario: Scenario) -> list[Finding]:
    """Drift launches a node before it deletes one: at the NodePool's GPU limit a full node cannot be replaced."""
    cluster = scenario.cluster
    k = cluster.karpenter if cluster is not None else None
    if cluster is None or k is None or not k.drift_at_s:
        return []
    peak, needed = _peak_nodes(scenario, cluster)
    if cluster.max_nodes > needed:
        return []
    return [Finding(
        "cluster.max_gpus", f"{cluster.max_gpus} GPUs (the NodePool's limits) hold {cluster.max_nodes} node(s) of "
        f"{cluster.node_gpus}, and the peak of {peak} pods fills {needed}: drift launches a replacement before it "
        "deletes a drifted node, so at the peak no full node can be replaced and drift waits for the fleet to "
        "shrink (drift_blocked); leave room for one more node", level="warn", check="karpenter-drift-no-room")]


def _spread_over_gpus(scenario: Scenario) -> list[Finding]:
    spread, cluster = scenario.pods.spread, scenario.cluster
    if spread is not None and cluster is None:
        return [Finding(
            "pods.spread", "set without a cluster section: every simulated pod has a node of its own, so the "
            "spread changes nothing here (the export still writes it); add a cluster section to plan it",
            level="warn", check="spread-without-cluster")]
    if spread is None or spread.min_nodes is None or cluster is None:
        return []
    nodes = cluster.max_nodes
    peak = max_pods(scenario)
    if spread.min_nodes <= nodes or peak <= nodes * spread.max_skew:
        return []
    return [Finding(
        "pods.spread.min_nodes", f"{spread.min_nodes} nodes asked, but cluster.max_gpus {cluster.max_gpus} holds "
        f"{nodes} of {cluster.node_gpus} GPUs: with fewer nodes than min_nodes each takes at most max_skew "
        f"({spread.max_skew}) pods, {nodes * spread.max_skew} in all, and the rest of the peak of {peak} stays "
        "Pending", check="spread-over-gpus")]


def _zones(scenario: Scenario) -> list[Finding]:
    """The zone spread against the cluster's zones, and the room a zone's outage leaves."""
    zs, cluster, faults = scenario.pods.zone_spread, scenario.cluster, scenario.faults
    if cluster is None:
        if zs is None:
            return []
        return [Finding(
            "pods.zone_spread", "set without a cluster section: every simulated pod has a node of its own, so "
            "the spread changes nothing here (the export still writes it); add a cluster section with zones "
            "to plan it", level="warn", check="spread-without-cluster")]
    zones = cluster.zones
    peak = max_pods(scenario)
    found = []
    if zs is not None and zs.min_zones is not None and zs.min_zones > zones and peak > zones * zs.max_skew:
        found.append(Finding(
            "pods.zone_spread.min_zones", f"{zs.min_zones} zones asked, but cluster.zones is {zones}: with fewer "
            f"zones than min_zones each takes at most max_skew ({zs.max_skew}) pods, {zones * zs.max_skew} in "
            f"all, and the rest of the peak of {peak} stays Pending", check="spread-over-zones"))
    elif zs is not None and zones == 1:
        found.append(Finding(
            "pods.zone_spread", "set in a cluster of one zone (cluster.zones 1): it changes nothing here (the "
            "export still writes it)", level="warn", check="zone-spread-one-zone"))
    elif zs is not None and zs.min_zones is None and not cluster.min_nodes_per_zone:
        found.append(Finding(
            "pods.zone_spread", "without min_zones or cluster.min_nodes_per_zone a zone with no GPU node is not "
            "counted, so the pods fill the zones that have nodes before cluster-autoscaler adds one elsewhere; "
            "keep a node in each zone (cluster.min_nodes_per_zone: 1) or set min_zones",
            level="warn", check="zone-spread-empty-zones"))
    if faults is None or not faults.zone_failures:
        return found
    per_node = cluster.pods_per_node(scenario.batching.tensor_parallel_size)
    nodes = cluster.max_nodes
    if zones == 1:
        found.append(Finding(
            "cluster.zones", "1: a zone failure takes every node, and no node can be added until the zone is "
            "back", level="warn", check="zone-failure-no-room"))
        return found
    if zs is not None:  # the peak spread evenly: a zone holds its share, on nodes of its own
        lost_pods = -(-peak // zones)
        filled = zones * -(-lost_pods // per_node)
    else:  # packed on nodes kept balanced over the zones
        filled = -(-peak // per_node)
        lost_pods = min(peak, -(-filled // zones) * per_node)
    if zs is not None and zs.min_zones is not None and zs.min_zones >= zones and peak > (zones - 1) * zs.max_skew:
        found.append(Finding(
            "pods.zone_spread.min_zones", f"{zs.min_zones} takes every zone (cluster.zones {zones}): when a zone "
            f"fails fewer than min_zones are left, the spread counts the fewest pods as 0 and each zone takes at "
            f"most max_skew ({zs.max_skew}) pods, so the failed zone's pods are not replaced until it is back",
            level="warn", check="zone-failure-no-room"))
    elif nodes - filled < -(-lost_pods // per_node):
        found.append(Finding(
            "cluster.max_gpus", f"{cluster.max_gpus} GPUs hold {nodes} node(s) of {cluster.node_gpus}; the peak of "
            f"{peak} pods fills {filled}, and a zone's outage takes about {lost_pods} pods whose replacements "
            f"need {-(-lost_pods // per_node)} node(s) more: they stay Pending until cluster-autoscaler removes "
            "the dead nodes (cluster.scale_down_unready_time_s) or the zone is back; leave room for them",
            level="warn", check="zone-failure-no-room"))
    # its nodes NotReady may be too many of the cluster's for cluster-autoscaler, which then halts
    dark = max(-(-filled // zones), cluster.min_nodes_per_zone) + cluster.other_nodes_per_zone
    every = max(filled, zones * cluster.min_nodes_per_zone) + zones * cluster.other_nodes_per_zone
    if dark > cluster.ok_total_unready_count and dark > cluster.max_total_unready_percentage / 100.0 * every:
        found.append(Finding(
            "cluster.zones", f"{zones}: a zone's outage leaves about {dark} of the cluster's {every} nodes NotReady "
            f"(its GPU nodes at the peak of {peak} pods, and cluster.other_nodes_per_zone), more than "
            f"ok_total_unready_count ({cluster.ok_total_unready_count}) and max_total_unready_percentage "
            f"({cluster.max_total_unready_percentage:g}%): cluster-autoscaler halts, adding no node for the "
            "replacements, until the zone is back; with three zones or more one zone stays under it",
            level="warn", check="zone-failure-halts-autoscaler"))
    return found


def _spot(scenario: Scenario) -> list[Finding]:
    cluster, faults = scenario.cluster, scenario.faults
    if cluster is None or cluster.spot is None:
        if faults is not None and faults.spot_interruptions:
            return [Finding(
                "faults.spot_interruptions", "set without cluster.spot: there is no spot node to reclaim, so each "
                "is skipped (a study's stress may apply to on-demand candidates on purpose)", level="warn",
                check="spot-interruptions-without-spot")]
        return []
    found = []
    grace, notice = scenario.pods.termination_grace_s, cluster.spot.notice_s
    if grace > notice:
        found.append(Finding(
            "pods.termination_grace_s", f"{grace:g} s, above cluster.spot.notice_s ({notice:g} s): a spot node goes "
            "at its notice's end, so a pod still draining then dies with it and the requests it runs fail",
            level="warn", check="spot-notice-below-grace"))
    budget = scenario.pods.disruption_budget
    if cluster.spot.drain == "eviction" and budget is not None:
        floor = min_pods(scenario)
        per_node = cluster.pods_per_node(scenario.batching.tensor_parallel_size)
        allowed = budget.disruptions_allowed(floor, floor)
        if allowed < min(per_node, floor):
            found.append(Finding(
                "cluster.spot.drain", f"eviction under pods.disruption_budget {budget.model_dump(exclude_none=True)}: "
                f"with the {floor} pods of the floor ready it lets {allowed} go at a time, and a node holds "
                f"{per_node}; the rest of a reclaimed node's pods wait for replacements to be ready (a node's "
                f"provisioning and a cold start) and those still there {notice:g} s after the notice die with it",
                level="warn", check="spot-eviction-outlasts-notice"))
    return found


def _to_zero(auto: Autoscaler) -> tuple[str, str, str]:
    """How a Deployment that goes to zero (``Autoscaler.goes_to_zero``) gets there: the field a finding names,
    the setting in words, and how not to."""
    if auto.min_replicas == 0:
        return "autoscaler.minReplicas", "minReplicas 0", "keep minReplicas above 0"
    return "autoscaler.keda.idle_replica_count", "idle_replica_count 0", "drop idle_replica_count"


def _stockout_at_wake(scenario: Scenario) -> list[Finding]:
    """A warning when a Deployment that goes to zero, on nodes cluster-autoscaler removes when empty, meets GPU
    stockouts (``faults.gpu_stockouts``) and has a wake budget (``slo.max_wake_s``) shorter than a wake that
    meets one takes at least: the failed ask (known ``stockout_error_s`` later, or ``max_node_provision_s``),
    the node group's first backoff and a new node's provisioning."""
    auto, cluster, faults = scenario.autoscaler, scenario.cluster, scenario.faults
    budget = scenario.slo.max_wake_s
    if (auto is None or not auto.goes_to_zero or cluster is None or not _removes_nodes(cluster)
            or faults is None or not faults.gpu_stockouts or budget is None):
        return []
    error_s = cluster.stockout_known_s
    least = error_s + cluster.initial_node_group_backoff_s + cluster.node_provision_s
    if least <= budget:
        return []
    field, _, keep = _to_zero(auto)
    return [Finding(
        field, f"0 on nodes {_remover(cluster)} removes when empty, and the cloud may have no GPU node "
        f"(faults.gpu_stockouts): a wake that meets a stockout waits at least {least:g} s (the failed ask known "
        f"{error_s:g} s on, the node group's backoff of {cluster.initial_node_group_backoff_s:g} s, a node's "
        f"{cluster.node_provision_s:g} s), over slo.max_wake_s ({budget:g} s); {keep}, which keeps a node "
        "(docs/studies.md, \"When the cloud has no GPUs\")", level="warn", check="stockout-at-wake")]


def _scale_to_zero(scenario: Scenario) -> list[Finding]:
    auto = scenario.autoscaler
    if auto is None or not auto.goes_to_zero or auto.can_wake_from_zero:
        return []
    names = [m.name for m in auto.to_hpa().metrics]
    who = "KEDA's triggers" if auto.keda is not None else "the HPA's metrics"
    field = _to_zero(auto)[0]
    value = "0" if auto.min_replicas == 0 else "0 (KEDA takes the Deployment to zero without traffic)"
    return [Finding(
        field, f"{value}, but {who} ({', '.join(names)}) are the pods' own series, summed to 0 "
        "when no pod runs: once at zero the Deployment never comes back and every later request fails; add "
        "the gateway's counter (an External metric capsim_gateway_requests_total) or keep a pod"
        + (" (the cron triggers wake it only in their windows)" if auto.keda is not None and auto.keda.cron else ""),
        check="scale-to-zero-cannot-wake")]


def _keda_cron(scenario: Scenario) -> list[Finding]:
    auto = scenario.autoscaler
    if auto is None or auto.keda is None or not auto.keda.cron:
        return []
    out = []
    floor = max(auto.min_replicas, 1)
    for i, (c, w) in enumerate(zip(auto.keda.cron, auto.keda.cron_windows(), strict=True)):
        path = f"autoscaler.keda.cron.{i}"
        if not w.opens_within(scenario.horizon_s):
            out.append(Finding(
                path, f"its window ({c.start!r} to {c.end!r}, {c.timezone}) never opens in the run: "
                f"{auto.keda.clock_start} plus horizon_s ({scenario.horizon_s:g} s); check the schedules, the time "
                "zone and clock_start", level="warn", check="cron-never-opens"))
        if c.desired_replicas > auto.max_replicas:
            out.append(Finding(
                f"{path}.desired_replicas", f"{c.desired_replicas} is above maxReplicas ({auto.max_replicas}): the "
                f"HPA KEDA creates holds {auto.max_replicas} in the window", level="warn", check="cron-outside-bounds"))
        elif c.desired_replicas <= floor:
            out.append(Finding(
                f"{path}.desired_replicas", f"{c.desired_replicas} is not above the HPA's floor ({floor}): in its "
                "window it only wakes a Deployment at zero, and raises nothing", level="warn",
                check="cron-outside-bounds"))
    return out


def _keda_fallback(scenario: Scenario) -> list[Finding]:
    """KEDA in a Prometheus outage: a Deployment that goes to zero for want of a fallback, and a fallback whose
    value KEDA truncates (``capsim.policy.keda``)."""
    auto = scenario.autoscaler
    if auto is None or auto.keda is None:
        return []
    keda, found = auto.keda, []
    fb = keda.fallback
    # what KEDA cannot read: Prometheus down, or the sources of all its triggers at once (faults.trigger_outages
    # that together name every metric: to KEDA a Prometheus outage; an outage of some triggers leaves the others'
    # activity). Spans that overlap or touch are one wait: Prometheus back as every trigger's source goes down
    faults = scenario.faults
    outages = [(o.at_s, o.at_s + o.duration_s, "faults.metrics_outages")
               for o in (faults.metrics_outages if faults else ())]
    outages += [(o.at_s, o.at_s + o.duration_s, "faults.trigger_outages") for o in scenario.total_trigger_outages()]
    longest = max((hi - lo for lo, hi in merged_spans((lo, hi) for lo, hi, _ in outages)), default=0.0)
    where = " and ".join(sorted({w for _, _, w in outages}))
    prometheus = where == "faults.metrics_outages"
    down, back = (("Prometheus goes down", "Prometheus answers again") if prometheus else
                  ("every trigger's query fails", "its triggers' queries answer again"))
    field, zero, keep = _to_zero(auto)
    if keda.release != "2.16" and auto.goes_to_zero and outages:
        found.append(Finding(
            field, f"0, and {down} ({where}, up to {longest:g} s): "
            f"if the Deployment is at zero when it does, it stays there until {back}, "
            f"{'its fallback' if fb is not None and fb.replicas else 'a fallback'} or not (KEDA 2.17 and later "
            "change nothing on a poll in error, and the HPA that applies a fallback is disabled at zero: "
            f"kedacore/keda#7239); {keep} where that wait is not acceptable", level="warn",
            check="keda-outage-at-zero"))
    # 2.16 acts on a poll in error only with a fallback of replicas; 2.17 on changes nothing unless the fallback
    # has 0 replicas, which matches none of its error cases (capsim.policy.keda): an idle poll either way
    idle_poll = (fb is None or fb.replicas == 0) if keda.release == "2.16" else (fb is not None and fb.replicas == 0)
    if idle_poll and auto.goes_to_zero and longest > keda.cooldown_period_s:
        found.append(Finding(
            "autoscaler.keda.fallback", f"{'none' if fb is None else 'replicas 0'}, and {where} lasts "
            f"up to {longest:g} s, longer than cooldown_period_s ({keda.cooldown_period_s} s): KEDA finds no trigger "
            f"active while {'Prometheus is down' if prometheus else 'its queries fail'} and (release {keda.release}, "
            f"{zero}) takes the Deployment to zero, "
            "traffic or not (kedacore/keda#965); "
            f"set fallback.replicas to hold pods, or {keep}", level="warn",
            check="keda-outage-to-zero"))
    found += _keda_empty_after_outage(auto, scenario, idle_poll)
    found += _keda_modifiers(auto)
    # with scaling_modifiers the fallback's value is made from the composite's whole-number target
    if fb is not None and not release_at_least(keda.release, "2.18") and keda.scaling_modifiers is None:
        for m in auto.to_hpa().metrics:
            proposal = math.ceil(int(m.target) * fb.replicas / m.target)
            if proposal != fb.replicas:
                found.append(Finding(
                    "autoscaler.keda.fallback.replicas", f"{fb.replicas}, but KEDA truncates {m.name}'s target "
                    f"({m.target:g}) to {int(m.target)} when it makes the fallback's value, so the HPA it creates "
                    f"proposes {proposal} pods, not {fb.replicas}, once the fallback is on"
                    + (" (its operator still sets the replicas at each poll: the two fight)"
                       if keda.release == "2.16" else "")
                    + f"; use a whole-number target (release {keda.release}; 2.18 and later do not "
                      "truncate it)",
                    level="warn", check="keda-fallback-fractional-target"))
    return found


def _keda_modifiers(auto: Autoscaler) -> list[Finding]:
    """A scalingModifiers formula that fails at no traffic, and a fallback the HPA sums over the triggers."""
    keda = auto.keda
    formula = auto.formula()
    if keda is None or keda.scaling_modifiers is None or formula is None:
        return []
    found = []
    triggers = len(auto.to_hpa().metrics)  # the Prometheus triggers; the cron triggers' names follow theirs
    # no traffic: every Prometheus trigger at 0, every cron trigger outside its window (1)
    idle = {name: 0.0 if k < triggers else 1.0 for k, name in enumerate(auto.trigger_names)}
    try:
        value: float | str = formula.evaluate(idle)
    except FormulaError as e:
        value = f"fails ({e})"
    if isinstance(value, str) or not math.isfinite(value):
        found.append(Finding(
            "autoscaler.keda.scaling_modifiers.formula",
            f"{keda.scaling_modifiers.formula!r} with every trigger at 0 (no traffic) "
            f"{value if isinstance(value, str) else f'is {value}'}: while there is no traffic each HPA read of the "
            "composite fails (KEDA answers an error for a failed run and an undefined quantity, Go's int64 of it, "
            "for a value that is not finite; capsim counts both failed), so the HPA holds its count, no "
            "scale-down, and KEDA finds the ScaledObject not active; guard the divisor (max(x, 1), x > 0 ? ... : 0)",
            level="warn", check="keda-formula-idle"))
    fb = keda.fallback
    if fb is not None and fb.replicas > 0 and triggers > 1 and not release_at_least(keda.release, "2.20"):
        found.append(Finding(
            "autoscaler.keda.fallback", f"replicas {fb.replicas} with scaling_modifiers and {triggers} Prometheus "
            f"triggers: once they all fail past failure_threshold (a Prometheus outage) KEDA {keda.release} skips the "
            f"formula and answers each trigger's fallback value, which the HPA sums, so it proposes "
            f"{min(triggers * fb.replicas, auto.max_replicas)} pods, not {fb.replicas} (kedacore/keda#5371; KEDA "
            f"2.20 answers one: keda.release 2.20)", level="warn", check="keda-fallback-sum"))
    return found


def _keda_empty_after_outage(auto: Autoscaler, scenario: Scenario, idle_poll: bool) -> list[Finding]:
    """After a Prometheus outage every trigger's query is empty until Prometheus has scraped afresh (a rate
    twice), and KEDA reads an empty result as 0 where a trigger keeps ``ignoreNullValues`` (``capsim.sim.hpa``)."""
    keda, faults = auto.keda, scenario.faults
    assert keda is not None
    names = [m.name for m in auto.to_hpa().metrics]
    if faults is None or not faults.metrics_outages or not keda.every_null_as_zero(names):
        return []  # a trigger that errs on an empty result puts the poll in error: nothing changes
    longest = max(hi - lo for lo, hi in merged_spans((o.at_s, o.at_s + o.duration_s) for o in faults.metrics_outages))
    empty = (f"true (every trigger), and Prometheus is down for up to {longest:g} s: when it answers again the "
             "triggers' queries are empty until it has scraped afresh (a rate twice), and KEDA reads them as 0")
    instead = "set keda.ignore_null_values false (an error instead: nothing changes until they answer)"
    if keda.release == "2.16" and keda.fallback is not None:
        # its operator sets the fallback at each poll in error, also from zero: an idle spell's empty answers too
        instead = ("set keda.ignore_null_values false (an error instead; but on 2.16 each poll in error sets the "
                   "fallback, also from zero, so an empty answer in an idle spell then wakes the Deployment: "
                   "simulate the quiet hours with it)")
    _, zero, keep = _to_zero(auto)
    if auto.goes_to_zero and longest > keda.cooldown_period_s:
        if idle_poll:
            return []  # the outage took it to zero already (keda-outage-to-zero)
        return [Finding(
            "autoscaler.keda.ignore_null_values", f"{empty}: its first poll after finds no trigger active more than "
            f"cooldown_period_s ({keda.cooldown_period_s} s) after the last that did, and ({zero}) takes a serving "
            f"Deployment to zero, traffic or not; {instead}, or {keep}", level="warn",
            check="keda-empty-after-outage")]
    window = _downscale_window(auto)
    if keda.fallback is None and window is not None and longest > window[0]:
        return [Finding(
            "autoscaler.keda.ignore_null_values", f"{empty}: the HPA it created proposes its minimum for them at its "
            f"first syncs after, with nothing else in its scale-down window ({window[0]:g} s, {window[1]}; its "
            f"failed reads in the outage left no recommendation), and scales down to {max(1, auto.min_replicas)} "
            f"pods until fresh samples take it back up; {instead}, or add a fallback (its values fill the window)",
            level="warn", check="keda-empty-after-outage")]
    return []


def _downscale_window(auto: Autoscaler) -> tuple[float, str] | None:
    """The HPA's scale-down stabilization window and the field that sets it (None: it never scales down)."""
    hpa = auto.to_hpa()
    rules = hpa.behavior.scale_down if hpa.behavior is not None else None
    if rules is not None and rules.select_policy == "Disabled":
        return None
    if rules is not None and rules.stabilization_window_seconds is not None:
        return float(rules.stabilization_window_seconds), "autoscaler.behavior.scaleDown.stabilizationWindowSeconds"
    return auto.downscale_window_s, "autoscaler.downscale_window_s"


def _scale_down_window(scenario: Scenario) -> list[Finding]:
    auto = scenario.autoscaler
    if auto is None:
        return []
    got = _downscale_window(auto)
    if got is None:
        return []  # it never scales down
    window, path = got
    lag = auto.scrape_interval_s + auto.adapter_lag_s
    if window >= lag:
        return []
    return [Finding(
        path, f"a scale-down window of {window:g} s is shorter than the age of the data the HPA reads: "
        f"autoscaler.scrape_interval_s + adapter_lag_s = {lag:g} s; it scales down on numbers older than "
        "the window", check="scale-down-window-below-lag")]


def _rate_window(scenario: Scenario) -> list[Finding]:
    """A rate over fewer than two scrape intervals: Prometheus's ``rate()`` needs two samples in its window, and
    with samples ``scrape_interval_s`` apart a shorter window holds one at some reads (a window of exactly one
    interval, at every read)."""
    auto = scenario.autoscaler
    if auto is None:
        return []
    every = auto.scrape_interval_s
    out = []
    for i, m in enumerate(auto.to_hpa().metrics):
        query, window, _ = auto.query_of(m.name)
        if query not in ("rate", "histogram_quantile") or window >= 2 * every:
            continue
        q = auto.queries.get(m.name)
        # a histogram's window is query_window_s unless its query sets one; a counter's is the adapter's rate
        # interval, which only its query can change
        own = q is not None and q.window_s is not None
        counter = METRIC_TYPES.get(metric_kind(m.name)) == "counter"
        path = f"autoscaler.queries.{m.name}.window_s" if own or counter else "autoscaler.query_window_s"
        out.append(Finding(
            path, f"metrics.{i} ({m.name}) reads a {query} over {window:g} s of samples scraped every {every:g} s "
            f"(autoscaler.scrape_interval_s): a rate needs two samples in its window, and this one holds at most "
            f"one at {'every read' if window <= every else f'{(2 * every - window) / every:.0%} of the reads'}, "
            f"when a pod has no value (the HPA counts it "
            f"missing; a KEDA trigger on it reads nothing); take at least {2 * every:g} s (Prometheus's advice is "
            f"four intervals, {4 * every:g} s, so a missed scrape does not do the same)",
            level="warn", check="rate-window-short"))
    return out


def format_findings(findings: Sequence[Finding]) -> str:
    """One line per finding, ``FAIL path: reason``; ``no problems found`` when there are none."""
    return "\n".join(str(f) for f in findings) if findings else "no problems found"

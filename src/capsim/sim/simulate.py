"""The one entry point of the simulator: ``simulate(scenario, seed) -> SimResult``.

``Simulation`` wires the parts on one SimPy environment -- client (arrivals, timeouts, retries), router,
pods, cluster, faults, HPA and the time-series sampler -- runs it to the horizon, checks the invariant
``arrived = completed + failed + timed out + rejected + in flight`` against the records, and builds the
frames. The same scenario and seed give identical frames.
"""

from __future__ import annotations

import contextlib
import gc
import math
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import simpy

import capsim
from capsim.errors import SimulationBudgetError
from capsim.model.profile import ProfileRangeError, ServiceTimeProfile
from capsim.model.scenario import POD_METRIC_ALIASES, ConstantTokens, Scenario
from capsim.model.scenario_limits import MAX_REQUESTS, event_budget
from capsim.model.settings import SettingsError
from capsim.policy.routing import Weights
from capsim.policy.scheduling import SchedulerLimits
from capsim.sim.arrivals import make_workload
from capsim.sim.client import Client
from capsim.sim.cluster import Cluster
from capsim.sim.continuous_results import (
    CONTINUOUS_COLUMNS,
    ContinuousStats,
    continuous_results,
    continuous_row,
)
from capsim.sim.faults import Faults
from capsim.sim.hpa import Autoscaling
from capsim.sim.pod import SERVING, PodState
from capsim.sim.recorder import Records, Timeseries
from capsim.sim.router import Router, outlier_settings
from capsim.sim.service import make_service
from capsim.sim.step_time import make_step_time
from capsim.sim.streams import BufferedDraws, FactorWalk, Streams
from capsim.sim.summary import Summary, session_results, summarize
from capsim.sim.wakes import wake_results, wakes


class InvariantError(AssertionError):
    """The run's books do not balance: a simulator bug, never a property of the scenario."""


@dataclass(frozen=True)
class SimResult:
    """What a run produced, with its provenance."""

    requests: Any  # DataFrame, capsim.model.request schema
    timeseries: Any  # DataFrame, Timeseries.COLUMNS
    summary: Summary
    scale_events: Any  # DataFrame: time_s, from_replicas, to_replicas, by (hpa, or keda for its step to and from 0)
    crashes: Any  # DataFrame: time_s, pod, kind
    provenance: dict[str, Any] = field(default_factory=dict)
    skipped_crashes: Any = None  # DataFrame: time_s, pod (-1: any), why; scheduled crashes with no pod to crash
    nodes: Any = None  # DataFrame, capsim.sim.nodes.NODE_COLUMNS: the GPU nodes (empty without a cluster section)
    placements: Any = None  # DataFrame: time_s, pod, node, zone; where each pod was placed (with a cluster section)
    # DataFrame: time_s, event, zone (-1: the cluster), detail; what the node lifecycle controller and
    # cluster-autoscaler did about NotReady nodes (zone states, taints, auto-repairs, halts), and Karpenter's
    # consolidations and drift (cluster.karpenter: consolidation, consolidation_dropped, drift, drift_blocked,
    # drift_failed)
    node_events: Any = None
    # DataFrame: time_s, active, error (a Prometheus outage), replicas, set_replicas (-1: left alone); each
    # poll of KEDA's operator
    # (empty without autoscaler.keda)
    keda_polls: Any = None
    # DataFrame, capsim.sim.wakes.WAKE_COLUMNS: each step from zero replicas and where its wait went
    wakes: Any = None
    # DataFrame: start_s, end_s (inf: to the end of the run), pod (-1: the whole fleet), factor; one row per pod
    # a faults.slow_pods entry slowed
    slowdowns: Any = None
    skipped_slowdowns: Any = None  # DataFrame: time_s, pod (-1: any), why; slowdowns that found no pod
    # DataFrame, ROLLOUT_COLUMNS: each pods.rollouts entry, when it was done (NaN: not by the end of the run),
    # the fewest pods ready and the most alive (Pending, starting, ready or draining) while it ran, and when
    # Kubernetes would have reported it stalled (progressDeadlineSeconds after its last progress; NaN: never), and
    # when the deploy pipeline's undo of it was refused (the Deployment paused; NaN: never), when the pipeline checked
    # it as a canary (at a resume, or earlier by a check during the pause; NaN: never) and whether the check failed, and the p99 TTFT the
    # canary's latency check read at the resume and the same over the old pods (NaN: no such check, or nothing answered),
    # and the mean inter-token latency its ITL check read and the old pods' (the same NaNs), and the share of their
    # attempts ended with an error its error-rate check read (the same NaNs), all at the last
    # measurement, and how many latency measurements of it were made (the resume's, and check_interval_s' in the
    # pause) and failed, and what undid it (canary_failed_by: undo_if_restarted, or the limits whose failures passed
    # check_failure_limit, their field names joined by " and "; empty: nothing)
    rollouts: Any = None
    # DataFrame: time_s, current, desired, then per HPA metric (by name) the value it read and ``<name> proposal``, the
    # count it proposed (-1: none); a row per sync (``Autoscaling.syncs_frame``; empty without an autoscaler)
    hpa_syncs: Any = None


#: the columns of ``SimResult.rollouts``
ROLLOUT_COLUMNS = ["at_s", "revision", "pods", "done_s", "min_ready", "most_pods", "deadline_exceeded_s", "undo",
                   "undone_s", "undo_refused_s", "canary_checked_s", "canary_failed", "canary_ttft_p99_s",
                   "baseline_ttft_p99_s", "canary_itl_mean_s", "baseline_itl_mean_s", "canary_error_rate",
                   "baseline_error_rate", "canary_measurements", "canary_failures", "canary_failed_by"]


_gc_lock = threading.Lock()
_gc_runs = 0  # runs inside young_collections_spaced now (threads of one process share the thresholds)
_gc_saved: tuple[int, int, int] = (700, 10, 10)


@contextlib.contextmanager
def young_collections_spaced(threshold: int = 100_000) -> Iterator[None]:
    """CPython collects its youngest generation each time 700 container objects more were allocated than
    freed. A run allocates a few per request and event (runs, wake-ups, tuples), nearly all of which die
    young and outside any cycle, so those collections find little and cost 8% of the continuous rush's CPU
    (6 alternating pairs, stop 48). While any run lasts, the youngest generation is collected every
    ``threshold`` allocations instead; cycles are still collected, and the thresholds are given back when
    the last run in the process ends. A process that turned automatic collection off keeps it off."""
    global _gc_runs, _gc_saved
    with _gc_lock:
        if _gc_runs == 0:
            _gc_saved = gc.get_threshold()
            if _gc_saved[0]:  # 0: automatic collection off
                gc.set_threshold(max(_gc_saved[0], threshold), *_gc_saved[1:])
        _gc_runs += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_runs -= 1
            if _gc_runs == 0:
                gc.set_threshold(*_gc_saved)


class Simulation:
    """One run of a scenario under one seed; ``run()`` once.

    Everything that can be checked before the run is checked here, so a run either starts sound or does
    not start: the seed, the workload's size (a trace's rows), and whether the profile covers every batch
    the workload can make. ``max_events`` caps the SimPy events of the run (default: ``event_budget``).
    """

    def __init__(self, scenario: Scenario, seed: int = 0, profile: ServiceTimeProfile | None = None,
                 *, max_events: int | None = None) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise SettingsError(f"seed must be an integer >= 0, got {seed!r}")
        # service.slowdown: the pods' compute as long as the scenario's times its slowdown, read by every part
        if scenario.service.slowdown != 1.0:
            scenario = scenario.model_copy(update={"service": scenario.service.effective()})
        self.scenario = scenario
        self.seed = seed
        self.streams = Streams(seed)
        self.env = simpy.Environment()
        self.batching = scenario.batching
        self.timeout_s = scenario.client.timeout_s
        workload = make_workload(scenario, self.streams)
        if scenario.workload.arrivals.kind == "trace" and workload.n_requests > MAX_REQUESTS:
            raise SettingsError(
                f"workload: {workload.n_requests} requests in horizon_s {scenario.horizon_s:g}, over the limit "
                f"of {MAX_REQUESTS:.0e} per run; shorten horizon_s or split the trace"
            )
        self.workload = workload
        self.max_events = max_events if max_events is not None else event_budget(scenario, workload.n_requests)
        if scenario.service.kind == "profile":
            if profile is None:
                assert scenario.service.profile is not None
                profile = ServiceTimeProfile.from_csv(scenario.resolve(scenario.service.profile))
            if not scenario.service.extrapolate:
                _check_coverage(profile, scenario, workload)
        prompt, output = workload.prompt_tokens, workload.output_tokens
        if scenario.client.cancel_on_timeout == "none":
            if scenario.batching.mode == "continuous":
                raise SettingsError("client.cancel_on_timeout: 'none' is modelled for static batching only "
                                    "(batching.mode is continuous, whose engine aborts a request its client left)")
            # slots for the requests whose client left while they were queued (Client._orphan): as many
            # again as there are requests, reused as they finish
            pad = np.zeros(max(len(prompt), 1024), dtype=prompt.dtype)
            prompt, output = np.concatenate([prompt, pad]), np.concatenate([output, pad.astype(output.dtype)])
        self.records = Records(prompt, output, workload.turns)
        first = np.arange(workload.n_sessions, dtype=np.int64) * workload.turns
        self.records.arrival[first] = workload.session_start_s
        self.records.send[first] = workload.session_start_s
        wl = scenario.workload
        self.constant_lengths: tuple[int, int] | None = None
        if (isinstance(wl.prompt_tokens, ConstantTokens) and isinstance(wl.output_tokens, ConstantTokens)
                and wl.arrivals.kind != "trace"):
            self.constant_lengths = (wl.prompt_tokens.value, wl.output_tokens.value)
        self.service = make_service(scenario, self.streams, profile)
        self.continuous: ContinuousStats | None = None
        if scenario.batching.mode == "static":  # the way out of a static batch's answers
            self.records.answer_s = scenario.service.answer_ms / 1000.0
            self.records.answer_per_request_s = scenario.service.answer_per_request_ms / 1000.0
        if scenario.batching.mode == "continuous":
            self.continuous = ContinuousStats(self.records.n, SchedulerLimits.from_settings(scenario.batching),
                                              make_step_time(scenario, self.streams, profile), workload.prefix)
            self.continuous.answer_s = scenario.service.answer_ms / 1000.0
            noise = scenario.service.ingress_noise
            if noise is not None and scenario.service.ingress_ms:
                # each request's ingress: ingress_ms times one of the factors (scaled to mean 1), at random
                # or walked in blocks (service.ingress_noise_block), one walk for the fleet
                f = np.asarray(noise, dtype=float)
                self.continuous.ingress = FactorWalk(f / f.mean(), scenario.service.ingress_noise_block,
                                                     BufferedDraws(self.streams["ingress"]))
        canary = any(ro.ttft_checked for ro in scenario.pods.rollouts)  # a canary's TTFT check
        self.track_ttft = canary or (scenario.autoscaler is not None and any(
            POD_METRIC_ALIASES.get(m.name) == "ttft"
            for m in scenario.autoscaler.to_hpa().metrics
        ))
        # a histogram_quantile query needs the TTFT observations per bucket, not only their sum and count
        self.track_ttft_buckets = canary or (scenario.autoscaler is not None and any(
            POD_METRIC_ALIASES.get(m.name) == "ttft" and scenario.autoscaler.query_of(m.name)[0] == "histogram_quantile"
            for m in scenario.autoscaler.to_hpa().metrics
        ))
        self.profile_path = None
        if scenario.service.kind == "profile":
            self.profile_path = str(profile.source if profile is not None else scenario.service.profile)
        self.faults = Faults(self)
        self.autoscaling: Autoscaling | None = None  # made once the pods are (below)
        self.cluster = Cluster(self)
        rs = scenario.router
        self.router = Router(rs.kind, self.cluster.endpoints, self.cluster.pods,
                             BufferedDraws(self.streams["routing"]),
                             Weights(rs.prefix_weight, rs.queue_weight, rs.kv_cache_weight), rs.fallback,
                             outlier_settings(rs.outlier_ejection), BufferedDraws(self.streams["ejection_jitter"]))
        self.client = Client(self, workload)
        self.cluster.start(scenario.pods.replicas)
        if scenario.autoscaler is not None:
            self.autoscaling = Autoscaling(self)
        self.timeseries = Timeseries(CONTINUOUS_COLUMNS if self.continuous is not None else ())
        self.env.process(self._sample())
        # cost is measured over the window the latencies are: from warmup_s to the horizon
        self._gpu_s_at_warmup = (0.0, 0.0, 0.0)
        if scenario.warmup_s > 0:
            ev = self.env.timeout(scenario.warmup_s)
            ev.callbacks.append(self._warmup_over)
        self._ran = False

    def _warmup_over(self, _: Any) -> None:
        now = self.env.now
        nodes = self.cluster.nodes
        limited = self.scenario.cluster is not None
        self._gpu_s_at_warmup = (self.cluster.gpu_seconds(now), nodes.node_gpu_seconds(now) if limited else 0.0,
                                 nodes.node_gpu_seconds(now, priced=True) if limited else 0.0)

    def _sample(self) -> Generator[Any, Any, None]:
        """Every ``timeseries_interval_s``: one row of the time series (values at the row's time)."""
        env = self.env
        every = self.scenario.timeseries_interval_s
        client = self.client
        last = (0, 0, 0, 0.0)
        while True:
            yield env.timeout(every)
            now = env.now
            pods = self.cluster.live_pods
            states = [p.state for p in pods]
            serving = [p for p in pods if p.state in SERVING]
            busy = self.cluster.gone_busy_s + sum(p.busy_total_s(now) for p in pods)
            errors = client.n_failed + client.n_timed_out + client.n_rejected
            n_ready = self.cluster.ready_count()
            busy_frac = (busy - last[3]) / (every * len(serving)) if serving else float("nan")
            row: tuple[float, ...] = (
                now, client.n_arrived - last[0], (client.n_arrived - last[0]) / every, client.n_ok - last[1],
                errors - last[2], self.cluster.desired, n_ready,
                states.count(PodState.STARTING),
                states.count(PodState.PENDING), states.count(PodState.TERMINATING),
                sum(len(p.queue) for p in serving), sum(p.outstanding for p in serving), busy_frac,
                self.autoscaling.last_value if self.autoscaling else float("nan"),
                states.count(PodState.CRASHED), self.cluster.gpus_held(), self.cluster.nodes.gpus_now(),
            )
            if self.continuous is not None:
                row += continuous_row(serving)
            self.timeseries.add(row)
            last = (client.n_arrived, client.n_ok, errors, busy)

    def _rollouts_frame(self) -> Any:
        """``SimResult.rollouts``: a row per rollout, its deadline also passed when the run ended first."""
        horizon, deadline = self.scenario.horizon_s, float(self.scenario.pods.progress_deadline_s)
        rows = []
        for r in self.cluster.rollouts:
            exceeded = r.deadline_exceeded_s
            if exceeded is None and r.open and horizon - r.progress_s >= deadline:
                exceeded = r.progress_s + deadline
            rows.append([r.at_s, r.revision, r.pods, r.done_s, r.min_ready, r.most_pods, exceeded, r.undo, r.undone_s,
                         r.undo_refused_s, r.canary_checked_s, r.canary_failed, r.canary_ttft_p99_s,
                         r.baseline_ttft_p99_s, r.canary_itl_mean_s, r.baseline_itl_mean_s, r.canary_error_rate,
                         r.baseline_error_rate, r.canary_measurements, r.canary_failures])
        import pandas as pd

        frame = pd.DataFrame(rows, columns=ROLLOUT_COLUMNS[:-1], dtype=float)
        frame["canary_failed_by"] = pd.Series([r.canary_failed_by for r in self.cluster.rollouts], dtype=object)
        frame["undo"] = frame["undo"].astype(bool)
        frame["canary_failed"] = frame["canary_failed"].astype(bool)
        frame[["canary_measurements", "canary_failures"]] = frame[["canary_measurements", "canary_failures"]].astype(int)
        return frame

    def run(self) -> SimResult:
        """Run to the horizon and return the result."""
        if self._ran:
            raise RuntimeError("a Simulation runs once; make a new one")
        self._ran = True
        sc = self.scenario
        self.env.step = _budgeted(self.env, self.max_events)  # type: ignore[method-assign]
        with young_collections_spaced():
            self.client.run()
        lost_ids, lost_turns = self.client.lost_sessions()
        cols = self._close_books()
        import pandas as pd

        from capsim.model.request import requests_frame

        batch_sizes = np.fromiter((b.size for b in self.records.batches), np.int32, len(self.records.batches))
        self.records.batches = []  # the columns hold what the requests need of them
        summary = summarize(
            cols, warmup_s=sc.warmup_s, horizon_s=sc.horizon_s, retries=self.client.n_retries,
            lost_sessions=self.client.n_lost_sessions, gpu_seconds=self.cluster.gpu_seconds(sc.horizon_s) - self._gpu_s_at_warmup[0],
            gpu_cost_per_hour=sc.pods.gpu_cost_per_hour, batch_sizes=batch_sizes,
            scale_events=len(self.cluster.scale_events),
            max_replicas=max([sc.pods.replicas] + [to for _, _, to, _ in self.cluster.scale_events]),
            crashes=len(self.faults.crash_log), ttft_slo_s=sc.slo.ttft_p99_s,
            max_error_rate=sc.slo.max_error_rate, turns=self.workload.turns,
            node_gpu_seconds=(self.cluster.nodes.node_gpu_seconds(sc.horizon_s) - self._gpu_s_at_warmup[1]
                              if sc.cluster else None),
            node_priced_seconds=(self.cluster.nodes.node_gpu_seconds(sc.horizon_s, priced=True)
                                 - self._gpu_s_at_warmup[2] if sc.cluster else None),
            billing=sc.cluster.billing if sc.cluster else "pod",
            lost_session_ids=lost_ids, lost_turns=lost_turns, session_start_s=self.workload.session_start_s,
            max_session_failure_rate=sc.slo.max_session_failure_rate,
        )
        requests = requests_frame(cols)
        del cols
        if self.continuous is not None:
            summary = continuous_results(self.continuous, requests, summary, sc.warmup_s)
        summary = session_results(summary, requests, self.client.book, sc.warmup_s)
        if self.client.n_held:
            summary = replace(summary, held_at_gateway=self.client.n_held)
        if self.router.outliers is not None and self.router.outliers.ejections:
            summary = replace(summary, ejections=self.router.outliers.ejections)
        woke = wakes(self.cluster.scale_events, self.cluster.pods, self.cluster.placements, requests)
        if len(woke) or sc.slo.max_wake_s is not None:
            summary = wake_results(summary, requests, woke, sc.slo, sc.warmup_s)
        if self.cluster.rollouts:  # pods.rollouts: the longest (one not done counted to its undo or the horizon), the
            ro = self.cluster.rollouts  # fewest ready
            took = [(r.done_s if r.done_s is not None else r.undone_s if r.undone_s is not None else sc.horizon_s)
                    - r.at_s for r in ro]
            summary = replace(summary, longest_rollout_s=float(max(took)),
                              rollouts_unfinished=sum(r.done_s is None for r in ro),
                              rollout_fewest_ready=float(min(r.min_ready for r in ro)),
                              rollouts_undone=sum(r.done_s is None and r.undone_s is not None for r in ro),
                              rollout_undos_refused=len(self.cluster.undos_refused),
                              undone_after_s=max((r.undone_s - r.at_s for r in ro
                                                  if r.done_s is None and r.undone_s is not None), default=math.nan))
            if sc.slo.max_rollout_s is not None:  # every rollout done within it, or the SLO is missed
                ok = summary.rollouts_unfinished == 0 and summary.longest_rollout_s <= sc.slo.max_rollout_s
                summary = replace(summary, rollout_slo_met=ok, slo_met=summary.slo_met and ok)
        return SimResult(
            requests=requests,
            timeseries=self.timeseries.frame(),
            summary=summary,
            scale_events=pd.DataFrame(self.cluster.scale_events,
                                      columns=["time_s", "from_replicas", "to_replicas", "by"]),
            crashes=pd.DataFrame(self.faults.crash_log, columns=["time_s", "pod", "kind"]),
            skipped_crashes=pd.DataFrame(self.faults.skipped, columns=["time_s", "pod", "why"]),
            nodes=self.cluster.nodes.frame(sc.horizon_s),
            placements=pd.DataFrame(self.cluster.placements, columns=["time_s", "pod", "node", "zone"]),
            node_events=pd.DataFrame(self.cluster.nodes.lifecycle.log if self.cluster.nodes.lifecycle else [],
                                     columns=["time_s", "event", "zone", "detail"]),
            keda_polls=pd.DataFrame(self.autoscaling.keda_polls if self.autoscaling else [],
                                    columns=["time_s", "active", "error", "replicas", "set_replicas"]),
            wakes=woke,
            slowdowns=pd.DataFrame(self.faults.slow_log, columns=["start_s", "end_s", "pod", "factor"]),
            skipped_slowdowns=pd.DataFrame(self.faults.slow_skipped, columns=["time_s", "pod", "why"]),
            rollouts=self._rollouts_frame(),
            hpa_syncs=self.autoscaling.syncs_frame() if self.autoscaling else pd.DataFrame(),
            provenance={
                "scenario": sc.model_dump(mode="json", by_alias=True),
                "scenario_file": str(sc.source) if sc.source else None,
                "seed": self.seed,
                "capsim_version": capsim.__version__,
                "profile": self.profile_path,
            },
        )

    def _close_books(self) -> dict[str, np.ndarray]:
        """Check the invariant two ways (live counters, records) and return the request columns."""
        c = self.client
        in_flight = c.in_flight()
        total = c.n_ok + c.n_failed + c.n_timed_out + c.n_rejected + in_flight
        if c.n_arrived != total:
            raise InvariantError(
                f"arrived {c.n_arrived} != completed {c.n_ok} + failed {c.n_failed} + timed out "
                f"{c.n_timed_out} + rejected {c.n_rejected} + in flight {in_flight}"
            )
        for pod in self.cluster.pods:  # answers not at their clients when the run ends: in flight
            for b in pod.answering:
                b.done = False
        cols = self.records.columns()
        out = cols["outcome"]
        from_records = (len(out), int((out == 0).sum()), int((out < 0).sum()))
        if from_records != (c.n_arrived, c.n_ok, in_flight):
            raise InvariantError(
                f"records say (arrived, completed, in flight) = {from_records}, "
                f"counters say {(c.n_arrived, c.n_ok, in_flight)}"
            )
        return cols


def _budgeted(env: simpy.Environment, budget: int) -> Any:
    """``env.step`` that raises ``SimulationBudgetError`` on the event after the ``budget``-th.

    A Python call per event costs well under 1% of a SimPy step with the model's work behind it."""
    step = env.step
    left = budget

    def counted() -> None:
        nonlocal left
        left -= 1
        if left < 0:
            raise SimulationBudgetError(
                f"the run passed its budget of {budget} events at t={env.now:.6g} s: a setting makes far more "
                "events than this horizon needs (see capsim.model.scenario_limits); shorten horizon_s or "
                "raise the intervals, or pass a larger max_events"
            )
        step()

    return counted


def _check_coverage(profile: ServiceTimeProfile, scenario: Scenario, workload: Any) -> None:
    """Refuse, before the run, a static-batching workload with batches the profile did not measure."""
    if getattr(scenario.batching, "mode", "static") != "static" or workload.n_requests == 0:
        return
    prompt, output = workload.prompt_tokens, workload.output_tokens
    gaps = profile.coverage_gaps(
        max_batch_size=scenario.batching.max_batch_size,
        prompt_tokens=(int(prompt.min()), int(prompt.max())),
        max_output_tokens=int(output.max()),
    )
    if gaps:
        raise ProfileRangeError(
            f"service.profile {profile.source} does not cover this workload: it needs " + "; ".join(gaps)
            + ". Measure a wider profile (capsim profile --max-batch-size, --prompt-tokens, --context-tokens) "
            "or set service.extrapolate: true"
        )


def simulate(scenario: Scenario | str | Path, seed: int = 0, *,
             profile: ServiceTimeProfile | None = None, max_events: int | None = None) -> SimResult:
    """Run ``scenario`` (a Scenario or a YAML path) with ``seed``; ``profile`` overrides the service profile.

    ``max_events`` caps the run's SimPy events (default: ``scenario_limits.event_budget``); past it the run
    ends with ``SimulationBudgetError``."""
    if not isinstance(scenario, Scenario):
        scenario = Scenario.from_yaml(scenario)
    return Simulation(scenario, seed, profile, max_events=max_events).run()

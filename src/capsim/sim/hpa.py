"""The HPA in a run: the metric pipeline that feeds it and the controller loop that calls the policy.

Pipeline, as in a cluster with Prometheus and prometheus-adapter, with its phases:

* Prometheus scrapes each serving pod every ``scrape_interval_s`` at the pod's own offset within the
  interval (Prometheus spreads its targets: ``scrape/target.go``, ``offset`` = a hash of the target modulo
  the interval; here a uniform draw per pod from the ``scrape_offsets`` stream, in pod id order). A sample
  holds what the pod's /metrics shows at that instant: queue depth and requests in flight (gauges), the
  busy ratio (a gauge: busy seconds of the batches finished since the previous scrape over the time since
  it, NaN at a container's first scrape, as ``capsim.core.metrics``), the TTFT histogram's sum and count
  (observed when the pod answers a request, as the real batcher does) and vLLM's series of a
  continuous-batching pod. Its counters are those since its container started (``Pod.counters_base``): a restarted
  container's start from 0, as a new process's do.
* dcgm-exporter's GPU series (``DCGM_FI_DEV_GPU_UTIL``, ``DCGM_FI_PROF_GR_ENGINE_ACTIVE``) are not the pod's: the
  exporter collects them every ``dcgm_collect_interval_s`` at the pod's own phase (the ``dcgm_phase`` stream) from
  when the pod holds its GPU (the busy share of NVML's last ``dcgm_util_period_s``, and of the time since the
  previous collection), and Prometheus scrapes what it last collected every ``scrape_interval_s``.
* At each sync the HPA asks the adapter for each pod's value. The adapter evaluates the metric's query
  (``Autoscaler.query_of``: instant, avg_over_time, max_over_time, rate, histogram_quantile) at
  ``a = now - adapter_lag_s`` over the samples with time in ``(a - window, a]``; an instant query takes the newest
  sample within Prometheus's 5-minute lookback. A rate (a counter's, and the rates a histogram's mean and quantile
  are made of) is Prometheus's: the increase extrapolated to the window's edges, by half a scrape interval where
  the series starts or ends inside the window, never below the counter's zero (``capsim.sim.promql_eval``), so a
  pod whose server came up inside the window reads less than it serves. A pod without a sample there has no value (the
  HPA counts it missing); a NaN (a histogram's mean or quantile over a window that observed nothing, 0/0) the
  adapter answers as 0 (prometheus-adapter ``metricFor``, kubernetes-sigs/prometheus-adapter#308).
* A pod's scrapes succeed from when its server is up (its model loaded), before its readiness probe passes:
  Prometheus scrapes every Running pod its discovery finds, and the HPA counts a Running pod's value whether it
  is ready or not (``groupPods`` leaves unready pods out for CPU only), so a new pod reads an empty queue there.
* Staleness: a scrape that finds a pod's container not serving (crashed, restarting) fails, and
  Prometheus writes a stale marker on the pod's series (``scrape/scrape.go``, ``StaleNaN``); an instant
  query at or after the marker returns nothing for the pod until it is scraped again, while a range query
  (``avg_over_time``, ``max_over_time``, ``rate``, ``histogram_quantile``) still uses the real samples in its window
  (markers are skipped). A deleted pod's scrape loop stops once discovery passes the deletion on (its send ticker,
  then the scrape manager's reload ticker, 5 s each: ``sd_removal``); a slot before that fails and writes the
  marker, and after it the loop's end-of-run staleness stamps the marker at its next slot and writes it 1.1
  intervals later (``endOfRunStaleness``). Prometheus is Apache-2.0 (c) The Prometheus Authors; the rule is
  re-implemented.
* The controller syncs every ``sync_period_s`` from its own phase (the first sync a uniform draw in
  ``(0, sync_period_s]`` from the ``hpa_phase`` stream): the kube-controller-manager's resync period runs
  from when it picked the HPA up, not from when Prometheus scraped.

The per-metric proposals come from ``capsim.policy.autoscaling.pods_metric_replicas`` and the decision from
``HorizontalPodAutoscaler``.

External metrics (the way KEDA's ScaledObjects scale): a pod metric named by an External metric is the
sum of the pods' values that are numbers (the exported trigger's ``sum((...) >= 0)``, ``capsim.export.promql``;
a NaN would make the whole sum NaN), over every series its selector matches: a crashed pod's, and a deleted one's
(Prometheus ends its series with a stale marker when it leaves the targets) count in a range query while its
window holds their samples, not in an instant query. Where the result is empty (no pod with a value; a rate with fewer than two
samples, as at the start of a run and after a Prometheus outage) KEDA's Prometheus scaler answers 0 with the
trigger's ``ignoreNullValues`` (its default; ``keda.ignore_null_values``), an error without it (the HPA's read
fails and the operator's poll is in error); without KEDA it is no value. ``capsim_gateway_requests_total``
counts every attempt sent to the Service at the gateway (scraped every ``scrape_interval_s`` at its own
offset), answered or not. An ``AverageValue`` target
proposes ``ceil(total / target)``, a ``Value`` target ``ceil(total / target x ready pods)``
(``average_value_metric_replicas``, ``value_metric_replicas``); with ``minReplicas: 0`` such a metric
takes the Deployment to zero and back (the ``HPAScaleToZero`` feature gate).

KEDA (``autoscaler.keda``): the HPA is the one KEDA creates (``minReplicas`` at least 1), and KEDA's
operator polls the triggers every ``polling_interval_s`` from its own phase (the ``keda_phase`` stream),
taking the Deployment to and from zero (``capsim.policy.keda.ScaleExecutor``).

A Prometheus outage (``faults.metrics_outages``): Prometheus scrapes nothing (no sample, no stale marker;
a pod's busy ratio then spans the time since the last scrape it answered) and answers no query. Every
metric of the HPA fails, so it holds its count (``HorizontalPodAutoscaler.reconcile``: no usable metric;
it still moves a count outside [min, max] to the bound). Under KEDA each read goes through KEDA's
metrics server (``capsim.policy.keda.FallbackHealth``: an error, or past ``fallback.failure_threshold``
failed reads the fallback's value, by its ``behavior``), and each poll of KEDA's operator is in error with
no trigger active (``ScaleExecutor.request_scale``: by ``keda.release``, no change from 2.17 on; in 2.16
``fallback.replicas``, or without a fallback the way to zero). After
the outage a range query has only the samples scraped since (and the older ones still in its window).

A partial outage (``faults.trigger_outages``): the named metrics' own source fails while Prometheus scrapes on.
The HPA's read of each fails (it scales on the others, and not down while one fails, as upstream), and so
does each KEDA trigger on them: a poll with one in error is in error, active if another trigger is (2.17 on
then notes no activity, only a condition).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

from simpy.events import Timeout

from capsim.model.buckets import TTFT_BUCKETS_S
from capsim.model.scenario import DCGM_METRIC_KINDS, METRIC_TYPES, QUERIES, metric_kind
from capsim.policy.autoscaling import (
    PodSample,
    Tolerance,
    average_value_metric_replicas,
    pods_metric_replicas,
    value_metric_replicas,
)
from capsim.policy.keda import FallbackHealth, ScaleExecutor, metric_value, release_at_least
from capsim.policy.keda_formula import COMPOSITE_METRIC, Formula, FormulaError
from capsim.sim.continuous import ContinuousPod
from capsim.sim.pod import Pod, PodState
from capsim.sim.promql_eval import (
    Samples,
    extrapolated_rate,
    first_scrape,
    in_window,
    mark_stale,
    max_over_time,
    rate_quantile,
    trim,
)

if TYPE_CHECKING:
    from capsim.model.scenario import ScalingModifiers
    from capsim.sim.simulate import Simulation

#: the period of Prometheus's discovery send ticker and of its scrape manager's reload ticker (s)
SD_TICK_S = 5.0

#: Prometheus's lookback delta (``--query.lookback-delta``, 5 minutes): an instant query returns the newest
#: sample at most this old.
LOOKBACK_S = 300.0
#: Fields of a sample: time, queue depth, in flight, busy ratio, TTFT sum and count, then vLLM's waiting,
#: running, KV-cache use, ITL sum and count, preemptions, prompt and generation tokens, then the TTFT bucket
#: counts (or None).
_FIELD = {"queue_depth": 1, "in_flight": 2, "busy": 3, "waiting": 6, "running": 7, "kv_cache": 8}
_HISTOGRAM = {"ttft": (4, 5), "itl": (9, 10)}
_COUNTER = {"preemptions": 11, "prompt_tokens": 12, "generation_tokens": 13}
_BUCKETS = 14
_DEFAULT_QUERY = {kind: queries[0] for kind, queries in QUERIES.items()}
#: Fields of a dcgm-exporter sample: time, GPU utilisation (%), graphics engine active (ratio).
_DCGM_FIELD = {"gpu_util": 1, "gr_active": 2}

def _instant(samples: Samples, k: int, a: float) -> float | None:
    """Field ``k`` of the newest sample at or before ``a``, within the lookback; None after a stale marker."""
    for s in reversed(samples):
        if s[0] <= a:
            return float(s[k]) if len(s) > 1 and s[0] > a - LOOKBACK_S else None
    return None


def _over_time(query: str, values: list[float]) -> float:
    """``avg_over_time`` (a NaN makes it NaN) or ``max_over_time`` of a window's values."""
    return max_over_time(values) if query == "max_over_time" else sum(values) / len(values)


def _engine_gauges(pod: Pod) -> tuple[float, ...]:
    """vLLM's gauges of a pod: waiting, running, KV-cache use."""
    if isinstance(pod, ContinuousPod):
        return (pod.num_waiting, pod.num_running, pod.kv_cache_usage)
    running = sum(b.live_size for b in pod.running)  # a static pod: its batches are what runs
    return (len(pod.queue), running, math.nan)


def _sample(pod: Pod, at: float, busy: float) -> tuple[Any, ...]:
    """What a scrape of ``pod``'s /metrics at ``at`` reads (the fields above): its counters since its container
    started (``Pod.counters_base``), as a restarted process's start from 0."""
    c, b = pod.scrape_counters(at), pod.counters_base
    buckets, base = pod.ttft_buckets, pod.buckets_base
    return (at, len(pod.queue), pod.outstanding, busy, c[0] - b[0], c[1] - b[1], *_engine_gauges(pod),
            *(x - y for x, y in zip(c[2:], b[2:], strict=True)),
            None if buckets is None else tuple(buckets) if base is None else tuple(
                x - y for x, y in zip(buckets, base, strict=True)))


class Autoscaling:
    """Scrapes pods and runs the HPA controller loop of a scenario's ``autoscaler`` section."""

    def __init__(self, sim: Simulation) -> None:
        spec = sim.scenario.autoscaler
        assert spec is not None
        self.sim = sim
        self.spec = spec
        self.hpa = spec.to_hpa(with_cron=True)
        # KEDA's cron triggers (autoscaler.keda.cron): External metrics after the scenario's, answered by KEDA
        self._cron = spec.keda.cron_windows() if spec.keda is not None else []
        self._n_prom = len(self.hpa.metrics) - len(self._cron)  # the metrics Prometheus answers
        #: (kind, target, query, window_s, quantile) per HPA metric
        self.metrics = [(metric_kind(m.name), m.target, *spec.query_of(m.name))
                        for m in self.hpa.metrics[:self._n_prom]]
        self.metrics += [("cron", 1.0, "instant", spec.query_window_s, 0.99)] * len(self._cron)
        self._external = [(m.type == "External", m.target_type) for m in self.hpa.metrics]
        #: per sync: time, current and desired replicas, each metric's value as the HPA read it (NaN: it failed),
        #: then the replicas each proposed (-1: none); ``SimResult.hpa_syncs``
        self.metric_reads: list[tuple[float, ...]] = []
        longest = max([spec.query_window_s] + [w for _, _, _, w, _ in self.metrics])
        self._keep_s = max(longest, LOOKBACK_S) + spec.adapter_lag_s + spec.scrape_interval_s
        self._offsets = sim.streams["scrape_offsets"]
        self.scrape_offset_s: list[float] = []  # per pod id: its scrape offset within the interval
        # dcgm-exporter (DCGM_FI_* metrics): per pod id its samples as Prometheus scraped them from the exporter,
        # and the exporter's last collection: (time, busy s) there and its values (None: no series)
        self._dcgm = any(kind in DCGM_METRIC_KINDS for kind, *_ in self.metrics)
        self._dcgm_phases = sim.streams["dcgm_phase"]
        self._dcgm_seen = 0  # pods given their collection phase so far
        self.dcgm_samples: dict[int, Samples] = {}
        self._dcgm_last: dict[int, tuple[int, float, float]] = {}  # pod id -> (incarnation, time, busy s)
        self._dcgm_value: dict[int, tuple[float, float]] = {}  # pod id -> (GPU util %, engine active) collected
        #: (time, pod id, GPU util %, engine active) per collection of a pod that holds a GPU
        self.dcgm_collections: list[tuple[float, int, float, float]] = []
        self._busy_mark: dict[int, tuple[int, float, float]] = {}  # pod id -> (incarnation, time, busy s)
        # deleted pods whose series still hold samples a range query may read (Prometheus keeps them), by id
        self._retired: dict[int, Pod] = {}
        self._gone_at: dict[int, float] = {}  # pod id -> when it was deleted, until its next scrape slot
        sd = sim.streams["prometheus_sd"]
        self._sd_phases = (SD_TICK_S * float(sd.random()), SD_TICK_S * float(sd.random()))
        self.discover(sim.env.now)
        first_sync = spec.sync_period_s * (1.0 - float(sim.streams["hpa_phase"].random()))
        self.gateway_samples: deque[tuple[float, int]] = deque()  # (time, attempts sent so far)
        if any(kind == "gateway" for kind, *_ in self.metrics):
            offset = spec.scrape_interval_s * float(sim.streams["hpa_phase"].random())
            Timeout(sim.env, offset).callbacks.append(self._scrape_gateway)
        sim.env.process(self._sync(first_sync))
        faults = sim.faults
        self._down = faults.metrics_down if faults.has_metrics_outages else None  # Prometheus down at a time
        # faults.trigger_outages: per metric its name when its source can fail (None: never)
        failing = faults.trigger_outage_metrics
        self._outage_names: list[str | None] = [m.name if m.name in failing else None for m in self.hpa.metrics]
        self._partial = bool(failing)  # a poll reads every trigger: one may err while another is active
        self.keda: ScaleExecutor | None = None
        self.keda_health: FallbackHealth | None = None  # KEDA's metrics server, as the HPA reads it
        # useCachedMetrics: each such trigger's value (None: no value) and whether its query failed, as KEDA's last
        # poll found them; the HPA reads these (from the first poll on: before it, afresh)
        self._keda_cache: dict[int, tuple[float | None, bool]] = {}
        self._cached: frozenset[int] = frozenset()  # the triggers (metric indices) that set useCachedMetrics
        self._null_zero: frozenset[int] = frozenset()  # the triggers that keep ignoreNullValues: empty reads 0
        #: (time, active, error, replicas before, replicas KEDA set or -1) per poll of KEDA's operator
        self.keda_polls: list[tuple[float, bool, bool, int, int]] = []
        self._formula: Formula | None = None
        self._modifiers: ScalingModifiers | None = None
        self._trigger_names: list[str] = []
        if spec.keda is not None:
            # a run starts from a Deployment already serving: with pods, as if its triggers were last
            # active at time 0 (else KEDA's first poll, before Prometheus holds two samples of a rate,
            # would find nothing active and take the Deployment to zero at once); with an initial cooldown
            # the run starts as the ScaledObject is created: never active yet, created at time 0
            initial = spec.keda.initial_cooldown_period_s
            last = 0.0 if sim.scenario.pods.replicas > 0 and initial is None else None
            fb = spec.keda.fallback
            self.keda = ScaleExecutor(spec.min_replicas, spec.keda.cooldown_period_s, last,
                                      fb.replicas if fb is not None else None, spec.keda.release,
                                      spec.keda.idle_replica_count, float(initial or 0))
            self.keda_health = FallbackHealth(fb.failure_threshold if fb is not None else None,
                                              fb.replicas if fb is not None else 0,
                                              fb.behavior if fb is not None else "static", spec.keda.release)
            self._activation = [spec.keda.activation.get(m.name, 0.0) for m in self.hpa.metrics]
            cached = spec.keda.cached([m.name for m in self.hpa.metrics])
            self._cached = frozenset(k for k, m in enumerate(self.hpa.metrics) if m.name in cached)
            zero = spec.keda.null_as_zero([m.name for m in self.hpa.metrics])
            self._null_zero = frozenset(k for k, m in enumerate(self.hpa.metrics) if m.name in zero)
            # scalingModifiers: one composite metric, the formula over the triggers (by their names)
            self._formula = spec.formula()
            self._modifiers = spec.keda.scaling_modifiers
            self._trigger_names = spec.trigger_names
            first_poll = spec.keda.polling_interval_s * (1.0 - float(sim.streams["keda_phase"].random()))
            sim.env.process(self._keda_loop(first_poll))

    # ---- Prometheus -------------------------------------------------------------------------------------
    def _query_fails(self, k: int, t: float) -> bool:
        """Whether metric ``k``'s own source is down at ``t`` (``faults.trigger_outages``)."""
        name = self._outage_names[k]
        return name is not None and self.sim.faults.trigger_down(name, t)

    def _prometheus_down(self, t: float) -> bool:
        """Whether Prometheus is down at ``t`` (``faults.metrics_outages``): it scrapes and answers nothing."""
        return self._down is not None and self._down(t)

    def discover(self, now: float) -> None:
        """Give every pod created since the last call its scrape offset and schedule its first scrape.

        Called at the start, after each scale, and at each sync (pods a node's eviction replaced); drops the
        samples of deleted pods that no query's window holds any longer."""
        if self._retired:
            self._forget_retired(now)
        pods = self.sim.cluster.pods
        every = self.spec.scrape_interval_s
        env = self.sim.env
        for pod in pods[len(self.scrape_offset_s):]:
            offset = every * float(self._offsets.random())
            self.scrape_offset_s.append(offset)
            # the first time on the pod's grid (offset + k x interval) at or after now
            at = first_scrape(offset, every, now)
            ev = Timeout(env, at - env.now, (pod, at))
            ev.callbacks.append(self._scrape)
        if self._dcgm:
            self._discover_dcgm(now)

    def _scrape(self, ev: Timeout) -> None:
        pod, at = cast(tuple[Pod, float], ev.value)
        samples = pod.samples
        if pod.state == PodState.GONE:
            # a deleted pod leaves Prometheus's targets: a stale marker ends its series (an instant query finds it
            # no more), while its samples stay for a range query whose window holds them (a KEDA trigger's sum;
            # ``retire``). Its scrape loop stops once discovery has passed the deletion on (``sd_removal``): a
            # scrape before that fails (the marker at once); after, the loop's end-of-run staleness stamps the
            # marker at this slot but writes it only a scrape interval and a tenth later (``endOfRunStaleness``),
            # and until then an instant query still finds the pod's last sample
            gone = self._gone_at.pop(pod.id, at)
            if at < self.sd_removal(gone):
                mark_stale(samples, at)
            else:
                late = Timeout(self.sim.env, 1.1 * self.spec.scrape_interval_s, (samples, at))
                late.callbacks.append(self._end_of_run_stale)
            self._busy_mark.pop(pod.id, None)
            return
        if self._prometheus_down(at):
            pass  # Prometheus is down: no scrape
        elif pod.metrics_up:  # ready or not: a pod whose server answers is scraped (its queue empty until ready)
            samples.append(_sample(pod, at, self._busy_ratio(pod, at)))
        else:  # the scrape fails: the series ends
            mark_stale(samples, at)
        trim(samples, at - self._keep_s)
        nxt = Timeout(self.sim.env, self.spec.scrape_interval_s, (pod, at + self.spec.scrape_interval_s))
        nxt.callbacks.append(self._scrape)

    @staticmethod
    def _end_of_run_stale(ev: Timeout) -> None:
        samples, at = cast(tuple[Samples, float], ev.value)
        mark_stale(samples, at)

    def sd_removal(self, t: float) -> float:
        """When Prometheus stops scraping a target whose pod was deleted at ``t``: its discovery manager passes
        changes on at the next tick of a 5-s ticker (``updatert``, ``sender``), and its scrape manager applies
        them at the next tick of its own 5-s reload ticker (``reloader``; ``--scrape.discovery-reload-interval``,
        5 s at the least). The tickers' phases are drawn once a run (the ``prometheus_sd`` stream)."""
        sd, reload = self._sd_phases
        after_sd = sd + SD_TICK_S * (math.floor((t - sd) / SD_TICK_S) + 1)
        return reload + SD_TICK_S * (math.floor((after_sd - reload) / SD_TICK_S) + 1)

    @property
    def syncs(self) -> list[tuple[float, int, int, float]]:
        """(time, current, desired, the first metric's value) per sync."""
        return [(r[0], int(r[1]), int(r[2]), r[3]) for r in self.metric_reads]

    @property
    def last_value(self) -> float:
        """The first metric's value at the last sync (a Pods metric's mean over the pods with a value; NaN: none)."""
        return self.metric_reads[-1][3] if self.metric_reads else math.nan

    def retire(self, pod: Pod) -> None:
        """``pod`` is deleted: a KEDA trigger's sum still reads its samples in a range query's window (its next scrape
        slot ends the series with a stale marker, at once or a little later: ``_scrape``)."""
        self._retired[pod.id] = pod
        self._gone_at[pod.id] = self.sim.env.now

    def _forget_retired(self, now: float) -> None:
        old = now - self._keep_s
        for pid, pod in list(self._retired.items()):
            dcgm = self.dcgm_samples.get(pid)
            trim(pod.samples, old)
            if dcgm:
                trim(dcgm, old)
            if not pod.samples and not dcgm:
                del self._retired[pid]
                self.dcgm_samples.pop(pid, None)

    # ---- dcgm-exporter ------------------------------------------------------------------------------------
    def _discover_dcgm(self, now: float) -> None:
        """Give every new pod its dcgm-exporter phases: when the exporter collects its GPUs' fields (every
        ``dcgm_collect_interval_s``) and when Prometheus scrapes the exporter (every ``scrape_interval_s``)."""
        spec = self.spec
        every, scrape = spec.dcgm_collect_interval_s, spec.scrape_interval_s
        period = spec.dcgm_util_period_s
        env = self.sim.env
        draws = self._dcgm_phases
        for pod in self.sim.cluster.pods[self._dcgm_seen:]:
            phase, offset = every * float(draws.random()), scrape * float(draws.random())
            # the first collection whose sample period starts at or after now
            k = max(0.0, math.ceil((now + period - phase) / every))
            collect = phase + k * every
            Timeout(env, collect - period - env.now, (pod, collect)).callbacks.append(self._dcgm_mark)
            at = first_scrape(offset, scrape, now)
            Timeout(env, at - env.now, pod).callbacks.append(self._dcgm_scrape)
            self.dcgm_samples[pod.id] = deque()
        self._dcgm_seen = len(self.sim.cluster.pods)

    def _dcgm_mark(self, ev: Timeout) -> None:
        """NVML's sample period before a collection starts: note the pod's busy seconds."""
        pod, collect = cast(tuple[Pod, float], ev.value)
        if pod.state == PodState.GONE:
            return
        now = self.sim.env.now
        start = (pod.incarnation, pod.busy_total_s(now)) if pod.gpu_since is not None else None
        Timeout(self.sim.env, collect - now, (pod, collect, start)).callbacks.append(self._dcgm_collect)

    def _dcgm_collect(self, ev: Timeout) -> None:
        """dcgm-exporter reads the pod's GPUs: ``DCGM_FI_DEV_GPU_UTIL``, the percent of NVML's last sample period
        (``dcgm_util_period_s``) in which the pod's engine ran, and ``DCGM_FI_PROF_GR_ENGINE_ACTIVE``, its active
        share since the previous collection (or since the sample period's start at a first). A pod that holds no
        GPU (Pending) has no series."""
        pod, collect, start = cast(tuple[Pod, float, tuple[int, float] | None], ev.value)
        spec = self.spec
        now = self.sim.env.now
        gone = pod.state == PodState.GONE
        if gone or pod.gpu_since is None or start is None:  # no GPU (Pending), or deleted: no series
            self._dcgm_value.pop(pod.id, None)
            self._dcgm_last.pop(pod.id, None)
            if gone:
                return
        else:
            busy = pod.busy_total_s(now)
            period = spec.dcgm_util_period_s
            # a container restarted in the period: its busy seconds start afresh (no share below 0 or above 1)
            util = min(max((busy - start[1]) / period, 0.0), 1.0) if start[0] == pod.incarnation else 0.0
            last = self._dcgm_last.get(pod.id)
            if last is None or last[0] != pod.incarnation:
                last = (pod.incarnation, now - period, start[1]) if start[0] == pod.incarnation else None
            active = 0.0 if last is None else min(max((busy - last[2]) / (now - last[1]), 0.0), 1.0)
            self._dcgm_last[pod.id] = (pod.incarnation, now, busy)
            self._dcgm_value[pod.id] = (100.0 * util, active)
            self.dcgm_collections.append((now, pod.id, 100.0 * util, active))
        nxt = collect + spec.dcgm_collect_interval_s
        Timeout(self.sim.env, nxt - spec.dcgm_util_period_s - now, (pod, nxt)).callbacks.append(self._dcgm_mark)

    def _dcgm_scrape(self, ev: Timeout) -> None:
        """Prometheus scrapes dcgm-exporter: the pod's series hold what the exporter last collected."""
        pod = cast(Pod, ev.value)
        samples = self.dcgm_samples.get(pod.id)
        if samples is None:  # deleted, and its samples forgotten
            return
        if pod.state == PodState.GONE:  # the exporter no longer labels a series with the pod: it goes stale
            mark_stale(samples, self.sim.env.now)
            return
        now = self.sim.env.now
        value = self._dcgm_value.get(pod.id)
        if value is not None and not self._prometheus_down(now):
            samples.append((now, *value))
        trim(samples, now - self._keep_s)
        Timeout(self.sim.env, self.spec.scrape_interval_s, pod).callbacks.append(self._dcgm_scrape)

    def _scrape_gateway(self, ev: Timeout) -> None:
        now = self.sim.env.now
        client = self.sim.client
        if not self._prometheus_down(now):
            self.gateway_samples.append((now, client.n_arrived + client.n_retries))
        trim(self.gateway_samples, now - self._keep_s)
        Timeout(self.sim.env, self.spec.scrape_interval_s).callbacks.append(self._scrape_gateway)

    def gateway_rate(self, now: float, window_s: float) -> float | None:
        """``rate(capsim_gateway_requests_total[window])`` as the adapter answers at ``now`` (attempts/s)."""
        a = now - self.spec.adapter_lag_s
        sel = in_window(self.gateway_samples, a, window_s)
        return extrapolated_rate([s[0] for s in sel], [s[1] for s in sel], a - window_s, a)

    def _busy_ratio(self, pod: Pod, now: float) -> float:
        """``capsim_gpu_busy_ratio`` as the pod computes it when scraped (``InferenceMetrics``): busy seconds
        of the batches finished since the previous scrape over the time since it, within [0, 1]; at the first
        scrape of a container, since the container started (a restarted container starts its counters
        afresh)."""
        busy = pod.busy_counted_s(now)
        mark = self._busy_mark.get(pod.id)
        self._busy_mark[pod.id] = (pod.incarnation, now, busy)
        if mark is None or mark[0] != pod.incarnation:
            mark = (pod.incarnation, *pod.counters_from)
        if now <= mark[1]:
            return math.nan
        return min(max((busy - mark[2]) / (now - mark[1]), 0.0), 1.0)

    # ---- prometheus-adapter -----------------------------------------------------------------------------
    def value(self, pod: Pod, metric: str, now: float, query: str | None = None, window_s: float | None = None,
              quantile: float = 0.99) -> float | None:
        """The value of ``metric`` (a kind: ``queue_depth``, ``busy``, ``ttft`` ...) for ``pod`` that Prometheus
        answers at ``now`` under ``query`` (default: the metric's default query); ``None``: the pod has no series
        in the result (no sample, a stale marker, a rate with fewer than two samples); NaN: it has one whose value
        is NaN (a quantile or a mean of a histogram with nothing observed in the window, 0/0; a NaN sample, or
        an average over a window that holds one)."""
        if query is None or window_s is None:
            query, window_s = _DEFAULT_QUERY.get(METRIC_TYPES.get(metric, "gauge"), "instant"), self.spec.query_window_s
        a = now - self.spec.adapter_lag_s
        if metric in _DCGM_FIELD:
            return self._dcgm_value_at(pod, metric, a, query, window_s)
        if query == "instant":
            return _instant(pod.samples, _FIELD[metric], a)
        lo = a - window_s
        sel = in_window(pod.samples, a, window_s)
        if not sel:
            return None
        if query in ("avg_over_time", "max_over_time"):
            k = _FIELD[metric]
            return _over_time(query, [float(s[k]) for s in sel])
        # rate() and what is built on it: Prometheus's extrapolated rate (capsim.sim.promql_eval)
        times = [s[0] for s in sel]
        if query == "histogram_quantile":
            if any(s[_BUCKETS] is None for s in sel):
                return None
            return rate_quantile(quantile, TTFT_BUCKETS_S, times, [s[_BUCKETS] for s in sel], lo, a)
        if metric in _COUNTER:  # a counter: its increase per second
            k = _COUNTER[metric]
            return extrapolated_rate(times, [s[k] for s in sel], lo, a)
        s_k, c_k = _HISTOGRAM[metric]  # a histogram: the mean observation, rate of the sum over rate of the count
        count = extrapolated_rate(times, [s[c_k] for s in sel], lo, a)
        if count is None:  # fewer than two samples
            return None
        total = extrapolated_rate(times, [s[s_k] for s in sel], lo, a)
        assert total is not None
        return total / count if count > 0 else math.nan  # 0/0 with nothing observed

    def _dcgm_value_at(self, pod: Pod, metric: str, a: float, query: str, window_s: float) -> float | None:
        """A DCGM gauge of ``pod`` as Prometheus answers at ``a``: the newest exporter sample (instant, within the
        lookback) or the mean (``avg_over_time``) or highest (``max_over_time``) of those in the window; None: no
        series (no GPU yet, not yet collected, or nothing scraped in the window)."""
        samples = self.dcgm_samples.get(pod.id)
        if not samples:
            return None
        k = _DCGM_FIELD[metric]
        if query == "instant":
            return _instant(samples, k, a)
        sel = [s[k] for s in in_window(samples, a, window_s)]
        return _over_time(query, sel) if sel else None

    def syncs_frame(self) -> Any:
        """``SimResult.hpa_syncs``: a row per sync of the HPA controller: its time, the Deployment's count, the count
        it set, and per metric (by name) the value it read (a Pods metric's mean over the pods with a value, an
        External metric's total; NaN where the read failed) and the count that metric proposed (-1: none). With
        ``keda.scaling_modifiers`` the triggers' values are followed by ``composite-metric``, the one metric the HPA
        scales on, and only it proposes."""
        import pandas as pd

        names = [m.name for m in self.hpa.metrics]
        if self._formula is not None:  # scalingModifiers: the HPA's one metric, after the triggers' values
            names.append(COMPOSITE_METRIC)
        columns = ["time_s", "current", "desired", *names, *(f"{n} proposal" for n in names)]
        frame = pd.DataFrame(self.metric_reads, columns=columns)
        return frame.astype({c: int for c in ("current", "desired", *columns[3 + len(names):])})

    # ---- the controller ---------------------------------------------------------------------------------
    def _sync(self, first_s: float) -> Generator[Any, Any, None]:
        env = self.sim.env
        cluster = self.sim.cluster
        tol = self.hpa.metric_tolerance
        yield env.timeout(first_s)
        while True:
            now = env.now
            self.discover(now)
            current = cluster.desired
            pods = cluster.live_pods
            proposals: list[int | None] = []
            read: list[float] = []  # each metric's value, as the HPA's status would show it
            raw: list[tuple[float | None, bool]] = []  # scalingModifiers: each trigger's value and failure
            down = self._prometheus_down(now)  # every query fails
            health = self.keda_health
            for k, (metric, target, query, window_s, quantile) in enumerate(self.metrics):
                external, target_type = self._external[k]
                fails = down or self._query_fails(k, now)  # Prometheus down, or this metric's source
                if external:
                    cached = self._keda_cache.get(k)
                    total: float | None
                    if metric == "cron":  # KEDA's cron scaler answers it from the clock, Prometheus or not
                        total, failed = self._cron[k - self._n_prom].value(now), False
                    elif cached is not None:  # useCachedMetrics: what KEDA's last poll found
                        total, failed = cached
                    elif fails:
                        total, failed = None, True
                    else:
                        total = self._external_total(pods, metric, now, query, window_s, quantile)
                        failed = False
                        if health is not None:  # KEDA's scaler: an empty result is 0, or an error
                            total, failed = self._keda_result(k, total)
                            if total is not None:
                                total = metric_value(total)  # in whole thousandths, as KEDA answers
                    if self._formula is not None:  # scalingModifiers: the composite, from every trigger, below
                        raw.append((total, failed))
                        read.append(math.nan if total is None else total)
                        continue
                    if health is not None:  # KEDA's metrics server answers: the value, an error or the fallback's
                        value_target = target_type == "Value"
                        ready = self.sim.cluster.ready_count() if value_target and failed else 0
                        total = health.read(k, total, failed, target, current, value_target, ready)
                    read.append(math.nan if total is None else total)
                    proposals.append(None if total is None else self._external_replicas(
                        pods, current, total, target, target_type == "Value", tol))
                    continue
                if fails:
                    read.append(math.nan)
                    proposals.append(None)
                    continue
                samples = [self._sample(p, metric, now, query, window_s, quantile) for p in pods]
                vals = [s.value for s in samples if s.value is not None]
                read.append(sum(vals) / len(vals) if vals else math.nan)  # the mean over the pods with a value
                try:
                    proposals.append(pods_metric_replicas(current, samples, target, tol))
                except ValueError:  # no pods or no samples: the metric failed this sync
                    proposals.append(None)
            if self._formula is not None:  # the HPA KEDA creates has one metric, the composite
                composite = self._composite_read(raw, current)
                read.append(math.nan if composite is None else composite)
                sm = self._modifiers
                assert sm is not None
                proposals = [None if composite is None else self._external_replicas(
                    pods, current, composite, sm.target, sm.metric_type == "Value", tol)]
                desired = self.hpa.reconcile(now, current, proposals)
                none: list[int | None] = [None] * len(raw)  # the triggers propose nothing
                proposals = none + proposals
            else:
                desired = self.hpa.reconcile(now, current, proposals)
            self.metric_reads.append((now, current, desired, *read, *(-1 if p is None else p for p in proposals)))
            if desired != current:
                cluster.scale_to(desired, now)
                self.discover(now)
            yield env.timeout(self.spec.sync_period_s)

    def _keda_loop(self, first_s: float) -> Generator[Any, Any, None]:
        """KEDA's operator: every ``polling_interval_s`` (from its own phase) it asks each trigger whether it is
        active (its value above its activation threshold; an empty result reads 0, or with ``ignoreNullValues``
        false errs; a failed query, in a Prometheus outage, is not active and puts the poll in error) and takes
        the Deployment to or from zero, or to its fallback (``capsim.policy.keda.ScaleExecutor``); the HPA does the rest."""
        env = self.sim.env
        cluster = self.sim.cluster
        keda = self.keda
        spec = self.spec
        assert keda is not None and spec.keda is not None
        yield env.timeout(first_s)
        while True:
            now = env.now
            self.discover(now)
            pods = cluster.live_pods
            active = False
            down = self._prometheus_down(now)  # every trigger's query fails: none is active
            error = down
            cache = self._keda_cache  # useCachedMetrics: every trigger is read, and the cached ones kept for the HPA
            cached = self._cached
            # else the first active trigger settles the poll
            read_all = bool(cached) or self._partial or len(self._null_zero) < self._n_prom
            formula = self._formula
            values: dict[str, float] = {}  # scalingModifiers: each trigger's metric, by name
            if formula is not None:
                read_all = True
            triggers = zip(self.metrics, self._activation, strict=True)
            for k, ((metric, _, query, window_s, quantile), threshold) in enumerate(triggers):
                if metric == "cron":  # active in its window, whatever Prometheus does
                    if formula is not None:
                        values[self._trigger_names[k]] = self._cron[k - self._n_prom].value(now)
                    elif self._cron[k - self._n_prom].active(now):
                        active = True
                        if not read_all:
                            break
                    continue
                if down:
                    continue  # Prometheus answers no trigger: the poll is in error
                if self._query_fails(k, now):  # faults.trigger_outages: this trigger errs, the others answer
                    total, failed = None, True
                else:  # ignoreNullValues false and nothing in the result: the scaler errs too
                    total, failed = self._keda_result(k, self._external_total(pods, metric, now, query, window_s,
                                                                              quantile))
                if k in cached:  # what the HPA reads: in whole thousandths (activity is on the value itself)
                    cache[k] = (None if total is None else metric_value(total), failed)
                if failed:
                    error = True
                elif formula is not None:
                    values[self._trigger_names[k]] = metric_value(total if total is not None else 0.0)
                elif total is not None and total > threshold:
                    active = True
                    if not read_all:
                        break
            if down:
                cache.update(dict.fromkeys(cached, (None, True)))
            if formula is not None:  # active on the composite alone, and never while a trigger errs
                active = not error and self._composite_active(formula, values)
            current = cluster.desired
            new = keda.request_scale(now, current, active, error)
            self.keda_polls.append((now, active, error, current, -1 if new is None else new))
            if new is not None and new != current:
                cluster.scale_to(new, now, by="keda")
                self.discover(now)
            yield env.timeout(spec.keda.polling_interval_s)

    def _external_total(self, pods: list[Pod], metric: str, now: float, query: str, window_s: float,
                        quantile: float) -> float | None:
        """An External metric's value: the gateway's rate, or the sum of the pods' values; None where
        Prometheus's result is empty (no pod with a value; a rate with fewer than two samples in its window)."""
        if metric == "gateway":
            return self.gateway_rate(now, window_s)
        # every series the selector matches: a crashed or deleted pod's too, whose range queries still read the
        # samples in their window (an instant query finds its stale marker)
        values = [self.value(p, metric, now, query, window_s, quantile) for p in (*pods, *self._retired.values())]
        # the exported query keeps a pod's value only where it is a number (capsim.export.promql: ``>= 0``)
        present = [v for v in values if v is not None and not math.isnan(v)]
        return float(sum(present)) if present else None

    def _composite_active(self, formula: Formula, values: dict[str, float]) -> bool:
        """KEDA's operator with scalingModifiers: active when the composite (in whole thousandths) is above
        ``activation_target``; a formula whose run fails, or whose value is no finite number, is not active
        (KEDA's composite is then none, or Go's int64 of it the lowest int64)."""
        sm = self._modifiers
        assert sm is not None
        try:
            out = formula.evaluate(values)
        except FormulaError:
            return False
        return math.isfinite(out) and metric_value(out) > sm.activation_target

    def _composite_read(self, raw: list[tuple[float | None, bool]], current: int) -> float | None:
        """What KEDA's metrics server answers the HPA for ``composite-metric`` (``GetScaledObjectMetrics``, releases
        2.17 to 2.20), from each trigger's (value, failed) this sync; None: the read fails.

        Each trigger's failures are counted as without modifiers (``FallbackHealth``). Past
        ``fallback.failure_threshold`` a failed trigger answers the fallback's value for the composite's target and
        type; then the formula is skipped, and the HPA sums every value KEDA answers: the fallback's of each such
        trigger and the healthy triggers' own (kedacore/keda#5371, #5409); 2.20 answers the first fallback value
        alone (kedacore/keda#7790). Otherwise a failed trigger fails the read, as does a formula whose run fails or
        whose value is no finite number; else the composite, in whole thousandths."""
        health = self.keda_health
        sm = self._modifiers
        formula = self._formula
        assert health is not None and sm is not None and formula is not None
        value_target = sm.metric_type == "Value"
        values: dict[str, float] = {}
        fallbacks: list[float] = []
        error = False
        for k, (total, failed) in enumerate(raw):
            if failed:
                ready = self.sim.cluster.ready_count() if value_target else 0
                answer = health.read(k, None, True, sm.target, current, value_target, ready)
                if answer is None:
                    error = True
                else:
                    fallbacks.append(answer)
            else:
                health.read(k, total, False, sm.target)
                values[self._trigger_names[k]] = total if total is not None else 0.0
        if fallbacks:  # 2.20 collapses them to one composite, the first fallback value (they are all the same)
            return fallbacks[0] if release_at_least(health.release, "2.20") else sum(fallbacks) + sum(values.values())
        if error:
            return None
        try:
            out = formula.evaluate(values)
        except FormulaError:
            return None
        return metric_value(out) if math.isfinite(out) else None

    def _keda_result(self, k: int, total: float | None) -> tuple[float | None, bool]:
        """``(value, failed)``: trigger ``k``'s query result as KEDA's Prometheus scaler returns it
        (``ExecutePromQuery``): an empty result (``total`` None) is 0 with ``ignoreNullValues`` (KEDA's
        default), an error without it."""
        if total is not None:
            return total, False
        return (0.0, False) if k in self._null_zero else (None, True)

    def _external_replicas(self, pods: list[Pod], current: int, total: float, target: float, value_target: bool,
                           tol: Tolerance) -> int:
        if value_target:
            ready = self.sim.cluster.ready_count()
            return value_metric_replicas(current, total, target, ready, tol)
        existing = sum(1 for p in pods if p.state != PodState.TERMINATING)  # the scale's status.replicas
        return average_value_metric_replicas(existing, total, target, tol)

    def _sample(self, pod: Pod, metric: str, now: float, query: str, window_s: float, quantile: float) -> PodSample:
        st = pod.state
        # upstream's phase: Pending until a container runs (waiting for a node, pulling the image), Running
        # after (loading the model, CrashLoopBackOff); groupPods leaves Pending pods out of a scale-down
        if st == PodState.PENDING or (st == PodState.STARTING and not self.sim.cluster.container_running(pod)):
            return PodSample(None, "Pending", ready=False)
        v = self.value(pod, metric, now, query, window_s, quantile)
        if v is not None and math.isnan(v):
            v = 0.0  # prometheus-adapter answers a NaN as 0 (metricFor, kubernetes-sigs/prometheus-adapter#308)
        if st == PodState.TERMINATING:
            return PodSample(v, "Running", ready=False, deleting=True)
        return PodSample(v, "Running", ready=pod.ready_condition)

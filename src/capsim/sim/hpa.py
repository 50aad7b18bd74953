"""The HPA in a run: the metric pipeline that feeds it and the controller loop that calls the policy.

Pipeline, as in a cluster with Prometheus and prometheus-adapter: every ``scrape_interval_s`` each
serving pod's /metrics is scraped (queue depth and requests in flight as gauges; busy seconds, TTFT sum
and count as counters). At each sync (every ``sync_period_s``) the HPA asks the adapter for each pod's
value, and the adapter answers from the samples in the window ``(a - query_window_s, a]`` with
``a = now - adapter_lag_s``: gauges averaged (``avg_over_time``), counters as a rate over the window
(busy fraction = increase of busy seconds / elapsed; TTFT = increase of the sum / increase of the count).
A pod without samples there has no value. The per-metric proposals come from
``capsim.policy.autoscaling.pods_metric_replicas`` and the decision from ``HorizontalPodAutoscaler``.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from capsim.model.scenario import POD_METRIC_ALIASES
from capsim.policy.autoscaling import PodSample, pods_metric_replicas
from capsim.sim.continuous import ContinuousPod
from capsim.sim.pod import Pod, PodState

if TYPE_CHECKING:
    from capsim.sim.simulate import Simulation

_SERVING = (PodState.READY, PodState.TERMINATING)
#: sample fields of vLLM's gauges: waiting, running, KV-cache use (then ITL sum, ITL count, preemptions)
_GAUGES = {"waiting": 6, "running": 7, "kv_cache": 8}


def _engine_gauges(pod: Pod) -> tuple[float, float, float, float, float, float]:
    """vLLM's view of a pod: waiting, running, KV-cache use, ITL sum (s) and count, preemptions."""
    if isinstance(pod, ContinuousPod):
        return (pod.num_waiting, pod.num_running, pod.kv_cache_usage, pod.itl_sum_s, pod.itl_count,
                pod.sched.num_preemptions)
    running = sum(b.live_size for b in pod.running)  # a static pod: its batches are what runs
    return (len(pod.queue), running, math.nan, 0.0, 0, 0)


class Autoscaling:
    """Scrapes pods and runs the HPA controller loop of a scenario's ``autoscaler`` section."""

    def __init__(self, sim: Simulation) -> None:
        spec = sim.scenario.autoscaler
        assert spec is not None
        self.sim = sim
        self.spec = spec
        self.hpa = spec.to_hpa()
        self.metrics = [(POD_METRIC_ALIASES[m.name], m.target) for m in self.hpa.metrics]
        self.last_value = math.nan  # the first metric's mean over pods with a value, as the HPA last saw it
        self.syncs: list[tuple[float, int, int, float]] = []  # (time, current, desired, first metric)
        self._keep_s = spec.query_window_s + spec.adapter_lag_s + spec.scrape_interval_s
        sim.env.process(self._scrape())
        sim.env.process(self._sync())

    def _scrape(self) -> Generator[Any, Any, None]:
        env = self.sim.env
        every = self.spec.scrape_interval_s
        while True:
            now = env.now
            for pod in self.sim.cluster.pods:
                if pod.state in _SERVING:
                    pod.samples.append((now, len(pod.queue), pod.outstanding, pod.busy_total_s(now),
                                        pod.ttft_sum_s, pod.ttft_count, *_engine_gauges(pod)))
                while pod.samples and pod.samples[0][0] < now - self._keep_s:
                    pod.samples.popleft()
            yield env.timeout(every)

    def value(self, pod: Pod, metric: str, now: float) -> float | None:
        """The metric value of ``pod`` the adapter reports at ``now`` (``None``: no sample)."""
        a = now - self.spec.adapter_lag_s
        lo = a - self.spec.query_window_s
        sel = [s for s in pod.samples if lo < s[0] <= a]
        if not sel:
            return None
        if metric == "queue_depth":
            return sum(s[1] for s in sel) / len(sel)
        if metric == "in_flight":
            return sum(s[2] for s in sel) / len(sel)
        if metric in _GAUGES:
            k = _GAUGES[metric]
            return sum(s[k] for s in sel) / len(sel)
        if len(sel) < 2:  # a rate needs two samples, as rate() does
            return None
        first, last = sel[0], sel[-1]
        if metric == "busy":
            return (last[3] - first[3]) / (last[0] - first[0])
        if metric == "preemptions":
            return (last[11] - first[11]) / (last[0] - first[0])
        if metric == "itl":
            count = last[10] - first[10]
            return (last[9] - first[9]) / count if count > 0 else None
        count = last[5] - first[5]
        return (last[4] - first[4]) / count if count > 0 else None

    def _sync(self) -> Generator[Any, Any, None]:
        env = self.sim.env
        cluster = self.sim.cluster
        tol = self.hpa.metric_tolerance
        while True:
            yield env.timeout(self.spec.sync_period_s)
            now = env.now
            current = cluster.desired
            pods = [p for p in cluster.pods if p.state != PodState.GONE]
            proposals: list[int | None] = []
            for k, (metric, target) in enumerate(self.metrics):
                samples = [self._sample(p, metric, now) for p in pods]
                if k == 0:
                    vals = [s.value for s in samples if s.value is not None]
                    self.last_value = sum(vals) / len(vals) if vals else math.nan
                try:
                    proposals.append(pods_metric_replicas(current, samples, target, tol))
                except ValueError:  # no pods or no samples: the metric failed this sync
                    proposals.append(None)
            desired = self.hpa.reconcile(now, current, proposals)
            self.syncs.append((now, current, desired, self.last_value))
            if desired != current:
                cluster.scale_to(desired, now)

    def _sample(self, pod: Pod, metric: str, now: float) -> PodSample:
        st = pod.state
        if st == PodState.PENDING:
            return PodSample(None, "Pending", ready=False)
        if st == PodState.TERMINATING:
            return PodSample(self.value(pod, metric, now), "Running", ready=False, deleting=True)
        return PodSample(self.value(pod, metric, now), "Running", ready=st == PodState.READY)

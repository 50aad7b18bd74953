"""The canary analysis's Prometheus: what a measurement of a canary (``pods.rollouts``' metric checks) reads, as
the exported Argo Rollouts AnalysisTemplate's queries (``capsim.export.analysis``) answer them.

Prometheus scrapes every pod's /metrics every ``scrape_interval_s`` (the autoscaler's, 15 s without one) at the
pod's own phase, from its server's start (the model loaded, before its readiness probe passes: series at 0 until its
first requests), and a gateway's once per interval too. A scrape records each pod's counters since its container
started (a restarted process counts from 0 again): its TTFT histogram's buckets and its inter-token latency
histogram's sum and count, which vLLM creates at start, and its requests by status class
(``http_requests_total{status}``), a series that appears at its first request of that class. The gateway counts
each version's attempts by response code (``istio_requests_total{destination_version,response_code}``), summed
over the version's pods, gone ones too; an error series appears at the version's first error. A pod that stops
serving (it crashed, or it was deleted) ends its series; what it counted after its last scrape is never read.

A measurement at ``t`` over the window ``w`` reads the samples in ``(t - w, t]``, so the newest may be up to one
interval old, and takes each series' ``increase``, extrapolated to the window's edges as Prometheus does
(``capsim.sim.promql_eval``: half an interval beyond a series that starts or ends inside the window, counter
resets counted). A series with fewer than two samples in the window gives nothing, so the first errors of a
version whose error series appears inside the window are missed, as in Prometheus. Then, over the side's series
(the canary's template, or every other):

- ``histogram_quantile(0.99, sum by (le) (increase(vllm:time_to_first_token_seconds_bucket[w])))``;
- ``sum(increase(vllm:inter_token_latency_seconds_sum[w])) / sum(increase(..._count[w]))``;
- ``(sum(increase(<errors>[w])) or vector(0)) / sum(increase(<all attempts>[w]))``, from the pods' own
  ``http_requests_total`` (``error_rate_source: pod``) or the gateway's ``istio_requests_total``.

Each is NaN where the query's result holds no series, or is 0/0 (nothing observed), as the simulator fails it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from itertools import accumulate
from typing import TYPE_CHECKING, cast

from simpy.events import Timeout

from capsim.model.buckets import TTFT_BUCKETS_S
from capsim.sim.pod import Pod, PodState
from capsim.sim.promql_eval import (
    Samples,
    extrapolated_rate,
    first_scrape,
    in_window,
    mark_stale,
    summed_quantile,
    trim,
)

if TYPE_CHECKING:
    from capsim.sim.simulate import Simulation

__all__ = ["DEFAULT_SCRAPE_INTERVAL_S", "AnalysisProm", "Reading", "Rows"]

#: Prometheus's scrape interval for the analysis without an autoscaler section (with one: its scrape_interval_s)
DEFAULT_SCRAPE_INTERVAL_S = 15.0

#: A pod's scrapes (``Samples``) hold: time, its TTFT buckets' cumulative counts (None: not tracked), ITL sum (s),
#: ITL count, what it answered and the errors its server counted, all since its container started.

#: One series' samples in a window: (time, value), oldest first.
Rows = list[tuple[float, float]]

#: the TTFT histogram's ``le`` series, by bucket (the last +Inf)
_LE = tuple(f"le{k}" for k in range(len(TTFT_BUCKETS_S) + 1))

#: What a measurement read of one side (the canary's pods or the others): p99 TTFT (s), mean ITL (s), error share.
Reading = tuple[float, float, float]


def _increase(rows: Rows, start: float, end: float) -> float | None:
    """``increase(counter[end - start])`` at ``end`` over a series' samples in ``(start, end]`` (None: under two)."""
    if len(rows) < 2:
        return None
    r = extrapolated_rate([t for t, _ in rows], [v for _, v in rows], start, end)
    assert r is not None
    return r * (end - start)


def _sum(values: Iterable[float | None]) -> float | None:
    """``sum()`` of the series an expression kept (None: no series, an empty result)."""
    kept = [v for v in values if v is not None]
    return math.fsum(kept) if kept else None


def _ratio(num: float | None, den: float | None) -> float:
    """``num / den`` as PromQL divides two one-series vectors; NaN where either is empty."""
    if num is None or den is None:
        return math.nan
    if den == 0:
        return math.nan if num == 0 else math.copysign(math.inf, num)
    return num / den


class AnalysisProm:
    """Scrapes the pods (and the gateway) and answers a canary measurement's queries over the scrapes."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        sc = sim.scenario
        self.interval_s = sc.autoscaler.scrape_interval_s if sc.autoscaler is not None else DEFAULT_SCRAPE_INTERVAL_S
        checked = [ro for ro in sc.pods.rollouts if ro.metrics_checked]
        self._keep_s = max(ro.check_window_s for ro in checked) + self.interval_s
        self._offsets = sim.streams["analysis_scrape"]
        self.scrapes: dict[int, Samples] = {}  # pod id -> its scrapes, oldest first
        #: the gateway's scrapes: (time, {template: (attempts answered, attempts ended in error)}) since time 0
        self.gateway: deque[tuple[float, dict[int, tuple[int, int]]]] = deque()
        if any(ro.error_checked and ro.error_rate_source == "gateway" for ro in checked):
            first = self.interval_s * float(self._offsets.random())
            Timeout(sim.env, first, first).callbacks.append(self._scrape_gateway)
        #: per measurement: (time, the canary's template, the canary's reading, the other pods')
        self.reads: list[tuple[float, int, Reading, Reading]] = []

    # ---- scrapes ------------------------------------------------------------------------------------------------
    def pod_created(self, pod: Pod, now: float) -> None:
        """A new pod becomes a target: its first scrape at the first time on its grid at or after ``now``."""
        every = self.interval_s
        at = first_scrape(every * float(self._offsets.random()), every, now)
        self.scrapes[pod.id] = deque()
        Timeout(self.sim.env, at - self.sim.env.now, (pod, at)).callbacks.append(self._scrape)

    def _scrape(self, ev: Timeout) -> None:
        pod, at = cast(tuple[Pod, float], ev.value)
        rows = self.scrapes[pod.id]
        down = self.sim.faults.has_metrics_outages and self.sim.faults.metrics_down(at)
        if pod.state == PodState.GONE or (not pod.metrics_up and not down):
            mark_stale(rows, at)  # the target left, or its scrape failed: the series end
        elif not down:
            rows.append(self._sample(pod, at))
        trim(rows, at - self._keep_s)
        if pod.state != PodState.GONE:
            nxt = at + self.interval_s
            Timeout(self.sim.env, self.interval_s, (pod, nxt)).callbacks.append(self._scrape)

    @staticmethod
    def _sample(pod: Pod, at: float) -> tuple[object, ...]:
        c, b = pod.scrape_counters(at), pod.counters_base
        cumulative = None
        if pod.ttft_buckets is not None:
            base = pod.buckets_base or (0,) * len(pod.ttft_buckets)
            cumulative = tuple(accumulate(x - y for x, y in zip(pod.ttft_buckets, base, strict=True)))
        ok0, err0 = pod.http_base
        return (at, cumulative, c[2] - b[2], c[3] - b[3], pod.answered - ok0, pod.errors - pod.refused - err0)

    def _scrape_gateway(self, ev: Timeout) -> None:
        at = cast(float, ev.value)
        if not (self.sim.faults.has_metrics_outages and self.sim.faults.metrics_down(at)):
            counts: dict[int, tuple[int, int]] = {}
            for p in self.sim.cluster.pods:
                ok, err = counts.get(p.revision, (0, 0))
                counts[p.revision] = (ok + p.answered, err + p.errors)
            self.gateway.append((at, counts))
        trim(self.gateway, at - self._keep_s)
        Timeout(self.sim.env, self.interval_s, at + self.interval_s).callbacks.append(self._scrape_gateway)

    # ---- a measurement ------------------------------------------------------------------------------------------
    def measure(self, template: int, at: float, window_s: float, source: str) -> tuple[Reading, Reading]:
        """What the queries answer at ``at`` over ``window_s`` for ``template``'s pods and for the others (the
        error share as ``source``, ``gateway`` or ``pod``, counts it); kept in ``reads``."""
        canary = self._side(template, True, at, window_s, source)
        base = self._side(template, False, at, window_s, source)
        self.reads.append((at, template, canary, base))
        return canary, base

    def series(self, template: int, canary: bool, at: float, w: float, source: str) -> dict[str, list[Rows]]:
        """The samples each query of a side reads at ``at`` over ``w``: per counter (``le0``, ``le1``, ... for the
        TTFT buckets, ``itl_sum``, ``itl_count``, ``errors`` and ``ok`` for the attempts by status), one list of
        (time, value) per series, its samples in ``(at - w, at]``."""
        out: dict[str, list[Rows]] = {name: [] for name in (*_LE, "itl_sum", "itl_count", "errors", "ok")}
        for p in self.sim.cluster.pods:
            if (p.revision == template) != canary:
                continue
            sel = in_window(self.scrapes[p.id], at, w)
            if sel and sel[0][1] is not None:
                for k, name in enumerate(_LE):
                    out[name].append([(s[0], s[1][k]) for s in sel])
            out["itl_sum"].append([(s[0], s[2]) for s in sel])
            out["itl_count"].append([(s[0], s[3]) for s in sel])
            if source == "pod":  # a status class's series exists once the process counted one of it
                out["ok"].append([(s[0], s[4]) for s in sel if s[4] > 0])
                out["errors"].append([(s[0], s[5]) for s in sel if s[5] > 0])
        if source != "pod":  # the gateway's series of each version on this side
            versions = {v for _, counts in self.gateway for v in counts if (v == template) == canary}
            for v in sorted(versions):
                sel_g = [(t, counts[v]) for t, counts in in_window(self.gateway, at, w) if v in counts]
                out["ok"].append([(t, c[0]) for t, c in sel_g if c[0] > 0])
                out["errors"].append([(t, c[1]) for t, c in sel_g if c[1] > 0])
        return out

    def _side(self, template: int, canary: bool, at: float, w: float, source: str) -> Reading:
        lo = at - w
        rows = self.series(template, canary, at, w, source)
        inc = {name: [_increase(r, lo, at) for r in series] for name, series in rows.items()}
        summed = [_sum(inc[name]) for name in _LE]
        p99 = math.nan if summed[-1] is None else summed_quantile(
            0.99, TTFT_BUCKETS_S, [v if v is not None else 0.0 for v in summed])
        errors = _sum(inc["errors"])
        return (p99, _ratio(_sum(inc["itl_sum"]), _sum(inc["itl_count"])),
                _ratio(0.0 if errors is None else errors, _sum(inc["errors"] + inc["ok"])))

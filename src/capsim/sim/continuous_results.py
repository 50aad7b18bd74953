"""Continuous-mode counters and results: the per-request columns, the run's totals, the time-series columns."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from capsim.policy.scheduling import SchedulerLimits
from capsim.sim.prefix import NoPrefix, PrefixSource
from capsim.sim.recorder import percentiles
from capsim.sim.summary import Summary

if TYPE_CHECKING:
    from capsim.sim.pod import Pod
    from capsim.sim.step_time import StepTimeModel
    from capsim.sim.streams import FactorWalk


class ContinuousStats:
    """Per-request columns and run-wide counters of continuous-mode pods (``Simulation.continuous``)."""

    def __init__(self, n: int, limits: SchedulerLimits, step_time: StepTimeModel,
                 prefix: PrefixSource | None = None) -> None:
        self.limits = limits
        self.step_time = step_time
        self.preemptions = np.zeros(n, dtype=np.int32)  # per request, over all its attempts
        self.cached = np.zeros(n, dtype=np.int32)  # prompt tokens its (last) admission found in the prefix cache
        #: each request's full-block hashes for the prefix cache (``None``: caching off or nothing shared)
        self.prefix: PrefixSource | None = None
        self.unservable = np.zeros(n, dtype=bool)
        self.ids = np.arange(n, dtype=np.int64)  # a Run's idx is its one-element slice (no array per request)
        self.steps = 0
        self.n_preemptions = 0
        self.kv_area = 0.0  # sum over steps of KV-cache use x step time (s)
        self.busy_s = 0.0  # sum of step times
        self.kv_peak = 0.0
        self.events = 0  # SimPy events the step loops used (a run of decode steps is one)
        self.max_run_steps = 4096  # longest run of decode steps taken as one event; 1: one event per step
        self.answer_s = 0.0  # service.answer_ms: a request's end_s is its last token plus this (not its ITL)
        self.ingress: FactorWalk | None = None  # service.ingress_noise: each request's factor on ingress_ms
        if limits.enable_prefix_caching and prefix is not None and not isinstance(prefix, NoPrefix):
            self.prefix = prefix


# ---- results ---------------------------------------------------------------------------------------------
#: Time-series columns of a continuous-mode run: KV-cache use (mean and max over serving pods), and the
#: engines' running and waiting requests (summed), as vLLM's gauges name them.
CONTINUOUS_COLUMNS = ("kv_cache_usage", "kv_cache_usage_max", "num_requests_running", "num_requests_waiting",
                      "prefix_cache_queries", "prefix_cache_hits")


def continuous_row(serving: list[Pod]) -> tuple[float, ...]:
    """The ``CONTINUOUS_COLUMNS`` of one time-series row, from the serving pods."""
    from capsim.sim.continuous import ContinuousPod  # here: continuous.py imports this module

    pods = [p for p in serving if isinstance(p, ContinuousPod)]
    if not pods:
        return (math.nan, math.nan, 0, 0, 0, 0)
    use = [p.kv_cache_usage for p in pods]
    # the prefix counters are the pods' own (vLLM's, cumulative per engine: a restarted pod starts at 0)
    return (sum(use) / len(use), max(use), sum(p.num_running for p in pods), sum(p.num_waiting for p in pods),
            sum(p.sched.prefix_queries_tokens for p in pods), sum(p.sched.prefix_hit_tokens for p in pods))


def continuous_results(stats: ContinuousStats, requests: Any, summary: Summary, warmup_s: float) -> Summary:
    """Add the per-request columns ``itl_s``, ``preemptions``, ``unservable`` and ``cached_tokens`` (prompt
    tokens the last admission reused from the prefix cache) to the requests frame (in place) and return the summary with the continuous-mode numbers filled in."""
    ids = requests["request_id"].to_numpy()
    out = requests["output_tokens"].to_numpy()
    span = requests["end_s"].to_numpy() - requests["first_token_s"].to_numpy() - stats.answer_s
    ok = (requests["outcome"] == "ok").to_numpy()
    itl = np.where(ok & (out > 1), span / np.maximum(out - 1, 1), np.nan)
    requests["itl_s"] = itl
    requests["preemptions"] = stats.preemptions[ids]
    requests["unservable"] = stats.unservable[ids]
    requests["cached_tokens"] = stats.cached[ids]
    measured = itl[requests["arrival_s"].to_numpy() >= warmup_s]
    p50, p99 = percentiles(measured, (50, 99))
    return dataclasses.replace(
        summary, itl_p50_s=p50, itl_p99_s=p99, preemptions=stats.n_preemptions, steps=stats.steps,
        kv_cache_usage_mean=stats.kv_area / stats.busy_s if stats.busy_s > 0 else math.nan,
        kv_cache_usage_peak=stats.kv_peak,
    )

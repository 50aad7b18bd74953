"""Queries as prometheus-adapter runs them, on metrics that mean what the real pod's mean (issue 15 §4).

The simulated busy ratio is the real pod's gauge (``capsim.core.metrics.InferenceMetrics``, fed the same
batches at the same scrape times), TTFT enters the histogram when the pod answers (as the real batcher
observes it), and each metric's query is a setting with the adapter's defaults (a gauge's instant value).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from capsim.export.adapter import adapter_rules
from capsim.model.buckets import TTFT_BUCKETS_S, bucket_quantile
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim import Simulation

BUSY = "capsim_gpu_busy_ratio"
TTFT = "capsim_time_to_first_token_seconds"


def one_pod(metric: str, *, rate: float = 5.0, service_s: float = 0.1, horizon: float = 300.0,
            **autoscaler: Any) -> Scenario:
    """One pod that never scales; the window keeps every sample of the run."""
    return Scenario.model_validate({
        "horizon_s": horizon,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": rate}},
        "service": {"kind": "deterministic", "mean_s": service_s},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0, "queue_capacity": 100000},
        "pods": {"replicas": 1, "startup_s": 5},
        "autoscaler": {
            "minReplicas": 1, "maxReplicas": 1,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": metric},
                                                  "target": {"type": "AverageValue", "averageValue": "1"}}}],
            "scrape_interval_s": 15, "query_window_s": 1000, **autoscaler,
        },
        "client": {"timeout_s": 1e6},
    })


def test_the_busy_ratio_is_the_real_pods_gauge(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import capsim.core.metrics as core_metrics

    sim = Simulation(one_pod(BUSY), seed=0)
    r = sim.run()
    pod = sim.cluster.pods[0]
    req = r.requests[(r.requests["pod"] == 0) & (r.requests["outcome"] == "ok")]
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])  # the pod's gauge reads its clock
    real = core_metrics.InferenceMetrics()
    prev = -math.inf
    compared = 0
    for s in pod.samples:
        t, busy = s[0], s[3]
        ended = req[(req["end_s"] > prev) & (req["end_s"] <= t)]
        for start, end in zip(ended["start_s"], ended["end_s"], strict=True):
            real.observe_batch(1, end - start)
        clock[0] = t
        expected = real.registry.get_sample_value("capsim_gpu_busy_ratio")
        assert expected is not None and not math.isnan(expected)  # the first scrape reads from the start
        assert busy == pytest.approx(expected, abs=1e-9)
        compared += 1
        prev = t
    assert compared == len(pod.samples) >= 15 and 0.3 < float(np.mean([s[3] for s in pod.samples])) < 0.7


def test_ttft_is_observed_when_the_pod_answers() -> None:
    # 4 s batches one at a time: at most scrapes a request has started and not been answered yet
    sim = Simulation(one_pod(TTFT, rate=0.2, service_s=4.0), seed=0)
    r = sim.run()
    req = r.requests[r.requests["pod"] == 0]
    answered = req[req["outcome"] == "ok"]
    started_not_answered = 0
    for s in sim.cluster.pods[0].samples:
        t, ttft_sum, ttft_count = s[0], s[4], s[5]
        done = answered[answered["end_s"] <= t]
        assert ttft_count == len(done)
        assert ttft_sum == pytest.approx(float((done["first_token_s"] - done["arrival_s"]).sum()), abs=1e-9)
        started_not_answered += int(((req["start_s"] <= t) & ~(req["end_s"] <= t)).sum())
    assert started_not_answered > 0  # the old simulator counted these at their batch's start


def test_a_gauge_is_read_as_an_instant_value_by_default() -> None:
    sc = one_pod("capsim_queue_depth", rate=12.0, adapter_lag_s=7.0)
    assert sc.autoscaler is not None and sc.autoscaler.query_of("capsim_queue_depth")[0] == "instant"
    sim = Simulation(sc, seed=1)
    sim.run()
    auto, pod = sim.autoscaling, sim.cluster.pods[0]
    assert auto is not None
    now = sc.horizon_s
    visible = [s for s in pod.samples if s[0] <= now - 7.0]
    assert auto.value(pod, "queue_depth", now, "instant", 60.0) == visible[-1][1]
    in_window = [s[1] for s in visible if s[0] > now - 7.0 - 60.0]
    assert auto.value(pod, "queue_depth", now, "avg_over_time", 60.0) == pytest.approx(np.mean(in_window))
    assert auto.value(pod, "queue_depth", now, "max_over_time", 60.0) == max(in_window)
    assert len(in_window) == 4
    # with the default query the syncs read the instant value: the run differs from an averaged one
    avg = Simulation(one_pod("capsim_queue_depth", rate=12.0, adapter_lag_s=7.0,
                             queries={"capsim_queue_depth": {"query": "avg_over_time", "window_s": 60}}), seed=1)
    avg.run()
    assert avg.autoscaling is not None
    assert [v for *_, v in avg.autoscaling.syncs] != [v for *_, v in auto.syncs]


def test_histogram_quantile_interpolates_as_prometheus() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert bucket_quantile(0.5, bounds, [10, 10, 0, 0]) == pytest.approx(1.0)
    assert bucket_quantile(0.75, bounds, [10, 10, 0, 0]) == pytest.approx(1.5)
    assert bucket_quantile(0.5, bounds, [0, 0, 0, 5]) == 4.0  # in +Inf: the highest finite bound
    assert math.isnan(bucket_quantile(0.5, bounds, [0, 0, 0, 0]))
    with pytest.raises(ValueError, match="4 entries"):
        bucket_quantile(0.5, bounds, [1, 2])


def test_a_ttft_quantile_query_reads_the_pods_buckets() -> None:
    sc = one_pod(TTFT, rate=8.0, service_s=0.1,
                 queries={TTFT: {"query": "histogram_quantile", "quantile": 0.9, "window_s": 120}})
    sim = Simulation(sc, seed=2)
    r = sim.run()
    auto, pod = sim.autoscaling, sim.cluster.pods[0]
    assert auto is not None
    now = sc.horizon_s
    sel = [s for s in pod.samples if now - 120 < s[0] <= now]
    first, last = sel[0], sel[-1]
    req = r.requests[(r.requests["pod"] == 0) & (r.requests["outcome"] == "ok")]
    window = req[(req["end_s"] > first[0]) & (req["end_s"] <= last[0])]
    ttft = (window["first_token_s"] - window["arrival_s"]).to_numpy()
    counts = np.bincount(np.searchsorted(TTFT_BUCKETS_S, ttft, side="left"), minlength=len(TTFT_BUCKETS_S) + 1)
    expected = bucket_quantile(0.9, TTFT_BUCKETS_S, counts.tolist())
    got = auto.value(pod, "ttft", now, "histogram_quantile", 120.0, 0.9)
    assert got == pytest.approx(expected)
    assert got is not None and float(np.quantile(ttft, 0.9)) <= got * 1.6  # within its bucket
    rule = adapter_rules(sc)["rules"][0]["metricsQuery"]
    assert rule == (f"histogram_quantile(0.9, sum(rate({TTFT}_bucket{{<<.LabelMatchers>>}}[120s])) "
                    "by (le, <<.GroupBy>>))")


def test_queries_are_checked_against_the_metrics() -> None:
    with pytest.raises(SettingsError, match=r"autoscaler.*queries\.capsim_queue_depth\.query must be one of "
                                            r"\['instant', 'avg_over_time', 'max_over_time'\] for a gauge, got 'rate'"):
        one_pod("capsim_queue_depth", queries={"capsim_queue_depth": {"query": "rate"}})
    with pytest.raises(SettingsError, match=r"queries\.ttft: no metric of this name"):
        one_pod("capsim_queue_depth", queries={"ttft": {"query": "rate"}})
    with pytest.raises(SettingsError, match="quantile"):
        one_pod(TTFT, queries={TTFT: {"query": "histogram_quantile", "quantile": 1.5}})
    sc = one_pod(TTFT)
    assert sc.autoscaler is not None and sc.autoscaler.query_of(TTFT) == ("rate", 1000.0, 0.99)


def _scaling(metric: str, query: str, target: str, rates: list[list[float]], replicas: int,
             max_replicas: int) -> Scenario:
    """A Deployment of ``replicas`` pods (at most ``max_replicas``) scaling on ``metric`` read by ``query``
    over 60 s, under a piecewise load ``rates``."""
    return Scenario.model_validate({
        "horizon_s": 1500,
        "workload": {"arrivals": {"kind": "piecewise", "rate_per_s": rates}},
        "service": {"kind": "deterministic", "mean_s": 0.1},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0, "queue_capacity": 100000},
        "pods": {"replicas": replicas, "startup_s": 5},
        "autoscaler": {
            "minReplicas": 1, "maxReplicas": max_replicas,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": metric},
                                                  "target": {"type": "AverageValue", "averageValue": target}}}],
            "queries": {metric: {"query": query, "window_s": 60}},
            "scrape_interval_s": 15, "sync_period_s": 15,
        },
        "client": {"timeout_s": 1e6},
    })


@pytest.mark.parametrize("query", ["rate", "histogram_quantile"])
def test_a_pod_that_observed_nothing_in_the_window_reads_0_as_the_adapter_answers_its_nan(query: str) -> None:
    """A TTFT mean over a window without a request is 0/0 and a quantile of empty buckets NaN; Prometheus
    returns the pod's series with NaN and prometheus-adapter answers it as 0 (``metricFor``,
    kubernetes-sigs/prometheus-adapter#308), so an HPA on TTFT scales an idle Deployment down to its
    minimum; read as no value (every pod missing: no metric), it would hold four pods for good."""
    # four pods serving 5 requests/s for 10 minutes (TTFT at least the 0.1 s target: they hold), then none
    sim = Simulation(_scaling(TTFT, query, "100m", [[0, 5.0], [600, 0.0]], 4, 4), seed=0)
    r = sim.run()
    auto = sim.autoscaling
    assert auto is not None
    seen = [auto.value(p, "ttft", 1500.0, query, 60.0) for p in sim.cluster.pods if p.samples]
    assert seen and all(v is not None and math.isnan(v) for v in seen)  # a series each, whose value is NaN
    later = [(t, cur, v) for t, cur, _, v in auto.syncs if t > 700]
    assert all(v == 0.0 for _, _, v in later)  # the HPA's read: 0 for every pod
    downs = r.scale_events[r.scale_events["to_replicas"] < r.scale_events["from_replicas"]]
    assert not downs.empty and downs["to_replicas"].min() == 1
    # the first step down waits out the scale-down window (300 s) after the traffic stopped
    assert 600 + 300 <= downs["time_s"].min() < 600 + 300 + 120


def test_a_pods_busy_ratio_reads_from_its_container_start_at_its_first_scrape() -> None:
    """A pod the HPA adds (and every pod at the start) reports a number at its first scrape, the busy share
    since its container started, as the real pod's gauge does: a NaN there would make an ``avg_over_time``
    over the window NaN, which the adapter answers as 0."""
    sim = Simulation(_scaling(BUSY, "avg_over_time", "500m", [[0, 15.0]], 1, 6), seed=0)
    r = sim.run()
    assert (r.scale_events["to_replicas"] > r.scale_events["from_replicas"]).any()  # pods were added
    added = [p for p in sim.cluster.pods if p.created_s > 0 and p.samples]
    assert added
    for pod in sim.cluster.pods:
        busy = [s[3] for s in pod.samples if len(s) > 1]
        assert busy and not any(math.isnan(b) for b in busy), pod.id
    for pod in added:
        first = next(s for s in pod.samples if len(s) > 1)
        start, busy0 = pod.counters_from
        assert start >= pod.created_s and first[0] > start and busy0 == 0.0  # a new pod ran nothing before
        # nothing ran before the container was ready: the first reading is diluted by the cold start
        assert 0.0 <= first[3] < 1.0


def test_max_over_time_is_prometheus_s_a_nan_gives_way_to_a_number() -> None:
    from capsim.sim.promql_eval import max_over_time as _max_over_time

    assert _max_over_time([1.0, 3.0, 2.0]) == 3.0
    assert _max_over_time([math.nan, 1.0, 0.5]) == 1.0  # a busy ratio's NaN first scrape, then numbers
    assert _max_over_time([2.0, math.nan, 1.0]) == 2.0
    assert math.isnan(_max_over_time([math.nan, math.nan]))
    sc = one_pod("vllm:num_requests_waiting", queries={"vllm:num_requests_waiting": {
        "query": "max_over_time", "window_s": 60}})
    (rule,) = adapter_rules(sc)["rules"]
    assert rule["metricsQuery"] == ("sum(max_over_time(vllm:num_requests_waiting{<<.LabelMatchers>>}[60s])) "
                                    "by (<<.GroupBy>>)")

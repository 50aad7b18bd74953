"""Prometheus's range functions as the simulated adapter evaluates them (``capsim.sim.promql_eval``), worked by hand;
``test_prometheus_parity.py`` checks the same against a real Prometheus. And what a deleted pod leaves in a KEDA
trigger's sum."""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

import pytest

from capsim.model.buckets import TTFT_BUCKETS_S, bucket_quantile
from capsim.model.scenario import Scenario
from capsim.sim import Simulation
from capsim.sim.pod import PodState
from capsim.sim.promql_eval import extrapolated_rate, rate_quantile


def test_a_series_scraped_through_the_window_reads_its_slope() -> None:
    # every 15 s from 10.5 s; the window (0, 60]: 10.5 s to its start and 4.5 s to its end, both within 1.1 intervals
    times, values = [10.5, 25.5, 40.5, 55.5], [1000.0, 1100.0, 1250.0, 1400.0]
    assert extrapolated_rate(times, values, 0.0, 60.0) == pytest.approx(400.0 / 45.0)


def test_a_counter_from_zero_is_not_extrapolated_back_past_its_zero() -> None:
    # a new container: the counter's zero is its first sample, so nothing before it; 4.5 s after the last
    times, values = [10.5, 25.5, 40.5, 55.5], [0.0, 100.0, 250.0, 400.0]
    assert extrapolated_rate(times, values, 0.0, 60.0) == pytest.approx(400.0 * (45.0 + 4.5) / 45.0 / 60.0)
    # 5 at the first sample, rising 2 a second: its zero 2.5 s before, not the window's start 10.5 s before
    assert extrapolated_rate(times, [5.0, 35.0, 65.0, 95.0], 0.0, 60.0) == pytest.approx(
        90.0 * (45.0 + 2.5 + 4.5) / 45.0 / 60.0)
    # 50 at the first: its zero 25 s before, past the window's start, which bounds it
    assert extrapolated_rate(times, [50.0, 80.0, 110.0, 140.0], 0.0, 60.0) == pytest.approx(90.0 / 45.0)


def test_a_series_that_starts_inside_the_window_extrapolates_half_an_interval() -> None:
    # two samples 15 s apart, 30.5 s after the window's start (over 1.1 intervals): 7.5 s before the first
    assert extrapolated_rate([30.5, 45.5], [1000.0, 1100.0], 0.0, 60.0) == pytest.approx(
        100.0 * (15.0 + 7.5 + 14.5) / 15.0 / 60.0)
    # one that ends inside it: 7.5 s after the last
    assert extrapolated_rate([5.0, 20.0], [1000.0, 1100.0], 0.0, 60.0) == pytest.approx(
        100.0 * (15.0 + 5.0 + 7.5) / 15.0 / 60.0)


def test_a_reset_counts_what_the_counter_held_before_it() -> None:
    # 100 -> 150, a restart (20), -> 70: an increase of 50 + 20 + 50 = 120; the counter's zero caps the start
    times = [10.0, 25.0, 40.0, 55.0]
    got = extrapolated_rate(times, [100.0, 150.0, 20.0, 70.0], 0.0, 60.0)
    assert got == pytest.approx(120.0 * (45.0 + 10.0 + 5.0) / 45.0 / 60.0)


def test_a_rate_needs_two_samples() -> None:
    assert extrapolated_rate([], [], 0.0, 60.0) is None
    assert extrapolated_rate([30.0], [5.0], 0.0, 60.0) is None


def test_a_quantile_of_rates_through_the_window_is_the_quantile_of_the_increase() -> None:
    n = len(TTFT_BUCKETS_S) + 1
    first = [50] * n
    last = [50 + 3 * k for k in range(n)]
    mid = [(a + b) // 2 for a, b in zip(first, last, strict=True)]
    got = rate_quantile(0.9, TTFT_BUCKETS_S, [10.5, 25.5, 40.5, 55.5], [first, mid, mid, last], 0.0, 60.0)
    assert got == pytest.approx(bucket_quantile(0.9, TTFT_BUCKETS_S, [b - a for a, b in zip(first, last, strict=True)]))
    assert math.isnan(rate_quantile(0.9, TTFT_BUCKETS_S, [10.5, 25.5], [first, first], 0.0, 60.0) or 0.0)
    assert rate_quantile(0.9, TTFT_BUCKETS_S, [10.5], [first], 0.0, 60.0) is None


def test_an_inter_token_latency_quantile_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"queries\.vllm:inter_token_latency_seconds\.query: histogram_quantile is "
                                         r"simulated for the TTFT histogram only"):
        Scenario.model_validate({
            "autoscaler": {
                "minReplicas": 1, "maxReplicas": 2,
                "metrics": [{"type": "Pods", "pods": {"metric": {"name": "vllm:inter_token_latency_seconds"},
                                                      "target": {"type": "AverageValue", "averageValue": "0.05"}}}],
                "queries": {"vllm:inter_token_latency_seconds": {"query": "histogram_quantile"}},
            }})


def _two_pods(query: str) -> Scenario:
    """Two static pods, a KEDA-style External metric on their busy ratio read by ``query`` over 120 s (its target
    never reached: the count moves only as a test moves it), scraped every 15 s with no adapter lag."""
    spec: dict[str, Any] = {
        "horizon_s": 600,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 4.0}},
        "service": {"kind": "deterministic", "mean_s": 0.2},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0, "queue_capacity": 100000},
        "pods": {"replicas": 2, "startup_s": 5},
        "autoscaler": {
            "minReplicas": 1, "maxReplicas": 2,
            "metrics": [{"type": "External", "external": {"metric": {"name": "capsim_gpu_busy_ratio"},
                                                          "target": {"type": "AverageValue", "averageValue": "1000"}}}],
            "queries": {"capsim_gpu_busy_ratio": {"query": query, "window_s": 120}},
            "scrape_interval_s": 15, "adapter_lag_s": 0,
        },
        "client": {"timeout_s": 1e6},
    }
    return Scenario.model_validate(spec)


@pytest.mark.parametrize("query", ["instant", "avg_over_time"])
def test_a_deleted_pod_counts_in_a_range_query_of_the_deployment_while_its_window_holds_it(query: str) -> None:
    sim = Simulation(_two_pods(query), seed=1)
    auto = sim.autoscaling
    assert auto is not None
    seen: dict[str, Any] = {}

    def scale_down_then_read() -> Generator[Any, Any, None]:
        yield sim.env.timeout(200.0)
        sim.cluster.scale_to(1, 200.0)  # the HPA's way: one of the two goes
        while not any(p.state == PodState.GONE for p in sim.cluster.pods):
            yield sim.env.timeout(0.25)
        (gone,) = [p for p in sim.cluster.pods if p.state == PodState.GONE]
        now = sim.env.now  # deleted, not yet scraped again: no stale marker yet, its samples in the sum already
        seen.update(unmarked=len(gone.samples[-1]) > 1, at_once=auto._external_total(
            sim.cluster.live_pods, "busy", now, query, 120.0, 0.99), theirs_at_once=auto.value(
            gone, "busy", now, query, 120.0), own_at_once=sum(
            v for v in (auto.value(p, "busy", now, query, 120.0) for p in sim.cluster.live_pods)
            if v is not None and not math.isnan(v)))
        yield sim.env.timeout(260.0 - now)
        (gone,) = [p for p in sim.cluster.pods if p.state == PodState.GONE]
        live = sim.cluster.live_pods  # the other, and the one the HPA made to get back to its stabilised 2
        values = [auto.value(p, "busy", 260.0, query, 120.0) for p in live]
        seen.update(gone=gone, marker=len(gone.samples[-1]) == 1, live=len(live),
                    total=auto._external_total(live, "busy", 260.0, query, 120.0, 0.99),
                    own=sum(v for v in values if v is not None and not math.isnan(v)),  # a first scrape's NaN: out
                    theirs=auto.value(gone, "busy", 260.0, query, 120.0))

    sim.env.process(scale_down_then_read())
    sim.run()
    assert seen["marker"] and seen["live"] == 2  # the deleted pod's series ended with a stale marker
    assert seen["unmarked"] and seen["theirs_at_once"] is not None and seen["theirs_at_once"] > 0
    # at once, as in Prometheus until the deleted pod's next scrape, its newest sample counts, even in an instant query
    assert seen["at_once"] == pytest.approx(seen["own_at_once"] + seen["theirs_at_once"])
    if query == "instant":  # after its marker an instant query no longer finds it
        assert seen["theirs"] is None and seen["total"] == seen["own"]
    else:  # its samples before the marker still count, as they do in Prometheus's sum
        assert 0.2 < seen["theirs"] < 0.8 and seen["total"] == pytest.approx(seen["own"] + seen["theirs"])
    gone = seen["gone"]
    assert gone.id not in auto._retired and not gone.samples  # forgotten once no window can hold them


@pytest.mark.parametrize(("window_s", "missing"), [(20.0, True), (30.0, False)])
def test_a_rate_over_fewer_than_two_scrapes_leaves_reads_empty(window_s: float, missing: bool) -> None:
    """What the ``rate-window-short`` check warns of: with samples 15 s apart, a 20-s window holds one of them at a
    read unless the newer sample is under 5 s old: two reads in three have no value; a 30-s window always holds two."""
    sim = Simulation(_two_pods("avg_over_time"), seed=1)
    sim.run()
    auto = sim.autoscaling
    assert auto is not None
    (pod,) = sim.cluster.live_pods  # serving to the end (the HPA took the other away)
    reads = [auto.value(pod, "ttft", t, "rate", window_s) for t in range(420, 600)]  # its samples kept to the end
    empty = sum(v is None for v in reads) / len(reads)
    assert (empty == pytest.approx(2 / 3, abs=0.02)) if missing else empty == 0.0


def test_a_restarted_container_s_counters_start_from_zero_and_a_rate_counts_through_the_reset() -> None:
    sc = _two_pods("avg_over_time").override({
        "autoscaler.minReplicas": 2, "autoscaler.metrics": [{"type": "Pods", "pods": {
            "metric": {"name": "capsim_time_to_first_token_seconds"},
            "target": {"type": "AverageValue", "averageValue": "1000"}}}],
        "autoscaler.queries": {}, "faults": {"crashes": [{"at_s": 450, "pod": 0}]}})
    sim = Simulation(sc, seed=1)
    sim.run()
    auto = sim.autoscaling
    assert auto is not None
    pod = sim.cluster.pods[0]
    # the container restarts at once and its server is up 5 s later, inside one scrape interval, so a scrape may find
    # it down (a stale marker) or not, and it is scraped before it is ready (its counters at 0 until it serves)
    rows = [s for s in pod.samples if len(s) > 1]  # the scrapes, stale markers left out
    k = next(i for i, s in enumerate(rows) if s[0] > 450.0)
    m = next(i for i in range(k, len(rows)) if rows[i][5] > 0)
    # the last scrape before the crash, the first after it, and the first after it to count a request
    before, first, after = rows[k - 1], rows[k], rows[m]
    sel = rows[k - 1:m + 1]  # those and the scrapes between them
    assert first[5] <= after[5] < before[5] < pod.ttft_count  # /metrics restarted from 0; the pod's tally did not
    # a rate over a window holding them: Prometheus's increase through the reset is what came after it (the
    # slope from the first to the last would be below 0); the mean TTFT is the rate of its sum over its count's
    a, w = after[0], after[0] - before[0] + 1.0
    got = auto.value(pod, "ttft", a, "rate", w)
    sum_rate = extrapolated_rate([x[0] for x in sel], [x[4] for x in sel], a - w, a)
    count_rate = extrapolated_rate([x[0] for x in sel], [x[5] for x in sel], a - w, a)
    assert sum_rate is not None and count_rate is not None and count_rate > 0
    assert got == pytest.approx(sum_rate / count_rate) and 0 < got < 1
    # the increase: the reset adds what the counter held before it, so it is the count after the restart
    sampled = after[0] - before[0]
    assert count_rate == pytest.approx(after[5] * (sampled + 1.0) / sampled / w)

"""vLLM's metric names in the simulated HPA: an autoscaler written for a vLLM deployment loads and scales."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import pytest

from capsim.export.promql import PodQuery
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim.simulate import simulate


def rush(metric: str, value: str, mode: str = "continuous", **over: Any) -> Scenario:
    batching: dict[str, Any] = {"mode": mode, "queue_capacity": 100000}
    if mode == "continuous":
        batching.update({"num_blocks": 400, "max_num_seqs": 32, "block_size": 16})
    sc = Scenario.model_validate({
        "horizon_s": 300, "warmup_s": 10,
        "workload": {"arrivals": {"kind": "piecewise", "rate_per_s": [[0, 5], [60, 60]]},
                     "prompt_tokens": {"kind": "constant", "value": 200},
                     "output_tokens": {"kind": "constant", "value": 100}},
        "service": {"kind": "deterministic", "mean_s": 0.01},
        "batching": batching,
        "pods": {"replicas": 1, "startup_s": 10},
        "autoscaler": {"minReplicas": 1, "maxReplicas": 10,
                       "metrics": [{"type": "Pods", "pods": {"metric": {"name": metric},
                                                             "target": {"type": "AverageValue", "averageValue": value}}}],
                       "scrape_interval_s": 5, "sync_period_s": 5, "query_window_s": 15},
        "client": {"timeout_s": 120, "max_retries": 0},
    })
    return sc.override(over) if over else sc


@pytest.mark.parametrize(("metric", "value"), [
    ("vllm:num_requests_waiting", "5"),
    ("vllm:num_requests_running", "16"),
    ("vllm:kv_cache_usage_perc", "500m"),
    ("vllm:time_to_first_token_seconds", "100m"),
    ("vllm:inter_token_latency_seconds", "9m"),  # steps of 10 ms: always above target
    ("vllm:generation_tokens_total", "1000"),  # a pod makes up to 32 tokens a 10-ms step: 60 requests/s need 6,000
])
def test_an_hpa_on_a_vllm_metric_scales_the_continuous_pods_up_under_a_rush(metric: str, value: str) -> None:
    # the ITL equals the step time only without preemptions (a preempted request recomputes): room for all
    itl = metric == "vllm:inter_token_latency_seconds"
    r = simulate(rush(metric, value, **({"batching.num_blocks": 4000} if itl else {})), 0)
    assert r.summary.max_replicas > 1, f"{metric} never scaled up"
    hpa = r.timeseries["hpa_metric"].dropna()
    assert len(hpa) > 0 and (hpa >= 0).all()
    if metric == "vllm:inter_token_latency_seconds":  # the mean time per output token: the step time
        assert hpa.to_numpy() == pytest.approx(0.01)


def test_kv_cache_use_is_a_fraction_and_preemptions_a_rate() -> None:
    r = simulate(rush("vllm:kv_cache_usage_perc", "900m"), 1)
    kv = r.timeseries["hpa_metric"].dropna()
    assert ((kv >= 0) & (kv <= 1)).all() and kv.max() > 0.3
    p = simulate(rush("vllm:num_preemptions_total", "1", **{"batching.num_blocks": 200}), 1)
    assert p.summary.preemptions > 0 and p.timeseries["hpa_metric"].max() > 0


def test_queue_metrics_work_for_static_pods_and_engine_metrics_need_continuous_mode() -> None:
    # a static batch of up to 32 takes 1 s here: 60 requests/s queue up
    r = simulate(rush("vllm:num_requests_waiting", "5", mode="static", **{"service.mean_s": 1.0}), 0)
    assert r.summary.max_replicas > 1
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:inter_token_latency_seconds",
                 "vllm:num_preemptions_total", "vllm:generation_tokens_total", "vllm:prompt_tokens_total"):
        with pytest.raises(SettingsError, match=rf"autoscaler.metrics\[0\].pods.metric.name '{name}' needs "
                                                r"batching.mode: continuous"):
            rush(name, "1", mode="static")


def test_the_exported_queries_read_vllm_series() -> None:
    assert "vllm:kv_cache_usage_perc" in PodQuery.of("vllm:kv_cache_usage_perc", 60).adapter_query()
    itl = PodQuery.of("vllm:inter_token_latency_seconds", 60).adapter_query()
    assert "rate(vllm:inter_token_latency_seconds_sum" in itl and "_count" in itl
    assert "rate(vllm:num_preemptions_total" in PodQuery.of("vllm:num_preemptions", 30).adapter_query()


def test_the_token_counters_follow_the_requests_records() -> None:
    """``vllm:prompt_tokens_total`` counts a request's prompt at its first token (exactly what the records say);
    ``vllm:generation_tokens_total`` lies between the tokens of the requests ended by a scrape plus one for each
    started one, and every token of the started ones (each token is counted as its step ends: exactly, below)."""
    from capsim.sim import Simulation

    sim = Simulation(rush("vllm:generation_tokens_total", "2000", **{"autoscaler.maxReplicas": 1}), seed=4)
    r = sim.run()
    req = r.requests[r.requests["pod"] == 0]
    first, end = req["first_token_s"].to_numpy(), req["end_s"].to_numpy()
    out, prompt = req["output_tokens"].to_numpy(), req["prompt_tokens"].to_numpy()
    ok = (req["outcome"] == "ok").to_numpy()
    assert 0 < ok.sum() < len(req)  # the rush outruns the one pod: clients time out, their requests are aborted
    samples = list(sim.cluster.pods[0].samples)
    assert len(samples) > 40
    gen = [s[13] for s in samples]
    assert gen == sorted(gen) and gen[-1] > 0
    for s in samples:
        t = s[0]
        started = first <= t
        assert s[12] == prompt[started].sum()
        ended = ok & (end <= t)  # an aborted request made some of its tokens: at least its first
        assert out[ended].sum() + (started & ~ended).sum() <= s[13] <= out[started].sum()
    assert sim.autoscaling is not None
    t = samples[-1][0]
    window = [s for s in samples if t - 60 < s[0] <= t]
    rate = (window[-1][13] - window[0][13]) / (window[-1][0] - window[0][0])
    assert sim.autoscaling.value(sim.cluster.pods[0], "generation_tokens", t, "rate", 60.0) == pytest.approx(rate)
    assert "rate(vllm:generation_tokens_total{" in PodQuery.of("vllm:generation_tokens", 60).adapter_query()


def _steady(**over: Any) -> Scenario:
    """One pod of 10-ms steps (every step, whatever it holds) well within its capacity, scraped every 5 s."""
    return rush("vllm:generation_tokens_total", "100000", **{
        "autoscaler.maxReplicas": 1, "workload.arrivals": {"kind": "poisson", "rate_per_s": 8.0},
        "batching.num_blocks": 4000, "horizon_s": 120, **over})


def test_a_scrape_counts_each_token_and_gap_as_its_step_ends_inside_runs_of_decode_steps_too() -> None:
    """vLLM counts a token (``vllm:generation_tokens_total``) and the gap it closes (the ITL histogram) when the
    step that emits it ends. With every step 10 ms long, request i's k-th token comes 10k ms after its first:
    each scrape must read exactly the tokens and gaps out by then, though most steps here run inside runs of
    decode steps (one event each), which scrapes fall into."""
    from capsim.sim import Simulation

    sim = Simulation(_steady(), seed=2)
    r = sim.run()
    assert sim.continuous is not None and sim.continuous.steps > 1000
    assert sim.continuous.max_run_steps > 1, "decode runs are on: the scrapes must look inside them"
    req = r.requests
    assert ((req["outcome"] == "ok") | req["outcome"].isna()).all()  # answered, or still in flight at the end
    first = req["first_token_s"].to_numpy()
    out = req["output_tokens"].to_numpy()
    samples = list(sim.cluster.pods[0].samples)
    inside = 0
    for s in samples:
        t = s[0]
        on = first <= t
        gaps = np.minimum(out[on] - 1, np.floor((t - first[on]) / 0.01 + 1e-6))
        assert s[13] == on.sum() + gaps.sum(), t  # tokens: each started request's first and the gaps closed
        assert s[10] == gaps.sum(), t  # the ITL histogram's count
        assert s[9] == pytest.approx(0.01 * gaps.sum(), abs=1e-6), t  # its sum: every gap 10 ms
        inside += bool(((gaps > 0) & (gaps < out[on] - 1)).any())
    assert inside > 10  # scrapes while requests were mid-answer


def test_the_token_and_gap_counters_never_fall_through_preemptions_aborts_and_a_crash() -> None:
    """Preempted requests (a small KV cache), aborted ones (clients that give up in the rush) and a crash: every
    counter a scrape reads only grows within a container, and the ITL count stays the tokens less the first
    tokens."""
    from capsim.sim import Simulation

    sc = rush("vllm:generation_tokens_total", "100000", **{
        "autoscaler.maxReplicas": 1, "batching.num_blocks": 200, "client.timeout_s": 20,
        "faults.crashes": [{"at_s": 150, "pod": 0}]})
    sim = Simulation(sc, seed=1)
    r = sim.run()
    assert r.summary.preemptions > 0 and (r.requests["outcome"] != "ok").any()
    pod = sim.cluster.pods[0]
    samples = [s for s in pod.samples if len(s) > 1]  # not the stale markers of failed scrapes
    assert sum(1 for s in samples if s[0] > 150) > 5
    for field in (9, 10, 12, 13):
        for before, after in pairwise(samples):
            assert after[field] >= before[field] - 1e-9 or (before[0] < 150 < after[0]), (field, before[0])


def test_a_preempted_requests_gap_spans_its_preemption_and_the_totals_match_the_records() -> None:
    """With a KV cache small enough to preempt, once every request has ended the ITL sum is each request's last
    token less its first (its gaps, the one across its preemption included) and the count its tokens less one;
    at every scrape the count is the tokens less the first tokens out by then."""
    from capsim.sim import Simulation

    sim = Simulation(_steady(**{"batching.num_blocks": 120, "horizon_s": 150,
                                "workload.arrivals": {"kind": "piecewise", "rate_per_s": [[0, 12], [60, 0]]}}),
                     seed=3)
    r = sim.run()
    req = r.requests
    assert r.summary.preemptions > 20 and (req["outcome"] == "ok").all()
    first, end, out = (req[c].to_numpy() for c in ("first_token_s", "end_s", "output_tokens"))
    samples = [s for s in sim.cluster.pods[0].samples if len(s) > 1]
    for s in samples:
        assert s[10] == s[13] - (first <= s[0]).sum(), s[0]
    last = samples[-1]
    assert last[0] > end.max()
    assert last[10] == (out - 1).sum() and last[13] == out.sum()
    assert last[9] == pytest.approx((end - first).sum(), rel=1e-9)


def test_an_hpa_on_the_itl_reads_answers_longer_than_its_window_while_they_run() -> None:
    """Answers of 4,000 tokens take 40 s at 10 ms a step; the query's window is 15 s. vLLM's histogram has their
    gaps as they come, so the HPA reads the step time from its first window on. (Counting a request's gaps when it
    ended, the simulated pod showed no gap in any window until the first answer ended: an empty mean, which the
    adapter answers as 0, for the first 45 s.)"""
    sc = rush("vllm:inter_token_latency_seconds", "9m", **{
        "batching.num_blocks": 4000, "workload.output_tokens": {"kind": "constant", "value": 4000},
        "workload.arrivals": {"kind": "poisson", "rate_per_s": 0.5}, "autoscaler.maxReplicas": 1, "horizon_s": 120,
        "autoscaler.query_window_s": 15})
    r = simulate(sc, 0)
    first_end = r.requests["end_s"].min()
    assert first_end > 40.0
    reads = r.hpa_syncs.set_index("time_s")["vllm:inter_token_latency_seconds"]
    during = reads[(reads.index > 10.0) & (reads.index < first_end)]
    assert len(during) >= 6 and during.to_numpy() == pytest.approx(0.01)


@pytest.mark.parametrize("timeout_s", [0.005, 0.015])
def test_a_token_made_in_the_step_its_client_left_in_counts_in_no_counter(timeout_s: float) -> None:
    """vLLM's output processor drops the output of a request aborted while a step ran. Every step here is 10 ms and
    the pod is idle when each request comes: with a 5-ms timeout each client leaves as its first token's step runs,
    so no token, first token, gap or prompt is counted; with 15 ms each leaves as its second token's (in a run of
    decode steps, or a single step where an arrival cut the run), so only the first tokens count, and no gap (the few that came while another's step ran and had
    theirs admitted at its end, after they left, count nothing). (Until
    stop 69 the first case counted each request's token and prompt and left it emitting for ever: the ITL sum grew
    by the run's length each scrape, with a count of 0.)"""
    from capsim.sim import Simulation

    sim = Simulation(rush("vllm:time_to_first_token_seconds", "100", **{  # an HPA on the TTFT: the pod counts it
        "autoscaler.maxReplicas": 1, "client.timeout_s": timeout_s, "horizon_s": 120,
        "workload.arrivals": {"kind": "poisson", "rate_per_s": 2.0}}), seed=0)
    r = sim.run()
    req = r.requests
    assert len(req) > 200 and (req["outcome"] == "timed_out").all()
    first = req["first_token_s"].to_numpy()
    # with 15 ms, all but the few that came while another request's step ran (admitted at its end) got one
    assert np.isnan(first).all() if timeout_s < 0.01 else np.isnan(first).mean() < 0.05
    pod = sim.cluster.pods[0]
    assert not pod._live and not pod._voided
    samples = [s for s in pod.samples if len(s) > 1]
    assert len(samples) > 20
    for s in samples:
        got = (first <= s[0]).sum()  # first tokens out by the scrape (none with the 5-ms timeout)
        assert (s[5], s[13], s[12]) == (got, got, 200 * got), s[0]  # first tokens, all tokens, prompts
        assert s[9] == s[10] == 0, s[0]  # no gap closed: the ITL sum and count

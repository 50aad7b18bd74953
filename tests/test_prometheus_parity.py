"""The simulated adapter's PromQL against a real Prometheus server, on the same samples.

The simulator evaluates each autoscaler query itself (``capsim.sim.hpa``, ``capsim.sim.promql_eval``); these tests
backfill a real Prometheus (``tests/promserver.py``) with series and compare what each answers: first on series
drawn to hit every branch of ``rate()`` (a series that starts, stops or pauses inside the window, a counter from
zero, a reset), histograms and NaN gauges; then on a whole simulated rush, every exported query of every metric
kind, per pod (prometheus-adapter's rule) and per Deployment (KEDA's trigger), at the HPA's read times.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from capsim.export import DeployTarget
from capsim.export.analysis import build_analysis_templates
from capsim.export.promql import SERIES, PodQuery
from capsim.export.writer import build_all
from capsim.model.buckets import TTFT_BUCKETS_S
from capsim.model.scenario import METRIC_TYPES, QUERIES, Scenario
from capsim.sim import Simulation
from capsim.sim.analysis import _increase
from capsim.sim.hpa import _BUCKETS, _COUNTER, _DCGM_FIELD, _FIELD, _HISTOGRAM
from capsim.sim.pod import Pod
from capsim.sim.promql_eval import extrapolated_rate, max_over_time, rate_quantile
from promserver import PrometheusServer, Series, major_version, ms

WINDOWS_S = (30, 60, 120)
EVAL_TIMES = [ms(37.1234 + 13.7 * k) for k in range(46)]  # 37 s to 654 s, off the scrape grids


def _counter_series(rng: np.random.Generator, n: int) -> list[list[tuple[float, float]]]:
    """Counters as Prometheus scrapes them: every 10, 15 or 30 s from a random offset, starting and ending at
    random (a pod made or deleted mid-run), some pausing (a Prometheus outage), from zero (a new container) or from
    far above it, some resetting (a restart)."""
    out = []
    for i in range(n):
        every = float(rng.choice([10.0, 15.0, 30.0]))
        t0 = float(rng.uniform(0, every)) + (float(rng.uniform(0, 300)) if i % 2 else 0.0)
        end = 660.0 - (float(rng.uniform(0, 300)) if i % 3 == 0 else 0.0)
        gap = (float(rng.uniform(100, 500)), float(rng.uniform(30, 90))) if i % 4 == 1 else None
        value = 0.0 if i % 5 < 3 else float(rng.uniform(0, 1e4))
        reset_at = float(rng.uniform(t0, end)) if i % 7 == 3 else None
        samples, t = [], t0
        while t < end:
            value += float(rng.integers(0, 60)) if rng.random() > 0.2 else 0.0
            if reset_at is not None and t >= reset_at:
                value, reset_at = float(rng.integers(0, 20)), None
            if gap is None or not gap[0] <= t < gap[0] + gap[1]:
                samples.append((ms(t), value))
            t += every
        out.append(samples)
    return out


def _window(samples: list[tuple[float, float]], a: float, w: float) -> list[tuple[float, float]]:
    return [(t, v) for t, v in samples if a - w < t <= a]


def _differs_in_v2(sel: list[tuple[float, float]], start: float) -> bool:
    """Whether Prometheus 2.x's rate() answers otherwise than 3.x's here: 2.x capped the start's extrapolation at
    the counter's zero before testing the threshold (capsim.sim.promql_eval)."""
    times, values = [t for t, _ in sel], [v for _, v in sel]
    increase = values[-1] - values[0] + sum(p for p, q in itertools.pairwise(values) if q < p)
    sampled = times[-1] - times[0]
    average = sampled / (len(times) - 1)
    if increase <= 0 or times[0] - start < 1.1 * average:
        return False
    to_zero = sampled * values[0] / increase
    return average / 2 < to_zero < 1.1 * average


def _on_left_edge(samples: list[tuple[float, float]], start: float) -> bool:
    """Prometheus 2.x's range includes its left edge, 3.x's (and capsim's) does not."""
    return any(round(t * 1000) == round(start * 1000) for t, _ in samples)


@pytest.fixture(scope="module")
def version(prometheus_binaries: tuple[str, str]) -> int:
    return major_version(prometheus_binaries[0])


def test_rate_is_prometheus_s_on_series_that_start_stop_pause_and_reset(
        prometheus_binaries: tuple[str, str], version: int, tmp_path: Path) -> None:
    series = _counter_series(np.random.default_rng(7), 60)
    data: list[Series] = [("c_total", {"s": str(i)}, s) for i, s in enumerate(series)]
    compared = inside = naive_off = 0
    with PrometheusServer(prometheus_binaries, tmp_path, data) as prom:
        for w in WINDOWS_S:
            for a in EVAL_TIMES:
                got = {dict(k)["s"]: v for k, v in prom.query(f"rate(c_total[{w}s])", a).items()}
                for i, samples in enumerate(series):
                    sel = _window(samples, a, w)
                    ours = extrapolated_rate([t for t, _ in sel], [v for _, v in sel], a - w, a)
                    if _on_left_edge(samples, a - w) or (version < 3 and len(sel) > 1 and _differs_in_v2(sel, a - w)):
                        continue
                    theirs = got.get(str(i))
                    assert (ours is None) == (theirs is None), (i, w, a, ours, theirs)
                    if ours is None or theirs is None:
                        continue
                    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12), (i, w, a, sel)
                    compared += 1
                    average = (sel[-1][0] - sel[0][0]) / (len(sel) - 1)
                    inside += sel[0][0] - (a - w) >= 1.1 * average or a - sel[-1][0] >= 1.1 * average
                    naive = (sel[-1][1] - sel[0][1]) / (sel[-1][0] - sel[0][0])  # the slope, which it is not
                    naive_off += not math.isclose(naive, theirs, rel_tol=1e-6, abs_tol=1e-9)
    # every branch was exercised, and the slope between the window's first and last sample would have failed
    assert compared > 5000 and inside > 500 and naive_off > 500, (compared, inside, naive_off)


def _histogram_series(rng: np.random.Generator, n: int) -> list[list[tuple[float, list[int], float]]]:
    """TTFT histograms of pods scraped every 15 s: (time, observations per bucket so far, sum so far), some pods
    starting inside the run, some idle for a while (nothing observed in a window)."""
    out = []
    for i in range(n):
        t = float(rng.uniform(0, 15)) + (float(rng.uniform(0, 200)) if i % 2 else 0.0)
        counts, total, samples = [0] * (len(TTFT_BUCKETS_S) + 1), 0.0, []
        idle = (float(rng.uniform(100, 400)), float(rng.uniform(60, 200)))
        scale = float(rng.choice([0.05, 0.3, 2.0]))
        while t < 660.0:
            if not idle[0] <= t < idle[0] + idle[1]:
                for x in rng.exponential(scale, size=int(rng.integers(0, 40))):
                    counts[int(np.searchsorted(TTFT_BUCKETS_S, x))] += 1
                    total += float(x)
            samples.append((ms(t), list(counts), total))
            t += 15.0
        out.append(samples)
    return out


def test_histogram_quantile_and_mean_are_prometheus_s(prometheus_binaries: tuple[str, str], version: int,
                                                      tmp_path: Path) -> None:
    hists = _histogram_series(np.random.default_rng(11), 16)
    bounds = [*(repr(b) for b in TTFT_BUCKETS_S), "+Inf"]
    data: list[Series] = []
    for i, samples in enumerate(hists):
        for k, le in enumerate(bounds):
            data.append(("h_bucket", {"s": str(i), "le": le}, [(t, float(sum(c[:k + 1]))) for t, c, _ in samples]))
        data.append(("h_count", {"s": str(i)}, [(t, float(sum(c))) for t, c, _ in samples]))
        data.append(("h_sum", {"s": str(i)}, [(t, s) for t, _, s in samples]))
    compared = nan = 0
    with PrometheusServer(prometheus_binaries, tmp_path, data) as prom:
        for w in (30, 60):
            for a in EVAL_TIMES[::2]:
                quantiles = {q: {dict(k)["s"]: v for k, v in prom.query(
                    f"histogram_quantile({q}, sum(rate(h_bucket[{w}s])) by (le, s))", a).items()}
                    for q in (0.5, 0.9, 0.99)}
                means = {dict(k)["s"]: v for k, v in prom.query(
                    f"sum(rate(h_sum[{w}s])) by (s) / sum(rate(h_count[{w}s])) by (s)", a).items()}
                for i, samples in enumerate(hists):
                    sel = [s for s in samples if a - w < s[0] <= a]
                    times = [t for t, _, _ in sel]
                    if _on_left_edge([(t, 0.0) for t, _, _ in samples], a - w):
                        continue
                    if version < 3 and len(sel) > 1 and any(  # the 2.x corner, in any le series or the count
                            _differs_in_v2([(t, float(sum(c[:k + 1]))) for t, c, _ in sel], a - w)
                            for k in range(len(bounds))):
                        continue
                    for q, got in quantiles.items():
                        ours = rate_quantile(q, TTFT_BUCKETS_S, times, [c for _, c, _ in sel], a - w, a)
                        theirs = got.get(str(i))
                        assert (ours is None) == (theirs is None), (i, q, w, a)
                        if ours is not None and theirs is not None:
                            if math.isnan(theirs):
                                assert math.isnan(ours), (i, q, w, a, ours)
                                nan += 1
                            else:
                                assert ours == pytest.approx(theirs, rel=1e-9), (i, q, w, a)
                                compared += 1
                    if len(sel) > 1:
                        count = extrapolated_rate(times, [float(sum(c)) for _, c, _ in sel], a - w, a)
                        total = extrapolated_rate(times, [s for _, _, s in sel], a - w, a)
                        assert count is not None and total is not None
                        theirs = means[str(i)]
                        if count > 0:
                            assert total / count == pytest.approx(theirs, rel=1e-9), (i, w, a)
                        else:
                            assert math.isnan(theirs)
    assert compared > 500 and nan > 10, (compared, nan)


def test_max_over_time_gives_way_to_numbers_as_prometheus_does(prometheus_binaries: tuple[str, str],
                                                               tmp_path: Path) -> None:
    rows = [[math.nan, 1.0, 0.5], [2.0, math.nan, 1.0], [math.nan, math.nan], [0.2, 3.0, math.nan], [1.0]]
    data: list[Series] = [("g", {"s": str(i)}, [(10.0 + 15 * k, v) for k, v in enumerate(r)])
                          for i, r in enumerate(rows)]
    with PrometheusServer(prometheus_binaries, tmp_path, data) as prom:
        got = {dict(k)["s"]: v for k, v in prom.query("max_over_time(g[120s])", 100.0).items()}
        avg = {dict(k)["s"]: v for k, v in prom.query("avg_over_time(g[120s])", 100.0).items()}
    for i, r in enumerate(rows):
        ours, theirs = max_over_time(r), got[str(i)]
        assert (math.isnan(ours) and math.isnan(theirs)) or ours == theirs, (r, ours, theirs)
        assert math.isnan(avg[str(i)]) == any(math.isnan(v) for v in r)  # a NaN makes the mean NaN


# ---- a simulated rush, every exported query ------------------------------------------------------------------------
H100 = Path(__file__).resolve().parents[1] / "data" / "scenarios" / "h100_llama3_8b_rush.yaml"
POD = "capsim-agent-7d9f8b6c5-{:05d}"  # a Deployment's pod: <deployment>-<replicaset hash>-<5 characters>
#: every kind of the pods' own series, with each query that fits it (capsim.model.scenario.QUERIES)
KIND_QUERIES = [(kind, q, 0.99, 60.0) for kind in ("queue_depth", "in_flight", "busy", "waiting", "running",
                                                   "kv_cache") for q in ("instant", "avg_over_time", "max_over_time")]
# rates over a minute, and over the adapter's default 5 minutes, which spans a crashed pod's restart (a reset)
KIND_QUERIES += [(kind, "rate", 0.99, w) for kind in ("preemptions", "prompt_tokens", "generation_tokens", "ttft", "itl")
                 for w in (60.0, 300.0)]
KIND_QUERIES += [("ttft", "histogram_quantile", 0.5, 60.0), ("ttft", "histogram_quantile", 0.99, 300.0)]
# dcgm-exporter's gauges, one series per GPU labelled with the pod that holds it (exported_pod: the Helm chart's way)
KIND_QUERIES += [(kind, q, 0.99, 60.0) for kind in ("gpu_util", "gr_active")
                 for q in ("instant", "avg_over_time", "max_over_time")]
DCGM_LABELS = ("exported_namespace", "exported_pod")


def _rush() -> Simulation:
    """The H100 rush, shortened: 2 -> 14 -> 2 sessions a second from a floor of 2 pods, scaled up on waiting
    requests and down after a minute's stabilisation, so pods start and are deleted inside the run; two pods crash
    (their containers restart, counters from 0)."""
    sc = Scenario.from_yaml(H100).override({
        "horizon_s": 1500, "warmup_s": 0,
        "workload.arrivals.rate_per_s": [[0, 2], [300, 14], [700, 2]],
        "autoscaler.min_replicas": 2, "pods.replicas": 2,
        "autoscaler.behavior.scaleDown.stabilizationWindowSeconds": 60,
        "autoscaler.behavior.scaleDown.policies": [{"type": "Percent", "value": 50, "periodSeconds": 15}],
        # more metrics, so the pods count their TTFT per bucket (a quantile needs the buckets) and dcgm-exporter
        # collects their GPUs (neither target is ever reached)
        "autoscaler.metrics": [
            {"type": "Pods", "pods": {"metric": {"name": "vllm:num_requests_waiting"},
                                      "target": {"type": "AverageValue", "averageValue": "4"}}},
            {"type": "Pods", "pods": {"metric": {"name": "capsim_time_to_first_token_seconds"},
                                      "target": {"type": "AverageValue", "averageValue": "30"}}},
            {"type": "Pods", "pods": {"metric": {"name": "DCGM_FI_DEV_GPU_UTIL"},
                                      "target": {"type": "AverageValue", "averageValue": "1000"}}}],
        "autoscaler.dcgm_collect_interval_s": 10,
        "autoscaler.queries": {"capsim_time_to_first_token_seconds": {"query": "histogram_quantile"}},
        "faults": {"crashes": [{"at_s": 450, "pods": 1}, {"at_s": 900, "pods": 1}]},
        "pods.startup_s": {"kind": "uniform", "low_s": 20, "high_s": 40},
    })
    sim = Simulation(sc, seed=2)
    assert sim.autoscaling is not None
    sim.autoscaling._keep_s = 1e9  # keep every sample, a deleted pod's too, to read any time afterwards
    sim.run()
    return sim


def _pod_series(pod: Pod) -> list[Series]:
    """A simulated pod's scrapes as the series Prometheus holds (its stale markers left out: a backfill cannot
    write them, and the comparisons that would read one are skipped)."""
    labels = {"namespace": "default", "pod": POD.format(pod.id)}
    rows = [s for s in pod.samples if len(s) > 1]
    if not rows:
        return []
    out: list[Series] = []
    for kind, k in {**_FIELD, **_COUNTER}.items():
        out.append((SERIES[kind], labels, [(s[0], float(s[k])) for s in rows]))
    for kind, (s_k, c_k) in _HISTOGRAM.items():
        base = SERIES[kind].removesuffix("_count")
        out.append((f"{base}_sum", labels, [(s[0], float(s[s_k])) for s in rows]))
        out.append((f"{base}_count", labels, [(s[0], float(s[c_k])) for s in rows]))
    bounds = [*(repr(b) for b in TTFT_BUCKETS_S), "+Inf"]
    for k, le in enumerate(bounds):
        out.append((f"{SERIES['ttft'].removesuffix('_count')}_bucket", {**labels, "le": le},
                    [(s[0], float(sum(s[_BUCKETS][:k + 1]))) for s in rows]))
    return out


def _dcgm_series(pid: int, samples: Sequence[tuple[float, ...]]) -> list[Series]:
    """A pod's GPU as dcgm-exporter's series hold it: labelled with the exporter's own pod and the GPU's pod."""
    labels = {"namespace": "gpu-operator", "pod": "nvidia-dcgm-exporter-x7k2q", "gpu": "0",
              "exported_namespace": "default", "exported_pod": POD.format(pid)}
    rows = [s for s in samples if len(s) > 1]
    return [(SERIES[kind], labels, [(s[0], float(s[k])) for s in rows]) for kind, k in _DCGM_FIELD.items() if rows]


def _rate_inputs(kind: str, query: str, sel: list[tuple[Any, ...]]) -> list[list[tuple[float, float]]]:
    """The counters a rate-based query of ``kind`` reads, as (time, value) series."""
    if query == "histogram_quantile":
        return [[(s[0], float(sum(s[_BUCKETS][:k + 1]))) for s in sel] for k in range(len(TTFT_BUCKETS_S) + 1)]
    if kind in _COUNTER:
        return [[(s[0], float(s[_COUNTER[kind]])) for s in sel]]
    return [[(s[0], float(s[k])) for s in sel] for k in _HISTOGRAM[kind]]


@pytest.mark.slow
def test_every_exported_query_reads_in_prometheus_what_the_simulated_adapter_read(
        prometheus_binaries: tuple[str, str], version: int, tmp_path: Path) -> None:
    sim = _rush()
    auto = sim.autoscaling
    assert auto is not None
    pods = sim.cluster.pods
    dcgm = auto.dcgm_samples
    for p in pods:  # Prometheus keeps a sample's time to the millisecond
        p.samples = deque((ms(s[0]), *s[1:]) for s in p.samples)
        dcgm[p.id] = deque((ms(s[0]), *s[1:]) for s in dcgm.get(p.id, ()))

    def first_marker(samples: Sequence[tuple[float, ...]]) -> float:
        return next((s[0] for s in samples if len(s) == 1), math.inf)

    gone_at = {p.id: first_marker(p.samples) for p in pods}
    dcgm_gone_at = {p.id: first_marker(dcgm[p.id]) for p in pods}
    # every stale marker (a crash's, a deletion's), pods' and dcgm's: the backfill has none, so a Deployment total of
    # an instant query within the lookback after one reads there what the simulation's stale series does not
    markers = [s[0] for p in pods for rows in (p.samples, dcgm[p.id]) for s in rows if len(s) == 1]
    assert len(pods) >= 8 and sum(t < math.inf for t in gone_at.values()) >= 3  # pods came and went
    assert len(sim.faults.crash_log) == 2
    lag = auto.spec.adapter_lag_s
    reads = [ms(now - lag) for now, *_ in auto.syncs[4::4]]
    series = [s for p in pods for s in (*_pod_series(p), *_dcgm_series(p.id, dcgm[p.id]))]
    per_pod_checked = totals_checked = resets = gpu_checked = 0
    with PrometheusServer(prometheus_binaries, tmp_path, series) as prom:
        for a in reads:
            for kind, query, q, w in KIND_QUERIES:
                gpu = kind in _DCGM_FIELD
                ns, by = DCGM_LABELS if gpu else ("namespace", "pod")
                pq = PodQuery(metric=kind, kind=kind, window_s=w, query=query, quantile=q)
                rule = pq.adapter_query().replace("<<.LabelMatchers>>", f'{ns}="default",{by}=~"capsim-agent-.*"')
                got = {dict(k)[by]: v for k, v in prom.query(rule.replace("<<.GroupBy>>", by), a).items()}
                skip_total = False
                for p in pods:
                    name = POD.format(p.id)
                    rows, ended = (dcgm[p.id], dcgm_gone_at[p.id]) if gpu else (p.samples, gone_at[p.id])
                    sel = [s for s in rows if a - w < s[0] <= a and len(s) > 1]
                    skip = (query == "instant" and ended <= a) or _on_left_edge([(s[0], 0.0) for s in rows], a - w)
                    if query in ("rate", "histogram_quantile") and version < 3 and len(sel) > 1:
                        skip = skip or any(_differs_in_v2(x, a - w) for x in _rate_inputs(kind, query, sel))
                    if skip:
                        skip_total = skip_total or ended > a - 300  # the total holds what we skipped
                        continue
                    ours = auto.value(p, kind, a + lag, query, w, q)
                    theirs = got.get(name)
                    assert (ours is None) == (theirs is None), (kind, query, a, p.id, ours, theirs)
                    if ours is not None and theirs is not None:
                        assert (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(
                            theirs, rel=1e-9, abs=1e-12), (kind, query, q, a, p.id, ours, theirs)
                        per_pod_checked += 1
                        if query == "rate" and kind in _COUNTER:
                            values = [s[_COUNTER[kind]] for s in sel]
                            resets += any(y < x for x, y in itertools.pairwise(values))
                if skip_total or (query == "instant" and any(a - 300 < m <= a for m in markers)):
                    continue
                # KEDA's trigger: one number for the Deployment, every series its selector matches
                total = prom.query(pq.deployment_total("default", "capsim-agent", DCGM_LABELS), a)
                ours = auto._external_total(sim.cluster.live_pods, kind, a + lag, query, w, q)
                theirs = next(iter(total.values()), None)
                assert (ours is None) == (theirs is None), (kind, query, a, ours, theirs)
                if ours is not None and theirs is not None:
                    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12), (kind, query, q, a, ours, theirs)
                    totals_checked += 1
                    gpu_checked += gpu
    assert per_pod_checked > 2500 and totals_checked > 400 and resets > 5, (per_pod_checked, totals_checked, resets)
    assert gpu_checked > 60, gpu_checked


# ---- every exported query parses ---------------------------------------------------------------------------------
SCENARIOS = sorted((Path(__file__).resolve().parents[1] / "data" / "scenarios").glob("*.yaml"))


def _queries_in(obj: Any) -> list[str]:
    """Every PromQL string in an exported object: adapter rules' ``metricsQuery``, triggers' and templates' ``query``."""
    if isinstance(obj, dict):
        found = [v for k, v in obj.items() if k in ("metricsQuery", "query") and isinstance(v, str)]
        return found + [q for v in obj.values() for q in _queries_in(v)]
    if isinstance(obj, list):
        return [q for v in obj for q in _queries_in(v)]
    return []


def _filled(query: str) -> str:
    """The query as prometheus-adapter and Argo Rollouts send it: their placeholders filled in."""
    return (query.replace("<<.LabelMatchers>>", 'namespace="default",pod=~"capsim-agent-.*"')
            .replace("<<.GroupBy>>", "pod").replace("{{args.", "{{").replace("{{", "x-").replace("}}", ""))


def test_every_query_the_export_writes_parses_in_prometheus(prometheus_binaries: tuple[str, str],
                                                            tmp_path: Path) -> None:
    target = DeployTarget()
    queries: set[str] = set()
    for path in SCENARIOS:
        sc = Scenario.from_yaml(path)
        if sc.autoscaler is None:
            continue
        for obj in build_all(sc, target).values():  # the adapter's config.yaml is a string: its rules, parsed
            queries.update(_queries_in(yaml.safe_load(obj["data"]["config.yaml"]) if obj.get("kind") == "ConfigMap"
                                       and "config.yaml" in obj.get("data", {}) else obj))
        queries.update(_queries_in(build_analysis_templates(sc, target)))
    # and every kind with every query that fits it, both spellings, dcgm-exporter's labels either way
    for kind, kind_type in METRIC_TYPES.items():
        if kind == "gateway":  # the gateway's query is the target's, filled in by the KEDA trigger (scale_to_zero)
            continue
        for query in QUERIES[kind_type]:
            if query == "histogram_quantile" and kind != "ttft":
                continue
            pq = PodQuery(metric=kind, kind=kind, window_s=90.0, query=query, quantile=0.95)
            queries.add(pq.adapter_query())
            queries.add(pq.deployment_total("default", "capsim-agent"))
            queries.add(pq.deployment_total("default", "capsim-agent", ("exported_namespace", "exported_pod")))
    assert len(queries) > 60 and any("istio_requests_total" in q for q in queries)
    with PrometheusServer(prometheus_binaries, tmp_path, [("up", {}, [(0.0, 1.0)])]) as prom:
        refused = {q: err for q in sorted(queries) if (err := prom.check(_filled(q))) is not None}
    assert not refused, refused


# ---- the canary analysis: the exported AnalysisTemplate's queries over the simulated scrapes -------------------
CANARY = Path(__file__).resolve().parents[1] / "data" / "scenarios" / "canary_rush.yaml"


def _canary_run() -> Simulation:
    """The canary of the rush with the engine flag ``--max-model-len 4096`` (its pods turn the longest turns away:
    errors only they make), measured through the pause every 30 s over a minute from the deploy, so that windows
    hold the canary's pods starting; two pods crash in the pause (their containers restart, counters from 0) and
    Redis is out for 20 s (every pod answers 503 to the turns it cannot read: error series that appear inside a
    window). Every limit is set so that none undoes it (the first measurements, before its pods answer, fail): the
    canary stays to be read."""
    sc = Scenario.from_yaml(CANARY).override({
        "horizon_s": 2700,
        "pods.rollouts": [
            {"at_s": 1900, "batching": {"max_model_len": 4096}}, {"at_s": 1900, "pause": True},
            {"at_s": 2600, "resume": True, "undo_if_ttft_p99_over_baseline": 100, "undo_if_itl_mean_over_baseline": 100,
             "undo_if_error_rate_over": 0.99, "check_window_s": 60, "check_interval_s": 30,
             "check_failure_limit": 30, "error_rate_source": "gateway"}],
        "faults.crashes": [{"at_s": 2250, "pods": 2}],
        "faults.redis_outages": [{"at_s": 2400, "duration_s": 20}],
    })
    sim = Simulation(sc, seed=1)
    analysis = sim.cluster.analysis
    assert analysis is not None
    analysis._keep_s = 1e9  # keep every scrape, to read any time afterwards
    sim.run()
    for pid, rows in analysis.scrapes.items():  # Prometheus keeps a sample's time to the millisecond
        analysis.scrapes[pid] = deque((ms(s[0]), *s[1:]) for s in rows)
    analysis.gateway = deque((ms(t), c) for t, c in analysis.gateway)
    return sim


def _analysis_series(sim: Simulation) -> list[Series]:
    """The canary run's scrapes as the series Prometheus holds: each pod's TTFT buckets, ITL sum and count and its
    requests by status class (``http_requests_total``, labelled with its ReplicaSet's ``pod_template_hash``), and
    the gateway's attempts by version and response code (``istio_requests_total``)."""
    analysis = sim.cluster.analysis
    assert analysis is not None
    out: list[Series] = []
    bounds = [*(repr(b) for b in TTFT_BUCKETS_S), "+Inf"]
    for p in sim.cluster.pods:
        labels = {"namespace": "default", "pod": POD.format(p.id), "pod_template_hash": f"h{p.revision}"}
        rows = [s for s in analysis.scrapes[p.id] if len(s) > 1]
        if not rows:
            continue
        for k, le in enumerate(bounds):
            out.append(("vllm:time_to_first_token_seconds_bucket", {**labels, "le": le},
                        [(s[0], float(s[1][k])) for s in rows]))
        out.append(("vllm:inter_token_latency_seconds_sum", labels, [(s[0], float(s[2])) for s in rows]))
        out.append(("vllm:inter_token_latency_seconds_count", labels, [(s[0], float(s[3])) for s in rows]))
        for status, k in (("2xx", 4), ("5xx", 5)):
            out.append(("http_requests_total", {**labels, "status": status},
                        [(s[0], float(s[k])) for s in rows if s[k] > 0]))
    for v in sorted({v for _, counts in analysis.gateway for v in counts}):
        labels = {"reporter": "source", "destination_version": f"v{v}"}
        for code, k in (("200", 0), ("503", 1)):
            out.append(("istio_requests_total", {**labels, "response_code": code},
                        [(t, float(c[v][k])) for t, c in analysis.gateway if v in c and c[v][k] > 0]))
    return [s for s in out if s[2]]


@pytest.mark.slow
def test_the_canary_analysis_reads_what_the_exported_template_s_queries_answer(
        prometheus_binaries: tuple[str, str], version: int, tmp_path: Path) -> None:
    """Each exported AnalysisTemplate query (p99 TTFT, mean ITL, error share by the pods' own count and by the
    gateway's), evaluated by a real Prometheus over the simulated scrapes, answers what the simulated analysis
    read, for the canary's pods and the old ones, at every measurement of the run and every 13.7 s besides, over 60
    and 120 s."""
    from capsim.export.analysis import _QUERIES

    sim = _canary_run()
    analysis = sim.cluster.analysis
    assert analysis is not None
    resume = sim.scenario.pods.rollouts[2]
    assert len(analysis.reads) == 25 and not any(r.undone_s for r in sim.cluster.rollouts)  # measured through the pause, never undone
    assert len(sim.faults.crash_log) == 2
    target = DeployTarget()
    args = {"canary-hash": "h1", "stable-hash": "h0", "canary-version": "v1", "stable-version": "v0"}
    times = sorted({ms(t) for t, *_ in analysis.reads} | {ms(1860.1234 + 13.7 * k) for k in range(54)})
    checked = {"ttft_p99_s": 0, "itl_mean_s": 0, "error_rate": 0}
    numbers = errors_seen = 0
    with PrometheusServer(prometheus_binaries, tmp_path, _analysis_series(sim)) as prom:
        for a in times:
            for w in (60.0, 120.0):
                for source in ("pod", "gateway"):
                    ro = resume.model_copy(update={"error_rate_source": source})
                    for which, canary in (("canary", True), ("stable", False)):
                        ours = dict(zip(checked, analysis._side(1, canary, a, w, source), strict=True))
                        rows = analysis.series(1, canary, a, w, source)
                        for quantity in checked:
                            if source == "gateway" and quantity != "error_rate":
                                continue  # the same pods' series as the pod source's
                            names = ({"ttft_p99_s": [k for k in rows if k.startswith("le")],
                                      "itl_mean_s": ["itl_sum", "itl_count"]}.get(quantity, ["errors", "ok"]))
                            series = [r for name in names for r in rows[name]]
                            if any(_on_left_edge(r, a - w) for r in series) or (version < 3 and any(
                                    len(r) > 1 and _differs_in_v2(r, a - w) for r in series)):
                                continue
                            query = _QUERIES[quantity][1](target, ro, which, f"{w:g}s")
                            for arg, value in args.items():
                                query = query.replace(f"{{{{args.{arg}}}}}", value)
                            got = prom.query(query, a)
                            theirs = next(iter(got.values()), math.nan)
                            mine = ours[quantity]
                            assert (math.isnan(mine) and math.isnan(theirs)) or mine == pytest.approx(
                                theirs, rel=1e-9, abs=1e-12), (quantity, source, which, a, w, mine, theirs, query)
                            checked[quantity] += 1
                            numbers += not math.isnan(mine)
                            # the canary's 400s, read once its error series holds two samples in a window
                            errors_seen += quantity == "error_rate" and canary and mine > 0
    assert min(checked.values()) > 150 and numbers > 500 and errors_seen > 50, (checked, numbers, errors_seen)
    # Redis was out from 2,400 to 2,420 s: the old pods answered 503 to the turns they could not read, and their
    # first created their servers' 5xx series, whose increase() counts nothing of what a series held at its first
    # scrape; the gateway's error series of the old version, created by the crash's resets at 2,250 s, counts it all
    counted = read = 0.0
    born = 0
    for p in sim.cluster.pods:
        errors = [(s[0], float(s[5])) for s in analysis.scrapes[p.id] if len(s) > 1 and s[5] > 0]
        if p.revision == 0 and errors and 2400 < errors[0][0] <= 2440:
            sel = [e for e in errors if e[0] <= 2440]
            born += 1
            counted += sel[-1][1]  # all of its errors came in the window
            read += _increase(sel, 2380.0, 2440.0) or 0.0
    assert born >= 4 and read < counted / 5, (born, read, counted)
    own, gateway = (analysis._side(1, False, 2440.0, 60.0, source)[2] for source in ("pod", "gateway"))
    assert own < gateway / 3, (own, gateway)

"""GPU utilisation as NVIDIA's dcgm-exporter reports it, for an HPA or KEDA trigger written on DCGM's series.

``DCGM_FI_DEV_GPU_UTIL`` is the percent of NVML's sample period (``autoscaler.dcgm_util_period_s``) before a
collection in which a kernel ran, ``DCGM_FI_PROF_GR_ENGINE_ACTIVE`` the engine's active share since the
previous collection; the exporter collects every ``dcgm_collect_interval_s`` and Prometheus scrapes what it
last collected (``capsim.sim.hpa``). Each test checks the simulator's numbers against the pod's batches as the
records have them, or the exported queries against what dcgm-exporter's series look like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from capsim.cli import app
from capsim.export import DeployTarget
from capsim.export.adapter import adapter_rules
from capsim.export.keda import build_scaled_object
from capsim.model.scenario import Scenario
from capsim.sim import Simulation
from capsim.studies.checks import run_checks

UTIL = "DCGM_FI_DEV_GPU_UTIL"
ACTIVE = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"
H100 = Path(__file__).resolve().parents[1] / "data" / "scenarios" / "h100_llama3_8b_rush.yaml"
ON_UTIL = {"type": "Pods", "pods": {"metric": {"name": UTIL}, "target": {"type": "AverageValue", "averageValue": "80"}}}


def one_pod(metric: str = UTIL, target: str = "80", **autoscaler: Any) -> Scenario:
    """One static pod serving one 0.4-s request at a time, never scaled."""
    return Scenario.model_validate({
        "horizon_s": 400,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 1.5}},
        "service": {"kind": "deterministic", "mean_s": 0.4},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0, "queue_capacity": 100000},
        "pods": {"replicas": 1, "startup_s": 5},
        "autoscaler": {
            "minReplicas": 1, "maxReplicas": 1,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": metric},
                                                  "target": {"type": "AverageValue", "averageValue": target}}}],
            "scrape_interval_s": 15, "dcgm_collect_interval_s": 10, "dcgm_util_period_s": 1.0, **autoscaler,
        },
        "client": {"timeout_s": 1e6},
    })


def _busy_in(starts: np.ndarray, ends: np.ndarray, lo: float, hi: float) -> float:
    """Seconds of (lo, hi] that the batches [start, end) cover (one at a time: they never overlap)."""
    return float(np.clip(np.minimum(ends, hi) - np.maximum(starts, lo), 0.0, None).sum())


def test_each_collection_reads_the_pods_batches() -> None:
    sim = Simulation(one_pod(), seed=3)
    r = sim.run()
    assert sim.autoscaling is not None
    req = r.requests[r.requests["pod"] == 0]
    starts, ends = req["start_s"].to_numpy(), req["end_s"].to_numpy()
    collections = [c for c in sim.autoscaling.dcgm_collections if c[0] < 390]
    assert len(collections) >= 38
    prev = None
    utils = []
    for t, pod, util, active in collections:
        assert pod == 0
        assert util == pytest.approx(100.0 * _busy_in(starts, ends, t - 1.0, t), abs=1e-6)
        lo = t - 1.0 if prev is None else prev  # the first: since its sample period began
        assert active == pytest.approx(_busy_in(starts, ends, lo, t) / (t - lo), abs=1e-9)
        prev = t
        utils.append(util)
    # collections 10 s apart; a 1-s period at 60% load reads anything from idle to flat out
    assert np.diff([c[0] for c in collections]) == pytest.approx(10.0)
    assert min(utils) < 50.0 < max(utils) and 40.0 < np.mean(utils) < 80.0
    assert 0.5 < np.mean([c[3] for c in collections]) < 0.7  # the engine's share over 10 s: the load, 0.6


def test_prometheus_holds_what_the_exporter_last_collected() -> None:
    sim = Simulation(one_pod(), seed=1)
    sim.run()
    auto = sim.autoscaling
    assert auto is not None
    collections = auto.dcgm_collections
    samples = list(auto.dcgm_samples[0])
    assert len(samples) >= 20 and np.diff([s[0] for s in samples]) == pytest.approx(15.0)
    for t, util, active in samples:
        last = [c for c in collections if c[0] <= t][-1]
        assert (util, active) == (last[2], last[3])
    pod = sim.cluster.pods[0]
    t = samples[-1][0] + 1.0  # the adapter's answer: the newest sample, or the mean of a window's
    assert auto.value(pod, "gpu_util", t, "instant", 60.0) == samples[-1][1]
    window = [s[2] for s in samples if t - 120.0 < s[0] <= t]
    assert auto.value(pod, "gr_active", t, "avg_over_time", 120.0) == pytest.approx(np.mean(window))


def test_a_pod_has_a_series_only_while_it_holds_a_gpu() -> None:
    # the GPU pods' rush, scaled on GPU utilisation: pods wait Pending for the nodes the rush adds
    scen = Scenario.from_yaml(H100).override({"horizon_s": 2700, "autoscaler.metrics": [ON_UTIL]})
    sim = Simulation(scen, seed=0)
    sim.run()
    assert sim.autoscaling is not None
    placed = {pod: t for t, pod, _, _ in sim.cluster.placements}
    waited = [p for p in sim.cluster.pods if placed.get(p.id, np.inf) > p.created_s]
    assert waited  # some pods were Pending a while
    first: dict[int, float] = {}
    for t, pod, _, _ in sim.autoscaling.dcgm_collections:
        first.setdefault(pod, t)
    for p in sim.cluster.pods:
        if p.id in first:
            assert first[p.id] - 1.0 >= placed[p.id]  # its first sample period starts once it holds its GPU


def test_gpu_utilisation_keeps_scaling_a_continuous_pod_that_is_far_from_full() -> None:
    # what the metric is known for: a continuous-batching engine steps whenever one request runs, so its
    # GPU reads busy at a fraction of its capacity, and an HPA on it scales out where waiting requests do not
    scen = Scenario.from_yaml(H100).override({"horizon_s": 1500})
    base = Simulation(scen, seed=0).run()
    on_util = Simulation(scen.override({"autoscaler.metrics": [ON_UTIL]}), seed=0).run()
    assert base.summary.max_replicas == 6  # waiting requests: the floor holds the load before the rush
    assert on_util.summary.max_replicas >= 10
    # about twice the GPU-hours for the same traffic (3.9 against 2.0 in seeds 0 to 2) and no better p99 TTFT
    assert on_util.summary.gpu_hours > 1.5 * base.summary.gpu_hours
    assert on_util.summary.ttft_p99_s > 0.9 * base.summary.ttft_p99_s


def test_the_sample_period_ends_within_a_collection_interval() -> None:
    with pytest.raises(ValueError, match="dcgm_util_period_s .* must not pass dcgm_collect_interval_s"):
        one_pod(dcgm_collect_interval_s=1, dcgm_util_period_s=2)


def test_a_target_above_what_the_metric_can_read_is_caught() -> None:
    assert [f.check for f in run_checks(one_pod(target="95")) if f.check == "hpa-target-unreachable"]
    assert not [f for f in run_checks(one_pod(target="80")) if f.check == "hpa-target-unreachable"]
    assert [f.check for f in run_checks(one_pod(ACTIVE, "0.95")) if f.check == "hpa-target-unreachable"]


def test_the_adapter_rule_maps_the_exporters_labels_and_averages_a_pods_gpus() -> None:
    (rule,) = adapter_rules(one_pod())["rules"]
    assert rule["seriesQuery"] == f'{UTIL}{{exported_namespace!="",exported_pod!=""}}'
    assert rule["resources"] == {"overrides": {"exported_namespace": {"resource": "namespace"},
                                               "exported_pod": {"resource": "pod"}}}
    assert rule["metricsQuery"] == f"avg({UTIL}{{<<.LabelMatchers>>}}) by (<<.GroupBy>>)"
    (honored,) = adapter_rules(one_pod(), DeployTarget(dcgm_honor_labels=True))["rules"]
    assert honored["seriesQuery"] == f'{UTIL}{{namespace!="",pod!=""}}'
    windowed = one_pod(ACTIVE, "0.8", queries={ACTIVE: {"query": "avg_over_time", "window_s": 120}})
    (rule,) = adapter_rules(windowed)["rules"]
    assert rule["metricsQuery"] == f"avg(avg_over_time({ACTIVE}{{<<.LabelMatchers>>}}[120s])) by (<<.GroupBy>>)"


def test_the_keda_trigger_sums_the_deployments_pods_by_the_exporters_labels() -> None:
    obj = build_scaled_object(one_pod(), DeployTarget(name="agent", namespace="ml"))
    (trigger,) = obj["spec"]["triggers"]
    assert trigger["metadata"]["query"] == (
        f'sum((avg({UTIL}{{exported_namespace="ml",exported_pod=~"agent-[a-z0-9]+-[a-z0-9]{{5}}"}}) '
        f"by (exported_pod)) >= 0)")


def test_export_writes_the_rule_with_the_labels_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(one_pod().model_dump(mode="json", by_alias=True, exclude_none=True)))
    for flag, label in (([], "exported_pod"), (["--dcgm-honor-labels"], "pod")):
        out = tmp_path / f"out{len(flag)}"
        result = CliRunner().invoke(app, ["export", str(path), "--out", str(out), "--no-simulate", *flag])
        assert result.exit_code == 0, result.output
        config = yaml.safe_load(yaml.safe_load((out / "prometheus-adapter.yaml").read_text())["data"]["config.yaml"])
        assert list(config["rules"][0]["resources"]["overrides"])[1] == label
        readme = (out / "README.md").read_text()
        ns = "namespace" if flag else "exported_namespace"
        assert "`DCGM_EXPORTER_INTERVAL=10000`" in readme and f"in `{ns}` and `{label}`" in readme


def test_check_warns_of_gpu_utilisation_on_continuous_pods() -> None:
    def fired(scen: Scenario) -> list[str]:
        return [f.path for f in run_checks(scen) if f.check == "gpu-util-signal"]

    h100 = Scenario.from_yaml(H100)
    assert fired(h100) == []  # vLLM's waiting requests
    assert fired(h100.override({"autoscaler.metrics": [ON_UTIL]})) == ["autoscaler.metrics.0"]
    assert fired(one_pod()) == []  # a static pod's batches: busy while a batch runs, whatever its size

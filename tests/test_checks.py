"""Checks before deploy: each check fires on a setting that cannot work and stays quiet just inside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from capsim.cli import app
from capsim.model.scenario import Scenario
from capsim.studies.checks import Finding, failed, run_checks

RUSH = Path(__file__).resolve().parents[1] / "data" / "scenarios" / "friday_rush.yaml"


@pytest.fixture(scope="module")
def rush() -> Scenario:
    return Scenario.from_yaml(RUSH)


def _metric(name: str, value: str) -> list[dict[str, Any]]:
    return [{"type": "Pods", "pods": {"metric": {"name": name}, "target": {"type": "AverageValue", "averageValue": value}}}]


def _fired(scenario: Scenario, check: str) -> list[Finding]:
    return [f for f in run_checks(scenario) if f.check == check]


def test_shipped_scenarios_pass() -> None:
    for path in sorted(RUSH.parent.glob("*.yaml")):
        findings = run_checks(Scenario.from_yaml(path))
        assert not failed(findings), (path.name, findings)


def test_finding_is_frozen_and_failed_ignores_warnings() -> None:
    f = Finding("a.b", "why")
    with pytest.raises(AttributeError):
        f.path = "c"  # type: ignore[misc]
    assert failed([f]) and not failed([]) and not failed([Finding("a", "b", level="warn")])
    assert str(f) == "FAIL a.b: why"


# ---- HPA target the metric can never reach -------------------------------------------------------------
def test_queue_depth_target_above_capacity_fires(rush: Scenario) -> None:
    s = rush.override({"autoscaler.metrics": _metric("capsim_queue_depth", "600")})  # capacity 512
    (f,) = _fired(s, "hpa-target-unreachable")
    assert f.path == "autoscaler.metrics.0.pods.target.averageValue" and f.level == "fail"
    assert "queue_capacity (512)" in f.message


def test_queue_depth_target_within_tolerance_of_capacity_fires(rush: Scenario) -> None:
    # 480 x 1.1 = 528 > 512: the queue can never be deep enough to leave the tolerance band
    s = rush.override({"autoscaler.metrics": _metric("capsim_queue_depth", "480")})
    assert _fired(s, "hpa-target-unreachable")
    assert not _fired(rush.override({"autoscaler.metrics": _metric("capsim_queue_depth", "460")}),
                      "hpa-target-unreachable")


def test_busy_ratio_target_above_one_fires(rush: Scenario) -> None:
    s = rush.override({"autoscaler.metrics": _metric("capsim_gpu_busy_ratio", "1.2")})
    (f,) = _fired(s, "hpa-target-unreachable")
    assert "never scales up" in f.message
    assert not _fired(rush.override({"autoscaler.metrics": _metric("capsim_gpu_busy_ratio", "800m")}),
                      "hpa-target-unreachable")


def test_busy_target_uses_the_behavior_tolerance(rush: Scenario) -> None:
    # 0.85 x 1.1 < 1 passes with the default tolerance; a scale-up tolerance of 0.2 makes 0.85 x 1.2 > 1
    base = rush.override({"autoscaler.metrics": _metric("capsim_gpu_busy_ratio", "0.85")})
    assert not _fired(base, "hpa-target-unreachable")
    behavior = dict(rush.autoscaler.behavior or {})  # type: ignore[union-attr]
    behavior["scaleUp"] = {**behavior["scaleUp"], "tolerance": 0.2}
    assert _fired(base.override({"autoscaler.behavior": behavior}), "hpa-target-unreachable")


def test_ttft_target_above_slo_warns(rush: Scenario) -> None:
    s = rush.override({"autoscaler.metrics": _metric("capsim_time_to_first_token_seconds", "2")})
    (f,) = _fired(s, "ttft-target-over-slo")
    assert f.level == "warn" and not failed(run_checks(s))
    assert not _fired(rush.override({"autoscaler.metrics": _metric("ttft", "500m")}), "ttft-target-over-slo")


# ---- max wait leaves no room in the SLO ------------------------------------------------------------------
def test_max_wait_over_slo_fires(rush: Scenario) -> None:
    (f,) = _fired(rush.override({"batching.max_wait_ms": 1000}), "max-wait-over-slo")
    assert f.path == "batching.max_wait_ms"


def test_max_wait_counts_the_batch_itself() -> None:
    # deterministic 0.3 s batches, SLO 1 s: 0.6 s of wait fits, 0.75 s does not
    s = Scenario.model_validate({
        "horizon_s": 10, "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 1}},
        "service": {"kind": "deterministic", "mean_s": 0.3}, "batching": {"max_wait_ms": 600},
        "slo": {"ttft_p99_s": 1.0}})
    assert not _fired(s, "max-wait-over-slo")
    assert _fired(s.override({"batching.max_wait_ms": 750}), "max-wait-over-slo")
    # the pod's per-request overhead and the calibration scale count too
    assert _fired(s.override({"service.time_scale": 1.5}), "max-wait-over-slo")
    # and where the first token falls in the batch: halfway, 0.75 s of wait fits (0.75 + 0.15 s)
    assert not _fired(s.override({"batching.max_wait_ms": 750, "service.first_token_scale": 0.5}), "max-wait-over-slo")
    # a scale past the batch's end stops at it: 0.6 s of wait and the 0.3 s batch still fit, as the simulator has it
    assert not _fired(s.override({"service.first_token_scale": 3.0}), "max-wait-over-slo")


# ---- queue capacity below the batch size -----------------------------------------------------------------
def test_queue_below_batch_fires(rush: Scenario) -> None:
    s = rush.override({"batching.queue_capacity": 16, "autoscaler.metrics": _metric("capsim_queue_depth", "4")})
    (f,) = _fired(s, "queue-below-batch")
    assert f.path == "batching.queue_capacity" and "max_batch_size (32)" in f.message
    assert not _fired(s.override({"batching.queue_capacity": 32}), "queue-below-batch")


# ---- client timeout shorter than one full batch ----------------------------------------------------------
def test_client_timeout_below_full_batch_fires(rush: Scenario) -> None:
    (f,) = _fired(rush.override({"client.timeout_s": 0.05}), "client-timeout-below-batch")
    assert f.path == "client.timeout_s"
    assert not _fired(rush, "client-timeout-below-batch")


def test_client_timeout_uses_the_full_batch() -> None:
    s = Scenario.model_validate({
        "horizon_s": 10, "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 1}},
        "service": {"kind": "deterministic", "mean_s": 0.5, "request_overhead_ms": 10},
        "batching": {"max_batch_size": 50, "max_wait_ms": 0}, "client": {"timeout_s": 0.99},
        "slo": {"ttft_p99_s": 5}})
    # one full batch: 0.5 s + 50 x 10 ms = 1.0 s
    assert _fired(s, "client-timeout-below-batch")
    assert not _fired(s.override({"client.timeout_s": 1.01}), "client-timeout-below-batch")


def test_client_timeout_counts_the_arrival_overhead_and_the_ingress_delay() -> None:
    s = Scenario.model_validate({
        "horizon_s": 10, "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 1}},
        "service": {"kind": "deterministic", "mean_s": 0.5},
        "batching": {"max_batch_size": 50, "max_wait_ms": 0}, "client": {"timeout_s": 0.99},
        "slo": {"ttft_p99_s": 5}})
    assert not _fired(s, "client-timeout-below-batch")  # 0.5 s
    # under load: 0.5 s + 50 arrivals x 8 ms on the batch + 100 ms from send to queue = 1.0 s
    loaded = s.override({"service.arrival_overhead_ms": 8, "service.ingress_ms": 100})
    (f,) = _fired(loaded, "client-timeout-below-batch")
    assert "1 s" in f.message
    assert _fired(s.override({"service.arrival_overhead_ms": 10}), "client-timeout-below-batch")
    assert not _fired(loaded.override({"client.timeout_s": 1.01}), "client-timeout-below-batch")


# ---- maxReplicas the cluster cannot hold -----------------------------------------------------------------
def test_max_replicas_over_gpus_fires(rush: Scenario) -> None:
    s = rush.override({"autoscaler.maxReplicas": 40})  # 32 GPUs
    (f,) = _fired(s, "max-replicas-over-gpus")
    assert f.path == "autoscaler.maxReplicas" and "holds 32" in f.message
    assert not _fired(rush.override({"autoscaler.maxReplicas": 32}), "max-replicas-over-gpus")


def test_gpus_count_whole_nodes(rush: Scenario) -> None:
    # 30 GPUs in nodes of 8: only 3 nodes can be provisioned, 24 pods
    s = rush.override({"cluster.max_gpus": 30})
    assert not _fired(s, "max-replicas-over-gpus")  # maxReplicas 24
    assert _fired(s.override({"autoscaler.maxReplicas": 25}), "max-replicas-over-gpus")


# ---- scale-down window shorter than the metric lag -------------------------------------------------------
def test_scale_down_window_below_lag_fires(rush: Scenario) -> None:
    behavior = dict(rush.autoscaler.behavior or {})  # type: ignore[union-attr]
    behavior["scaleDown"] = {**behavior["scaleDown"], "stabilizationWindowSeconds": 20}  # lag 15 + 15
    (f,) = _fired(rush.override({"autoscaler.behavior": behavior}), "scale-down-window-below-lag")
    assert f.path == "autoscaler.behavior.scaleDown.stabilizationWindowSeconds" and "30 s" in f.message
    behavior["scaleDown"]["stabilizationWindowSeconds"] = 30
    assert not _fired(rush.override({"autoscaler.behavior": behavior}), "scale-down-window-below-lag")


def test_legacy_scale_down_window_is_checked(rush: Scenario) -> None:
    s = rush.override({"autoscaler.behavior": None, "autoscaler.downscale_window_s": 10})
    (f,) = _fired(s, "scale-down-window-below-lag")
    assert f.path == "autoscaler.downscale_window_s"
    behavior = {"scaleDown": {"selectPolicy": "Disabled"}}
    assert not _fired(s.override({"autoscaler.behavior": behavior}), "scale-down-window-below-lag")


# ---- service model -----------------------------------------------------------------------------------------
def test_missing_profile_is_a_finding(rush: Scenario, tmp_path: Path) -> None:
    s = rush.override({"service.profile": str(tmp_path / "nope.csv")})
    (f,) = _fired(s, "service-model")
    assert f.path == "service.profile" and "nope.csv" in f.message
    # the checks that need no batch time still run
    assert _fired(s.override({"batching.queue_capacity": 16, "autoscaler.metrics": _metric("queue_depth", "4")}),
                  "queue-below-batch")


# ---- the command -------------------------------------------------------------------------------------------
def test_check_command_exit_codes(tmp_path: Path, rush: Scenario) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["check", str(RUSH)])
    assert ok.exit_code == 0, ok.output
    assert "no problems found" in ok.output
    bad = rush.override({"batching.queue_capacity": 16, "client.timeout_s": 0.05,
                         "autoscaler.metrics": _metric("capsim_queue_depth", "4")})
    path = tmp_path / "bad.yaml"
    path.write_text(_yaml(bad, RUSH))
    out = runner.invoke(app, ["check", str(path)])
    assert out.exit_code == 1, out.output
    assert "FAIL batching.queue_capacity:" in out.output and "FAIL client.timeout_s:" in out.output
    both = runner.invoke(app, ["check", str(RUSH), str(path)])
    assert both.exit_code == 1 and f"== {RUSH}" in both.output and f"== {path}" in both.output


def _yaml(scenario: Scenario, source: Path) -> str:
    import yaml

    data = scenario.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["service"]["profile"] = str(scenario.resolve(Path(data["service"]["profile"])).resolve())
    return yaml.safe_dump(data, sort_keys=False)


def test_batch_checks_skip_continuous_batching(rush: Scenario) -> None:
    continuous = RUSH.parent / "friday_rush_continuous.yaml"
    if not continuous.exists():
        pytest.skip("no continuous-batching scenario in data/scenarios")
    s = Scenario.from_yaml(continuous)
    bad = {"batching.max_wait_ms": 5000, "client.timeout_s": 0.001}
    assert not [f for f in run_checks(s.override(bad)) if f.path in bad]
    # the same settings fire under static batching
    assert {f.path for f in run_checks(rush.override(bad))} >= set(bad)


def test_continuous_only_settings_in_a_static_scenario_warn(rush: Scenario) -> None:
    assert rush.batching.mode == "static" and not _fired(rush, "continuous-only-setting")
    s = rush.override({"service.answer_ms": 8.0, "service.cycle_noise_block_steps": 64, "service.cached_token_us": 9.0})
    found = _fired(s, "continuous-only-setting")
    # the factors' walk in blocks and the way out apply to static batches too: the cached-token time does not
    assert [f.path for f in found] == ["service.cached_token_us"]
    assert all(f.level == "warn" for f in found)
    assert not _fired(s.override({"batching.mode": "continuous", "batching.num_blocks": 1000}), "continuous-only-setting")


def test_static_only_settings_in_a_continuous_scenario_warn(rush: Scenario) -> None:
    s = rush.override({"service.answer_per_request_ms": 1.0, "service.first_token_scale": 1.5,
                       "service.answer_ms": 4.0})
    assert not _fired(s, "static-only-setting")  # read by the static pod
    c = s.override({"batching.mode": "continuous", "batching.num_blocks": 1000})
    found = _fired(c, "static-only-setting")
    assert [f.path for f in found] == ["service.answer_per_request_ms", "service.first_token_scale"]
    assert all(f.level == "warn" for f in found)
    assert not _fired(rush.override({"batching.mode": "continuous", "batching.num_blocks": 1000}), "static-only-setting")


def test_scale_to_zero_on_the_pods_own_series_cannot_wake() -> None:
    from test_autoscaler_validation import GATEWAY, QUEUE_SUM, bursts

    def fired(s: Scenario) -> list[str]:
        return [f.message for f in run_checks(s) if f.check == "scale-to-zero-cannot-wake"]

    (msg,) = fired(bursts(QUEUE_SUM))  # the simulator shows it: tests/test_autoscaler_validation.py
    assert "the HPA's metrics (capsim_queue_depth)" in msg and "never comes back" in msg
    (msg,) = fired(bursts(QUEUE_SUM).override({"autoscaler.keda": {}}))
    assert "KEDA's triggers" in msg
    assert not fired(bursts(GATEWAY).override({"autoscaler.keda": {}}))
    assert not fired(bursts(GATEWAY))
    assert not fired(bursts(QUEUE_SUM, **{"autoscaler.minReplicas": 1}))  # just inside: one pod stays
    idle = bursts(QUEUE_SUM, **{"autoscaler.minReplicas": 2}).override({"autoscaler.keda": {"idle_replica_count": 0}})
    (f,) = [f for f in run_checks(idle) if f.check == "scale-to-zero-cannot-wake"]  # KEDA's idle mode goes to 0
    assert f.path == "autoscaler.keda.idle_replica_count" and "never comes back" in f.message
    assert not fired(idle.override({"autoscaler.keda.idle_replica_count": None}))


def test_keda_without_a_fallback_in_a_long_prometheus_outage_goes_to_zero() -> None:
    from test_autoscaler_validation import GATEWAY, bursts

    def fired(s: Scenario) -> list[str]:
        return [f.message for f in run_checks(s) if f.check == "keda-outage-to-zero"]

    s = bursts(GATEWAY).override({"autoscaler.keda": {"cooldown_period_s": 300, "release": "2.16"},
                                  "faults.metrics_outages": [{"at_s": 600, "duration_s": 900}]})
    (msg,) = fired(s)  # the simulator shows it: tests/test_metrics_outage.py
    assert msg.startswith("none, and faults.metrics_outages lasts up to 900 s") and "kedacore/keda#965" in msg
    assert fired(s.override({"autoscaler.keda.fallback": {"replicas": 0}}))[0].startswith("replicas 0")
    assert not fired(s.override({"autoscaler.keda.fallback": {"replicas": 2}}))
    assert not fired(s.override({"faults.metrics_outages": [{"at_s": 600, "duration_s": 300}]}))  # not longer
    assert not fired(s.override({"autoscaler.minReplicas": 1}))
    assert not fired(bursts(GATEWAY).override({"faults.metrics_outages": [{"at_s": 600, "duration_s": 900}]}))
    assert not fired(s.override({"autoscaler.keda.release": "2.17"}))  # 2.17 changes nothing in error
    # ... unless its fallback has 0 replicas: such a poll in error is an idle one (capsim.policy.keda)
    (msg,) = fired(s.override({"autoscaler.keda.release": "2.17", "autoscaler.keda.fallback": {"replicas": 0}}))
    assert msg.startswith("replicas 0") and "(release 2.17, minReplicas 0)" in msg
    idle = s.override({"autoscaler.minReplicas": 2, "autoscaler.keda.idle_replica_count": 0})
    (msg,) = fired(idle)  # KEDA's idle mode goes to zero as minReplicas 0 does
    assert "(release 2.16, idle_replica_count 0)" in msg and msg.endswith("or drop idle_replica_count")


def test_keda_2_17_at_zero_in_a_prometheus_outage_stays_at_zero() -> None:
    from test_autoscaler_validation import GATEWAY, bursts

    def fired(s: Scenario) -> list[Finding]:
        return [f for f in run_checks(s) if f.check == "keda-outage-at-zero"]

    s = bursts(GATEWAY).override({"autoscaler.keda": {"cooldown_period_s": 300},
                                  "faults.metrics_outages": [{"at_s": 1000, "duration_s": 800}]})
    (f,) = fired(s)  # the simulator shows it: tests/test_metrics_outage.py
    assert f.path == "autoscaler.minReplicas" and f.level == "warn"
    assert "stays there until Prometheus answers again, a fallback or not" in f.message
    assert "kedacore/keda#7239" in f.message
    assert "its fallback or not" in fired(s.override({"autoscaler.keda.fallback": {"replicas": 2}}))[0].message
    assert not fired(s.override({"autoscaler.minReplicas": 1}))
    assert not fired(s.override({"autoscaler.keda.release": "2.16"}))
    assert not fired(s.override({"faults.metrics_outages": []}))
    (f,) = fired(s.override({"autoscaler.minReplicas": 1, "autoscaler.keda.idle_replica_count": 0}))
    assert f.path == "autoscaler.keda.idle_replica_count" and f.message.endswith(
        "drop idle_replica_count where that wait is not acceptable")


def test_keda_reading_the_empty_results_after_an_outage_as_0_warns() -> None:
    from test_autoscaler_validation import GATEWAY, bursts

    def fired(s: Scenario) -> list[Finding]:
        return [f for f in run_checks(s) if f.check == "keda-empty-after-outage"]

    # the simulator shows both: tests/test_metrics_outage.py (test_after_an_outage_...)
    s = bursts(GATEWAY).override({"autoscaler.keda": {"cooldown_period_s": 300},
                                  "faults.metrics_outages": [{"at_s": 1200, "duration_s": 600}]})
    (f,) = fired(s)
    assert f.path == "autoscaler.keda.ignore_null_values" and f.level == "warn"
    assert f.message.startswith("true (every trigger), and Prometheus is down for up to 600 s")
    assert "more than cooldown_period_s (300 s) after the last that did, and (minReplicas 0) takes a serving " \
           "Deployment to zero" in f.message and f.message.endswith("or keep minReplicas above 0")
    assert not fired(s.override({"autoscaler.keda.ignore_null_values": False}))
    assert not fired(s.override({"faults.metrics_outages": []}))
    # the outage itself takes it to zero (2.16 without a fallback: keda-outage-to-zero), after nothing is left
    assert not fired(s.override({"autoscaler.keda.release": "2.16"}))
    # 2.16 with a fallback: its advice says that false sets the fallback at an idle spell's empty answers too
    # (tests/test_keda.py, test_without_ignore_null_values_a_2_16_fallback_wakes_every_idle_spell)
    (f,) = fired(s.override({"autoscaler.keda.release": "2.16", "autoscaler.keda.fallback": {"replicas": 1}}))
    assert "but on 2.16 each poll in error sets the fallback, also from zero" in f.message
    assert "on 2.16" not in fired(s)[0].message
    # down longer than the HPA's scale-down window (60 s here) but not the cooldown: the HPA's step down
    (f,) = fired(s.override({"faults.metrics_outages": [{"at_s": 1200, "duration_s": 240}]}))
    assert "scale-down window (60 s, autoscaler.behavior.scaleDown.stabilizationWindowSeconds" in f.message
    # not down longer than either: nothing
    assert not fired(s.override({"faults.metrics_outages": [{"at_s": 1200, "duration_s": 50}]}))
    # one trigger that errs puts the poll in error: nothing changes
    two = s.override({"autoscaler.metrics": [GATEWAY, GATEWAY | {"external": {
        "metric": {"name": "capsim_requests_in_flight"}, "target": {"type": "AverageValue", "averageValue": "8"}}}]})
    assert fired(two) and not fired(two.override({"autoscaler.keda.ignore_null_values": ["capsim_gateway_requests_total"]}))
    # a floor of pods: the HPA's scale-down to it, where no fallback fills its window
    (f,) = fired(s.override({"autoscaler.minReplicas": 1}))
    assert "proposes its minimum for them at its first syncs after" in f.message
    assert "down to 1 pods" in f.message
    assert not fired(s.override({"autoscaler.minReplicas": 1, "autoscaler.keda.fallback": {"replicas": 2}}))
    assert not fired(s.override({"autoscaler.minReplicas": 1, "autoscaler.behavior": {
        "scaleDown": {"stabilizationWindowSeconds": 900}}}))
    assert not fired(s.override({"autoscaler.minReplicas": 1, "autoscaler.behavior": {
        "scaleDown": {"selectPolicy": "Disabled"}}}))


def test_a_fallback_on_a_fractional_target_proposes_fewer_pods() -> None:
    from test_autoscaler_validation import bursts

    def gateway(target: str) -> dict[str, Any]:
        return {"type": "External", "external": {"metric": {"name": "capsim_gateway_requests_total"},
                                                 "target": {"type": "AverageValue", "averageValue": target}}}

    def fired(target: str, release: str = "2.17") -> list[Finding]:
        s = bursts(gateway(target)).override({"autoscaler.keda": {"fallback": {"replicas": 4}, "release": release}})
        return [f for f in run_checks(s) if f.check == "keda-fallback-fractional-target"]

    (f,) = fired("1.5")
    assert f.path == "autoscaler.keda.fallback.replicas" and f.level == "warn"
    assert "truncates capsim_gateway_requests_total's target (1.5) to 1" in f.message
    assert "proposes 3 pods, not 4" in f.message  # ceil(1 x 4 / 1.5)
    (g,) = fired("500m")
    assert "proposes 0 pods, not 4" in g.message
    assert not fired("3") and not fired("2.5")  # ceil(2 x 4 / 2.5) = 4: the same count
    assert not fired("1.5", "2.18")  # 2.18 answers 1.5 x 4 = 6: the HPA proposes 4
    assert "release 2.16" in fired("1.5", "2.16")[0].message


def test_an_outage_of_every_triggers_source_is_a_prometheus_outage_to_keda() -> None:
    from test_autoscaler_validation import GATEWAY, bursts

    def fired(s: Scenario, check: str) -> list[str]:
        return [f.message for f in run_checks(s) if f.check == check]

    every = {"faults.trigger_outages": [{"at_s": 600, "duration_s": 900, "metrics": ["capsim_gateway_requests_total"]}]}
    s = bursts(GATEWAY).override({"autoscaler.keda": {"cooldown_period_s": 300, "release": "2.16"}, **every})
    (msg,) = fired(s, "keda-outage-to-zero")  # the simulator shows it: tests/test_metrics_outage.py
    assert msg.startswith("none, and faults.trigger_outages lasts up to 900 s, longer than cooldown_period_s (300 s)")
    assert "while its queries fail" in msg
    (msg,) = fired(s.override({"autoscaler.keda.release": "2.17"}), "keda-outage-at-zero")
    assert msg.startswith("0, and every trigger's query fails (faults.trigger_outages, up to 900 s)")
    assert "stays there until its triggers' queries answer again" in msg
    # with Prometheus down too, both are named, and the longest counts
    both = s.override({"faults.metrics_outages": [{"at_s": 3000, "duration_s": 400}]})
    assert fired(both, "keda-outage-to-zero")[0].startswith(
        "none, and faults.metrics_outages and faults.trigger_outages lasts up to 900 s")
    # Prometheus down as the triggers' sources come back: one wait of 1,100 s
    on = s.override({"faults.metrics_outages": [{"at_s": 1500, "duration_s": 200}]})
    assert fired(on, "keda-outage-to-zero")[0].startswith(
        "none, and faults.metrics_outages and faults.trigger_outages lasts up to 1100 s")
    # an outage of one trigger of two leaves the other to find activity: no finding
    in_flight = {"type": "External", "external": {"metric": {"name": "capsim_requests_in_flight"},
                                                  "target": {"type": "AverageValue", "averageValue": "8"}}}
    two = s.override({"autoscaler.metrics": [GATEWAY, in_flight]})
    assert not fired(two, "keda-outage-to-zero")
    assert not fired(two.override({"autoscaler.keda.release": "2.17"}), "keda-outage-at-zero")
    # two outages that each down one trigger, together both: every query fails where they overlap
    gateway_down = {"at_s": 600, "duration_s": 900, "metrics": ["capsim_gateway_requests_total"]}
    overlap = two.override({"faults.trigger_outages": [
        gateway_down, {"at_s": 1100, "duration_s": 1000, "metrics": ["capsim_requests_in_flight"]}]})
    (msg,) = fired(overlap, "keda-outage-to-zero")
    assert msg.startswith("none, and faults.trigger_outages lasts up to 400 s, longer than cooldown_period_s (300 s)")
    assert fired(overlap.override({"autoscaler.keda.release": "2.17"}), "keda-outage-at-zero")[0].startswith(
        "0, and every trigger's query fails (faults.trigger_outages, up to 400 s)")
    # one after the other, touching: some trigger answers at every moment
    after = two.override({"faults.trigger_outages": [
        gateway_down, {"at_s": 1500, "duration_s": 1000, "metrics": ["capsim_requests_in_flight"]}]})
    assert not fired(after, "keda-outage-to-zero")
    assert not fired(after.override({"autoscaler.keda.release": "2.17"}), "keda-outage-at-zero")
    # an overlap shorter than the cooldown: KEDA's polls err for 200 s, not long enough to take it to zero
    short = two.override({"faults.trigger_outages": [
        gateway_down, {"at_s": 1300, "duration_s": 1000, "metrics": ["capsim_requests_in_flight"]}]})
    assert not fired(short, "keda-outage-to-zero")


def test_the_spans_in_which_the_trigger_outages_together_down_every_metric() -> None:
    from test_autoscaler_validation import GATEWAY, bursts

    in_flight = {"type": "External", "external": {"metric": {"name": "capsim_requests_in_flight"},
                                                  "target": {"type": "AverageValue", "averageValue": "8"}}}
    s = bursts(GATEWAY).override({"autoscaler.metrics": [GATEWAY, in_flight]})
    gw, fl = ["capsim_gateway_requests_total"], ["capsim_requests_in_flight"]

    def spans(*entries: tuple[float, float, list[str]]) -> list[tuple[float, float]]:
        sc = s.override({"faults.trigger_outages": [{"at_s": a, "duration_s": d, "metrics": m}
                                                    for a, d, m in entries]})
        out = sc.total_trigger_outages()
        assert all(set(o.metrics) == {*gw, *fl} for o in out)
        return [(o.at_s, o.at_s + o.duration_s) for o in out]

    assert spans() == []
    assert spans((600, 900, gw)) == []  # the other trigger answers
    assert spans((600, 900, [*gw, *fl])) == [(600, 1500)]  # one entry naming both
    assert spans((600, 900, gw), (1100, 1000, fl)) == [(1100, 1500)]  # the overlap
    assert spans((600, 900, gw), (1500, 100, fl)) == []  # touching, no overlap
    assert spans((1100, 1000, fl), (600, 900, gw), (2000, 300, gw)) == [(1100, 1500), (2000, 2100)]  # any order
    # spans that touch are one: both named to 1500, then the gateway's and the other's together to 1800
    assert spans((600, 900, [*gw, *fl]), (1500, 300, gw), (1400, 400, fl)) == [(600, 1800)]


def test_every_check_is_documented_in_the_module_and_in_docs_export() -> None:
    """A check a user meets in `capsim check`'s output is listed, by name, in the module's docstring and in
    docs/export.md's table (a new check added to one and not the other failed silently before)."""
    import re

    import capsim.studies.checks as checks

    names = set(re.findall(r'check="([a-z0-9-]+)"', Path(checks.__file__).read_text()))
    assert len(names) >= 40
    table = (Path(__file__).parent.parent / "docs" / "export.md").read_text()
    assert not [n for n in names if f"``{n}``" not in (checks.__doc__ or "")]
    assert not [n for n in names if f"| `{n}`" not in table]


# ---- a rate over fewer than two scrape intervals -----------------------------------------------------------------
def _on_ttft(rush: Scenario, window_s: float) -> Scenario:
    return rush.override({
        "autoscaler.metrics": _metric("capsim_time_to_first_token_seconds", "1"),
        "autoscaler.queries": {"capsim_time_to_first_token_seconds": {"query": "histogram_quantile",
                                                                        "window_s": window_s}}})


def test_rate_window_short_fires_below_two_scrapes(rush: Scenario) -> None:
    (f,) = _fired(_on_ttft(rush, 20), "rate-window-short")  # scraped every 15 s
    assert f.path == "autoscaler.queries.capsim_time_to_first_token_seconds.window_s" and f.level == "warn"
    assert "holds at most one at 67% of the reads" in f.message and "at least 30 s" in f.message
    (f,) = _fired(_on_ttft(rush, 15), "rate-window-short")
    assert "at most one at every read" in f.message
    assert not _fired(_on_ttft(rush, 30), "rate-window-short")
    # a histogram's mean over the default query window
    s = rush.override({"autoscaler.metrics": _metric("capsim_time_to_first_token_seconds", "1"),
                       "autoscaler.query_window_s": 25})
    (f,) = _fired(s, "rate-window-short")
    assert f.path == "autoscaler.query_window_s"
    assert not _fired(s.override({"autoscaler.query_window_s": 30}), "rate-window-short")
    # a counter's default window is the adapter's rate interval (300 s), which only its query sets
    gw = rush.override({"autoscaler.metrics": [{"type": "External", "external": {
        "metric": {"name": "capsim_gateway_requests_total"}, "target": {"type": "AverageValue", "averageValue": "5"}}}],
        "autoscaler.scrape_interval_s": 200})
    (f,) = _fired(gw, "rate-window-short")
    assert f.path == "autoscaler.queries.capsim_gateway_requests_total.window_s" and "rate over 300 s" in f.message

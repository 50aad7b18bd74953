"""KEDA's step to and from zero replicas (``capsim.policy.keda``, ``autoscaler.keda``) and its export; the
check ``scale-to-zero-cannot-wake`` is in ``test_checks.py``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.policy.keda import ScaleExecutor, hpa_min_replicas, metric_value
from test_autoscaler_validation import GATEWAY, bursts


# ---- the scale executor, branch by branch (RequestScale in kedacore/keda) -----------------------------------
def test_hpa_min_replicas_is_at_least_one() -> None:
    assert [hpa_min_replicas(n) for n in (0, 1, 3)] == [1, 1, 3]


def test_zero_replicas_and_an_active_trigger_scale_to_the_minimum_or_one() -> None:
    ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300)
    assert ex.request_scale(10.0, 0, active=True) == 1
    assert ex.last_active_s == 10.0
    assert ScaleExecutor(min_replica_count=3).request_scale(10.0, 0, active=True) == 3


def test_zero_replicas_and_nothing_active_stay_at_zero() -> None:
    ex = ScaleExecutor(min_replica_count=0, last_active_s=0.0)
    assert ex.request_scale(1000.0, 0, active=False) is None
    assert ex.last_active_s == 0.0


def test_scale_to_zero_waits_a_cooldown_after_the_last_active_poll() -> None:
    ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300)
    assert ex.request_scale(100.0, 4, active=True) is None  # active with pods: only the time is noted
    assert ex.last_active_s == 100.0
    assert ex.request_scale(130.0, 4, active=False) is None  # cooling down
    assert ex.request_scale(400.0, 4, active=False) is None  # exactly the cooldown: not yet (Before)
    assert ex.request_scale(400.5, 4, active=False) == 0
    assert ex.last_active_s == 100.0


def test_activity_during_the_cooldown_restarts_it() -> None:
    ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300)
    ex.request_scale(0.0, 1, active=True)
    assert ex.request_scale(290.0, 1, active=True) is None
    assert ex.request_scale(310.0, 1, active=False) is None  # 300 s after 0, but 20 s after 290
    assert ex.request_scale(600.0, 1, active=False) == 0


def test_never_active_scales_to_zero_at_once() -> None:
    # no lastActiveTime (the Deployment was scaled outside KEDA): the cooldown is ignored
    assert ScaleExecutor(min_replica_count=0).request_scale(5.0, 2, active=False) == 0


def test_a_minimum_above_zero_is_restored_and_never_left_for_zero() -> None:
    ex = ScaleExecutor(min_replica_count=2, cooldown_period_s=0)
    assert ex.request_scale(5.0, 1, active=False) == 2  # set outside KEDA below its minimum
    assert ex.request_scale(5.0, 2, active=False) is None
    assert ex.request_scale(50.0, 5, active=False) is None  # the HPA scales down, not KEDA


def test_idle_mode_takes_a_minimum_above_zero_to_zero_after_the_cooldown_and_back_to_the_minimum() -> None:
    # idleReplicaCount 0 with minReplicaCount 2 (scaleToZeroOrIdle, scaleFromZeroOrIdle)
    ex = ScaleExecutor(min_replica_count=2, cooldown_period_s=300, idle_replica_count=0)
    assert ex.request_scale(100.0, 5, active=True) is None and ex.last_active_s == 100.0
    assert ex.request_scale(130.0, 5, active=False) is None  # cooling down; the HPA scales in meanwhile
    assert ex.request_scale(400.5, 2, active=False) == 0  # to idle, below the minimum
    assert ex.request_scale(430.0, 0, active=False) is None  # and not back up to the minimum while idle
    assert ex.request_scale(460.0, 0, active=True) == 2 and ex.last_active_s == 460.0  # to the minimum
    assert ex.request_scale(490.0, 1, active=True) == 2  # below the minimum with a trigger active: to it
    assert ex.request_scale(520.0, 1, active=False) is None  # below it without one: left alone (no idle rule)
    assert ex.request_scale(800.0, 1, active=False) == 0


def test_idle_mode_without_a_minimum_is_plain_scale_to_zero() -> None:
    plain, idle = ScaleExecutor(min_replica_count=0), ScaleExecutor(min_replica_count=0, idle_replica_count=0)
    polls = [(0.0, 0, True), (30.0, 2, True), (60.0, 2, False), (400.0, 2, False), (430.0, 0, False),
             (460.0, 0, True)]
    assert [plain.request_scale(*p) for p in polls] == [idle.request_scale(*p) for p in polls] \
        == [1, None, None, 0, None, 1]


def test_idle_replica_count_is_zero_only() -> None:
    with pytest.raises(ValueError, match=r"idle_replica_count must be 0, the only value KEDA supports "
                                         r"\(kedacore/keda#2314\), got 1"):
        ScaleExecutor(min_replica_count=3, idle_replica_count=1)


@pytest.mark.parametrize("bad", [{"min_replica_count": -1}, {"cooldown_period_s": -1.0},
                                 {"min_replica_count": 1.5}, {"idle_replica_count": -1}])
def test_bad_executor_settings_name_the_field(bad: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError), match=next(iter(bad))):
        ScaleExecutor(**bad)


# ---- the scenario's section ------------------------------------------------------------------------------
def keda(metric: dict[str, Any] = GATEWAY, **keda_settings: Any) -> Scenario:
    """``bursts`` (2 req/s for 5 minutes, 20 quiet minutes, again) with KEDA driving the autoscaler."""
    return bursts(metric).override({"autoscaler.keda": keda_settings})


def test_keda_needs_external_metrics_and_names_the_metric() -> None:
    queue = {"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                      "target": {"type": "AverageValue", "averageValue": "4"}}}
    with pytest.raises(SettingsError, match=r"autoscaler.metrics\[1\].type must be 'External' with keda"):
        bursts(GATEWAY).override({"autoscaler.minReplicas": 1, "autoscaler.metrics": [GATEWAY, queue],
                                  "autoscaler.keda": {}})
    with pytest.raises(SettingsError, match=r"autoscaler.keda.activation.nope: no metric of this name"):
        keda(activation={"nope": 1})
    with pytest.raises(SettingsError, match=r"autoscaler.keda.polling_interval_s"):
        keda(polling_interval_s=0)


def test_keda_hands_the_hpa_each_trigger_s_value_in_whole_thousandths_truncated() -> None:
    # GenerateMetricInMili: NewMilliQuantity(int64(value x 1000)); the HPA's own rounding of a fraction of a milli-unit
    # up (Quantity.MilliValue) never sees one
    assert [metric_value(v) for v in (2.0009, 1.5333333, -0.0005, 7.0)] == [2.0, 1.533, 0.0, 7.0]
    from capsim.sim import simulate

    r = simulate(keda(cooldown_period_s=300), seed=0)
    rates = r.hpa_syncs["capsim_gateway_requests_total"].dropna()
    assert len(rates) > 50 and (rates * 1000 % 1 != 0).sum() == 0
    # the gateway's 30 s rate of 2 requests/s with its extrapolation: thirds and such, truncated, not rounded
    assert (rates.round(6) != rates.round(3)).sum() == 0 and rates.nunique() > 10


def test_the_hpa_keda_creates_keeps_one_pod() -> None:
    s = keda()
    assert s.autoscaler is not None and s.autoscaler.min_replicas == 0
    assert s.autoscaler.to_hpa().min_replicas == 1
    assert bursts(GATEWAY).autoscaler.to_hpa().min_replicas == 0  # type: ignore[union-attr]  # HPAScaleToZero


# ---- in the simulator ------------------------------------------------------------------------------------
def test_keda_takes_the_deployment_to_zero_a_cooldown_after_the_last_activity_and_back() -> None:
    from capsim.sim import simulate

    r = simulate(keda(cooldown_period_s=300), seed=0)
    ev = r.scale_events
    assert set(ev["by"]) == {"hpa", "keda"}
    assert (ev.loc[ev["by"] == "hpa", "to_replicas"] >= 1).all()  # KEDA's HPA never goes below one
    to_zero = ev[(ev["by"] == "keda") & (ev["to_replicas"] == 0)]
    wake = ev[(ev["by"] == "keda") & (ev["from_replicas"] == 0)]
    assert len(to_zero) == 1 and len(wake) == 1
    # the last request came at 300 s; the gateway's 30 s rate is active until about 330 s, and KEDA waits
    # 300 s from the last poll that saw it (polls 30 s apart)
    assert 330 + 300 - 30 < to_zero["time_s"].iloc[0] <= 330 + 300 + 30
    # the second burst at 1500 s: the rate needs two scrapes (15 s apart), then the next poll
    assert 1500 < wake["time_s"].iloc[0] <= 1500 + 15 + 15 + 30
    assert wake["to_replicas"].iloc[0] == 1
    ts = r.timeseries.set_index("time_s")
    assert (ts["ready_replicas"].loc[700:1490] == 0).all()
    late = r.requests[r.requests["arrival_s"] >= 1500]
    assert (late["outcome"] == "ok").mean() > 0.99  # the first ones retried until a pod was ready
    polls = r.keda_polls
    assert list(polls.columns) == ["time_s", "active", "error", "replicas", "set_replicas"]
    gaps = polls["time_s"].diff().dropna()
    assert gaps.between(30 - 1e-6, 30 + 1e-6).all()
    assert not polls.loc[polls["time_s"].between(700, 1490), "active"].any()


def test_the_cooldown_is_what_scale_to_zero_costs() -> None:
    from capsim.sim import simulate

    hpa_alone = simulate(bursts(GATEWAY), seed=0).summary.gpu_hours  # HPAScaleToZero, 60 s window
    short = simulate(keda(cooldown_period_s=60), seed=0).summary.gpu_hours
    long = simulate(keda(cooldown_period_s=600), seed=0).summary.gpu_hours
    floor = simulate(bursts(GATEWAY, **{"autoscaler.minReplicas": 1}), seed=0).summary.gpu_hours
    # 540 s more cooldown keeps one pod about 540 s longer in each quiet spell (the first; the run ends
    # in the second burst)
    assert long - short == pytest.approx(540 / 3600, abs=60 / 3600)
    assert hpa_alone < long < floor


def test_an_activation_threshold_trades_a_trickle_s_requests_for_gpu_time() -> None:
    from capsim.sim import simulate

    # one agent every 20 s in the quiet spell: at threshold 0 the gateway's 30 s rate is above 0 nearly
    # always, so the Deployment hardly leaves one pod; at 0.5 requests a second a lone request does not
    # activate the trigger, but its retries to a Service with no pod (every 5 s, attempts the gateway
    # counts) add up until one does: more time at zero, fewer GPU hours, and quiet-time requests failed
    trickle = {"workload.arrivals.rate_per_s": [[0, 2], [300, 0.05], [1500, 2]]}
    runs = [simulate(keda(cooldown_period_s=60, activation=act).override(trickle), seed=0)
            for act in ({}, {"capsim_gateway_requests_total": 0.5})]
    at_zero = [(r.timeseries.set_index("time_s")["ready_replicas"].loc[400:1490] == 0).mean() for r in runs]
    quiet = [r.requests[r.requests["arrival_s"].between(400, 1490)] for r in runs]
    assert at_zero[0] < 0.2 < 0.5 < at_zero[1]
    assert (quiet[0]["outcome"] == "ok").all()
    assert (quiet[1]["outcome"] == "failed").sum() >= 5
    assert runs[1].summary.gpu_hours < runs[0].summary.gpu_hours
    woke = runs[1].scale_events.query("by == 'keda' and from_replicas == 0")
    assert len(woke) >= 3  # retries woke it in the quiet spell, not only the second burst


def test_idle_mode_keeps_the_minimum_through_the_traffic_and_goes_to_zero_without_it() -> None:
    from capsim.sim import simulate

    floor2 = bursts(GATEWAY, **{"autoscaler.minReplicas": 2, "pods.replicas": 2})
    held = simulate(floor2.override({"autoscaler.keda": {"cooldown_period_s": 300}}), seed=0)
    idle = simulate(floor2.override({"autoscaler.keda": {"cooldown_period_s": 300, "idle_replica_count": 0}}),
                    seed=0)
    ts_held, ts_idle = (r.timeseries.set_index("time_s")["desired_replicas"] for r in (held, idle))
    assert (ts_held >= 2).all()  # minReplicaCount 2 alone never leaves two pods
    ev = idle.scale_events
    to_zero = ev[(ev["by"] == "keda") & (ev["to_replicas"] == 0)]
    wake = ev[(ev["by"] == "keda") & (ev["from_replicas"] == 0)]
    assert len(to_zero) == 1 and len(wake) == 1
    assert 330 + 300 - 30 < to_zero["time_s"].iloc[0] <= 330 + 300 + 30  # as with minReplicaCount 0
    assert 1500 < wake["time_s"].iloc[0] <= 1500 + 15 + 15 + 30
    assert wake["to_replicas"].iloc[0] == 2  # back to the minimum, not to one
    assert len(idle.wakes) == 1 and idle.wakes["ready_s"].iloc[0] > wake["time_s"].iloc[0]
    assert (ts_idle.loc[700:1490] == 0).all()
    busy = ts_idle.loc[(ts_idle.index < 600) | (ts_idle.index > wake["time_s"].iloc[0] + 5)]
    assert (busy >= 2).all()  # the HPA that KEDA creates keeps its minReplicas (2) while serving
    assert idle.summary.gpu_hours < held.summary.gpu_hours - 2 * 800 / 3600  # two pods idle ~15 min fewer
    late = idle.requests[idle.requests["arrival_s"] >= 1500]
    assert (late["outcome"] == "ok").mean() > 0.99


def test_idle_mode_is_zero_only_and_named_in_the_scenario() -> None:
    with pytest.raises(SettingsError, match=r"autoscaler.keda.idle_replica_count: must be 0, the only value "
                                            r"KEDA supports \(kedacore/keda#2314\), got 1"):
        bursts(GATEWAY, **{"autoscaler.minReplicas": 2}).override({"autoscaler.keda": {"idle_replica_count": 1}})
    s = bursts(GATEWAY, **{"autoscaler.minReplicas": 2}).override({"autoscaler.keda": {"idle_replica_count": 0}})
    assert s.autoscaler is not None and s.autoscaler.goes_to_zero and s.autoscaler.to_hpa().min_replicas == 2
    assert not bursts(GATEWAY, **{"autoscaler.minReplicas": 2}).override({"autoscaler.keda": {}}) \
        .autoscaler.goes_to_zero  # type: ignore[union-attr]


def test_keda_runs_the_same_frames_for_a_seed() -> None:
    from capsim.sim import simulate

    a, b = (simulate(keda(), seed=3) for _ in range(2))
    assert a.scale_events.equals(b.scale_events) and a.keda_polls.equals(b.keda_polls)


# ---- the export ------------------------------------------------------------------------------------------
def test_a_keda_plan_exports_the_scaled_object_it_simulated(tmp_path: Any) -> None:
    import jsonschema
    import yaml

    from capsim.export import DeployTarget, export_scenario
    from test_export import KEDA_SCALED_OBJECT

    s = keda(cooldown_period_s=240, polling_interval_s=20, activation={"capsim_gateway_requests_total": 0.5})
    result = export_scenario(s, tmp_path, DeployTarget(name="agent", namespace="agents"))
    names = {p.name for p in result.files}
    assert "keda-scaledobject.yaml" in names and not names & {"hpa.yaml", "prometheus-adapter.yaml"}
    obj = yaml.safe_load((tmp_path / "keda-scaledobject.yaml").read_text())
    jsonschema.validate(obj, KEDA_SCALED_OBJECT)
    spec = obj["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 4)
    assert (spec["pollingInterval"], spec["cooldownPeriod"]) == (20, 240)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == s.autoscaler.behavior  # type: ignore[union-attr]
    (trigger,) = spec["triggers"]
    assert trigger["metricType"] == "AverageValue" and trigger["name"] == "capsim-gateway-requests-total"
    meta = trigger["metadata"]
    assert meta == {
        "serverAddress": "http://prometheus-operated.monitoring.svc:9090",
        # the simulated rate's 30 s window, on the requests the clients' sidecars sent to the Service
        "query": 'sum(rate(istio_requests_total{reporter="source",'
                 'destination_service="agent.agents.svc.cluster.local"}[30s]))',
        "threshold": "1", "activationThreshold": "0.5"}
    readme = (tmp_path / "README.md").read_text()
    assert "kubectl apply -f keda-scaledobject.yaml" in readme and "hpa.yaml" not in readme
    assert "| KEDA `pollingInterval` / `cooldownPeriod` | 20 s / 240 s |" in readme
    assert "to zero 240 s after the last poll" in readme and "--gateway-query" in readme


def test_idle_mode_is_exported_as_simulated(tmp_path: Any) -> None:
    import jsonschema
    import yaml

    from capsim.export import DeployTarget, export_scenario
    from test_export import KEDA_SCALED_OBJECT

    s = bursts(GATEWAY, **{"autoscaler.minReplicas": 2}).override({"autoscaler.keda": {"idle_replica_count": 0}})
    export_scenario(s, tmp_path, DeployTarget(name="agent", namespace="agents"))
    obj = yaml.safe_load((tmp_path / "keda-scaledobject.yaml").read_text())
    jsonschema.validate(obj, KEDA_SCALED_OBJECT)
    assert (obj["spec"]["idleReplicaCount"], obj["spec"]["minReplicaCount"]) == (0, 2)
    readme = (tmp_path / "README.md").read_text()
    assert ("takes the Deployment from zero to 2 on an active trigger, and to zero 300 s after the last poll that "
            "found one (`idleReplicaCount: 0`, whatever `minReplicaCount` is)") in readme
    export_scenario(s.override({"autoscaler.keda.idle_replica_count": None}), tmp_path / "plain",
                    DeployTarget(name="agent", namespace="agents"))
    plain = yaml.safe_load((tmp_path / "plain" / "keda-scaledobject.yaml").read_text())
    assert "idleReplicaCount" not in plain["spec"]


def test_a_fallback_is_exported_as_simulated_and_its_absence_is_named(tmp_path: Any) -> None:
    import jsonschema
    import yaml

    from capsim.export import DeployTarget, export_scenario
    from test_export import KEDA_SCALED_OBJECT

    target = DeployTarget(name="agent", namespace="agents")
    export_scenario(keda(fallback={"failure_threshold": 4, "replicas": 2}), tmp_path / "fb", target)
    obj = yaml.safe_load((tmp_path / "fb" / "keda-scaledobject.yaml").read_text())
    jsonschema.validate(obj, KEDA_SCALED_OBJECT)
    assert obj["spec"]["fallback"] == {"failureThreshold": 4, "replicas": 2}
    readme = (tmp_path / "fb" / "README.md").read_text()
    assert "| KEDA `fallback` (`failureThreshold` / `replicas` / `behavior`) | 4 / 2 / static |" in readme
    assert "| KEDA release simulated | 2.18 and later |" in readme
    assert "the HPA that KEDA creates goes to 2 pods after 4 failed reads" in readme
    assert "stays at zero until it answers again, fallback or not" in readme  # kedacore/keda#7239
    export_scenario(keda(fallback={"replicas": 3, "behavior": "currentReplicasIfHigher"}), tmp_path / "hi", target)
    obj = yaml.safe_load((tmp_path / "hi" / "keda-scaledobject.yaml").read_text())
    jsonschema.validate(obj, KEDA_SCALED_OBJECT)
    assert obj["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 3, "behavior": "currentReplicasIfHigher"}
    assert "goes to `currentReplicasIfHigher` of 3 pods" in (tmp_path / "hi" / "README.md").read_text()
    export_scenario(keda(release="2.16", fallback={"failure_threshold": 4, "replicas": 2}), tmp_path / "old", target)
    assert "KEDA holds 2 pods" in (tmp_path / "old" / "README.md").read_text()
    export_scenario(keda(release="2.16"), tmp_path / "none", target)
    assert "fallback" not in yaml.safe_load((tmp_path / "none" / "keda-scaledobject.yaml").read_text())["spec"]
    assert "no `fallback`: if Prometheus stops answering" in (tmp_path / "none" / "README.md").read_text()


def test_a_pod_metric_trigger_runs_the_summed_pod_query_and_a_value_target_stays_value() -> None:
    from capsim.export import DeployTarget, build_all
    from capsim.export.promql import PodQuery

    target = DeployTarget(name="agent", namespace="agents")
    waiting = {"type": "External", "external": {"metric": {"name": "capsim_queue_depth"},
                                                "target": {"type": "Value", "value": "6"}}}
    s = keda(GATEWAY).override({"autoscaler.metrics": [GATEWAY, waiting], "autoscaler.minReplicas": 1})
    spec = build_all(s, target)["keda-scaledobject.yaml"]["spec"]
    gateway, queue = spec["triggers"]
    assert gateway["metricType"] == "AverageValue" and "istio_requests_total" in gateway["metadata"]["query"]
    assert queue["metricType"] == "Value" and queue["metadata"]["threshold"] == "6"
    assert "activationThreshold" not in queue["metadata"]
    assert queue["metadata"]["query"] == PodQuery.of("capsim_queue_depth", 60.0).deployment_total("agents", "agent")
    assert spec["minReplicaCount"] == 1 and spec["cooldownPeriod"] == 300


def test_the_gateway_query_is_a_template_and_a_bad_one_names_the_option(tmp_path: Any) -> None:
    from capsim.export import DeployTarget, build_all
    from test_inputs_cli import one_line_error

    nginx = 'sum(rate(nginx_ingress_controller_requests{exported_namespace="$namespace",service="$name"}[$window]))'
    spec = build_all(keda(), DeployTarget(name="agent", gateway_query=nginx))["keda-scaledobject.yaml"]["spec"]
    assert spec["triggers"][0]["metadata"]["query"] == (
        'sum(rate(nginx_ingress_controller_requests{exported_namespace="default",service="agent"}[30s]))')
    with pytest.raises(SettingsError, match=r"gateway_query: unknown placeholder \$svc"):
        DeployTarget(gateway_query="sum(rate(x{service=\"$svc\"}[$window]))")
    path = tmp_path / "keda.yaml"
    path.write_text(yaml_of(keda()))
    one_line_error(["export", str(path), "--out", str(tmp_path / "out"), "--no-simulate",
                    "--gateway-query", "rate(x[$win])"], "gateway_query: unknown placeholder $win")


def yaml_of(s: Scenario) -> str:
    import yaml

    return yaml.safe_dump(s.model_dump(mode="json", by_alias=True, exclude_none=True))


def test_simulate_says_when_keda_went_to_zero_and_writes_its_polls(tmp_path: Any) -> None:
    from test_inputs_cli import run

    path = tmp_path / "keda.yaml"
    path.write_text(yaml_of(keda(cooldown_period_s=300)))
    code, out, err = run(["simulate", str(path), "--out", str(tmp_path / "run")])
    assert code == 0, err
    (note,) = [line for line in out.splitlines() if line.startswith("note: KEDA")]
    assert note.startswith("note: KEDA took the Deployment to zero at 631 s and back at 1531 s"), note
    polls = (tmp_path / "run" / "keda_polls.csv").read_text().splitlines()
    assert polls[0] == "time_s,active,error,replicas,set_replicas" and len(polls) == 1 + 2400 // 30
    assert (tmp_path / "run" / "scale_events.csv").read_text().startswith("time_s,from_replicas,to_replicas,by\n")
    syncs = (tmp_path / "run" / "hpa_syncs.csv").read_text().splitlines()  # the HPA KEDA made: each sync's reads
    assert syncs[0].startswith("time_s,current,desired,") and syncs[0].endswith(" proposal") and len(syncs) > 100
    (wake,) = [line for line in out.splitlines() if line.startswith("note: a request at")]
    assert wake.startswith("note: a request at 1500 s found no pod: keda woke the Deployment 31 s later"), wake
    assert "its pod was ready 20 s after that; first token 53 s after the request" in wake
    assert (tmp_path / "run" / "wakes.csv").read_text().startswith("to_zero_s,first_request_s,woke_s,by,")


def test_the_shipped_scale_to_zero_scenario_and_grid_load_as_keda_plans() -> None:
    from capsim.studies.sweep import expand_grid, load_grid

    base = Scenario.from_yaml("data/scenarios/scale_to_zero.yaml")
    auto = base.autoscaler
    assert auto is not None and auto.keda is not None and auto.min_replicas == 0
    assert [m["type"] for m in auto.metrics] == ["External", "External"]
    settings = expand_grid(load_grid("data/studies/scale_to_zero_grid.yaml"))
    plans = [base.override(s.changes).autoscaler for s in settings]
    assert [(p.min_replicas, p.keda.cooldown_period_s) for p in plans if p and p.keda] == [
        (m, c) for m in (0, 1) for c in (60, 300, 900, 1800)]


# ---- a gateway that holds requests at zero pods (router.hold_when_no_pod_s) ---------------------------------
def test_a_gateway_that_holds_requests_at_zero_pods_ends_the_retry_storm() -> None:
    from capsim.sim import simulate

    # the second burst finds no pod: without a hold every request is refused and retried every 5 s (each a
    # request to the gateway, which the HPA scales on); held, each waits once for the pod KEDA wakes
    runs = [simulate(keda(cooldown_period_s=300).override({"router.hold_when_no_pod_s": hold, "client.timeout_s": 300}),
                     seed=0) for hold in (None, 300)]
    late = [r.requests[r.requests["arrival_s"].between(1500, 1600)] for r in runs]
    assert all((q["outcome"] == "ok").all() for q in late)
    assert late[0]["attempts"].max() > 5 and (late[1]["attempts"] == 1).all()
    assert runs[0].summary.held_at_gateway == 0 < runs[1].summary.held_at_gateway
    assert runs[1].summary.retries < runs[0].summary.retries / 100
    assert runs[1].summary.max_replicas < runs[0].summary.max_replicas  # no storm of retried requests to scale on
    # the first held request waits for KEDA's next poll, the pod's start (20 s) and its readiness probe
    held = late[1].sort_values("arrival_s").iloc[0]
    wake = runs[1].scale_events.query("by == 'keda' and from_replicas == 0")["time_s"].iloc[0]
    assert wake + 20 <= held["first_token_s"] <= wake + 20 + 10 + 1


def test_a_held_request_sent_late_still_times_out_when_its_client_does() -> None:
    from capsim.sim.simulate import Simulation

    # every pod crashes four times; the gateway holds what comes meanwhile and sends it when a pod is back, with its
    # client's send time, so it is due sooner than anything the timeout watcher has seen (until stop 58 it noticed
    # such a timeout up to a second late, and the retry went out in the past)
    sc = Scenario.model_validate(dict(
        horizon_s=120.0, warmup_s=0.0,
        workload={"arrivals": {"kind": "poisson", "rate_per_s": 4.0}, "prompt_tokens": {"kind": "constant", "value": 256},
                  "output_tokens": {"kind": "constant", "value": 20}},
        service={"kind": "exponential", "mean_s": 0.75},
        batching={"max_batch_size": 2, "max_wait_ms": 30, "queue_capacity": 4, "overflow": "wait"},
        pods={"replicas": 2, "startup_s": 1.0, "termination_grace_s": 0.0, "crash_loop_backoff": {"initial_s": 1.0}},
        router={"kind": "random", "hold_when_no_pod_s": 5.0}, autoscaler=None, cluster=None,
        faults={"crashes": [{"at_s": a, "pods": 2} for a in (10, 40, 70, 100)]}, state={"store": "redis"},
        client={"timeout_s": 3.0, "max_retries": 1, "backoff_s": 0.0}))
    for seed in range(3):
        sim = Simulation(sc, seed)
        failed = sim.client._attempt_failed
        late: list[float] = []

        def noted(i: int, t: float, outcome: int, pod: int, failed: Any = failed, sim: Any = sim,
                  late: list[float] = late) -> None:
            late.append(sim.env.now - t)  # how long after the attempt failed the simulator handled it
            failed(i, t, outcome, pod)

        sim.client._attempt_failed = noted  # type: ignore[method-assign]
        r = sim.run()
        assert r.summary.held_at_gateway > 50 and r.summary.timed_out + r.summary.retries > 0
        assert max(late) <= 1e-9, seed


@pytest.mark.parametrize("router", ["session_affinity", "prefix_aware", "round_robin"])
def test_every_router_behind_the_gateway_is_held_for(router: str) -> None:
    from capsim.sim import simulate

    sc = keda(cooldown_period_s=300).override({"router.hold_when_no_pod_s": 300, "client.timeout_s": 300,
                                               "router.kind": router})
    late = simulate(sc, seed=0).requests.query("arrival_s >= 1500 and arrival_s < 1600")
    assert (late["outcome"] == "ok").all() and (late["attempts"] == 1).all()


def test_a_hold_shorter_than_the_wake_fails_and_the_client_retries_into_the_next_hold() -> None:
    from capsim.sim import simulate

    # held 10 s at most: the 503 comes 10 s after each attempt, which the client retries (backoff 5 s)
    r = simulate(keda(cooldown_period_s=300).override({"router.hold_when_no_pod_s": 10, "client.timeout_s": 300}),
                 seed=0)
    late = r.requests[r.requests["arrival_s"].between(1500, 1600)]
    assert (late["outcome"] == "ok").all() and late["attempts"].max() >= 3
    first = late.sort_values("arrival_s").iloc[0]
    # each failed attempt took the hold (10 s) and the backoff (5 s)
    assert first["start_s"] >= first["arrival_s"] + (first["attempts"] - 1) * 15 - 1e-6
    # a client timeout under the hold: the client gives up first (timed out), and retries
    t = simulate(keda(cooldown_period_s=300).override({"router.hold_when_no_pod_s": 300, "client.timeout_s": 8}),
                 seed=0)
    late = t.requests[t.requests["arrival_s"].between(1500, 1560)]
    assert t.summary.held_at_gateway > len(late)
    assert (late["outcome"] == "ok").all() and late["attempts"].max() >= 3  # 8 s held, 5 s backoff, again


def test_requests_still_held_at_the_horizon_are_in_flight() -> None:
    from capsim.sim import simulate
    from test_autoscaler_validation import QUEUE_SUM

    # on the pods' own queue KEDA never wakes the Deployment: the second burst waits at the gateway to the end
    r = simulate(keda(QUEUE_SUM).override({"router.hold_when_no_pod_s": 5000, "client.timeout_s": 5000}), seed=0)
    late = r.requests[r.requests["arrival_s"] >= 1500]
    assert len(late) > 1000 and late["outcome"].isna().all()  # no outcome yet
    assert r.summary.in_flight == len(late) and r.summary.held_at_gateway == len(late)


def test_the_export_says_the_plan_assumed_a_gateway_that_holds(tmp_path: Any) -> None:
    from capsim.export import export_scenario

    export_scenario(keda().override({"router.hold_when_no_pod_s": 120}), tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert "held a request up to 120 s" in readme and "`interceptor.replicas.waitTimeout: 120s`" in readme
    export_scenario(keda(), tmp_path / "plain")
    assert "held a request" not in (tmp_path / "plain" / "README.md").read_text()


# ---- where a wake's wait goes (SimResult.wakes) -----------------------------------------------------------
def test_a_wake_from_zero_is_broken_into_the_controller_the_pod_and_the_first_token() -> None:
    from capsim.sim import simulate
    from capsim.sim.wakes import WAKE_COLUMNS

    r = simulate(keda(cooldown_period_s=300), seed=0)
    (w,) = r.wakes.itertuples()
    ev = r.scale_events
    assert w.to_zero_s == ev.loc[(ev["by"] == "keda") & (ev["to_replicas"] == 0), "time_s"].iloc[0]
    assert 1500 <= w.first_request_s < 1501  # the second burst's first request
    assert w.woke_s == ev.loc[ev["from_replicas"] == 0, "time_s"].iloc[0] and w.by == "keda"
    assert np.isnan(w.placed_s)  # no cluster section: no node to wait for
    assert 20 <= w.ready_s - w.woke_s <= 20 + 10  # pods.startup_s, then the readiness probe (every 10 s)
    assert w.ready_s <= w.first_token_s and w.waited_s == pytest.approx(w.first_token_s - w.first_request_s)
    assert list(simulate(bursts(GATEWAY, **{"autoscaler.minReplicas": 1}), seed=0).wakes.columns) == list(WAKE_COLUMNS)
    assert simulate(bursts(GATEWAY, **{"autoscaler.minReplicas": 1}), seed=0).wakes.empty


def test_a_wake_on_gpu_nodes_waits_for_a_node_and_a_model_load() -> None:
    from capsim.sim import simulate

    sc = Scenario.from_yaml("data/scenarios/scale_to_zero.yaml")
    r = simulate(sc, seed=0)
    assert len(r.wakes) == 2  # after the silent hour, and in the trickle
    assert sc.cluster is not None
    for w in r.wakes.itertuples():
        assert w.first_request_s <= w.woke_s <= w.first_request_s + 30 + 60  # a poll, the rate's window
        assert 60 <= w.ready_s - w.placed_s <= 120 + 10  # the model load (60-120 s), the probe
    silent, trickle = r.wakes.itertuples()
    # after the silent hour the node had gone (empty 10 to 15 minutes, cluster-autoscaler's unneeded time and its
    # recheck of a node it found unremovable): a new one
    assert silent.placed_s - silent.woke_s == pytest.approx(sc.cluster.node_provision_s)
    assert 300 < silent.waited_s < 400
    # in the trickle the wake came within 10 minutes of the step to zero: the node was still there
    assert trickle.woke_s - trickle.to_zero_s < 600 and trickle.placed_s == trickle.woke_s
    assert trickle.waited_s < 200
    (removed,) = r.nodes["removed_s"].dropna()
    # its lone pod had nowhere to go, so each scan that looked at it found it unremovable and left it alone for
    # --unremovable-node-recheck-timeout (300 s): its unneeded time began at the first look after the step to
    # zero, up to 300 s (and a scan) later, and ran 600 s
    recheck = sc.cluster.unremovable_node_recheck_timeout_s
    assert silent.to_zero_s + 600 < removed <= silent.to_zero_s + 600 + recheck + sc.cluster.scan_interval_s
    r0 = simulate(sc.override({"cluster.unremovable_node_recheck_timeout_s": 0}), seed=0)
    (removed0,) = r0.nodes["removed_s"].dropna()
    assert removed0 == pytest.approx(silent.to_zero_s + 600, abs=10)  # looked at every scan: 10 minutes
    assert r0.summary.cost < r.summary.cost


# ---- a wake budget in the SLO (slo.max_wake_s) and the tune that uses it ------------------------------------
def test_a_wake_budget_judges_the_wakes_apart_from_the_warm_requests() -> None:
    from capsim.sim import simulate

    sc = Scenario.from_yaml("data/scenarios/scale_to_zero.yaml")
    assert sc.slo.max_wake_s == 420
    s = simulate(sc, seed=0).summary
    assert s.ttft_p99_s > 200 and s.ttft_p99_warm_s < sc.slo.ttft_p99_s  # the wakes are the tail
    assert 300 < s.longest_wake_s <= 420 and s.wake_slo_met and s.slo_met
    tight = simulate(sc.override({"slo.max_wake_s": 300}), seed=0).summary
    assert not tight.wake_slo_met and not tight.slo_met and tight.longest_wake_s == s.longest_wake_s
    plain = simulate(sc.override({"slo.max_wake_s": None}), seed=0).summary
    assert not plain.slo_met and plain.wake_slo_met  # the p99 over all requests judges, as before
    warm = simulate(sc.override({"autoscaler.minReplicas": 1}), seed=0).summary
    assert np.isnan(warm.longest_wake_s) and warm.ttft_p99_warm_s == warm.ttft_p99_s and warm.slo_met
    with pytest.raises(SettingsError, match="slo.max_wake_s"):
        sc.override({"slo.max_wake_s": 0})


def test_tune_judges_a_wake_budget_by_the_warm_p99_and_the_longest_wake() -> None:
    from capsim.studies.runs import slo_miss as _miss

    s = {"ttft_p99_s": 240.0, "ttft_p99_warm_s": 0.2, "longest_wake_s": 360.0, "error_rate": 0.0,
         "lost_sessions": 0, "slo_met": True}
    assert _miss(s, 2.0, 0.001)[0] == "TTFT p99 240 s > SLO 2 s"  # no budget: every request counts
    assert _miss(s, 2.0, 0.001, 420.0) == ("", 0.0)
    why, by = _miss(s, 2.0, 0.001, 300.0)
    assert why == "a wake from zero pods kept a request 360 s > max_wake_s 300 s" and by == pytest.approx(0.2)
    why, _ = _miss({**s, "ttft_p99_warm_s": 3.0}, 2.0, 0.001, 420.0)
    assert why == "TTFT p99 outside wakes 3 s > SLO 2 s"


def test_the_shipped_space_picks_zero_pods_within_the_budget_and_a_warm_pod_under_a_tight_one(tmp_path: Any) -> None:
    from capsim.studies.space import load_space
    from capsim.studies.tune import tune

    space = load_space("data/studies/scale_to_zero_space.yaml")
    base = Scenario.from_yaml("data/scenarios/scale_to_zero.yaml")
    small = {"params": {"autoscaler.minReplicas": {"choices": [0, 1]}}, "stresses": {"quiet-hours": {}}}
    assert {p.path for p in space.params} >= {"autoscaler.minReplicas", "autoscaler.keda.cooldown_period_s"}
    loose = tune(base, small, seeds=1, budget=2, executor="serial", cache=tmp_path, progress=False)
    tight = tune(base.override({"slo.max_wake_s": 300}), small, seeds=1, budget=2, executor="serial",
                 cache=tmp_path, progress=False)
    assert loose.best_params == {"autoscaler.minReplicas": 0} and tight.best_params == {"autoscaler.minReplicas": 1}
    # the front's p99 is the one the SLO judges (outside wakes), the wake beside it
    ran = loose.trials.dropna(subset=["cost"])
    assert (ran["ttft_p99_s"] < 2).all() and ran["longest_wake_s"].max() > 300


def test_idle_mode_serves_through_a_crash_at_the_cost_of_scaling_to_zero_on_whole_nodes() -> None:
    """docs/simulator.md's idle-mode table, seed 0: on 8-GPU nodes billed whole, a second pod costs nothing
    while its node is held, and idle mode releases both in the quiet hours."""
    from capsim.sim import simulate

    base = Scenario.from_yaml("data/scenarios/scale_to_zero.yaml").override(
        {"faults": {"crashes": [{"at_s": 600, "pods": 1}]}})
    zero = simulate(base, seed=0).summary
    idle = simulate(base.override({"autoscaler.minReplicas": 2, "pods.replicas": 2,
                                   "autoscaler.keda.idle_replica_count": 0}), seed=0).summary
    assert idle.cost == pytest.approx(zero.cost) and idle.node_gpu_hours == pytest.approx(zero.node_gpu_hours)
    assert idle.gpu_hours > zero.gpu_hours + 1  # the second pod's hours, on nodes held anyway
    assert zero.ttft_p99_warm_s > 5 and not zero.slo_met  # the lone pod's crash: nothing serves until it restarts
    assert idle.ttft_p99_warm_s < 1 and idle.slo_met
    assert idle.longest_wake_s == pytest.approx(zero.longest_wake_s, abs=30)  # the same wakes from zero


# ---- initialCooldownPeriod: the run starts as the ScaledObject is created --------------------------------------
def test_never_active_the_initial_cooldown_counts_from_the_creation() -> None:
    ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300, initial_cooldown_period_s=600)
    assert ex.request_scale(300.0, 1, active=False) is None  # created at 0: still in its initial cooldown
    assert ex.request_scale(601.0, 1, active=False) == 0
    ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300, initial_cooldown_period_s=600)
    assert ex.request_scale(100.0, 1, active=True) is None  # once active, the cooldown rules
    assert ex.request_scale(601.0, 1, active=False) == 0 and ex.last_active_s == 100.0
    ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300, initial_cooldown_period_s=600)
    assert ex.request_scale(200.0, 1, active=True) is None
    assert ex.request_scale(450.0, 1, active=False) is None  # 250 s after the last activity, though 450 s old
    assert ScaleExecutor(min_replica_count=0).request_scale(1.0, 1, active=False) == 0  # KEDA's default: at once
    with pytest.raises(ValueError, match="initial_cooldown_period_s"):
        ScaleExecutor(initial_cooldown_period_s=-1)


def test_a_deploy_without_traffic_goes_to_zero_after_the_initial_cooldown(tmp_path: Any) -> None:
    import yaml

    from capsim.export import DeployTarget, export_scenario
    from capsim.sim import simulate

    quiet_start = {"workload.arrivals.rate_per_s": [[0, 0], [1500, 2]]}  # the first requests 25 minutes in

    def first_to_zero(**keda_settings: Any) -> float:
        ev = simulate(keda(**keda_settings).override(quiet_start), seed=0).scale_events
        down = ev[(ev["by"] == "keda") & (ev["to_replicas"] == 0)]
        return float(down["time_s"].iloc[0])

    polling = 30
    # a Deployment serving for long (the default): a full cooldown from the run's start
    assert 300 < first_to_zero(cooldown_period_s=300) <= 300 + polling
    # deployed with the run: KEDA's default initial cooldown, 0, takes it to zero at its first idle poll
    assert first_to_zero(cooldown_period_s=300, initial_cooldown_period_s=0) <= polling
    assert 900 < first_to_zero(cooldown_period_s=300, initial_cooldown_period_s=900) <= 900 + polling
    export_scenario(keda(initial_cooldown_period_s=900), tmp_path, DeployTarget(name="agent", namespace="agents"))
    spec = yaml.safe_load((tmp_path / "keda-scaledobject.yaml").read_text())["spec"]
    assert spec["initialCooldownPeriod"] == 900
    assert "| KEDA `initialCooldownPeriod` | 900 s: until a trigger is first active after the deploy" in (
        tmp_path / "README.md").read_text()
    export_scenario(keda(), tmp_path / "plain", DeployTarget(name="agent", namespace="agents"))
    assert "initialCooldownPeriod" not in yaml.safe_load((tmp_path / "plain" / "keda-scaledobject.yaml").read_text())["spec"]


# ---- useCachedMetrics ---------------------------------------------------------------------------------------
def spells_by_poll(sim: Any, polls: Any) -> list[set[float]]:
    """The values of the first metric the HPA read at its syncs, grouped by the KEDA poll (of ``polls``, their
    times) before them, after the first."""
    groups: dict[int, set[float]] = {}
    for t, _, _, value in sim.autoscaling.syncs:
        g = int(np.searchsorted(polls, t, side="right"))
        if g > 0 and not math.isnan(value):
            groups.setdefault(g, set()).add(round(value, 9))
    return list(groups.values())


def test_cached_metrics_give_the_hpa_the_value_of_keda_s_last_poll() -> None:
    from capsim.sim import Simulation

    def run(**keda_settings: Any) -> tuple[Any, Any]:
        sim = Simulation(keda(**keda_settings), seed=0)
        return sim, sim.run()

    (cached_sim, cached), (fresh_sim, fresh) = run(use_cached_metrics=True), run()
    polls = cached.keda_polls["time_s"].to_numpy()
    assert polls.size > 50
    cached_spells, fresh_spells = spells_by_poll(cached_sim, polls), spells_by_poll(fresh_sim, polls)
    assert all(len(v) == 1 for v in cached_spells)  # 30 s polls, 15 s syncs: each poll's value read twice
    assert sum(len(v) > 1 for v in fresh_spells) > 10  # afresh, two syncs after one poll read different rates
    # the second burst (1500 s) is seen by the HPA only from the first poll after it: it scales up no sooner
    first_up = [r.scale_events.query("by == 'hpa' and time_s > 1500 and to_replicas > from_replicas")["time_s"].min()
                for r in (cached, fresh)]
    assert first_up[0] >= first_up[1]


IN_FLIGHT = {"type": "External", "external": {"metric": {"name": "capsim_requests_in_flight"},
                                              "target": {"type": "AverageValue", "averageValue": "8"}}}


def test_cached_metrics_are_set_per_trigger() -> None:
    from capsim.sim import Simulation

    def spells(**keda_settings: Any) -> list[set[float]]:
        """The values of the first trigger (the gateway's rate) the HPA read, grouped by KEDA's poll before them."""
        scenario = bursts(GATEWAY).override({"autoscaler.metrics": [GATEWAY, IN_FLIGHT], "autoscaler.keda": keda_settings})
        sim = Simulation(scenario, seed=0)
        return spells_by_poll(sim, sim.run().keda_polls["time_s"].to_numpy())

    # only the gateway's trigger cached: the HPA reads its rate once a poll; only the other: afresh each sync
    assert all(len(v) == 1 for v in spells(use_cached_metrics=["capsim_gateway_requests_total"]))
    assert sum(len(v) > 1 for v in spells(use_cached_metrics=["capsim_requests_in_flight"])) > 10
    assert spells(use_cached_metrics=["capsim_gateway_requests_total", "capsim_requests_in_flight"]) == spells(
        use_cached_metrics=True)
    with pytest.raises(SettingsError, match=r"autoscaler.keda.use_cached_metrics.0: 'nope' is not a metric"):
        keda(use_cached_metrics=["nope"])
    with pytest.raises(SettingsError, match=r"autoscaler.keda.use_cached_metrics: must be true, false or a list of "
                                            r"metric names, got 'yes'"):
        keda(use_cached_metrics="yes")


def test_cached_metrics_are_exported_on_every_trigger(tmp_path: Any) -> None:
    import jsonschema
    import yaml

    from capsim.export import DeployTarget, export_scenario
    from test_export import KEDA_SCALED_OBJECT

    export_scenario(keda(use_cached_metrics=True), tmp_path, DeployTarget(name="agent", namespace="agents"))
    obj = yaml.safe_load((tmp_path / "keda-scaledobject.yaml").read_text())
    jsonschema.validate(obj, KEDA_SCALED_OBJECT)
    assert [t.get("useCachedMetrics") for t in obj["spec"]["triggers"]] == [True]
    assert "| KEDA `useCachedMetrics` (every trigger) | true: the HPA reads the value of KEDA's last poll" in (
        tmp_path / "README.md").read_text()
    export_scenario(keda(), tmp_path / "plain", DeployTarget(name="agent", namespace="agents"))
    plain = yaml.safe_load((tmp_path / "plain" / "keda-scaledobject.yaml").read_text())
    assert all("useCachedMetrics" not in t for t in plain["spec"]["triggers"])
    # set on some triggers: on those alone
    some = bursts(GATEWAY).override({"autoscaler.metrics": [GATEWAY, IN_FLIGHT],
                                     "autoscaler.keda": {"use_cached_metrics": ["capsim_requests_in_flight"]}})
    export_scenario(some, tmp_path / "some", DeployTarget(name="agent", namespace="agents"))
    obj = yaml.safe_load((tmp_path / "some" / "keda-scaledobject.yaml").read_text())
    jsonschema.validate(obj, KEDA_SCALED_OBJECT)
    assert [t.get("useCachedMetrics") for t in obj["spec"]["triggers"]] == [None, True]
    assert "| KEDA `useCachedMetrics` (`capsim_requests_in_flight`) | true" in (tmp_path / "some" / "README.md").read_text()


# ---- ignoreNullValues ---------------------------------------------------------------------------------------
def test_an_empty_result_reads_0_by_default_and_errs_without_ignore_null_values() -> None:
    """At the start of a run the gateway's rate has fewer than two samples: Prometheus returns nothing, which
    KEDA's scaler reads as 0 with ``ignoreNullValues`` (its default) and as an error without it
    (``ExecutePromQuery``): the poll is in error, and the HPA's read fails."""
    from capsim.sim import Simulation

    def run(**keda_settings: Any) -> Any:
        sim = Simulation(keda(**keda_settings), seed=0)
        return sim, sim.run()

    (zero_sim, zero), (err_sim, err) = run(), run(ignore_null_values=False)
    first_zero, first_err = zero.keda_polls.iloc[0], err.keda_polls.iloc[0]
    assert first_zero["time_s"] == first_err["time_s"] < 30  # before the second scrape of the gateway
    assert not first_zero["error"] and first_err["error"]
    assert not first_zero["active"] and not first_err["active"]
    early = [(z[3], e[3]) for z, e in zip(zero_sim.autoscaling.syncs, err_sim.autoscaling.syncs, strict=False)
             if z[0] < 30]
    assert early and all(z == 0.0 and math.isnan(e) for z, e in early)  # the HPA's read: 0, or a failure
    assert int(err.keda_polls["error"].sum()) >= 1 and int(zero.keda_polls["error"].sum()) == 0


def test_ignore_null_values_is_set_per_trigger_and_checked() -> None:
    from capsim.sim import Simulation

    def errors_at_zero(**keda_settings: Any) -> int:
        """Polls in error while the Deployment is at zero (the quiet 20 minutes)."""
        scenario = bursts(GATEWAY).override({"autoscaler.metrics": [GATEWAY, IN_FLIGHT], "autoscaler.keda": keda_settings})
        polls = Simulation(scenario, seed=0).run().keda_polls
        assert (polls["replicas"] == 0).sum() > 10
        return int((polls["error"] & (polls["replicas"] == 0)).sum())

    # at zero no pod has requests in flight (an empty result), while the gateway's rate is a number
    assert errors_at_zero(ignore_null_values=["capsim_gateway_requests_total"]) > 10
    assert errors_at_zero(ignore_null_values=["capsim_requests_in_flight"]) == 0
    assert errors_at_zero() == 0
    with pytest.raises(SettingsError, match=r"autoscaler.keda.ignore_null_values.1: 'nope' is not a metric"):
        keda(ignore_null_values=["capsim_gateway_requests_total", "nope"])
    with pytest.raises(SettingsError, match=r"autoscaler.keda.ignore_null_values: must be true, false or a list of "
                                            r"metric names, got 'no'"):
        keda(ignore_null_values="no")


def test_without_ignore_null_values_a_2_16_fallback_wakes_every_idle_spell() -> None:
    """On 2.16 the operator sets a fallback's pods at a poll in error, also from zero: with ``ignoreNullValues``
    false every empty answer of an idle spell is one, so the idle Deployment flaps between zero and the
    fallback's pod, and the plan pays what a warm pod does (the outage space's tune finds it, docs/simulator.md)."""
    from capsim.sim.simulate import simulate

    plan = Scenario.from_yaml("data/scenarios/scale_to_zero.yaml").override(
        {"autoscaler.keda.release": "2.16", "autoscaler.minReplicas": 0, "autoscaler.keda.cooldown_period_s": 60,
         "autoscaler.keda.fallback": {"replicas": 1}})
    default, strict = (simulate(plan.override({"autoscaler.keda.ignore_null_values": v}), seed=0) for v in (True, False))
    warm = simulate(plan.override({"autoscaler.minReplicas": 1}), seed=0)

    def wakes(r: Any) -> int:
        ev = r.scale_events
        return int(((ev.by == "keda") & (ev.from_replicas == 0) & (ev.to_replicas > 0)).sum())

    assert wakes(strict) > 3 * wakes(default) and wakes(strict) > 20
    assert default.summary.cost < 0.8 * warm.summary.cost
    assert strict.summary.cost == pytest.approx(warm.summary.cost, rel=0.01)


def test_ignore_null_values_is_exported_where_it_is_off(tmp_path: Any) -> None:
    import jsonschema
    import yaml

    from capsim.export import DeployTarget, export_scenario
    from test_export import KEDA_SCALED_OBJECT

    target = DeployTarget(name="agent", namespace="agents")
    export_scenario(keda(), tmp_path / "plain", target)
    plain = yaml.safe_load((tmp_path / "plain" / "keda-scaledobject.yaml").read_text())
    assert all("ignoreNullValues" not in t["metadata"] for t in plain["spec"]["triggers"])  # KEDA's default
    assert "ignoreNullValues" not in (tmp_path / "plain" / "README.md").read_text()
    some = bursts(GATEWAY).override({"autoscaler.metrics": [GATEWAY, IN_FLIGHT],
                                     "autoscaler.keda": {"ignore_null_values": ["capsim_requests_in_flight"]}})
    export_scenario(some, tmp_path / "some", target)
    obj = yaml.safe_load((tmp_path / "some" / "keda-scaledobject.yaml").read_text())
    jsonschema.validate(obj, KEDA_SCALED_OBJECT)
    assert [t["metadata"].get("ignoreNullValues") for t in obj["spec"]["triggers"]] == ["false", None]
    assert "| KEDA `ignoreNullValues` (`capsim_gateway_requests_total`) | false: an empty result" in (
        tmp_path / "some" / "README.md").read_text()


# ---- the executor's promises over any run of polls (Hypothesis) --------------------------------------------
_POLL = st.tuples(st.floats(1.0, 400.0), st.integers(0, 6), st.booleans(), st.booleans())


@settings(max_examples=300, deadline=None)
@given(release=st.sampled_from(["2.18", "2.17", "2.16"]), low=st.integers(0, 3), idle=st.sampled_from([None, 0]),
       fallback=st.sampled_from([None, 0, 2]), cooldown=st.sampled_from([0.0, 60.0, 300.0]),
       polls=st.lists(_POLL, min_size=1, max_size=40))
def test_keda_never_takes_an_active_deployment_to_zero_and_waits_a_cooldown(
        release: Any, low: int, idle: int | None, fallback: int | None, cooldown: float,
        polls: list[tuple[float, int, bool, bool]]) -> None:
    ex = ScaleExecutor(min_replica_count=low, cooldown_period_s=cooldown, fallback_replicas=fallback,
                       release=release, idle_replica_count=idle)
    now = 0.0
    for gap, current, active, error in polls:
        now += gap
        last = ex.last_active_s
        new = ex.request_scale(now, current, active, error)
        allowed = {None, 0, max(low, 1), low} | ({fallback} if fallback else set())
        assert new in allowed
        if active:
            assert new != 0  # an active trigger never takes the Deployment to zero
            if not error or release == "2.16":
                assert ex.last_active_s == now
        else:
            assert ex.last_active_s == last  # only an active poll is activity
        if new == 0 and current > 0:
            # to zero only where the Deployment may go there, and only a full cooldown after the last activity
            assert low == 0 or idle is not None
            assert last is None or last + cooldown < now
        if new is not None and new > current and not active:
            # up without a trigger: the minimum restored (no idle mode), or 2.16's fallback in error
            assert (new == low and idle is None) or (release == "2.16" and error and new == fallback)
        if error and not active and release != "2.16" and fallback != 0:
            assert new is None  # 2.17 on: a poll in error changes nothing (but a fallback of 0 replicas)

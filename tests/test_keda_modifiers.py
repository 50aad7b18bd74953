"""KEDA's scalingModifiers (``autoscaler.keda.scaling_modifiers``): one composite metric for the HPA and for KEDA's
activation, its failures and fallback as KEDA 2.17 and 2.18 handle them, its admission checks and its export. The
formula language itself is in ``test_keda_formula.py``."""

from __future__ import annotations

import math
from typing import Any

import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.policy.keda import metric_value
from capsim.sim import simulate
from test_autoscaler_validation import GATEWAY, QUEUE_SUM, bursts

BOTH = "max(capsim_gateway_requests_total / 1, capsim_queue_depth / 1)"


def plan(formula: str | None = BOTH, target: float = 1, **keda: Any) -> Scenario:
    """1.5, 3.5, 0.8 and 2.5 agents a second on 1 to 4 pods, KEDA on the gateway's rate and the pods' queues (targets 1 each)."""
    sm = None if formula is None else {"formula": formula, "target": target}
    return bursts(GATEWAY).override({
        "workload.arrivals.rate_per_s": [[0, 1.5], [400, 3.5], [900, 0.8], [1300, 2.5]], "horizon_s": 1800,
        "autoscaler.metrics": [GATEWAY, QUEUE_SUM],
        "autoscaler.keda": {"cooldown_period_s": 300, "scaling_modifiers": sm, **keda}})


def test_the_hpa_reads_the_composite_in_whole_thousandths_and_scales_on_it_alone() -> None:
    r = simulate(plan("capsim_gateway_requests_total / 3 + capsim_queue_depth"), seed=0)
    syncs = r.hpa_syncs
    assert list(syncs.columns[3:]) == [
        "capsim_gateway_requests_total", "capsim_queue_depth", "composite-metric",
        "capsim_gateway_requests_total proposal", "capsim_queue_depth proposal", "composite-metric proposal"]
    live = syncs.dropna()
    assert len(live) > 100
    want = [metric_value(g / 3 + q) for g, q in zip(live["capsim_gateway_requests_total"], live["capsim_queue_depth"],
                                                     strict=True)]
    assert list(live["composite-metric"]) == want
    assert (live["composite-metric"] * 1000).round(6).mod(1).eq(0).all()  # KEDA's SetMilli(int64(x * 1000))
    assert (live["capsim_gateway_requests_total proposal"] == -1).all()  # the triggers propose nothing
    # AverageValue: ceil(composite / target) pods, within [1, 4]
    props = live["composite-metric proposal"]
    assert (props == [min(max(math.ceil(c - 1e-9), 1), 4) if abs(c / cur - 1) > 0.1 else cur
                      for c, cur in zip(live["composite-metric"], live["current"], strict=True)]).mean() > 0.95


def test_a_composite_of_each_trigger_over_its_target_scales_as_the_two_triggers_do() -> None:
    """The HPA takes the highest of its metrics' proposals, ceil(value / target) each; the composite
    max(value / target) with a target of 1 proposes the same, so the pods follow the same path."""
    for seed in (0, 1):
        apart = simulate(plan(None), seed=seed)
        composite = simulate(plan(), seed=seed)
        assert len(apart.scale_events) >= 2
        assert apart.scale_events.equals(composite.scale_events)
        assert apart.summary.ttft_p99_s == composite.summary.ttft_p99_s


def test_keda_is_active_on_the_composite_above_its_activation_target_not_on_the_triggers() -> None:
    """bursts: 2 agents a second until 300 s, none until 1500 s, then again. The gateway's trigger alone is active
    in the bursts; a composite that stays below its activation target is never, so the Deployment goes to zero a
    cooldown after the start and does not wake for the second burst."""
    def run(activation: float) -> Any:
        return simulate(bursts(GATEWAY).override({"autoscaler.keda": {"cooldown_period_s": 300, "scaling_modifiers": {
            "formula": "capsim_gateway_requests_total", "target": 1, "activation_target": activation}}}), seed=0)

    woke = run(0.0)
    assert woke.keda_polls["active"].any()
    assert (woke.scale_events.query("by == 'keda' and from_replicas == 0")["time_s"] > 1500).any()
    asleep = run(1000.0)
    assert not asleep.keda_polls["active"].any()
    gone = asleep.scale_events.query("by == 'keda'")
    assert list(gone["to_replicas"]) == [0] and gone["time_s"].iloc[0] <= 300 + 30
    late = asleep.requests[asleep.requests["arrival_s"] > 1500]
    assert len(late) > 100 and (late["outcome"] != "ok").all()


def test_a_failed_trigger_fails_the_composite_and_the_poll_is_not_active() -> None:
    """The gateway's source down from 600 to 1200 s (faults.trigger_outages), no fallback: each HPA read of the
    composite fails (KEDA answers an error), so the HPA holds; each poll is in error and not active, though the
    queue trigger answers."""
    r = simulate(plan(**{"release": "2.18"}).override({"faults.trigger_outages": [
        {"at_s": 600, "duration_s": 600, "metrics": ["capsim_gateway_requests_total"]}]}), seed=0)
    syncs = r.hpa_syncs.set_index("time_s")
    during = syncs.loc[600:1199]
    assert len(during) >= 39
    assert during["composite-metric"].isna().all() and during["capsim_queue_depth"].notna().all()
    assert (during["composite-metric proposal"] == -1).all()
    assert (during["desired"] == during["current"]).all()  # no usable metric: the count stays
    polls = r.keda_polls.set_index("time_s").loc[600:1199]
    assert polls["error"].all() and not polls["active"].any()
    after = syncs.loc[1230:]
    assert after["composite-metric"].notna().all()


@pytest.mark.parametrize("metrics", [[GATEWAY], [GATEWAY, QUEUE_SUM]])
def test_past_the_failure_threshold_2_18_answers_each_failed_trigger_s_fallback_and_the_hpa_sums_them(
        metrics: list[dict[str, Any]]) -> None:
    """Prometheus down from 600 to 1500 s, fallback 2 replicas after 3 failures: KEDA 2.17 and 2.18 skip the
    formula while a fallback is active and answer each failed trigger's fallback value (target x 2), whether the
    formula names the trigger or not; the HPA sums what it gets, so two triggers take it to 4 pods, not 2
    (kedacore/keda#5371)."""
    triggers = len(metrics)
    s = plan("capsim_gateway_requests_total", fallback={"failure_threshold": 3, "replicas": 2}).override(
        {"autoscaler.metrics": metrics, "faults.metrics_outages": [{"at_s": 600, "duration_s": 900}],
         "horizon_s": 1500})
    syncs = simulate(s, seed=0).hpa_syncs.set_index("time_s")
    late = syncs.loc[600 + 4 * 15:1499]  # the 4th failed read on
    assert len(late) > 40
    assert (late["composite-metric"] == 2.0 * triggers).all()
    assert (late["composite-metric proposal"] == 2 * triggers).all()
    early = syncs.loc[600:600 + 3 * 15 - 1]
    assert early["composite-metric"].isna().all()  # within the threshold: an error


def test_keda_2_20_answers_one_fallback_value_however_many_triggers_failed() -> None:
    """kedacore/keda#7790 (KEDA 2.20): while a fallback is on, the composite is the first fallback value alone."""
    s = plan("capsim_gateway_requests_total", release="2.20", fallback={"failure_threshold": 3, "replicas": 2}).override(
        {"faults.metrics_outages": [{"at_s": 600, "duration_s": 900}], "horizon_s": 1500})
    syncs = simulate(s, seed=0).hpa_syncs.set_index("time_s")
    late = syncs.loc[600 + 4 * 15:1499]
    assert len(late) > 40 and (late["composite-metric"] == 2.0).all() and (late["composite-metric proposal"] == 2).all()
    from capsim.studies.checks import run_checks

    assert not [f for f in run_checks(s) if f.check == "keda-fallback-sum"]
    assert [f for f in run_checks(s.override({"autoscaler.keda.release": "2.18"})) if f.check == "keda-fallback-sum"]


def test_an_unquoted_release_reads_as_written() -> None:
    import yaml

    for text, want in (("2.20", "2.20"), ("2.18", "2.18"), ("2.17", "2.17"), ("2.16", "2.16")):
        s = plan().override({"autoscaler.keda.release": yaml.safe_load(text)})
        assert s.autoscaler is not None and s.autoscaler.keda is not None and s.autoscaler.keda.release == want
    with pytest.raises(SettingsError, match=r"autoscaler.keda.release"):
        plan().override({"autoscaler.keda.release": 2.19})


def test_a_formula_whose_run_fails_fails_the_read() -> None:
    """``int(gateway) % int(queue)`` runs at KEDA's admission (1 % 1) but divides by zero whenever the pods' queues
    are empty: those reads fail, and the HPA holds."""
    r = simulate(plan("int(capsim_gateway_requests_total) % int(capsim_queue_depth) + 1"), seed=0)
    syncs = r.hpa_syncs.dropna(subset=["capsim_queue_depth"])
    empty = syncs[syncs["capsim_queue_depth"] < 1]
    assert len(empty) > 10 and empty["composite-metric"].isna().all()
    busy = syncs[syncs["capsim_queue_depth"] >= 1]
    assert busy["composite-metric"].notna().all()


def test_cron_triggers_join_the_formula_by_their_index() -> None:
    cron = {"timezone": "UTC", "start": "5 17 * * *", "end": "20 17 * * *", "desired_replicas": 3}
    s = plan("max(capsim_gateway_requests_total, cron_0)", cron=[cron], clock_start="2026-12-04T17:00:00Z")
    assert s.autoscaler is not None and s.autoscaler.trigger_names == [
        "capsim_gateway_requests_total", "capsim_queue_depth", "cron_0"]
    syncs = simulate(s, seed=0).hpa_syncs.set_index("time_s")
    window = syncs.loc[300 + 15:1200 - 1, "composite-metric"]
    assert (window >= 3).all()  # the cron trigger's 3 in 17:05 to 17:20


# ---- the scenario's checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    ({"autoscaler.keda.scaling_modifiers.formula": "nope + 1"},
     r"autoscaler.*keda.scaling_modifiers.formula: unknown name 'nope': a formula names the triggers "
     r"\(capsim_gateway_requests_total, capsim_queue_depth\) \(column 1\)"),
    ({"autoscaler.keda.scaling_modifiers.formula": "capsim_queue_depth > 1"},
     r"keda.scaling_modifiers.formula: the formula's value is bool"),
    ({"autoscaler.keda.scaling_modifiers.target": 0}, r"autoscaler.keda.scaling_modifiers.target"),
    ({"autoscaler.keda.scaling_modifiers.metric_type": "Utilization"}, r"autoscaler.keda.scaling_modifiers.metric_type"),
    ({"autoscaler.keda.activation": {"capsim_queue_depth": 2}},
     r"keda.activation: with scaling_modifiers KEDA decides activity on the composite"),
    ({"autoscaler.keda.fallback": {"replicas": 2}, "autoscaler.keda.release": "2.16"},
     r"keda.fallback with scaling_modifiers is simulated from release 2.17"),
    ({"autoscaler.keda.fallback": {"replicas": 2}, "autoscaler.keda.scaling_modifiers.target": 1.5},
     r"needs a whole-number scaling_modifiers.target .*got 1.5"),
    ({"autoscaler.keda.fallback": {"replicas": 2}, "autoscaler.keda.release": "2.17",
      "autoscaler.keda.scaling_modifiers.metric_type": "Value"},
     r"keda.fallback needs scaling_modifiers.metric_type AverageValue before release 2.18"),
])
def test_bad_modifiers_are_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        plan().override(change)


def test_a_fallback_with_value_triggers_is_taken_with_an_average_value_composite_before_2_18() -> None:
    value_queue = {"type": "External", "external": {"metric": {"name": "capsim_queue_depth"},
                                                    "target": {"type": "Value", "value": "1"}}}
    s = plan(release="2.17", fallback={"replicas": 2}).override({"autoscaler.metrics": [GATEWAY, value_queue]})
    assert s.autoscaler is not None and s.autoscaler.keda is not None  # the composite's type is what counts


def test_two_triggers_on_one_metric_are_refused_since_a_formula_could_not_tell_them_apart() -> None:
    with pytest.raises(SettingsError, match=r"metrics 'capsim_queue_depth' and 'capsim_queue_depth' both make the "
                                            r"trigger name 'capsim_queue_depth'"):
        plan().override({"autoscaler.metrics": [GATEWAY, QUEUE_SUM, QUEUE_SUM]})


# ---- capsim check --------------------------------------------------------------------------------------------------
def test_check_warns_of_a_formula_that_fails_with_no_traffic_and_of_a_fallback_the_hpa_sums() -> None:
    from capsim.studies.checks import run_checks

    def found(s: Scenario) -> dict[str, str]:
        return {f.check: f.message for f in run_checks(s) if f.check in ("keda-formula-idle", "keda-fallback-sum")}

    assert found(plan()) == {}
    idle = found(plan("capsim_gateway_requests_total / capsim_queue_depth"))
    assert idle["keda-formula-idle"].startswith("'capsim_gateway_requests_total / capsim_queue_depth' with every "
                                                "trigger at 0 (no traffic) is nan")
    # the simulation agrees: with no traffic the composite is never read
    quiet = simulate(plan("capsim_gateway_requests_total / capsim_queue_depth").override(
        {"workload.arrivals.rate_per_s": [[0, 1.5], [300, 0]]}), seed=0).hpa_syncs.set_index("time_s")
    assert quiet.loc[700:, "composite-metric"].isna().all()
    assert "keda-formula-idle" in found(plan("int(capsim_gateway_requests_total) % int(capsim_queue_depth) + 1"))
    assert found(plan("capsim_queue_depth > 0 ? capsim_gateway_requests_total / capsim_queue_depth : 0")) == {}
    summed = found(plan(fallback={"replicas": 2}))
    assert summed == {"keda-fallback-sum": summed["keda-fallback-sum"]}
    assert "2 Prometheus triggers" in summed["keda-fallback-sum"] and "proposes 4 pods, not 2" in summed[
        "keda-fallback-sum"]
    one = plan("capsim_gateway_requests_total", fallback={"replicas": 2}).override({"autoscaler.metrics": [GATEWAY]})
    assert found(one) == {}


# ---- the export ----------------------------------------------------------------------------------------------------
def test_the_scaled_object_carries_the_formula_over_triggers_named_as_it_names_them(tmp_path: Any) -> None:
    import jsonschema
    import yaml

    from capsim.export import DeployTarget, export_scenario
    from capsim.policy.keda_formula import compile_formula
    from test_export import KEDA_SCALED_OBJECT

    waiting = {"type": "External", "external": {"metric": {"name": "vllm:num_requests_waiting"},
                                                "target": {"type": "AverageValue", "averageValue": "4"}}}
    cron = {"timezone": "UTC", "start": "0 17 * * 5", "end": "0 19 * * 5", "desired_replicas": 3}
    formula = "max(capsim_gateway_requests_total / 2, vllm_num_requests_waiting / 4, cron_0)"
    s = plan(None, cron=[cron], clock_start="2026-12-04T16:00:00Z", fallback={"replicas": 2}).override(
        {"autoscaler.metrics": [GATEWAY, waiting], "autoscaler.keda.scaling_modifiers": {
            "formula": formula, "target": 1, "activation_target": 0.5}})
    export_scenario(s, tmp_path, DeployTarget(name="agent", namespace="agents"))
    obj = yaml.safe_load((tmp_path / "keda-scaledobject.yaml").read_text())
    jsonschema.validate(obj, KEDA_SCALED_OBJECT)
    spec = obj["spec"]
    assert spec["advanced"]["scalingModifiers"] == {"formula": formula, "target": "1", "activationTarget": "0.5",
                                                    "metricType": "AverageValue"}
    assert "horizontalPodAutoscalerConfig" in spec["advanced"]  # the HPA's behavior beside it
    names = [t["name"] for t in spec["triggers"]]
    assert names == ["capsim_gateway_requests_total", "vllm_num_requests_waiting", "cron_0"]
    compile_formula(spec["advanced"]["scalingModifiers"]["formula"], names)  # KEDA's admission would take it
    readme = (tmp_path / "README.md").read_text()
    assert f"| KEDA `scalingModifiers` | `{formula}`, AverageValue 1, activation above 0.5" in readme


def test_without_modifiers_the_trigger_names_stay_as_they_were(tmp_path: Any) -> None:
    import yaml

    from capsim.export import DeployTarget, export_scenario

    export_scenario(plan(None), tmp_path, DeployTarget(name="agent", namespace="agents"))
    obj = yaml.safe_load((tmp_path / "keda-scaledobject.yaml").read_text())
    assert [t["name"] for t in obj["spec"]["triggers"]] == ["capsim-gateway-requests-total", "capsim-queue-depth"]
    assert "scalingModifiers" not in obj["spec"].get("advanced", {})


def test_the_shipped_composite_grid_runs_its_max_composite_as_its_two_triggers() -> None:
    """data/studies/keda_composite_grid.yaml (docs/studies.md, "A composite metric") on the H100 rush: the composite
    of the highest over the targets and the two triggers apart give the same run, seed 0."""
    from capsim.studies.sweep import expand_grid, load_grid

    base = Scenario.from_yaml("data/scenarios/h100_llama3_8b_rush.yaml")
    plans = {s.values["plan"]: base.override(s.changes)
             for s in expand_grid(load_grid("data/studies/keda_composite_grid.yaml"))}
    assert len(plans) == 6
    modifiers = [p.autoscaler.keda.scaling_modifiers for p in plans.values()  # type: ignore[union-attr]
                 if p.autoscaler.keda.scaling_modifiers is not None]  # type: ignore[union-attr]
    assert len(modifiers) == 3
    apart = simulate(plans["waiting and KV usage, two triggers"], seed=0)
    composite = simulate(plans["composite max(w/4, kv/0.8)"], seed=0)
    assert apart.scale_events.equals(composite.scale_events) and len(apart.scale_events) > 5
    assert apart.summary.ttft_p99_s == composite.summary.ttft_p99_s


# ---- capsim simulate's notes -----------------------------------------------------------------------------------------
def test_simulate_notes_the_reads_a_formula_lost_and_a_trigger_outage_under_a_composite(tmp_path: Any) -> None:
    from test_inputs_cli import run
    from test_keda import yaml_of

    idle = plan("capsim_gateway_requests_total / capsim_queue_depth").override(
        {"workload.arrivals.rate_per_s": [[0, 1.5], [300, 0]], "faults.trigger_outages": [
            {"at_s": 100, "duration_s": 60, "metrics": ["capsim_queue_depth"]}]})
    path = tmp_path / "idle.yaml"
    path.write_text(yaml_of(idle))
    code, out, err = run(["simulate", str(path)])
    assert code == 0, err
    (lost,) = [line for line in out.splitlines() if "scaling_modifiers formula gave no number" in line]
    assert lost.startswith("note: in ") and "HPA syncs every trigger answered" in lost
    (outage,) = [line for line in out.splitlines() if "failed from 100 to 160 s" in line]
    assert "KEDA's polls were in error and not active (scaling_modifiers: activity is the composite's), and its " \
           "HPA read no composite metric;" in outage

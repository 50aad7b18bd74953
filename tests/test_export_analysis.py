"""The canary checks as Argo Rollouts AnalysisTemplates (``analysis-template.yaml``): the fields of Argo's CRD, one
metric per limit with the simulated interval, delay, count and failure limit, queries on the canary's and the old
ReplicaSet's pods, and as many measurements as the simulation made."""

from __future__ import annotations

import math
from pathlib import Path

import jsonschema
import yaml

from capsim.export import DeployTarget, export_scenario
from capsim.model.scenario import Scenario
from capsim.sim import simulate

ROOT = Path(__file__).resolve().parents[1]
TARGET = DeployTarget(name="agent", namespace="agents")
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_DURATION = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"}  # Go's time.ParseDuration, as used
# The AnalysisTemplate fields capsim writes, as Argo Rollouts defines them (argoproj/argo-rollouts
# pkg/apis/rollouts/v1alpha1/analysis_types.go, Apache-2.0): spec.metrics required, each metric's name and provider
# required, interval and initialDelay duration strings, count and failureLimit integers (count > 1 needs an interval),
# args with a required name; the Prometheus provider's address and query. Strict about the fields capsim writes.
ANALYSIS_TEMPLATE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "argoproj.io/v1alpha1"}, "kind": {"const": "AnalysisTemplate"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "required": ["metrics"], "additionalProperties": False, "properties": {
            "args": {"type": "array", "items": {"type": "object", "required": ["name"], "additionalProperties": False,
                                                "properties": {"name": {"type": "string"}}}},
            "metrics": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "provider"], "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"}, "interval": _DURATION, "initialDelay": _DURATION,
                    "count": _INT32, "failureLimit": _INT32, "successCondition": {"type": "string"},
                    "provider": {"type": "object", "required": ["prometheus"], "additionalProperties": False,
                                 "properties": {"prometheus": {
                                     "type": "object", "required": ["address", "query"],
                                     "additionalProperties": False,
                                     "properties": {"address": {"type": "string"}, "query": {"type": "string"}}}}},
                },
                "if": {"properties": {"count": {"minimum": 2}}, "required": ["count"]},
                "then": {"required": ["interval"]}}},
        }},
    },
}


def _canary(**gate: object) -> Scenario:
    resume = {"at_s": 2500, "resume": True, "check_window_s": 120, "check_interval_s": 60,
              "check_initial_delay_s": 250, "check_failure_limit": 1, **gate}
    return Scenario.from_yaml(ROOT / "data" / "scenarios" / "canary_rush.yaml").override(
        {"pods.rollouts": [{"at_s": 1900, "slowdown": 1.0}, {"at_s": 1900, "pause": True}, resume]})


def _templates(out: Path) -> tuple[str, list[dict]]:
    text = (out / "analysis-template.yaml").read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    for d in docs:
        jsonschema.validate(d, ANALYSIS_TEMPLATE)
    return text, docs


def _condition(condition: str, result: list[float]) -> bool:
    """A successCondition as capsim writes them (``len(result) > 0 && !isNaN(result[0]) && result[0] <= X``),
    evaluated as expr-lang does, ``&&`` short-circuiting: an empty result (Argo's Prometheus provider hands the
    evaluator an empty vector for a query with no series) is false, a failed measurement, before ``result[0]``."""
    first, nan, limit = condition.split(" && ")
    assert first == "len(result) > 0" and nan == "!isNaN(result[0])" and limit.startswith("result[0] <= ")
    return len(result) > 0 and not math.isnan(result[0]) and result[0] <= float(limit.split("<= ")[1])


def test_each_limit_becomes_a_metric_with_the_simulated_schedule(tmp_path: Path) -> None:
    canary = _canary(undo_if_ttft_p99_over_s=2.0, undo_if_ttft_p99_over_baseline=1.2,
                     undo_if_itl_mean_over_baseline=1.2, undo_if_error_rate_over=0.01,
                     undo_if_error_rate_over_baseline_by=0.01, error_rate_source="pod")
    result = export_scenario(canary, tmp_path, TARGET, force=True)
    assert tmp_path / "analysis-template.yaml" in result.files
    text, (template,) = _templates(tmp_path)
    assert template["metadata"] == {"name": "agent-canary", "namespace": "agents"}
    assert template["spec"]["args"] == [{"name": "canary-hash"}, {"name": "stable-hash"}]
    metrics = {m["name"]: m for m in template["spec"]["metrics"]}
    assert list(metrics) == ["ttft-p99", "ttft-p99-vs-stable", "itl-mean-vs-stable", "error-rate",
                             "error-rate-vs-stable"]
    for m in metrics.values():  # the pause's six measurements (2,150 to 2,450 s) and the resume's
        assert (m["interval"], m["initialDelay"], m["count"], m["failureLimit"]) == ("60s", "250s", 7, 1)
        assert m["provider"]["prometheus"]["address"] == TARGET.prometheus_url
        assert "[120s]" in m["provider"]["prometheus"]["query"]
        assert 'namespace="agents",pod_template_hash="{{args.canary-hash}}"' in m["provider"]["prometheus"]["query"]
    assert metrics["ttft-p99"]["successCondition"] == "len(result) > 0 && !isNaN(result[0]) && result[0] <= 2"
    assert metrics["ttft-p99"]["provider"]["prometheus"]["query"] == (
        'histogram_quantile(0.99, sum by (le) (increase(vllm:time_to_first_token_seconds_bucket{namespace="agents",'
        'pod_template_hash="{{args.canary-hash}}"}[120s])))')
    assert "{{args.stable-hash}}" in metrics["ttft-p99-vs-stable"]["provider"]["prometheus"]["query"]
    errors = metrics["error-rate"]["provider"]["prometheus"]["query"]
    assert errors == ('(sum(increase(http_requests_total{namespace="agents",pod_template_hash="{{args.canary-hash}}",'
                      'status=~"4xx|5xx"}[120s])) or vector(0)) / sum(increase(http_requests_total{namespace="agents",'
                      'pod_template_hash="{{args.canary-hash}}"}[120s]))')
    assert metrics["error-rate-vs-stable"]["provider"]["prometheus"]["query"].count(" - ") == 1
    # the conditions fail what the simulation fails: over the limit, and nothing answered (NaN, or no series at all)
    condition = metrics["error-rate"]["successCondition"]
    assert _condition(condition, [0.004]) and not _condition(condition, [0.02])
    assert not _condition(condition, [math.nan]) and not _condition(condition, [])
    header = text.split("apiVersion")[0]  # which says so, and names the one difference that stays
    assert "an empty\n# result (the conditions' len(result) > 0)" in header and "Error" not in header
    assert "measured at 2150, 2210, 2270, 2330, 2390, 2450, 2500 s of the run" in text.splitlines()[1]
    assert "analysis-template.yaml" in (tmp_path / "README.md").read_text()


def test_the_count_is_the_simulated_measurements(tmp_path: Path) -> None:
    """A good canary is measured to the end: the simulation's measurements are the template's count."""
    canary = _canary(undo_if_itl_mean_over_baseline=1.2)
    row = simulate(canary, 0).rollouts.iloc[0]
    export_scenario(canary, tmp_path, TARGET, force=True)
    _, (template,) = _templates(tmp_path)
    (metric,) = template["spec"]["metrics"]
    assert not row.canary_failed and metric["count"] == row.canary_measurements == 7
    assert metric["name"] == "itl-mean-vs-stable" and metric["failureLimit"] == 1


def test_a_check_at_the_resume_is_one_measurement_and_a_gateways_errors_read_istio(tmp_path: Path) -> None:
    canary = _canary(undo_if_error_rate_over=0.02, check_interval_s=None, check_initial_delay_s=0,
                     check_failure_limit=0)
    export_scenario(canary, tmp_path, TARGET, force=True)
    text, (template,) = _templates(tmp_path)
    (metric,) = template["spec"]["metrics"]
    assert "interval" not in metric and "initialDelay" not in metric
    assert "measured once, at the resume (pods.rollouts.2, 2500 s of the run), each over the last 120 s" in text
    assert (metric["count"], metric["failureLimit"]) == (1, 0)
    assert template["spec"]["args"] == [{"name": "canary-version"}]
    assert metric["provider"]["prometheus"]["query"].startswith(
        '(sum(increase(istio_requests_total{reporter="source",destination_version="{{args.canary-version}}",'
        'response_code=~"4..|5.."}[120s])) or vector(0)) / ')


def test_no_metric_check_no_template(tmp_path: Path) -> None:
    plain = _canary(undo_if_restarted=True, check_window_s=300, check_interval_s=None, check_initial_delay_s=0,
                    check_failure_limit=0)
    result = export_scenario(plain, tmp_path, TARGET, force=True)
    assert not (tmp_path / "analysis-template.yaml").exists()  # the restart check alone is the README's kubectl loop
    assert all(p.name != "analysis-template.yaml" for p in result.files)
    assert "analysis-template.yaml" not in (tmp_path / "README.md").read_text()


def test_two_checked_resumes_make_two_templates(tmp_path: Path) -> None:
    rush = Scenario.from_yaml(ROOT / "data" / "scenarios" / "canary_rush.yaml")
    two = rush.override({"pods.rollouts": [
        {"at_s": 1900}, {"at_s": 1900, "pause": True},
        {"at_s": 2500, "resume": True, "undo_if_ttft_p99_over_baseline": 1.2},
        {"at_s": 3000}, {"at_s": 3000, "pause": True},
        {"at_s": 3400, "resume": True, "undo_if_error_rate_over": 0.01, "error_rate_source": "pod"}]})
    export_scenario(two, tmp_path, TARGET, force=True)
    _, templates = _templates(tmp_path)
    assert [t["metadata"]["name"] for t in templates] == ["agent-canary-2", "agent-canary-5"]
    assert [[m["name"] for m in t["spec"]["metrics"]] for t in templates] == [["ttft-p99-vs-stable"], ["error-rate"]]


def test_the_shipped_canary_writes_its_p99_check_and_names_the_restart_check_it_cannot_carry(tmp_path: Path) -> None:
    """canary_rush.yaml: a p99 against the old pods' at the resume and a restart poll through the pause."""
    export_scenario(Scenario.from_yaml(ROOT / "data" / "scenarios" / "canary_rush.yaml"), tmp_path, TARGET, force=True)
    text, (template,) = _templates(tmp_path)
    assert [m["name"] for m in template["spec"]["metrics"]] == ["ttft-p99-vs-stable"]
    assert "pods.rollouts.2 also undoes at a restart of the canary's pods (undo_if_restarted)" in text

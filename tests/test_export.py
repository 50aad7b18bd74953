"""Export: every built-in kind validates against the Kubernetes schemas, the KEDA object against the fields of
KEDA's CRD, the HPA round-trips to the scenario's autoscaler, the pod reads the ConfigMap, checks gate writing."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from capsim.cli import app
from capsim.export import (
    BUILDERS,
    ChecksFailedError,
    DeployTarget,
    autoscaler_from_hpa,
    build_all,
    dump_yaml,
    export_scenario,
    pod_env,
)
from capsim.export.promql import PodQuery
from capsim.export.routing import routing_file
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.policy.autoscaling import HorizontalPodAutoscaler

ROOT = Path(__file__).resolve().parents[1]
RUSH = ROOT / "data" / "scenarios" / "friday_rush.yaml"
GOLDEN = Path(__file__).resolve().parent / "golden" / "export" / "friday_rush"
#: The Kubernetes versions the exported objects are validated against (kubernetes-validate's strict schemas):
#: an old still-supported minor and a recent one.
K8S_VERSIONS = ("1.30.0", "1.34.0")
TARGET = DeployTarget(name="agent", namespace="agents")


@pytest.fixture(scope="module")
def rush() -> Scenario:
    return Scenario.from_yaml(RUSH)


def _metric(name: str, value: str) -> dict[str, Any]:
    return {"type": "Pods", "pods": {"metric": {"name": name}, "target": {"type": "AverageValue", "averageValue": value}}}


@pytest.fixture(scope="module")
def variants(rush: Scenario) -> dict[str, Scenario]:
    """The rush as shipped, with two metrics and no behavior (legacy), with a lognormal cold start and a
    pod-local store, and with a fractional target and window."""
    two = rush.override({"autoscaler.metrics": [_metric("capsim_queue_depth", "8"),
                                                _metric("capsim_time_to_first_token_seconds", "500m")]})
    legacy = rush.override({"autoscaler.behavior": None, "autoscaler.metrics": [_metric("gpu_busy_ratio", "0.7")],
                            "pods.startup_s": {"kind": "lognormal", "mean_s": 60, "sigma": 0.3},
                            "state.store": "pod_local"})
    odd = rush.override({"autoscaler.metrics": [_metric("requests_in_flight", "12.5")],
                         "autoscaler.query_window_s": 45.5, "autoscaler.minReplicas": 1})
    return {"rush": rush, "two-metrics": two, "legacy": legacy, "odd": odd}


# ---- schemas -----------------------------------------------------------------------------------------------
def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge for the fields the patch sets: maps merge (a null deletes), lists of named items merge by ``name``
    (``containers``, ``ports``), other lists are replaced (as ``envFrom``, which has no merge key)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:  # null deletes the key
                out.pop(k, None)
                continue
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        merged = {i["name"]: i for i in base}
        for item in patch:
            merged[item["name"]] = _merge(merged[item["name"]], item) if item["name"] in merged else item
        return list(merged.values())
    return copy.deepcopy(patch)


def _user_deployment(target: DeployTarget) -> dict[str, Any]:
    """A Deployment as a user writes it before the export patches it."""
    labels = {"app": target.name}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": target.name, "namespace": target.namespace},
            "spec": {"replicas": 3, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": target.container_name,
                                                           "image": "registry.example/capsim:0.1.0",
                                                           "command": ["capsim", "serve"],
                                                           "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}}}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_strictly(variants: dict[str, Scenario], version: str) -> None:
    for label, scenario in variants.items():
        objects = build_all(scenario, TARGET)
        for file in ("configmap.yaml", "prometheus-adapter.yaml", "hpa.yaml"):
            obj = yaml.safe_load(dump_yaml(objects[file]))  # validate what is written, not the dict
            kubernetes_validate.validate(obj, version, strict=True)
        patch = yaml.safe_load(dump_yaml(objects["deployment-patch.yaml"]))
        patched = _merge(_user_deployment(TARGET), patch)
        kubernetes_validate.validate(patched, version, strict=True)
        container = patched["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] and container["envFrom"], label  # merged into, not replaced


def test_strict_validation_catches_a_misspelt_field(rush: Scenario) -> None:
    # the validator is strict for real: a field the API does not know fails
    hpa = build_all(rush, TARGET)["hpa.yaml"]
    hpa["spec"]["maxReplica"] = hpa["spec"].pop("maxReplicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)


# The ScaledObject fields capsim writes, as KEDA's CRD (kedacore/keda config/crd/bases/keda.sh_scaledobjects.yaml,
# Apache-2.0) defines them: spec.scaleTargetRef (name required) and spec.triggers (type and metadata required,
# metadata a map of strings) are required; the counts are int32; metricType is Value, AverageValue or
# Utilization. kubernetes-validate has no CRD schemas, so this schema is written here from those facts;
# additionalProperties is false to be strict about the fields capsim writes. The behavior is the HPA's own
# type and is validated against the Kubernetes schema below.
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
KEDA_SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                  "name": {"type": "string"}}},
                "pollingInterval": _INT32, "cooldownPeriod": _INT32, "initialCooldownPeriod": _INT32,
                "fallback": {"type": "object", "required": ["failureThreshold", "replicas"],
                             "additionalProperties": False,
                             "properties": {"failureThreshold": _INT32, "replicas": _INT32,
                                            "behavior": {"enum": ["static", "currentReplicas",
                                                                  "currentReplicasIfHigher",
                                                                  "currentReplicasIfLower"]}}},
                "minReplicaCount": _INT32, "maxReplicaCount": _INT32, "idleReplicaCount": _INT32,
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                      "properties": {"behavior": {"type": "object"}}},
                    # keda.sh_scaledobjects.yaml: every field a string, formula and target required by the webhook
                    "scalingModifiers": {"type": "object", "additionalProperties": False,
                                         "required": ["formula", "target"],
                                         "properties": {"formula": {"type": "string"}, "target": {"type": "string"},
                                                        "activationTarget": {"type": "string"},
                                                        "metricType": {"enum": ["AverageValue", "Value"]}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {"anyOf": [{
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {
                        "type": {"const": "prometheus"},
                        "name": {"type": "string"},
                        "metricType": {"enum": ["Value", "AverageValue", "Utilization"]},
                        "useCachedMetrics": {"type": "boolean"},
                        # the Prometheus scaler's required metadata (keda.sh/docs/latest/scalers/prometheus)
                        "metadata": {"type": "object", "required": ["serverAddress", "query", "threshold"],
                                     "additionalProperties": {"type": "string"}},
                    }}, {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {
                        "type": {"const": "cron"},
                        "name": {"type": "string"},
                        # the cron scaler's metadata, every field required (keda.sh/docs/latest/scalers/cron)
                        "metadata": {"type": "object", "additionalProperties": False,
                                     "required": ["timezone", "start", "end", "desiredReplicas"],
                                     "properties": {k: {"type": "string"}
                                                    for k in ("timezone", "start", "end", "desiredReplicas")}},
                    }}]}},
            },
        },
    },
}


def test_keda_scaled_object_structure(variants: dict[str, Scenario]) -> None:
    for label, scenario in variants.items():
        obj = yaml.safe_load(dump_yaml(build_all(scenario, TARGET)["keda-scaledobject.yaml"]))
        jsonschema.validate(obj, KEDA_SCALED_OBJECT)
        auto = scenario.autoscaler
        assert auto is not None
        spec = obj["spec"]
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (auto.min_replicas, auto.max_replicas), label
        assert len(spec["triggers"]) == len(auto.metrics)
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        assert behavior == auto.behavior
        if behavior is not None:  # the same type as the HPA's: validate it inside an HPA
            hpa = build_all(scenario, TARGET)["hpa.yaml"]
            hpa["spec"]["behavior"] = behavior
            kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)


def test_keda_never_scales_to_zero_on_pod_metrics(rush: Scenario) -> None:
    spec = build_all(rush, TARGET)["keda-scaledobject.yaml"]["spec"]
    assert spec["minReplicaCount"] == rush.autoscaler.min_replicas == 8 and "cooldownPeriod" not in spec
    with pytest.raises(SettingsError, match="at least one Object or External metric to support scaling to zero"):
        rush.override({"autoscaler.minReplicas": 0})


def test_keda_query_is_the_adapter_query_summed_over_the_deployment(rush: Scenario) -> None:
    objects = build_all(rush, TARGET)
    trigger = objects["keda-scaledobject.yaml"]["spec"]["triggers"][0]
    rules = yaml.safe_load(objects["prometheus-adapter.yaml"]["data"]["config.yaml"])["rules"]
    adapter = rules[0]["metricsQuery"]
    matchers = 'namespace="agents",pod=~"agent-[a-z0-9]+-[a-z0-9]{5}"'
    # the pods whose value is a number (a NaN one would make the sum NaN): the adapter answers a NaN as 0
    assert trigger["metadata"]["query"] == "sum((" + adapter.replace("<<.LabelMatchers>>", matchers).replace(
        "<<.GroupBy>>", "pod") + ") >= 0)"
    assert trigger["metadata"]["threshold"] == "8" and trigger["metricType"] == "AverageValue"


# ---- HPA round trip ----------------------------------------------------------------------------------------
def test_hpa_round_trips_to_the_scenario_autoscaler(variants: dict[str, Scenario]) -> None:
    for label, scenario in variants.items():
        source = scenario.autoscaler
        assert source is not None
        manifest = yaml.safe_load(dump_yaml(build_all(scenario, TARGET)["hpa.yaml"]))
        loaded = autoscaler_from_hpa(manifest)
        ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "agent"}
        assert manifest["spec"]["scaleTargetRef"] == ref
        assert loaded == source.model_copy(update={"scale_target_ref": ref}), label
        # and the policy loads the same HPA from both
        spec = dict(manifest["spec"])
        del spec["scaleTargetRef"]
        assert HorizontalPodAutoscaler.from_k8s(spec).to_k8s() == source.to_hpa().to_k8s()
        # the round-tripped scenario is the source scenario
        back = scenario.override({"autoscaler": loaded.model_dump(by_alias=True)})
        assert back.autoscaler == loaded


def test_hpa_keeps_the_scenario_scale_target_ref(rush: Scenario) -> None:
    ref = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "agents"}
    scenario = rush.override({"autoscaler.scaleTargetRef": ref})
    manifest = build_all(scenario, TARGET)["hpa.yaml"]
    assert manifest["spec"]["scaleTargetRef"] == ref
    assert autoscaler_from_hpa(manifest) == scenario.autoscaler


def test_hpa_load_errors_name_the_field(rush: Scenario) -> None:
    manifest = build_all(rush, TARGET)["hpa.yaml"]
    bad = copy.deepcopy(manifest)
    bad["spec"]["behavior"]["scaleUp"]["policies"][0]["type"] = "Nodes"
    with pytest.raises(SettingsError, match=r"hpa.yaml: spec.behavior.scaleUp.policies\[0\].type"):
        autoscaler_from_hpa(bad)
    bad = copy.deepcopy(manifest)
    bad["metadata"]["annotations"]["capsim.io/adapter-lag-s"] = "soon"
    with pytest.raises(SettingsError, match="capsim.io/adapter-lag-s must be a number"):
        autoscaler_from_hpa(bad)
    with pytest.raises(SettingsError, match="apiVersion/kind"):
        autoscaler_from_hpa({**manifest, "apiVersion": "autoscaling/v1"})


# ---- the pod reads what is exported ------------------------------------------------------------------------
def test_pod_reads_every_exported_variable(variants: dict[str, Scenario]) -> None:
    from typer.main import get_command

    from capsim.core.service import PodConfig

    serve = get_command(app).commands["serve"]  # type: ignore[attr-defined]
    serve_env = {p.envvar for p in serve.params if p.envvar}
    from capsim.core.session_history import HistorySettings

    pod_env_names = {PodConfig.ENV_PREFIX + f.upper() for f in PodConfig.model_fields}
    pod_env_names |= {HistorySettings.ENV_PREFIX + f.upper() for f in HistorySettings.model_fields}  # the turns'
    for label, scenario in variants.items():
        data = build_all(scenario, TARGET)["configmap.yaml"]["data"]
        assert all(isinstance(v, str) for v in data.values())
        assert set(data) <= pod_env_names | serve_env, (label, set(data) - pod_env_names - serve_env)
        config = PodConfig.from_env(data)
        b = scenario.batching
        assert config.batch_settings() == type(config.batch_settings())(
            max_batch_size=b.max_batch_size, max_wait_ms=b.max_wait_ms, queue_capacity=b.queue_capacity,
            overflow=b.overflow, max_concurrent_batches=b.max_concurrent_batches)
        assert config.drain_timeout_s == scenario.pods.termination_grace_s
        assert config.redis_url == ("memory://" if scenario.state.store == "pod_local" else TARGET.redis_url)
        assert HistorySettings.from_env(data).on_unavailable == scenario.state.on_unavailable


def test_deployment_patch_probes_and_grace(variants: dict[str, Scenario]) -> None:
    rush = variants["rush"]
    patch = build_all(rush, TARGET)["deployment-patch.yaml"]
    pod = patch["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": "agent-capsim"}}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # the probe the simulator modelled (pods.readiness_probe), not another one
    probe = rush.pods.readiness_probe
    assert (container["readinessProbe"]["periodSeconds"], container["readinessProbe"]["failureThreshold"]) == (
        probe.period_s, probe.failure_threshold)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["terminationGracePeriodSeconds"] >= rush.pods.termination_grace_s
    # the startup probe outlasts the slowest cold start (uniform 45..90 s), at the simulated period (unset: the
    # readiness probe's); a period set is the one written
    startup = container["startupProbe"]
    assert startup["periodSeconds"] == probe.period_s and startup["failureThreshold"] == 10
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 90
    fast = build_all(rush.override({"pods.startup_probe.period_s": 2}), TARGET)["deployment-patch.yaml"]
    fstartup = fast["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert (fstartup["periodSeconds"], fstartup["failureThreshold"]) == (2, 46)
    legacy = build_all(variants["legacy"], TARGET)["deployment-patch.yaml"]
    lstartup = legacy["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert lstartup["periodSeconds"] * lstartup["failureThreshold"] >= 60  # above a lognormal's mean


def test_a_startup_threshold_set_is_the_one_written_and_a_killing_one_is_refused(rush: Scenario,
                                                                                 tmp_path: Path) -> None:
    # pods.startup_probe.failure_threshold set: simulated as set (the kubelet kills slower starts), written as set
    set_ = rush.override({"pods.startup_probe.failure_threshold": 12})
    patch = build_all(set_, TARGET)["deployment-patch.yaml"]
    assert patch["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureThreshold"] == 12
    export_scenario(set_, tmp_path / "set")
    assert "failureThreshold` is the one set (12)" in (tmp_path / "set" / "README.md").read_text()
    # a cold start of 45 to 90 s: 9 probes every 10 s may kill the slowest (a warning, written), 4 kill every one,
    # a fail that stops the export and names the setting
    slow = rush.override({"pods.startup_probe.failure_threshold": 9})
    assert [f.level for f in export_scenario(slow, tmp_path / "slow").findings
            if f.check == "startup-probe-short"] == ["warn"]
    with pytest.raises(ChecksFailedError, match="pods.startup_probe.failure_threshold") as info:
        export_scenario(rush.override({"pods.startup_probe.failure_threshold": 4}), tmp_path / "never")
    assert [f.check for f in info.value.findings] == ["startup-probe-short"]
    assert "kills every start" in str(info.value.findings[0])


def test_deployment_patch_writes_the_node_failure_tolerations(rush: Scenario) -> None:
    spec = build_all(rush, TARGET)["deployment-patch.yaml"]["spec"]["template"]["spec"]
    assert "tolerations" not in spec  # unset: the cluster's default (DefaultTolerationSeconds) applies
    tuned = rush.override({"pods.unreachable_toleration_s": 30})
    spec = build_all(tuned, TARGET)["deployment-patch.yaml"]["spec"]["template"]["spec"]
    assert spec["tolerations"] == [
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}]


def test_deployment_patch_writes_the_rolling_update_simulated(rush: Scenario) -> None:
    assert "strategy" not in build_all(rush, TARGET)["deployment-patch.yaml"]["spec"]  # Kubernetes' 25%, 25%
    tuned = rush.override({"pods.rolling_update": {"max_surge": 1, "max_unavailable": 0}})
    patch = yaml.safe_load(dump_yaml(build_all(tuned, TARGET)["deployment-patch.yaml"]))
    assert patch["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    kubernetes_validate.validate(_merge(_user_deployment(TARGET), patch), K8S_VERSIONS[-1], strict=True)
    assert "minReadySeconds" not in patch["spec"]
    held = yaml.safe_load(dump_yaml(build_all(tuned.override({"pods.min_ready_s": 30}), TARGET)["deployment-patch.yaml"]))
    assert held["spec"]["minReadySeconds"] == 30 and "progressDeadlineSeconds" not in held["spec"]
    short = build_all(tuned.override({"pods.progress_deadline_s": 900}), TARGET)["deployment-patch.yaml"]
    assert short["spec"]["progressDeadlineSeconds"] == 900
    kubernetes_validate.validate(_merge(_user_deployment(TARGET), held), K8S_VERSIONS[-1], strict=True)
    pct = rush.override({"pods.rolling_update": {"max_surge": "50%", "max_unavailable": "0%"}})
    strategy = yaml.safe_load(dump_yaml(build_all(pct, TARGET)["deployment-patch.yaml"]))["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": "50%", "maxUnavailable": "0%"}


def test_deployment_patch_writes_recreate_and_deletes_the_rolling_update(rush: Scenario) -> None:
    recreate = rush.override({"pods.strategy": "Recreate"})
    patch = yaml.safe_load(dump_yaml(build_all(recreate, TARGET)["deployment-patch.yaml"]))
    assert patch["spec"]["strategy"] == {"type": "Recreate", "rollingUpdate": None}
    # merged into a Deployment that had a rolling update: the API refuses Recreate beside one, so the null matters
    user = _user_deployment(TARGET)
    user["spec"]["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    merged = _merge(user, patch)
    assert merged["spec"]["strategy"] == {"type": "Recreate"}
    kubernetes_validate.validate(merged, K8S_VERSIONS[-1], strict=True)


def test_adapter_rules_serve_the_hpa_metric_names(variants: dict[str, Scenario]) -> None:
    for scenario in variants.values():
        objects = build_all(scenario, TARGET)
        hpa_names = [m["pods"]["metric"]["name"] for m in objects["hpa.yaml"]["spec"]["metrics"]]
        rules = yaml.safe_load(objects["prometheus-adapter.yaml"]["data"]["config.yaml"])["rules"]
        assert [r["name"]["as"] for r in rules] == hpa_names
        for rule in rules:
            assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}
            assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                                      "pod": {"resource": "pod"}}
            assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
            auto = scenario.autoscaler
            assert auto is not None
            query, window_s, _ = auto.query_of(rule["name"]["as"])
            if query == "instant":  # the adapter's default rule for a gauge: no window
                assert rule["metricsQuery"].startswith(f"sum({PodQuery.of(rule['name']['as'], window_s).series}{{")
            else:
                assert f"[{PodQuery.of(rule['name']['as'], window_s).window}]" in rule["metricsQuery"]


def test_promql_windows_and_ttft_ratio() -> None:
    assert PodQuery.of("capsim_queue_depth", 60).window == "60s"
    assert PodQuery.of("queue_depth", 45.5).window == "45500ms"
    ttft = PodQuery.of("ttft", 30).adapter_query()
    assert "rate(capsim_time_to_first_token_seconds_sum{<<.LabelMatchers>>}[30s])" in ttft
    assert " / " in ttft and "_count{" in ttft


def test_target_names_are_checked() -> None:
    with pytest.raises(SettingsError, match="name must be a DNS-1123 label"):
        DeployTarget(name="Agent_1")
    with pytest.raises(SettingsError, match="namespace must be a DNS-1123 label"):
        DeployTarget(namespace="-x")
    with pytest.raises(SettingsError, match="port must be an integer"):
        DeployTarget(port=0)
    with pytest.raises(SettingsError, match="redis_url must start with"):
        DeployTarget(redis_url="localhost:6379")


def test_no_autoscaler_is_an_error(tmp_path: Path) -> None:
    s = Scenario.from_yaml(ROOT / "data" / "scenarios" / "steady_poisson.yaml")
    assert s.autoscaler is None
    with pytest.raises(SettingsError, match="autoscaler is required"):
        export_scenario(s, tmp_path)


# ---- writing: checks gate, README, golden files ------------------------------------------------------------
def test_failed_check_stops_the_export(rush: Scenario, tmp_path: Path) -> None:
    bad = rush.override({"autoscaler.maxReplicas": 40})
    with pytest.raises(ChecksFailedError, match="autoscaler.maxReplicas") as info:
        export_scenario(bad, tmp_path / "out")
    assert [f.check for f in info.value.findings] == ["max-replicas-over-gpus"]
    assert not (tmp_path / "out").exists()
    result = export_scenario(bad, tmp_path / "out", force=True)
    # the rush routes least outstanding: its DestinationRule follows the objects every export writes
    assert [p.name for p in result.files] == [*BUILDERS, "destinationrule.yaml", "README.md"]
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "--force" in readme and "autoscaler.maxReplicas" in readme


def test_readme_gives_the_deploy_pipeline_the_plan_assumed(rush: Scenario, tmp_path: Path) -> None:
    export_scenario(rush, tmp_path, TARGET)
    assert "## Deploying a new version" not in (tmp_path / "README.md").read_text()  # no deploy simulated
    gated = rush.override({"pods.rollouts": [{"at_s": 100}], "pods.undo_after_s": 1200,
                           "pods.rolling_update": {"max_surge": 1, "max_unavailable": 0}})
    export_scenario(gated, tmp_path, TARGET)
    readme = (tmp_path / "README.md").read_text()
    assert "simulated as a rolling update of maxSurge 1, maxUnavailable 0" in readme
    assert ("kubectl rollout status -n agents deployment/agent --timeout=1200s || kubectl rollout undo -n agents "
            "deployment/agent") in readme
    export_scenario(gated.override({"pods.undo_after_s": None, "pods.undo_on_deadline": True,
                                    "pods.progress_deadline_s": 900}), tmp_path, TARGET)
    readme = (tmp_path / "README.md").read_text()
    assert "undo a rollout reported stalled (900 s without progress)" in readme
    assert "kubectl rollout status -n agents deployment/agent || kubectl rollout undo" in readme
    export_scenario(gated.override({"pods.undo_after_s": None, "pods.strategy": "Recreate",
                                    "pods.rolling_update": {"max_surge": "25%", "max_unavailable": "25%"}}),
                    tmp_path, TARGET)
    readme = (tmp_path / "README.md").read_text()
    assert "simulated as `Recreate`" in readme and "No automatic undo was simulated" in readme
    # a canary by pause: the steps as the plan ran them, in time order, as kubectl commands
    canary = gated.override({"pods.rollouts": [{"at_s": 100}, {"at_s": 100, "pause": True},
                                               {"at_s": 700, "resume": True, "undo_if_restarted": True}]})
    export_scenario(canary, tmp_path, TARGET)
    readme = (tmp_path / "README.md").read_text()
    assert "kubectl refuses `kubectl rollout undo`: resume first" in readme
    block = readme.split("The steps as simulated, in order:")[1].split("```")[1].splitlines()
    assert block[1:] == [
        "# at 100 s: the new template", "kubectl set image -n agents deployment/agent ...",
        "# at 100 s", "kubectl rollout pause -n agents deployment/agent",
        "# at 700 s: the canary check; undo if a container of the new ReplicaSet's pods exited (RESTARTS above 0, or "
        "CrashLoopBackOff)", "kubectl rollout resume -n agents deployment/agent",
        "kubectl rollout undo -n agents deployment/agent   # only if the check failed"]
    export_scenario(canary.override({"pods.undo_after_s": None, "pods.rollouts.2.undo_if_ttft_p99_over_baseline": 1.2}),
                    tmp_path, TARGET)
    readme = (tmp_path / "README.md").read_text()
    assert "undo a rollout only at its canary check" in readme
    assert ("or their p99 TTFT over the last 300 s (from 400 s) is over 1.2 times the old pods', or they answered "
            "nothing") in readme
    assert "increase(vllm:time_to_first_token_seconds_bucket" in readme
    assert "Start a latency check's window once the canary's pods are ready" in readme
    # a canary's inter-token latency check: its condition and its query
    itl = Scenario.from_yaml(Path(__file__).parent.parent / "data" / "scenarios" / "canary_rush.yaml").override(
        {"pods.rollouts": [{"at_s": 100}, {"at_s": 100, "pause": True},
                           {"at_s": 700, "resume": True, "undo_if_itl_mean_over_baseline": 1.1, "check_window_s": 120}]})
    export_scenario(itl, tmp_path, TARGET)
    readme = (tmp_path / "README.md").read_text()
    assert ("undo if their mean inter-token latency over the last 120 s (from 580 s) is over 1.1 times the old pods', "
            "or they answered nothing then") in readme
    assert ("# the mean inter-token latency: sum(increase(vllm:inter_token_latency_seconds_sum{pod=~\"<the pods>\"}"
            "[120s])) / sum(increase(vllm:inter_token_latency_seconds_count{pod=~\"<the pods>\"}[120s]))") in readme
    # a restart poll during the pause: the loop, before the check at the resume
    export_scenario(canary.override({"pods.rollouts.2.restart_poll_s": 30}), tmp_path, TARGET)
    block = (tmp_path / "README.md").read_text().split("The steps as simulated, in order:")[1].split("```")[1]
    assert ("# meanwhile, every 30 s of the pause: at a restart of the new ReplicaSet's pods (RESTARTS above 0, or "
            "CrashLoopBackOff), resume and undo at once\nkubectl get pods -n agents -l pod-template-hash=<the new "
            "ReplicaSet's>\n# at 700 s: the canary check") in block
    # an error-rate check: its condition and its query
    export_scenario(canary.override({"pods.rollouts.2.undo_if_error_rate_over": 0.02}), tmp_path, TARGET)
    readme = (tmp_path / "README.md").read_text()
    assert ("or the share of their requests ended with an error over the last 300 s (from 400 s) is over 0.02, or they "
            "answered nothing then") in readme
    assert ("the error rate as the gateway counts it (a draining pod's refusals and a crash's resets included; the "
            "template's pods labelled with their version): sum(increase(istio_requests_total{reporter=\"source\","
            "destination_version=\"<the new template's>\",response_code=~\"4..|5..\"}[300s])) / sum(increase("
            "istio_requests_total{reporter=\"source\",destination_version=\"<the new template's>\"}[300s]))") in readme
    # counted by the pods' own servers: vLLM's counter by status
    export_scenario(canary.override({"pods.rollouts.2.undo_if_error_rate_over": 0.02,
                                     "pods.rollouts.2.error_rate_source": "pod"}), tmp_path, TARGET)
    readme = (tmp_path / "README.md").read_text()
    assert ("# the error rate as the pods' own servers count it (without a draining pod's refusals and a crash's "
            "resets): sum(increase(http_requests_total{status=~\"4xx|5xx\",pod=~\"<the pods>\"}[300s])) / "
            "sum(increase(http_requests_total{pod=~\"<the pods>\"}[300s]))") in readme
    assert "istio_requests_total{reporter" not in readme
    # against the old pods': the condition, and the subtraction an analysis runs
    export_scenario(canary.override({"pods.rollouts.2.undo_if_error_rate_over_baseline_by": 0.01,
                                     "pods.rollouts.2.error_rate_source": "pod"}), tmp_path, TARGET)
    readme = (tmp_path / "README.md").read_text()
    assert ("the share of their requests ended with an error over the last 300 s (from 400 s) is more than 0.01 above "
            "the old pods'") in readme
    assert ("# against the old pods': the same share over the old template's pods, subtracted from the canary's (an "
            "Argo Rollouts analysis: successCondition result[0] <= 0.01)") in readme
    # a deploy of engine flags: the arguments its template changes, with vLLM's names
    flagged = Scenario.from_yaml(Path(__file__).parent.parent / "data" / "scenarios" / "canary_rush.yaml").override(
        {"pods.rollouts.0.batching": {"max_num_seqs": 64, "num_blocks": 2_000_000, "gpu_memory_utilization": None}})
    export_scenario(flagged, tmp_path, TARGET)
    readme = (tmp_path / "README.md").read_text()
    assert ("The deploy at 1900 s changes the engine's arguments to `--max-num-seqs 64 --num-gpu-blocks-override "
            "2000000`, the others as in `vllm-args.yaml`.") in readme
    assert "# at 1900 s: the new template (vLLM arguments: --max-num-seqs 64 --num-gpu-blocks-override 2000000)" \
        in readme
    # measured through the pause (an Argo Rollouts analysis): the loop with its interval, delay and failure limit, and
    # the resume's check as the last measurement
    export_scenario(canary.override({"pods.rollouts.2": {
        "at_s": 700, "resume": True, "undo_if_ttft_p99_over_s": 2.0, "check_window_s": 120, "check_interval_s": 60,
        "check_initial_delay_s": 200, "check_failure_limit": 2}}), tmp_path, TARGET)
    block = (tmp_path / "README.md").read_text().split("The steps as simulated, in order:")[1].split("```")[1]
    assert ("# meanwhile, from 300 s, every 60 s of the pause: a measurement over the last 120 s (the queries "
            "below), which fails if their p99 TTFT is over 2 s, or they answered nothing then; each limit counts its "
            "own failures (a metric of an Argo Rollouts analysis each); at the measurement that makes one limit's "
            "failures more than 2, resume and undo at once (an Argo Rollouts analysis: interval 60s, initialDelay 200s, "
            "failureLimit 2)\n# at 700 s: the canary check; undo if the last measurement, over the last 120 s (from "
            "580 s), makes one limit's failures more than 2\n") in block


def test_readme_reports_the_given_numbers(rush: Scenario, tmp_path: Path) -> None:
    numbers = {"summary": {"ttft_p99_s": 0.8125, "error_rate": 0.0004, "cost": 12.5, "slo_met": True,
                           "gpu_hours": 5.0, "node_gpu_hours": 13.5},
               "provenance": {"seed": 7, "capsim_version": "9.9", "profile": "p.csv"}}
    export_scenario(rush, tmp_path, TARGET, numbers=numbers)
    readme = (tmp_path / "README.md").read_text()
    for file in BUILDERS:
        assert f"`{file}`" in readme
    assert "| TTFT p99 (s) | 0.8125 |" in readme and "| cost (as the cluster bills) | 12.5 |" in readme
    assert "| GPU hours held by pods | 5 |" in readme and "| GPU hours of the nodes (created to removed) | 13.5 |" \
        in readme and "seed 7" in readme
    assert "kubectl -n agents patch deployment agent" in readme
    assert "does not meet the SLO" not in readme
    # the cluster-autoscaler flags and the readiness probe the simulated cost and failures assumed
    assert rush.cluster is not None and rush.cluster.scale_down_enabled
    assert f"`--scale-down-unneeded-time={rush.cluster.scale_down_unneeded_time_s:g}s`" in readme
    assert "`--scale-down-gpu-utilization-threshold=" in readme and "`--scan-interval=" in readme
    assert "`--unremovable-node-recheck-timeout=300s`" in readme  # the planner's recheck, as simulated
    assert f"readiness probe runs every {rush.pods.readiness_probe.period_s} s" in readme
    export_scenario(rush, tmp_path, TARGET, numbers={"summary": {"slo_met": False, "node_gpu_hours": math.nan}})
    readme = (tmp_path / "README.md").read_text()
    assert "does not meet the SLO" in readme and "GPU hours of the nodes" not in readme  # NaN: no row
    assert "slower than measured" not in readme
    # a plan simulated with a margin on the pods' speed says so beside its numbers
    export_scenario(rush.override({"service.slowdown": 1.2}), tmp_path, TARGET, numbers=numbers)
    assert "Simulated on pods 1.2 times slower than measured (`service.slowdown`" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize(("kind", "says"), [
    ("random", "ClusterIP Service"), ("round_robin", "`ROUND_ROBIN`"), ("least_outstanding", "`LEAST_REQUEST`"),
    ("session_affinity", "consistent hash of the session id"), ("prefix_aware", "`InferencePool`"),
])
def test_readme_names_the_router_the_plan_assumed(rush: Scenario, tmp_path: Path, kind: str, says: str) -> None:
    # with sessions the router decides the prefill a turn costs: the cluster must route as the plan did
    export_scenario(rush.override({"router.kind": kind}), tmp_path, TARGET)
    readme = (tmp_path / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("- the router ")]
    assert f"`router.kind: {kind}`" in line and says in line
    # outlier ejection travels with the proxies that have it, as the plan's settings
    assert ("`consecutive_5xx: 5`" in line) == (kind in ("least_outstanding", "prefix_aware"))
    assert "max_ejection_time_jitter" not in line  # Envoy's default, 0, is not named
    if kind == "least_outstanding":
        export_scenario(rush.override({"router.kind": kind, "router.outlier_ejection.max_ejection_time_jitter_s": 2}),
                        tmp_path, TARGET, force=True)
        assert "`max_ejection_time_jitter: 2s`" in (tmp_path / "README.md").read_text()
    if kind == "prefix_aware":
        assert "(weights 3, 1, 1)" in line
    if kind == "session_affinity":
        assert "at random" in line


def test_readme_states_the_stockout_backoff_and_what_the_router_does_with_a_slow_pod(rush: Scenario,
                                                                                     tmp_path: Path) -> None:
    export_scenario(rush, tmp_path, TARGET)
    plain = (tmp_path / "README.md").read_text()
    assert "node-group-backoff" not in plain and "run slow" not in plain  # only a plan that met them says so
    faults = {"gpu_stockouts": [{"at_s": 1800, "duration_s": 300}], "slow_pods": [{"at_s": 1800, "factor": 2}]}
    for kind, does in (("least_outstanding", "sends them fewer requests"), ("random", "gives them their share")):
        export_scenario(rush.override({"faults": faults, "router.kind": kind}), tmp_path, TARGET)
        readme = (tmp_path / "README.md").read_text()
        assert ("the cloud reports the failure 60 s after the ask; cluster-autoscaler "
                "`--max-node-provision-time=900s`, `--initial-node-group-backoff-duration=300s`, "
                "`--max-node-group-backoff-duration=1800s`, `--node-group-backoff-reset-timeout=10800s`") in readme
        (line,) = [ln for ln in readme.splitlines() if ln.startswith("- pods that run slow")]
        assert "up to 2 times slower" in line and f"(`{kind}`) {does}" in line


def test_golden_files(tmp_path: Path) -> None:
    """The export of a copy of the rush (kept with the golden files, so editing data/ does not move them),
    pinned; regenerate with CAPSIM_UPDATE_GOLDEN=1 after an intended change."""
    scenario = Scenario.from_yaml(GOLDEN / "scenario.yaml")
    export_scenario(scenario, tmp_path, DeployTarget())
    for file in [*BUILDERS, routing_file(scenario)]:
        text = (tmp_path / file).read_text()
        golden = GOLDEN / file
        if os.environ.get("CAPSIM_UPDATE_GOLDEN"):
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(text)
        assert text == golden.read_text(), f"{file} differs from {golden}"


# ---- the command -------------------------------------------------------------------------------------------
def _small_hpa_scenario(tmp_path: Path) -> Path:
    data = {
        "name": "small", "horizon_s": 120, "warmup_s": 10,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 20}},
        "service": {"kind": "deterministic", "mean_s": 0.05},
        "batching": {"max_batch_size": 8, "max_wait_ms": 5, "queue_capacity": 64},
        "pods": {"replicas": 1, "startup_s": 10, "gpu_cost_per_hour": 1.0},
        "autoscaler": {"minReplicas": 1, "maxReplicas": 4,
                       "metrics": [_metric("capsim_queue_depth", "4")]},
        "client": {"timeout_s": 10},
    }
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_export_command_simulates_for_the_readme(tmp_path: Path) -> None:
    from capsim.sim import simulate

    path = _small_hpa_scenario(tmp_path)
    out = tmp_path / "deploy"
    result = CliRunner().invoke(app, ["export", str(path), "--out", str(out), "--name", "small-agent",
                                      "--namespace", "team-a", "--seed", "3"])
    assert result.exit_code == 0, result.output
    # the default router (least outstanding) writes its DestinationRule too
    assert sorted(p.name for p in out.iterdir()) == sorted([*BUILDERS, "destinationrule.yaml", "README.md"])
    expected = simulate(Scenario.from_yaml(path), seed=3).summary
    readme = (out / "README.md").read_text()
    assert f"| TTFT p99 (s) | {expected.ttft_p99_s:.4g} |" in readme and "seed 3" in readme
    assert yaml.safe_load((out / "hpa.yaml").read_text())["metadata"]["namespace"] == "team-a"


def test_export_command_gates_on_checks(tmp_path: Path, rush: Scenario) -> None:
    path = _small_hpa_scenario(tmp_path)
    bad = yaml.safe_load(path.read_text())
    bad["client"]["timeout_s"] = 0.01
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(bad))
    runner = CliRunner()
    out = tmp_path / "deploy"
    failed = runner.invoke(app, ["export", str(bad_path), "--out", str(out)])
    assert failed.exit_code == 1 and not out.exists()
    assert "client.timeout_s" in failed.output
    forced = runner.invoke(app, ["export", str(bad_path), "--out", str(out), "--force", "--no-simulate"])
    assert forced.exit_code == 0, forced.output
    assert "No simulation was run" in (out / "README.md").read_text()


def test_export_command_takes_numbers_from_a_summary(tmp_path: Path) -> None:
    path = _small_hpa_scenario(tmp_path)
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"summary": {"ttft_p99_s": 0.123}, "provenance": {"seed": 11}}))
    out = tmp_path / "deploy"
    result = CliRunner().invoke(app, ["export", str(path), "--out", str(out), "--summary", str(summary)])
    assert result.exit_code == 0, result.output
    assert "simulating" not in result.output
    assert "| TTFT p99 (s) | 0.123 |" in (out / "README.md").read_text()


def test_pod_env_is_strings_for_every_store(variants: dict[str, Scenario]) -> None:
    env = pod_env(variants["legacy"], TARGET)
    assert env["CAPSIM_REDIS_URL"] == "memory://" and env["CAPSIM_HOST"] == "0.0.0.0"


def test_export_command_bad_inputs_are_one_line_exit_2(tmp_path: Path) -> None:
    path = _small_hpa_scenario(tmp_path)
    runner = CliRunner()
    bad_name = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "o"), "--name", "Bad_Name"])
    assert bad_name.exit_code == 2 and "name must be a DNS-1123 label" in bad_name.output
    summary = tmp_path / "summary.json"
    summary.write_text("{not json")
    bad_json = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "o"), "--summary", str(summary)])
    assert bad_json.exit_code == 2 and "--summary" in bad_json.output and "not JSON" in bad_json.output
    missing = runner.invoke(app, ["check", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "nope.yaml" in missing.output
    assert not (tmp_path / "o").exists()


# ---- property: any valid autoscaler exports to a valid HPA that loads back equal ---------------------------
_quantity = st.one_of(st.integers(1, 500).map(str), st.integers(1, 999).map(lambda m: f"{m}m"),
                      st.integers(1, 500))
_policy = st.fixed_dictionaries({"type": st.sampled_from(["Pods", "Percent"]), "value": st.integers(1, 100),
                                 "periodSeconds": st.integers(1, 1800)})
_rules = st.fixed_dictionaries({}, optional={"stabilizationWindowSeconds": st.integers(0, 3600),
                                             "policies": st.lists(_policy, min_size=1, max_size=3),
                                             "selectPolicy": st.sampled_from(["Max", "Min", "Disabled"])})
_behavior = st.one_of(st.none(), st.fixed_dictionaries({}, optional={"scaleUp": _rules, "scaleDown": _rules}))
_seconds = st.integers(1, 120).map(float) | st.floats(0.5, 120, allow_nan=False).map(lambda x: round(x, 3))


@st.composite
def _autoscalers(draw: st.DrawFn) -> dict[str, Any]:
    low = draw(st.integers(1, 5))  # 0 needs an Object or External metric (refused on Pods metrics)
    names = draw(st.lists(st.sampled_from(["capsim_queue_depth", "capsim_requests_in_flight", "capsim_gpu_busy_ratio",
                                           "capsim_time_to_first_token_seconds", "queue_depth", "ttft"]),
                          min_size=1, max_size=2, unique=True))
    auto: dict[str, Any] = {
        "minReplicas": low, "maxReplicas": draw(st.integers(max(low, 1), 64)),
        "metrics": [{"type": "Pods", "pods": {"metric": {"name": n},
                                              "target": {"type": "AverageValue", "averageValue": draw(_quantity)}}}
                    for n in names],
        "behavior": draw(_behavior), "sync_period_s": draw(_seconds), "scrape_interval_s": draw(_seconds),
        "query_window_s": draw(_seconds), "adapter_lag_s": draw(_seconds),
        "tolerance": draw(st.floats(0, 0.5, allow_nan=False)), "downscale_window_s": draw(_seconds),
    }
    return auto


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(auto=_autoscalers())
def test_any_autoscaler_exports_valid_and_round_trips(rush: Scenario, auto: dict[str, Any]) -> None:
    scenario = rush.override({"autoscaler": auto})
    objects = {k: yaml.safe_load(dump_yaml(v)) for k, v in build_all(scenario, TARGET).items()}
    kubernetes_validate.validate(objects["hpa.yaml"], K8S_VERSIONS[-1], strict=True)
    kubernetes_validate.validate(objects["prometheus-adapter.yaml"], K8S_VERSIONS[-1], strict=True)
    jsonschema.validate(objects["keda-scaledobject.yaml"], KEDA_SCALED_OBJECT)
    source = scenario.autoscaler
    assert source is not None
    loaded = autoscaler_from_hpa(objects["hpa.yaml"])
    assert loaded == source.model_copy(update={"scale_target_ref": objects["hpa.yaml"]["spec"]["scaleTargetRef"]})


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_a_disruption_budget_is_exported_and_selects_the_patched_pods(rush: Scenario, tmp_path: Path,
                                                                      version: str) -> None:
    budgeted = rush.override({"pods.disruption_budget": {"max_unavailable": 1}})
    result = export_scenario(budgeted, tmp_path, TARGET)
    pdb = yaml.safe_load((tmp_path / "pdb.yaml").read_text())
    assert tmp_path / "pdb.yaml" in result.files
    kubernetes_validate.validate(pdb, version, strict=True)
    assert pdb["kind"] == "PodDisruptionBudget" and pdb["spec"]["maxUnavailable"] == 1
    patched = _merge(_user_deployment(TARGET), yaml.safe_load((tmp_path / "deployment-patch.yaml").read_text()))
    kubernetes_validate.validate(patched, version, strict=True)
    labels = patched["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()  # it selects the pods
    readme = (tmp_path / "README.md").read_text()
    assert "| `pdb.yaml` |" in readme and "kubectl apply -f configmap.yaml -f pdb.yaml" in readme
    # minAvailable as written; no budget: no file, and the patch leaves the pods' labels alone
    export_scenario(rush.override({"pods.disruption_budget": {"min_available": 2}}), tmp_path / "min", TARGET)
    assert yaml.safe_load((tmp_path / "min" / "pdb.yaml").read_text())["spec"]["minAvailable"] == 2
    export_scenario(rush, tmp_path / "none", TARGET)
    assert not (tmp_path / "none" / "pdb.yaml").exists()
    assert "labels" not in yaml.safe_load((tmp_path / "none" / "deployment-patch.yaml").read_text())[
        "spec"]["template"]["metadata"]


def test_a_restarts_own_start_is_allowed_for_and_its_volume_asked_for(rush: Scenario, tmp_path: Path) -> None:
    # pods.restart_startup_s: the derived threshold outlasts the slower of a first start (uniform 45..90 s) and a
    # restart; the README says a restart that fast needs the caches on a volume that outlives the container
    warm = rush.override({"pods.restart_startup_s": {"kind": "uniform", "low_s": 15, "high_s": 30}})
    patch = build_all(warm, TARGET)["deployment-patch.yaml"]
    assert patch["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureThreshold"] == 10
    export_scenario(warm, tmp_path / "warm")
    readme = (tmp_path / "warm" / "README.md").read_text()
    assert "a container's restart on its node at most 30 s" in readme
    assert "mounts an emptyDir at `/model-cache` and sets `HF_HUB_CACHE=/model-cache/huggingface/hub`" in readme
    slower = rush.override({"pods.restart_startup_s": 150})  # odd, but allowed for: 150 s under 16 probes
    patch = build_all(slower, TARGET)["deployment-patch.yaml"]
    assert patch["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureThreshold"] == 16
    # 4 probes kill every first start (45 s or more), but a restart of 15 to 30 s passes: a warning, not a fail
    short = warm.override({"pods.startup_probe.failure_threshold": 4})
    (finding,) = [f for f in export_scenario(short, tmp_path / "short").findings if f.check == "startup-probe-short"]
    assert finding.level == "warn" and "a new pod serves only from a restart" in finding.message

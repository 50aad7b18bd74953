"""Export of the router the plan assumed: an Istio DestinationRule for round robin, least outstanding and session
affinity, an InferencePool and its endpoint picker's scorers for prefix-aware, nothing for random; each object
has the upstream fields, selects the patched pods, and carries what the simulator's router did (its ejection)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from capsim.export import DeployTarget, export_scenario
from capsim.export.routing import (
    EPP_CONFIG_FILE,
    SESSION_HEADER,
    build_routing,
    endpoint_picker_config,
    routing_file,
    routing_notes,
)
from capsim.model.scenario import Scenario
from capsim.sim import Simulation

ROOT = Path(__file__).resolve().parents[1]
AGENTS = ROOT / "data" / "scenarios" / "h100x4_llama3_70b_agents.yaml"
TARGET = DeployTarget(name="agent", namespace="agents", port=8080)
KINDS = ("random", "round_robin", "least_outstanding", "session_affinity", "prefix_aware")

# The DestinationRule fields capsim writes, as Istio's networking/v1alpha3/destination_rule.proto defines them
# (istio/api, Apache-2.0): loadBalancer is one of simple (an enum) or consistentHash (httpHeaderName one of its
# keys); outlierDetection's counts are uint32/int32 and its durations 1h/1m/1s/1ms strings. Written here from
# those facts (kubernetes-validate has no CRD schemas); additionalProperties false to be strict about the fields.
_DURATION = {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"}
_PERCENT = {"type": "integer", "minimum": 0, "maximum": 100}
DESTINATION_RULE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "networking.istio.io/v1"}, "kind": {"const": "DestinationRule"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "required": ["host", "trafficPolicy"], "additionalProperties": False, "properties": {
            "host": {"type": "string"},
            "trafficPolicy": {"type": "object", "required": ["loadBalancer"], "additionalProperties": False,
                              "properties": {
                "loadBalancer": {"oneOf": [
                    {"type": "object", "required": ["simple"], "additionalProperties": False, "properties": {
                        "simple": {"enum": ["UNSPECIFIED", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST",
                                            "LEAST_CONN"]}}},
                    {"type": "object", "required": ["consistentHash"], "additionalProperties": False, "properties": {
                        "consistentHash": {"type": "object", "required": ["httpHeaderName"],
                                           "additionalProperties": False,
                                           "properties": {"httpHeaderName": {"type": "string", "minLength": 1}}}}},
                ]},
                "outlierDetection": {"type": "object", "additionalProperties": False, "properties": {
                    "consecutive5xxErrors": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
                    "consecutiveLocalOriginFailures": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
                    "splitExternalLocalOriginErrors": {"type": "boolean"},
                    "interval": _DURATION, "baseEjectionTime": _DURATION,
                    "maxEjectionPercent": _PERCENT, "minHealthPercent": _PERCENT}},
            }},
        }},
    },
}
# The InferencePool as gateway-api-inference-extension's api/v1/inferencepool_types.go (Apache-2.0) defines it:
# selector (matchLabels), targetPorts (1 item, a port number) and endpointPickerRef (name; kind, port.number,
# failureMode FailOpen or FailClose) are required or optional as written there.
INFERENCE_POOL = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "inference.networking.k8s.io/v1"}, "kind": {"const": "InferencePool"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "required": ["selector", "targetPorts", "endpointPickerRef"],
                 "additionalProperties": False, "properties": {
            "selector": {"type": "object", "required": ["matchLabels"], "additionalProperties": False,
                         "properties": {"matchLabels": {"type": "object", "minProperties": 1,
                                                        "additionalProperties": {"type": "string"}}}},
            "targetPorts": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                "type": "object", "required": ["number"], "additionalProperties": False,
                "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}}}},
            "endpointPickerRef": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
                "group": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string", "minLength": 1},
                "port": {"type": "object", "required": ["number"], "additionalProperties": False,
                         "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}}},
                "failureMode": {"enum": ["FailOpen", "FailClose"]}}},
        }},
    },
}


@pytest.fixture(scope="module")
def agents() -> Scenario:
    return Scenario.from_yaml(AGENTS)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.mark.parametrize("kind", KINDS)
def test_each_router_exports_its_object_or_none(agents: Scenario, tmp_path: Path, kind: str) -> None:
    scenario = agents.override({"router.kind": kind})
    result = export_scenario(scenario, tmp_path, TARGET, force=True)
    name = routing_file(scenario)
    written = {p.name for p in result.files}
    assert ("destinationrule.yaml" in written) == (kind in ("round_robin", "least_outstanding", "session_affinity"))
    assert ("inferencepool.yaml" in written) == (kind == "prefix_aware")
    readme = (tmp_path / "README.md").read_text()
    if name is None:  # random: a plain Service does it, nothing to apply
        assert kind == "random" and "kubectl apply -f destinationrule.yaml" not in readme
        return
    assert f"| `{name}` |" in readme and f"kubectl apply -f {name}" in readme
    assert _docs(tmp_path / name) == build_routing(scenario, TARGET)  # the file is the objects, as YAML


@pytest.mark.parametrize("kind", ["round_robin", "least_outstanding", "session_affinity"])
def test_destination_rule_has_istios_fields_and_the_plans_balancer(agents: Scenario, kind: str) -> None:
    scenario = agents.override({"router.kind": kind})
    (rule,) = build_routing(scenario, TARGET)
    jsonschema.validate(rule, DESTINATION_RULE)
    assert rule["spec"]["host"] == "agent.agents.svc.cluster.local"  # the Service named as the Deployment
    balancer = rule["spec"]["trafficPolicy"]["loadBalancer"]
    expected = {"round_robin": {"simple": "ROUND_ROBIN"}, "least_outstanding": {"simple": "LEAST_REQUEST"},
                "session_affinity": {"consistentHash": {"httpHeaderName": SESSION_HEADER}}}[kind]
    assert balancer == expected
    # outlier detection exactly where the simulated router ejected pods (least outstanding; not round robin
    # or session affinity, whose simulated routers never eject)
    simulated = Simulation(scenario, seed=0).router.outliers is not None
    assert ("outlierDetection" in rule["spec"]["trafficPolicy"]) == simulated == (kind == "least_outstanding")


def test_outlier_detection_carries_the_plans_ejection(agents: Scenario) -> None:
    e = {"consecutive_failures": 3, "base_ejection_s": 2.5, "max_ejection_s": 300.0, "max_ejection_percent": 34}
    scenario = agents.override({"router.kind": "least_outstanding", "router.outlier_ejection": e})
    (rule,) = build_routing(scenario, TARGET)
    jsonschema.validate(rule, DESTINATION_RULE)
    assert rule["spec"]["trafficPolicy"]["outlierDetection"] == {
        "consecutive5xxErrors": 3, "interval": "10s", "baseEjectionTime": "2500ms", "maxEjectionPercent": 34,
        "minHealthPercent": 50}  # Envoy's panic threshold, which the simulated detector has
    assert not any("maxEjectionPercent" in n or "max_ejection_time" in n for n in routing_notes(scenario, TARGET))
    # what Istio cannot say is said in the README instead: a fractional percent, another ejection cap
    odd = agents.override({"router.kind": "least_outstanding",
                           "router.outlier_ejection": {**e, "max_ejection_percent": 12.5, "max_ejection_s": 60}})
    notes = " ".join(routing_notes(odd, TARGET))
    assert "12.5 is written as 12" in notes and "capped an ejection at 60 s" in notes
    assert "max_ejection_time_jitter" not in notes
    jittered = agents.override({"router.kind": "least_outstanding",
                                "router.outlier_ejection": {**e, "max_ejection_time_jitter_s": 2.5}})
    (rule,) = build_routing(jittered, TARGET)
    jsonschema.validate(rule, DESTINATION_RULE)  # nothing to write it in: the README says so
    assert "up to 2.5 s of jitter" in " ".join(routing_notes(jittered, TARGET))
    gateway = jittered.override({"router.kind": "prefix_aware"})
    assert any("`max_ejection_time_jitter: 2500ms`" in n for n in routing_notes(gateway, TARGET))
    # only the proxy's own failures (the pods' 503s in a Redis outage do not eject them): Istio's split counters,
    # with consecutive_5xx off
    split = agents.override({"router.kind": "least_outstanding",
                             "router.outlier_ejection": {**e, "count_answered_5xx": False}})
    (rule,) = build_routing(split, TARGET)
    jsonschema.validate(rule, DESTINATION_RULE)
    assert rule["spec"]["trafficPolicy"]["outlierDetection"] == {
        "consecutive5xxErrors": 0, "splitExternalLocalOriginErrors": True, "consecutiveLocalOriginFailures": 3,
        "interval": "10s", "baseEjectionTime": "2500ms", "maxEjectionPercent": 34, "minHealthPercent": 50}
    # the pods' own 503s in a Redis outage eject them under the default, and the README says so; not with the split
    assert any("session store (Redis) is out" in n for n in routing_notes(scenario, TARGET))
    assert not any("session store (Redis) is out" in n for n in routing_notes(split, TARGET))
    gateway = agents.override({"router.kind": "prefix_aware", "router.outlier_ejection": {**e, "count_answered_5xx": False}})
    assert any("`consecutive_local_origin_failure: 3`" in n for n in routing_notes(gateway, TARGET))
    assert not any("`interval:" in n for n in routing_notes(gateway, TARGET))
    # a plan with Envoy's sweeps writes its interval (Envoy's 10 s without one: the DestinationRule's default)
    swept = agents.override({"router.kind": "least_outstanding", "router.outlier_ejection": {**e, "interval_s": 2.5}})
    (rule,) = build_routing(swept, TARGET)
    jsonschema.validate(rule, DESTINATION_RULE)
    assert rule["spec"]["trafficPolicy"]["outlierDetection"]["interval"] == "2500ms"
    gateway = gateway.override({"router.outlier_ejection.interval_s": 10})
    assert any("`interval: 10s`" in n for n in routing_notes(gateway, TARGET))
    # no ejection in the plan: none in the rule
    none = agents.override({"router.kind": "least_outstanding", "router.outlier_ejection": None})
    (rule,) = build_routing(none, TARGET)
    assert "outlierDetection" not in rule["spec"]["trafficPolicy"]


def test_the_readme_says_where_istio_cannot_eject_the_one_pod_the_plan_ejected(agents: Scenario) -> None:
    """capsim ejects one pod while none is out whatever the percentage (Envoy's ``always_eject_one_host``); a
    DestinationRule cannot set that, and Envoy since 1.27 ejects none of fewer than 100 / maxEjectionPercent pods.
    The README says so, with the percentage that ejects one at the plan's fewest pods; not where the percentage
    ejects one anyway, nor where the plan did not assume the option."""
    def notes(**e: Any) -> str:
        s = agents.override({"router.kind": "least_outstanding", "router.outlier_ejection": e})
        return " ".join(n for n in routing_notes(s, TARGET) if "always_eject_one_host" in n)
    floor3 = notes()  # the agents' HPA, 3 to 16 pods, at Envoy's 10 %
    assert "fewer than 10 pods" in floor3 and "the plan ran 3 to 16 pods" in floor3
    assert "`max_ejection_percent: 34`" in floor3 and "Envoy since 1.27" in floor3
    assert notes(max_ejection_percent=34) == ""  # one of 3 is 33.3 %: Envoy ejects it
    assert "fewer than 4 pods" in notes(max_ejection_percent=33)
    assert "never, at 0 %" in notes(max_ejection_percent=0)
    assert notes(always_eject_one_host=False) == ""  # the plan ran what the DestinationRule does
    two = " ".join(routing_notes(agents.override({"router.kind": "least_outstanding", "autoscaler.min_replicas": 2}),
                                 TARGET))
    assert "the plan ran 2 to 16 pods" in two and "`max_ejection_percent: 50`" in two
    gateway = agents.override({"router.kind": "prefix_aware"})
    assert any("`always_eject_one_host: true` (Envoy 1.31" in n for n in routing_notes(gateway, TARGET))


@pytest.mark.parametrize("version", ["1.30.0", "1.34.0"])
def test_inference_pool_selects_the_patched_pods_and_scores_as_the_plan(agents: Scenario, tmp_path: Path,
                                                                        version: str) -> None:
    scenario = agents.override({"router.kind": "prefix_aware", "router.prefix_weight": 2.5,
                                "router.queue_weight": 2, "router.kv_cache_weight": 0})
    export_scenario(scenario, tmp_path, TARGET, force=True)
    config, pool = _docs(tmp_path / "inferencepool.yaml")
    kubernetes_validate.validate(config, version, strict=True)
    jsonschema.validate(pool, INFERENCE_POOL)
    # the pool selects the pods the Deployment patch labels, on the port the pod serves
    patch = yaml.safe_load((tmp_path / "deployment-patch.yaml").read_text())
    labels = patch["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert pool["spec"]["targetPorts"] == [{"number": container["ports"][0]["containerPort"]}] == [{"number": 8080}]
    # the picker's config: every profile entry names a declared plugin; the plan's weights, a zero leaves it out
    picker = yaml.safe_load(config["data"][EPP_CONFIG_FILE])
    assert picker["kind"] == "EndpointPickerConfig"
    declared = {p["type"] for p in picker["plugins"]}
    (profile,) = picker["schedulingProfiles"]
    refs = {p["pluginRef"]: p.get("weight") for p in profile["plugins"]}
    assert set(refs) == declared
    assert refs == {"prefix-cache-scorer": 2.5, "queue-scorer": 2, "max-score-picker": None}
    assert isinstance(refs["queue-scorer"], int)  # whole weights as ints, which every picker release reads
    readme = (tmp_path / "README.md").read_text()
    assert f"--pool-name {TARGET.name}" in readme and "agent-epp-config" in readme
    # the plan's ejection has no InferencePool field: the README gives it for the gateway
    assert "the InferencePool has no such field" in readme and "`consecutive_5xx: 5`" in readme


def test_default_scorer_weights_are_the_routers(agents: Scenario) -> None:
    router = agents.override({"router.kind": "prefix_aware"}).router
    (profile,) = endpoint_picker_config(router)["schedulingProfiles"]
    weights = {p["pluginRef"]: p.get("weight") for p in profile["plugins"]}
    assert weights == {"prefix-cache-scorer": router.prefix_weight, "queue-scorer": router.queue_weight,
                       "kv-cache-utilization-scorer": router.kv_cache_weight, "max-score-picker": None}


def test_session_affinity_readme_names_the_header(agents: Scenario, tmp_path: Path) -> None:
    export_scenario(agents.override({"router.kind": "session_affinity"}), tmp_path, TARGET, force=True)
    readme = (tmp_path / "README.md").read_text()
    assert f"`{SESSION_HEADER}` header" in readme and "agent.agents.svc.cluster.local" in readme
    # or capsim's router, which follows the HPA through a headless Service on the pods' port
    assert "--pods-from-dns agent-pods.agents.svc.cluster.local:8080" in readme

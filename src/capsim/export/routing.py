"""The router the plan assumed, as the objects that route the same way in a cluster.

With sessions and prefix caching the router decides what a turn prefills, so a plan made with one router
does not hold behind another (docs/export.md). ``router.kind`` maps to:

- ``round_robin``, ``least_outstanding``: an Istio ``DestinationRule`` (``networking.istio.io/v1``) on the
  pods' Service with ``loadBalancer.simple: ROUND_ROBIN`` or ``LEAST_REQUEST`` (Envoy's load balancers), and
  for least outstanding the plan's outlier ejection as ``outlierDetection``.
- ``session_affinity``: the same ``DestinationRule`` with ``consistentHash.httpHeaderName`` on the session id
  (Envoy's ring hash, as ``capsim router`` hashes sessions onto pods); the clients send that header.
- ``prefix_aware``: a Gateway API Inference Extension ``InferencePool`` (``inference.networking.k8s.io/v1``)
  over the pods, and the endpoint picker's ``EndpointPickerConfig`` (``inference.networking.x-k8s.io/v1alpha1``)
  with the prefix-cache, queue and KV-cache-utilization scorers at the plan's weights, in a ConfigMap.
- ``random``: nothing to write; a ClusterIP Service (kube-proxy) picks pods at random.

Field names and defaults are from the upstream definitions: Istio's ``networking/v1alpha3/destination_rule.proto``
(``consecutive5xxErrors``, or with ``count_answered_5xx: false`` ``splitExternalLocalOriginErrors`` and
``consecutiveLocalOriginFailures``, as Istio's ``applyOutlierDetection`` passes them to Envoy; ``interval``, the
plan's ``interval_s`` or Envoy's 10 s, ``baseEjectionTime``, ``maxEjectionPercent`` as an int32,
``minHealthPercent``, default 0, which Istio passes to Envoy as ``healthy_panic_threshold``), and
gateway-api-inference-extension's ``api/v1/inferencepool_types.go`` and its Helm chart's EPP config (scorer
names ``prefix-cache-scorer``, ``queue-scorer``, ``kv-cache-utilization-scorer``, ``max-score-picker``).
"""

from __future__ import annotations

from typing import Any

from capsim.export.pod import pod_labels
from capsim.export.target import DeployTarget
from capsim.model.scenario import Router, Scenario
from capsim.model.scenario_limits import max_pods, min_pods
from capsim.policy.outlier import ejects_one_of, fewest_ejecting, fewest_percent
from capsim.policy.routing import SESSION_HEADER

__all__ = ["SESSION_HEADER", "build_routing", "routing_file", "routing_notes"]

#: Envoy's ``healthy_panic_threshold`` default, which capsim's outlier detection models (capsim.policy.outlier).
PANIC_PERCENT = 50
#: Envoy's ``max_ejection_time`` default; Istio's DestinationRule cannot set another one.
ENVOY_MAX_EJECTION_S = 300.0
#: Envoy's outlier detection ``interval`` default (Istio's DestinationRule's too).
ENVOY_INTERVAL_S = 10.0
#: The endpoint picker's ext-proc port (the InferencePool's default, 9002).
EPP_PORT = 9002
#: The file inside the EPP ConfigMap.
EPP_CONFIG_FILE = "capsim-plugins.yaml"
_SIMPLE = {"round_robin": "ROUND_ROBIN", "least_outstanding": "LEAST_REQUEST"}


def routing_file(scenario: Scenario) -> str | None:
    """The export file for the scenario's router, or ``None`` when a plain Service does the same."""
    kind = scenario.router.kind
    if kind == "prefix_aware":
        return "inferencepool.yaml"
    if kind == "random":
        return None
    return "destinationrule.yaml"


def service_host(target: DeployTarget) -> str:
    """The pods' Service, which the DestinationRule applies to (a Service named as the Deployment)."""
    return f"{target.name}.{target.namespace}.svc.cluster.local"


def epp_name(target: DeployTarget) -> str:
    """The endpoint picker's Service (and its ConfigMap's prefix)."""
    return f"{target.name}-epp"


def _seconds(value: float) -> str:
    """A duration as Istio takes it (``1h/1m/1s/1ms``): whole seconds, else milliseconds."""
    ms = round(value * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def outlier_detection(router: Router) -> dict[str, Any]:
    """The plan's outlier ejection as Istio's ``outlierDetection``. Its percent is an int32 in Istio (rounded
    here; :func:`routing_notes` says when that changed it) and its ``max_ejection_s`` cannot be set (Envoy's
    300 s applies)."""
    e = router.outlier_ejection
    assert e is not None
    if e.count_answered_5xx:
        counts: dict[str, Any] = {"consecutive5xxErrors": e.consecutive_failures}
    else:  # only the proxy's own failures: Istio enforces consecutive_5xx only when it is above 0
        counts = {"consecutive5xxErrors": 0, "splitExternalLocalOriginErrors": True,
                  "consecutiveLocalOriginFailures": e.consecutive_failures}
    interval = ENVOY_INTERVAL_S if e.interval_s is None else e.interval_s  # Envoy's sweeps; the plan's if it set them
    return {**counts, "interval": _seconds(interval),
            "baseEjectionTime": _seconds(e.base_ejection_s), "maxEjectionPercent": round(e.max_ejection_percent),
            "minHealthPercent": PANIC_PERCENT}


def _one_host_note(scenario: Scenario) -> str | None:
    """Where the plan's ``always_eject_one_host`` ejected a pod that the DestinationRule's percentage would not:
    Istio cannot set the option, so a Service with fewer pods than :func:`fewest_ejecting` ejects none."""
    e = scenario.router.outlier_ejection
    assert e is not None
    written = round(e.max_ejection_percent)
    floor = max(min_pods(scenario), 1)
    if not e.always_eject_one_host or ejects_one_of(written, floor):
        return None
    least = fewest_ejecting(written)
    most = max_pods(scenario)
    fleet = f"{floor} pods" if most == floor else f"{floor} to {most} pods"
    below = ("never, at 0 %" if least is None else
             f"none while the Service has fewer than {least} pods (one failing pod of {least - 1} is "
             f"{100.0 / (least - 1):.3g} % of them)")
    return (f"the plan ejected a failing pod even where `maxEjectionPercent: {written}` allows none "
            "(`router.outlier_ejection.always_eject_one_host`, on by default in capsim). Istio's DestinationRule "
            "cannot set that Envoy option, and Envoy since 1.27 ejects a pod only if, with it, at most "
            f"{written} % of the pods are out: {below}; the plan ran {fleet}. To eject one pod at {floor}, plan "
            f"and write `max_ejection_percent: {fewest_percent(floor)}`, or plan with `always_eject_one_host: "
            "false` to see the Service without ejection (docs/studies.md, \"Envoy's own default\")")


def build_destination_rule(scenario: Scenario, target: DeployTarget) -> dict[str, Any]:
    """An Istio DestinationRule that balances over the pods as the plan's router did."""
    r = scenario.router
    if r.kind == "session_affinity":
        balancer: dict[str, Any] = {"consistentHash": {"httpHeaderName": SESSION_HEADER}}
    elif r.kind in _SIMPLE:
        balancer = {"simple": _SIMPLE[r.kind]}
    else:
        raise ValueError(f"router.kind {r.kind!r} has no DestinationRule (see routing_file)")
    policy: dict[str, Any] = {"loadBalancer": balancer}
    if r.ejects:
        policy["outlierDetection"] = outlier_detection(r)
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": target.metadata(),
            "spec": {"host": service_host(target), "trafficPolicy": policy}}


def endpoint_picker_config(router: Router) -> dict[str, Any]:
    """The endpoint picker's plugins: the three scorers at the plan's weights (a zero weight leaves the scorer
    out) and the max-score picker, in one scheduling profile."""
    weights = [("prefix-cache-scorer", router.prefix_weight), ("queue-scorer", router.queue_weight),
               ("kv-cache-utilization-scorer", router.kv_cache_weight)]
    # the picker takes a weight as a float64 (an int in its first releases): whole weights are written as ints
    used = [(name, int(w) if float(w).is_integer() else w) for name, w in weights if w > 0]
    return {"apiVersion": "inference.networking.x-k8s.io/v1alpha1", "kind": "EndpointPickerConfig",
            "plugins": [{"type": name} for name, _ in used] + [{"type": "max-score-picker"}],
            "schedulingProfiles": [{"name": "default", "plugins": [
                *({"pluginRef": name, "weight": w} for name, w in used), {"pluginRef": "max-score-picker"}]}]}


def build_inference_pool(scenario: Scenario, target: DeployTarget) -> list[dict[str, Any]]:
    """The endpoint picker's ConfigMap and the InferencePool over the pods (the pods' label, their port)."""
    from capsim.export.writer import dump_yaml

    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": target.metadata(f"{epp_name(target)}-config"),
              "data": {EPP_CONFIG_FILE: dump_yaml(endpoint_picker_config(scenario.router))}}
    pool = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": target.metadata(),
            "spec": {"selector": {"matchLabels": pod_labels(target)}, "targetPorts": [{"number": target.port}],
                     "endpointPickerRef": {"kind": "Service", "name": epp_name(target), "port": {"number": EPP_PORT},
                                           "failureMode": "FailClose"}}}
    return [config, pool]


def build_routing(scenario: Scenario, target: DeployTarget) -> list[dict[str, Any]]:
    """The objects of :func:`routing_file` (empty for ``random``)."""
    name = routing_file(scenario)
    if name is None:
        return []
    if name == "inferencepool.yaml":
        return build_inference_pool(scenario, target)
    return [build_destination_rule(scenario, target)]


def routing_notes(scenario: Scenario, target: DeployTarget) -> list[str]:
    """What the routing file needs besides itself, and where it cannot say what the plan assumed."""
    r = scenario.router
    notes: list[str] = []
    if routing_file(scenario) == "destinationrule.yaml":
        notes.append(f"`destinationrule.yaml` applies to the Service `{service_host(target)}` (a Service named as the "
                     "Deployment, selecting its pods) and needs Istio's sidecars or its ambient waypoint in front "
                     "of the pods")
    if r.kind == "session_affinity":
        notes.append(f"the clients (or the gateway) send each turn's session id in the `{SESSION_HEADER}` header, as "
                     "`capsim loadgen` does: Envoy's ring hash places the sessions by it; when pods come and go "
                     "about one session in N moves, as in the plan. Without Istio: `capsim router --policy "
                     f"session_affinity --pods-from-dns {target.name}-pods.{target.namespace}.svc.cluster.local:"
                     f"{target.port}` behind a headless Service `{target.name}-pods` over the pods hashes sessions "
                     "the same way (rendezvous) and follows the HPA")
    if r.kind == "prefix_aware":
        notes.append(f"`inferencepool.yaml` needs the Gateway API Inference Extension's CRDs, a gateway that "
                     f"supports it, and its endpoint picker running as the Service `{epp_name(target)}` (port "
                     f"{EPP_PORT}) with `--pool-name {target.name}` and `--config-file` pointing at `{EPP_CONFIG_FILE}` "
                     f"from the ConfigMap `{epp_name(target)}-config` (the extension's Helm chart runs it so); the "
                     "picker reads `vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc` from the pods, which "
                     "capsim's pod exports in continuous mode")
    if r.ejects:
        e = r.outlier_ejection
        assert e is not None
        if r.kind == "prefix_aware":
            counts = (f"`consecutive_5xx: {e.consecutive_failures}`" if e.count_answered_5xx else
                      f"`split_external_local_origin_errors: true`, `consecutive_local_origin_failure: "
                      f"{e.consecutive_failures}`, `enforcing_consecutive_5xx: 0`")
            one = (", `always_eject_one_host: true` (Envoy 1.31 or later; without it Envoy ejects no pod while "
                   "that percentage of the pods is under one)") if e.always_eject_one_host else ""
            sweeps = "" if e.interval_s is None else f", `interval: {_seconds(e.interval_s)}`"
            jitter = "" if not e.max_ejection_time_jitter_s else \
                f", `max_ejection_time_jitter: {_seconds(e.max_ejection_time_jitter_s)}`"
            notes.append("the plan ejected failing pods as Envoy's outlier detection does; the InferencePool has no "
                         f"such field, so set it on the gateway (its backend traffic policy) to {counts}, "
                         f"`base_ejection_time: {e.base_ejection_s:g}s`, `max_ejection_percent: "
                         f"{e.max_ejection_percent:g}`{sweeps}{jitter}{one}")
        else:  # the DestinationRule's outlierDetection, where Istio cannot say what the plan assumed
            note = _one_host_note(scenario)
            if note:
                notes.append(note)
            if round(e.max_ejection_percent) != e.max_ejection_percent:
                notes.append(f"Istio takes `maxEjectionPercent` as a whole number: the plan's "
                             f"{e.max_ejection_percent:g} is written as {round(e.max_ejection_percent)}")
            if e.max_ejection_s != ENVOY_MAX_EJECTION_S:
                notes.append(f"the plan capped an ejection at {e.max_ejection_s:g} s; Istio cannot set Envoy's "
                             f"`max_ejection_time`, which stays {ENVOY_MAX_EJECTION_S:g} s")
            if e.max_ejection_time_jitter_s:
                notes.append(f"the plan drew up to {e.max_ejection_time_jitter_s:g} s of jitter for each ejection; "
                             "Istio cannot set Envoy's `max_ejection_time_jitter`, which stays 0: pods ejected "
                             "together return together")
        if e.count_answered_5xx and scenario.state.store == "redis":
            notes.append("the pods answer 503 to every turn while the session store (Redis) is out, and outlier "
                         "detection counts each as a failure: an outage ejects the first pods to fail "
                         f"{e.consecutive_failures} in a row (up to {e.max_ejection_percent:g}% of them) for "
                         f"{e.base_ejection_s:g} s, past its end. `router.outlier_ejection.count_answered_5xx: false` "
                         "counts only refused, reset and timed-out requests (docs/studies.md, \"Tuning\")")
    if r.hold_when_no_pod_s is not None:  # nothing here writes the gateway that holds requests
        notes.append(f"the plan's gateway held a request up to {r.hold_when_no_pod_s:g} s while the Service had no "
                     "ready pod and sent it on when one was: KEDA's HTTP add-on interceptor (Helm "
                     f"`interceptor.replicas.waitTimeout: {r.hold_when_no_pod_s:g}s`, 20 s by default) or Knative's "
                     "activator do that; a plain Service refuses such a request at once")
    return notes

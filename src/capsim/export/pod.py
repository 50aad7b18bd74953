"""The pod's side of an export: the ``CAPSIM_*`` environment as a ConfigMap and the Deployment patch that
mounts it, with the probes and the termination grace the pod's drain needs.

Only variables the pod reads are written: the batcher's settings and the drain timeout are
``capsim.core.service.PodConfig`` fields (read as ``CAPSIM_<FIELD>``), the store URL is
``CAPSIM_REDIS_URL``, and ``CAPSIM_HOST``/``CAPSIM_PORT`` are read by ``capsim serve``, the container's
entry point. ``tests/test_export.py`` reads the ConfigMap back through ``PodConfig.from_env``.
"""

from __future__ import annotations

import math
from typing import Any

from capsim.export.target import DeployTarget
from capsim.model.scenario import Scenario

#: The batcher settings the pod reads, by ``BatchSettings`` field (same names in ``PodConfig``).
POD_BATCH_FIELDS: tuple[str, ...] = (
    "max_batch_size", "max_wait_ms", "queue_capacity", "overflow", "max_concurrent_batches",
)
ENV_PREFIX = "CAPSIM_"
#: The extended resource NVIDIA's device plugin advertises (a container's GPUs come from its node).
GPU_RESOURCE = "nvidia.com/gpu"
#: Probe timings (s). The readiness probe's timeout is above the pod's 2 s store ping.
READINESS_TIMEOUT_S = 3
LIVENESS_PERIOD_S = 10
LIVENESS_FAILURES = 3
#: Seconds on top of the worst-case drain before the kubelet's SIGKILL.
GRACE_MARGIN_S = 5
#: Where the pod's model caches live when the plan keeps them past a container (``pods.restart_startup_s``) or a pod
#: (``pods.node_model_cache``): the volume, its mount, and the variables Hugging Face and vLLM read their caches from
#: (``HF_HUB_CACHE``, the downloaded models, not ``HF_HOME``, which also holds the token file: that stays where it is).
CACHE_VOLUME = "model-cache"
CACHE_MOUNT = "/model-cache"
CACHE_ENV = {"HF_HUB_CACHE": f"{CACHE_MOUNT}/huggingface/hub", "VLLM_CACHE_ROOT": f"{CACHE_MOUNT}/vllm"}
#: The node directory under which ``pods.node_model_cache`` keeps each Deployment's caches (namespace/name below it).
NODE_CACHE_ROOT = "/var/cache/capsim"


def _value(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def pod_env(scenario: Scenario, target: DeployTarget) -> dict[str, str]:
    """The ``CAPSIM_*`` variables for the scenario's batcher, store and drain (ConfigMap values: strings)."""
    env = {ENV_PREFIX + f.upper(): _value(getattr(scenario.batching, f)) for f in POD_BATCH_FIELDS}
    b = scenario.batching
    if b.mode == "continuous":  # the pod's continuous engine with the scenario's limits (docs/continuous.md)
        env[ENV_PREFIX + "BATCH_MODE"] = "continuous"
        for f in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_model_len",
                  "long_prefill_token_threshold"):
            env[ENV_PREFIX + f.upper()] = _value(getattr(b, f))
        env[ENV_PREFIX + "NUM_BLOCKS"] = str(b.kv_cache_blocks())
        # the plan counted prefix hits when caching is on (the simulator's default, as vLLM V1's): so does the pod
        env[ENV_PREFIX + "ENABLE_PREFIX_CACHING"] = _value(b.enable_prefix_caching)
    store = scenario.state.store
    # what the pod does while the store is out (503, or serve its local copies and stay ready), as simulated
    env[ENV_PREFIX + "ON_UNAVAILABLE"] = scenario.state.on_unavailable
    env[ENV_PREFIX + "REDIS_URL"] = target.redis_url if store == "redis" else "memory://"
    # the plan's sliding expiry (state.ttl_s; none: the longest the store takes, a year)
    env[ENV_PREFIX + "SESSION_TTL_S"] = _value(scenario.state.ttl_s if scenario.state.ttl_s else 365 * 86400.0)
    env[ENV_PREFIX + "DRAIN_TIMEOUT_S"] = _value(drain_timeout_s(scenario))
    env[ENV_PREFIX + "HOST"] = "0.0.0.0"  # all interfaces, so the kubelet's probes and the Service reach it
    env[ENV_PREFIX + "PORT"] = str(target.port)
    return env


def drain_timeout_s(scenario: Scenario) -> float:
    """The pod's drain timeout: the scenario's ``pods.termination_grace_s`` (its modelled drain)."""
    return float(scenario.pods.termination_grace_s)


def termination_grace_s(scenario: Scenario) -> int:
    """``terminationGracePeriodSeconds``: uvicorn's graceful shutdown waits up to the drain timeout for
    open requests, then the batcher's close up to the drain timeout again; plus a margin."""
    return math.ceil(2 * drain_timeout_s(scenario)) + GRACE_MARGIN_S


def startup_bound_s(scenario: Scenario) -> float:
    """A cold start's upper bound (s): the constant, the uniform's top, a lognormal's 99.9th percentile."""
    return scenario.pods.startup_s.range_s[1]


def restart_bound_s(scenario: Scenario) -> float:
    """A container restart's upper bound (s), as ``startup_bound_s`` of ``pods.restart_startup_s`` (unset: a
    cold start's)."""
    return scenario.pods.restart_start.range_s[1]


def startup_failure_threshold(scenario: Scenario) -> int:
    """The startup probe's ``failureThreshold``: the one set (``pods.startup_probe.failure_threshold``, simulated
    as set), else enough probes that the slowest start, first or restart, passes whatever the probe's phase."""
    probe = scenario.pods.startup_probe
    if probe.failure_threshold is not None:
        return probe.failure_threshold
    return probe.outlasting(scenario.pods.readiness_probe, max(startup_bound_s(scenario), restart_bound_s(scenario)))


def build_pdb(scenario: Scenario, target: DeployTarget) -> dict[str, Any]:
    """The scenario's PodDisruptionBudget (policy/v1) on the Deployment's pods, which the Deployment patch
    labels ``app.kubernetes.io/name: NAME`` so that its selector finds them."""
    budget = scenario.pods.disruption_budget
    if budget is None:
        raise ValueError("the scenario has no pods.disruption_budget")
    spec: dict[str, Any] = {"selector": {"matchLabels": pod_labels(target)}}
    if budget.min_available is not None:
        spec["minAvailable"] = budget.min_available
    else:
        spec["maxUnavailable"] = budget.max_unavailable
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": target.metadata(), "spec": spec}


def pod_labels(target: DeployTarget) -> dict[str, str]:
    """The label the Deployment patch gives the pods and the PodDisruptionBudget and InferencePool select them by."""
    return {"app.kubernetes.io/name": target.name}


def build_configmap(scenario: Scenario, target: DeployTarget) -> dict[str, Any]:
    """The ConfigMap holding :func:`pod_env`."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": target.metadata(target.configmap_name),
            "data": pod_env(scenario, target)}


def build_deployment_patch(scenario: Scenario, target: DeployTarget) -> dict[str, Any]:
    """A strategic-merge patch for the Deployment: ``envFrom`` the ConfigMap, the port, the probes
    (startup and liveness on /healthz, readiness on /readyz), the GPUs, the termination grace period,
    with ``pods.unreachable_toleration_s`` the node-failure tolerations, with ``pods.strategy: Recreate`` that
    strategy (and ``rollingUpdate: null``, deleting the one the Deployment has: the API refuses both together), with a
    ``pods.rolling_update`` other than Kubernetes' 25% and 25% the Deployment's rolling-update strategy, and its
    ``minReadySeconds`` and a ``progressDeadlineSeconds`` other than 600 as simulated, and the volume of the model's
    caches that its warm starts assume (``cache_volume``)."""
    http = {"port": "http"}
    startup_every = scenario.pods.startup_probe.period(scenario.pods.readiness_probe)
    startup_failures = startup_failure_threshold(scenario)
    container = {
        "name": target.container_name,
        "envFrom": [{"configMapRef": {"name": target.configmap_name}}],
        "ports": [{"name": "http", "containerPort": target.port, "protocol": "TCP"}],
        # /healthz answers once the model is loaded and warmed up: give the cold start its time. The simulated
        # period (pods.startup_probe): the pod is ready at the first that passes (the kubelet then runs the
        # readiness probe at once)
        "startupProbe": {"httpGet": {**http, "path": "/healthz"}, "periodSeconds": startup_every,
                         "failureThreshold": startup_failures},
        # /readyz is false while warming up, while the session store does not answer, and while draining
        # the simulated probe's period and threshold (pods.readiness_probe; Kubernetes defaults 10 s, 3)
        "readinessProbe": {"httpGet": {**http, "path": "/readyz"},
                           "periodSeconds": scenario.pods.readiness_probe.period_s,
                           "timeoutSeconds": READINESS_TIMEOUT_S,
                           "failureThreshold": scenario.pods.readiness_probe.failure_threshold},
        "livenessProbe": {"httpGet": {**http, "path": "/healthz"}, "periodSeconds": LIVENESS_PERIOD_S,
                          "timeoutSeconds": READINESS_TIMEOUT_S, "failureThreshold": LIVENESS_FAILURES},
    }
    # the pod's GPUs (batching.tensor_parallel_size), as planned: the device plugin serves them from one node
    container["resources"] = {"limits": {GPU_RESOURCE: scenario.batching.tensor_parallel_size}}
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(target.port),
                   "prometheus.io/path": "/metrics"}
    template_meta: dict[str, Any] = {"annotations": annotations}
    # the label pdb.yaml and inferencepool.yaml select the pods by (with neither, the pods' labels are left alone)
    spread, zone_spread = scenario.pods.spread, scenario.pods.zone_spread
    if (scenario.pods.disruption_budget is not None or scenario.router.kind == "prefix_aware" or spread is not None
            or zone_spread is not None):
        template_meta["labels"] = pod_labels(target)
    pod_spec: dict[str, Any] = {"terminationGracePeriodSeconds": termination_grace_s(scenario),
                                "containers": [container]}
    tolerations = node_failure_tolerations(scenario)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    # the rules capsim.sim.nodes places by: DoNotSchedule, failed and cordoned nodes not counted
    constraints = []
    for key, sp, min_domains in (
            ("kubernetes.io/hostname", spread, spread and spread.min_nodes),
            ("topology.kubernetes.io/zone", zone_spread, zone_spread and zone_spread.min_zones)):
        if sp is not None:
            constraint: dict[str, Any] = {"maxSkew": sp.max_skew, "topologyKey": key,
                                          "whenUnsatisfiable": sp.when_unsatisfiable, "nodeTaintsPolicy": "Honor",
                                          "labelSelector": {"matchLabels": pod_labels(target)}}
            if min_domains is not None:
                constraint["minDomains"] = min_domains
            constraints.append(constraint)
    if constraints:
        pod_spec["topologySpreadConstraints"] = constraints
    spec: dict[str, Any] = {"template": {"metadata": template_meta, "spec": pod_spec}}
    ru = scenario.pods.rolling_update
    if scenario.pods.strategy == "Recreate":  # null deletes the Deployment's rollingUpdate, which the API refuses then
        spec["strategy"] = {"type": "Recreate", "rollingUpdate": None}
    elif (ru.max_surge, ru.max_unavailable) != ("25%", "25%"):  # the rolling update simulated (Kubernetes' default not)
        spec["strategy"] = {"type": "RollingUpdate",
                            "rollingUpdate": {"maxSurge": ru.max_surge, "maxUnavailable": ru.max_unavailable}}
    if scenario.pods.min_ready_s:
        spec["minReadySeconds"] = scenario.pods.min_ready_s
    if scenario.pods.progress_deadline_s != 600:
        spec["progressDeadlineSeconds"] = scenario.pods.progress_deadline_s
    volume = cache_volume(scenario, target)
    if volume is not None:  # the caches the simulated warm starts assumed, where they outlive what the plan says
        pod_spec["volumes"] = [volume]
        container["volumeMounts"] = [{"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT}]
        container["env"] = [{"name": k, "value": v} for k, v in CACHE_ENV.items()]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": target.name, "namespace": target.namespace},
        "spec": spec,
    }


def cache_volume(scenario: Scenario, target: DeployTarget) -> dict[str, Any] | None:
    """The volume of the model's caches that the plan's warm starts need: with ``pods.node_model_cache`` a hostPath
    (``NODE_CACHE_ROOT``/namespace/name) that outlives the pod, so a new pod on a node that ran the model finds them;
    else with ``pods.restart_startup_s`` an emptyDir, which outlives a container restart in place; else none (every
    start is cold, as planned)."""
    if scenario.pods.node_model_cache:
        path = f"{NODE_CACHE_ROOT}/{target.namespace}/{target.name}"
        return {"name": CACHE_VOLUME, "hostPath": {"path": path, "type": "DirectoryOrCreate"}}
    if scenario.pods.restart_startup_s is not None:
        return {"name": CACHE_VOLUME, "emptyDir": {}}
    return None


def node_failure_tolerations(scenario: Scenario) -> list[dict[str, Any]]:
    """``pods.unreachable_toleration_s`` as the pod's NoExecute tolerations of an unreachable or not-ready
    node (the DefaultTolerationSeconds admission plugin adds its 300 s only to a pod without them); none
    when unset."""
    seconds = scenario.pods.unreachable_toleration_s
    if seconds is None:
        return []
    return [{"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": int(seconds)}
            for key in ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")]

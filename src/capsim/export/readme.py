"""The export folder's README.md: what each file is, how to apply it, and the simulated numbers behind it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from capsim.export.analysis import ANALYSIS_FILE
from capsim.export.keda import NOT_WITH_KEDA
from capsim.export.nodepool import NODEPOOL_FILE
from capsim.export.pod import (
    CACHE_ENV,
    CACHE_MOUNT,
    cache_volume,
    drain_timeout_s,
    restart_bound_s,
    startup_bound_s,
    termination_grace_s,
)
from capsim.export.routing import SESSION_HEADER, epp_name, routing_file, routing_notes
from capsim.export.target import DeployTarget
from capsim.model.scenario import DCGM_METRIC_KINDS, POD_METRIC_ALIASES, Scenario, TemplateBatching
from capsim.policy.keda import release_at_least
from capsim.studies.checks import Finding

#: Each file of the folder and what it is, in the order to apply them.
FILES: dict[str, str] = {
    "configmap.yaml": "ConfigMap `{cm}`: the batcher, session-store and drain settings as the `CAPSIM_*` "
                      "environment the pod reads",
    "deployment-patch.yaml": "strategic-merge patch for Deployment `{name}`: `envFrom` the ConfigMap, port "
                             "`http` ({port}), startup/liveness probes on `/healthz`, readiness on `/readyz`, "
                             "`terminationGracePeriodSeconds: {grace}`",
    "prometheus-adapter.yaml": "ConfigMap `prometheus-adapter` (namespace `{adapter_ns}`): the adapter rules that "
                               "serve the pods' series as the Pods metric{s} {metrics}",
    "hpa.yaml": "autoscaling/v2 HorizontalPodAutoscaler `{name}`: the metric and target, min/max replicas and "
                "behavior that were simulated",
    "keda-scaledobject.yaml": "KEDA ScaledObject `{name}`: the alternative to `hpa.yaml` + the adapter, one "
                              "Prometheus trigger per metric on the same query",
}
#: the KEDA ScaledObject of a scenario with ``autoscaler.keda`` (no hpa.yaml, no adapter rules)
KEDA_FILE = ("keda-scaledobject.yaml", "KEDA ScaledObject `{name}`: the plan's autoscaler, one Prometheus trigger "
             "per metric, KEDA's polling, cooldown and activation as simulated (KEDA creates the HPA)")
#: written for a continuous-batching scenario only
PDB_FILE = ("pdb.yaml", "PodDisruptionBudget on the pods (the patch labels them `app.kubernetes.io/name: "
            "{name}`): cluster-autoscaler drains a node only when evicting its pods keeps it, as simulated")
VLLM_ARGS_FILE = ("vllm-args.yaml", "the same engine settings as `vllm serve` arguments, for a Deployment that "
                  "runs vLLM instead of capsim's pod (not applied by kubectl: the container's `args`)")
#: written when the plan's router is not random (capsim.export.routing)
ROUTING_FILES = {
    "destinationrule.yaml": "Istio DestinationRule on the pods' Service: the load balancer the plan's router "
                            "assumed ({balancer}){ejection}",
    "inferencepool.yaml": "ConfigMap `{epp}-config` (the endpoint picker's scorers at the plan's weights) and the "
                          "Gateway API Inference Extension's InferencePool `{name}` over the pods",
}
#: written when a resume of pods.rollouts checks the canary's metrics (capsim.export.analysis)
ANALYSIS_FILE_TEXT = ("Argo Rollouts AnalysisTemplate `{name}-canary` (one per checked resume: `-canary-N` when "
                      "several): the canary checks as simulated, one metric per limit (interval, initialDelay, count, "
                      "failureLimit, the queries); its header says what differs from the simulation")
#: how the README's steps name each quantity a canary's limit reads (``CANARY_LIMITS``), and its unit
_QUANTITY_WORDS = {"ttft_p99_s": ("their p99 TTFT", " s"), "itl_mean_s": ("their mean inter-token latency", " s"),
                   "error_rate": ("the share of their requests ended with an error", "")}
#: the continuous engine's limits, as the pod reads them and the plan simulated them
CONTINUOUS_FIELDS = ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_model_len",
                     "long_prefill_token_threshold", "enable_prefix_caching")

SLO_MISSED = ("The simulated run does not meet the SLO: these settings are not a safe choice "
              "(`capsim tune` searches for ones that are).")

#: Summary fields shown, with their labels and units.
_NUMBERS: tuple[tuple[str, str], ...] = (
    ("ttft_p50_s", "TTFT p50 (s)"), ("ttft_p99_s", "TTFT p99 (s)"),
    ("ttft_p99_warm_s", "TTFT p99 of the requests that found a pod (s)"),
    ("longest_wake_s", "longest first token of a request that came at zero pods (s)"), ("e2e_p99_s", "end-to-end p99 (s)"),
    ("error_rate", "error rate"), ("throughput_per_s", "throughput (requests/s)"),
    ("mean_batch_size", "mean batch size"), ("max_replicas", "most replicas"), ("scale_events", "scale events"),
    ("gpu_hours", "GPU hours held by pods"), ("node_gpu_hours", "GPU hours of the nodes (created to removed)"),
    ("cost", "cost (as the cluster bills)"), ("lost_sessions", "lost sessions"),
    ("lost_turns", "turns lost sessions never sent"), ("session_failure_rate", "failed or lost sessions (share)"),
    ("slo_met", "SLO met"),
)


def render_readme(scenario: Scenario, target: DeployTarget, *, numbers: Mapping[str, Any] | None,
                  findings: Sequence[Finding], forced: bool = False) -> str:
    """The README text. ``numbers`` is ``{"summary": {...}, "provenance": {...}}`` as ``capsim simulate
    --out`` writes summary.json (``None``: say that no simulation backs the files)."""
    auto = scenario.autoscaler
    assert auto is not None
    metrics = [m.name for m in auto.to_hpa().metrics]
    fmt = {"cm": target.configmap_name, "name": target.name, "port": target.port,
           "grace": termination_grace_s(scenario), "adapter_ns": target.adapter_namespace,
           "s": "s" if len(metrics) > 1 else "", "metrics": ", ".join(f"`{m}`" for m in metrics)}
    title = scenario.name or (scenario.source.stem if scenario.source else "scenario")
    lines = [f"# Deploy files for {title}", ""]
    lines += [f"Written by `capsim export` from `{scenario.source or '<in memory>'}` for Deployment "
              f"`{target.name}` in namespace `{target.namespace}`.", ""]
    lines += ["## Files", "", "| file | what it is |", "|---|---|"]
    files = dict(FILES)
    keda = auto.keda
    if keda is not None:  # KEDA creates the HPA and queries Prometheus itself
        files = {k: v for k, v in files.items() if k not in NOT_WITH_KEDA}
        files[KEDA_FILE[0]] = KEDA_FILE[1]
    if scenario.batching.mode == "continuous":
        files[VLLM_ARGS_FILE[0]] = VLLM_ARGS_FILE[1]
    if scenario.pods.disruption_budget is not None:
        files[PDB_FILE[0]] = PDB_FILE[1]
    if scenario.pods.check_times():  # a resume with a metric check: its AnalysisTemplate
        files[ANALYSIS_FILE] = ANALYSIS_FILE_TEXT
    karpenter = scenario.cluster is not None and scenario.cluster.karpenter is not None
    if karpenter:
        files[NODEPOOL_FILE] = ("a `karpenter.sh/v1` NodePool: the GPU limit and the disruption settings the plan "
                                "simulated (set its node class for your cloud)")
    routing_name = routing_file(scenario)
    if routing_name is not None:
        files[routing_name] = ROUTING_FILES[routing_name]
        r = scenario.router
        fmt.update(epp=epp_name(target),
                   balancer={"round_robin": "`ROUND_ROBIN`", "least_outstanding": "`LEAST_REQUEST`",
                             "session_affinity": f"a consistent hash of the `{SESSION_HEADER}` header"}.get(r.kind, ""),
                   ejection=", with its outlier detection" if r.ejects else "")
    lines += [f"| `{f}` | {text.format(**fmt)} |" for f, text in files.items()]
    lines += ["", "## Apply", "", "```sh",
              "kubectl apply -f configmap.yaml" + (" -f pdb.yaml" if scenario.pods.disruption_budget else ""),
              f"kubectl -n {target.namespace} patch deployment {target.name} --patch-file deployment-patch.yaml",
              *(["# KEDA (installed in the cluster) creates the HPA; delete any other HPA on the Deployment",
                 "kubectl apply -f keda-scaledobject.yaml"] if keda is not None else
                ["# either the HPA, fed by prometheus-adapter (merge the rules into the adapter's own config.yaml",
                 "# if it has some, then restart the adapter):",
                 "kubectl apply -f prometheus-adapter.yaml -f hpa.yaml",
                 "# or KEDA instead (never both: two controllers would fight over the replica count):",
                 "# kubectl apply -f keda-scaledobject.yaml"]),
              *(["# the nodes' NodePool (Karpenter installed; set its nodeClassRef first)",
                 f"kubectl apply -f {NODEPOOL_FILE}"] if karpenter else []),
              *(["# the router the plan assumed (what it needs in the cluster: below, under the router)",
                 f"kubectl apply -f {routing_name}"] if routing_name is not None else []),
              "```", ""]
    lines += _deploys(scenario, target)
    lines += _settings(scenario, auto)
    lines += _numbers(scenario, numbers)
    lines += _assumptions(scenario, auto, target)
    lines += ["## Checks", ""]
    if findings:
        lines += [f"- {'**FAIL**' if f.level == 'fail' else 'warn'} `{f.path}`: {f.message}" for f in findings]
        if forced:
            lines += ["", "**Written with `--force` although a check failed.**"]
    else:
        lines.append("`capsim check` found no problems.")
    return "\n".join(lines) + "\n"


#: a template's engine flags (``pods.rollouts[].batching``) as ``vllm serve`` arguments
TEMPLATE_FLAGS = {"max_num_seqs": "--max-num-seqs", "max_num_batched_tokens": "--max-num-batched-tokens",
                  "gpu_memory_utilization": "--gpu-memory-utilization", "num_blocks": "--num-gpu-blocks-override",
                  "max_model_len": "--max-model-len", "long_prefill_token_threshold": "--long-prefill-token-threshold"}


def template_vllm_args(flags: TemplateBatching) -> list[str]:
    """The arguments a deploy's new template changes (``pods.rollouts[].batching``), vLLM's names, in its order."""
    given = flags.model_dump(exclude_none=True).items()
    return [x for k, v in given for x in (TEMPLATE_FLAGS[k], str(v) if isinstance(v, int) else f"{v:g}")]


def _deploys(scenario: Scenario, target: DeployTarget) -> list[str]:
    """How the plan's deploys were simulated (``pods.rollouts``) and the deploy pipeline's undo it assumed
    (``pods.undo_after_s``: ``kubectl rollout status --timeout``; ``pods.undo_on_deadline``: at
    progressDeadlineSeconds), as the commands a pipeline runs."""
    pods = scenario.pods
    if not pods.template_changes and pods.undo_after_s is None and not pods.undo_on_deadline:
        return []
    ru = pods.rolling_update
    how = ("`Recreate` (every old pod goes before a new one starts: no pod serves meanwhile)"
           if pods.strategy == "Recreate" else f"a rolling update of maxSurge {ru.max_surge}, maxUnavailable "
           f"{ru.max_unavailable}")
    ref = f"-n {target.namespace} deployment/{target.name}"
    lines = ["## Deploying a new version", "", f"The plan's deploys were simulated as {how}, with "
             f"`progressDeadlineSeconds: {pods.progress_deadline_s}`"
             + (f" and `minReadySeconds: {pods.min_ready_s}`" if pods.min_ready_s else "") + " (the patch sets them)."]
    for ro in pods.rollouts:  # a deploy of engine flags: the arguments its template changes
        if ro.batching is not None:
            lines.append(f"The deploy at {ro.at_s:g} s changes the engine's arguments to `"
                         f"{' '.join(template_vllm_args(ro.batching))}`, the others as in `vllm-args.yaml`.")
    if pods.undo_after_s is not None or pods.undo_on_deadline:
        timeout = f" --timeout={pods.undo_after_s:g}s" if pods.undo_after_s is not None else ""
        when = ([f"not done {pods.undo_after_s:g} s after it began"] if pods.undo_after_s is not None else []) + (
            [f"reported stalled ({pods.progress_deadline_s} s without progress)"] if pods.undo_on_deadline else [])
        lines += ["The deploy pipeline was assumed to undo a rollout " + " or ".join(when) + ":", "", "```sh",
                  f"kubectl set image {ref} ...   # or apply the new template",
                  f"kubectl rollout status {ref}{timeout} || kubectl rollout undo {ref}", "```"]
    elif any(ro.undo_if_restarted or ro.metrics_checked for ro in pods.rollouts):
        lines.append("The deploy pipeline was assumed to undo a rollout only at its canary check (below).")
    else:
        lines.append("No automatic undo was simulated: a broken deploy stays until `kubectl rollout undo`.")
    if pods.pauses():  # a canary by pause: the steps as simulated, in order
        steps = ["", "The plan paused its rollouts (`kubectl rollout pause`: a canary of the pods the rollout had "
                 "made by then, beside the old ones). Paused, Kubernetes checks no progress deadline and kubectl "
                 "refuses `kubectl rollout undo`: resume first. The steps as simulated, in order:", "", "```sh"]
        for ro in sorted(pods.rollouts, key=lambda ro: ro.at_s):
            if ro.action == "deploy":
                flags = "" if ro.batching is None else f" (vLLM arguments: {' '.join(template_vllm_args(ro.batching))})"
                steps += [f"# at {ro.at_s:g} s: the new template{flags}", f"kubectl set image {ref} ..."]
            elif ro.undo_if_restarted or ro.metrics_checked:
                restart = (["a container of the new ReplicaSet's pods exited (RESTARTS above 0, or CrashLoopBackOff)"]
                           if ro.undo_if_restarted else [])
                slow = []  # what fails a measurement ({w}: where its window is said), one per limit
                for _, quantity, kind, x in ro.limits():
                    what, unit = _QUANTITY_WORDS[quantity]
                    slow.append(f"{what}{{w}} is " + (f"over {x:g}{unit}" if kind == "limit" else
                                                      f"over {x:g} times the old pods'" if kind == "times" else
                                                      f"more than {x:g} above the old pods'"))
                if ro.metrics_checked:
                    slow.append("they answered nothing then")
                window = f" over the last {ro.check_window_s:g} s (from {max(ro.at_s - ro.check_window_s, 0):g} s)"
                if ro.restart_poll_s is not None:
                    steps += [f"# meanwhile, every {ro.restart_poll_s:g} s of the pause: at a restart of the new "
                              "ReplicaSet's pods (RESTARTS above 0, or CrashLoopBackOff), resume and undo at once",
                              f"kubectl get pods -n {target.namespace} -l pod-template-hash=<the new ReplicaSet's>"]
                if ro.check_interval_s is not None:  # an Argo Rollouts analysis' interval, initialDelay, failureLimit
                    began = next(a for a, b in pods.pauses() if b == ro.at_s)
                    steps += [f"# meanwhile, from {began + ro.check_initial_delay_s:g} s, every {ro.check_interval_s:g} "
                              f"s of the pause: a measurement over the last {ro.check_window_s:g} s (the "
                              "queries below), which fails if " + ", or ".join(x.format(w="") for x in slow)
                              + "; each limit counts its own failures (a metric of an Argo Rollouts analysis each); at "
                              f"the measurement that makes one limit's failures more than {ro.check_failure_limit}, "
                              "resume and undo at once (an Argo Rollouts analysis: interval "
                              f"{ro.check_interval_s:g}s, initialDelay {ro.check_initial_delay_s:g}s, failureLimit "
                              f"{ro.check_failure_limit})"]
                    why = [*restart, f"the last measurement,{window}, makes one limit's failures more than "
                           f"{ro.check_failure_limit}"]
                else:
                    why = [*restart, *(x.format(w=window) for x in slow)]
                steps += [f"# at {ro.at_s:g} s: the canary check; undo if " + ", or ".join(why),
                          f"kubectl rollout resume {ref}", f"kubectl rollout undo {ref}   # only if the check failed"]
                w = f"{ro.check_window_s:g}s"  # the queries' range
                if ro.ttft_checked:
                    steps += ["# the p99: histogram_quantile(0.99, sum by (le) (increase("
                              f"vllm:time_to_first_token_seconds_bucket{{pod=~\"<the pods>\"}}[{w}])))"]
                if ro.error_checked and ro.error_rate_source == "gateway":
                    sel = 'reporter="source",destination_version="<the new template\'s>"'
                    steps += ["# the error rate as the gateway counts it (a draining pod's refusals and a crash's "
                              "resets included; the template's pods labelled with their version): sum(increase("
                              f"istio_requests_total{{{sel},response_code=~\"4..|5..\"}}[{w}])) / sum(increase("
                              f"istio_requests_total{{{sel}}}[{w}]))"]
                elif ro.error_checked:
                    steps += ["# the error rate as the pods' own servers count it (without a draining pod's refusals "
                              "and a crash's resets): sum(increase(http_requests_total{status=~\"4xx|5xx\",pod=~"
                              f"\"<the pods>\"}}[{w}])) / sum(increase(http_requests_total{{pod=~\"<the pods>\"}}"
                              f"[{w}])) (vLLM's server and capsim serve export it)"]
                if ro.undo_if_error_rate_over_baseline_by is not None:
                    steps += ["# against the old pods': the same share over the old template's pods, subtracted from "
                              f"the canary's (an Argo Rollouts analysis: successCondition result[0] <= "
                              f"{ro.undo_if_error_rate_over_baseline_by:g})"]
                if ro.itl_checked:
                    steps += ["# the mean inter-token latency: sum(increase(vllm:inter_token_latency_seconds_sum"
                              f"{{pod=~\"<the pods>\"}}[{w}])) / sum(increase(vllm:inter_token_latency_seconds_count"
                              f"{{pod=~\"<the pods>\"}}[{w}]))"]
            else:
                steps += [f"# at {ro.at_s:g} s", f"kubectl rollout {ro.action} {ref}"]
        lines += [*steps, "```"]
        if any(ro.metrics_checked for ro in pods.rollouts):
            lines += ["", f"`{ANALYSIS_FILE}` holds the same checks as Argo Rollouts AnalysisTemplates, one metric per "
                      "limit, for a pipeline that runs them as an AnalysisRun (or a Rollout's canary analysis) with "
                      "the new and the old ReplicaSet's pod-template-hash as args; its header says when the "
                      "simulation measured and what Argo does otherwise."]
            lines += ["", "Start a latency check's window once the canary's pods are ready (the pause, plus a new pod's "
                      "image pull, cold start and readiness probe): a window over their first requests reads how the "
                      "router treats new pods, not the version (`capsim check`: canary-window-before-ready)."]
    return [*lines, ""]


def _settings(scenario: Scenario, auto: Any) -> list[str]:
    b = scenario.batching
    lines = ["## Settings", "", "| setting | value |", "|---|---|"]
    if b.mode == "continuous":  # the pod's continuous engine (CAPSIM_BATCH_MODE=continuous), as simulated
        lines += ["| `batching.mode` | continuous |"]
        lines += [f"| `batching.{k}` | {getattr(b, k)} |" for k in CONTINUOUS_FIELDS]
        lines += [f"| KV-cache blocks | {b.kv_cache_blocks()} |",
                  f"| `batching.queue_capacity` | {b.queue_capacity} |"]
    else:
        lines += [f"| `batching.{k}` | {getattr(b, k)} |" for k in
                  ("max_batch_size", "max_wait_ms", "queue_capacity", "overflow", "max_concurrent_batches")]
    lines.append(f"| `batching.tensor_parallel_size` (GPUs a pod) | {b.tensor_parallel_size} |")
    for i, m in enumerate(auto.to_hpa().metrics):
        lines.append(f"| HPA metric {i} | `{m.name}`, {m.target_type} {m.target:g} |")
    if auto.keda is not None:
        k = auto.keda
        lines += [f"| KEDA `minReplicaCount` / `maxReplicaCount` | {auto.min_replicas} / {auto.max_replicas} |",
                  f"| KEDA `pollingInterval` / `cooldownPeriod` | {k.polling_interval_s} s / {k.cooldown_period_s} s |"]
        if k.initial_cooldown_period_s is not None:
            lines.append(f"| KEDA `initialCooldownPeriod` | {k.initial_cooldown_period_s} s: until a trigger is first "
                         "active after the deploy, the Deployment goes to zero no sooner |")
        lines += [f"| KEDA `activationThreshold` of `{m}` | {v:g} |" for m, v in k.activation.items()]
        lines.append(f"| KEDA release simulated | {k.release}"
                     f"{' and later' if release_at_least(k.release, '2.18') else ' and earlier' if k.release == '2.16' else ''}"
                     " |")
        names = [m.name for m in auto.to_hpa().metrics]

        def which(some: frozenset[str]) -> str:
            """The triggers a per-trigger setting covers, in words (in the metrics' order)."""
            return "every trigger" if len(some) == len(names) else ", ".join(f"`{m}`" for m in names if m in some)

        if cached := k.cached(names):
            lines.append(f"| KEDA `useCachedMetrics` ({which(cached)}) | true: the HPA reads the value of KEDA's "
                         f"last poll, refreshed every {k.polling_interval_s} s |")
        if errs := frozenset(names) - k.null_as_zero(names):
            lines.append(f"| KEDA `ignoreNullValues` ({which(errs)}) | false: an empty result (no pod with a value, "
                         "a rate without two fresh samples, as after a Prometheus outage) is an error, not 0 |")
        if k.fallback is not None:
            lines.append(f"| KEDA `fallback` (`failureThreshold` / `replicas` / `behavior`) | "
                         f"{k.fallback.failure_threshold} / {k.fallback.replicas} / {k.fallback.behavior} |")
        if (sm := k.scaling_modifiers) is not None:
            lines.append(f"| KEDA `scalingModifiers` | `{sm.formula}`, {sm.metric_type} {sm.target:g}, activation "
                         f"above {sm.activation_target:g}: the HPA scales on this composite alone (the metrics' own "
                         f"targets above are each trigger's threshold, unused by it) |")
    else:
        lines.append(f"| `minReplicas` / `maxReplicas` | {auto.min_replicas} / {auto.max_replicas} |")
    lines += [
              f"| session store | {scenario.state.store} |",
              f"| drain timeout / grace period | {drain_timeout_s(scenario):g} s / {termination_grace_s(scenario)} s |"]
    pods = scenario.pods
    if pods.spread is not None:  # written into the patch's topologySpreadConstraints
        lines.append(f"| spread over nodes (`topologySpreadConstraints`) | maxSkew {pods.spread.max_skew}"
                     + (f", minDomains {pods.spread.min_nodes}" if pods.spread.min_nodes is not None else "")
                     + (", ScheduleAnyway" if pods.spread.when_unsatisfiable == "ScheduleAnyway" else "") + " |")
    if pods.zone_spread is not None:
        zs = pods.zone_spread
        lines.append(f"| spread over zones (`topologySpreadConstraints`) | maxSkew {zs.max_skew}"
                     + (f", minDomains {zs.min_zones}" if zs.min_zones is not None else "")
                     + (", ScheduleAnyway" if zs.when_unsatisfiable == "ScheduleAnyway" else "") + " |")
    if pods.unreachable_toleration_s is not None:  # the patch's NoExecute tolerations
        lines.append(f"| evicted from a NotReady node after (`tolerationSeconds`) | {pods.unreachable_toleration_s} s |")
    if pods.spread is not None or pods.zone_spread is not None:
        lines += ["", "The spreads count, as the simulator does, only the nodes the pods can run on (the GPU nodes; "
                  "failed and cordoned ones not at all). Kubernetes counts every node that passes the pods' node "
                  "affinity: if CPU or system nodes do, pin the pods to the GPU node group with a `nodeSelector` "
                  "(for example `nvidia.com/gpu.present: \"true\"`, set by NVIDIA's GPU feature discovery), "
                  "or those nodes count as domains with no pod and the skew keeps the pods off the GPU nodes."]
    if b.mode == "continuous":
        lines += ["", "The pod runs its continuous engine with these limits (`configmap.yaml`); a vLLM "
                  "Deployment takes the same as the arguments in `vllm-args.yaml`."]
    if b.tensor_parallel_size > 1:
        lines += ["", f"Each pod holds {b.tensor_parallel_size} GPUs (the patch requests them). capsim's own pod "
                  "runs its model on one device and does not split it: the plan's step times are those of an engine "
                  f"that does, such as vLLM with `--tensor-parallel-size {b.tensor_parallel_size}`."]
    return [*lines, ""]


def _numbers(scenario: Scenario, numbers: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Simulated numbers behind the choice", ""]
    if numbers is None:
        return [*lines, "No simulation was run for this export (`--no-simulate`).", ""]
    summary: Mapping[str, Any] = numbers.get("summary", {})
    prov: Mapping[str, Any] = numbers.get("provenance", {})
    slo = scenario.slo
    lines += [f"capsim {prov.get('capsim_version', '?')}, seed {prov.get('seed', '?')}, "
              f"profile `{prov.get('profile') or scenario.service.kind}`, horizon {scenario.horizon_s:g} s "
              f"(first {scenario.warmup_s:g} s not measured). SLO: TTFT p99 <= {slo.ttft_p99_s:g} s"
              + (f" for the requests that found a pod, the first token within {slo.max_wake_s:g} s for those that "
                 "came at zero pods" if slo.max_wake_s is not None else "")
              + f", error rate <= {slo.max_error_rate:g}."
              + (f" Simulated on pods {scenario.service.slowdown:g} times slower than measured (`service.slowdown`: "
                 "a margin on the pods' speed)." if scenario.service.slowdown != 1.0 else ""),
              "", "| metric | simulated |", "|---|---|"]
    for key, label in _NUMBERS:
        if key in summary and not (isinstance(summary[key], float) and math.isnan(summary[key])):
            v = summary[key]
            lines.append(f"| {label} | {v:.4g} |" if isinstance(v, float) else f"| {label} | {v} |")
    if summary.get("slo_met") is False:
        lines += ["", f"**{SLO_MISSED}**"]
    return [*lines, ""]


def _query(auto: Any, name: str) -> str:
    """How the adapter reads metric ``name`` (as in the exported rules)."""
    query, window_s, quantile = auto.query_of(name)
    if query == "instant":
        return f"`{name}` its newest sample"
    if query == "histogram_quantile":
        return f"`{name}` the {quantile:g} quantile over {window_s:g} s"
    return f"`{name}` {query} over {window_s:g} s"


def _dcgm_assumptions(auto: Any, target: DeployTarget) -> list[str]:
    """What a plan on dcgm-exporter's GPU series assumed of the exporter (none without such a metric)."""
    names = [m.name for m in auto.to_hpa().metrics if POD_METRIC_ALIASES.get(m.name) in DCGM_METRIC_KINDS]
    if not names:
        return []
    ns, pod = target.dcgm_labels
    return [f"- NVIDIA's dcgm-exporter runs on the GPU nodes with its Kubernetes mapping "
            f"(`DCGM_EXPORTER_KUBERNETES=true`), collects every {auto.dcgm_collect_interval_s:g} s "
            f"(`DCGM_EXPORTER_INTERVAL={auto.dcgm_collect_interval_s * 1000:g}`) and exports "
            + ", ".join(f"`{n}`" for n in names)
            + f" (in its collectors' CSV); Prometheus scrapes it every {auto.scrape_interval_s:g} s and its series "
            f"name the GPU's pod in `{ns}` and `{pod}`"
            + (" (a scrape with `honorLabels: true`)" if target.dcgm_honor_labels else
               " (the exporter's Helm chart's default, `serviceMonitor.honorLabels: false`; `capsim export "
               "--dcgm-honor-labels` for `true`)")
            + f"; the GPU utilisation is NVML's over its last {auto.dcgm_util_period_s:g} s before a collection"]


def _keda_assumptions(auto: Any, target: DeployTarget, hold_s: float | None) -> list[str]:
    """What a plan simulated with KEDA assumed of the cluster (none without ``autoscaler.keda``)."""
    if auto.keda is None:
        return []
    lines = [f"- KEDA's operator polls the triggers every {auto.keda.polling_interval_s} s and takes the Deployment "
             f"from zero to {max(auto.min_replicas, 1)} on an active trigger"
             + (f", and to zero {auto.keda.cooldown_period_s} s after the last poll that found one"
                + (" (`idleReplicaCount: 0`, whatever `minReplicaCount` is)" if auto.min_replicas > 0 else "")
                if auto.goes_to_zero else "")
             + "; between those the HPA it creates scales as simulated"]
    if auto.keda.cron:
        assert auto.keda.clock_start is not None
        lines.append(f"- the run started at {auto.keda.clock_start.isoformat()}, the wall-clock time its `cron` "
                     "triggers were read at: " + "; ".join(
                         f"`{c.desired_replicas}` replicas from `{c.start}` to `{c.end}` ({c.timezone})"
                         for c in auto.keda.cron)
                     + " (KEDA answers them itself: they hold through a Prometheus outage)")
    if auto.can_wake_from_zero:
        lines.append("- the trigger on `capsim_gateway_requests_total` (every request sent to the Service, answered "
                     f"or not) runs `{target.gateway_requests('<window>')}`: it must count requests that find no "
                     "pod (Istio's sidecars report them as 503s); give the query of your gateway's counter with "
                     "`capsim export --gateway-query`")
    fb = auto.keda.fallback
    holds = fb is not None and fb.replicas > 0  # a fallback that holds pods
    pods = f"{fb.replicas} pod{'s' if fb.replicas != 1 else ''}" if holds else ""
    if auto.keda.release == "2.16":  # the operator acts on a poll in error
        if holds:
            lines.append(f"- while Prometheus answers no query KEDA holds {pods} (`fallback`: its operator at each "
                         f"poll, the HPA after {fb.failure_threshold} failed reads of a metric; KEDA 2.16 and "
                         "earlier, as simulated: from 2.17 only the HPA applies it, and never from zero)")
        elif auto.goes_to_zero:
            lines.append(f"- no `fallback`: if Prometheus stops answering, KEDA (2.16 and earlier, as simulated) "
                         f"finds no trigger active and takes the Deployment to zero {auto.keda.cooldown_period_s} s "
                         "after the last poll that found one, traffic or not (kedacore/keda#965); simulate it with "
                         "`faults.metrics_outages`")
    else:  # 2.17 on: a poll in error changes nothing
        if holds:
            held = pods if fb.behavior == "static" else f"`{fb.behavior}` of {pods}"
            lines.append(f"- while Prometheus answers no query the HPA that KEDA creates goes to {held} after "
                         f"{fb.failure_threshold} failed reads of a metric (`fallback`, through the HPA's behavior), "
                         "and KEDA's operator changes nothing (KEDA 2.17 and later, as simulated)")
        if auto.goes_to_zero:
            lines.append("- a Deployment at zero pods when Prometheus stops answering stays at zero until it "
                         "answers again, fallback or not (KEDA 2.17 and later; kedacore/keda#7239): requests "
                         "meanwhile find no pod; simulate it with `faults.metrics_outages`")
            if fb is not None and fb.replicas == 0:
                lines.append(f"- `fallback.replicas: 0`: a poll in error is then an idle one to KEDA's operator "
                             f"(KEDA 2.17 and later, as simulated), so a serving Deployment goes to zero "
                             f"{auto.keda.cooldown_period_s} s after the last poll that found a trigger active "
                             "if Prometheus stops answering, traffic or not")
    if auto.goes_to_zero and hold_s is None:
        lines.append("- at zero pods a request is refused at once: the plan assumed clients that retry as "
                     "simulated (`client` section), not a gateway that holds requests (KEDA's HTTP add-on "
                     "interceptor, Knative's activator: `router.hold_when_no_pod_s`)")
    return lines


def _gpus_per_pod(scenario: Scenario) -> str:
    tp = scenario.batching.tensor_parallel_size
    return "one GPU" if tp == 1 else f"{tp} GPUs on one node (tensor parallel)"


def routing(scenario: Scenario) -> str:
    """How the plan's router (``router.kind``) places requests, and what in a cluster does the same: with
    sessions and prefix caching the router decides the prefill a turn costs, so a plan made with one router
    does not hold behind another (docs/continuous.md: the 70B agents fail a pod crash behind least outstanding
    at 5 pods where session affinity holds at 4)."""
    r = scenario.router
    ejection = r.outlier_ejection
    eject = ("" if ejection is None else
             f", with outlier detection as the plan's (`consecutive_5xx: {ejection.consecutive_failures}`, "
             f"`base_ejection_time: {ejection.base_ejection_s:g}s`, `max_ejection_percent: "
             f"{ejection.max_ejection_percent:g}`"
             + (f", `max_ejection_time_jitter: {ejection.max_ejection_time_jitter_s:g}s`"
                if ejection.max_ejection_time_jitter_s else "")
             + f"{', `always_eject_one_host: true`' if ejection.always_eject_one_host else ''})")
    how = {
        "random": "each request to a pod at random: a ClusterIP Service (kube-proxy) in front of the pods",
        "round_robin": "requests to the pods in turn: Envoy's `ROUND_ROBIN` load balancer (Istio "
                       "`loadBalancer.simple: ROUND_ROBIN`) in front of the pods",
        "least_outstanding": "each request to the pod with the fewest in flight: Envoy's `LEAST_REQUEST` (Istio "
                             f"`loadBalancer.simple: LEAST_REQUEST`) in front of the pods{eject}",
        "session_affinity": "each session's turns to the pod that served its last one (a new session, or one whose "
                            f"pod is gone or draining, {'at random' if r.fallback == 'random' else 'to the pod with the fewest in flight'}): "
                            "`capsim router --policy session_affinity`, or a consistent hash of the session id "
                            "(Envoy `RING_HASH`, Istio `consistentHash.httpHeaderName`), which moves some sessions "
                            "when pods come and go",
        "prefix_aware": "each turn to the pod with the best score of the expected prefix-cache hit, the queue and "
                        f"the free KV cache (weights {r.prefix_weight:g}, {r.queue_weight:g}, {r.kv_cache_weight:g}), "
                        "as the Gateway API Inference Extension's endpoint picker scores them: an `InferencePool` "
                        "over the pods with its prefix-cache, queue and KV-cache scorers" + eject,
    }[r.kind]
    return f"- the router (`router.kind: {r.kind}`): {how}"


def _warm_starts(scenario: Scenario, target: DeployTarget) -> str:
    """The cold start's bound, and the warm starts' with what they need of the model's caches: the volume the
    Deployment patch mounts for them (``cache_volume``; none: every start cold, the probe allowing the cold one)."""
    cold = f"a cold start takes at most {startup_bound_s(scenario):g} s"
    volume = cache_volume(scenario, target)
    if volume is None:
        return f"{cold} (the startup probe allows that)"
    env = ", ".join(f"`{k}={v}`" for k, v in CACHE_ENV.items())
    if "hostPath" in volume:
        which = "container's restart on its node, or a new pod's start on a node that ran the model,"
        keep = (f"outlive the pod on its node: the Deployment patch mounts the node's `{volume['hostPath']['path']}` "
                f"(a hostPath, created as root) at `{CACHE_MOUNT}` and sets {env}. Pod Security's baseline and "
                "restricted levels refuse a hostPath: there, or for a container that runs as another user, give the node "
                "a local PersistentVolume instead; a node whose disk is wiped (a new node, or a reimage) starts cold")
    else:
        which = "container's restart on its node"
        keep = (f"outlive the container: the Deployment patch mounts an emptyDir at `{CACHE_MOUNT}` and sets {env} "
                "(if your image reads its caches elsewhere, point them there), or a restart is a whole cold start")
    return (f"{cold} and a {which} at most {restart_bound_s(scenario):g} s (the startup probe allows both): that needs "
            f"the weights and compile caches to {keep}")


def _assumptions(scenario: Scenario, auto: Any, target: DeployTarget) -> list[str]:
    lines = ["## What the cluster must match for the numbers to hold", "",
             f"- kube-controller-manager: `--horizontal-pod-autoscaler-sync-period={auto.sync_period_s:g}s`, "
             f"`--horizontal-pod-autoscaler-tolerance={auto.tolerance:g}`"
             + ("" if auto.behavior else
                f", `--horizontal-pod-autoscaler-downscale-stabilization={auto.downscale_window_s:g}s`"),
             f"- Prometheus scrapes the pods every {auto.scrape_interval_s:g} s; "
             + ("KEDA's" if auto.keda is not None else "the adapter's")
             + f" answers lag {auto.adapter_lag_s:g} s; its queries: "
             + "; ".join(_query(auto, m.name) for m in auto.to_hpa().metrics),
             *_dcgm_assumptions(auto, target),
             *_keda_assumptions(auto, target, scenario.router.hold_when_no_pod_s),
             f"- {_gpus_per_pod(scenario)} per pod (the Deployment patch requests `nvidia.com/gpu: "
             f"{scenario.batching.tensor_parallel_size}`); {_warm_starts(scenario, target)}"]
    if scenario.cluster is not None:
        c = scenario.cluster
        k = c.karpenter
        lines.append(f"- at most {c.max_gpus} GPUs ("
                     + ("the Karpenter NodePool's `limits`" if k is not None else "cluster-autoscaler's `--gpu-total` maximum")
                     + f"), in whole nodes of {c.node_gpus}, a new node ready in {c.node_provision_s:g} s")
        if k is not None:
            after = "Never" if k.consolidate_after_s is None else f"{k.consolidate_after_s:g}s"
            lines.append(
                f"- Karpenter removes the nodes, not cluster-autoscaler: `{NODEPOOL_FILE}`, with `consolidationPolicy: "
                f"{k.consolidation_policy}`, `consolidateAfter: {after}` and a budget of `nodes: \"{k.budget_nodes}\"` "
                "(its disruption controller polls every 10 s and validates a command 15 s later, as simulated)"
                + ("; consolidation evicts serving pods from a node whose pods fit elsewhere, and they start again "
                   "there" if k.consolidation_policy == "WhenEmptyOrUnderutilized" else "")
                + (f"; drift has its own budget, `nodes: \"{k.drift_budget_nodes}\"` for `reasons: [Drifted]`"
                   if k.drift_budget_nodes is not None else "")
                + (". A changed node template (a new AMI, an edited node class) drifts every node: the plan simulated "
                   "it at " + ", ".join(f"{t:g} s" for t in k.drift_at_s) + ", each node replaced by a new one "
                   "launched first and its pods evicted once that was ready (as many nodes at once as the budget "
                   "allows; the pods start cold on the new node)" if k.drift_at_s else "")
                + ". Set its `nodeClassRef` and GPU-count requirement for your cloud (the file's header)")
        elif c.scale_down_enabled:
            lines.append(
                "- cluster-autoscaler: `--scale-down-enabled=true`, "
                f"`--scale-down-unneeded-time={c.scale_down_unneeded_time_s:g}s`, "
                f"`--scale-down-gpu-utilization-threshold={c.scale_down_utilization_threshold:g}`, "
                f"`--scale-down-delay-after-add={c.scale_down_delay_after_add_s:g}s`, "
                f"`--scale-down-delay-after-delete={c.scale_down_delay_after_delete_s:g}s`, "
                f"`--max-scale-down-parallelism={c.max_scale_down_parallelism}`, "
                f"`--scan-interval={c.scan_interval_s:g}s`, "
                f"`--unremovable-node-recheck-timeout={c.unremovable_node_recheck_timeout_s:g}s`")
        else:
            lines.append("- cluster-autoscaler: `--scale-down-enabled=false` (nodes are never removed)")
        if c.spot is not None:
            lines.append(f"- spot GPU nodes beyond an on-demand node group of {c.spot.on_demand_nodes} node(s) "
                         f"(cluster-autoscaler's priority expander filling the on-demand group first), at "
                         f"{c.spot.price_ratio:g} of the on-demand price; a termination handler drains a node on "
                         f"its interruption notice, which gives it {c.spot.notice_s:g} s: "
                         + ("through the eviction API, as AWS Node Termination Handler and Karpenter do (the "
                            "PodDisruptionBudget holds pods back, and those still there at the notice's end die with "
                            "the node)" if c.spot.drain == "eviction" else
                            "every pod deleted at once, whatever the PodDisruptionBudget, as GKE's graceful node "
                            "shutdown does (the plan assumed it: a handler that evicts, as AWS Node Termination "
                            "Handler and Karpenter do, is `cluster.spot.drain: eviction`)"))
        if c.zones > 1 and k is not None:
            lines.append(f"- the GPU nodes in {c.zones} availability zones, a new node in the zone with the fewest, as "
                         "simulated: Karpenter picks a node's zone by the pending pods' topology spread and the price, "
                         "so give the pods a zone spread (`pods.zone_spread`) for the same")
        elif c.zones > 1:
            cap = (f" and maximum {c.max_gpus_per_zone // c.node_gpus}" if c.max_gpus_per_zone is not None else "")
            lines.append(f"- the GPU nodes in {c.zones} availability zones, one node group per zone of minimum size "
                         f"{c.min_nodes_per_zone}{cap}, kept balanced (cluster-autoscaler "
                         "`--balance-similar-node-groups=true`)")
        f = scenario.faults
        if f is not None and (f.node_failures or f.node_mtbf_s is not None or f.zone_failures):
            lines.append(f"- GPU nodes that die: kube-controller-manager's node lifecycle controller at "
                         f"`--node-monitor-grace-period={c.node_monitor_grace_s:g}s`, "
                         f"`--node-eviction-rate={c.node_eviction_rate:g}`, "
                         f"`--secondary-node-eviction-rate={c.secondary_node_eviction_rate:g}`, "
                         f"`--unhealthy-zone-threshold={c.unhealthy_zone_threshold:g}`, "
                         f"`--large-cluster-size-threshold={c.large_cluster_size_threshold}` (managed clusters keep "
                         f"the defaults), counting {c.other_nodes_per_zone} node(s) outside the GPU node group in "
                         f"each zone; kube-apiserver "
                         f"`--default-unreachable-toleration-seconds={c.unreachable_toleration_s:g}`; "
                         + ("Karpenter, which does not halt on NotReady nodes; " if k is not None else
                            f"cluster-autoscaler `--max-total-unready-percentage={c.max_total_unready_percentage:g}`, "
                            f"`--ok-total-unready-count={c.ok_total_unready_count}`; ")
                         + ("no node auto-repair (a cloud's would replace a node NotReady for long)"
                            if c.node_auto_repair_s is None else
                            f"the cloud's node auto-repair deleting a node NotReady for {c.node_auto_repair_s:g} s"))
        if f is not None and f.gpu_stockouts:
            lines.append("- GPU nodes the cloud could not create (stockouts): the cloud reports the failure "
                         + (f"{c.stockout_known_s:g} s after the ask" if c.stockout_reported else
                            "never before the scale-up times out")
                         + f"; cluster-autoscaler `--max-node-provision-time={c.max_node_provision_s:g}s`, "
                         f"`--initial-node-group-backoff-duration={c.initial_node_group_backoff_s:g}s`, "
                         f"`--max-node-group-backoff-duration={c.max_node_group_backoff_s:g}s`, "
                         f"`--node-group-backoff-reset-timeout={c.node_group_backoff_reset_s:g}s`"
                         + (" (simulated so under Karpenter too: its own retry in another zone or instance type is "
                            "not)" if k is not None else ""))
    f = scenario.faults
    if f is not None and (f.slow_pods or f.random_slowdowns is not None):
        slowest = max([s.factor for s in f.slow_pods]
                      + ([f.random_slowdowns.factor] if f.random_slowdowns is not None else []))
        kind = scenario.router.kind
        does = ("sends them fewer requests as their queues grow" if kind in ("least_outstanding", "prefix_aware")
                else "gives them their share whatever their queues")
        lines.append(f"- pods that run slow with their probes passing (a throttled GPU, up to {slowest:g} times "
                     f"slower): the router (`{kind}`) {does}; change it and the numbers change "
                     "(docs/studies.md, \"A slow pod\")")
    probe = scenario.pods.readiness_probe
    lines.append(f"- a starting pod is ready at its first startup probe that finds the model loaded (every "
                 f"{scenario.pods.startup_probe.period(probe)} s; the kubelet runs the readiness probe as it passes); "
                 f"the readiness probe runs every {probe.period_s} s and fails a pod after "
                 f"{probe.failure_threshold} failures (the Deployment patch sets all three); the endpoints follow "
                 f"a change of readiness within {scenario.pods.endpoints_propagation_s:g} s")
    killed = scenario.pods.startup_probe.failure_threshold
    if killed is not None:
        lines.append(f"- the startup probe's `failureThreshold` is the one set ({killed}): the kubelet kills a container "
                     f"whose model has not loaded after {killed} failed probes and restarts it under CrashLoopBackOff, as "
                     "simulated (crashes of kind `startup_probe`); unset, the export writes one that outlasts the "
                     "slowest cold start and restart")
    lines.append(routing(scenario))
    lines += [f"  - {note}" for note in routing_notes(scenario, target)]
    if scenario.state.store == "redis":
        lines.append(f"- the session store answers at `{target.redis_url}`")
    return [*lines, ""]

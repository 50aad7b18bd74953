"""The canary checks the plan simulated, as Argo Rollouts AnalysisTemplates (``analysis-template.yaml``).

Each resume of ``pods.rollouts`` with a metric check (``undo_if_ttft_p99_over_s``, ``..._over_baseline``, the
ITL's, the error rate's) becomes one ``argoproj.io/v1alpha1`` AnalysisTemplate with one metric per limit, as the
simulator counts them: each limit's failed measurements against ``check_failure_limit`` (Argo's per-metric
``failureLimit``), every ``check_interval_s`` from ``check_initial_delay_s`` (``interval``, ``initialDelay``), as
many measurements (``count``) as the simulated pause made plus the resume's. The queries read the window
``check_window_s`` of the canary's pods against the old ones, picked by their ``pod-template-hash`` (args
``canary-hash`` and ``stable-hash``: the new and the old ReplicaSet's; an Argo Rollout passes them with
``valueFrom.podTemplateHashValue: Latest`` and ``Stable``), or for a gateway's error count by the version label
Istio reports (args ``canary-version`` and ``stable-version``).

Conditions are written for Argo's evaluator (``utils/evaluate``: ``result`` is the query's vector, ``isNaN``
available): a NaN (nothing answered) fails a limit, as the simulator fails it, and so does a query that returns no
series at all: Argo's Prometheus provider hands the evaluator an empty vector (``processResponse``), and the
condition's ``len(result) > 0`` makes that a failed measurement (without the guard, ``result[0]`` on it would be an
evaluation error, a measurement in phase Error counted against ``consecutiveErrorLimit`` instead). The error rates'
numerators carry ``or vector(0)``: a canary that made no error has no error series, and reads 0 there, as simulated,
instead of nothing. One difference stays, which the file's header says: a limit against the old pods is one ratio (or
difference), NaN when either side answered nothing, where the simulator passes a canary whose old pods answered
nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from capsim.export.target import DeployTarget
from capsim.model.scenario import Rollout, Scenario

__all__ = ["ANALYSIS_FILE", "analysis_header", "build_analysis_templates"]

ANALYSIS_FILE = "analysis-template.yaml"


def _sel(target: DeployTarget, arg: str) -> str:
    return f'namespace="{target.namespace}",pod_template_hash="{{{{args.{arg}}}}}"'


def _p99(target: DeployTarget, ro: Rollout, which: str, w: str) -> str:
    """The p99 TTFT of ``which`` pods (``canary``, ``stable``) over the window ``w``."""
    return (f"histogram_quantile(0.99, sum by (le) (increase(vllm:time_to_first_token_seconds_bucket"
            f"{{{_sel(target, f'{which}-hash')}}}[{w}])))")


def _itl(target: DeployTarget, ro: Rollout, which: str, w: str) -> str:
    """The mean inter-token latency of ``which`` pods over the window ``w``."""
    sel = _sel(target, f"{which}-hash")
    return (f"sum(increase(vllm:inter_token_latency_seconds_sum{{{sel}}}[{w}])) / "
            f"sum(increase(vllm:inter_token_latency_seconds_count{{{sel}}}[{w}]))")


def _errors(target: DeployTarget, ro: Rollout, which: str, w: str) -> str:
    """The share of ``which`` pods' attempts ended with an error, as ``ro.error_rate_source`` counts them: the pods'
    own servers (vLLM's ``http_requests_total`` by status) or the gateway's codes (Istio, by version label)."""
    if ro.error_rate_source == "pod":
        sel = _sel(target, f"{which}-hash")
        return (f'(sum(increase(http_requests_total{{{sel},status=~"4xx|5xx"}}[{w}])) or vector(0)) / '
                f"sum(increase(http_requests_total{{{sel}}}[{w}]))")
    sel = f'reporter="source",destination_version="{{{{args.{which}-version}}}}"'
    return (f'(sum(increase(istio_requests_total{{{sel},response_code=~"4..|5.."}}[{w}])) or vector(0)) / '
            f"sum(increase(istio_requests_total{{{sel}}}[{w}]))")


#: each quantity a limit reads (``CANARY_LIMITS``): its metric's name and its query
_QUERIES: dict[str, tuple[str, Callable[[DeployTarget, Rollout, str, str], str]]] = {
    "ttft_p99_s": ("ttft-p99", _p99), "itl_mean_s": ("itl-mean", _itl), "error_rate": ("error-rate", _errors)}


def _metrics(ro: Rollout, target: DeployTarget) -> list[tuple[str, str, str]]:
    """(name, query, successCondition) of each limit ``ro`` sets: the canary's value against a limit, or its ratio to
    (``times``) or difference from (``plus``) the stable pods' (``-vs-stable``)."""
    w = f"{ro.check_window_s:g}s"
    out = []
    for _, quantity, kind, limit in ro.limits():
        name, query = _QUERIES[quantity]
        canary = query(target, ro, "canary", w)
        if kind != "limit":
            name, op = f"{name}-vs-stable", " / " if kind == "times" else " - "
            canary = f"({canary}){op}({query(target, ro, 'stable', w)})"
        out.append((name, canary, f"len(result) > 0 && !isNaN(result[0]) && result[0] <= {limit:g}"))
    return out


def _name(target: DeployTarget, i: int, checked: int) -> str:
    """Resume ``i``'s template, one of ``checked``."""
    return f"{target.name}-canary" if checked == 1 else f"{target.name}-canary-{i}"


def build_analysis_templates(scenario: Scenario, target: DeployTarget) -> list[dict[str, Any]]:
    """One AnalysisTemplate per resume with a metric check (none: an empty list)."""
    pods = scenario.pods
    checks = pods.check_times()
    out = []
    for i, times in checks.items():
        ro = pods.rollouts[i]
        metrics = _metrics(ro, target)
        args = sorted({a for _, q, _ in metrics for a in ("canary-hash", "stable-hash", "canary-version",
                                                           "stable-version") if f"args.{a}" in q})
        spec_metrics = []
        for name, query, condition in metrics:
            m: dict[str, Any] = {"name": name}
            if ro.check_interval_s is not None:
                m["interval"] = f"{ro.check_interval_s:g}s"
                if ro.check_initial_delay_s:
                    m["initialDelay"] = f"{ro.check_initial_delay_s:g}s"
            m["count"] = len(times)  # the pause's measurements and the resume's
            m["failureLimit"] = ro.check_failure_limit
            m["successCondition"] = condition
            m["provider"] = {"prometheus": {"address": target.prometheus_url, "query": query}}
            spec_metrics.append(m)
        out.append({"apiVersion": "argoproj.io/v1alpha1", "kind": "AnalysisTemplate",
                    "metadata": {"name": _name(target, i, len(checks)), "namespace": target.namespace},
                    "spec": {"args": [{"name": a} for a in args], "metrics": spec_metrics}})
    return out


def analysis_header(scenario: Scenario, target: DeployTarget) -> str:
    """The file's opening comment: when each template's measurements were simulated, and what differs in Argo."""
    pods = scenario.pods
    checks = pods.check_times()
    lines = ["# The canary checks the plan simulated, as Argo Rollouts AnalysisTemplates (capsim export)."]
    for i, at in checks.items():
        ro = pods.rollouts[i]
        when = (f"at {', '.join(f'{t:g}' for t in at)} s of the run (the last at the resume, pods.rollouts.{i})"
                if len(at) > 1 else f"once, at the resume (pods.rollouts.{i}, {ro.at_s:g} s of the run)")
        lines.append(f"# {_name(target, i, len(checks))}: measured {when}, each over the last {ro.check_window_s:g} "
                     f"s; undone when one metric failed more than {ro.check_failure_limit} of them.")
        if ro.undo_if_restarted:
            lines.append(f"# pods.rollouts.{i} also undoes at a restart of the canary's pods (undo_if_restarted), "
                         "which is no metric here: the README's kubectl steps.")
    lines += [
        "# Args: canary-hash / stable-hash, the new and the old ReplicaSet's pod-template-hash (an Argo Rollout:",
        "# valueFrom.podTemplateHashValue Latest / Stable); the series need it as a label, pod_template_hash (a",
        "# PodMonitor relabeling from __meta_kubernetes_pod_label_pod_template_hash, or",
        "# __meta_kubernetes_pod_label_rollouts_pod_template_hash under Argo). canary-version / stable-version, the",
        "# version label Istio reports (destination_version), for a gateway's error count.",
        "# The simulation evaluated these queries over its scrapes of the pods (every scrape interval, at each pod's",
        "# phase) as Prometheus does. As simulated, nothing answered fails a measurement: a NaN, and an empty",
        "# result (the conditions' len(result) > 0). Unlike the simulation: a limit against the stable pods",
        "# fails when they answered nothing in the window (the simulation passes it).",
    ]
    return "\n".join(lines) + "\n"

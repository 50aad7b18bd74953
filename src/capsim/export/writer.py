"""Write an export folder: run the checks, build every object, dump each as YAML, write the README."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from capsim.export.adapter import build_adapter_configmap
from capsim.export.analysis import ANALYSIS_FILE, analysis_header, build_analysis_templates
from capsim.export.hpa import build_hpa, require_autoscaler
from capsim.export.keda import NOT_WITH_KEDA, build_scaled_object
from capsim.export.nodepool import NODEPOOL_FILE, build_nodepool, nodepool_header
from capsim.export.pod import build_configmap, build_deployment_patch, build_pdb
from capsim.export.readme import render_readme
from capsim.export.routing import build_routing, routing_file
from capsim.export.target import DeployTarget
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.studies.checks import Finding, failed, format_findings, run_checks

Builder = Callable[[Scenario, DeployTarget], dict[str, Any]]
#: The YAML files of an export and the function that builds each.
BUILDERS: dict[str, Builder] = {
    "configmap.yaml": build_configmap,
    "deployment-patch.yaml": build_deployment_patch,
    "prometheus-adapter.yaml": build_adapter_configmap,
    "hpa.yaml": build_hpa,
    "keda-scaledobject.yaml": build_scaled_object,
}


class ChecksFailedError(SettingsError):
    """A check before deploy failed; nothing was written. ``findings`` says which settings and why."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.findings = list(findings)
        super().__init__("capsim check failed, nothing written (--force writes anyway):\n"
                         + format_findings(self.findings))


@dataclass(frozen=True)
class ExportResult:
    """The files written (YAML files first, README.md last) and the checks' findings."""

    files: tuple[Path, ...]
    findings: tuple[Finding, ...]


class _Dumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings (the adapter's config.yaml) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(obj: Mapping[str, Any]) -> str:
    """One Kubernetes object as YAML, keys in the order built."""
    return yaml.dump(dict(obj), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True,
                     width=10_000)  # no folded lines: queries stay on one line


def build_all(scenario: Scenario, target: DeployTarget) -> dict[str, dict[str, Any]]:
    """Every object of the export by file name (with ``autoscaler.keda``, no HPA and no adapter rules)."""
    auto = require_autoscaler(scenario)
    skip = NOT_WITH_KEDA if auto.keda is not None else ()
    return {name: build(scenario, target) for name, build in BUILDERS.items() if name not in skip}


def simulated_numbers(scenario: Scenario, seed: int) -> dict[str, Any]:
    """Simulate the scenario once with ``seed``: ``{"summary", "provenance"}`` as summary.json has them."""
    from capsim.sim import simulate

    result = simulate(scenario, seed=seed)
    return {"summary": result.summary.to_dict(), "provenance": result.provenance}


def vllm_args(scenario: Scenario) -> list[str]:
    """A continuous-batching scenario's engine settings as ``vllm serve`` arguments (vLLM's flag names)."""
    b = scenario.batching
    args = ["--max-num-seqs", str(b.max_num_seqs), "--max-num-batched-tokens", str(b.max_num_batched_tokens),
            "--block-size", str(b.block_size), "--max-model-len", str(b.max_model_len),
            "--tensor-parallel-size", str(b.tensor_parallel_size)]
    if b.gpu_memory_gb is not None:  # vLLM sizes the cache itself from the same share of memory
        args += ["--gpu-memory-utilization", str(b.gpu_memory_utilization)]
    else:
        args += ["--num-gpu-blocks-override", str(b.kv_cache_blocks())]
    if b.model is not None and b.model.kv_dtype == "fp8":  # the plan's cache holds twice the bf16 tokens
        args += ["--kv-cache-dtype", "fp8"]
    if b.long_prefill_token_threshold:
        args += ["--long-prefill-token-threshold", str(b.long_prefill_token_threshold)]
    # explicit either way: the plan's prefix hits exist only with caching on (vLLM V1's default)
    args.append("--enable-prefix-caching" if b.enable_prefix_caching else "--no-enable-prefix-caching")
    return args


def export_scenario(scenario: Scenario, out: str | Path, target: DeployTarget | None = None, *,
                    numbers: Mapping[str, Any] | None = None, force: bool = False) -> ExportResult:
    """Check the scenario, then write the export folder ``out``.

    Raises ``ChecksFailedError`` (writing nothing) when a check fails, unless ``force``. ``numbers``
    (``{"summary", "provenance"}``, see :func:`simulated_numbers`) go into the README.
    """
    target = target or DeployTarget()
    findings = run_checks(scenario)
    if failed(findings) and not force:
        raise ChecksFailedError(findings)
    objects = build_all(scenario, target)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, obj in objects.items():
        path = out / name
        path.write_text(dump_yaml(obj), encoding="utf-8")
        files.append(path)
    if scenario.pods.disruption_budget is not None:  # the budget the simulated drains kept
        pdb = out / "pdb.yaml"
        pdb.write_text(dump_yaml(build_pdb(scenario, target)), encoding="utf-8")
        files.append(pdb)
    if scenario.batching.mode == "continuous":  # the same engine settings for a vLLM deployment
        args = out / "vllm-args.yaml"
        args.write_text(dump_yaml({"args": vllm_args(scenario)}), encoding="utf-8")
        files.append(args)
    routing_name = routing_file(scenario)
    if routing_name is not None:  # the router the plan assumed, as the cluster's objects
        routing = out / routing_name
        routing.write_text("---\n".join(dump_yaml(obj) for obj in build_routing(scenario, target)), encoding="utf-8")
        files.append(routing)
    if scenario.cluster is not None and scenario.cluster.karpenter is not None:  # the node autoscaler simulated
        nodepool = out / NODEPOOL_FILE
        nodepool.write_text(nodepool_header(scenario) + dump_yaml(build_nodepool(scenario, target)), encoding="utf-8")
        files.append(nodepool)
    templates = build_analysis_templates(scenario, target)
    if templates:  # the canary checks the plan simulated, as Argo Rollouts analyses
        analysis = out / ANALYSIS_FILE
        analysis.write_text(analysis_header(scenario, target) + "---\n".join(dump_yaml(t) for t in templates),
                            encoding="utf-8")
        files.append(analysis)
    readme = out / "README.md"
    readme.write_text(render_readme(scenario, target, numbers=numbers, findings=findings,
                                    forced=force and failed(findings)), encoding="utf-8")
    files.append(readme)
    return ExportResult(tuple(files), tuple(findings))

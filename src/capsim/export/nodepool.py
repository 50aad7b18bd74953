"""The Karpenter NodePool the plan simulated (``karpenter-nodepool.yaml``, with ``cluster.karpenter``).

A ``karpenter.sh/v1`` NodePool: the GPU limit (``cluster.max_gpus``) and the disruption settings the simulator ran
(``consolidationPolicy``, ``consolidateAfter``, a budget of ``nodes``, and with ``drift_budget_nodes`` a second one
for ``reasons: [Drifted]``). The node class and the requirement that
picks a node of ``cluster.node_gpus`` GPUs are the cloud provider's: the file names AWS's (an ``EC2NodeClass`` called
``default``, ``karpenter.k8s.aws/instance-gpu-count``) and its header says what to change elsewhere.
"""

from __future__ import annotations

from typing import Any

from capsim.export.target import DeployTarget
from capsim.model.scenario import Scenario

__all__ = ["NODEPOOL_FILE", "build_nodepool", "nodepool_header"]

NODEPOOL_FILE = "karpenter-nodepool.yaml"


def _duration(seconds: float | None) -> str:
    """A NodePool duration (whole seconds, which the scenario requires), or ``Never``."""
    return "Never" if seconds is None else f"{round(seconds)}s"


def build_nodepool(scenario: Scenario, target: DeployTarget) -> dict[str, Any]:
    """The NodePool ``NAME-gpu`` (cluster-scoped) of ``scenario.cluster.karpenter``."""
    cluster = scenario.cluster
    assert cluster is not None and cluster.karpenter is not None
    k = cluster.karpenter
    return {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodePool",
        "metadata": {"name": f"{target.name}-gpu", "labels": target.labels()},
        "spec": {
            "template": {"spec": {
                "nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"},
                "requirements": [
                    {"key": "karpenter.k8s.aws/instance-gpu-count", "operator": "In",
                     "values": [str(cluster.node_gpus)]},
                    {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]},
                ],
            }},
            "limits": {"nvidia.com/gpu": str(cluster.max_gpus)},
            "disruption": {
                "consolidationPolicy": k.consolidation_policy,
                "consolidateAfter": _duration(k.consolidate_after_s),
                "budgets": [{"nodes": str(k.budget_nodes)}] + (
                    [{"nodes": str(k.drift_budget_nodes), "reasons": ["Drifted"]}]
                    if k.drift_budget_nodes is not None else []),
            },
        },
    }


def nodepool_header(scenario: Scenario) -> str:
    """The file's opening comment: what was simulated and what to change for another cloud."""
    cluster = scenario.cluster
    assert cluster is not None
    return "\n".join([
        "# The Karpenter NodePool the plan simulated (capsim export): its GPU limit and its disruption settings.",
        f"# A node of {cluster.node_gpus} GPU(s) was simulated ready {cluster.node_provision_s:g} s after its pods went "
        "pending.",
        "# nodeClassRef and the GPU-count requirement are AWS's (an EC2NodeClass named default); on Azure (AKS node",
        "# auto-provisioning) the requirement is karpenter.azure.com/sku-gpu-count and the class an AKSNodeClass.",
        "# Pods of the Deployment land here only if no other NodePool offers GPUs (or pin them with a nodeSelector on",
        "# karpenter.sh/nodepool).",
    ]) + "\n"

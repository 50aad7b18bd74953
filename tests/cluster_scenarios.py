"""The small scenario the cluster tests (spreads, zones) start from: 8 one-GPU pods of a deterministic
service at 20 requests/s, on a node group that provisions in 60 s and never scales down."""

from __future__ import annotations

from typing import Any

from capsim.model.scenario import Scenario


def cluster_scenario(**over: Any) -> Scenario:
    """The base scenario with ``over`` (dotted paths, applied in order) on top."""
    base: dict[str, Any] = {
        "horizon_s": 600,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 20},
                     "prompt_tokens": {"kind": "constant", "value": 100},
                     "output_tokens": {"kind": "constant", "value": 10}},
        "service": {"kind": "deterministic", "mean_s": 0.05},
        "batching": {"max_batch_size": 8, "max_wait_ms": 5},
        "pods": {"replicas": 8, "startup_s": {"kind": "constant", "value_s": 30}},
        "router": {"kind": "least_outstanding"},
        "cluster": {"max_gpus": 32, "node_gpus": 4, "node_provision_s": 60, "scale_down_enabled": False},
        "client": {"timeout_s": 10, "max_retries": 2},
        "timeseries_interval_s": 10,
    }
    sc = Scenario.model_validate(base)
    return sc.override(over) if over else sc

"""What-if on GPU-sized times: how many H100 pods serving Llama 3 8B the rush needs for the SLO with static
batching and with continuous batching, from the roofline estimate (docs/profiles.md, docs/continuous.md).

    .venv/bin/python data/validation/stop34/whatif_h100.py [MAX_BATCH] [SEED] [MAX_PODS]

The rush of ``data/scenarios/h100_llama3_8b_rush.yaml`` shortened as ``capsim.studies.batch_modes`` does
the Friday rush (1200 s: 2 -> 24 -> 2 sessions/s at 0/300/900 s, warm-up 120 s); the static pods batch up
to MAX_BATCH (default 64) requests, waiting at most 20 ms; both read the same estimated profile (static
pods its prefill and decode rows, continuous pods the roofline per step).
"""
from __future__ import annotations

import sys
from pathlib import Path

from capsim.model.scenario import Scenario
from capsim.studies.batch_modes import compare_batch_modes, format_comparison

ROOT = Path(__file__).resolve().parents[3]


def main(max_batch: int = 64, seed: int = 0, max_pods: int = 32) -> None:
    rush = Scenario.from_yaml(ROOT / "data" / "scenarios" / "h100_llama3_8b_rush.yaml").override(
        {"horizon_s": 1200, "warmup_s": 120, "workload.arrivals.rate_per_s": [[0, 2], [300, 24], [900, 2]]})
    static = rush.override({"batching.mode": "static", "batching.max_batch_size": max_batch,
                            "batching.max_wait_ms": 20})
    print(format_comparison(compare_batch_modes(static, rush, max_replicas=max_pods, seed=seed)))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))

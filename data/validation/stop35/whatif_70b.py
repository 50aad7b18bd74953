"""Llama 3 70B in the rush: pods of 4 H100s, 8 H100s or 2 H200s (tensor parallel), the fewest pods a floor
that meets the SLO, and the GPUs they take.

    .venv/bin/python data/validation/stop35/whatif_70b.py [SEEDS] [RATE]

SEEDS: comma-separated (default 0,1,2,3,4); RATE: the rush's peak sessions/s (default 6, as shipped).
For each variant and seed it raises ``autoscaler.minReplicas`` (and the initial replicas) from 1 until the
run meets the SLO (TTFT p99 <= 2 s, errors <= 0.1%), and prints that floor's numbers. Service times are
roofline ESTIMATES (``capsim estimate-profile`` at its default mfu 0.5, mbu 0.7, 1 ms a step), written to a
temporary folder; the rest is ``data/scenarios/h100x4_llama3_70b_rush.yaml``. Deterministic for a seed.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from capsim.model.roofline import GPUS, MODELS, roofline_profile
from capsim.model.scenario import Scenario
from capsim.sim import simulate

ROOT = Path(__file__).resolve().parents[3]
VARIANTS = {"h100x4": ("h100", 4), "h100x8": ("h100", 8), "h200x2": ("h200", 2)}


def main() -> None:
    seeds = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0,1,2,3,4").split(",")]
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 6.0
    base = Scenario.from_yaml(ROOT / "data/scenarios/h100x4_llama3_70b_rush.yaml")
    model = MODELS["llama-3-70b"]
    print("| pods of | seed | floor (pods) | GPUs at the floor | TTFT p99 s | ITL p50 ms | pod GPU-h | node GPU-h | "
          "most pods |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        floors: dict[str, list[int]] = {}
        for name, (gpu, tp) in VARIANTS.items():
            path = Path(tmp) / f"{name}.csv"
            roofline_profile(GPUS[gpu], model, tensor_parallel=tp).to_csv(path)
            variant = base.override({
                "service.profile": str(path), "batching.tensor_parallel_size": tp,
                "batching.gpu_memory_gb": GPUS[gpu].memory_gib,
                "workload.arrivals.rate_per_s": [[0, rate / 12], [1800, rate], [2400, rate / 12]],
                "autoscaler.maxReplicas": 64 // tp})
            for seed in seeds:
                for floor in range(1, 64 // tp + 1):
                    s = variant.override({"autoscaler.minReplicas": floor, "pods.replicas": floor})
                    r = simulate(s, seed=seed).summary
                    if r.slo_met:
                        break
                floors.setdefault(name, []).append(floor)
                print(f"| {tp} x {gpu} | {seed} | {floor} | {floor * tp} | {r.ttft_p99_s:.2f} | {r.itl_p50_s * 1e3:.1f} | "
                      f"{r.gpu_hours:.1f} | {r.node_gpu_hours:.1f} | {r.max_replicas} |", flush=True)
        for name, f in floors.items():
            tp = VARIANTS[name][1]
            print(f"{name}: floor median {statistics.median(f):g} pods ({statistics.median(f) * tp:g} GPUs), "
                  f"range {min(f)}-{max(f)}")


if __name__ == "__main__":
    main()

"""Who removes the GPU nodes, cluster-autoscaler or Karpenter: after a rush, and between the wakes of scaling to zero.

After the rush: the Friday rush at its floor before tuning (``autoscaler.minReplicas: 3``, so the rush adds nodes),
under cluster-autoscaler and under Karpenter (``cluster.karpenter``: WhenEmpty or WhenEmptyOrUnderutilized,
consolidateAfter 0 s or 5 min), without and with a PodDisruptionBudget of ``maxUnavailable: 1``. Per setting, over the
seeds: the p99 TTFT of the requests sent after the rush (from 2,400 s), the worst minute's p99 among them, the pods
consolidation evicted, the nodes' GPU-hours and the cost. Scaling to zero (``scale_to_zero.yaml``): cluster-autoscaler,
Karpenter with consolidateAfter 0 s and 5 min: the wakes, those that waited for a new node, the mean wake, the longest,
the node GPU-hours and the cost. Medians (min to max). docs/studies.md, "Who removes the nodes".

    python scripts/node_autoscaler_study.py [--seeds 5] [--out after_rush.csv]

Two processes, about two minutes on 2 cores for 5 seeds.
"""

from __future__ import annotations

import argparse
import re
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from capsim.model.scenario import Scenario
from capsim.sim import simulate
from capsim.studies.report import median_range as cell
from capsim.studies.report import worst_minute_p99

SCENARIO = "data/scenarios/friday_rush.yaml"
RUSH_ENDS_S = 2400.0
NODES: dict[str, dict[str, Any] | None] = {
    "cluster-autoscaler": None,
    "Karpenter WhenEmpty 0s": {"consolidation_policy": "WhenEmpty", "consolidate_after_s": 0},
    "Karpenter WhenEmptyOrUnderutilized 0s": {"consolidation_policy": "WhenEmptyOrUnderutilized",
                                              "consolidate_after_s": 0},
    "Karpenter WhenEmptyOrUnderutilized 5m": {"consolidation_policy": "WhenEmptyOrUnderutilized",
                                              "consolidate_after_s": 300},
}
BUDGETS: dict[str, dict[str, int] | None] = {"none": None, "maxUnavailable 1": {"max_unavailable": 1}}
ZERO = "data/scenarios/scale_to_zero.yaml"
ZERO_NODES: dict[str, dict[str, Any] | None] = {
    "cluster-autoscaler": None,
    "Karpenter, consolidateAfter 0s": {"consolidate_after_s": 0},
    "Karpenter, consolidateAfter 5m": {"consolidate_after_s": 300},
}


def run(job: tuple[str, str, int]) -> dict[str, Any]:
    nodes, budget, seed = job
    s = Scenario.from_yaml(SCENARIO).override({"autoscaler.minReplicas": 3, "cluster.karpenter": NODES[nodes],
                                               "pods.disruption_budget": BUDGETS[budget]})
    r = simulate(s, seed=seed)
    after = r.requests[r.requests.arrival_s >= RUSH_ENDS_S]
    ttft = after.first_token_s - after.arrival_s
    ev = r.node_events
    drains = ev[ev.event == "consolidation"].detail if len(ev) else pd.Series([], dtype=str)
    evicted = sum(int(m.group(1)) for d in drains if (m := re.search(r"(\d+) pod\(s\) evicted", d)))
    return {"nodes": nodes, "budget": budget, "seed": seed,
            "ttft_p99_after_s": float(np.nanquantile(ttft, 0.99)),
            "worst_minute_p99_s": worst_minute_p99(after),
            "evicted": evicted, "node_gpu_hours": r.summary.node_gpu_hours, "cost": r.summary.cost,
            "failed_after": float((after.outcome != "ok").mean())}


def run_zero(job: tuple[str, int]) -> dict[str, Any]:
    nodes, seed = job
    r = simulate(Scenario.from_yaml(ZERO).override({"cluster.karpenter": ZERO_NODES[nodes]}), seed=seed)
    w = r.wakes
    return {"nodes": nodes, "seed": seed, "wakes": len(w), "waited_for_a_node": int((w.placed_s > w.woke_s).sum()),
            "mean_wake_s": float(w.waited_s.mean()), "longest_wake_s": r.summary.longest_wake_s,
            "node_gpu_hours": r.summary.node_gpu_hours, "cost": r.summary.cost}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=None, help="write every run here (CSV)")
    args = ap.parse_args()
    jobs = [(n, b, seed) for n in NODES for b in BUDGETS for seed in range(args.seeds)]
    with ProcessPoolExecutor(2) as pool:
        df = pd.DataFrame(list(pool.map(run, jobs)))
        zero = pd.DataFrame(list(pool.map(run_zero, [(n, seed) for n in ZERO_NODES for seed in range(args.seeds)])))
    if args.out:
        df.to_csv(args.out, index=False)

    print("| nodes | PDB | p99 TTFT after the rush (s) | worst minute (s) | pods evicted | node GPU-hours | cost ($) |")
    print("|---|---|---|---|---|---|---|")
    for (n, b), g in df.groupby(["nodes", "budget"], sort=False):
        print(f"| {n} | {b} | {cell(g.ttft_p99_after_s, 3)} | {cell(g.worst_minute_p99_s, 3)} | "
              f"{cell(g.evicted, 0)} | {cell(g.node_gpu_hours, 2)} | {cell(g.cost, 2)} |")
    print()
    print("| nodes | wakes | waited for a new node | mean wake (s) | longest wake (s) | node GPU-hours | cost ($) |")
    print("|---|---|---|---|---|---|---|")
    for n, g in zero.groupby("nodes", sort=False):
        print(f"| {n} | {cell(g.wakes, 0)} | {cell(g.waited_for_a_node, 0)} | {cell(g.mean_wake_s, 1)} | "
              f"{cell(g.longest_wake_s, 1)} | {cell(g.node_gpu_hours, 2)} | {cell(g.cost, 2)} |")


if __name__ == "__main__":
    main()

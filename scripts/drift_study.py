"""A node image update under Karpenter: what drift costs the requests, quiet or in the rush, with and without a
PodDisruptionBudget.

The Friday rush (its tuned floor of 8 pods: one node of 8 GPUs until the rush) under a Karpenter NodePool with its
defaults (``cluster.karpenter``), whose node template changes (``drift_at_s``: a new AMI) at 900 s, in the quiet
before the rush, or at 1,900 s, in it. Karpenter launches a replacement node (240 s), then evicts the drifted node's
pods, which start again cold on the new one: all at once without a PodDisruptionBudget, one at a time with
``maxUnavailable: 1``. Per setting, over the seeds: the p99 TTFT of the requests sent in the 15 minutes from the
change, the worst minute's p99 among them, the share of them that failed, how long until the last drifted node went,
the nodes' GPU-hours and the cost; "no drift" is the same run without the change, its window the same. Medians (min
to max). docs/studies.md, "A node image update".

    python scripts/drift_study.py [--seeds 5] [--out drift.csv]

Two processes, about three minutes on 2 cores for 5 seeds.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from capsim.model.scenario import Scenario
from capsim.sim import simulate
from capsim.studies.report import median_range as cell
from capsim.studies.report import worst_minute_p99

SCENARIO = "data/scenarios/friday_rush.yaml"
WINDOW_S = 900.0
WHEN: dict[str, float] = {"quiet (900 s)": 900.0, "in the rush (1,900 s)": 1900.0}
SETTINGS: dict[str, tuple[bool, dict[str, int] | None]] = {
    "no drift": (False, None),
    "drift, no PDB": (True, None),
    "drift, maxUnavailable 1": (True, {"max_unavailable": 1}),
}


def run(job: tuple[str, str, int]) -> dict[str, Any]:
    when, setting, seed = job
    at = WHEN[when]
    drift, budget = SETTINGS[setting]
    s = Scenario.from_yaml(SCENARIO).override({"cluster.karpenter": {"drift_at_s": [at] if drift else []},
                                               "pods.disruption_budget": budget})
    r = simulate(s, seed=seed)
    window = r.requests[(r.requests.arrival_s >= at) & (r.requests.arrival_s < at + WINDOW_S)]
    ttft = window.first_token_s - window.arrival_s
    drifted = r.nodes[r.nodes.created_s < at] if drift else r.nodes.iloc[:0]
    done = float(drifted.removed_s.max() - at) if len(drifted) and drifted.removed_s.notna().all() else np.nan
    return {"when": when, "setting": setting, "seed": seed,
            "ttft_p99_s": float(np.nanquantile(ttft, 0.99)),
            "worst_minute_p99_s": worst_minute_p99(window),
            "failed": float((window.outcome != "ok").mean()), "drift_done_s": done,
            "node_gpu_hours": r.summary.node_gpu_hours, "cost": r.summary.cost}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=None, help="write every run here (CSV)")
    args = ap.parse_args()
    jobs = [(w, s, seed) for w in WHEN for s in SETTINGS for seed in range(args.seeds)]
    with ProcessPoolExecutor(2) as pool:
        df = pd.DataFrame(list(pool.map(run, jobs)))
    if args.out:
        df.to_csv(args.out, index=False)

    print("| template change | setting | p99 TTFT, 15 min from it (s) | worst minute (s) | failed (%) | "
          "last drifted node gone after (s) | node GPU-hours | cost ($) |")
    print("|---|---|---|---|---|---|---|---|")
    for (w, s), g in df.groupby(["when", "setting"], sort=False):
        print(f"| {w} | {s} | {cell(g.ttft_p99_s, 3)} | {cell(g.worst_minute_p99_s, 3)} | {cell(g.failed, 2, 100)} | "
              f"{cell(g.drift_done_s, 0)} | {cell(g.node_gpu_hours, 2)} | {cell(g.cost, 2)} |")


if __name__ == "__main__":
    main()

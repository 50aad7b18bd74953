"""Simulator speed when nodes and pods come and go all the time: CPU seconds per pod replaced.

``data/scenarios/node_failure.yaml`` (8-GPU nodes, an HPA, a node that dies at 1200 s) at a steady 20
requests a second, nodes provisioned at once, with every node a spot node reclaimed at random
(``cluster.spot.mtbf_s``, 60 s down to 0.1 s per node), against the same scenario without spot nodes in the
same run. Each reclaim drains a
node and the ReplicaSet replaces its pods on a new node, so a run at a short MTBF creates tens of
thousands of nodes and pods. What the placement, the scale-down scan, the time series and the HPA look
at are the nodes and pods still there, so a replaced pod costs about the same however many were replaced
before it (until 2026-12-03 each looked at every node and pod of the run: the run was quadratic in the
churn, and at an MTBF of 0.1 s a simulated hour ran past ten minutes).

Target: at the two shortest MTBFs (1 and 0.1 s: the churn is nearly all of the run's work, and the second
makes ten times the pods) the CPU per pod created within 2x of each other; a quadratic run makes it about
10x. What remains above 1x is Python's cyclic garbage collector walking the pods the run keeps for its
frames (the hour at 0.1 s keeps 428,000): with ``gc.disable()`` the hour gives 0.026 and 0.029 ms a pod.
Measured 2026-12-03 (docs/benchmarks.md): ``--quick --repeat 3`` 1.23 and 1.25, the hour 1.72; the code
before, ``--quick``: 10.1 (0.24 and 2.4 ms a pod; the MTBF 0.1 s run 169 CPU s against 2.3).

    python benchmarks/bench_churn.py            # one simulated hour per case
    python benchmarks/bench_churn.py --quick    # ten simulated minutes per case
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, print_table, write_result
from capsim.model.scenario import Scenario
from capsim.sim import Simulation

SCENARIO = Path(__file__).resolve().parent.parent / "data" / "scenarios" / "node_failure.yaml"
MTBFS_S = (60.0, 6.0, 1.0, 0.1)
RATE = 20.0  # requests a second: light, so that at the short MTBFs the run's work is the churn


def churn_scenario(horizon_s: float, mtbf_s: float | None) -> Scenario:
    """The node-failure scenario at ``RATE`` on spot nodes reclaimed every ``mtbf_s`` (``None``: on-demand)."""
    over: dict[str, Any] = {"horizon_s": horizon_s, "warmup_s": min(300.0, horizon_s / 10),
                            "workload.arrivals": {"kind": "poisson", "rate_per_s": RATE}, "cluster.node_provision_s": 0}
    if mtbf_s is not None:
        over["cluster.spot"] = {"price_ratio": 0.4, "mtbf_s": mtbf_s, "notice_s": 30}
    return Scenario.from_yaml(SCENARIO).override(over)


def run_case(horizon_s: float, mtbf_s: float | None, repeat: int) -> dict[str, Any]:
    cpu = []
    for _ in range(repeat):
        sim = Simulation(churn_scenario(horizon_s, mtbf_s), seed=0)
        c0 = time.process_time()
        res = sim.run()
        cpu.append(time.process_time() - c0)
    return {"mtbf_s": mtbf_s, "requests": res.summary.arrived, "nodes": len(res.nodes),
            "pods": len(sim.cluster.pods), "cpu_s": median(cpu), "cpu_runs": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ten simulated minutes per case instead of an hour")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the median is reported")
    args = ap.parse_args()
    horizon = 600.0 if args.quick else 3600.0
    base = run_case(horizon, None, args.repeat)
    cases = [run_case(horizon, m, args.repeat) for m in MTBFS_S]
    base["ms_per_pod"] = 1e3 * base["cpu_s"] / base["pods"]
    rows = [["on-demand (baseline)", base["requests"], base["nodes"], base["pods"], base["cpu_s"], 1.0,
             base["ms_per_pod"]]]
    for c in cases:
        c["ms_per_pod"] = 1e3 * c["cpu_s"] / c["pods"]
        rows.append([f"spot, MTBF {c['mtbf_s']:g} s", c["requests"], c["nodes"], c["pods"], c["cpu_s"],
                     c["cpu_s"] / base["cpu_s"], c["ms_per_pod"]])
    print_table(f"node_failure.yaml, {horizon:g} simulated s, seed 0, CPU s (median of {args.repeat})",
                ["case", "requests", "nodes", "pods", "CPU s", "x baseline", "CPU ms / pod"], rows)
    # the two shortest MTBFs: the churn is the run's work, and the second makes ten times the pods
    ratio = cases[-1]["ms_per_pod"] / cases[-2]["ms_per_pod"]
    print(f"\nCPU per pod at MTBF {cases[-1]['mtbf_s']:g} s over MTBF {cases[-2]['mtbf_s']:g} s "
          f"({cases[-1]['pods'] / cases[-2]['pods']:.1f}x the pods): {ratio:.2f} "
          f"(target <= 2: {'met' if ratio <= 2 else 'NOT met'})")
    write_result("churn_quick" if args.quick else "churn",
                 {"horizon_s": horizon, "baseline": base, "cases": cases, "ratio": ratio})


if __name__ == "__main__":
    main()

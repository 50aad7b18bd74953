"""What-if: how many pods a rush needs for the SLO with static batching and with continuous batching.

For each scenario (the same rush, one with ``batching.mode: static``, one with ``continuous``) the fleet is
fixed (autoscaler and GPU limit removed) and the fewest pods that meet the scenario's SLO -- TTFT p99 and
error rate, over requests after the warm-up -- are found by bisection on the pod count, assuming that more
pods never hurt. Every probe is one full simulation of the rush under the given seed.

``python -m capsim.studies.batch_modes`` runs the comparison on the Friday rush (shortened, as in
docs/continuous.md) and prints the table; ``--step-profile`` times the continuous pods with a profile that
carries a fitted step model instead of the adapter over the static kernels.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsim.model.scenario import Scenario
from capsim.sim.simulate import simulate


@dataclass(frozen=True)
class PodsNeeded:
    """The fewest pods meeting the SLO (``None``: not even ``max_replicas``) and that run's numbers."""

    mode: str
    pods: int | None
    summary: dict[str, Any]
    probes: dict[int, bool]


def fixed_fleet(scenario: Scenario, replicas: int) -> Scenario:
    """The scenario on ``replicas`` pods, ready from the start, without autoscaler or GPU limit. When its nodes
    can fail (``faults.node_failures``, ``node_mtbf_s``, ``zone_failures``) or be reclaimed (spot:
    ``faults.spot_interruptions``, ``cluster.spot.mtbf_s``) it keeps its nodes: as many as the fleet fills (or
    its spreads and zones' minimums ask) and room for the replacements (one node more for a node failure or
    a reclaim; a zone's share of the nodes for a zone's outage), none drained."""
    changes: dict[str, Any] = {"autoscaler": None, "pods.replicas": replicas}
    faults, cluster = scenario.faults, scenario.cluster
    node_fails = faults is not None and bool(faults.node_failures or faults.node_mtbf_s)
    zone_fails = faults is not None and bool(faults.zone_failures)
    reclaims = cluster is not None and cluster.spot is not None and (
        cluster.spot.mtbf_s is not None or (faults is not None and bool(faults.spot_interruptions)))
    if cluster is not None and (node_fails or zone_fails or reclaims):
        per_node = cluster.pods_per_node(scenario.batching.tensor_parallel_size)
        zones = cluster.zones
        fills = -(-replicas // per_node)
        if scenario.pods.zone_spread is not None:  # each zone's share on nodes of its own
            share = -(-replicas // zones)
            fills = zones * -(-share // per_node)
        fills = max(fills, scenario.pods.spread_min_nodes, zones * cluster.min_nodes_per_zone)
        spare = max(1 if node_fails or reclaims else 0, -(-fills // zones) if zone_fails else 0)
        changes["cluster.max_gpus"] = (fills + spare) * cluster.node_gpus
        if cluster.karpenter is not None:  # none drained: Karpenter's consolidateAfter Never
            changes["cluster.karpenter.consolidate_after_s"] = None
        else:
            changes["cluster.scale_down_enabled"] = False
    else:
        changes["cluster"] = None
    return scenario.override(changes)


def pods_needed(scenario: Scenario, *, max_replicas: int = 64, seed: int = 0) -> PodsNeeded:
    """Bisect on the fixed pod count for the fewest pods whose run meets the SLO."""
    probes: dict[int, bool] = {}
    summaries: dict[int, dict[str, Any]] = {}

    def ok(n: int) -> bool:
        s = simulate(fixed_fleet(scenario, n), seed).summary
        probes[n] = s.slo_met
        summaries[n] = s.to_dict()
        return s.slo_met

    mode = scenario.batching.mode
    if not ok(max_replicas):
        return PodsNeeded(mode, None, summaries[max_replicas], probes)
    lo, hi = 0, max_replicas  # lo fails (or is 0), hi passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return PodsNeeded(mode, hi, summaries[hi], probes)


def compare_batch_modes(static: Scenario, continuous: Scenario, *, max_replicas: int = 64,
                        seed: int = 0) -> list[PodsNeeded]:
    """``pods_needed`` for the static and the continuous scenario of the same rush."""
    if static.batching.mode != "static" or continuous.batching.mode != "continuous":
        raise ValueError("compare_batch_modes takes a static-mode scenario, then a continuous-mode one, "
                         f"got {static.batching.mode!r} and {continuous.batching.mode!r}")
    return [pods_needed(sc, max_replicas=max_replicas, seed=seed) for sc in (static, continuous)]


#: The Friday rush shortened to 1200 s (8 -> 96 -> 8 sessions/s at 0/300/900 s, warm-up 120 s).
SHORT_RUSH: dict[str, Any] = {"horizon_s": 1200, "warmup_s": 120,
                              "workload.arrivals.rate_per_s": [[0, 8], [300, 96], [900, 8]]}


def format_comparison(results: list[PodsNeeded]) -> str:
    """A markdown table: per mode the pods needed, that run's TTFT and E2E p99, errors, GPU-hours, ITL p50,
    preemptions, and every probe (pods: met the SLO or not)."""
    lines = ["| mode | pods needed | TTFT p99 | E2E p99 | error rate | GPU-hours | ITL p50 | preemptions | probes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.summary
        itl = s.get("itl_p50_s")
        itl_text = f"{itl * 1e3:.1f} ms" if isinstance(itl, float) and itl == itl else "-"
        probes = ", ".join(f"{n}: {'pass' if ok else 'fail'}" for n, ok in sorted(r.probes.items()))
        needed = r.pods if r.pods is not None else f"> {max(r.probes)}"
        lines.append(f"| {r.mode} | {needed} | {s['ttft_p99_s']:.3f} s | {s['e2e_p99_s']:.3f} s | "
                     f"{s['error_rate']:.3f} | {s['gpu_hours']:.2f} | {itl_text} | {s.get('preemptions', 0)} | {probes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="pods needed for the SLO, static against continuous batching")
    ap.add_argument("--static", type=Path, default=Path("data/scenarios/friday_rush.yaml"))
    ap.add_argument("--continuous", type=Path, default=Path("data/scenarios/friday_rush_continuous.yaml"))
    ap.add_argument("--full", action="store_true", help="the whole scenario, not the 1200 s shortened rush")
    ap.add_argument("--step-profile", type=Path, help="a profile with a fitted step model for the continuous pods")
    ap.add_argument("--max-replicas", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    short = {} if args.full else SHORT_RUSH
    static = Scenario.from_yaml(args.static).override(short)
    extra = {"service.profile": str(args.step_profile.resolve())} if args.step_profile else {}
    continuous = Scenario.from_yaml(args.continuous).override({**short, **extra})
    print(format_comparison(compare_batch_modes(static, continuous, max_replicas=args.max_replicas, seed=args.seed)))


if __name__ == "__main__":
    main()

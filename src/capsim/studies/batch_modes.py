"""What-if: how many pods a rush needs for the SLO with static batching and with continuous batching.

For each scenario (the same rush, one with ``batching.mode: static``, one with ``continuous``) the fleet is
fixed (autoscaler and GPU limit removed) and the fewest pods that meet the scenario's SLO -- TTFT p99 and
error rate, over requests after the warm-up -- are found by bisection on the pod count, assuming that more
pods never hurt. Every probe is one full simulation of the rush under the given seed.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """The scenario on ``replicas`` pods, ready from the start, without autoscaler or GPU limit."""
    return scenario.override({"autoscaler": None, "cluster": None, "pods.replicas": replicas})


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

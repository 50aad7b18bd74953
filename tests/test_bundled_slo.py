"""Every bundled scenario meets the SLO it claims (seed 0): a shipped example that misses its own target
teaches the wrong settings. A scenario that shows a miss on purpose does it by override (the demo's
"before tuning" floor), not by shipping the miss."""

from __future__ import annotations

from pathlib import Path

import pytest

from capsim.model.scenario import Scenario
from capsim.sim import simulate

ROOT = Path(__file__).resolve().parent.parent
# Known misses, each with its numbers (seed 0): the scenario shows a fault's cost, and the fault alone breaks
# the error budget. Strict: when one starts to meet its SLO, this list must lose it.
KNOWN_MISSES = {
    "crash_study": "a 60-s Redis outage (and crashes) fail 0.64% of requests, over max_error_rate 0.1%",
    "chat_sessions": "a 30-s Redis outage fails 0.21% of requests, over max_error_rate 0.1%",
}
SCENARIOS = [pytest.param(p, marks=pytest.mark.xfail(reason=KNOWN_MISSES[p.stem], strict=True))
             if p.stem in KNOWN_MISSES else p for p in sorted((ROOT / "data" / "scenarios").glob("*.yaml"))]


@pytest.mark.slow
@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_a_bundled_scenario_meets_its_own_slo(path: Path) -> None:
    sc = Scenario.from_yaml(path)
    s = simulate(sc, seed=0).summary
    assert s.slo_met, (f"{path.name}: p99 TTFT {s.ttft_p99_s:.3g} s (SLO {sc.slo.ttft_p99_s:g} s), error rate "
                       f"{s.error_rate:.3%} (SLO {sc.slo.max_error_rate:.3%}), max pods {s.max_replicas}")

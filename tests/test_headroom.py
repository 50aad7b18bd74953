"""Headroom: how many times its own traffic a plan carries (``workload.load_scale``, ``capsim headroom``)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from capsim.cli import app
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim.simulate import simulate
from capsim.studies.capacity import headroom
from test_capacity import MU, SLO_S, mm1

SCENARIOS = Path(__file__).resolve().parent.parent / "data" / "scenarios"


def test_a_load_scale_is_the_rate_times_it_and_a_trace_replayed_faster() -> None:
    base = Scenario.from_yaml(SCENARIOS / "steady_poisson.yaml").override({"horizon_s": 120, "warmup_s": 10})
    a = simulate(base.override({"workload.load_scale": 1.5}), 2)
    b = simulate(base.override({"workload.arrivals.rate_per_s": 60}), 2)
    pd.testing.assert_frame_equal(a.requests, b.requests)
    # the rush's shape, every step times it: the same seed's sessions stay, more come between them
    rush = Scenario.from_yaml(SCENARIOS / "friday_rush.yaml").override({"horizon_s": 600, "warmup_s": 10})
    more = simulate(rush.override({"workload.load_scale": 1.2}), 1).requests
    plain = simulate(rush, 1).requests
    assert 1.1 < len(more) / len(plain) < 1.3
    trace = Scenario.from_yaml(SCENARIOS / "trace_replay.yaml").override({"horizon_s": 300, "warmup_s": 10})
    sp = trace.workload.arrivals.speedup  # type: ignore[union-attr]
    c = simulate(trace.override({"workload.load_scale": 2}), 1)
    d = simulate(trace.override({"workload.arrivals.speedup": 2 * sp}), 1)
    pd.testing.assert_frame_equal(c.requests, d.requests)
    with pytest.raises(SettingsError, match="workload.load_scale"):
        base.override({"workload.load_scale": 0})


def test_headroom_matches_the_mm1_formula_above_and_below_todays_load() -> None:
    # M/M/1: p99 sojourn ln(100) / (mu - lambda) <= SLO up to lambda = mu - ln(100) / SLO = 76.97/s, so a plan at
    # 10/s carries 7.7 times its traffic, and one at 100/s only 0.77 of it (test_capacity's formula)
    best = MU - math.log(100) / SLO_S
    up = headroom(mm1(), seeds=2, rel_tol=0.01, cache=False)
    assert up.scale == pytest.approx(best / 10, rel=0.05)
    assert len(up.proof) == 2 and all(s["slo_met"] for s in up.proof)
    assert up.scenario.workload.load_scale == up.scale
    failing = [p.scale for p in up.probes if not p.passed]
    assert failing and min(failing) <= up.scale * 1.03
    # the search never tries below a multiple that passed; the checks do, after it: M/M/1 is monotone
    checks = up.probes[-3:]
    assert [c.scale for c in checks] == pytest.approx([0.5 * up.scale, 0.75 * up.scale, 0.9 * up.scale])
    assert all(c.passed for c in checks) and up.failing_below == [] and up.safe_scale == up.scale
    down = headroom(mm1(workload={"arrivals": {"kind": "poisson", "rate_per_s": 100}}), seeds=2, rel_tol=0.01,
                    cache=False)
    assert down.scale == pytest.approx(best / 100, rel=0.05) and not down.probes[0].passed  # today's misses


def test_a_miss_below_the_bisected_headroom_is_found_and_the_safe_multiple_stops_under_it(monkeypatch) -> None:
    from capsim.studies.capacity import HeadroomResult, ScaleProbe, _bisect

    # M/M/1 whose load is 10/s times the multiple, except between 5.5 and 5.9 times, where it is 200/s, over
    # the service rate: a window of failure under the 7.7 the search finds (as a retry storm or an autoscaler's
    # step can make one); the search (1, 2, 4, 8, then between 4 and 8) never sees it, the check at 0.75 does
    def make(x: float) -> Scenario:
        return mm1(workload={"arrivals": {"kind": "poisson", "rate_per_s": 200.0 if 5.5 <= x <= 5.9 else 10 * x}})

    best = MU - math.log(100) / SLO_S
    k, proofs, tried = _bisect(make, 1.0, [0], 0.01, 30, "serial", False, check_below=(0.5, 0.75, 0.9))
    assert k == pytest.approx(best / 10, rel=0.05)
    assert [t[1] for t in tried[:-3]].count(False) >= 1 and all(t[0] > 5.9 or t[0] < 5.5 for t in tried[:-3])
    r = HeadroomResult(k, make(k), proofs[k], [ScaleProbe(*t) for t in tried])
    assert [p.scale for p in r.failing_below] == pytest.approx([0.75 * k])
    assert "TTFT p99" in (r.failing_below[0].error or "")
    # the largest multiple that passed below the miss: 4 (the doubling's), all up to it passed
    assert r.safe_scale == 4.0 and all(p.passed for p in r.probes if p.scale <= r.safe_scale)
    # capsim headroom says so, and which multiple to plan on
    import capsim.studies.capacity as capacity_mod
    from capsim.studies.study_cli import run_headroom

    r.provenance.update(seeds=[0], check_below=[0.5, 0.75, 0.9])
    lines: list[str] = []
    monkeypatch.setattr(capacity_mod, "headroom", lambda *a, **k: r)
    run_headroom(make(1.0), 1, 0.01, False, lines.append)
    warning = next(ln for ln in lines if ln.startswith("WARNING: passing is not monotone"))
    assert f"misses its SLO at {0.75 * k:.3g} (seed 0: TTFT p99" in warning and "up to 4 met it: plan on that" in warning
    # no checks asked, none made; a fraction outside (0, 1) is refused, naming the setting
    assert len(_bisect(make, 1.0, [0], 0.01, 30, "serial", False)[2]) == len(tried) - 3
    with pytest.raises(SettingsError, match="check_below"):
        headroom(mm1(), check_below=(1.5,), cache=False)


def test_headroom_keeps_the_plans_autoscaler_and_multiplies_its_own_scale() -> None:
    rush = Scenario.from_yaml(SCENARIOS / "friday_rush.yaml").override(
        {"horizon_s": 900, "warmup_s": 60, "workload.arrivals.rate_per_s": [[0, 8], [300, 96], [600, 8]],
         "workload.load_scale": 0.5})
    r = headroom(rush, rel_tol=0.1, cache=False)
    assert r.scale > 1  # half the rush: more than today's fits
    assert r.scenario.autoscaler is not None and r.scenario.cluster is not None  # the plan, not a fixed fleet
    assert r.scenario.workload.load_scale == pytest.approx(0.5 * r.scale)


def test_capsim_headroom_prints_the_multiple_and_its_proof() -> None:
    res = CliRunner().invoke(app, ["headroom", str(SCENARIOS / "steady_poisson.yaml"), "--set", "horizon_s=120",
                                   "--set", "warmup_s=10", "--rel-tol", "0.1", "--no-cache"])
    assert res.exit_code == 0, res.output
    assert "1.000x  worst p99 TTFT" in res.output and "meets the SLO" in res.output
    assert "misses the SLO: seed 0: TTFT p99" in res.output  # why the first failing multiple failed
    line = next(ln for ln in res.output.splitlines() if ln.startswith("headroom: the plan carries"))
    assert "times its traffic" in line and "under seeds 0" in line
    assert "  proof, seed 0:" in res.output
    assert "checked below it: 0.5, 0.75, 0.9 x the headroom met the SLO too" in res.output

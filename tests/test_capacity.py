"""Capacity search: bisection on the rate agrees with the M/M/1 formula and proves its answer with runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from capsim.cli import app
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.studies.capacity import _throughput_guess, capacity, steady

MU = 100.0  # batches per second
SLO_S = 0.2


def mm1(**extra: Any) -> Scenario:
    """One pod, batch size 1, exponential service: TTFT (first token at the end) is the M/M/1 sojourn time."""
    data: dict[str, Any] = {
        "horizon_s": 300.0, "warmup_s": 20.0,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 10}},
        "service": {"kind": "exponential", "mean_s": 1 / MU},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0, "queue_capacity": 100_000},
        "pods": {"replicas": 1},
        "client": {"timeout_s": 600},
        "slo": {"ttft_p99_s": SLO_S, "max_error_rate": 0.001},
    }
    data.update(extra)
    return Scenario.model_validate(data)


def test_capacity_matches_the_mm1_formula() -> None:
    # M/M/1 sojourn time is exponential with rate mu - lambda: p99 = ln(100) / (mu - lambda), so the
    # highest rate with p99 <= SLO is mu - ln(100) / SLO (Kleinrock, Queueing Systems vol. 1, sec. 3.2)
    expected = MU - math.log(100) / SLO_S  # 76.97 per second
    result = capacity(mm1(), seeds=2, rel_tol=0.01, cache=False)
    assert result.rate_per_s == pytest.approx(expected, rel=0.05)
    assert result.requests_per_s == result.rate_per_s  # one turn per session
    # the proof: every seed's run at the answer met the SLO, and a probe just above failed
    assert len(result.proof) == 2 and all(s["slo_met"] for s in result.proof)
    failing = [p.rate_per_s for p in result.probes if not p.passed]
    assert failing and min(failing) <= result.rate_per_s * 1.03
    assert all(p.passed for p in result.probes if p.rate_per_s <= result.rate_per_s)


def test_more_replicas_carry_more_and_the_fleet_is_fixed() -> None:
    one = capacity(mm1(horizon_s=120.0), rel_tol=0.05, cache=False)
    two = capacity(mm1(horizon_s=120.0), replicas=2, rel_tol=0.05, cache=False)
    assert two.replicas == 2 and two.scenario.pods.replicas == 2 and two.scenario.autoscaler is None
    assert two.rate_per_s > 1.6 * one.rate_per_s


def test_steady_drops_the_autoscaler_and_keeps_min_replicas() -> None:
    rush = Scenario.from_yaml(Path(__file__).resolve().parent.parent / "data" / "scenarios" / "friday_rush.yaml")
    rush = rush.override({"autoscaler.minReplicas": 5, "pods.replicas": 3})
    s = steady(rush, 5.0)
    assert s.autoscaler is None and s.cluster is None and s.pods.replicas == 5  # the floor, not the start
    assert s.workload.arrivals.kind == "poisson" and s.workload.arrivals.rate_per_s == 5.0
    assert s.batching == rush.batching and s.slo == rush.slo


def test_a_trace_has_no_rate_to_vary() -> None:
    trace = Scenario.from_yaml(Path(__file__).resolve().parent.parent / "data" / "scenarios" / "trace_replay.yaml")
    with pytest.raises(SettingsError, match="replays a trace"):
        capacity(trace, cache=False)


def test_capsim_capacity_prints_the_rate_and_its_proof(tmp_path: Path) -> None:
    path = tmp_path / "mm1.yaml"
    path.write_text(yaml.safe_dump(mm1().model_dump(mode="json", by_alias=True)))
    out = CliRunner().invoke(app, ["capacity", str(path), "--horizon-s", "60", "--no-cache"])
    assert out.exit_code == 0, out.output
    assert "capacity of 1 pod(s):" in out.output and "proof, seed 0:" in out.output
    assert "meets the SLO" in out.output and "misses the SLO: seed 0: TTFT p99" in out.output


def test_capacity_per_setting_of_a_grid() -> None:
    from capsim.studies.capacity import capacity_per_setting

    # a slower server carries less; a setting that does not validate reports its error
    table = capacity_per_setting(mm1(horizon_s=120.0), {"service.mean_s": [0.01, 0.02, -1.0]}, rel_tol=0.05,
                                 executor="serial", cache=False, progress=False)
    assert table["service.mean_s"].tolist() == [0.01, 0.02, -1.0]
    fast, slow, bad = table.to_dict("records")
    assert fast["rate_per_s"] > 1.5 * slow["rate_per_s"] > 0
    assert math.isnan(bad["rate_per_s"]) and "service.mean_s" in bad["error"]


def test_a_larger_arrival_overhead_lowers_capacity() -> None:
    # the pod's CPU per arriving request lands on the batch it arrives during: at 2 ms an arrival, on a
    # 10-ms batch of one, the pod serves at most 1 / 12 ms; the starting guess and the search both see it
    base = mm1(horizon_s=120.0)
    slow = base.override({"service.arrival_overhead_ms": 2.0})
    assert _throughput_guess(base, 1) == pytest.approx(MU)
    assert _throughput_guess(slow, 1) == pytest.approx(1 / (1 / MU + 0.002))
    fast_cap = capacity(base, rel_tol=0.05, cache=False).rate_per_s
    slow_cap = capacity(slow, rel_tol=0.05, cache=False).rate_per_s
    assert slow_cap < 0.9 * fast_cap

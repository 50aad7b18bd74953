"""The simulator's own guards: an event budget instead of a hang, and checks made before the run starts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from capsim.errors import CapsimError, SimulationBudgetError
from capsim.model.profile import ProfileError, ProfileRangeError, ServiceTimeProfile
from capsim.model.scenario import Scenario
from capsim.model.scenario_limits import event_budget
from capsim.model.settings import SettingsError
from capsim.sim.arrivals import TraceError
from capsim.sim.simulate import Simulation, simulate

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "data" / "profiles" / "cpu-tiny-float32.csv"


def scenario(**changes: Any) -> Scenario:
    d: dict[str, Any] = {
        "horizon_s": 60,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 20}},
        "service": {"kind": "profile", "profile": str(PROFILE)},
        "pods": {"replicas": 2},
    }
    d.update(changes)
    return Scenario.model_validate(d)


def test_a_run_past_its_event_budget_ends_with_a_typed_error() -> None:
    sc = scenario()
    started = time.perf_counter()
    with pytest.raises(SimulationBudgetError, match="budget of 500 events at t=") as err:
        simulate(sc, 0, max_events=500)
    assert isinstance(err.value, CapsimError)
    assert time.perf_counter() - started < 30
    assert len(simulate(sc, 0).requests) > 1000  # the default budget lets the same run finish


def test_the_default_budget_is_far_above_what_shipped_scenarios_use() -> None:
    for name in ("steady_poisson", "crash_study", "friday_rush"):
        sc = Scenario.from_yaml(ROOT / "data" / "scenarios" / f"{name}.yaml").override({"horizon_s": 300, "warmup_s": 0})
        sim = Simulation(sc, 0)
        steps = 0
        step = sim.env.step

        def counted(step: Any = step) -> None:
            nonlocal steps
            steps += 1
            step()

        sim.env.step = counted  # type: ignore[method-assign]
        sim.run()
        assert steps * 5 < sim.max_events, (name, steps, sim.max_events)
        assert sim.max_events == event_budget(sc, sim.workload.n_requests)


def test_the_budget_counts_the_pods_that_node_failures_and_spot_reclaims_replace() -> None:
    sc = scenario(cluster={"max_gpus": 16, "node_gpus": 4, "billing": "node"})  # 4 nodes of 4 one-GPU pods
    plain = event_budget(sc, 1200)
    for path in ("faults.node_mtbf_s", "cluster.spot"):
        value: Any = 6.0 if path == "faults.node_mtbf_s" else {"price_ratio": 0.4, "mtbf_s": 6.0}
        more = event_budget(sc.override({path: value}), 1200)
        # 4 nodes x 60 s / 6 s = 40 expected, 4 pods replaced each, a crash's 4 events a pod, 20x the estimate
        assert more - plain == 20 * 4 * 4 * 40, path


def test_a_profile_that_does_not_cover_the_batch_size_is_refused_before_the_run() -> None:
    sc = scenario(batching={"max_batch_size": 64})
    with pytest.raises(ProfileRangeError, match=r"batch sizes 1\.\.64 \(measured 1\.\.32\).*service\.extrapolate"):
        Simulation(sc, 0)
    # extrapolation is the documented way to accept it
    Simulation(scenario(batching={"max_batch_size": 64}, service={"kind": "profile", "profile": str(PROFILE),
                                                                 "extrapolate": True}), 0)


def test_a_profile_that_does_not_cover_the_prompts_is_refused_before_the_run() -> None:
    lognormal = {"kind": "lognormal", "mean": 900, "sigma": 1.0}  # no max: the tail passes 1024 tokens
    sc = scenario(workload={"arrivals": {"kind": "poisson", "rate_per_s": 20}, "prompt_tokens": lognormal})
    with pytest.raises(ProfileRangeError, match=r"prompts of \d+\.\.\d+ tokens \(measured 16\.\.1024\)"):
        Simulation(sc, 0)
    short = scenario(workload={"arrivals": {"kind": "poisson", "rate_per_s": 20},
                               "prompt_tokens": {"kind": "constant", "value": 8}})
    with pytest.raises(ProfileRangeError, match=r"prompts of 8\.\.8 tokens"):
        Simulation(short, 0)
    long_output = scenario(workload={"arrivals": {"kind": "poisson", "rate_per_s": 20},
                                     "output_tokens": {"kind": "constant", "value": 3990}})
    with pytest.raises(ProfileRangeError, match=r"decode contexts of 256\.\.4244 tokens \(measured 16\.\.4000\)"):
        Simulation(long_output, 0)


def test_coverage_gaps_name_each_axis() -> None:
    prof = ServiceTimeProfile.from_csv(PROFILE)
    assert prof.coverage_gaps(max_batch_size=32, prompt_tokens=(16, 1024), max_output_tokens=64) == []
    gaps = prof.coverage_gaps(max_batch_size=33, prompt_tokens=(8, 2000), max_output_tokens=3000)
    assert [g.split(" ")[0] for g in gaps] == ["prefill", "decode", "prompts", "decode"]


@pytest.mark.parametrize("seed", [-1, True, 1.5])
def test_a_bad_seed_is_refused(seed: Any) -> None:
    with pytest.raises(SettingsError, match="seed must be an integer >= 0"):
        Simulation(scenario(), seed)


def test_a_missing_or_unreadable_profile_is_a_profile_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="profile file not found"):
        Simulation(scenario(service={"kind": "profile", "profile": str(tmp_path / "none.csv")}), 0)
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(ProfileError, match="is a directory"):
        Simulation(scenario(service={"kind": "profile", "profile": str(tmp_path / "dir.csv")}), 0)
    (tmp_path / "bin.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ProfileError, match="not UTF-8"):
        Simulation(scenario(service={"kind": "profile", "profile": str(tmp_path / "bin.csv")}), 0)


def trace(tmp_path: Path, rows: str) -> Scenario:
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows)
    return scenario(workload={"arrivals": {"kind": "trace", "path": str(path)}},
                    service={"kind": "exponential", "mean_s": 0.01})


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("2023-11-16 18:15:46,374,44\n2023-11-16 18:15:47,2147483648,44\n", "line 3: token counts must be <= 2147483647"),
        ("2023-11-16 18:15:46+00:00,374,44\n2023-11-16 18:15:47,30,4\n", "line 3: TIMESTAMP '2023-11-16 18:15:47' has no time zone"),
        ("2023-11-16 18:15:46,374,44\n2023-11-16 18:15:47Z,30,4\n", "line 3: TIMESTAMP '2023-11-16 18:15:47Z' has a time zone"),
        ("2023-11-16 18:15:46,374,44\n2023-11-16 18:15:45,30,4\n", "line 3: TIMESTAMP goes back in time"),
    ],
)
def test_trace_rows_are_checked_with_their_line(tmp_path: Path, rows: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        Simulation(trace(tmp_path, rows), 0)


def test_trace_time_zones_that_agree_are_fine(tmp_path: Path) -> None:
    sim = Simulation(trace(tmp_path, "2023-11-16 18:15:46+00:00,374,44\n2023-11-16 19:15:47+01:00,30,4\n"), 0)
    assert list(sim.workload.session_start_s) == [0.0, 1.0]


def test_a_scheduled_crash_with_no_pod_to_crash_is_logged_not_dropped() -> None:
    hpa = {"minReplicas": 1, "maxReplicas": 6, "metrics": [
        {"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                  "target": {"type": "AverageValue", "averageValue": "1000"}}}]}
    sc = scenario(autoscaler=hpa, pods={"replicas": 2, "startup_s": 1},
                  faults={"crashes": [{"at_s": 5, "pod": 5}, {"at_s": 10, "pods": 3}]})
    result = simulate(sc, 0)
    assert list(result.crashes.kind) == ["scheduled", "scheduled"] and result.summary.crashes == 2
    skipped = result.skipped_crashes
    assert list(skipped.time_s) == [5.0, 10.0] and list(skipped.pod) == [5, -1]
    assert list(skipped.why) == ["pod 5 not created (yet)", "3 pods asked, 2 ready"]

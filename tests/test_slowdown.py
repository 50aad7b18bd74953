"""``service.slowdown``: a margin on the pods' own compute, the same as multiplying each compute time by hand."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "data" / "scenarios"
COMPUTE = ("request_overhead_ms", "arrival_overhead_ms", "cached_token_us")


def _by_hand(scenario: Scenario, s: float) -> Scenario:
    svc = scenario.service
    return scenario.override({"service.time_scale": svc.time_scale * s,
                              **{f"service.{f}": getattr(svc, f) * s for f in COMPUTE}})


def _frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert len(a) == len(b) > 0
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


@pytest.mark.parametrize("name, overrides", [
    # static batches with a calibrated pod's CPU per request and per arrival
    ("steady_poisson.yaml", {"horizon_s": 120, "warmup_s": 10, "service.request_overhead_ms": 1.5,
                             "service.arrival_overhead_ms": 0.8}),
    # continuous steps with growing sessions, prefix hits (their copy charged) and a crash
    ("agent_sessions.yaml", {"horizon_s": 240, "warmup_s": 10, "service.arrival_overhead_ms": 0.5,
                             "service.cached_token_us": 0.8}),
])
def test_a_slowdown_is_every_compute_time_multiplied_by_it(name: str, overrides: dict[str, object]) -> None:
    base = Scenario.from_yaml(SCENARIOS / name).override(overrides)
    slowed = base.override({"service.slowdown": 1.3})
    a, b = simulate(slowed, seed=3), simulate(_by_hand(base, 1.3), seed=3)
    _frames_equal(a.requests, b.requests)
    assert a.summary.ttft_p99_s == b.summary.ttft_p99_s
    plain = simulate(base, seed=3)
    # not a no-op: the same arrivals take longer on slower pods
    assert a.summary.ttft_p50_s > plain.summary.ttft_p50_s
    assert (a.requests.end_s - a.requests.arrival_s).mean() > (plain.requests.end_s - plain.requests.arrival_s).mean()


def test_the_way_in_and_out_are_not_the_pods_compute() -> None:
    svc = Scenario.from_yaml(SCENARIOS / "steady_poisson.yaml").override(
        {"service.slowdown": 2.0, "service.time_scale": 1.5, "service.ingress_ms": 3.0, "service.answer_ms": 4.0,
         "service.request_overhead_ms": 1.0, "service.arrival_overhead_ms": 0.5, "service.cached_token_us": 0.2}
    ).service
    eff = svc.effective()
    assert (eff.time_scale, eff.request_overhead_ms, eff.arrival_overhead_ms, eff.cached_token_us, eff.slowdown) == (
        3.0, 2.0, 1.0, 0.4, 1.0)
    assert (eff.ingress_ms, eff.answer_ms) == (3.0, 4.0)
    assert svc.time_scale == 1.5 and svc.slowdown == 2.0  # the section itself is left as written
    assert eff.effective() is eff  # no second multiplication


def test_a_slowdown_applies_on_top_of_an_included_calibrated_pod(tmp_path: Path) -> None:
    # the calibrated fragment's own time_scale and overheads stay as measured; the margin multiplies them
    plan = Scenario.from_yaml(SCENARIOS / "calibrated_pod.yaml")
    slowed = plan.override({"service.slowdown": 1.2})
    eff = slowed.service.effective()
    assert eff.time_scale == pytest.approx(1.2 * plan.service.time_scale)
    assert eff.arrival_overhead_ms == pytest.approx(1.2 * plan.service.arrival_overhead_ms)
    assert slowed.service.time_scale == plan.service.time_scale


def test_capsim_checks_mean_batch_times_take_the_slowdown() -> None:
    # capsim check times batches with sim.service.calibrated: the margin is in its batch times too
    from capsim.model.profile import ServiceTimeProfile
    from capsim.sim.service import ProfileService, calibrated

    base = Scenario.from_yaml(SCENARIOS / "steady_poisson.yaml").override({"service.request_overhead_ms": 2.0})
    profile = ServiceTimeProfile.from_csv(base.resolve(base.service.profile))
    plain = calibrated(ProfileService(profile, None), base.service).batch_time(8, 256, 64)
    slowed = calibrated(ProfileService(profile, None), base.override({"service.slowdown": 1.5}).service).batch_time(
        8, 256, 64)
    assert slowed == pytest.approx((1.5 * plain[0], 1.5 * plain[1]))


@pytest.mark.parametrize("value", [0, -1, 11, True, "fast"])
def test_a_bad_slowdown_names_the_field(value: object) -> None:
    with pytest.raises(SettingsError, match=r"service\.slowdown"):
        Scenario.from_yaml(SCENARIOS / "steady_poisson.yaml").override({"service.slowdown": value})


def test_the_shipped_margin_grid_slows_the_calibrated_plan_and_raises_its_floor() -> None:
    from capsim.studies.sweep import expand_grid, load_grid

    plan = Scenario.from_yaml(SCENARIOS / "calibrated_pod.yaml")
    settings = expand_grid(load_grid(ROOT / "data" / "studies" / "margin_grid.yaml"))
    scenarios = [plan.override(s.changes) for s in settings]
    assert len(scenarios) == 12
    assert sorted({(sc.service.slowdown, sc.autoscaler.min_replicas) for sc in scenarios if sc.autoscaler}) == [
        (s, m) for s in (1.0, 1.2, 1.3, 1.4) for m in (3, 4, 5)]
    # the calibration itself is the included fragment's, whatever the margin
    assert {sc.service.time_scale for sc in scenarios} == {plan.service.time_scale}


def test_a_validation_says_the_margin_its_runs_ran_at_beside_the_calibrated_pod(tmp_path: Path) -> None:
    # each validation appends to service.yaml the speeds its runs measured after the calibration and the
    # service.slowdown that covers them; the fragment still loads as it did
    import yaml

    from capsim.studies.validate_runs import SERVICE_FILE, note_observed_speed, observed_speed

    assert observed_speed([1.05, float("nan"), None, 0.97, 1.18, -1.0, 0.0]) == {"min": 0.97, "max": 1.18, "runs": 3}
    assert observed_speed([float("nan"), None]) is None
    assert note_observed_speed(tmp_path, None, "the pod") is None
    fragment = {"service": {"kind": "deterministic", "mean_s": 0.05, "time_scale": 1.2}, "batching": {}}
    path = tmp_path / SERVICE_FILE
    path.write_text(yaml.safe_dump(fragment))
    line = note_observed_speed(tmp_path, observed_speed([0.97, 1.18]), "the pod")
    assert line is not None and "0.97 to 1.18 times this calibration over 2 runs" in line
    assert "service.slowdown 1.18 or more" in line
    text = path.read_text()
    assert text.endswith(f"# After the calibration, {line}.\n") and yaml.safe_load(text) == fragment
    # a pod that only ran faster than calibrated needs no margin: 1
    assert "service.slowdown 1.00 or more" in (note_observed_speed(tmp_path, observed_speed([0.9, 0.95]), "x") or "")
    # no service.yaml (no calibration): the line alone
    assert note_observed_speed(tmp_path / "none", observed_speed([1.1]), "the pod") is not None

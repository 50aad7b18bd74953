"""KEDA's cron triggers (``autoscaler.keda.cron``): a window of wall-clock time in which KEDA asks for replicas.

The scaler's rule (kedacore/keda ``pkg/scalers/cron_scaler.go``): active when its end schedule fires before its
start schedule next, its metric then ``desiredReplicas`` and 1 outside, read by the HPA against an ``AverageValue``
of 1; KEDA answers it itself, so it holds through a Prometheus outage.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from capsim.export import DeployTarget
from capsim.export.keda import build_scaled_object
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.policy.keda_cron import CronWindow
from capsim.sim import Simulation
from test_export import KEDA_SCALED_OBJECT

H100 = Path(__file__).resolve().parents[1] / "data" / "scenarios" / "h100_llama3_8b_rush.yaml"
FRIDAY_5PM = datetime(2026, 12, 4, 17, 0, tzinfo=UTC)  # a Friday


def window(start: str, end: str, tz: str = "UTC", at: datetime = FRIDAY_5PM) -> CronWindow:
    return CronWindow(tz, start, end, 6, at)


def test_the_window_opens_at_its_start_and_closes_at_its_end() -> None:
    w = window("25 17 * * 5", "0 18 * * 5")  # Fridays 17:25 to 18:00
    assert [w.active(t) for t in (0, 1499, 1500, 1501, 3599, 3600, 3601)] == [
        False, False, True, True, True, False, False]
    assert w.value(1499.9) == 1.0 and w.value(1500) == 6.0


def test_a_window_over_midnight_and_one_on_another_day() -> None:
    night = window("0 22 * * *", "0 2 * * *")
    assert night.active(5 * 3600 + 1) and night.active(8 * 3600 + 59 * 60) and not night.active(9 * 3600 + 1)
    assert not night.active(3600)
    monday = window("0 9 * * 1", "0 17 * * 1")
    assert not any(monday.active(h * 3600) for h in range(0, 48))  # Friday and Saturday
    assert monday.active((3 * 24 - 17 + 9) * 3600 + 60)  # Monday 09:01


def test_the_schedules_are_read_in_the_triggers_time_zone() -> None:
    # 17:25 in Berlin (UTC+1 in December) is 16:25 UTC: the run starting at 17:00 UTC is already past it
    berlin = window("25 17 * * 5", "0 19 * * 5", "Europe/Berlin")
    assert berlin.active(0) and not berlin.active(3601)
    assert not window("25 17 * * 5", "0 19 * * 5").active(0)


def rush_on_keda(**keda: Any) -> Scenario:
    ext = [{"type": "External", "external": {"metric": {"name": "vllm:num_requests_waiting"},
                                             "target": {"type": "AverageValue", "averageValue": "4"}}}]
    return Scenario.from_yaml(H100).override({
        "horizon_s": 2400, "autoscaler.minReplicas": 2, "autoscaler.metrics": ext,
        "autoscaler.keda": {"polling_interval_s": 15, **keda}})


CRON = {"clock_start": "2026-12-04T17:00:00+01:00",
        "cron": [{"timezone": "Europe/Berlin", "start": "25 17 * * 5", "end": "40 17 * * 5", "desired_replicas": 6}]}


def test_the_hpa_holds_the_window_s_replicas_through_the_rush() -> None:
    plain = Simulation(rush_on_keda(), seed=0).run()
    cron = Simulation(rush_on_keda(**CRON), seed=0).run()
    ts = cron.timeseries
    sync_s = 15.0
    before = ts[(ts.time_s > 1200) & (ts.time_s < 1500)]
    assert (before.desired_replicas == 2).all()  # the floor, before the window
    opened = ts[(ts.time_s >= 1500 + 2 * sync_s) & (ts.time_s < 2400)]
    assert (opened.desired_replicas >= 6).all()  # from the first syncs in the window on, through the rush
    # six pods when the rush comes at 1,800 s: its p99 TTFT holds, where the floor of 2 lets a backlog build
    assert cron.summary.ttft_p99_s < 1.0 < plain.summary.ttft_p99_s


def test_the_window_holds_through_a_prometheus_outage() -> None:
    scen = rush_on_keda(**CRON).override({"horizon_s": 1800, "faults": {"metrics_outages": [
        {"at_s": 1400, "duration_s": 400}]}})
    ts = Simulation(scen, seed=0).run().timeseries
    # no Prometheus metric answers from 1,400 s, and the cron trigger still takes the Deployment up at 1,500 s
    assert (ts[(ts.time_s > 1400) & (ts.time_s < 1500)].desired_replicas == 2).all()
    assert (ts[(ts.time_s >= 1530)].desired_replicas >= 6).all()


def test_a_window_wakes_a_deployment_at_zero() -> None:
    quiet = rush_on_keda(**CRON).override({
        "horizon_s": 1700, "autoscaler.minReplicas": 0, "pods.replicas": 0,
        "workload.arrivals.rate_per_s": [[0, 0.0], [1690, 0.01]], "autoscaler.keda.initial_cooldown_period_s": 0})
    r = Simulation(quiet, seed=0).run()
    ups = r.scale_events[(r.scale_events.to_replicas > r.scale_events.from_replicas)]
    assert len(ups) and 1500 <= ups.time_s.iloc[0] <= 1500 + 15  # KEDA's first poll in the window wakes it
    assert r.timeseries.desired_replicas.max() == 6


@pytest.mark.parametrize(("change", "message"), [
    ({"start": "25 17 * *"}, "autoscaler.keda.cron.0.start: must be a five-field cron schedule"),
    ({"end": "61 17 * * 5"}, "autoscaler.keda.cron.0.end: must be a five-field cron schedule"),
    ({"end": "25 17 * * 5"}, "autoscaler.keda.cron.0.start and end must differ"),
    ({"timezone": "Mars/Olympus"}, "autoscaler.keda.cron.0.timezone: must be an IANA time zone"),
])
def test_a_bad_trigger_is_refused_naming_its_field(change: dict[str, Any], message: str) -> None:
    trig = {**CRON["cron"][0], **change}  # type: ignore[index]
    with pytest.raises(SettingsError, match=message):
        rush_on_keda(clock_start=CRON["clock_start"], cron=[trig])


def test_cron_triggers_need_the_runs_clock_and_a_bare_time_is_utc() -> None:
    with pytest.raises(SettingsError, match="cron triggers need clock_start"):
        rush_on_keda(cron=CRON["cron"])
    scen = rush_on_keda(clock_start="2026-12-04T16:00:00", cron=CRON["cron"])
    assert scen.autoscaler is not None and scen.autoscaler.keda is not None
    assert scen.autoscaler.keda.clock_start == datetime(2026, 12, 4, 16, 0, tzinfo=UTC)


def test_the_scaled_object_carries_the_cron_triggers() -> None:
    obj = build_scaled_object(rush_on_keda(**CRON), DeployTarget())
    jsonschema.validate(yaml.safe_load(yaml.safe_dump(obj)), KEDA_SCALED_OBJECT)
    triggers = obj["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["prometheus", "cron"]
    assert triggers[1] == {"type": "cron", "name": "cron-0", "metadata": {
        "timezone": "Europe/Berlin", "start": "25 17 * * 5", "end": "40 17 * * 5", "desiredReplicas": "6"}}


def test_checks_catch_a_window_that_never_opens_and_one_that_raises_nothing() -> None:
    from capsim.studies.checks import run_checks

    def fired(scen: Scenario) -> list[tuple[str, str]]:
        return [(f.check, f.path) for f in run_checks(scen) if f.check.startswith("cron-")]

    assert fired(rush_on_keda(**CRON)) == []
    saturday = {**CRON["cron"][0], "start": "25 17 * * 6", "end": "40 17 * * 6"}  # type: ignore[index]
    assert fired(rush_on_keda(clock_start=CRON["clock_start"], cron=[saturday])) == [
        ("cron-never-opens", "autoscaler.keda.cron.0")]
    # the run starts at 17:00 in Berlin; the same schedule in New York's time opens at 23:25 Berlin time
    new_york = {**CRON["cron"][0], "timezone": "America/New_York"}  # type: ignore[index]
    assert fired(rush_on_keda(clock_start=CRON["clock_start"], cron=[new_york])) == [
        ("cron-never-opens", "autoscaler.keda.cron.0")]
    for n in (2, 33):
        low = {**CRON["cron"][0], "desired_replicas": n}  # type: ignore[index]
        assert fired(rush_on_keda(clock_start=CRON["clock_start"], cron=[low])) == [
            ("cron-outside-bounds", "autoscaler.keda.cron.0.desired_replicas")]


def test_export_writes_the_trigger_and_the_clock_it_was_read_at(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from capsim.cli import app

    path = tmp_path / "cron.yaml"
    path.write_text(yaml.safe_dump(rush_on_keda(**CRON).model_dump(mode="json", by_alias=True, exclude_none=True)))
    out = tmp_path / "deploy"
    result = CliRunner().invoke(app, ["export", str(path), "--out", str(out), "--no-simulate"])
    assert result.exit_code == 0, result.output
    obj = yaml.safe_load((out / "keda-scaledobject.yaml").read_text())
    assert obj["spec"]["triggers"][-1]["type"] == "cron"
    readme = (out / "README.md").read_text()
    assert "the run started at 2026-12-04T17:00:00+01:00" in readme and "from `25 17 * * 5` to `40 17 * * 5`" in readme

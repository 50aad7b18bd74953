"""The demo: the store hand-over, the rush what-ifs, the tuned pick, and the whole job writing its report."""

import asyncio
import re

import pytest

from capsim.demo import _run, _rush_demo, _store_demo, pick_tuned, run_demo
from capsim.model.scenario import Scenario


def test_store_demo_resumes_both_turns():
    lines: list[str] = []
    assert asyncio.run(_store_demo(lines.append)) == 2
    assert any("pod B resumed agent-7 at version 2" in line for line in lines)


def test_rush_demo_shows_which_floor_rides_the_rush():
    lines: list[str] = []
    configured, floor4, floor6 = _rush_demo(lines.append)
    assert not configured["slo_met"]  # the HPA as configured reacts too late for the rush
    assert configured["max_replicas"] > 6  # ... and then overshoots on the backlog
    assert not floor4["slo_met"]
    assert floor6["slo_met"] and floor6["max_replicas"] == 6
    assert floor6["cost"] < 1.1 * configured["cost"]
    assert pick_tuned([configured, floor4, floor6]) is floor6


def test_pick_tuned_is_the_cheapest_that_met_the_slo():
    rows = [{"cost": 1.0, "ttft_p99_s": 9.0, "slo_met": False}, {"cost": 3.0, "ttft_p99_s": 0.2, "slo_met": True},
            {"cost": 2.0, "ttft_p99_s": 0.5, "slo_met": True}, {"cost": 2.0, "ttft_p99_s": 0.4, "slo_met": True}]
    assert pick_tuned(rows) is rows[3]
    assert pick_tuned(rows[:1]) is None


def test_run_works_inside_a_running_loop():
    async def inner() -> int:
        await asyncio.sleep(0)
        return 7

    async def notebook_cell() -> int:  # a notebook's code runs inside the kernel's loop
        return _run(inner())

    assert _run(inner()) == 7
    assert asyncio.run(notebook_cell()) == 7


@pytest.mark.slow
def test_demo_writes_the_report_the_figures_and_the_manifests(tmp_path):
    rush = Scenario.from_yaml("data/scenarios/friday_rush.yaml").override({
        "horizon_s": 900, "warmup_s": 30, "workload.arrivals.rate_per_s": [[0, 8], [300, 96], [480, 8]]})
    lines: list[str] = []
    out = tmp_path / "out"
    results = run_demo(lines.append, tmp_path / "profiles", out, rush_scenario=rush, progress=False)
    report = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) >= 4
    for name in pngs:  # every figure the report shows exists, and every figure is shown
        assert f"]({name})" in report
    assert results["tuned"] is not None and results["tuned"]["slo_met"]
    assert f"**{results['tuned']['setting']}**" in report
    k8s = {p.name for p in (out / "k8s").iterdir()}
    assert {"hpa.yaml", "configmap.yaml", "deployment-patch.yaml"} <= k8s
    assert "minReplicas: 6" in (out / "k8s" / "hpa.yaml").read_text()  # the tuned floor, exported
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \|", report, flags=re.M)
    assert [int(b) for b, _ in rows] == [1, 8, 32]  # the batching table
    assert results["batching_speedup"] > 1.0
    assert lines[-1].startswith("== report: ") and lines[-1].endswith("report.md")

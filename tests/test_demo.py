"""The demo's steps that need no profiling run: the store hand-over and the rush what-ifs."""

import asyncio

from capsim.demo import _rush_demo, _store_demo


def test_store_demo_resumes_both_turns():
    lines: list[str] = []
    assert asyncio.run(_store_demo(lines.append)) == 2
    assert any("pod B resumed agent-7 at version 2" in line for line in lines)


def test_rush_demo_finds_a_cheaper_setting_that_meets_the_slo():
    lines: list[str] = []
    rows = _rush_demo(lines.append)
    configured, *others = rows
    assert not configured["slo_met"]  # the HPA as configured is too slow for the rush
    winners = [r for r in others if r["slo_met"]]
    assert winners and min(r["cost"] for r in winners) < configured["cost"]

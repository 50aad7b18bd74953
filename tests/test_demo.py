"""The demo's steps that need no profiling run: the store hand-over and the rush what-ifs."""

import asyncio

from capsim.demo import _rush_demo, _store_demo


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

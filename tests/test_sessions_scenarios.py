"""The shipped session scenarios (agent, chat, 70B agents on GPU pods) load, pass the checks, and run in
continuous mode."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from capsim.cli import app
from capsim.model.scenario import Scenario
from capsim.paths import PROJECT_ROOT
from capsim.sim import simulate

SESSION_SCENARIOS = ("agent_sessions", "chat_sessions", "h100x4_llama3_70b_agents")


@pytest.mark.parametrize("name", SESSION_SCENARIOS)
def test_session_scenarios_run_continuous_with_growing_sessions(name: str) -> None:
    sc = Scenario.from_yaml(PROJECT_ROOT / "data" / "scenarios" / f"{name}.yaml")
    assert sc.batching.mode == "continuous" and sc.workload.sessions.new_tokens is not None
    r = simulate(sc.override({"horizon_s": 300, "warmup_s": 60}), seed=1)
    s, df = r.summary, r.requests
    assert s.completed > 100
    turns = sc.workload.sessions.turns
    # later turns carry their history: prompts grow within a session
    first = df[df["request_id"] % turns == 0]["prompt_tokens"].mean()
    later = df[df["request_id"] % turns >= 2]["prompt_tokens"].mean()
    assert later > first


def test_capsim_check_passes_the_session_scenarios() -> None:
    paths = [str(PROJECT_ROOT / "data" / "scenarios" / f"{n}.yaml") for n in SESSION_SCENARIOS]
    out = CliRunner().invoke(app, ["check", *paths])
    assert out.exit_code == 0, out.output

"""Lost conversations count: sessions a crash loses with pod-local state, their unsent turns, a session-level SLO."""

from __future__ import annotations

import numpy as np
import pytest

from capsim.model.scenario import Scenario
from capsim.sim import simulate

CRASH_AT = 600.0
TURNS = 4


def agents(store: str) -> Scenario:
    """Multi-turn agents that mostly think (10 s between turns) on 6 pods; one pod crashes at 600 s."""
    return Scenario.model_validate({
        "horizon_s": 1200, "warmup_s": 60,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 5},
                     "sessions": {"turns": TURNS, "think_time_s": 10}},
        "service": {"kind": "deterministic", "mean_s": 0.05},
        "batching": {"max_batch_size": 8, "max_wait_ms": 5},
        "pods": {"replicas": 6, "startup_s": 30},
        "router": {"kind": "session_affinity"},
        "faults": {"crashes": [{"at_s": CRASH_AT, "pod": 2}]},
        "state": {"store": store},
        "client": {"timeout_s": 30, "max_retries": 2, "backoff_s": 0.5},
        "slo": {"ttft_p99_s": 1.0, "max_error_rate": 0.001, "max_session_failure_rate": 0.001},
    })


def test_a_crash_that_loses_sessions_misses_the_session_slo_though_requests_look_fine() -> None:
    r = simulate(agents("pod_local"), seed=4)
    s, df = r.summary, r.requests
    # the request-level numbers alone look fine: what the old summary called slo_met
    assert s.error_rate <= 0.001 and s.ttft_p99_s <= 1.0
    assert s.lost_sessions > 10
    # the sessions lost are those living on pod 2 at the crash: counted from the requests frame
    first = df[df["request_id"] % TURNS == 0].set_index("session_id")
    on_pod = set(first.index[(first["pod"] == 2) & (first["arrival_s"] < CRASH_AT)])
    finished = set(df[(df["request_id"] % TURNS == TURNS - 1) & (df["outcome"] == "ok")
                      & (df["end_s"] < CRASH_AT)]["session_id"])
    lost = on_pod - finished
    assert s.lost_sessions == len(lost)
    # their unsent turns: a lost session sent some of its turns, never the rest
    sent = df[df["session_id"].isin(lost)].groupby("session_id").size()
    assert s.lost_turns == TURNS * len(lost) - int(sent.sum()) > s.lost_sessions
    # the session failure rate: failed or lost sessions among those started after the warm-up
    starts = first["arrival_s"]
    failed = set(df[df["outcome"].notna() & (df["outcome"] != "ok")]["session_id"]) | lost
    measured = set(starts.index[starts >= 60])
    assert s.session_failure_rate == pytest.approx(len(failed & measured) / len(measured))
    assert s.session_failure_rate > 0.001
    assert not s.session_slo_met and not s.slo_met


def test_with_sessions_in_redis_the_same_crash_meets_both_slos() -> None:
    s = simulate(agents("redis"), seed=4).summary
    assert s.lost_sessions == 0 and s.lost_turns == 0
    assert s.session_failure_rate <= 0.001 and s.session_slo_met and s.slo_met


def test_the_session_slo_is_a_setting() -> None:
    lenient = agents("pod_local").override({"slo.max_session_failure_rate": 0.05})
    s = simulate(lenient, seed=4).summary
    assert s.session_slo_met and s.slo_met and s.lost_sessions > 10
    assert np.isfinite(s.session_failure_rate)

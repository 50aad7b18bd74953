"""Faults: crashes with pod-local vs Redis session state, Redis outages, timeouts and retries."""

from __future__ import annotations

import numpy as np
import pandas as pd

from capsim.model.scenario import Scenario
from capsim.sim import simulate

CRASH_AT = 100.0


def sessions_scenario(store: str, **changes: object) -> Scenario:
    s = Scenario.model_validate({
        "horizon_s": 200,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 2},
                     "sessions": {"turns": 3, "think_time_s": 4}},
        "service": {"kind": "deterministic", "mean_s": 1.0},
        "batching": {"max_batch_size": 8, "max_wait_ms": 10},
        "pods": {"replicas": 4, "startup_s": 30},
        "router": {"kind": "session_affinity"},
        "faults": {"crashes": [{"at_s": CRASH_AT, "pod": 1}]},
        "state": {"store": store},
        "client": {"timeout_s": 30, "max_retries": 2, "backoff_s": 0.5},
    })
    return s.override(changes) if changes else s


def living_on(df: pd.DataFrame, pod: int, at: float, turns: int) -> set[int]:
    """Sessions whose first turn went to ``pod`` before ``at`` and that had not finished by then."""
    first = df[df["request_id"] % turns == 0].set_index("session_id")
    started = set(first.index[(first["pod"] == pod) & (first["arrival_s"] < at)])
    done = df[(df["request_id"] % turns == turns - 1) & (df["outcome"] == "ok") & (df["end_s"] < at)]
    return started - set(done["session_id"])


def test_pod_local_crash_loses_exactly_the_sessions_on_that_pod() -> None:
    r = simulate(sessions_scenario("pod_local"), seed=3)
    df = r.requests
    expected = living_on(df, pod=1, at=CRASH_AT, turns=3)
    assert len(expected) > 0
    assert r.summary.lost_sessions == len(expected)
    assert r.crashes["time_s"].tolist() == [CRASH_AT] and r.crashes["pod"].tolist() == [1]
    # a lost session sends nothing after the crash
    later = df[df["session_id"].isin(expected) & (df["arrival_s"] > CRASH_AT)]
    assert later.empty
    # its request on the pod failed at the crash, without a retry
    failed = df[df["session_id"].isin(expected) & (df["outcome"] == "failed")]
    assert (failed["end_s"] == CRASH_AT).all() and (failed["attempts"] == 1).all()


def test_redis_state_loses_no_session_in_a_crash() -> None:
    # the crashed pod stays in the endpoints for 2 s (crash_detection_s + endpoints_propagation_s) and
    # refuses what affinity sends it: the retries must outlast that (1 s, then 2 s more)
    r = simulate(sessions_scenario("redis", **{"client.backoff_s": 1.0}), seed=3)
    assert r.summary.lost_sessions == 0
    assert r.summary.retries > 0  # the crashed pod's requests were retried elsewhere
    assert r.summary.abandoned_sessions == 0
    df = r.requests
    moved = df[(df["attempts"] > 1) & (df["outcome"] == "ok")]
    assert (moved["pod"] != 1).any()


def test_redis_outage_fails_requests_sent_during_it() -> None:
    s = sessions_scenario("redis").override({
        "faults": {"redis_outages": [{"at_s": 50, "duration_s": 20}]},
        "client.max_retries": 0,
        "workload.sessions.turns": 1,
    })
    df = simulate(s, seed=1).requests
    during = (df["arrival_s"] >= 50) & (df["arrival_s"] < 70)
    assert during.sum() > 10
    assert (df.loc[during, "outcome"] == "failed").all()
    assert (df.loc[~during & df["outcome"].notna(), "outcome"] == "ok").all()
    assert (df.loc[during, "end_s"] == df.loc[during, "arrival_s"]).all()
    # with pod-local state Redis does not matter
    local = simulate(s.override({"state.store": "pod_local"}), seed=1).requests
    assert (local["outcome"].dropna() == "ok").all()


def test_overload_times_out_and_retries_with_backoff() -> None:
    s = Scenario.model_validate({
        "horizon_s": 120,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 3}},
        "service": {"kind": "deterministic", "mean_s": 0.5},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0, "queue_capacity": 100000},
        "pods": {"replicas": 1},
        "client": {"timeout_s": 5, "max_retries": 2, "backoff_s": 1.0, "backoff_multiplier": 2.0},
    })
    r = simulate(s, seed=0)
    df, sm = r.requests, r.summary
    assert sm.timed_out > 0 and sm.retries > 0
    timed_out = df[df["outcome"] == "timed_out"]
    assert (timed_out["attempts"] == 3).all()
    # three attempts of 5 s each plus backoffs of 1 s and 2 s
    np.testing.assert_allclose(timed_out["end_s"] - timed_out["arrival_s"], 5 + 1 + 5 + 2 + 5)
    assert sm.arrived == sm.completed + sm.failed + sm.timed_out + sm.rejected + sm.in_flight


def test_random_crashes_restart_and_cold_start() -> None:
    s = sessions_scenario("redis").override({
        "faults": {"pod_mtbf_s": 100}, "horizon_s": 400, "workload.sessions.turns": 1})
    r = simulate(s, seed=2)
    assert r.summary.crashes >= 5
    ts = r.timeseries
    assert (ts["starting_replicas"] > 0).any()  # crashed pods restart and cold-start
    assert (ts["ready_replicas"] + ts["starting_replicas"] + ts["crashed_replicas"] == 4).all()

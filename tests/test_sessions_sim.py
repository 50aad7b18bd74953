"""Growing sessions in the simulator: exact prompt lengths, closed and open loop, TTL expiry, context overflow."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim import simulate
from capsim.sim.arrivals import make_workload
from capsim.sim.sessions import SessionPrefix, stream_hash_list, stream_hashes
from capsim.sim.streams import Streams

TURNS = 4


def scenario(**over: Any) -> Scenario:
    """Sessions of 4 turns, constant lengths (first prompt 100, new messages 10, answers 20), one pod that
    answers in 0.1 s, few sessions: nothing queues, so every time is known."""
    base: dict[str, Any] = {
        "horizon_s": 400,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 0.05},
                     "prompt_tokens": {"kind": "constant", "value": 100},
                     "output_tokens": {"kind": "constant", "value": 20},
                     "sessions": {"turns": TURNS, "think_time_s": 2.0,
                                  "new_tokens": {"kind": "constant", "value": 10}}},
        "service": {"kind": "deterministic", "mean_s": 0.1},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0},
        "pods": {"replicas": 1},
    }
    sc = Scenario.model_validate(base)
    return sc.override(over) if over else sc


def by_turn(df: Any) -> Any:
    df = df.sort_values("request_id")
    return df.assign(turn=df["request_id"] % TURNS)


def test_a_turns_prompt_is_its_sessions_history_plus_the_new_message() -> None:
    df = by_turn(simulate(scenario(), seed=3).requests)
    done = df[df.groupby("session_id")["turn"].transform("max") == TURNS - 1]
    assert len(done) >= 4 * TURNS
    # 100; 100 + 20 + 10; 130 + 20 + 10; ...
    for k, want in enumerate([100, 130, 160, 190]):
        assert (done[done["turn"] == k]["prompt_tokens"] == want).all()


def test_without_new_tokens_prompts_are_drawn_per_turn_as_before() -> None:
    df = simulate(scenario(**{"workload.sessions.new_tokens": None}), seed=3).requests
    assert (df["prompt_tokens"] == 100).all()


def test_closed_loop_the_next_turn_is_sent_a_think_time_after_the_answer() -> None:
    df = by_turn(simulate(scenario(), seed=3).requests).set_index("request_id")
    later = df[df["turn"] > 0]
    prev_end = df.loc[later.index - 1, "end_s"].to_numpy()
    np.testing.assert_allclose(later["arrival_s"].to_numpy(), prev_end + 2.0)


def test_open_loop_the_next_turn_is_sent_a_think_time_after_the_previous_send() -> None:
    df = by_turn(simulate(scenario(**{"workload.sessions.mode": "open"}), seed=3).requests).set_index("request_id")
    later = df[df["turn"] > 0]
    prev_send = df.loc[later.index - 1, "arrival_s"].to_numpy()
    np.testing.assert_allclose(later["arrival_s"].to_numpy(), prev_send + 2.0)


def test_think_time_may_be_a_distribution() -> None:
    sc = scenario(**{"workload.sessions.think_time_s": {"kind": "exponential", "mean_s": 2.0}})
    df = by_turn(simulate(sc, seed=3).requests).set_index("request_id")
    later = df[df["turn"] > 0]
    gaps = later["arrival_s"].to_numpy() - df.loc[later.index - 1, "end_s"].to_numpy()
    assert (gaps >= 0).all() and len(np.unique(np.round(gaps, 9))) == len(gaps)
    assert 1.0 < gaps.mean() < 3.5


def test_an_idle_session_past_the_ttl_loses_its_history_and_starts_fresh() -> None:
    # think 10 s, ttl 5 s: every later turn finds its history expired, so it is only its new message
    sc = scenario(**{"workload.sessions.think_time_s": 10.0, "state.ttl_s": 5.0})
    r = simulate(sc, seed=3)
    df = by_turn(r.requests)
    later = df[df["turn"] > 0]
    assert (later["prompt_tokens"] == 10).all()
    assert r.summary.sessions_expired == len(later) > 0
    # a ttl longer than the think time keeps every history
    r2 = simulate(scenario(**{"workload.sessions.think_time_s": 10.0, "state.ttl_s": 30.0}), seed=3)
    assert r2.summary.sessions_expired == 0
    assert (by_turn(r2.requests).query("turn == 3")["prompt_tokens"] == 190).all()


def test_a_session_that_would_pass_max_model_len_ends_or_drops_its_oldest_turns() -> None:
    # turn 2 would need 160 + 20 = 180 tokens > 170
    r = simulate(scenario(**{"batching.max_model_len": 170}), seed=3)
    df = by_turn(r.requests)
    assert df["turn"].max() == 1
    n_sessions = df["session_id"].nunique()
    assert r.summary.sessions_ended_on_overflow == n_sessions - int(df["arrival_s"].isna().sum())
    assert r.summary.sessions_ended_on_overflow > 0 and r.summary.completed == len(df)
    r = simulate(scenario(**{"batching.max_model_len": 170,
                             "workload.sessions.on_context_overflow": "truncate_oldest"}), seed=3)
    df = by_turn(r.requests)
    # turn 2: drop turn 0 (100 + 20): 10 + 20 + 10 = 40; turn 3: 40 + 20 + 10 = 70
    done = df[df.groupby("session_id")["turn"].transform("max") == TURNS - 1]
    assert len(done) > 0
    assert (done[done["turn"] == 2]["prompt_tokens"] == 40).all()
    assert (done[done["turn"] == 3]["prompt_tokens"] == 70).all()
    assert r.summary.sessions_truncated == (df["turn"] == 2).sum() and r.summary.sessions_ended_on_overflow == 0


def test_session_prefix_turns_share_their_sessions_leading_blocks() -> None:
    p = SessionPrefix(turns=TURNS, n_requests=8)
    prompt = np.array([100, 130, 160, 190, 100, 130, 160, 190], dtype=np.int32)
    p.bind(prompt, np.full(8, 20, dtype=np.int32))
    a, b = p.block_hashes(0, 16), p.block_hashes(1, 16)
    assert len(a) == 120 // 16 and len(b) == 150 // 16
    np.testing.assert_array_equal(a, b[: len(a)])
    assert not set(a) & set(p.block_hashes(4, 16))  # another session shares nothing
    p.epoch[1] = 1  # the history was lost: the stream starts anew
    assert not set(a) & set(p.block_hashes(1, 16))
    h = stream_hashes(0, 0, 10_000)
    assert len(np.unique(h)) == len(h) and (h > 0).all()


def test_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match="think_time_s"):
        scenario(**{"workload.sessions.think_time_s": -1})
    with pytest.raises(SettingsError, match="on_context_overflow"):
        scenario(**{"workload.sessions.on_context_overflow": "drop"})
    with pytest.raises(SettingsError, match="ttl_s"):
        scenario(**{"state.ttl_s": 0})


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_len=st.integers(200, 2000), policy=st.sampled_from(["end", "truncate_oldest"]),
       seed=st.integers(0, 1000), mode=st.sampled_from(["closed", "open"]))
def test_every_prompt_is_the_kept_history_plus_its_message(max_len: int, policy: str, seed: int, mode: str) -> None:
    sc = scenario(**{
        "horizon_s": 200, "workload.arrivals.rate_per_s": 0.2, "batching.max_model_len": max_len,
        "workload.prompt_tokens": {"kind": "lognormal", "mean": 150, "sigma": 0.5, "max": 190},
        "workload.output_tokens": {"kind": "lognormal", "mean": 30, "sigma": 0.5, "max": 100},
        "workload.sessions.new_tokens": {"kind": "lognormal", "mean": 40, "sigma": 0.8, "max": 500},
        "workload.sessions.on_context_overflow": policy, "workload.sessions.mode": mode,
    })
    wl = make_workload(sc, Streams(seed))
    assert wl.message_tokens is not None
    r = simulate(sc, seed=seed)
    df = r.requests.set_index("request_id")
    msg, out = wl.message_tokens, wl.output_tokens
    for i, row in df.iterrows():
        k = int(i) % TURNS
        p = int(row["prompt_tokens"])
        if k == 0:
            assert p == msg[i]
            continue
        # a later turn fits, and its prompt is its message after a suffix of its session's earlier turns
        assert p + out[i] <= max_len and p >= msg[i]
        units = [int(msg[j] + out[j]) for j in range(i - k, i)]
        kept = p - int(msg[i])
        if mode == "closed" and policy == "end":
            assert kept == sum(units)  # every earlier turn was answered before this one was sent
        else:
            assert kept in {sum(units[d:e]) for d in range(k + 1) for e in range(d, k + 1)}
    if policy == "end":
        assert r.summary.sessions_truncated == 0
    else:
        assert r.summary.sessions_ended_on_overflow <= int((df.index % TURNS == 0).sum())


def test_stream_hashes_are_distinct_per_session_epoch_and_block_and_checked_at_their_bounds() -> None:
    ref = [(1 << 61) + (j << 39) + (7 << 12 | 2) for j in range(1, 301)]
    assert stream_hashes(7, 2, 300).tolist() == ref
    assert stream_hashes(7, 2, 300, start=100).tolist() == ref[100:]  # an extension of the stream
    streams = [(s, e) for s in (0, 1, 2**27 - 1) for e in (0, 1, 4095)]
    every = [h for s, e in streams for h in stream_hash_list(s, e, 50)]
    assert len(set(every)) == len(every) and min(every) >= 1 << 61 and max(every) < 1 << 63
    for bad, what in (((2**27, 0, 1), "sessions"), ((0, 4096, 1), "epoch"), ((0, 0, 2**22), "KV blocks")):
        with pytest.raises(ValueError, match=what):
            stream_hash_list(*bad)

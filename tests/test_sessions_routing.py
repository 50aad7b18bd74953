"""Where a session's turns go: the endpoint-picker scorer, affinity, a crash's re-prefill, a Redis outage."""

from __future__ import annotations

from typing import Any

import pytest

from capsim.model.scenario import Scenario
from capsim.policy.routing import Candidate, Weights, pick, scores
from capsim.sim import simulate

TURNS = 5
CRASH_AT = 300.0


# ---- the pure scorer ---------------------------------------------------------------------------------------
def test_the_scorer_weighs_prefix_queue_and_kv_cache() -> None:
    w = Weights(prefix=3, queue=1, kv_cache=1)
    home = Candidate(queue=4, kv_cache_usage=0.5, prefix_hit=0.9)
    idle = Candidate(queue=0, kv_cache_usage=0.0, prefix_hit=0.0)
    # 3 * 0.9 + 0 + 0.5 = 3.2 against 0 + 1 + 1 = 2: the cached history wins over an idle pod
    assert scores([home, idle], w) == pytest.approx([3.2, 2.0])
    assert pick([home, idle], w) == 0
    # a small expected hit does not: 3 * 0.2 + 0.5 = 1.1
    assert pick([Candidate(4, 0.5, 0.2), idle], w) == 1
    # without a prefix, the shorter queue and the emptier cache win; ties to the first
    assert pick([Candidate(3, 0.2, 0), Candidate(1, 0.2, 0), Candidate(1, 0.2, 0)], w) == 1
    assert pick([Candidate(2, 0.9, 0), Candidate(2, 0.1, 0)], w) == 1
    with pytest.raises(ValueError, match="no candidate"):
        pick([], w)


# ---- the simulator -----------------------------------------------------------------------------------------
def agents(router: str, *, crash: bool = False, **over: Any) -> Scenario:
    """Growing agent sessions (history 400 tokens + 50 per turn) on 4 continuous pods."""
    sc = Scenario.model_validate({
        "horizon_s": 600,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 1.0},
                     "prompt_tokens": {"kind": "constant", "value": 400},
                     "output_tokens": {"kind": "constant", "value": 30},
                     "sessions": {"turns": TURNS, "think_time_s": {"kind": "exponential", "mean_s": 3.0},
                                  "new_tokens": {"kind": "constant", "value": 50}}},
        "service": {"kind": "deterministic", "mean_s": 0.02},
        "batching": {"mode": "continuous", "max_num_seqs": 16, "max_num_batched_tokens": 2048,
                     "block_size": 16, "num_blocks": 4096, "max_model_len": 4096},
        "pods": {"replicas": 4, "startup_s": 20},
        "router": {"kind": router},
        "faults": {"crashes": [{"at_s": CRASH_AT, "pod": 1}]} if crash else None,
        "client": {"timeout_s": 30, "max_retries": 3, "backoff_s": 0.5},
    })
    return sc.override(over) if over else sc


@pytest.mark.parametrize("router", ["session_affinity", "prefix_aware"])
def test_affinity_keeps_a_session_on_its_pod(router: str) -> None:
    r = simulate(agents(router), seed=2)
    df = r.requests[r.requests["outcome"] == "ok"]
    pods_per_session = df.groupby("session_id")["pod"].nunique()
    assert (pods_per_session == 1).mean() > 0.95
    assert r.summary.affinity_misses <= 0.05 * (df["request_id"] % TURNS > 0).sum()
    assert r.summary.reprefill_tokens == 0
    rr = simulate(agents("round_robin"), seed=2)
    assert rr.summary.affinity_misses > 0.5 * (df["request_id"] % TURNS > 0).sum()


def test_round_robin_without_a_crash_re_prefills_nothing_lost() -> None:
    assert simulate(agents("round_robin"), seed=2).summary.reprefill_tokens == 0


@pytest.mark.parametrize("router", ["session_affinity", "prefix_aware"])
def test_a_crash_makes_its_sessions_re_prefill_their_history_elsewhere(router: str) -> None:
    r = simulate(agents(router, crash=True), seed=2)
    s, df = r.summary, r.requests
    assert s.crashes == 1 and s.reprefill_tokens > 0
    # the turns whose previous turn was answered on pod 1 before the crash and that finished after it:
    # those sent after the crash to another pod re-prefill their whole history (prompt less the message)
    ok = df[df["outcome"] == "ok"].set_index("request_id")
    prev = ok[(ok["pod"] == 1) & (ok["end_s"] < CRASH_AT)].index
    nxt = ok.reindex(prev + 1).dropna(subset=["end_s"])
    nxt = nxt[nxt["end_s"] > CRASH_AT]
    surely = nxt[(nxt["arrival_s"] > CRASH_AT) & (nxt["pod"] != 1)]
    assert len(surely) > 0
    assert int((surely["prompt_tokens"] - 50).sum()) <= s.reprefill_tokens <= int((nxt["prompt_tokens"] - 50).sum())
    assert s.affinity_misses >= len(surely)
    # per request too: the turns that paid the crash
    assert int(df["reprefill_tokens"].sum()) == s.reprefill_tokens
    assert (df.set_index("request_id").loc[surely.index, "reprefill_tokens"] == surely["prompt_tokens"] - 50).all()
    # without the crash nothing is re-prefilled
    assert simulate(agents(router), seed=2).summary.reprefill_tokens == 0

def test_serve_local_answers_through_a_redis_outage_from_the_pods_own_copy() -> None:
    outage = {"faults": {"redis_outages": [{"at_s": 200, "duration_s": 60}]}}
    fail = simulate(agents("session_affinity").override(outage), seed=2).summary
    local = simulate(agents("session_affinity").override({**outage, "state.on_unavailable": "serve_local"}),
                     seed=2).summary
    assert fail.served_local == 0 and fail.sessions_at_risk == 0
    assert local.served_local > 0 and local.sessions_at_risk > 0
    # a first turn has no copy anywhere: it still fails (503) and is retried, but far fewer do
    assert local.retries < fail.retries


def test_affinity_hits_the_prefix_cache_more_than_round_robin() -> None:
    # a small KV cache per pod (256 blocks of 16 tokens): round robin spreads each session's history over
    # every pod, affinity keeps it where it was computed
    small: dict[str, Any] = {"batching.num_blocks": 256}
    hit = {k: simulate(agents(k, **small), seed=2).summary.prefix_hit_rate
           for k in ("session_affinity", "prefix_aware", "round_robin")}
    # a later turn's history is ~85% of its prompt, the first turn's nothing: ~70% is the most to hit
    assert 0.5 < hit["session_affinity"] < 0.9 and 0.5 < hit["prefix_aware"] < 0.9
    assert hit["round_robin"] < hit["session_affinity"] - 0.1
    assert hit["round_robin"] < hit["prefix_aware"] - 0.1


def test_a_crash_shows_as_a_ttft_spike_on_the_turns_that_re_prefill() -> None:
    # prefill time that depends on the tokens computed: the measured CPU profile's kernels
    sc = agents("session_affinity", crash=True, **{"service": {"kind": "profile", "extrapolate": True,
                                                               "profile": "data/profiles/cpu-tiny-float32.csv"}})
    df = simulate(sc, seed=2).requests
    df = df[(df["outcome"] == "ok") & (df["request_id"] % TURNS > 0)]
    ttft = df["first_token_s"] - df["arrival_s"]
    paid = df["reprefill_tokens"] > 0
    assert paid.sum() >= 3
    assert ttft[paid].median() > 5 * ttft[~paid].median()


def test_session_affinity_places_a_session_whose_pod_went_by_its_fallback() -> None:
    runs = {fb: simulate(agents("session_affinity", crash=True, **{"router.fallback": fb}), seed=2)
            for fb in ("random", "least_outstanding")}
    for r in runs.values():
        s = r.summary
        # every move away from the crashed pod is a fallback and re-prefills; no move happens by choice
        assert 0 < s.affinity_fallbacks == s.affinity_misses
        assert s.reprefill_tokens > 0
    # least outstanding puts a new or moved session on the emptiest pod, at random among equals (at this
    # light load most pods tie at 0): it spreads sessions as evenly as random does, pod 0 gets no more
    # (ties to the lowest id gave pod 0 the most and each pod what the lower ids left)
    per_pod = {fb: r.requests.groupby("pod").size() for fb, r in runs.items()}
    for counts in per_pod.values():
        assert counts.max() < 0.3 * counts.sum()  # 4 pods: 0.25 each


def test_turns_kept_locally_in_an_outage_are_lost_when_the_store_is_back() -> None:
    # growing sessions answered while Redis is out with serve_local: the store never gets those turns, so
    # the next turn after the outage has a shorter history than the turns before it would make
    sc = agents("session_affinity").override({
        "faults": {"redis_outages": [{"at_s": 200, "duration_s": 4}]}, "state.on_unavailable": "serve_local",
        "workload.sessions.think_time_s": 2.0})
    r = simulate(sc, seed=2)
    s = r.summary
    assert s.served_local > 0 and s.local_turns_lost > 0 and s.local_turns_lost <= s.served_local
    df = r.requests.sort_values("request_id").set_index("request_id")
    later = df[(df.index % TURNS > 0) & (df["outcome"] == "ok")]
    prev = df.reindex(later.index - 1)
    grown = later["prompt_tokens"].to_numpy() - prev["prompt_tokens"].to_numpy() - 30 - 50
    # a prompt is the previous one + its answer + the new message, except after lost local turns: shorter
    assert (grown <= 0).all() and (grown < 0).sum() >= 1
    shrunk = later[grown < 0]
    assert (shrunk["arrival_s"] >= 200).all()

"""The sessions validation (``capsim validate --mode sessions``): the simulator's side of a policy, the same
workload for the real side (token ids, think times), the hit-rate row, the table, the command line, the
real fleet (shared store, router, prefix caching) and a short run end to end (slow)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from capsim.model.profile import ServiceTimeProfile
from capsim.model.step_model import StepTimeFit
from capsim.sim.arrivals import make_workload
from capsim.sim.sessions import ThinkTimes
from capsim.sim.simulate import simulate
from capsim.sim.streams import Streams
from capsim.studies import validate_stats as vs
from capsim.studies.validate_continuous import BASE_PROFILE
from capsim.studies.validate_sessions import (
    HIT_TARGET_POINTS,
    FleetProbe,
    SessionsSpec,
    _Pool,
    _rows,
    cached_agreement,
    crash_scenario,
    fleet_rate,
    format_results,
    held_turns,
    hit_rate_row,
    moved_turns,
    reach_factors,
    sessions_scenario,
)
from capsim.studies.validate_sessions_real import message_ids

FIT = StepTimeFit((1e-3, 2e-5, 0.0, 1.5e-4, 5e-7), 1e-4, 0.9, 100,
                  {"prefill_tokens": (0, 512), "prefill_context": (0, 0), "decodes": (0, 16),
                   "decode_context": (0, 8192)}, 1e-4)
SPEC = SessionsSpec.quick()


@pytest.fixture()
def fitted_profile(tmp_path: Path) -> Path:
    base = ServiceTimeProfile.from_csv(BASE_PROFILE)
    return ServiceTimeProfile(base.points, {**base.metadata, "step_model": FIT.to_dict()}, base.source).to_csv(
        tmp_path / "steps.csv")


def test_sessions_stop_arriving_and_turns_grow_with_their_history(fitted_profile: Path) -> None:
    sc = sessions_scenario(SPEC, "session_affinity", fitted_profile, 4.0, 1.0)
    wl = make_workload(sc, Streams(0))
    assert wl.n_sessions > 10 and wl.session_start_s.max() < SPEC.arrival_s
    df = simulate(sc, seed=0).requests
    assert (df.outcome == "ok").all() and len(df) == wl.n_requests  # every turn of every session, in the horizon
    one = df[df.session_id == 0].sort_values("request_id")
    msg = wl.message_tokens
    assert msg is not None
    # turn k = turn k-1's prompt + its answer + the new message
    want = np.cumsum(msg[:SPEC.turns] + np.r_[0, np.full(SPEC.turns - 1, SPEC.output_tokens)])
    assert one.prompt_tokens.tolist() == want.tolist()


def test_affinity_keeps_more_of_the_history_cached_than_round_robin(fitted_profile: Path) -> None:
    hit = {}
    for policy in ("session_affinity", "round_robin"):
        ts = simulate(sessions_scenario(SPEC, policy, fitted_profile, 4.0, 1.0), seed=0).timeseries
        hit[policy] = ts.prefix_cache_hits.iloc[-1] / ts.prefix_cache_queries.iloc[-1]
    # a later turn's prompt is mostly history: on its own pod nearly all of it hits; on the other pod only
    # what an older turn of the session left there
    assert hit["session_affinity"] > 0.6 and hit["round_robin"] < hit["session_affinity"] - 0.1


@pytest.mark.parametrize("policy", ["session_affinity", "round_robin", "prefix_aware"])
def test_a_crash_run_moves_the_crashed_pods_sessions_and_counts_the_history_they_prefill_again(
        fitted_profile: Path, policy: str) -> None:
    spec = SessionsSpec()
    sc = crash_scenario(sessions_scenario(spec, policy, fitted_profile, 4.0, 1.0), 10.0)
    res = simulate(sc, seed=3000)
    req = res.requests
    ok = req.outcome == "ok"
    # pod 1 crashed at 10 s for good (its restart never gets ready): it serves no turn sent after it
    assert res.crashes[["time_s", "pod"]].values.tolist() == [[10.0, 1]]
    assert not (ok & (req.pod == 1) & (req.arrival_s >= 10.0)).any()
    assert (ok & (req.pod == 0) & (req.arrival_s >= 10.0)).sum() > 20
    # the count the real crash run takes from the router's X-Capsim-Pod, taken from the simulated pods, is the
    # simulator's own bookkeeping of the moves and the history they prefill again
    msg = make_workload(sc, Streams(3000)).message_tokens
    moved, history = moved_turns(req, req.pod.to_numpy(), 1, 10.0, msg, spec.turns)
    assert history == int(req.reprefill_tokens[ok].sum()) == res.summary.reprefill_tokens
    assert moved == int((req.reprefill_tokens[ok] > 0).sum()) > 0
    # no turn is retried: one the crash caught failed, and its session ended there
    failed = req[~ok]
    assert (failed.attempts == 1).all()
    for sid, turn in zip(failed.session_id, failed.request_id % spec.turns, strict=True):
        later = req[(req.session_id == sid) & (req.request_id % spec.turns > turn)]
        assert later.empty


def test_moved_turns_are_later_turns_that_left_the_crashed_pod_after_the_crash() -> None:
    a, b = "http://a", "http://b"
    # two sessions of three turns; messages 10, 5, 5 tokens, answers 2
    frame = pd.DataFrame({"request_id": [0, 1, 2, 3, 4, 5], "arrival_s": [0.0, 1.0, 3.0, 0.5, 1.5, 2.5],
                          "outcome": ["ok", "ok", "ok", "ok", "ok", "failed"],
                          "prompt_tokens": [10, 17, 24, 10, 17, 24]})
    msg = np.array([10, 5, 5, 10, 5, 5])
    # session 0: a, b (a move before the crash at 2 s: not counted), then a again after it: b crashed
    # session 1: b, then its turn after the crash failed (not answered: nothing moved)
    served = [a, b, a, b, b, ""]
    assert moved_turns(frame, served, b, 2.0, msg, 3) == (1, 24 - 5)
    assert moved_turns(frame, served, a, 2.0, msg, 3) == (0, 0)  # the turn that left a did so before the crash
    assert moved_turns(frame, served, a, 0.0, msg, 3) == (1, 17 - 5)


def test_held_turns_is_the_mean_count_a_pod_held_from_send_to_answer_over_the_window() -> None:
    a, b = "http://a", "http://b"
    frame = pd.DataFrame({"arrival_s": [0.0, 1.0, 3.0, 2.0, 0.5], "end_s": [2.0, 1.5, 6.0, 2.5, 9.0],
                          "outcome": ["ok", "ok", "ok", "ok", "failed"]})
    served = [a, a, a, b, a]
    # over [1, 5): a held turn 0 for 1 s, turn 1 for 0.5 s, turn 2 for 2 s (cut at 5); the failed turn not
    assert held_turns(frame, served, a, 1.0, 5.0) == pytest.approx(3.5 / 4)
    assert held_turns(frame, served, b, 1.0, 5.0) == pytest.approx(0.5 / 4)
    assert held_turns(frame, served, b, 3.0, 5.0) == 0.0
    assert math.isnan(held_turns(frame, served, a, 5.0, 5.0))


def test_crash_moments_counts_what_the_crash_fails_at_each_moment_of_the_window_before_it(
        fitted_profile: Path) -> None:
    # at each of n moments spread over the window before the crash, the simulated crash fails exactly the turns
    # its pod held then in the run without it (send to answer), so the range is what one crash could have failed
    from capsim.studies.validate_sessions import crash_moments

    base = sessions_scenario(SessionsSpec(), "round_robin", fitted_profile, 4.0, 1.0)
    steady = simulate(base, seed=3000).requests
    got = crash_moments(base, 10.0, 3000, n=6, window_s=3.0)
    moments = [7.0 + 3.0 * (k + 0.5) / 6 for k in range(6)]
    held = [int(((steady.pod == 1) & (steady.arrival_s <= t) & (steady.end_s > t)).sum()) for t in moments]
    assert got == held and len(set(got)) > 1  # the moment decides the count
    assert crash_moments(base, 1.0, 3000, n=2, window_s=5.0) == [
        int(((steady.pod == 1) & (steady.arrival_s <= t) & (steady.end_s > t)).sum()) for t in (0.25, 0.75)]


def test_a_simulated_crash_with_a_teardown_fails_the_turns_sent_to_the_dying_pod(fitted_profile: Path) -> None:
    # the real killed pod accepts turns while it is torn down and resets them (the router's 502s): with
    # crash_scenario's teardown the turns the router sends pod 1 then fail at its end; after it, the pod is gone
    base = sessions_scenario(SessionsSpec(), "round_robin", fitted_profile, 4.0, 1.0)
    at, teardown = 10.0, 0.5
    instant = simulate(crash_scenario(base, at), seed=3000).requests
    torn = simulate(crash_scenario(base, at, 1, teardown), seed=3000).requests
    late = torn[(torn.outcome != "ok") & (torn.arrival_s >= at)]
    assert len(late) >= 1 and (late.pod == 1).all() and (late.arrival_s < at + teardown).all()
    assert np.allclose(late.end_s, at + teardown)
    assert not ((instant.outcome != "ok") & (instant.arrival_s >= at)).any()  # instant: none sent after fails
    held = torn[(torn.outcome != "ok") & (torn.arrival_s < at)]
    assert np.allclose(held.end_s, at + teardown)  # what it held is lost when the teardown ends too


def test_a_simulated_crash_fails_the_turns_its_pod_held_the_way_out_included(fitted_profile: Path) -> None:
    # up to the crash the run is the one without it: the turns the crash fails are those pod 1 held then, from
    # the send to the answer at the client (service.answer_ms after the last token), as the real pod holds them
    spec = SessionsSpec()
    base = sessions_scenario(spec, "round_robin", fitted_profile, 4.0, 1.0).override({"service.answer_ms": 30.0})
    steady = simulate(base, seed=3000).requests
    ok1 = steady[(steady.outcome == "ok") & (steady.pod == 1) & (steady.arrival_s > 5.0)]
    way_out = 0
    for end in ok1.end_s.iloc[:6]:
        at = float(end) - 0.01  # its last token came 20 ms ago; its answer is 10 ms from the client
        req = simulate(crash_scenario(base, at), seed=3000).requests
        held = steady[(steady.pod == 1) & (steady.arrival_s <= at) & (steady.end_s > at)]
        failed = req[req.outcome != "ok"]
        assert sorted(failed.request_id) == sorted(held.request_id)
        assert np.allclose(failed.end_s, at)
        last_token = held.end_s - 0.030
        way_out += int((last_token <= at).sum())
        assert held_turns(steady, steady.pod.to_numpy(), 1, at - 1e-9, at) == pytest.approx(len(held), abs=1e-6)
    assert way_out >= 6  # each crash caught at least the turn on its way out


def test_messages_are_distinct_per_session_and_turn_and_the_same_in_every_call() -> None:
    a = message_ids(0, 3, 1, 40, 512)
    assert a == message_ids(0, 3, 1, 40, 512) and len(a) == 40 and all(0 <= t < 512 for t in a)
    assert a[:16] != message_ids(0, 4, 1, 40, 512)[:16] and a[:16] != message_ids(0, 3, 2, 40, 512)[:16]
    assert a[:16] != message_ids(1, 3, 1, 40, 512)[:16]


def test_think_times_are_the_simulated_clients_draws_in_answer_order(fitted_profile: Path) -> None:
    sc = sessions_scenario(SPEC, "round_robin", fitted_profile, 4.0, 1.0)
    real = ThinkTimes(sc.workload.sessions, Streams(5)["sessions"])
    again = ThinkTimes(sc.workload.sessions, Streams(5)["sessions"])
    draws = [real.next() for _ in range(200)]
    assert draws == [again.next() for _ in range(200)]
    assert 0.3 < np.mean(draws) < 0.7  # exponential, mean think_mean_s = 0.5


def test_the_hit_rate_is_pooled_over_runs_in_points_with_its_target() -> None:
    row = hit_rate_row([(60.0, 100.0, 62.0, 100.0), (140.0, 200.0, 150.0, 200.0)])
    assert row["real"] == pytest.approx(200 / 300) and row["sim"] == pytest.approx(212 / 300)
    assert row["error"] == pytest.approx(12 / 300) and row["error_kind"] == "points"
    assert row["error_low"] < row["error"] < row["error_high"] and row["met"]
    far = hit_rate_row([(60.0, 100.0, 80.0, 100.0), (70.0, 100.0, 90.0, 100.0)])
    assert far["error"] == pytest.approx(0.2) and far["error"] > HIT_TARGET_POINTS and not far["met"]


def test_reach_factors_are_each_turns_way_in_and_history_read_over_their_mean() -> None:
    from capsim.studies.validate_continuous_cycle import REACH_FACTORS_MAX

    f = reach_factors([0.020, 0.004, np.nan, 0.006], [0.003, 0.001, 0.001, 0.001], [3.0, 1.0, 0.5, 2.0])
    # in send order; the turn without a way in is out
    assert f == pytest.approx(tuple(np.array([5, 7, 23]) / (35 / 3)), abs=1e-4)
    assert reach_factors([0.004, 0.006], [0.001, 0.001], [1.0]) == ()
    assert reach_factors([0.004, 0.006], [0.001]) == ()  # the way in not measured turn by turn
    assert reach_factors([], []) == () and reach_factors([0.0], [0.0]) == ()
    many = np.random.default_rng(1).lognormal(0, 1, 25_000)
    thin = reach_factors(many, np.zeros_like(many))
    assert len(thin) == REACH_FACTORS_MAX and np.mean(thin) == pytest.approx(1, abs=0.01)
    assert np.percentile(thin, 99) == pytest.approx(np.percentile(many, 99) / many.mean(), rel=0.01)
    # the simulation takes them as its ingress spread; the probe's p99 send-to-engine time reads them
    probe = FleetProbe(speed=1.0, answer_ms=5.0, ingress_ms=2.0, turns=3, way_in_ms=8.0, reach_noise=f)
    assert probe.reach_p99_ms == pytest.approx(10.0 * np.percentile(f, 99))
    assert "p99" in probe.describe()


def test_the_fleet_rate_keeps_a_slower_fleet_at_the_calibrations_share_of_its_own_capacity(
        fitted_profile: Path) -> None:
    from dataclasses import replace

    from capsim.sim.simulate import Simulation

    probe = FleetProbe(speed=1.6, answer_ms=10.0, ingress_ms=1.0, turns=100, sessions_per_s=4.0)
    assert fleet_rate(4.0, None) == 4.0  # no probe: the calibration's rate
    assert fleet_rate(4.0, replace(probe, speed=0.9)) == 4.0  # not faster than the lone pod on its own core
    sized = fleet_rate(4.0, probe)
    assert sized == pytest.approx(2.5)

    def busy(rate: float, speed: float) -> float:
        """The pods' busy time over the turns' arrival window: the share of the fleet's capacity used."""
        sim = Simulation(sessions_scenario(SPEC, "session_affinity", fitted_profile, rate, speed), seed=0)
        sim.run()
        assert sim.continuous is not None
        return sim.continuous.busy_s

    base, slow, sized_slow = busy(4.0, 1.0), busy(4.0, 1.6), busy(sized, 1.6)
    # the calibration's rate on a fleet 1.6x slower uses 1.6x the pods' time; the sized rate about as much
    # as the calibration's rate on the calibrated fleet (batches are smaller at a lower rate: not exactly)
    assert slow / base == pytest.approx(1.6, rel=0.1)
    assert sized_slow / base == pytest.approx(1.0, rel=0.15)


def test_the_rows_compare_like_with_like_and_the_table_flags_misses(fitted_profile: Path) -> None:
    sc = sessions_scenario(SPEC, "session_affinity", fitted_profile, 4.0, 1.0)
    same = simulate(sc, seed=0)
    slower = simulate(sessions_scenario(SPEC, "session_affinity", fitted_profile, 4.0, 1.5), seed=0)
    w, end = SPEC.warmup_s, SPEC.arrival_s

    def pool(real: pd.DataFrame, sim: pd.DataFrame) -> _Pool:
        matched, equal, diff = cached_agreement(real, sim, w, end)
        return _Pool([vs.cut_blocks(real, w, end)], [vs.cut_blocks(sim, w, end)],
                     [(100.0, 200.0, 100.0, 200.0)], [(0.0, 0.0)], len(real),
                     [{"cached_turns": matched, "cached_same_turns": equal, "cached_abs_diff_tokens": diff}])

    rows = pd.DataFrame(_rows("session_affinity", 4.0, pool(same.requests, same.requests)))
    assert set(rows.metric) == {"ttft_p50_s", "ttft_p99_s", "throughput_per_s", "hit_rate", "cached_turns_same",
                                "preemptions"}
    assert (rows.loc[rows.metric != "preemptions", "error"] == 0).all()
    targeted = ~rows.metric.isin(["preemptions", "cached_turns_same"])  # the per-turn share is a diagnosis
    assert rows.loc[targeted, "met"].all()
    cached = rows[rows.metric == "cached_turns_same"].iloc[0]
    assert cached.sim == 1.0 and cached.turns_compared > 0 and cached.cached_abs_diff_tokens == 0
    off = pd.DataFrame(_rows("session_affinity", 4.0, pool(same.requests, slower.requests)))
    p50 = off[off.metric == "ttft_p50_s"].iloc[0]
    assert p50.error > 0.1 and not p50.met
    table = format_results(off)
    assert "MISS" in table and "+0.0pt" in table and "ttft_p99_s" in table and "calibration" in table
    assert (off.sim_at == "calibration").all()


def test_cached_tokens_are_compared_turn_by_turn_over_the_turns_answered_in_both() -> None:
    real = pd.DataFrame({"request_id": [0, 1, 2, 3, 4, 5], "outcome": ["ok"] * 5 + ["failed"],
                         "arrival_s": [0.5, 2.0, 3.0, 4.0, 9.0, 5.0], "cached_tokens": [0, 32, 48, np.nan, 64, 16]})
    sim = pd.DataFrame({"request_id": [5, 4, 3, 2, 1, 0], "outcome": ["ok"] * 6,
                        "arrival_s": [5.0, 9.0, 4.0, 3.0, 2.0, 0.5], "cached_tokens": [16, 64, 16, 32, 32, 0]})
    # in [1, 8): turns 1, 2 and 3 (0 before, 4 after, 5 failed on the pods); 3 has no count (an answer that did not
    # say): 1 the same, 2 off by 16 tokens, matched by id whatever the order
    assert cached_agreement(real, sim, 1.0, 8.0) == (2, 1, 8.0)
    assert cached_agreement(real, sim, 20.0, 30.0)[:2] == (0, 0)


def test_a_hits_kv_copy_is_timed_per_cached_token_and_the_process_is_left_as_it_was() -> None:
    import os

    import torch

    from capsim.studies.validate_sessions_calibrate import measure_hit_copy_us

    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0)
    core = min(affinity)
    us = measure_hit_copy_us("tiny", 1, SessionsSpec().limits(), 200, core, repeats=5)
    # a copy of cached KV is real work (tensor slices per block and layer) but far below a token's compute
    assert 0 < us < 1000
    assert torch.get_num_threads() == threads and os.sched_getaffinity(0) == affinity


def test_capsim_validate_sessions_keeps_earlier_results_unless_forced(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from capsim.cli import app

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data" / "validation" / "sessions"
    folder.mkdir(parents=True)
    (folder / "results.csv").write_text("x\n")
    res = CliRunner().invoke(app, ["validate", "--mode", "sessions"])
    assert res.exit_code != 0 and "--force" in res.output
    res = CliRunner().invoke(app, ["validate", "--mode", "chats"])
    assert res.exit_code != 0 and "sessions" in res.output
    res = CliRunner().invoke(app, ["validate", "--mode", "sessions", "--policies", "round_robin,sticky"])
    assert res.exit_code != 0 and "--policies must name router policies" in res.output
    for flag, value in (("--level", "0.3"), ("--policies", "round_robin"), ("--crash-at", "5")):
        res = CliRunner().invoke(app, ["validate", "--mode", "continuous", flag, value])
        assert res.exit_code != 0 and f"{flag} applies to --mode sessions only" in res.output
    res = CliRunner().invoke(app, ["validate", "--probe-s", "2"])  # the static validation has no probe
    assert res.exit_code != 0 and "--probe-s applies to --mode sessions and --mode continuous only" in res.output
    res = CliRunner().invoke(app, ["validate", "--mode", "sessions", "--level", "1.5"])
    assert res.exit_code != 0 and "--level" in res.output
    # a crash after the last session arrived would compare nothing
    res = CliRunner().invoke(app, ["validate", "--mode", "sessions", "--quick", "--crash-at", "8", "--out-dir",
                                   str(tmp_path / "o")])
    assert res.exit_code != 0 and "--crash-at must fall while sessions arrive (before 8 s)" in res.output
    # the flags reach the spec the validation runs with
    seen: list[SessionsSpec] = []
    monkeypatch.setattr("capsim.studies.validate_sessions.run_sessions_validation",
                        lambda spec, **_: seen.append(spec))
    res = CliRunner().invoke(app, ["validate", "--mode", "sessions", "--out-dir", str(tmp_path / "o"), "--level",
                                   "0.3", "--probe-s", "0", "--replications", "2", "--crash-at", "0"])
    assert res.exit_code == 0, res.output
    assert (seen[0].level, seen[0].probe_s, seen[0].replications, seen[0].crash_at_s) == (0.3, 0.0, 2, 0.0)


#: two small real continuous pods with prefix caching (``start_fleet``)
FLEET_SETTINGS: dict[str, object] = {"torch_threads": 1, "batch_mode": "continuous", "enable_prefix_caching": "true",
                                     "warmup": "false", "max_prompt_tokens": 1024, "max_model_len": 1024}


def three_turn_sessions(n: int) -> tuple[Any, np.ndarray]:
    """The validation's workload cut to its first ``n`` sessions of 3 turns, and their messages' token counts."""
    from dataclasses import replace

    sc = sessions_scenario(SessionsSpec(turns=3), "round_robin", Path("unused.csv"), 1.0, 1.0)
    full = make_workload(sc, Streams(0))
    assert full.message_tokens is not None
    msg = full.message_tokens[:3 * n]
    return replace(full, prompt_tokens=full.prompt_tokens[:3 * n], output_tokens=full.output_tokens[:3 * n],
                   message_tokens=msg), msg


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
@pytest.mark.timeout(300)
def test_the_real_fleet_shares_each_sessions_history_through_the_store(tmp_path: Path) -> None:
    from dataclasses import replace

    from capsim.studies.validate_sessions_real import run_real, start_fleet

    full, msg = three_turn_sessions(2)
    wl = replace(full, session_start_s=full.session_start_s[:2])
    calls = []

    def think() -> float:
        calls.append(1)
        return 0.01

    fleet = start_fleet(tmp_path, "round_robin", FLEET_SETTINGS, [None, None])
    try:
        run = run_real(fleet, wl, lambda r: message_ids(0, r // 3, r % 3, int(msg[r]), 512), think, 120.0, seed=0)
    finally:
        fleet.stop()
    real, counters = run.frame, run.counters
    assert (real.outcome == "ok").all() and len(real) == 6
    # the router names the pod that served each turn; round robin used both
    assert set(real.attrs["served_by"]) == {p.url for p in fleet.pods}
    # round robin moves the turns between the pods, and every turn still prefilled the whole history
    # (earlier messages and answers, then the new message): the pods share the store
    out = SessionsSpec().output_tokens
    want = np.cumsum(msg.reshape(2, 3) + np.c_[np.zeros(2), np.full((2, 2), out)], axis=1).ravel()
    assert real.sort_values("request_id").prompt_tokens.tolist() == want.tolist()
    assert len(calls) == 4  # a think time after each answer but a session's last
    assert counters["vllm:prefix_cache_queries_total"] == pytest.approx(want.sum())
    # each answer says how long the pod read the session's history before its engine saw the turn: part of
    # the pod's queue time, which the TTFT counts
    assert (real.load_s > 0).all() and (real.load_s <= real.start_s - real.arrival_s + 1e-3).all()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
@pytest.mark.timeout(300)
def test_a_real_pod_killed_mid_run_fails_its_turns_and_its_sessions_prefill_their_history_on_the_other(
        tmp_path: Path) -> None:
    from dataclasses import replace

    from capsim.studies.validate_sessions_real import Crash, run_real, start_fleet

    # four sessions at once: round robin puts two first turns on each pod; each session then thinks 6 s (the
    # crash at 3 s falls while they think, unless a first turn takes 3 s), later turns 0.1 s
    full, msg = three_turn_sessions(4)
    wl = replace(full, session_start_s=np.zeros(4))
    thinks = iter([6.0] * 4 + [0.1] * 100)
    fleet = start_fleet(tmp_path, "round_robin", FLEET_SETTINGS, [None, None])
    try:
        run = run_real(fleet, wl, lambda r: message_ids(0, r // 3, r % 3, int(msg[r]), 512), lambda: next(thinks),
                       120.0, seed=0, crash=Crash(3.0))
        assert fleet.pods[1].proc is not None and fleet.pods[1].proc.poll() is not None  # killed, not restarted
    finally:
        fleet.stop()
    real, at = run.frame, run.crashed_at_s
    survivor, crashed = fleet.pods[0].url, fleet.pods[1].url
    # timed from the load generator's zero: on the rows' clock, at 3 s (and the victim's counters read first)
    assert run.crashed_url == crashed and at is not None and 3.0 <= at < 3.5
    # the SIGKILL to the process reaped: its teardown, in which its kernel still accepted turns (milliseconds)
    assert run.teardown_s is not None and 0.0 < run.teardown_s < 5.0
    served = np.asarray(real.attrs["served_by"], dtype=object)
    ok = (real.outcome == "ok").to_numpy()
    after = (real.arrival_s >= at).to_numpy()
    # nothing sent after the crash was served by the dead pod; what the crash caught failed at the router (502)
    # and ended its session (no retries)
    assert not (served[after] == crashed).any() and (served[ok & after] == survivor).all()
    assert set(real.attrs["failures"]) <= {"HTTP 502"}
    # the two sessions that started on the crashed pod went on on the other, prefilling their whole history there
    # from the store (that pod had never seen them: nothing of it cached)
    moved, history = moved_turns(real, served, crashed, at, msg, 3)
    assert moved >= 1
    out = SessionsSpec().output_tokens
    want = np.cumsum(msg.reshape(4, 3) + np.c_[np.zeros(4), np.full((4, 2), out)], axis=1).ravel()
    first_on_crashed = {int(r) // 3 for r, pod in zip(real.request_id, served, strict=True)
                        if r % 3 == 0 and pod == crashed}
    moved_rows = real[ok & after & real.session_id.isin(first_on_crashed).to_numpy()
                      & (real.request_id % 3 == 1).to_numpy()]
    assert len(moved_rows) == moved
    assert (moved_rows.cached_tokens == 0).all()
    assert moved_rows.prompt_tokens.tolist() == want[moved_rows.request_id].tolist()
    assert history == int((moved_rows.prompt_tokens - msg[moved_rows.request_id]).sum())
    # the counters keep the crashed pod's up to its crash: at least the survivor's turns' prompts were looked up
    assert run.counters["vllm:prefix_cache_queries_total"] >= real.prompt_tokens[ok & (served == survivor)].sum()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
@pytest.mark.timeout(900)  # the step measurement, three pod starts per policy, the bootstraps: ~2.5 min idle
def test_a_short_sessions_validation_runs_end_to_end(tmp_path: Path) -> None:
    from dataclasses import replace

    from capsim.studies.validate_sessions import run_sessions_validation

    # at 30% of the calibrated capacity: a 1-s calibration can overstate it, and a fleet pushed past its own
    # capacity turns its caches over before sessions come back, even under affinity (docs/sessions.md, the
    # 2026-12-01 runs: 0.62 real against 0.77 simulated in one)
    spec = replace(SPEC, replications=1, arrival_s=6.0, warmup_s=1.0, calibration_s=1.0, level=0.3)
    results = run_sessions_validation(spec, out_dir=tmp_path, echo=lambda _: None)
    for name in ("results.csv", "replications.csv", "provenance.json", "profile.csv", "service.yaml"):
        assert (tmp_path / name).exists()
    # the fleet's speed in each replication, over the calibrated pod's: the margin a plan on it needs
    import json

    observed = json.loads((tmp_path / "provenance.json").read_text())["observed_speed"]
    assert 1 <= observed["runs"] <= 2 and 0 < observed["min"] <= observed["max"]  # one replication per policy
    assert "# After the calibration, the fleet's pods " in (tmp_path / "service.yaml").read_text()
    hit = results[(results.metric == "hit_rate") & (results.sim_at == "calibration")].set_index("policy")
    # both halves see what affinity buys, and agree on it (latencies depend on the machine's load)
    assert (hit.real > 0).all() and (hit.sim > 0).all()
    for side in ("real", "sim"):
        assert hit.loc["session_affinity", side] > hit.loc["round_robin", side] + 0.1
    # under affinity a session's history stays on its pod: both halves cache the same blocks, whatever the pace;
    # round robin's hit rate depends on how fast the pods free and reuse blocks (docs/sessions.md), so on a
    # loaded machine its real side drifts from the simulator's: only the ordering above is promised there
    assert abs(hit.loc["session_affinity", "error"]) < 0.05
    # and turn by turn: each affinity turn's cached history the same on the pods as in the simulator
    same = results[(results.metric == "cached_turns_same") & (results.sim_at == "calibration")].set_index("policy")
    assert same.loc["session_affinity", "turns_compared"] > 0 and same.loc["session_affinity", "sim"] > 0.9
    tp = results[results.metric == "throughput_per_s"]  # both simulations
    assert (tp.real > 0).all() and (tp.sim > 0).all()
    runs = pd.read_csv(tmp_path / "replications.csv")
    assert (runs.real_turns == runs.sim_turns).all()
    # every replication simulated with the calibration alone, with what the fleet probe measured and at the
    # fleet's speed in the replication itself
    assert sorted(runs.policy) == ["round_robin"] * 3 + ["session_affinity"] * 3
    assert set(runs.sim_at) == set(results.sim_at) == {"calibration", "fleet probe", "run speed"}
    import json

    prov = json.loads((tmp_path / "provenance.json").read_text())
    probes = prov["fleet_probes"]
    assert set(probes) == {"round_robin", "session_affinity"}
    for p in probes.values():
        assert p["turns"] > 0 and 0.2 < p["speed"] < 5 and p["answer_ms"] > 0 and p["ingress_ms"] > 0
        # the turns' TTFT counts from the send: the way in through the router is measured, and simulated
        assert p["way_in_ms"] > 0
        # and each turn's send to its engine, over the mean: the simulated turns' ingress spread
        assert len(p["reach_noise"]) == p["turns"] and np.mean(p["reach_noise"]) == pytest.approx(1, abs=1e-3)
    assert prov["real_ttft_from"] == "send"
    # the calibration's own simulation has the lone pod's measured way in (its open-loop run's requests)
    assert prov["ingress_ms"] > 0 and len(prov["calibration"]["way_in_s"]["open 50%"]) > 0
    # its fit goes through its three open-loop runs, the step model's prefill terms scaled to the pod's
    cal = prov["calibration"]
    assert cal["fitted_runs"] == ["open 30%", "open 50%", "open 70%"] and set(cal["way_in_s"]) == set(cal["fitted_runs"])
    assert 0.25 <= cal["prefill_scale"] <= 4 and cal["prefill_scale"] != 1.0
    # every replication also simulated at the fleet's speed measured in it (its step traces, its own turns)
    for policy, speeds in prov["run_speeds"].items():
        assert len(speeds) == 1 and 0.2 < speeds[0] < 5
        assert (runs[(runs.policy == policy)].sim_at == "run speed").sum() == 1
    # each policy ran at the rate its first probe sized (at most the calibration's), and said so everywhere
    for policy, rate in prov["sessions_per_s_by_policy"].items():
        first = prov["sizing_probes"].get(policy, probes[policy])
        assert first["sessions_per_s"] == pytest.approx(prov["sessions_per_s"])
        sized = fleet_rate(prov["sessions_per_s"], FleetProbe(**first))
        if policy in prov["sizing_probes"]:  # it moved the rate by more than 5%: a second probe at the new one
            assert rate == pytest.approx(sized) and rate < 0.95 * prov["sessions_per_s"]
        else:
            assert rate == pytest.approx(prov["sessions_per_s"]) and sized >= 0.95 * rate
        assert probes[policy]["sessions_per_s"] == pytest.approx(rate)
        assert np.allclose(results[results.policy == policy].sessions_per_s, rate)
        assert np.allclose(runs[runs.policy == policy].sessions_per_s, rate)
    assert json.loads((tmp_path / "provenance.json").read_text())["cached_token_us"] > 0
    # each policy's last run kills the second pod mid-run (quick: 4 s in), simulated at the calibration, the
    # fleet probe and the surviving pod's own speed: its TTFT over the turns sent after the crash, and what the
    # crash cost, real and simulated
    crash = pd.read_csv(tmp_path / "crash.csv")
    assert set(crash.policy) == {"round_robin", "session_affinity"}
    assert set(crash.sim_at) == {"calibration", "fleet probe", "run speed"}
    assert {"ttft_p99_s", "hit_rate", "failed_turns", "held_turns", "moved_turns", "reprefill_tokens"} <= set(crash.metric)
    assert (crash.crashed_at_s >= 4).all() and (crash.crashed_at_s < 5).all()
    counts = crash[crash.metric.isin(["failed_turns", "moved_turns", "reprefill_tokens"])]
    assert (counts.real >= 0).all() and (counts.sim >= 0).all() and (counts.error == counts.sim - counts.real).all()
    # the moves and the history they prefilled again go together on each side (how many there are depends on the
    # load: on a slow host a short run's crashed pod may hold no session that goes on; the real and simulated
    # moves themselves are tested on their own, test_a_real_pod_killed_mid_run_... and test_a_crash_run_moves_...)
    aff = crash[crash.policy == "session_affinity"]
    moved = aff[aff.metric == "moved_turns"].set_index("sim_at")
    refill = aff[aff.metric == "reprefill_tokens"].set_index("sim_at")
    for side in ("real", "sim"):
        assert ((moved[side] > 0) == (refill[side] > 0)).all()
    held = aff[aff.metric == "held_turns"]
    assert (held.real >= 0).all() and (held.sim >= 0).all()
    # beside the one crash's count, what the simulated crash failed at 12 moments of the 5 s before it
    moments = crash[crash.metric == "failed_at_moments"].set_index(["policy", "sim_at"])
    failed = crash[crash.metric == "failed_turns"].set_index(["policy", "sim_at"])
    assert len(moments) == len(failed) == 6 and (moments.real == failed.real).all()
    caught = moments.moments.str.split().map(lambda v: [int(x) for x in v])
    assert (caught.map(len) == 12).all()
    assert (moments.error_low == caught.map(min) - moments.real).all()
    assert (moments.error_high == caught.map(max) - moments.real).all()
    assert ((moments.error_low <= moments.error) & (moments.error <= moments.error_high)).all()
    assert ((crash.teardown_s > 0) & (crash.teardown_s < 5)).all()  # each crash run's own, measured
    late = crash[crash.metric == "failed_sent_after"].set_index(["policy", "sim_at"])
    assert len(late) == 6 and (late.real <= failed.real).all() and (late.sim <= failed.sim).all()


def test_the_calibrated_sessions_pod_is_written_as_a_scenario_fragment(fitted_profile: Path, tmp_path: Path) -> None:
    import yaml

    from capsim.studies.validate_continuous_cycle import NOISE_BLOCK_STEPS
    from capsim.studies.validate_sessions import write_sessions_service
    from capsim.studies.validate_sessions_calibrate import Calibrated

    cal = Calibrated(fitted_profile, 1.2, 0.9, 40.0, cycle_noise=(0.9, 1.1), answer_ms=3.0, cached_token_us=0.4,
                     ingress_ms=2.0, ingress_noise=(0.5, 1.5))
    path = write_sessions_service(tmp_path, SPEC, cal)
    assert path.read_text().startswith("# The pod `capsim validate` calibrated (continuous with prefix caching")
    fragment = yaml.safe_load(path.read_text())
    # what the simulation at the calibration takes: the same service and batching, prefix caching on
    sc = sessions_scenario(SPEC, "session_affinity", fitted_profile, 1.0, 1.2, 0.9, (0.9, 1.1), 3.0,
                           NOISE_BLOCK_STEPS, 2.0, 0.4, (0.5, 1.5))
    data = sc.model_dump()
    mine = sc.model_validate({**data, **fragment, "batching": {**data["batching"], **fragment["batching"]}})
    assert mine.service == sc.service and mine.batching == sc.batching
    assert "max_model_len" not in fragment["batching"]  # the validation's, left to the plan
    assert fragment["service"]["cached_token_us"] == 0.4 and fragment["batching"]["enable_prefix_caching"] is True


def test_the_fleet_speed_weighs_the_cycles_against_the_calibrated_cycle_plus_the_hits_copy(
        fitted_profile: Path) -> None:
    # the pods' cycles hold each prefix hit's KV copy, which the simulated pod charges on top of the step model
    # (service.cached_token_us): the speed is over both, and the simulation at a probe scales both by it
    from capsim.studies.validate_continuous_cycle import StepCalibration
    from capsim.studies.validate_sessions import fleet_speed, sim_scenario
    from capsim.studies.validate_sessions_calibrate import Calibrated

    cal = StepCalibration(1.2, 1e-4, (), arrival_s=5e-4)
    frame = pd.DataFrame({"model_s": [1e-3, 2e-3, 1.5e-3], "arrivals": [0, 2, 1], "cached_tokens": [0, 320, 160]})
    copy_us = 0.8
    charged = cal.step_s(frame.model_s.to_numpy(), frame.arrivals.to_numpy()) + copy_us * 1e-6 * frame.cached_tokens
    frame["cycle_s"] = 1.5 * charged
    assert fleet_speed(frame, cal, copy_us) == pytest.approx(1.5)
    assert fleet_speed(frame, cal) > 1.5  # the copy read as a slower step model: counted twice once charged
    assert fleet_speed(frame.drop(columns="cached_tokens"), cal, copy_us) == pytest.approx(
        fleet_speed(frame, cal))  # a trace without the column: nothing to take out

    calibrated = Calibrated(fitted_profile, 1.2, 0.5, 100.0, cached_token_us=copy_us)
    probe = FleetProbe(speed=1.5, answer_ms=10.0, ingress_ms=1.0, turns=100, sessions_per_s=4.0)
    at_cal, at_probe = (sim_scenario(SPEC, "session_affinity", calibrated, 4.0, p).service for p in (None, probe))
    assert at_cal.cached_token_us == pytest.approx(copy_us)
    assert at_probe.cached_token_us == pytest.approx(1.5 * copy_us)
    assert at_probe.time_scale == pytest.approx(1.5 * at_cal.time_scale)
    assert at_probe.arrival_overhead_ms == pytest.approx(1.5 * at_cal.arrival_overhead_ms)

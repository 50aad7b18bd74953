"""The simulated pod in continuous-batching mode: exact timings, preemption, rejection, faults, invariants."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim.simulate import Simulation, simulate


def scenario(**over: Any) -> Scenario:
    base: dict[str, Any] = {
        "horizon_s": 60,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 5},
                     "prompt_tokens": {"kind": "constant", "value": 100},
                     "output_tokens": {"kind": "constant", "value": 10}},
        "service": {"kind": "deterministic", "mean_s": 0.01},
        "batching": {"mode": "continuous", "num_blocks": 1000, "max_num_seqs": 16,
                     "max_num_batched_tokens": 512},
        "pods": {"replicas": 1},
        "client": {"timeout_s": 30, "max_retries": 0},
    }
    sc = Scenario.model_validate(base)
    return sc.override(over) if over else sc


def test_a_lone_request_takes_one_prefill_step_then_one_step_per_token() -> None:
    sc = scenario(**{"workload.arrivals.rate_per_s": 0.01, "horizon_s": 2000})
    r = simulate(sc, 3)
    req = r.requests
    assert len(req) > 5
    lone = req[req["outcome"] == "ok"]
    # each request is alone on the pod (arrivals are ~100 s apart): TTFT one step, end after 10 steps
    assert np.allclose(lone["first_token_s"] - lone["arrival_s"], 0.01)
    assert np.allclose(lone["end_s"] - lone["arrival_s"], 0.10)
    assert np.allclose(lone["itl_s"], 0.01)
    assert (lone["batch_size"] == 1).all() and (lone["preemptions"] == 0).all()
    assert r.summary.itl_p50_s == pytest.approx(0.01)
    assert r.summary.steps == 10 * len(lone)


def test_requests_join_a_running_batch_at_the_next_step() -> None:
    # 100/s at 10 ms per step: requests arrive while others decode and are admitted at once
    r = simulate(scenario(**{"workload.arrivals.rate_per_s": 100, "batching.max_num_seqs": 64,
                             "batching.max_num_batched_tokens": 8192}), 1)
    ok = r.requests[r.requests["outcome"] == "ok"]
    ttft = ok["first_token_s"] - ok["arrival_s"]
    assert (ttft >= 0.01 - 1e-9).all() and (ttft <= 0.02 + 1e-9).all()  # never waits for a batch to end
    assert ok["batch_size"].max() > 1
    assert r.summary.mean_batch_size > 1
    # a running request emits one token per step of 10 ms
    assert np.allclose(ok["itl_s"], 0.01)


def test_same_seed_same_frames_and_static_mode_is_untouched() -> None:
    sc = scenario(**{"workload.arrivals.rate_per_s": 50})
    a, b = simulate(sc, 7), simulate(sc, 7)
    assert a.requests.equals(b.requests) and a.timeseries.equals(b.timeseries)
    assert a.summary == b.summary
    static = simulate(sc.override({"batching.mode": "static"}), 7)
    assert "itl_s" not in static.requests and "kv_cache_usage" not in static.timeseries
    assert math.isnan(static.summary.itl_p50_s) and static.summary.steps == 0


def test_a_small_cache_preempts_and_every_request_still_ends_with_its_tokens() -> None:
    sc = scenario(**{"workload.arrivals.rate_per_s": 40, "batching.num_blocks": 40, "batching.block_size": 16,
                     "workload.output_tokens": {"kind": "constant", "value": 200}, "horizon_s": 30})
    r = simulate(sc, 2)
    s = r.summary
    assert s.preemptions > 0 and r.requests["preemptions"].sum() == s.preemptions
    assert s.kv_cache_usage_peak == pytest.approx(1.0, abs=0.03)
    ok = r.requests[r.requests["outcome"] == "ok"]
    assert len(ok) > 0 and (ok["end_s"] >= ok["first_token_s"]).all()
    # a preempted request recomputes: it takes longer than one that never was
    pre = ok[ok["preemptions"] > 0]
    assert len(pre) > 0
    assert (pre["end_s"] - pre["first_token_s"]).mean() > 199 * 0.01
    ts = r.timeseries
    assert ((ts["kv_cache_usage"] >= 0) & (ts["kv_cache_usage_max"] <= 1)).all()


def test_unservable_requests_are_rejected_at_once_without_retry() -> None:
    sc = scenario(**{"batching.max_model_len": 105, "client.max_retries": 3,
                     "workload.prompt_tokens": {"kind": "lognormal", "mean": 100, "sigma": 0.3}})
    r = simulate(sc, 4)
    req = r.requests
    bad = req[req["unservable"]]
    assert len(bad) > 0
    assert (bad["prompt_tokens"] + bad["output_tokens"] > 105).all()
    assert (bad["outcome"] == "rejected").all() and (bad["attempts"] == 1).all()
    assert (bad["end_s"] == bad["arrival_s"]).all()
    fine = req[~req["unservable"]]
    assert (fine["prompt_tokens"] + fine["output_tokens"] <= 105).all()
    assert (fine["outcome"] == "ok").sum() > 0


def test_timeouts_abort_requests_in_the_engine_and_the_books_balance() -> None:
    # 10 ms steps, one sequence at a time, 100 tokens each: 1 s per request at 5/s: a queue builds
    sc = scenario(**{"batching.max_num_seqs": 1, "workload.output_tokens": {"kind": "constant", "value": 100},
                     "client.timeout_s": 3, "horizon_s": 60})
    r = simulate(sc, 5)
    s = r.summary
    assert s.timed_out > 0 and s.completed > 0
    done = r.requests[r.requests["outcome"] == "timed_out"]
    assert np.allclose(done["end_s"] - done["arrival_s"], 3.0)
    assert s.arrived == s.completed + s.failed + s.timed_out + s.rejected + s.in_flight


def test_a_crash_fails_the_running_requests_and_the_pod_serves_again_after_its_restart() -> None:
    sc = scenario(**{"pods.replicas": 2, "faults": {"crashes": [{"at_s": 20, "pod": 0}]},
                     "pods.startup_s": 5, "client.max_retries": 2, "workload.arrivals.rate_per_s": 50})
    r = simulate(sc, 6)
    assert len(r.crashes) == 1
    req = r.requests
    assert r.summary.retries > 0
    assert ((req["pod"] == 0) & (req["arrival_s"] > 40) & (req["outcome"] == "ok")).any()
    assert r.summary.in_flight + r.summary.completed + r.summary.failed + r.summary.timed_out \
        + r.summary.rejected == r.summary.arrived


def test_the_profile_adapter_runs_the_friday_rush_in_continuous_mode() -> None:
    sc = Scenario.from_yaml("data/scenarios/friday_rush_continuous.yaml").override(
        {"horizon_s": 120, "warmup_s": 10})
    r = simulate(sc, 0)
    s = r.summary
    assert s.completed > 0 and s.steps > 0 and not math.isnan(s.itl_p50_s)
    assert 0 < s.kv_cache_usage_mean <= s.kv_cache_usage_peak <= 1


@pytest.mark.parametrize("over", [
    {"workload.arrivals.rate_per_s": 100, "batching.max_num_seqs": 64},
    {"workload.arrivals.rate_per_s": 40, "batching.num_blocks": 40,
     "workload.output_tokens": {"kind": "lognormal", "mean": 150, "sigma": 0.5, "max": 400}, "horizon_s": 30,
     "batching.max_model_len": 600},
    {"batching.max_num_seqs": 2, "workload.output_tokens": {"kind": "constant", "value": 60}, "client.timeout_s": 2,
     "pods.replicas": 2, "faults": {"crashes": [{"at_s": 20, "pod": 0}]}, "pods.startup_s": 5,
     "client.max_retries": 1},
    {"service": {"kind": "profile", "profile": "data/profiles/cpu-tiny-float32.csv", "extrapolate": True,
                 "noise": False},
     "workload.arrivals.rate_per_s": 30,
     "workload.prompt_tokens": {"kind": "lognormal", "mean": 300, "sigma": 0.6, "max": 1024},
     "workload.output_tokens": {"kind": "lognormal", "mean": 48, "sigma": 0.5, "max": 256}},
    # growing sessions on a small prefix cache (hits, evictions, preemptions), a crash, arrival overhead;
    # think times drawn, not constant: with 10 ms steps a constant one sends a turn exactly on a step's end,
    # where a run's summed time and the steps' one by one differ in the last bit and order the two apart
    {"workload.arrivals.rate_per_s": 8, "batching.num_blocks": 120, "batching.enable_prefix_caching": True,
     "workload.sessions": {"turns": 4, "think_time_s": {"kind": "exponential", "mean_s": 0.5},
                           "new_tokens": {"kind": "constant", "value": 40}},
     "workload.output_tokens": {"kind": "lognormal", "mean": 40, "sigma": 0.5, "max": 200},
     "pods.replicas": 2, "faults": {"crashes": [{"at_s": 20, "pod": 0}]}, "pods.startup_s": 5,
     "service.arrival_overhead_ms": 1.5},
    # a constant think time with 10 ms steps sends turns exactly on step ends: a run adds its steps' times
    # one by one, as one event per step does, so both order such a tie alike (H3's repro)
    {"workload.arrivals.rate_per_s": 8, "batching.num_blocks": 120, "batching.enable_prefix_caching": True,
     "workload.sessions": {"turns": 4, "think_time_s": 0.5, "new_tokens": {"kind": "constant", "value": 40}},
     "workload.output_tokens": {"kind": "lognormal", "mean": 40, "sigma": 0.5, "max": 200},
     "pods.replicas": 2, "faults": {"crashes": [{"at_s": 20, "pod": 0}]}, "pods.startup_s": 5,
     "service.arrival_overhead_ms": 1.5},
])
def test_runs_of_decode_steps_in_one_event_give_the_frames_of_one_event_per_step(over: dict[str, Any]) -> None:
    from capsim.sim.simulate import Simulation

    sc = scenario(**over)
    fast = Simulation(sc, 11)
    slow = Simulation(sc, 11)
    assert slow.continuous is not None and fast.continuous is not None
    slow.continuous.max_run_steps = 1
    a, b = fast.run(), slow.run()
    assert fast.continuous.events < slow.continuous.events
    ra, rb = a.requests, b.requests
    # equals, not list ==: a request still in flight at the horizon has outcome NaN, and NaN != NaN
    assert ra["outcome"].equals(rb["outcome"]) and (ra["pod"] == rb["pod"]).all()
    for col in ("start_s", "first_token_s", "end_s", "itl_s"):  # the same floats: steps are added alike
        assert np.array_equal(ra[col], rb[col], equal_nan=True), col
    assert (ra["preemptions"] == rb["preemptions"]).all()
    sa, sb = a.summary, b.summary
    assert (sa.preemptions, sa.completed, sa.timed_out) == (sb.preemptions, sb.completed, sb.timed_out)
    # a run's steps are counted when it ends: a run cut short by a crash or the horizon is not
    assert sa.steps == pytest.approx(sb.steps, rel=0.01)


def test_a_profile_with_a_fitted_step_model_times_steps_with_it(tmp_path: Any) -> None:
    from capsim.core.step_profile import with_step_model
    from capsim.model.profile import ServiceTimeProfile
    from capsim.model.step_model import StepTimeFit

    base = ServiceTimeProfile.from_csv("data/profiles/cpu-tiny-float32.csv")
    fit = StepTimeFit((0.004, 1e-5, 0.0, 2e-4, 1e-7), 1e-4, 0.99, 100,
                      {"prefill_tokens": (0, 512), "prefill_context": (0, 1e5), "decodes": (0, 32),
                       "decode_context": (0, 1e4)}, 1e-4)
    path = with_step_model(base, fit).to_csv(tmp_path / "fitted.csv")
    sc = scenario(**{"service": {"kind": "profile", "profile": str(path), "noise": False},
                     "workload.arrivals.rate_per_s": 0.01, "horizon_s": 1000})
    r = simulate(sc, 3)
    ok = r.requests[r.requests["outcome"] == "ok"]
    assert len(ok) > 2
    # alone: a prefill step of 100 tokens, then 9 decode steps at contexts 100..108
    prefill = 0.004 + 100 * 1e-5
    decodes = sum(0.004 + 2e-4 + 1e-7 * c for c in range(100, 109))
    assert np.allclose(ok["first_token_s"] - ok["arrival_s"], prefill)
    assert np.allclose(ok["end_s"] - ok["arrival_s"], prefill + decodes)


@pytest.mark.parametrize("overhead_ms", [0.0, 2.0])
@pytest.mark.parametrize(("b_ms", "b_first", "b_end", "a_first"), [
    (25, 0.04, 0.13, 0.01),  # B lands on A's third step, in a run of decode steps
    (5, 0.02, 0.11, 0.01),  # B lands on A's first step (its prefill), a single step
])
def test_an_arrival_lengthens_the_step_in_progress_by_the_arrival_overhead(
        tmp_path: Any, overhead_ms: float, b_ms: int, b_first: float, b_end: float, a_first: float) -> None:
    trace = tmp_path / "two.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     f"2023-11-16 18:00:00.000,100,10\n2023-11-16 18:00:00.{b_ms:03d},100,10\n")
    sc = scenario(**{"workload.arrivals": {"kind": "trace", "path": str(trace)}, "horizon_s": 10,
                     "service.arrival_overhead_ms": overhead_ms})
    sim = Simulation(sc, 0)
    req = sim.run().requests.sort_values("arrival_s")
    a = overhead_ms / 1000
    assert list(req["outcome"]) == ["ok", "ok"]
    # A's arrival lengthens the step it starts on the idle pod, B's the step in progress when it comes
    # (B's prefill then starts 2a late), so every later token of both comes 2a late
    a_first += a if b_ms == 25 else 2 * a
    assert np.allclose(req["first_token_s"], [a_first, b_first + 2 * a], rtol=0, atol=1e-12)
    assert np.allclose(req["end_s"], [0.10 + 2 * a, b_end + 2 * a], rtol=0, atol=1e-12)
    assert sim.continuous is not None
    assert sim.continuous.busy_s == pytest.approx(sim.continuous.steps * 0.01 + 2 * a)


# ---- measured step noise (service.cycle_noise) ------------------------------------------------------------
def test_noisy_step_time_draws_one_factor_per_step_and_a_run_gives_its_step_ends() -> None:
    from capsim.sim.step_time import LinearStepTime, NoisyStepTime

    base = LinearStepTime(0.002, 0.0, 0.0, 0.0005, 1e-6)
    flat = NoisyStepTime(base, [1.0], np.random.default_rng(0))
    ends = flat.decode_run_ends(4, 400, 6)
    expected = np.cumsum([base.decode_step_s(4, 400 + 4 * j) for j in range(6)])
    assert np.allclose(ends, expected) and flat.decode_run_s(4, 400, 6) == pytest.approx(expected[-1])
    noisy = NoisyStepTime(base, [0.5, 1.5], np.random.default_rng(1))
    steps = np.diff(np.concatenate([[0.0], noisy.decode_run_ends(4, 400, 2000)]))
    one = np.array([base.decode_step_s(4, 400 + 4 * j) for j in range(2000)])
    factors = steps / one
    assert np.allclose(np.sort(np.unique(factors.round(9))), [0.5, 1.5])  # each step its own factor
    assert 0.45 < np.mean(np.isclose(factors, 0.5)) < 0.55
    assert not hasattr(noisy, "decode_step_s")  # the pod keeps a run's drawn ends instead
    with pytest.raises(ValueError, match="cycle_noise"):
        NoisyStepTime(base, [], np.random.default_rng(0))


def test_cycle_noise_of_one_changes_nothing_but_the_float_rounding() -> None:
    over = {"workload.arrivals.rate_per_s": 60, "service.arrival_overhead_ms": 1.0}
    plain = simulate(scenario(**over), 5)
    flat = simulate(scenario(**over, **{"service.cycle_noise": [1.0]}), 5)
    a, b = plain.requests, flat.requests
    assert a["outcome"].equals(b["outcome"])
    for col in ("first_token_s", "end_s"):
        assert np.allclose(a[col], b[col], rtol=0, atol=1e-9, equal_nan=True), col


def test_each_models_step_ends_are_its_step_times_added_one_by_one_to_the_last_bit() -> None:
    """``decode_step_ends`` (a run's step ends, the pod's fast path) gives exactly the floats that adding
    ``decode_step_s`` step by step gives, as one event per step would: inside the profile's grid, past both
    of its ends (extrapolated), across measured intervals, for any start."""
    from capsim.model.profile import ServiceTimeProfile
    from capsim.sim.step_time import ConstantStepTime, LinearStepTime, ProfileStepTime, step_ends

    models = [ConstantStepTime(0.0123), LinearStepTime(8e-4, 3.4e-5, 1.5e-10, 1.05e-4, 8.9e-7),
              ProfileStepTime(ServiceTimeProfile.from_csv("data/profiles/cpu-tiny-float32.csv"), 1.3)]
    rng = np.random.default_rng(5)
    for _ in range(300):
        d = int(rng.integers(1, 80))
        c = d * int(rng.integers(0, 5000))  + int(rng.integers(0, d))  # mean contexts from 0 to past the grid
        k = int(rng.integers(1, 700))
        start = float(rng.uniform(0, 1e4))
        for m in models:
            want = step_ends(m.decode_step_s, start, d, c, k)
            got = m.decode_step_ends(start, d, c, k)
            assert got == want, (type(m).__name__, d, c, k, start)


@pytest.mark.parametrize("max_run_steps", [4096, 1])
def test_a_heavy_tailed_step_spread_keeps_the_mean_and_thickens_the_tail(max_run_steps: int) -> None:
    over = {"workload.arrivals.rate_per_s": 60, "horizon_s": 200, "service.arrival_overhead_ms": 0.5}
    heavy = [0.8] * 99 + [20.8]  # mean 1: one step in a hundred takes 26 times the others
    runs = []
    for noise in (None, heavy):
        sim = Simulation(scenario(**over, **({"service.cycle_noise": noise} if noise else {})), 3)
        assert sim.continuous is not None
        sim.continuous.max_run_steps = max_run_steps
        runs.append(sim.run())
    plain, noisy = runs
    assert noisy.summary.completed == pytest.approx(plain.summary.completed, rel=0.02)
    # the pod's busy share stays (the factors' mean is 1); the tails grow
    assert noisy.summary.itl_p50_s < plain.summary.itl_p50_s < noisy.summary.itl_p99_s
    assert noisy.summary.ttft_p99_s > 1.5 * plain.summary.ttft_p99_s
    ok = noisy.requests[noisy.requests["outcome"] == "ok"]
    assert (ok["first_token_s"] >= ok["start_s"]).all() and (ok["end_s"] >= ok["first_token_s"]).all()


def test_runs_and_single_steps_agree_in_distribution_with_step_noise() -> None:
    over = {"workload.arrivals.rate_per_s": 60, "horizon_s": 400, "service.arrival_overhead_ms": 0.5,
            "service.cycle_noise": [0.5, 0.75, 1.0, 1.25, 1.5]}
    fast, slow = Simulation(scenario(**over), 9), Simulation(scenario(**over), 9)
    assert slow.continuous is not None and fast.continuous is not None
    slow.continuous.max_run_steps = 1
    a, b = fast.run().summary, slow.run().summary
    assert fast.continuous.events < slow.continuous.events
    assert a.completed == pytest.approx(b.completed, rel=0.01)
    for q in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "e2e_p50_s"):
        assert getattr(a, q) == pytest.approx(getattr(b, q), rel=0.08), q


def test_the_answer_time_moves_the_end_and_the_next_turn_not_the_engine() -> None:
    over = {"workload.arrivals.rate_per_s": 0.01, "horizon_s": 2000}
    plain = simulate(scenario(**over), 3).requests
    late = simulate(scenario(**over, **{"service.answer_ms": 25.0}), 3)
    a, b = plain[plain["outcome"] == "ok"], late.requests[late.requests["outcome"] == "ok"]
    assert np.allclose(b["end_s"] - a["end_s"], 0.025) and np.allclose(b["first_token_s"], a["first_token_s"])
    assert np.allclose(b["itl_s"], 0.01) and late.summary.itl_p50_s == pytest.approx(0.01)  # tokens keep their pace
    # a session's next turn leaves after the answer arrives and the think time
    sess = {"workload.arrivals.rate_per_s": 0.05, "horizon_s": 400,
            "workload.sessions": {"turns": 3, "think_time_s": 1.0, "new_tokens": {"kind": "constant", "value": 10}}}
    s0 = simulate(scenario(**sess), 4).requests
    s1 = simulate(scenario(**sess, **{"service.answer_ms": 25.0}), 4).requests
    turn2 = (s0["request_id"] % 3 == 1) & (s0["outcome"] == "ok")
    assert np.allclose(s1.loc[turn2, "arrival_s"] - s0.loc[turn2, "arrival_s"], 0.025)


def test_the_ingress_delays_when_the_engine_sees_a_request_not_the_steps() -> None:
    # alone on the pod: the first step starts ingress_ms after the arrival, then runs as without it
    over = {"workload.arrivals.rate_per_s": 0.01, "horizon_s": 2000}
    plain = simulate(scenario(**over), 3).requests
    late = simulate(scenario(**over, **{"service.ingress_ms": 4.0}), 3).requests
    a, b = plain[plain["outcome"] == "ok"], late[late["outcome"] == "ok"]
    assert len(a) > 5 and len(a) == len(b)
    assert np.allclose(b["start_s"] - a["start_s"], 0.004) and np.allclose(b["end_s"] - a["end_s"], 0.004)
    assert np.allclose(b["itl_s"], 0.01)
    # under load no request is admitted before its ingress is over, and each still joins the next step after
    # that (never a whole batch later): steps of 10 ms, requests every ~10 ms, cut runs and all
    busy = {"workload.arrivals.rate_per_s": 100, "batching.max_num_seqs": 64, "batching.max_num_batched_tokens": 8192}
    r = simulate(scenario(**busy, **{"service.ingress_ms": 15.0}), 1).requests
    ok = r[r["outcome"] == "ok"]
    wait = ok["start_s"] - ok["arrival_s"]
    assert (wait >= 0.015 - 1e-9).all() and (wait <= 0.025 + 1e-9).all()
    assert ok["batch_size"].max() > 1


def test_the_ingress_survives_crashes_and_loses_nothing() -> None:
    over = {"workload.arrivals.rate_per_s": 50, "horizon_s": 300, "faults": {"pod_mtbf_s": 60},
            "pods.replicas": 3, "client.max_retries": 2}
    base = simulate(scenario(**over), 5)
    r = simulate(scenario(**over, **{"service.ingress_ms": 30.0}), 5)
    req = r.requests
    assert r.summary.crashes > 0  # pods crashed with requests on their way in
    # every request that arrived well before the horizon has an outcome: none is lost in the ingress
    assert req.loc[req["arrival_s"] < 290, "outcome"].notna().all()
    ok = req[req["outcome"] == "ok"]
    assert (ok["start_s"] - ok["arrival_s"] >= 0.030 - 1e-9).all()
    assert len(ok) == pytest.approx((base.requests["outcome"] == "ok").sum(), rel=0.02)


def test_ingress_noise_draws_each_requests_ingress_from_the_factors_scaled_to_mean_one() -> None:
    over = {"workload.arrivals.rate_per_s": 0.01, "horizon_s": 20_000, "service.ingress_ms": 40.0}
    plain = simulate(scenario(**over), 3).requests
    # factors of mean 2 are scaled to mean 1: each lone request's first step starts 20 or 60 ms after it arrives
    noisy = simulate(scenario(**over, **{"service.ingress_noise": [1.0, 3.0]}), 3).requests
    a, b = plain[plain["outcome"] == "ok"], noisy[noisy["outcome"] == "ok"]
    assert len(a) > 100 and len(a) == len(b)
    wait = (b["start_s"] - b["arrival_s"]).to_numpy()
    short, long = np.isclose(wait, 0.020), np.isclose(wait, 0.060)
    assert (short | long).all() and 0.35 < short.mean() < 0.65
    assert np.allclose(b["end_s"] - b["start_s"], a["end_s"] - a["start_s"])  # the steps are as without it
    # one factor (any value) is the constant ingress: the same run, request for request
    one = simulate(scenario(**over, **{"service.ingress_noise": [7.0]}), 3).requests
    for col in ("arrival_s", "start_s", "first_token_s", "end_s"):
        assert np.allclose(one[col].to_numpy(), plain[col].to_numpy(), equal_nan=True), col


def test_an_ingress_noise_block_walks_the_factors_in_send_order() -> None:
    # block as long as the list: the walk replays it from its start, request after request in send order
    over = {"workload.arrivals.rate_per_s": 0.01, "horizon_s": 5000, "service.ingress_ms": 25.0,
            "service.ingress_noise": [1.0, 2.0, 3.0, 4.0], "service.ingress_noise_block": 4}
    r = simulate(scenario(**over), 3).requests
    ok = r[r["outcome"] == "ok"].sort_values("arrival_s")
    assert len(ok) > 20
    wait = (ok["start_s"] - ok["arrival_s"]).to_numpy()
    expect = np.resize([0.010, 0.020, 0.030, 0.040], len(wait))
    assert np.allclose(wait, expect)
    # shorter blocks from random starts: runs of consecutive factors, each factor as often as another
    walk = simulate(scenario(**{**over, "service.ingress_noise": [1.0, 2.0, 3.0, 4.0] * 50,
                                "service.ingress_noise_block": 3, "horizon_s": 40_000}), 3).requests
    w = walk[walk["outcome"] == "ok"].sort_values("arrival_s")
    f = np.round((w["start_s"] - w["arrival_s"]).to_numpy() / 0.010).astype(int)
    steps = np.diff(f) % 4
    assert (steps == 1).mean() > 0.6  # within a block the next factor follows (2 of 3 steps)
    assert all(0.15 < (f == k).mean() < 0.35 for k in (1, 2, 3, 4))


def test_with_ingress_noise_requests_reach_the_engine_in_the_order_their_ingress_ends() -> None:
    # ingress 10 or 90 ms, steps of 10 ms, a request every ~10 ms: a request with the short ingress is not
    # held behind an earlier one still on its way in; each joins the first step after its own ingress ends
    busy = {"workload.arrivals.rate_per_s": 100, "batching.max_num_seqs": 64, "batching.max_num_batched_tokens": 8192,
            "service.ingress_ms": 50.0, "service.ingress_noise": [0.2, 1.8]}
    r = simulate(scenario(**busy), 1).requests
    ok = r[r["outcome"] == "ok"]
    wait = (ok["start_s"] - ok["arrival_s"]).to_numpy()
    short = (wait >= 0.010 - 1e-9) & (wait <= 0.020 + 1e-9)
    long = (wait >= 0.090 - 1e-9) & (wait <= 0.100 + 1e-9)
    assert (short | long).all() and 0.4 < short.mean() < 0.6
    assert ok["batch_size"].max() > 1
    # so the engine starts some requests before others sent earlier
    order = ok.sort_values("arrival_s")["start_s"].to_numpy()
    assert (np.diff(order) < 0).any()


def test_ingress_noise_loses_nothing_to_crashes_or_timeouts() -> None:
    over = {"workload.arrivals.rate_per_s": 50, "horizon_s": 300, "faults": {"pod_mtbf_s": 60},
            "pods.replicas": 3, "client.max_retries": 2, "service.ingress_ms": 30.0,
            "service.ingress_noise": [0.1, 0.5, 1.0, 4.0]}
    r = simulate(scenario(**over), 5)
    req = r.requests
    assert r.summary.crashes > 0
    assert req.loc[req["arrival_s"] < 290, "outcome"].notna().all()
    # past saturation with short timeouts: queued requests whose client left leave the queue, some on their
    # way in (the queue's order is not the send order there)
    sat = {"workload.arrivals.rate_per_s": 400, "horizon_s": 60, "client.timeout_s": 0.5,
           "batching.max_num_seqs": 4, "service.ingress_ms": 30.0, "service.ingress_noise": [0.1, 3.9]}
    s = simulate(scenario(**sat), 2)
    out = s.requests.loc[s.requests["arrival_s"] < 55, "outcome"]
    assert out.notna().all() and (out == "timed_out").any() and (out == "ok").any()


def test_ingress_noise_needs_continuous_mode_and_a_positive_factor() -> None:
    with pytest.raises(SettingsError, match="ingress_noise needs batching.mode: continuous"):
        scenario(**{"batching": {"mode": "static", "max_batch_size": 8}, "service.ingress_ms": 5.0,
                    "service.ingress_noise": [1.0, 2.0]})
    with pytest.raises(SettingsError, match="ingress_noise must have a positive factor"):
        scenario(**{"service.ingress_noise": [0.0, 0.0]})
    with pytest.raises(SettingsError, match="ingress_noise"):
        scenario(**{"service.ingress_noise": [1.0, -1.0]})


def test_a_prefix_hit_costs_its_admitting_step_the_cached_tokens_copy() -> None:
    # 3-turn growing sessions, one at a time on the pod: later turns hit their history; with cached_token_us
    # the step that admits a hit is longer by its cached tokens x that, and nothing else changes
    over = {"workload.arrivals.rate_per_s": 0.02, "horizon_s": 1000, "batching.enable_prefix_caching": True,
            "batching.block_size": 16,
            "workload.sessions": {"turns": 3, "think_time_s": 1.0, "new_tokens": {"kind": "constant", "value": 40}}}
    a = simulate(scenario(**over), 2).requests
    b = simulate(scenario(**over, **{"service.cached_token_us": 50.0}), 2).requests
    a, b = a[a["outcome"] == "ok"], b[b["outcome"] == "ok"]
    hits = a["cached_tokens"] > 0
    assert hits.sum() > 5 and (~hits).sum() > 5 and (b["cached_tokens"].to_numpy() == a["cached_tokens"].to_numpy()).all()
    ttft_a, ttft_b = a["first_token_s"] - a["arrival_s"], b["first_token_s"] - b["arrival_s"]
    assert np.allclose(ttft_b - ttft_a, a["cached_tokens"] * 50e-6)
    assert np.allclose(b["itl_s"], a["itl_s"])  # the decode steps keep their pace


def test_a_factor_walk_draws_at_random_or_walks_the_measured_order_in_blocks() -> None:
    from capsim.sim.streams import BufferedDraws, FactorWalk

    f = np.arange(1.0, 101.0)
    single = FactorWalk(f, 1, BufferedDraws(np.random.default_rng(0)))
    u = np.random.default_rng(0).random(50)
    assert [single.next() for _ in range(50)] == list(f[(u * 100).astype(int)])  # one factor at random each
    walk = FactorWalk(f, 10, BufferedDraws(np.random.default_rng(1)))
    got = np.array([walk.next() for _ in range(40)]).reshape(4, 10)
    assert (np.diff(got, axis=1) == 1).all()  # ten in the list's order from each random start
    again = FactorWalk(f, 10, BufferedDraws(np.random.default_rng(1)))
    assert np.array_equal(np.concatenate([again.take(7), again.take(25), again.take(8)]), got.ravel())
    assert FactorWalk(f[:3], 10, BufferedDraws(np.random.default_rng(1))).block == 3
    # a block as long as the list replays it from its first factor, and again from the first when it ends
    # (the continuous validation's "run replay": a run's own steps, in order)
    replay = FactorWalk(f, 100, BufferedDraws(np.random.default_rng(2)))
    assert np.array_equal(replay.take(250), np.concatenate([f, f, f[:50]]))


def test_walked_slow_spells_widen_the_requests_itl_spread_at_the_same_mean() -> None:
    spell = [0.5] * 50 + [1.5] * 50  # mean 1: fifty fast steps, then fifty slow ones
    over = {"workload.arrivals.rate_per_s": 60, "horizon_s": 200, "service.cycle_noise": spell}
    iid = simulate(scenario(**over), 2)
    walked = simulate(scenario(**over, **{"service.cycle_noise_block_steps": 50}), 2)
    assert walked.summary.completed == pytest.approx(iid.summary.completed, rel=0.02)
    a, b = (r.requests.loc[r.requests["outcome"] == "ok", "itl_s"] for r in (iid, walked))
    # a request's tokens fall in one spell, not across fifty random factors (and more requests are on the
    # pod in a slow spell than in a fast one, so the mean request sees slower steps than the mean step)
    assert b.std() > 2 * a.std() and a.mean() < b.mean() < 1.2 * a.mean()


@pytest.mark.parametrize(("after_s", "answer_ms", "outcome"), [
    (0.09, 0.0, "failed"),   # before its last token: on the engine
    (0.12, 0.0, "ok"),       # after its last token, nothing on the way out: answered at 0.10
    (0.12, 50.0, "failed"),  # after its last token, its answer not out yet (the store write, the response)
    (0.16, 50.0, "ok"),      # after its answer reached the client
])
def test_a_crash_on_the_way_out_fails_the_turn(after_s: float, answer_ms: float, outcome: str) -> None:
    # a lone request: 10 steps of 10 ms, its last token 0.10 s after it arrives, its answer answer_ms later
    over = {"workload.arrivals.rate_per_s": 0.01, "horizon_s": 2000, "service.answer_ms": answer_ms}
    first = simulate(scenario(**over), 3).requests.sort_values("arrival_s").iloc[0]
    assert first["outcome"] == "ok"
    at = float(first["arrival_s"]) + after_s
    r = simulate(scenario(**over, **{"faults": {"crashes": [{"at_s": at, "pod": 0}]}}), 3)
    req = r.requests.set_index("request_id")
    got = req.loc[first["request_id"]]
    assert len(r.crashes) == 1 and got["outcome"] == outcome
    if outcome == "failed":
        assert got["end_s"] == pytest.approx(at)
    else:
        assert got["end_s"] == pytest.approx(float(first["arrival_s"]) + 0.10 + answer_ms / 1000)
    s = r.summary
    assert s.arrived == s.completed + s.failed + s.timed_out + s.rejected + s.in_flight


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_crashes_on_the_way_out_keep_a_seed_s_run_the_same(mode: str) -> None:
    # crashes that catch answers on their way out (120 ms of it) and retry them: the same seed still gives the
    # same frame, run after run
    over: dict[str, Any] = {"workload.arrivals.rate_per_s": 80, "horizon_s": 120, "pods.replicas": 3,
                            "faults": {"pod_mtbf_s": 20}, "client.max_retries": 2, "service.answer_ms": 120.0,
                            "pods.startup_s": 2}
    if mode == "static":
        over["batching"] = {"max_batch_size": 8, "max_wait_ms": 5}
    runs = [simulate(scenario(**over), 11) for _ in range(3)]
    assert runs[0].summary.crashes > 2 and runs[0].summary.retries > 0
    for r in runs[1:]:
        assert r.requests.equals(runs[0].requests) and r.timeseries.equals(runs[0].timeseries)

"""The continuous validation's calibration over the pod's step trace: the cycle of each step, the fit of
its terms (the model's time, a constant, arrivals, tokens), what goes into the simulator's inputs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from capsim.core.continuous_batcher import StepRecord
from capsim.model.step_model import StepTimeFit
from capsim.studies.validate_continuous_calibrate import (
    StepCalibration,
    calibrated_fit,
    capacity_per_s,
    closed_loop_step_s,
    cycles,
    fit_step_cycles,
)

FIT = StepTimeFit((1e-3, 2e-5, 0.0, 1.5e-4, 5e-7), 1e-4, 0.9, 100,
                  {"prefill_tokens": (0, 64), "prefill_context": (0, 0), "decodes": (0, 16),
                   "decode_context": (0, 1024)}, 1e-4)


def synthetic_run(seed: int, running: int, arrival_rate: float, *, scale: float, extra: float, arrival: float,
                  token: float, noise: float = 0.05, n: int = 400, prefill_factor: float = 1.0,
                  prefill_share: float = 0.2, prefill_tokens: int = 32) -> pd.DataFrame:
    """A pod's step trace whose cycles follow the calibration's form exactly, up to multiplicative noise;
    ``prefill_factor``: the pod's prefill work against the model's (its prefill term times this)."""
    rng = np.random.default_rng(seed)
    rows, end = [], 100.0
    for _ in range(n):
        decodes = int(rng.integers(max(running - 2, 0), running + 2))
        prefill = int(rng.choice([0, prefill_tokens], p=[1 - prefill_share, prefill_share]))
        arrivals = int(rng.poisson(arrival_rate))
        emitted = decodes + (prefill > 0)
        model = FIT.predict(prefill, 0, decodes, decodes * 48) - (1 - prefill_factor) * FIT.coefficients[1] * prefill
        cycle = (scale * model + extra + arrival * arrivals + token * emitted) * rng.lognormal(0, noise)
        gap = 0.02e-3
        rows.append(StepRecord(end + gap, end + cycle, cycle - gap, cycle * 0.9, prefill, 0, decodes, decodes * 48,
                               arrivals, emitted, int(rng.integers(0, 2)), False))
        end += cycle
    return pd.DataFrame(rows, columns=StepRecord.fields())


TRUE = {"scale": 1.3, "extra": 0.4e-3, "arrival": 1.0e-3, "token": 0.0}


def runs(**true: float) -> list[tuple[str, pd.DataFrame]]:
    closed = [(f"closed {r}", synthetic_run(r, r, 0.05, **true)) for r in (2, 4, 8, 16)]
    open_ = [(f"open {r}", synthetic_run(100 + k, r, a, **true)) for k, (r, a) in enumerate([(3, 0.1), (8, 0.3), (14, 0.5)])]
    return closed + open_


def test_the_cycle_runs_from_one_step_end_to_the_next_and_skips_idle_steps() -> None:
    df = synthetic_run(0, 4, 0.2, **TRUE, n=6)
    df.loc[3, "after_idle"] = True
    c = cycles(df, FIT)
    assert len(c) == 4  # the first step has no previous end; the one after idle no cycle
    assert np.allclose(c.cycle_s, np.diff(df.end)[[0, 1, 3, 4]])
    assert np.allclose(c.gap_s, 0.02e-3)
    assert c.model_s.iloc[0] == pytest.approx(FIT.predict(df.prefill_tokens[1], 0, df.decodes[1], df.decode_context[1]))


def test_the_fit_recovers_each_term_and_says_what_explains_the_cycle() -> None:
    cal = fit_step_cycles(runs(**TRUE), FIT)
    assert cal.time_scale == pytest.approx(TRUE["scale"], rel=0.05)
    assert cal.extra_s == pytest.approx(TRUE["extra"], rel=0.15)
    assert cal.arrival_s == pytest.approx(TRUE["arrival"], rel=0.15)
    assert cal.token_s == 0  # not fitted by default (it trades against the scale through the runs' means)
    assert cal.warnings == () and cal.rel_rms_residual < 0.02
    assert sum(cal.shares.values()) == pytest.approx(1.0) and abs(cal.shares["unexplained"]) < 0.02
    assert [p[0] for p in cal.points] == [label for label, _ in runs(**TRUE)]
    assert "per arrival" in cal.describe()


def test_a_per_token_cost_is_carried_through_the_runs_means_with_or_without_its_own_term() -> None:
    true = {**TRUE, "token": 0.05e-3}
    for terms in (("model_s", "one", "arrivals"), ("model_s", "one", "arrivals", "emitted")):
        cal = fit_step_cycles(runs(**true), FIT, terms)
        assert cal.rel_rms_residual < 0.03, terms
        assert cal.arrival_s == pytest.approx(true["arrival"], rel=0.2)
    with pytest.raises(ValueError, match="model_s first"):
        fit_step_cycles(runs(**true), FIT, ("one", "arrivals"))


def test_a_term_the_pod_does_not_pay_sits_at_zero_and_is_named() -> None:
    cal = fit_step_cycles(runs(**{**TRUE, "arrival": 0.0}), FIT)
    assert cal.arrival_s < 0.1e-3
    if cal.arrival_s == 0:
        assert any("per arrival" in w for w in cal.warnings)
    with pytest.raises(ValueError, match="at least 50 steps"):
        fit_step_cycles([("short", synthetic_run(0, 4, 0.1, **TRUE, n=20))], FIT)


def test_a_scale_alone_misses_the_runs_an_arrival_term_explains() -> None:
    # the calibration before the trace: one scale (and a constant) through the runs' mean cycles; with a
    # real per-arrival cost, the open-loop runs' means are missed, and the full fit meets them
    from capsim.studies.validate_continuous_calibrate import fit_cycle_terms, run_means

    frame = pd.concat([cycles(s, FIT).assign(run=label) for label, s in runs(**TRUE)], ignore_index=True)
    means = run_means(frame)
    _, resid = fit_cycle_terms(means, ("model_s", "one"), relative=True)
    per_run = resid / means.cycle_s.to_numpy()
    assert np.abs(per_run).max() > 0.03  # the open-loop run with the most arrivals
    assert fit_step_cycles(runs(**TRUE), FIT).rel_rms_residual < np.abs(per_run).max() / 3


def test_the_simulator_gets_the_extra_in_c0_the_token_time_in_c3() -> None:
    cal = StepCalibration(2.0, 1e-3, (), token_s=0.2e-3, arrival_s=0.5e-3)
    both = calibrated_fit(FIT, cal)
    c, c_ = FIT.coefficients, both.coefficients
    assert c_[0] == pytest.approx(c[0] + 0.5e-3) and c_[3] == pytest.approx(c[3] + 0.1e-3)
    assert (c_[1], c_[2], c_[4]) == (c[1], c[2], c[4])


def test_the_capacity_carries_each_steps_arrivals() -> None:
    s, out = 16, 32
    plain = StepCalibration(1.5, 0.3e-3, (), token_s=0.05e-3)
    base = plain.step_s(closed_loop_step_s(FIT, s, 32, out), 0, s)
    assert capacity_per_s(FIT, plain, s, 32, out) == pytest.approx(s / (out * base))
    cal = StepCalibration(1.5, 0.3e-3, (), token_s=0.05e-3, arrival_s=1e-3)
    rate = capacity_per_s(FIT, cal, s, 32, out)
    # at capacity each step carries rate x step arrivals and s / out requests start per step
    step = base + (s / out) * cal.arrival_s
    assert rate == pytest.approx(s / (out * step)) and rate < capacity_per_s(FIT, plain, s, 32, out)


def test_the_ablation_shows_which_term_meets_the_runs_means() -> None:
    from capsim.studies.validate_continuous_calibrate import term_ablation

    frame = pd.concat([cycles(s, FIT).assign(run=label) for label, s in runs(**TRUE)], ignore_index=True)
    by = {a["terms"]: a for a in term_ablation(frame)}
    full, no_arrivals = by["model_s+one+arrivals"], by["model_s+one"]
    assert full["arrivals"] == pytest.approx(TRUE["arrival"], rel=0.15)
    assert full["runs_rms_rel"] < no_arrivals["runs_rms_rel"] / 3 and full["runs_worst_rel"] < 0.02
    assert "finished" in by["model_s+one+arrivals+emitted+finished"]


def test_the_request_split_separates_the_way_in_and_out_from_the_pods_token_gaps() -> None:
    from capsim.studies.validate_continuous_calibrate import request_split

    # client round trip 50 ms; the pod: queue 1 ms, first token 3 ms after it, last token 31 ms after
    # that, answer ready 1.5 ms later -> 36.5 ms on the pod, 13.5 ms on the way in and out
    row = (0.050, 0.001, 0.004, 0.034, 0.0365)
    sp = request_split([row] * 5, output=32)
    assert sp["requests"] == 5
    assert sp["way_in_and_out_s"] == pytest.approx(0.0135) and sp["answer_path_s"] == pytest.approx(0.0015)
    assert sp["pod_itl_s"] == pytest.approx(0.001) and sp["receipt_itl_s"] == pytest.approx(0.046 / 31)
    assert sp["receipt_over_pod_itl"] == pytest.approx(0.046 / 31 / 0.001 - 1)
    assert request_split([], 32) == {}
    assert "way_in_s" not in sp  # rows without the way in (five columns) do not split it


def test_the_way_in_is_split_from_the_way_out_where_the_pods_receipt_is_on_this_clock() -> None:
    from capsim.studies.validate_continuous_calibrate import request_split

    # the 13.5 ms of the way in and out above: 4 ms in, 9.5 ms out; one row's receipt not on this clock
    rows = [(0.050, 0.001, 0.004, 0.034, 0.0365, 0.004)] * 4 + [(0.050, 0.001, 0.004, 0.034, 0.0365, np.nan)]
    sp = request_split(rows, output=32)
    assert sp["way_in_s"] == pytest.approx(0.004) and sp["way_out_s"] == pytest.approx(0.0095)
    assert sp["way_in_and_out_s"] == pytest.approx(0.0135)  # over all five rows, as before
    assert "way_in_s" not in request_split([rows[-1]] * 3, output=32)


def test_the_simulated_way_in_is_the_levels_open_loop_runs_mean_and_spread() -> None:
    from capsim.studies.validate_continuous_cycle import StepCalibration

    cal = StepCalibration(1.0, 0.0, (), way_in_s={"open 30%": (0.002, 0.002, 0.008), "open 85%": (0.010, 0.030)})
    ms, factors = cal.ingress("open 30%")
    assert ms == pytest.approx(4.0) and factors == pytest.approx((0.5, 0.5, 2.0))  # in send order, mean 1
    ms, factors = cal.ingress("open 85%")
    assert ms == pytest.approx(20.0) and factors == pytest.approx((0.5, 1.5))
    # a level without its own run (or none asked for): all runs pooled
    ms, factors = cal.ingress("open 50%")
    assert ms == pytest.approx(52 / 5) and len(factors) == 5 and np.mean(factors) == pytest.approx(1, abs=1e-3)
    assert cal.ingress() == (ms, factors)
    assert StepCalibration(1.0, 0.0, ()).ingress("open 30%") == (0.0, ())
    assert StepCalibration(1.0, 0.0, (), way_in_s={"open 30%": (0.0, 0.0)}).ingress() == (0.0, ())


def test_the_cycle_parts_add_up_to_the_cycle() -> None:
    from capsim.studies.validate_continuous_calibrate import cycle_parts

    frame = pd.concat([cycles(s, FIT).assign(run=label) for label, s in runs(**TRUE)], ignore_index=True)
    parts = cycle_parts(frame)
    assert [p["run"] for p in parts] == [label for label, _ in runs(**TRUE)]
    for p in parts:
        # the synthetic trace: gap 0.02 ms, the engine's wall the rest, its CPU 0.9 of the cycle
        assert p["cycle_s"] == pytest.approx(p["engine_cpu_s"] + p["wait_s"] + p["handoff_s"] + p["gap_s"])
        assert p["gap_s"] == pytest.approx(0.02) and p["handoff_s"] == pytest.approx(0.0, abs=1e-9)
        assert p["engine_cpu_s"] == pytest.approx(0.9 * p["cycle_s"])


def test_the_rate_that_reached_the_engine_counts_the_steps_arrivals_in_the_window() -> None:
    from capsim.studies.validate_continuous_calibrate import reached_rate

    df = synthetic_run(3, 4, 0.3, **TRUE, n=500)  # steps from t = 100 s on
    t0, seconds = 100.2, 0.5
    inside = df[(df.end > t0) & (df.end <= t0 + seconds)]
    assert reached_rate(df, t0, seconds) == pytest.approx(inside.arrivals.sum() / seconds) and len(inside) > 10
    assert reached_rate(df.iloc[:0], t0, seconds) == 0.0


def test_the_pods_cpu_off_the_engine_is_split_per_request_and_per_step() -> None:
    import os

    from capsim.studies.validate_continuous_calibrate import fit_pod_cpu, process_cpu_s

    runs_ = [(r, n, r * 2.5e-3 + n * 0.3e-3) for r, n in ((10, 900), (40, 1200), (80, 1500), (30, 2000))]
    per_request, per_step = fit_pod_cpu(runs_)
    assert per_request == pytest.approx(2.5e-3) and per_step == pytest.approx(0.3e-3)
    before = process_cpu_s(os.getpid())
    sum(i * i for i in range(2_000_000))  # burn some CPU in this process
    assert process_cpu_s(os.getpid()) > before


def test_the_time_per_arrival_comes_from_within_the_runs_not_from_what_moves_with_them() -> None:
    from capsim.studies.validate_continuous_calibrate import arrival_within_runs

    # each run's cycles also carry a slowdown that grows with its arrival rate (a busier machine at the
    # higher loads): through the runs' means it passes for arrivals, within a run it cannot
    parts = []
    for k, (running, rate) in enumerate([(2, 0.02), (4, 0.05), (8, 0.1), (12, 0.2), (14, 0.3), (16, 0.4)]):
        df = synthetic_run(200 + k, running, rate, **TRUE)
        df["end"] = df.end + np.cumsum(np.full(len(df), rate * 10e-3))  # + 10 ms x the rate on every cycle
        parts.append(cycles(df, FIT).assign(run=f"r{k}"))
    frame = pd.concat(parts, ignore_index=True)
    assert arrival_within_runs(frame) == pytest.approx(TRUE["arrival"], rel=0.2)
    from capsim.studies.validate_continuous_calibrate import fit_cycle_terms, run_means

    coef, _ = fit_cycle_terms(run_means(frame), ("model_s", "one", "arrivals"), relative=True)
    assert coef[2] > 3 * TRUE["arrival"]  # the means alone take the slowdown for arrivals


def test_the_single_steps_spread_around_the_fit_is_kept_for_the_simulator_in_order() -> None:
    from capsim.studies.validate_continuous_cycle import NOISE_STEPS, step_noise

    for sigma in (0.05, 0.4):
        cal = fit_step_cycles(runs(**TRUE, noise=sigma), FIT)
        q = np.asarray(cal.cycle_noise)
        assert 0 < len(q) <= NOISE_STEPS and q.mean() == pytest.approx(1.0, abs=1e-3)
        # the traces' steps are lognormal(0, sigma) around the form the fit recovers: their spread comes back
        lo, hi = np.quantile(q, [0.1, 0.9])
        assert np.log(hi / lo) == pytest.approx(2 * 1.2816 * sigma, rel=0.15)
    # in the order the steps ran: a contiguous stretch from the middle of each run, each run its share
    cyc = np.arange(1.0, 21.0)
    got = step_noise(cyc, np.ones(20), np.array(["a"] * 10 + ["b"] * 10), n=4)
    expected = np.array([5.0, 6.0, 15.0, 16.0])
    assert got == tuple(np.round(expected / expected.mean(), 4))
    # a step whose fit is not positive says nothing about the spread
    assert step_noise([1.0, 2.0, 3.0], [0.0, 2.0, 3.0]) == (1.0, 1.0)
    assert step_noise([1.0], [0.0]) == ()


def test_a_levels_steps_are_weighed_against_the_calibrated_model() -> None:
    from capsim.studies.validate_continuous import level_cycles

    cal = fit_step_cycles(runs(**TRUE, noise=0.01), FIT)
    same = synthetic_run(7, 8, 0.3, **TRUE, noise=0.01)
    cyc, fitted, n = level_cycles(same, FIT, cal)
    assert n == len(same) - 1 and cyc / fitted == pytest.approx(1.0, abs=0.03)
    slower = synthetic_run(7, 8, 0.3, **{**TRUE, "scale": TRUE["scale"] * 1.25}, noise=0.01)
    cyc, fitted, _ = level_cycles(slower, FIT, cal)
    assert cyc / fitted == pytest.approx(1.2, abs=0.05)  # the model part grows by 25%, the constants do not
    assert level_cycles(same.iloc[:1], FIT, cal) == (0.0, 0.0, 0)


def test_a_runs_replay_is_its_speed_in_windows_of_steps_in_order_over_the_calibrated_model() -> None:
    from capsim.model.scenario import CYCLE_NOISE_MAX
    from capsim.studies.validate_continuous_cycle import REPLAY_STEPS, REPLAY_WINDOW, replay_noise

    cal = fit_step_cycles(runs(**TRUE, noise=0.01), FIT)
    run = synthetic_run(7, 8, 0.3, **TRUE, noise=0.01, n=200)
    # a slow spell: steps 64-127 (two windows) take twice their time, later steps move with them
    slow = np.zeros(len(run))
    slow[64:128] = (run.end - run.start).to_numpy()[64:128]
    run["end"] += np.cumsum(slow)
    run["start"] += np.concatenate([[0.0], np.cumsum(slow)[:-1]])
    run.loc[150, "after_idle"] = True  # an idle wait before step 150: its factor is its own time, not the wait
    run.loc[150:, ["start", "end"]] += 1.0
    each = np.asarray(replay_noise(run, FIT, cal, window=1))  # each step its own ratio
    assert len(each) == len(run) and each.mean() == pytest.approx(1.0, abs=1e-3)
    assert each[64:128].mean() / np.delete(each, range(64, 128)).mean() == pytest.approx(2.0, rel=0.05)
    assert each[150] == pytest.approx(np.median(each[129:200]), rel=0.1)
    got = np.asarray(replay_noise(run, FIT, cal))
    assert REPLAY_WINDOW == 32 and len(got) == len(run) and got.mean() == pytest.approx(1.0, abs=1e-3)
    windows = [got[k:k + 32] for k in range(0, len(got), 32)]
    assert all(np.ptp(w) == 0 for w in windows)  # one speed a window
    assert got[64] / got[0] == pytest.approx(2.0, rel=0.05) and got[128] == pytest.approx(got[0], rel=0.05)
    # a single long pause on one small step moves its window's speed by its share of the window's time
    pause = run.copy()
    pause.loc[10:, ["start", "end"]] += 0.02
    bumped = np.asarray(replay_noise(pause, FIT, cal))
    assert bumped[0] / bumped[40] > got[0] / got[40]
    assert len(replay_noise(run, FIT, cal, n=50)) == 50 and REPLAY_STEPS <= CYCLE_NOISE_MAX
    assert replay_noise(run.iloc[:1], FIT, cal) == ()


def test_the_answer_time_is_the_way_in_and_out_plus_the_answer_path() -> None:
    from capsim.studies.validate_continuous import answer_ms

    splits = {"open 30%": {"way_in_and_out_s": 0.005, "answer_path_s": 0.002},
              "open 60%": {"way_in_and_out_s": 0.009, "answer_path_s": 0.007},
              "open 85%": {"way_in_and_out_s": 0.008, "answer_path_s": 0.006}, "open 50%": {}}
    assert answer_ms(splits) == pytest.approx(14.0)
    assert answer_ms({}) == 0.0
    # the way in measured apart (the simulator's ingress, the real TTFT from the send): only the way out
    # lands on the answer, unless the caller puts the way in there too
    apart = {k: {**v, "way_in_s": 0.003, "way_out_s": v["way_in_and_out_s"] - 0.003} for k, v in splits.items() if v}
    assert answer_ms(apart) == pytest.approx(11.0)
    assert answer_ms(apart, way_in_apart=False) == pytest.approx(14.0)


def test_a_driven_runs_span_holds_every_request_it_sent(tmp_path) -> None:
    # the real pod in continuous mode, an open and a closed run: the span each returns (from once the clients
    # are built to the last answer) holds the engine steps of all their requests, and the open run's span
    # starts at its schedule's zero (every request reached the engine within the run's seconds)
    from capsim.studies.pods import PodProcess
    from capsim.studies.validate_continuous_calibrate import (
        drive_closed,
        drive_open,
        fetch_steps,
        reached_rate,
    )

    pod = PodProcess(tmp_path, batch_mode="continuous", num_blocks=256, max_num_seqs=8, max_model_len=200,
                     max_prompt_tokens=256, max_new_tokens=64).start()
    try:
        t0, t1, rows = drive_open(pod.url, 20.0, 1.0, 8, 4, seed=3)
        assert len(rows) >= 5 and t1 > t0
        steps = fetch_steps(pod.url, t0, t1)
        assert int(steps.arrivals.sum()) == len(rows)  # none of them before the span, none after
        assert reached_rate(steps, t0, t1 - t0) == pytest.approx(len(rows) / (t1 - t0))
        c0, c1 = drive_closed(pod.url, 2, 0.5, 8, 4)
        assert t1 <= c0 < c1 and c1 - c0 >= 0.5
        closed = fetch_steps(pod.url, c0, c1)
        assert len(closed) > 0 and int(closed.arrivals.sum()) >= 2
    finally:
        pod.stop()


def test_a_fit_through_the_open_loop_runs_takes_their_arrival_cost_and_weighs_the_closed_ones() -> None:
    # the open loops' arrivals cost more than the closed loops' (stop 39: 0.40 against 0.30 ms): a fit through
    # all runs falls between, a fit through the open ones recovers theirs, and the closed ones show against it
    closed = [(f"closed {n}", synthetic_run(n, n, 0.4, scale=1.3, extra=2e-4, arrival=0.3e-3, token=0.0)) for n in (2, 4, 8, 16)]
    opened = [(f"open {k}", synthetic_run(10 + k, n, 0.3, scale=1.3, extra=2e-4, arrival=0.8e-3, token=0.0))
              for k, n in enumerate((3, 6, 9, 12))]
    runs = closed + opened
    everything = fit_step_cycles(runs, FIT)
    cal = fit_step_cycles(runs, FIT, through=[label for label, _ in opened])
    assert cal.fitted_runs == ("open 0", "open 1", "open 2", "open 3")
    assert cal.time_scale == pytest.approx(1.3, rel=0.02) and cal.arrival_s == pytest.approx(0.8e-3, rel=0.1)
    assert cal.extra_s == pytest.approx(2e-4, rel=0.3)
    assert abs(everything.arrival_s - 0.8e-3) > 0.1e-3  # the closed runs' cheaper arrivals pull the pooled fit
    # every run is still weighed against the fit: the open ones met, the closed ones faster than it
    by_run = {p[0]: p[3] / p[4] for p in cal.points}
    assert set(by_run) == {label for label, _ in runs}
    assert all(abs(by_run[label] - 1) < 0.02 for label, _ in opened)
    assert all(by_run[label] < 0.99 for label, _ in closed)
    assert "fitted through open 0, open 1, open 2, open 3" in cal.describe()
    # the steps' spread comes from the fitted runs only (the closed runs' offset is no spread)
    assert cal.cycle_noise and abs(np.mean(cal.cycle_noise) - 1) < 1e-3
    with pytest.raises(ValueError, match="no run labelled open 9"):
        fit_step_cycles(runs, FIT, through=["open 9"])
    with pytest.raises(ValueError, match="at least 3 runs with steps to fit through"):
        fit_step_cycles(runs, FIT, through=["open 0", "open 1"])


def test_a_runs_ratio_to_the_fit_is_read_from_the_calibrations_points() -> None:
    cal = fit_step_cycles(runs(**TRUE), FIT, through=["open 3", "open 8", "open 14"])
    p = next(p for p in cal.points if p[0] == "closed 16")
    assert cal.run_ratio("closed 16") == pytest.approx(p[3] / p[4])
    assert cal.run_ratio("closed 99") == 1.0  # no such run: no correction


def _prefill_ratio(runs: list[tuple[str, pd.DataFrame]], cal: StepCalibration) -> float:
    """The steps with a prefill chunk: their cycles over the calibrated fit's time for them, summed."""
    cyc = fitted = 0.0
    for _, steps in runs:
        c = cycles(steps, cal.model(FIT))
        pre = c.prefill_tokens > 0
        cyc += float(c.cycle_s[pre].sum())
        fitted += float(cal.step_s(c.model_s[pre], c.arrivals[pre]).sum())
    return cyc / fitted


def test_the_prefill_scale_meets_the_steps_with_a_prefill_as_the_decode_steps() -> None:
    # the pod's prefill work at 0.6 of what the lone process measured (stop 40's pods: 0.58 to 0.61): with
    # one scale for the model, the prefill steps run under their fit; the prefill scale finds the 0.6
    true = {"scale": 1.3, "extra": 2e-4, "arrival": 0.5e-3, "token": 0.0, "prefill_factor": 0.6, "prefill_tokens": 128}
    runs = [(f"open {n}", synthetic_run(20 + n, n, a, **true)) for n, a in ((3, 0.1), (6, 0.2), (9, 0.3), (12, 0.4), (15, 0.5))]
    plain = fit_step_cycles(runs, FIT)
    cal = fit_step_cycles(runs, FIT, prefill_scale=True)
    assert plain.prefill_scale == 1.0 and _prefill_ratio(runs, plain) < 0.85
    assert cal.prefill_scale == pytest.approx(0.6, rel=0.08) and cal.time_scale == pytest.approx(1.3, rel=0.03)
    assert _prefill_ratio(runs, cal) == pytest.approx(1.0, abs=0.01)
    assert cal.prefill_ratio_before == pytest.approx(_prefill_ratio(runs, plain), rel=1e-6)
    assert "prefill terms x 0.6" in cal.describe()
    # the simulator's model carries it (the prefill terms only), as does the capacity
    c, c0 = calibrated_fit(FIT, cal).coefficients, FIT.coefficients
    assert c[1] == pytest.approx(c0[1] * cal.prefill_scale) and c[3] == pytest.approx(c0[3])
    assert capacity_per_s(FIT, cal, 16, 32, 16) > capacity_per_s(FIT, replace(cal, prefill_scale=1.0), 16, 32, 16)


def test_the_prefill_scale_stays_near_1_when_the_model_has_the_prefill_right_and_at_1_without_prefills() -> None:
    true = {"scale": 1.3, "extra": 2e-4, "arrival": 0.5e-3, "token": 0.0}
    right = [(f"open {n}", synthetic_run(40 + n, n, 0.2, **true)) for n in (3, 6, 9, 12, 15)]
    assert fit_step_cycles(right, FIT, prefill_scale=True).prefill_scale == pytest.approx(1.0, abs=0.06)
    none = [(f"open {n}", synthetic_run(60 + n, n, 0.2, **true, prefill_share=0.0)) for n in (3, 6, 9, 12, 15)]
    cal = fit_step_cycles(none, FIT, prefill_scale=True)
    assert cal.prefill_scale == 1.0 and cal == fit_step_cycles(none, FIT)
    # a pod whose prefill work is far off the model's: the scale stops at its bound, and says so
    far = [(f"open {n}", synthetic_run(80 + n, n, 0.2, **true, prefill_factor=0.05, prefill_tokens=256))
           for n in (3, 6, 9, 12, 15)]
    bounded = fit_step_cycles(far, FIT, prefill_scale=True)
    assert bounded.prefill_scale == 0.25 and any("prefill scale sits at its bound 0.25" in w for w in bounded.warnings)

"""The continuous-mode validation: its calibration, the simulator's side of a level (with and without
preemption), the table, the command line, and a short real run end to end (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from capsim.model.profile import ServiceTimeProfile
from capsim.model.step_model import StepTimeFit
from capsim.sim.simulate import simulate
from capsim.studies import validate_stats as vs
from capsim.studies.validate_continuous import (
    BASE_PROFILE,
    METRICS,
    ContinuousSpec,
    StepCalibration,
    _Pool,
    _rows,
    capacity_per_s,
    closed_loop_step_s,
    format_results,
    itl_frame,
    level_scenario,
    run_continuous_validation,
    sim_token_span,
)

FIT = StepTimeFit((1e-3, 2e-5, 0.0, 1.5e-4, 5e-7), 1e-4, 0.9, 100,
                  {"prefill_tokens": (0, 64), "prefill_context": (0, 0), "decodes": (0, 16),
                   "decode_context": (0, 1024)}, 1e-4)


@pytest.fixture()
def fitted_profile(tmp_path: Path) -> Path:
    base = ServiceTimeProfile.from_csv(BASE_PROFILE)
    return ServiceTimeProfile(base.points, {**base.metadata, "step_model": FIT.to_dict()}, base.source).to_csv(
        tmp_path / "steps.csv")


def test_a_closed_loop_step_and_the_capacity_follow_the_model() -> None:
    # 16 running, 32-token outputs: half a prompt of 32 tokens per step, 15.5 decodes at context 48
    assert closed_loop_step_s(FIT, 16, 32, 32) == pytest.approx(FIT.predict(16, 0, 15.5, 15.5 * 48))
    spec = ContinuousSpec()
    cap = capacity_per_s(FIT, StepCalibration(1.0, 0.0, ()), spec)
    assert cap == pytest.approx(16 / (32 * closed_loop_step_s(FIT, 16, 32, 32)))
    assert capacity_per_s(FIT, StepCalibration(2.0, 0.0, ()), spec) == pytest.approx(cap / 2)
    assert spec.small_cache_blocks == 32  # 4 blocks a request, half of 16 requests' worth


def test_itl_is_the_mean_gap_between_tokens_after_the_first(fitted_profile: Path) -> None:
    sc = level_scenario(ContinuousSpec(seconds_per_run=5), fitted_profile, 20.0, 1.0, 1024)
    req = simulate(sc, seed=0).requests
    ok = req[req.outcome == "ok"]
    itl = (itl_frame(ok).first_token_s - ok.arrival_s).to_numpy()
    # the simulator's own column says the same (mean time per output token after the first)
    assert np.allclose(itl, ok.itl_s.to_numpy(), rtol=1e-9, atol=1e-12)
    # a step decodes each running request once: an ITL is at least the model's smallest step
    assert itl.min() >= FIT.predict(0, 0, 1, 33) - 1e-12


def test_the_simulated_itl_leaves_out_the_answers_way_out(fitted_profile: Path) -> None:
    # end_s is the answer at the client, answer_ms past the last token: no gap between tokens holds it
    sc = level_scenario(ContinuousSpec(seconds_per_run=5), fitted_profile, 20.0, 1.0, 1024, answer_ms=2.38)
    req = simulate(sc, seed=0).requests
    ok = req[req.outcome == "ok"]
    itl = (itl_frame(ok, sim_token_span(ok, 2.38)).first_token_s - ok.arrival_s).to_numpy()
    assert np.allclose(itl, ok.itl_s.to_numpy(), rtol=1e-9, atol=1e-12)
    # the span to the answer (the validation's ITL until stop 36) is 2.38 ms / 31 gaps longer
    naive = (itl_frame(ok).first_token_s - ok.arrival_s).to_numpy()
    assert np.allclose(naive - itl, 2.38e-3 / (sc.workload.output_tokens.value - 1))


def test_only_the_small_cache_preempts(fitted_profile: Path) -> None:
    spec = ContinuousSpec(seconds_per_run=10)
    full = simulate(level_scenario(spec, fitted_profile, 0.9 * capacity_per_s(FIT, StepCalibration(1, 0, ()), spec),
                                   1.0, spec.num_blocks), seed=0).summary
    small = simulate(level_scenario(spec, fitted_profile,
                                    spec.preemption_level * capacity_per_s(FIT, StepCalibration(1, 0, ()), spec),
                                    1.0, spec.small_cache_blocks), seed=0).summary
    assert full.preemptions == 0
    assert small.preemptions > 0


def test_the_rows_compare_like_with_like_and_the_table_flags_misses(fitted_profile: Path) -> None:
    spec = ContinuousSpec(seconds_per_run=6)
    sc = level_scenario(spec, fitted_profile, 30.0, 1.0, 1024)
    a = simulate(sc, seed=0).requests
    slower = simulate(level_scenario(spec, fitted_profile, 30.0, 1.3, 1024), seed=0).requests
    w, end = sc.warmup_s, sc.horizon_s

    def pool(real: object, sim: object) -> _Pool:
        return _Pool([vs.cut_blocks(real, w, end)], [vs.cut_blocks(sim, w, end)],
                     [vs.cut_blocks(itl_frame(real), w, end)], [vs.cut_blocks(itl_frame(sim), w, end)], [(3.0, 4.0)],
                     100)

    import pandas as pd

    same = pd.DataFrame(_rows(0.5, "full", 30.0, pool(a, a)))
    assert np.allclose(same[same.metric != "preemptions"].rel_error, 0.0)
    pre = same[same.metric == "preemptions"].iloc[0]
    assert (pre.real, pre.sim, pre.rel_error) == (3.0, 4.0, pytest.approx(1 / 3))
    off = pd.DataFrame(_rows(0.5, "full", 30.0, pool(a, slower)))
    itl = off[off.metric == "itl_p50_s"].iloc[0]
    # every step 1.3x: the ITL at least that much (more, as more requests run at once then)
    assert 0.29 <= itl.rel_error < 0.6
    assert itl.error_low <= itl.rel_error <= itl.error_high
    table = format_results(off)
    assert "itl_p50_s" in table and "MISS" in table and "preemptions" in table
    assert same[same.metric == "ttft_p99_s"].iloc[0].intervals_overlap
    assert "overlap" in format_results(same)
    # the rows say which simulation they compare, and the table counts each one's targets (8 a level)
    both = pd.concat([same, pd.DataFrame(_rows(0.5, "full", 30.0, pool(a, slower), "run speed"))])
    assert set(both.sim_at) == {"calibration", "run speed"}
    table = format_results(both)
    assert "targets met, simulated at calibration: 8 of 8" in table
    n_ok = sum(1 for r in off.itertuples() if r.metric != "itl_p99_s" and r.metric in METRICS
               and abs(r.rel_error) <= (0.03 if r.metric == "throughput_per_s" else 0.10 if "p50" in r.metric else 0.15))
    assert f"targets met, simulated at run speed: {n_ok} of 8" in table and n_ok < 8


def test_capsim_validate_checks_its_mode() -> None:
    from typer.testing import CliRunner

    from capsim.cli import app

    res = CliRunner().invoke(app, ["validate", "--mode", "paged"])
    assert res.exit_code != 0 and "--mode must be static or continuous" in res.output


def test_capsim_validate_passes_the_step_spread_and_probe_choices_to_the_continuous_spec(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import capsim.studies.validate_continuous as vc
    from capsim.cli import app

    seen: list[ContinuousSpec] = []
    monkeypatch.setattr(vc, "run_continuous_validation", lambda spec, **_: seen.append(spec))
    for flag, expected in (("0", (False, 1)), ("1", (True, 1)), ("16", (True, 16))):
        res = CliRunner().invoke(app, ["validate", "--mode", "continuous", "--out-dir", str(tmp_path),
                                       "--noise-block-steps", flag])
        assert res.exit_code == 0, res.output
        assert (seen[-1].cycle_noise, seen[-1].noise_block_steps) == expected
    res = CliRunner().invoke(app, ["validate", "--mode", "continuous", "--out-dir", str(tmp_path)])
    assert (seen[-1].cycle_noise, seen[-1].noise_block_steps, seen[-1].probe_s) == (True, 64, 2.0)
    res = CliRunner().invoke(app, ["validate", "--mode", "continuous", "--out-dir", str(tmp_path), "--probe-s", "0"])
    assert res.exit_code == 0, res.output
    assert seen[-1].probe_s == 0.0  # no probes: the runs simulated without the two probe speeds
    assert seen[-1].ttft_from_send  # the TTFT from the client's send, by default
    res = CliRunner().invoke(app, ["validate", "--mode", "continuous", "--out-dir", str(tmp_path),
                                   "--ttft-from-receipt"])
    assert res.exit_code == 0, res.output
    assert not seen[-1].ttft_from_send
    for flag in (["--noise-block-steps", "4"], ["--ttft-from-receipt"]):
        res = CliRunner().invoke(app, ["validate", *flag])
        assert res.exit_code != 0 and "--mode continuous only" in res.output


@pytest.mark.slow
@pytest.mark.timeout(900)  # two pod starts, the step measurement and the bootstraps: 5 min on a busy machine
def test_a_short_continuous_validation_runs_end_to_end(tmp_path: Path) -> None:
    spec = ContinuousSpec(levels=(0.3,), replications=1, seconds_per_run=3.0, calibration_s=1.0, step_workloads=1)
    results = run_continuous_validation(spec, out_dir=tmp_path, echo=lambda _: None)
    assert set(results.cache) == {"full", f"small ({spec.small_cache_blocks} blocks)"}
    assert {"itl_p50_s", "ttft_p99_s", "throughput_per_s", "preemptions"} <= set(results.metric)
    assert (tmp_path / "results.csv").exists() and (tmp_path / "provenance.json").exists()
    assert (tmp_path / "calibration_steps.csv").exists()  # the pod's steps the calibration was fitted over
    assert (tmp_path / "service.yaml").exists()  # the calibrated pod, for a scenario
    fit = StepTimeFit.from_dict(ServiceTimeProfile.from_csv(tmp_path / "profile.csv").metadata["step_model"])
    assert fit.overhead_s > 0
    ok = results[(results.metric == "throughput_per_s") & (results.cache == "full")].iloc[0]
    assert ok.real > 0 and ok.sim > 0
    # each level also simulated at the pod's own speed in its runs, and the pod's cycles weighed
    assert set(results.sim_at) == {"calibration", "probe speed", "level probe speed", "run speed", "run replay"}
    cyc = results[(results.metric == "pod_cycle_mean_s") & (results.sim_at == "calibration")]
    assert len(cyc) == 2 and (cyc.real > 0).all() and (cyc.sim > 0).all()
    # the real TTFT counts from the send, and the calibration measured the way in the simulator gives
    import json

    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["real_ttft_from"] == "send" and prov["off_pod_clock"] == []
    # and the speeds its runs measured after the calibration, with the margin a plan on it needs
    observed = prov["observed_speed"]
    assert 1 <= observed["runs"] <= 2 and 0 < observed["min"] <= observed["max"]
    assert "# After the calibration, the pod ran " in (tmp_path / "service.yaml").read_text()
    assert isinstance(prov["front_end_queued"], list)  # runs whose way in queued (none expected at 30%)
    way = results[(results.metric == "reach_mean_s") & (results.sim_at == "calibration")]
    assert len(way) == 2 and (way.real > 0).all() and (way.sim > 0).all()
    way_in = prov["calibration"]["way_in_s"]
    assert set(way_in) == {"open 30%", "open 50%"} and all(len(v) > 0 and min(v) >= 0 for v in way_in.values())
    assert all(0 < sp["way_in_s"] < sp["way_in_and_out_s"] for sp in prov["request_split"].values())
    assert prov["trace_short"] == []  # the pods' traces held every run from its start
    # every run's real requests (with their way in), the pod's steps and each simulation's requests are kept
    import pandas as pd

    kept = {f.name for f in (tmp_path / "runs").iterdir()}
    for cache in ("full-30", "small-50"):
        assert {f"{cache}-seed0-{w}.csv.gz" for w in ("real", "steps", "sim-calibration", "sim-run-speed",
                                                      "sim-run-replay")} <= kept
    real = pd.read_csv(tmp_path / "runs" / "full-30-seed0-real.csv.gz")
    sim = pd.read_csv(tmp_path / "runs" / "full-30-seed0-sim-calibration.csv.gz")
    steps = pd.read_csv(tmp_path / "runs" / "full-30-seed0-steps.csv.gz")
    assert sorted(real.request_id) == sorted(sim.request_id) and (real.way_in_s >= 0).all()
    assert int(steps.arrivals.sum()) == int((real.outcome == "ok").sum())  # the run's steps, all of them


def test_a_real_frames_itl_is_the_pods_own_token_span_when_the_load_generator_kept_it() -> None:
    import pandas as pd

    from capsim.studies.validate_continuous import pod_token_span

    # a client that got the answer 12 ms after the pod's last token: the span to the receipt says 31 x 1 ms
    # + 12 ms, the pod's own span 31 x 1 ms
    real = pd.DataFrame({"arrival_s": [0.0, 1.0], "first_token_s": [0.005, 1.005], "end_s": [0.048, 1.048],
                         "output_tokens": [32, 32]})
    assert np.allclose(itl_frame(real).first_token_s - real.arrival_s, 0.043 / 31)
    assert pod_token_span(real) is None
    real.attrs["token_span_s"] = [0.031, 0.031]
    span = pod_token_span(real)
    assert span is not None
    assert np.allclose(itl_frame(real, span).first_token_s - real.arrival_s, 0.001)
    real.attrs["token_span_s"] = [0.031]  # not one per row: not used
    assert pod_token_span(real) is None


def test_the_simulated_way_in_delays_each_first_token_and_a_runs_own_is_read_from_its_frame(
        fitted_profile: Path) -> None:
    import pandas as pd

    from capsim.studies.validate_continuous import own_ingress

    spec = ContinuousSpec(seconds_per_run=6)
    plain = simulate(level_scenario(spec, fitted_profile, 20.0, 1.0, 1024), seed=0).requests
    factors = (0.5, 0.5, 0.5, 2.5)
    late = simulate(level_scenario(spec, fitted_profile, 20.0, 1.0, 1024, ingress_ms=8.0, ingress_noise=factors),
                    seed=0).requests
    ttft = (plain.first_token_s - plain.arrival_s).median(), (late.first_token_s - late.arrival_s)
    # at 20 requests/s the pod is mostly idle: the way in adds to the TTFT (4 ms for most, 20 ms for some)
    assert ttft[1].median() - ttft[0] == pytest.approx(4e-3, abs=1.5e-3)
    assert ttft[1].quantile(0.95) - ttft[0] > 15e-3
    # a real run's own way in: its mean and each request's over it, in send order
    real = pd.DataFrame({"arrival_s": [0.2, 0.1, 0.3], "first_token_s": [0.21, 0.11, 0.31]})
    real.attrs["way_in_s"] = [0.006, 0.002, np.nan]
    assert own_ingress(real) == (pytest.approx(4.0), pytest.approx((0.5, 1.5)))
    # with the pod's history read after its receipt (the answers' load_s), the way to the engine is both
    real.attrs["load_s"] = [0.002, 0.002, 0.001]
    assert own_ingress(real) == (pytest.approx(6.0), pytest.approx((4 / 6, 8 / 6), abs=1e-4))
    assert own_ingress(real, history_read=False) == (pytest.approx(4.0), pytest.approx((0.5, 1.5)))
    real.attrs["load_s"] = [0.002]  # not one per row: the way in alone
    assert own_ingress(real) == (pytest.approx(4.0), pytest.approx((0.5, 1.5)))
    real.attrs["way_in_s"] = [0.006]  # not one per row (a run kept before stop 28): none
    assert own_ingress(real) == (0.0, ())
    assert own_ingress(real.iloc[:0]) == (0.0, ())


def test_the_pods_own_end_to_end_is_compared_when_its_span_is_known(fitted_profile: Path) -> None:
    import pandas as pd

    from capsim.studies.validate_continuous import pod_e2e_frame

    spec = ContinuousSpec(seconds_per_run=6)
    sc = level_scenario(spec, fitted_profile, 30.0, 1.0, 1024)
    sim = simulate(sc, seed=0).requests
    w, end = sc.warmup_s, sc.horizon_s
    # a "real" frame: the simulator's, answered 12 ms after each last token
    real = sim.assign(end_s=sim.end_s + 0.012)
    span = (sim.end_s - sim.first_token_s).to_numpy()
    assert np.allclose(pod_e2e_frame(real, span).end_s, sim.end_s, equal_nan=True)  # NaN: not answered
    blocks = [vs.cut_blocks(real, w, end)], [vs.cut_blocks(sim, w, end)]
    itl = [vs.cut_blocks(itl_frame(real, span), w, end)], [vs.cut_blocks(itl_frame(sim), w, end)]
    pool = _Pool(*blocks, *itl, [(0.0, 0.0)], 100, [vs.cut_blocks(pod_e2e_frame(real, span), w, end)],
                 [vs.cut_blocks(sim, w, end)])
    rows = pd.DataFrame(_rows(0.3, "full", 30.0, pool)).set_index("metric")
    assert rows.loc["e2e_p50_s"].rel_error < -0.05  # the client's E2E holds the 12 ms the simulator lacks
    assert rows.loc["pod_e2e_p50_s"].rel_error == pytest.approx(0.0, abs=1e-9)
    assert "reach_mean_s" not in rows.index  # the way in not measured: no row
    # measured: the runs' mean way in against the simulated one, where a front end that queued shows
    pool.way_in += [(0.004, 0.003), (0.300, 0.003)]
    way = pd.DataFrame(_rows(0.3, "full", 30.0, pool)).set_index("metric").loc["reach_mean_s"]
    assert (way.real, way.sim) == (pytest.approx(0.152), pytest.approx(0.003))
    assert way.rel_error == pytest.approx(0.003 / 0.152 - 1)
    assert rows.loc["itl_p50_s"].rel_error == pytest.approx(0.0, abs=1e-9)
    without = pd.DataFrame(_rows(0.3, "full", 30.0, _Pool(*blocks, *itl, [(0.0, 0.0)], 100)))
    assert "pod_e2e_p50_s" not in set(without.metric)


def test_the_calibrated_continuous_pod_is_written_as_a_scenario_fragment(fitted_profile: Path, tmp_path: Path) -> None:
    import yaml

    from capsim.model.scenario import Scenario
    from capsim.studies.validate import SERVICE_FILE
    from capsim.studies.validate_continuous import write_continuous_service

    spec = ContinuousSpec()
    # two open-loop runs' way to the engine: the fragment pools them (each level takes its own rate's run)
    cal = StepCalibration(1.3, 2e-4, (), arrival_s=1.1e-3, cycle_noise=(0.8, 1.0, 1.2),
                          way_in_s={"open 30%": (0.002, 0.004), "open 85%": (0.006, 0.008, 0.010)})
    path = write_continuous_service(tmp_path, spec, fitted_profile, cal, answer=2.5)
    assert path == tmp_path / SERVICE_FILE
    text = path.read_text()
    assert text.startswith("# The pod `capsim validate` calibrated (continuous, tiny model")
    assert "cycle_noise: [0.8, 1.0, 1.2]" in text  # lists of numbers inline, not one line each
    fragment = yaml.safe_load(text)
    assert set(fragment) == {"service", "batching"}
    mine = Scenario.model_validate({"horizon_s": 20, "workload": {
        "arrivals": {"kind": "poisson", "rate_per_s": 20.0}, "prompt_tokens": {"kind": "constant", "value": 32},
        "output_tokens": {"kind": "constant", "value": 32}}, **fragment})
    ms, factors = cal.ingress()
    assert ms == pytest.approx(6.0)  # the five requests' mean, in ms
    level = level_scenario(spec, fitted_profile, 20.0, 1.3, spec.num_blocks, 1.1, (0.8, 1.0, 1.2), 2.5,
                           spec.noise_block_steps, ms, factors)
    assert mine.service == level.service
    # the engine limits the step model was measured with; the validation's deep queue and its max_model_len
    # (prompt + output + 1, which would reject a plan's longer requests) are left to the plan
    assert "max_model_len" not in fragment["batching"] and "queue_capacity" not in fragment["batching"]
    assert mine.batching == level.batching.model_copy(update={"max_model_len": 8192, "queue_capacity": 1024})
    assert mine.batching.mode == "continuous" and mine.batching.num_blocks == spec.num_blocks
    # without the send-based TTFT the way in is not the simulator's: left out, as the levels leave it out
    apart = yaml.safe_load(write_continuous_service(tmp_path, ContinuousSpec(ttft_from_send=False), fitted_profile,
                                                    cal, 2.5).read_text())
    assert apart["service"]["ingress_ms"] == 0 and apart["service"]["ingress_noise"] is None
    assert simulate(mine, seed=0).summary.completed > 300

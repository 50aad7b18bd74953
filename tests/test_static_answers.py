"""A static batch's answers reach their clients after the way out (``service.answer_ms`` plus
``answer_per_request_ms`` a request), its first token ``service.first_token_scale`` times as far into it,
and ``probe_answers`` measures the three from an open-loop probe's requests and the pod's batch trace."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from capsim.model.profile import ServiceTimeProfile
from capsim.model.request import requests_frame
from capsim.sim.simulate import simulate
from capsim.studies.validate import ValidationSpec, level_scenario
from capsim.studies.validate_calibrate import Calibration, probe_answers
from capsim.studies.validate_runs import (
    TRACES_FILE,
    KeptRunsError,
    load_traces,
    probe_frame,
    probe_requests,
    save_traces,
)

ROOT = Path(__file__).resolve().parent.parent
CPU = ROOT / "data" / "profiles" / "cpu-tiny-float32.csv"
SPEC = ValidationSpec(requests_per_level=1500)
PLAIN = Calibration(1.0, 0.0, ())


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame.outcome == "ok"].sort_values("request_id").reset_index(drop=True)


def test_level_scenario_carries_the_answers_and_the_first_token() -> None:
    cal = replace(PLAIN, answer_s=0.004, answer_per_request_s=0.001, first_token_scale=1.5)
    svc = level_scenario(SPEC, CPU, 30.0, cal).service
    assert (svc.answer_ms, svc.answer_per_request_ms, svc.first_token_scale) == pytest.approx((4.0, 1.0, 1.5))
    plain = level_scenario(SPEC, CPU, 30.0).service
    assert (plain.answer_ms, plain.answer_per_request_ms, plain.first_token_scale) == (0.0, 0.0, 1.0)


def test_static_answers_arrive_after_the_way_out_and_the_first_token_moves() -> None:
    # an open loop: the same seed gives the same batches with and without, so each request's times differ
    # by exactly the way out (end) and the first token's factor (capped at the batch's end)
    rate = 60.0
    base = _ok(simulate(level_scenario(SPEC, CPU, rate, PLAIN), seed=3).requests)
    cal = replace(PLAIN, answer_s=0.004, answer_per_request_s=0.001, first_token_scale=1.5)
    moved = _ok(simulate(level_scenario(SPEC, CPU, rate, cal), seed=3).requests)
    assert len(base) == len(moved) > 400
    assert base.batch_size.max() > 1  # batches of several, so the per-request term shows
    np.testing.assert_array_equal(moved.start_s, base.start_s)
    np.testing.assert_allclose(moved.end_s - base.end_s, 0.004 + 0.001 * base.batch_size, rtol=0, atol=1e-9)
    batch_end = base.end_s - base.start_s
    np.testing.assert_allclose(moved.first_token_s - moved.start_s,
                               np.minimum(1.5 * (base.first_token_s - base.start_s), batch_end), rtol=1e-9)
    # a scale that would pass the end stops at it
    late = _ok(simulate(level_scenario(SPEC, CPU, rate, replace(PLAIN, first_token_scale=100.0)), seed=3).requests)
    np.testing.assert_allclose(late.first_token_s, base.end_s, rtol=1e-12)


def test_a_closed_loop_session_sends_its_next_turn_after_the_answer_arrives() -> None:
    cal = replace(PLAIN, answer_s=0.05, answer_per_request_s=0.002)
    sc = level_scenario(SPEC, CPU, 5.0, cal).override({
        "workload.sessions": {"turns": 4, "mode": "closed", "think_time_s": {"kind": "constant", "value_s": 0.0}}})
    df = _ok(simulate(sc, seed=1).requests)
    nxt = df.merge(df.assign(request_id=df.request_id + 1), on="request_id", suffixes=("", "_prev"))
    nxt = nxt[nxt.session_id == nxt.session_id_prev]
    assert len(nxt) > 100
    # no think time: each turn leaves the moment the previous answer reaches its client, way out included
    np.testing.assert_allclose(nxt.arrival_s, nxt.end_s_prev, rtol=0, atol=1e-9)
    assert (nxt.end_s_prev - nxt.first_token_s_prev > 0.05).all()


def _prefill_s(profile: ServiceTimeProfile) -> Callable[[int], float]:
    """The profile's prefill of a batch of ``b`` at the validation's lengths, as probe_answers takes it."""
    return lambda b: profile.batch_timing(b, SPEC.prompt_tokens, SPEC.output_tokens).prefill_s


def _probe(rng: np.random.Generator, answer_s: float, per_request_s: float, scale: float,
           profile: ServiceTimeProfile, n_batches: int = 60) -> tuple[pd.DataFrame, list[list]]:
    """A synthetic probe: batches one after another on the monotonic clock from t0, each request's times as
    the load generator places them on the host's clock (pod_clock)."""
    t0, t = 1000.0, 1000.1
    trace, rows, rid = [], [], 0
    for _ in range(n_batches):
        b = int(rng.integers(1, 12))
        bt = profile.batch_timing(b, SPEC.prompt_tokens, SPEC.output_tokens)
        engine = t + 0.0004
        trace.append([t, t + bt.total_s + 0.0008, b, [t - 0.003] * b, engine, t + bt.total_s + 0.0005])
        end = t + bt.total_s + 0.0008
        for _ in range(b):
            rows.append({"request_id": rid, "session_id": rid, "pod": 0, "arrival_s": t - 0.01 - t0,
                         "start_s": engine - t0, "first_token_s": t + scale * bt.prefill_s - t0,
                         "end_s": end + answer_s + per_request_s * b + rng.normal(0, 2e-4) - t0,
                         "batch_size": b, "prompt_tokens": SPEC.prompt_tokens, "output_tokens": SPEC.output_tokens,
                         "attempts": 1, "outcome": "ok"})
            rid += 1
        t = end + rng.uniform(0.001, 0.02)
    frame = pd.DataFrame(rows)
    frame.attrs.update(t0_monotonic=t0, pod_clock_rows=len(rows))
    return frame, trace


def test_probe_answers_recovers_the_way_out_and_the_first_token() -> None:
    profile = ServiceTimeProfile.from_csv(CPU)
    frame, trace = _probe(np.random.default_rng(0), 0.0035, 0.001, 1.6, profile)
    prefill = _prefill_s(profile)
    got = probe_answers(PLAIN, frame, trace, prefill)
    assert got.answer_s == pytest.approx(0.0035, abs=2e-4)
    assert got.answer_per_request_s == pytest.approx(0.001, abs=5e-5)
    assert got.first_token_scale == pytest.approx(1.6, rel=1e-6)
    # the calibration's scale is part of the model the first token is measured against
    assert probe_answers(replace(PLAIN, time_scale=2.0), frame, trace, prefill).first_token_scale == \
        pytest.approx(0.8, rel=1e-6)
    # kept with the traces and read back, the same answer
    assert probe_answers(PLAIN, probe_frame(probe_requests(frame)), trace, prefill) == got


def test_probe_answers_keeps_the_calibration_without_enough_to_go_on() -> None:
    profile = ServiceTimeProfile.from_csv(CPU)
    prefill = _prefill_s(profile)
    frame, trace = _probe(np.random.default_rng(1), 0.004, 0.001, 1.3, profile)
    unclocked = frame.copy()
    unclocked.attrs.update(frame.attrs, pod_clock_rows=0)  # times from the send, not the pod's clock
    assert probe_answers(PLAIN, unclocked, trace, prefill) == PLAIN
    few, few_trace = _probe(np.random.default_rng(1), 0.004, 0.001, 1.3, profile, n_batches=10)
    assert probe_answers(PLAIN, few, few_trace, prefill) == PLAIN
    # requests matched to no batch of the trace (another window) leave it too
    shifted = frame.assign(start_s=frame.start_s + 5.0)
    shifted.attrs.update(frame.attrs)
    assert probe_answers(PLAIN, shifted, trace, prefill) == PLAIN


def test_the_probes_requests_are_kept_with_the_traces(tmp_path: Path) -> None:
    profile = ServiceTimeProfile.from_csv(CPU)
    frame, trace = _probe(np.random.default_rng(2), 0.004, 0.001, 1.3, profile)
    save_traces(tmp_path, {"probe": trace, "probe_sends": [1.0, 2.0], "probe_requests": probe_requests(frame)})
    back = probe_frame(load_traces(tmp_path)["probe_requests"])
    pd.testing.assert_frame_equal(back, requests_frame({c: frame[c].to_numpy() for c in frame}))
    assert back.attrs == {"t0_monotonic": 1000.0, "pod_clock_rows": len(frame)}
    (tmp_path / TRACES_FILE).write_text(json.dumps({"probe": trace, "probe_requests": [1, 2]}))
    with pytest.raises(KeptRunsError, match="probe_requests must be an object"):
        load_traces(tmp_path)


def test_the_calibrated_pod_is_written_as_a_scenario_fragment(tmp_path: Path) -> None:
    import yaml

    from capsim.model.scenario import Scenario
    from capsim.studies.validate import SERVICE_FILE, write_service

    cal = replace(Calibration(1.08, 0.0004, (), cycle_noise=(0.9, 1.0, 1.1), arrival_overhead_s=0.0007,
                              ingress_s=0.0018),
                  answer_s=0.0044, answer_per_request_s=0.00095, first_token_scale=2.02)
    path = write_service(tmp_path, SPEC, CPU, cal)
    assert path == tmp_path / SERVICE_FILE
    assert path.read_text().startswith("# The pod `capsim validate` calibrated (tiny model")
    fragment = yaml.safe_load(path.read_text())
    assert set(fragment) == {"service", "batching"}
    # pasted into a scenario of its own, the pod simulates as the validation's levels did
    mine = Scenario.model_validate({"horizon_s": 60, "workload": {
        "arrivals": {"kind": "poisson", "rate_per_s": 30.0}, "prompt_tokens": {"kind": "constant", "value": 64},
        "output_tokens": {"kind": "constant", "value": 128}}, **fragment})
    level = level_scenario(SPEC, CPU, 30.0, cal)
    assert mine.service == level.service
    # the batching it was measured with, less the validation's own queue and max_model_len (left to the plan)
    assert mine.batching == level.batching.model_copy(update={"max_model_len": 8192, "queue_capacity": 1024})
    assert "queue_capacity" not in fragment["batching"] and mine.batching.max_batch_size == SPEC.batching.max_batch_size


def test_the_committed_calibrated_pod_simulates() -> None:
    import yaml

    from capsim.model.scenario import Scenario

    fragment = yaml.safe_load((ROOT / "data" / "validation" / "service.yaml").read_text())
    sc = Scenario.model_validate({"horizon_s": 20, "workload": {
        "arrivals": {"kind": "poisson", "rate_per_s": 40.0}, "prompt_tokens": {"kind": "constant", "value": 64},
        "output_tokens": {"kind": "constant", "value": 128}}, **fragment})
    assert sc.service.answer_ms > 0 and sc.service.first_token_scale > 1 and sc.service.cycle_noise
    df = _ok(simulate(sc, seed=0).requests)
    assert len(df) > 500 and (df.end_s - df.start_s > sc.service.answer_ms / 1000).all()


@pytest.mark.parametrize(("after_s", "answer_ms", "outcome"), [
    (0.09, 0.0, "failed"), (0.12, 0.0, "ok"), (0.12, 50.0, "failed"), (0.16, 50.0, "ok")])
def test_a_crash_before_a_batch_s_answers_are_out_fails_them(after_s: float, answer_ms: float, outcome: str) -> None:
    # a lone request in a batch of 0.1 s: over 0.1 s after it arrives, answered answer_ms later; the pod holds
    # it until then (the store write, the response), so a crash in between fails it as one during the batch
    from capsim.model.scenario import Scenario

    base = Scenario.model_validate({
        "horizon_s": 2000, "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 0.01}},
        "service": {"kind": "deterministic", "mean_s": 0.1, "answer_ms": answer_ms},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0}, "pods": {"replicas": 1},
        "client": {"timeout_s": 30, "max_retries": 0}})
    first = simulate(base, 3).requests.sort_values("arrival_s").iloc[0]
    assert first.outcome == "ok" and first.end_s == pytest.approx(first.arrival_s + 0.1 + answer_ms / 1000)
    at = float(first.arrival_s) + after_s
    r = simulate(base.override({"faults": {"crashes": [{"at_s": at, "pod": 0}]}}), 3)
    got = r.requests.set_index("request_id").loc[first.request_id]
    assert len(r.crashes) == 1 and got.outcome == outcome
    assert got.end_s == pytest.approx(at if outcome == "failed" else first.end_s)
    s = r.summary
    assert s.arrived == s.completed + s.failed + s.timed_out + s.rejected + s.in_flight

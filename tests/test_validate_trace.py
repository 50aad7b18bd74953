"""What the validation reads from the pod and the load generator: the batcher's batch trace."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from capsim.core.batcher import TRACE_BATCHES, BatchRecord, DynamicBatcher
from capsim.model.settings import BatchSettings


def test_the_batcher_keeps_each_batch_with_its_requests_enqueue_times():
    async def runner(items: list[int]) -> list[int]:
        await asyncio.sleep(0.01)
        return [i * 2 for i in items]

    async def main() -> list[BatchRecord]:
        async with DynamicBatcher(runner, BatchSettings(max_batch_size=3, max_wait_ms=50)) as b:
            before = time.monotonic()
            assert await asyncio.gather(*[b.submit(i) for i in range(4)]) == [0, 2, 4, 6]
            assert b.trace.maxlen == TRACE_BATCHES
            records = list(b.trace)
            for r in records:  # the loop's clock is the monotonic one other processes can read
                assert before <= min(r.enqueued) <= max(r.enqueued) <= r.start < r.end <= time.monotonic()
            return records

    records = asyncio.run(main())
    assert [r.size for r in records] == [3, 1]  # a full batch at once, the fourth after its wait
    assert [len(r.enqueued) for r in records] == [3, 1]
    assert records[1].start - records[1].enqueued[0] >= 0.045
    assert records[0].end - records[0].start >= 0.009
    assert records[0].engine_start == 0.0  # plain ints say nothing of an engine's own clock


def test_trace_diagnostics_find_a_request_that_missed_a_batch_it_was_sent_in_time_for():
    import numpy as np
    import pandas as pd
    import pytest

    from capsim.model.profile import ServiceTimeProfile
    from capsim.studies.validate import ValidationSpec
    from capsim.studies.validate_calibrate import Calibration
    from capsim.studies.validate_report import trace_diagnostics

    # sent at 0.89, 0.94, 1.09, 1.19; queued 10 ms later, the last 20 ms later: after the batch that
    # started at 1.2 with room for it
    trace = [[1.0, 1.2, 2, [0.90, 0.95], 0.0, 0.0], [1.2, 1.4, 1, [1.10], 0.0, 0.0], [1.4, 1.5, 1, [1.21], 0.0, 0.0]]
    sent = np.array([0.89, 0.94, 1.09, 1.19])
    real = pd.DataFrame({"arrival_s": sent, "start_s": sent + 0.1, "first_token_s": sent + 0.2, "end_s": sent + 0.3,
                         "outcome": ["ok"] * 4, "batch_size": [2, 2, 1, 1]})
    real.attrs.update(t0_monotonic=0.0, send_error_s=[0.0, 0.001, 0.002, 0.003])
    d = trace_diagnostics(trace, real, real, ServiceTimeProfile.from_csv(Path(__file__).parents[1] / "data" / "profiles" / "cpu-tiny-float32.csv"), ValidationSpec(),
                          Calibration(1.0, 0.0, ((1.0, 0.05, 0.05),)))
    assert d["missed_batch_share"] == pytest.approx(0.25)
    assert d["ingress_p50_ms"] == pytest.approx(10.0) and d["ingress_p99_ms"] == pytest.approx(19.7)
    assert d["real_mean_size"] == pytest.approx(4 / 3) and d["real_after_first_p50_ms"] == pytest.approx(100.0)
    assert d["send_error_p99_ms"] == pytest.approx(2.97)


def test_a_runs_replay_is_each_batch_it_ran_in_order_over_the_calibrated_cycle_and_the_simulator_walks_it():
    import numpy as np
    import pytest

    from capsim.model.profile import ServiceTimeProfile
    from capsim.sim.simulate import simulate
    from capsim.studies.validate import ValidationSpec, level_scenario
    from capsim.studies.validate_calibrate import Calibration
    from capsim.studies.validate_report import REPLAY_WINDOW_BATCHES, batch_fit, replay_factors

    path = Path(__file__).parents[1] / "data" / "profiles" / "cpu-tiny-float32.csv"
    profile, spec = ServiceTimeProfile.from_csv(path), ValidationSpec()
    cal = Calibration(1.2, 0.001, ((1.0, 0.05, 0.05),), arrival_overhead_s=0.002)
    speed = np.array([1.0, 1.0, 2.0, 2.0, 1.0, 0.5])  # a slow spell, then a fast batch
    sizes, arrivals = [1, 2, 4, 4, 8, 2], [0, 1, 0, 1, 0, 1]  # a request queued during every other batch
    walls = [f * cal.cycle_s(b, profile.batch_timing(b, spec.prompt_tokens, spec.output_tokens).total_s, a)
             for b, a, f in zip(sizes, arrivals, speed, strict=True)]
    starts = 10.0 + np.concatenate([[0.0], np.cumsum(np.add(walls, 0.01))[:-1]])
    # a batch's own requests' enqueue times; the one queued during batch k (its middle) is batch k+1's
    queued = [[starts[k - 1] + walls[k - 1] / 2] if k and arrivals[k - 1] else [] for k in range(len(sizes))]
    trace = [[s0, s0 + w, b, q, 0.0, 0.0] for s0, w, b, q in zip(starts, walls, sizes, queued, strict=True)]
    wall, fit, during = batch_fit(trace, profile, spec, cal)
    assert list(during) == [*arrivals[:5], 0]  # the last batch's arrival is queued after the trace
    each = replay_factors(trace, profile, spec, cal, window=1)  # each batch its own wall over its fit
    assert np.asarray(each) / each[0] == pytest.approx(wall / fit / (wall[0] / fit[0]), rel=1e-3)
    assert np.mean(each) == pytest.approx(1.0, abs=1e-3) and replay_factors(trace[:1], profile, spec, cal) == ()
    # by default one speed for each 4 batches in a row: their summed wall over their summed fit
    got = np.asarray(replay_factors(trace, profile, spec, cal))
    assert REPLAY_WINDOW_BATCHES == 4 and np.ptp(got[:4]) == 0 and np.ptp(got[4:]) == 0
    assert got[4] / got[0] == pytest.approx((wall[4:].sum() / fit[4:].sum()) / (wall[:4].sum() / fit[:4].sum()),
                                            rel=1e-3)
    assert len(replay_factors(trace, profile, spec, cal, n=4)) == 4

    # the static simulator replays the factors from its first batch, in order (no random start)
    factors = [1.0, 2.0, 3.0, 4.0]
    spec = ValidationSpec(requests_per_level=300)
    plain = level_scenario(spec, path, rate=5.0, calibration=Calibration(1.0, 0.0, (), cycle_noise=(1.0,)))
    walked = level_scenario(spec, path, rate=5.0, calibration=Calibration(1.0, 0.0, (), cycle_noise=tuple(factors)),
                            noise_block=len(factors))
    batch_walls = []
    for scenario in (plain, walked):
        ok = simulate(scenario, seed=3).requests.query("outcome == 'ok'")
        b = ok.groupby("start_s").agg(end=("end_s", "max")).sort_index()
        batch_walls.append(b.end.to_numpy() - b.index.to_numpy())
    n = min(len(w) for w in batch_walls)
    assert n > 8
    ratio = batch_walls[1][:8] / batch_walls[0][:8]  # at 5/s the batches are one request each, the same sizes
    assert ratio == pytest.approx(factors * 2, rel=1e-6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 0.5), st.lists(st.floats(-1.0, 3.0), max_size=5)), max_size=12))
def test_requests_waiting_at_a_batch_start_are_those_of_later_batches_queued_before_it(
        batches: list[tuple[float, list[float]]]) -> None:
    """The one-pass count equals the definition, batch by batch (ties: queued at the start is not before)."""
    import numpy as np

    from capsim.studies.validate_report import waiting_at_start

    start = np.cumsum([gap for gap, _ in batches])  # batches start in order (equal starts allowed)
    queued = [[*q, float(start[k])] if k % 3 == 0 else q for k, (_, q) in enumerate(batches)]  # exact ties too
    want = [sum(1 for j in range(k + 1, len(queued)) for t in queued[j] if t < start[k]) for k in range(len(queued))]
    assert list(waiting_at_start(start, queued)) == want


def test_capsim_trace_steps_bounds_the_static_pods_batch_trace_too() -> None:
    # CAPSIM_TRACE_STEPS (PodConfig.trace_steps) is the batches a static pod keeps, and the steps a continuous one
    # keeps; unset, each mode keeps its own default
    import pytest
    from fastapi.testclient import TestClient

    from capsim.core.continuous_batcher import TRACE_STEPS
    from capsim.core.engine import ReferenceEngine
    from capsim.core.service import PodConfig, create_app

    engine = ReferenceEngine("tiny", device="cpu", dtype="float32", seed=5, threads=1)
    for mode, default in (("static", TRACE_BATCHES), ("continuous", TRACE_STEPS)):
        with TestClient(create_app(PodConfig(device="cpu", warmup=False, batch_mode=mode), engine=engine)) as client:
            assert client.app.state.pod.batcher.trace.maxlen == default
    with TestClient(create_app(PodConfig(device="cpu", warmup=False, max_wait_ms=0, trace_steps=2),
                               engine=engine)) as client:
        for k in range(3):  # one at a time: a batch each, 3 batches, 2 kept
            r = client.post(f"/v1/sessions/s-{k}/turns", json={"prompt_tokens": 4, "max_new_tokens": 2})
            assert r.status_code == 200, r.text
        body = client.get("/debug/batches").json()
    assert len(body["batches"]) == 2 and body["dropped"] == 1
    assert body["oldest_start"] == body["batches"][0][0]
    with pytest.raises(ValueError, match="trace_batches must be a whole number >= 1, got 0"):
        DynamicBatcher(lambda items: items, trace_batches=0)
    with pytest.raises(ValueError, match="trace_steps"):
        PodConfig(trace_steps=0)

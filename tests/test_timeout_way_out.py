"""A client's timeout counts to its answer's arrival, the way out included (``service.answer_ms``): a request
whose last token comes before its client's timeout but whose answer reaches the client after it has timed
out, in both batching modes, as the load generator's ``asyncio.wait_for`` around the whole request does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from capsim.model.scenario import Scenario
from capsim.sim.simulate import Simulation, simulate

CPU = Path(__file__).resolve().parent.parent / "data" / "profiles" / "cpu-tiny-float32.csv"


def _scenario(mode: str, **over: Any) -> Scenario:
    batching: dict[str, Any] = {"max_batch_size": 8, "max_wait_ms": 5.0}
    service: dict[str, Any] = {"kind": "profile", "profile": str(CPU), "extrapolate": True}
    if mode == "continuous":
        batching = {"mode": "continuous", "num_blocks": 2000, "max_num_seqs": 16, "max_num_batched_tokens": 512}
        service = {"kind": "deterministic", "mean_s": 0.004}
    base: dict[str, Any] = {
        "horizon_s": 120,
        "drain_s": 30,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 40},
                     "prompt_tokens": {"kind": "lognormal", "mean": 150, "sigma": 0.8, "max": 600},
                     "output_tokens": {"kind": "lognormal", "mean": 16, "sigma": 0.8, "max": 80}},
        "service": service,
        "batching": batching,
        "pods": {"replicas": 1},
        "client": {"timeout_s": 30, "max_retries": 0},
    }
    return Scenario.model_validate(base).override(over) if over else Scenario.model_validate(base)


def _by_id(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("request_id").set_index("request_id")


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_an_answer_that_arrives_after_the_timeout_times_out(mode: str) -> None:
    # without a way out and with a timeout no request reaches, every request is answered at its last token
    base = _by_id(simulate(_scenario(mode), seed=5).requests)
    assert (base.outcome == "ok").all() and len(base) > 3000
    span = base.end_s - base.arrival_s
    # a timeout past the longest span (no client gives up before its last token, so the pod's work is the
    # same) and a way out that takes the spans past a boundary between two of them over it
    timeout = float(span.max()) + 1e-3
    spans = np.unique(span.round(9))
    k = len(spans) // 2
    boundary = float(spans[k - 1] + spans[k]) / 2
    answer_s = timeout - boundary
    late = _by_id(simulate(_scenario(mode, **{"client.timeout_s": timeout, "service.answer_ms": answer_s * 1000}),
                           seed=5).requests)
    assert len(late) == len(base)
    expect_late = (span > boundary).to_numpy()
    assert expect_late.sum() > 500 and (~expect_late).sum() > 500
    np.testing.assert_array_equal((late.outcome == "timed_out").to_numpy(), expect_late)
    assert (late.outcome[~expect_late] == "ok").all()
    gave_up = late[expect_late]
    np.testing.assert_allclose(gave_up.end_s, gave_up.arrival_s + timeout, rtol=0, atol=1e-9)
    answered = late[~expect_late]
    np.testing.assert_allclose(answered.end_s, base.end_s[~expect_late] + answer_s, rtol=0, atol=1e-9)
    # the pod did the same work: every request started and made its first token when it did without
    np.testing.assert_allclose(late.start_s, base.start_s, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_a_late_answer_is_retried_and_counted_once(mode: str) -> None:
    # every answer arrives after its client's timeout: each attempt times out, is retried, and the request
    # ends timed out after its retries, none counted answered
    over = {"client.timeout_s": 0.1, "client.max_retries": 1, "client.backoff_s": 0.05,
            "service.answer_ms": 150.0, "workload.arrivals.rate_per_s": 2, "horizon_s": 60}
    res = simulate(_scenario(mode, **over), seed=2)
    df = res.requests
    assert len(df) > 50 and (df.outcome == "timed_out").all()
    assert (df.attempts == 2).all()
    assert res.summary.completed == 0


def test_the_timeout_watch_does_not_wake_once_per_request() -> None:
    # a continuous pod watches every request it admits; entries of requests that ended are dropped when the
    # watcher wakes, so it wakes about once a timeout, not once per request. The pods' steps are not SimPy
    # events (Client.run takes them off their own heaps), so the run's SimPy events are the watcher's, the
    # sampler's and the HPA's: a budget of a tenth of the requests holds (one wake per request overran it)
    sc = _scenario("continuous", **{"client.timeout_s": 20.0})
    res = Simulation(sc, seed=3).run()
    assert res.summary.completed > 3000
    again = Simulation(sc, seed=3, max_events=res.summary.completed // 10).run()  # SimulationBudgetError past it
    pd.testing.assert_frame_equal(again.requests, res.requests)

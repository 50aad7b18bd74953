"""scenario.drain_s: after the horizon nothing new is sent and the requests in flight finish, so a short run
near saturation counts its slowest requests instead of leaving them out of its tail."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim.simulate import simulate


def overloaded(mode: str = "static", **extra: Any) -> Scenario:
    """One pod offered 1.3 times what it serves for 20 s: a backlog that grows to the horizon."""
    data: dict[str, Any] = {
        "horizon_s": 20.0, "warmup_s": 2.0,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 13.0},
                     "prompt_tokens": {"kind": "constant", "value": 32},
                     "output_tokens": {"kind": "constant", "value": 4}},
        "service": {"kind": "exponential", "mean_s": 0.1},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0, "queue_capacity": 100_000},
        "pods": {"replicas": 1},
        "client": {"timeout_s": 600, "max_retries": 0},
    }
    if mode == "continuous":
        data["service"] = {"kind": "deterministic", "mean_s": 0.025}
        data["batching"] = {"mode": "continuous", "num_blocks": 1000, "max_num_seqs": 1,
                            "max_num_batched_tokens": 64, "queue_capacity": 100_000}
    data.update(extra)
    return Scenario.model_validate(data)


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_a_drain_lets_the_backlog_finish_and_changes_nothing_before_the_horizon(mode: str) -> None:
    cut = simulate(overloaded(mode), seed=4)
    drained = simulate(overloaded(mode, drain_s=60.0), seed=4)
    a, b = cut.requests, drained.requests
    assert cut.summary.in_flight > 20  # the backlog at the horizon: left out of the latencies without a drain
    assert drained.summary.in_flight == 0 and (b.outcome == "ok").all()
    assert b.arrival_s.max() < 20.0 and len(a) == len(b)  # nothing is sent after the horizon
    # every request that finished by the horizon did exactly as before: the drain only comes after it
    done = a[a.end_s <= 20.0].index
    pd.testing.assert_frame_equal(a.loc[done], b.loc[done])
    # the slowest requests are counted now: the p99 is past every latency the cut run could measure
    finished = a[a.outcome == "ok"]
    assert drained.summary.ttft_p99_s > (finished.first_token_s - finished.arrival_s).max()
    assert drained.summary.completed == drained.summary.arrived > cut.summary.completed
    assert drained.summary.ttft_p99_s == pytest.approx(
        np.percentile((b.first_token_s - b.arrival_s)[b.arrival_s >= 2.0], 99))


def test_requests_still_time_out_during_the_drain() -> None:
    sc = overloaded(drain_s=60.0).override({"client.timeout_s": 3.0})
    r = simulate(sc, seed=4).requests
    late = r[r.outcome == "timed_out"]
    assert len(late) > 0 and (late.end_s > 20.0).any()  # timed out after the horizon, in the drain
    assert np.allclose(late.end_s - late.arrival_s, 3.0)
    assert simulate(sc, seed=4).summary.in_flight == 0


def test_drain_s_is_checked_and_defaults_to_stopping_at_the_horizon() -> None:
    assert overloaded().drain_s == 0.0
    with pytest.raises(SettingsError, match="drain_s"):
        overloaded(drain_s=-1.0)

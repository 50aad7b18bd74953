"""Smaller differences from the real cluster (issue 15 §8): one window for cost and latencies, the
simulated drain equal to the real pod's, and jittered client retries."""

from __future__ import annotations

import numpy as np
import pytest

from capsim.core.service import PodConfig
from capsim.model.scenario import Scenario
from capsim.policy.retry import retry_delay_s
from capsim.sim import Simulation
from capsim.sim.client import Client


def fixed(**over: object) -> Scenario:
    base: dict[str, object] = {
        "horizon_s": 1000, "warmup_s": 200,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 2.0}},
        "service": {"kind": "deterministic", "mean_s": 0.1},
        "pods": {"replicas": 4, "startup_s": 5, "gpu_cost_per_hour": 3.0},
    }
    base.update(over)
    return Scenario.model_validate(base)


def test_cost_covers_the_window_the_latencies_cover() -> None:
    s = Simulation(fixed(), seed=0).run().summary
    # four pods held from time 0: the measured window is 800 s, not the 1000 s of the run
    assert s.gpu_hours == pytest.approx(4 * 800 / 3600)
    assert s.cost == pytest.approx(4 * 800 / 3600 * 3.0)
    nodes = Simulation(fixed(cluster={"max_gpus": 8, "node_gpus": 8}), seed=0).run().summary
    assert nodes.node_gpu_hours == pytest.approx(8 * 800 / 3600)  # one 8-GPU node, billed over the window
    whole = Simulation(fixed(warmup_s=0), seed=0).run().summary
    assert whole.gpu_hours == pytest.approx(4 * 1000 / 3600)


def test_the_simulated_drain_is_the_real_pods() -> None:
    sc = fixed()
    assert sc.pods.termination_grace_s == PodConfig().drain_timeout_s == 25.0


def test_retry_delay_and_its_jitter() -> None:
    assert retry_delay_s(1, 1.0, 2.0) == 1.0 and retry_delay_s(3, 1.0, 2.0) == 4.0
    assert retry_delay_s(3, 1.0, 2.0, jitter=1.0, u=0.75) == pytest.approx(1.0)  # full jitter: U(0, 4]
    assert retry_delay_s(3, 1.0, 2.0, jitter=0.5, u=0.5) == pytest.approx(3.0)  # equal jitter: (2, 4]
    for bad in ({"k": 0}, {"jitter": 1.5}, {"u": 1.0}):
        args = {"k": 1, "jitter": 0.5, "u": 0.5, **bad}
        with pytest.raises(ValueError):
            retry_delay_s(args["k"], 1.0, 2.0, args["jitter"], args["u"])  # type: ignore[arg-type]


def crash_retries(jitter: float, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """The times the client sends retries at, in a run where one of two pods crashes with a queue."""
    sc = Scenario.model_validate({
        "horizon_s": 120,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 10.0}},
        "service": {"kind": "deterministic", "mean_s": 1.0},
        "batching": {"max_batch_size": 4, "max_wait_ms": 0, "queue_capacity": 100000},
        # the crashed pod leaves the endpoints at once, so that no retry is refused by it (see
        # test_sim_endpoints_staleness.py for the delay) and only the crash's own failures are retried
        "pods": {"replicas": 2, "startup_s": 5, "crash_detection_s": 0, "endpoints_propagation_s": 0},
        "faults": {"crashes": [{"at_s": 60, "pod": 0}]},
        "client": {"timeout_s": 1e6, "max_retries": 3, "backoff_s": 2.0, "backoff_jitter": jitter},
    })
    sent: list[float] = []
    real = Client._push

    def spy(self: Client, t: float, i: int, is_retry: bool) -> None:
        if is_retry:
            sent.append(t)
        real(self, t, i, is_retry)

    with monkeypatch.context() as mp:
        mp.setattr(Client, "_push", spy)
        Simulation(sc, seed=0).run()
    return np.array(sent)


def test_jitter_spreads_the_retries_after_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    plain, spread = crash_retries(0.0, monkeypatch), crash_retries(1.0, monkeypatch)
    assert len(plain) > 20 and len(plain) == len(spread)  # the same requests failed: the same crash
    # without jitter every request the crash failed comes back 2 s later, at once; with full jitter
    # anywhere in (60, 62]
    assert np.allclose(plain, 62.0)
    assert spread.min() > 60.0 and spread.max() <= 62.0 and float(np.std(spread)) > 0.4

"""The metric pipeline has phases (issue 15 §3): each pod scraped at its own offset, the HPA syncing at its
own phase, both from the seed's streams, and a continuous adapter lag.

Upstream: Prometheus spreads its scrape targets over the interval (``scrape/target.go``, ``offset``) and the
HPA controller's resync runs from when it picked the HPA up, so the newest sample a sync can read is on
average half a scrape interval old, plus the adapter's lag. The old simulator scraped and synced together:
every sync read a sample of age zero (plus the lag rounded up to whole intervals).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from capsim.model.scenario import Scenario
from capsim.sim import Simulation
from capsim.sim.hpa import Autoscaling
from capsim.sim.pod import Pod

SCRAPE = 15.0
PODS = 20


def fixed_pods(lag: float = 0.0, scrape: float = SCRAPE, seed_rate: float = 10.0) -> Scenario:
    """PODS pods that never scale (min = max): the syncs only read the pipeline."""
    return Scenario.model_validate({
        "horizon_s": 900,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": seed_rate}},
        "service": {"kind": "deterministic", "mean_s": 0.05},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0},
        "pods": {"replicas": PODS, "startup_s": 5},
        "autoscaler": {
            "minReplicas": PODS, "maxReplicas": PODS,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                                  "target": {"type": "AverageValue", "averageValue": "8"}}}],
            "scrape_interval_s": scrape, "sync_period_s": 15, "adapter_lag_s": lag,
        },
        "client": {"timeout_s": 1e6},
    })


def newest_sample_ages(scenario: Scenario, seed: int, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """At every sync, for every pod: now minus the time of the newest sample the adapter can read."""
    ages: list[float] = []
    real = Autoscaling.value

    def spy(self: Autoscaling, pod: Pod, metric: str, now: float, *args: Any, **kw: Any) -> float | None:
        visible = [s[0] for s in pod.samples if s[0] <= now - self.spec.adapter_lag_s]
        if visible and now > 60:  # past the first samples of every pod
            ages.append(now - visible[-1])
        return real(self, pod, metric, now, *args, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(Autoscaling, "value", spy)
        Simulation(scenario, seed=seed).run()
    return ages


@pytest.mark.parametrize("lag", [0.0, 22.5])
def test_the_newest_sample_is_half_a_scrape_interval_old_plus_the_lag(
    lag: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    ages: list[float] = []
    for seed in range(5):  # 5 seeds x 20 pods: 100 independent offsets
        ages += newest_sample_ages(fixed_pods(lag), seed, monkeypatch)
    assert len(ages) > 5 * PODS * 50
    assert all(lag <= a <= lag + SCRAPE + 1e-9 for a in ages)
    # offsets uniform on [0, 15): the mean age is 7.5 s + lag (the standard error of 100 offsets is 0.43 s);
    # the old pipeline read every sample at age 0 + lag rounded up to whole intervals (0 and 30 here)
    assert float(np.mean(ages)) == pytest.approx(SCRAPE / 2 + lag, abs=1.5)
    assert float(np.std(ages)) > SCRAPE / 5  # spread over the interval, not one common age


def test_a_lag_of_22_5_s_and_one_of_30_s_give_different_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    a = newest_sample_ages(fixed_pods(22.5), 0, monkeypatch)
    b = newest_sample_ages(fixed_pods(30.0), 0, monkeypatch)
    # the same offsets and phase (same seed): each pod's newest visible sample is the same one or the one
    # before it; the old pipeline read the same sample under both lags
    assert len(a) == len(b)
    assert sorted(set(np.round(np.array(b) - np.array(a), 6))) == [0.0, SCRAPE]
    assert float(np.mean(b)) > float(np.mean(a)) + 1.0
    sims = [Simulation(fixed_pods(lag), seed=0) for lag in (22.5, 30.0)]
    for s in sims:
        s.run()
    values = [[v for _, _, _, v in s.autoscaling.syncs] for s in sims if s.autoscaling is not None]
    assert values[0] != values[1]  # the HPA saw different numbers


def test_offsets_and_phase_come_from_the_seed_and_leave_other_streams_alone() -> None:
    runs: dict[tuple[int, float], list[tuple[Autoscaling, Any]]] = {}
    for seed, scrape in ((0, 15.0), (0, 15.0), (1, 15.0), (0, 10.0)):
        sim = Simulation(fixed_pods(scrape=scrape), seed=seed)
        r = sim.run()
        assert sim.autoscaling is not None
        runs.setdefault((seed, scrape), []).append((sim.autoscaling, r))
    (a1, r1), (a2, _) = runs[(0, 15.0)]
    assert a1.scrape_offset_s == a2.scrape_offset_s and a1.syncs == a2.syncs  # same seed, same phases
    assert len(a1.scrape_offset_s) == PODS and all(0 <= o < SCRAPE for o in a1.scrape_offset_s)
    assert len(set(a1.scrape_offset_s)) == PODS  # each pod its own offset
    (a3, _), = runs[(1, 15.0)]
    assert a3.scrape_offset_s != a1.scrape_offset_s
    first_sync = a1.syncs[0][0]
    assert 0 < first_sync <= 15 and not math.isclose(first_sync, 15.0)  # a phase, not the period
    # common random numbers: another scrape interval draws other offsets but the same arrivals
    (a4, r4), = runs[(0, 10.0)]
    assert a4.scrape_offset_s != a1.scrape_offset_s
    assert np.array_equal(r1.requests["arrival_s"].to_numpy(), r4.requests["arrival_s"].to_numpy())
    assert np.array_equal(r1.requests["prompt_tokens"].to_numpy(), r4.requests["prompt_tokens"].to_numpy())


def test_each_pod_is_scraped_on_its_own_grid() -> None:
    sc = fixed_pods()
    sim = Simulation(sc, seed=3)
    sim.run()
    assert sim.autoscaling is not None
    for pod in sim.cluster.pods:
        times = [s[0] for s in pod.samples]
        assert len(times) >= 4
        offset = sim.autoscaling.scrape_offset_s[pod.id]
        k = [(t - offset) / SCRAPE for t in times]
        assert all(abs(x - round(x)) < 1e-6 for x in k)  # offset + k x interval
        assert np.allclose(np.diff(times), SCRAPE)

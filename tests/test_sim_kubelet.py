"""The kubelet in the simulator: CrashLoopBackOff restarts, crashes while starting, the image pulled once per node."""

from __future__ import annotations

import math
import warnings
from collections.abc import Generator
from typing import Any

import pytest

from capsim.model.scenario import Scenario
from capsim.sim import simulate
from capsim.sim.kubelet import ContainerBackOff
from capsim.sim.simulate import Simulation


# ---- the rule, without a clock -------------------------------------------------------------------------
def test_first_exit_restarts_at_once_then_the_delay_doubles_to_300_s() -> None:
    b = ContainerBackOff()
    t, delays = 0.0, []
    for _ in range(9):
        t += 5.0  # each run lasts 5 s: every exit is within 10 minutes of the last restart
        d = b.exited(t)
        delays.append(d)
        t += d
    assert delays == [0, 10, 20, 40, 80, 160, 300, 300, 300]


def test_ten_minutes_after_the_last_restart_start_over() -> None:
    b = ContainerBackOff()
    assert b.exited(100.0) == 0.0  # restarted at 100
    assert b.exited(150.0) == 10.0  # restarted at 160
    assert b.exited(160.0 + 600.0) == 20.0  # exactly 600 s is not expired (client-go: > 2 * max)
    # restarted at 780; an exit more than 600 s later resets the entry: at once, then 10 s again
    assert b.exited(780.0 + 600.5) == 0.0
    assert b.exited(780.0 + 601.0) == 10.0


def test_backoff_constants_are_settings() -> None:
    b = ContainerBackOff(initial_s=1.0, max_s=60.0, reset_s=120.0)  # KEP-4603's reduced decay
    t, delays = 0.0, []
    for _ in range(9):
        t += 1.0
        delays.append(b.exited(t))
        t += delays[-1]
    assert delays == [0, 1, 2, 4, 8, 16, 32, 60, 60]


# ---- one flaky pod ---------------------------------------------------------------------------------------
def flaky(mtbf_s: float, startup_s: float, horizon_s: float, **changes: Any) -> Scenario:
    s = Scenario.model_validate({
        "horizon_s": horizon_s,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 0.001}},
        "service": {"kind": "deterministic", "mean_s": 0.1},
        "pods": {"replicas": 1, "startup_s": startup_s},
        "faults": {"pod_mtbf_s": mtbf_s},
        "timeseries_interval_s": 5,
    })
    return s.override(changes) if changes else s


def upstream_ready_fraction(mtbf_s: float, startup_s: float, max_backoff_s: float = 300.0) -> float:
    """Long-run ready share of one pod under the kubelet's rule, when nearly every exit is within ten
    minutes of the last restart (the backoff sits at its cap): a cycle is the 300 s wait plus a run of
    mean MTBF, of which the part after the start is ready: E[(T - start)+] = MTBF exp(-start / MTBF)."""
    return mtbf_s * math.exp(-startup_s / mtbf_s) / (max_backoff_s + mtbf_s)


def test_a_pod_crashing_every_120_s_with_a_60_s_start_is_ready_as_the_kubelet_allows() -> None:
    # the old model (constant 20 s restart, crashes only while ready) gave 120 / (20 + 60 + 120) = 60%
    r = simulate(flaky(120, 60, 100_000), seed=1)
    ready = float(r.timeseries["ready_replicas"].mean())
    expected = upstream_ready_fraction(120, 60)  # 0.173
    assert abs(ready - expected) < 0.03, (ready, expected)
    assert ready < 0.3
    # the pod spends most of its life waiting in CrashLoopBackOff, and that shows
    assert r.timeseries["crashed_replicas"].mean() > 0.5
    # it crashed while starting too (a crash loop): more crashes than ready periods
    ts = r.timeseries
    ready_periods = int(((ts["ready_replicas"].diff() == 1)).sum())
    assert r.summary.crashes > 1.3 * ready_periods


def test_a_rarely_crashing_pod_loses_its_start_time_per_crash() -> None:
    # MTBF 2 h: exits are mostly more than 10 minutes apart, so the restart is immediate; a crash costs
    # the 60 s start (the old model: 20 s + 60 s)
    r = simulate(flaky(7200, 60, 400_000), seed=2)
    lost_s = (1.0 - float(r.timeseries["ready_replicas"].mean())) * 400_000
    per_crash = lost_s / r.summary.crashes
    assert r.summary.crashes > 30
    assert 55 < per_crash < 70, per_crash


def test_a_restart_that_keeps_its_caches_shortens_every_crash_but_not_the_first_start() -> None:
    # pods.restart_startup_s 15 s against a 60-s first start: in the crash loop the renewal share follows the
    # restart's time, plus half a probe period on average to the probe that passes (120 e^(-20/120) / 420 = 24.2%,
    # against 17.3% for a 60-s restart; measured 23.4%, and 23.2% and 22.3% in seeds 2 and 3)
    r = simulate(flaky(120, 60, 100_000, **{"pods.restart_startup_s": 15}), seed=1)
    ready = float(r.timeseries["ready_replicas"].mean())
    expected = upstream_ready_fraction(120, 15 + 5)
    assert abs(ready - expected) < 0.03 and ready > upstream_ready_fraction(120, 60) + 0.05, (ready, expected)
    # rare crashes: each costs the restart (and the probe's phase and the PLEG relist), not the 60-s start
    r = simulate(flaky(7200, 60, 400_000, **{"pods.restart_startup_s": 15}), seed=2)
    per_crash = (1.0 - float(r.timeseries["ready_replicas"].mean())) * 400_000 / r.summary.crashes
    assert r.summary.crashes > 30 and 15 < per_crash < 27, per_crash


def test_restart_s_still_loads_with_a_warning_and_has_no_effect() -> None:
    base = flaky(300, 20, 3000).model_dump(mode="python", by_alias=True)
    base["faults"]["restart_s"] = 20
    with pytest.warns(DeprecationWarning, match=r"faults\.restart_s \(20\) is deprecated and ignored"):
        old = Scenario.model_validate(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = flaky(300, 20, 3000)
    assert old == new


# ---- the image, once per node -------------------------------------------------------------------------
def test_the_image_is_pulled_once_per_node_and_restarts_reuse_it() -> None:
    s = Scenario.model_validate({
        "horizon_s": 400,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 0.01}},
        "service": {"kind": "deterministic", "mean_s": 0.1},
        "pods": {"replicas": 1, "image_pull_s": 100, "startup_s": 10},
        "cluster": {"max_gpus": 4, "node_gpus": 2, "node_provision_s": 30},
        "timeseries_interval_s": 1,
    })
    sim = Simulation(s, seed=0)
    sim.cluster.scale_to(4, 0.0)  # pod 1 fits on the warm node 0; pods 2 and 3 wait for node 1

    def crash_pod_3() -> Generator[Any, Any, None]:
        yield sim.env.timeout(200)
        sim.cluster.crash(sim.cluster.pods[3], sim.env.now)  # restarts at once: 10 s, no pull
        yield sim.env.timeout(50)
        sim.cluster.crash(sim.cluster.pods[3], sim.env.now)  # within 10 min: CrashLoopBackOff 10 s

    sim.env.process(crash_pod_3())
    ts = sim.run().timeseries.set_index("time_s")
    ready, crashed = ts["ready_replicas"], ts["crashed_replicas"]
    assert ready[5] == 1 and ready[11] == 2  # pod 1: node 0 has the image, 10 s start
    assert ts["pending_replicas"][29] == 2 and ready[129] == 2  # node 1 at 30 s, then one 100 s pull for both
    assert ready[141] == 4
    assert ready[205] == 3 and crashed[205] == 0 and ready[211] == 4  # restart at once, no pull
    assert crashed[255] == 1 and ready[265] == 3 and ready[271] == 4  # 10 s backoff + 10 s start
    assert sim.cluster.restarts == 2


def test_without_a_cluster_section_every_new_pod_pulls_its_image() -> None:
    s = flaky(1e9, 10, 300, **{"pods.image_pull_s": 50, "faults": None, "timeseries_interval_s": 1})
    sim = Simulation(s, seed=0)
    sim.cluster.scale_to(2, 0.0)
    ts = sim.run().timeseries.set_index("time_s")
    assert ts["ready_replicas"][59] == 1 and ts["ready_replicas"][61] == 2

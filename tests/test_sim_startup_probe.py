"""A startup probe's failureThreshold (``pods.startup_probe.failure_threshold``): the kubelet kills a container whose
model has not loaded after that many failed probes and restarts it under CrashLoopBackOff, against the upstream rules.

Upstream: ``pkg/kubelet/prober/worker.go`` (``doProbe``: a worker per container probes on a ticker from the pod's
admission; on a new container ID it resumes; ``resultRun`` counts the failures in a row, and at the threshold a
startup failure puts the worker on hold and the container is killed, "failed startup probe, will be restarted"),
``pkg/kubelet/kuberuntime/kuberuntime_manager.go`` (``computePodActions``, ``doBackOff``). Kubernetes is Apache-2.0
(c) The Kubernetes Authors.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from capsim.export.pod import startup_failure_threshold
from capsim.model.scenario import Scenario
from capsim.sim import Simulation
from capsim.sim.pod import PodState
from capsim.studies.checks import run_checks


def scenario(**pods: Any) -> Scenario:
    return Scenario.model_validate({
        "horizon_s": 1200,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 0.01}},
        "service": {"kind": "deterministic", "mean_s": 0.1},
        "pods": {"replicas": 1, "startup_s": 25, "endpoints_propagation_s": 0.0, **pods},
        "client": {"timeout_s": 1e6, "max_retries": 0},
    })


def _new_pods(s: Scenario, n: int, until: float) -> tuple[Simulation, list[Any]]:
    """``n`` pods created at 0 beside the warm one (each placed at once, its probes ticking from 0), run to
    ``until``."""
    sim = Simulation(s, seed=0)
    sim.cluster.scale_to(1 + n, 0.0)
    sim.env.run(until=until)
    return sim, sim.cluster.pods[1:]


def _kills(sim: Simulation) -> list[float]:
    return [t for t, _, kind in sim.faults.crash_log if kind == "startup_probe"]


def test_a_model_not_loaded_by_the_thresholds_probe_is_killed_and_restarted_under_crash_loop_backoff() -> None:
    # the model takes 25 s; probes every 5 s from the placement at 0, 4 failures kill. The first container is probed
    # at 5, 10, 15, 20 (the tick at 0 finds no container yet) and killed at 20; its first exit restarts at once, and
    # the new one is probed from the next tick, 25 to 40, killed at 40; the kubelet's backoff then waits 10 s (to 50:
    # killed at 70), 20 s (to 90: killed at 110), 40 s (to 150: killed at 170). It is never ready.
    sim, (pod,) = _new_pods(scenario(startup_probe={"period_s": 5, "failure_threshold": 4}), 1, 185.0)
    assert _kills(sim) == [20.0, 40.0, 70.0, 110.0, 170.0]
    assert pod.first_ready_s is None and pod.state == PodState.CRASHED
    assert sim.cluster.restarts == 4  # the fifth kill's restart waits 80 s
    sim.env.run(until=250.5)
    assert sim.cluster.restarts == 5 and pod.state == PodState.STARTING


def test_a_model_loaded_at_the_thresholds_probe_passes_it() -> None:
    # 5 failures kill: the fifth probe, at 25, finds the model loaded at 25 (a probe at the load itself passes)
    sim, (pod,) = _new_pods(scenario(startup_probe={"period_s": 5, "failure_threshold": 5}), 1, 60.0)
    assert _kills(sim) == [] and pod.first_ready_s == 25.0
    # half a second later it is killed at 25 and starts again: its model loads at 50.5, after the probe at 50
    sim, (pod,) = _new_pods(scenario(startup_s=25.5, startup_probe={"period_s": 5, "failure_threshold": 5}), 1, 60.0)
    assert _kills(sim) == [25.0, 50.0] and pod.first_ready_s is None


def test_no_threshold_kills_nothing_however_long_the_model_loads() -> None:
    sim, (pod,) = _new_pods(scenario(startup_s=500, startup_probe={"period_s": 5}), 1, 510.0)
    assert _kills(sim) == [] and pod.first_ready_s == 500.0


def test_a_killed_pod_loads_again_with_a_new_draw_and_is_ready_when_one_is_fast_enough() -> None:
    # cold starts of 60 to 120 s against 8 probes every 10 s from the placement at 0 (the last at 80 s, and 80 s
    # after each restart's next tick): two starts in three are killed; a pod is ready at the first start fast
    # enough, after as many kills as slow draws, each a crash of kind startup_probe and a restart
    s = scenario(startup_s={"kind": "uniform", "low_s": 60, "high_s": 120},
                 startup_probe={"period_s": 10, "failure_threshold": 8})
    sim, pods = _new_pods(s, 20, 1200.0)
    kills = Counter(pod for _, pod, kind in sim.faults.crash_log if kind == "startup_probe")
    assert sum(kills.values()) > len(pods) and max(kills.values()) >= 3
    for p in pods:
        restarts = sim.cluster.restart_count(p)
        if p.state == PodState.READY:  # every kill restarted, and the last start loaded in time
            assert restarts == kills[p.id] and p.first_ready_s is not None
        else:  # still trying: killed (in backoff) or loading again
            assert p.state in (PodState.CRASHED, PodState.STARTING) and kills[p.id] >= 3
            assert restarts == kills[p.id] - (p.state == PodState.CRASHED)
    assert sum(p.state == PodState.READY and kills[p.id] > 0 for p in pods) >= 10
    # the same pods without the threshold: every one ready at its first start, within the slowest cold start
    sim, pods = _new_pods(s.override({"pods.startup_probe.failure_threshold": None}), 20, 1200.0)
    assert _kills(sim) == [] and max(p.first_ready_s for p in pods) <= 120.0


def test_a_restart_loads_in_its_own_time_and_a_first_start_in_the_cold_starts() -> None:
    # pods.restart_startup_s: the kubelet's restart in place loads in 15 s (caches warm), a first start in 60 s.
    # A pod placed at 0 (probes every 10 s from 0) is ready at 60; it crashes at 100 and is restarted at once (its
    # first exit): the model loads at 115 and the probe at 120 passes. Unset, the restart takes 60 s again: 160.
    for restart, ready in ((15, 120.0), (None, 160.0)):
        s = scenario(startup_s=60, restart_startup_s=restart, startup_probe={"period_s": 10})
        sim, (pod,) = _new_pods(s, 1, 100.0)
        sim.faults.crash_pod(pod, "scheduled")
        sim.env.run(until=200.0)
        assert sim.cluster.restart_count(pod) == 1 and pod.first_ready_s == 60.0 and pod.ready_s == ready


def test_a_restart_faster_than_the_threshold_serves_after_one_killed_first_start() -> None:
    # 4 probes every 5 s kill the 25-s first start at 20 (as above); the restart at once loads in 12 s, at 32, and
    # the probe at 35 passes: one kill, then ready, where a cold restart loops (killed at 40, 70, 110 ...)
    s = scenario(restart_startup_s=12, startup_probe={"period_s": 5, "failure_threshold": 4})
    sim, (pod,) = _new_pods(s, 1, 185.0)
    assert _kills(sim) == [20.0] and pod.first_ready_s == 35.0 and sim.cluster.restart_count(pod) == 1
    (finding,) = [f for f in run_checks(s) if f.check == "startup-probe-short"]
    assert finding.level == "warn" and "kills every first start" in finding.message
    assert "pods.restart_startup_s" in finding.message


def test_an_explicit_restart_as_slow_as_the_first_start_is_the_default_run() -> None:
    # the restart's draw comes from the same stream as the first start's: the same seed gives the same run
    crash = Scenario.from_yaml("data/scenarios/crash_study.yaml").override({"horizon_s": 1800})
    same = crash.override({"pods.restart_startup_s": crash.pods.startup_s.model_dump()})
    assert Simulation(same, seed=1).run().summary == Simulation(crash, seed=1).run().summary


@settings(max_examples=40, deadline=None)
@given(low=st.integers(1, 120), spread=st.integers(0, 120), period=st.integers(1, 20), threshold=st.integers(1, 20),
       restart=st.none() | st.tuples(st.integers(1, 120), st.integers(0, 60)))
def test_the_check_and_the_export_agree_with_the_simulated_kubelet(low: int, spread: int, period: int,
                                                                   threshold: int,
                                                                   restart: tuple[int, int] | None) -> None:
    # capsim check's startup-probe-short: nothing -> no start is killed; fail -> every start is, first and restart;
    # a warning that every first start is killed -> it is, and where no restart can be killed each pod is ready
    # after one kill; and the export's own threshold (unset) never kills one. 12 pods placed at 0, run past the
    # first start's last probe (and a restart's)
    high = low + spread
    again = None if restart is None else {"kind": "uniform", "low_s": restart[0], "high_s": sum(restart)}
    s = scenario(startup_s={"kind": "uniform", "low_s": low, "high_s": high}, restart_startup_s=again,
                 startup_probe={"period_s": period, "failure_threshold": threshold})
    (finding,) = [f for f in run_checks(s) if f.check == "startup-probe-short"] or [None]
    until = high + threshold * period + 1.0 + (0.0 if restart is None else sum(restart) + period)
    sim, pods = _new_pods(s, 12, until)
    first_kills = [t for t in _kills(sim) if t <= threshold * period + 1e-9]
    if finding is None:
        assert first_kills == [] and all(p.first_ready_s is not None for p in pods)
    elif finding.level == "fail":
        assert len(first_kills) == 12 and all(p.first_ready_s is None for p in pods)
    elif "kills every first start" in finding.message:
        assert restart is not None and len(first_kills) == 12
        if sum(restart) <= (threshold - 1) * period:  # no restart can be killed: one kill each, then ready
            assert len(_kills(sim)) == 12 and all(p.first_ready_s is not None for p in pods)
    derived = startup_failure_threshold(s.override({"pods.startup_probe.failure_threshold": None}))
    sim, pods = _new_pods(s.override({"pods.startup_probe.failure_threshold": derived}), 12, until + period)
    assert _kills(sim) == [] and all(p.first_ready_s is not None for p in pods)
    if restart is not None:  # and its restarts pass too, however slow: crash every pod once, when all are ready
        for p in pods:
            sim.faults.crash_pod(p, "scheduled")
        sim.env.run(until=sim.env.now + sum(restart) + period + 1.0)
        assert _kills(sim) == [] and all(p.state == PodState.READY and p.ready_s > until for p in pods)


def test_the_shipped_threshold_grid_on_the_h100_rush() -> None:
    """data/studies/startup_threshold_grid.yaml (docs/studies.md, "The startup probe's threshold") on the H100 rush
    from a floor of 3, seed 0: 12 probes kill nothing (a new pod's container starts on its probe's tick: 120 s for
    starts of 60 to 120 s), the same run as unset; 6 kill every start, so no pod the HPA adds ever serves and the
    3 at the floor carry the rush alone."""
    from capsim.studies.sweep import expand_grid, load_grid

    values = [s.changes["pods.startup_probe.failure_threshold"]
              for s in expand_grid(load_grid("data/studies/startup_threshold_grid.yaml"))]
    assert values == [None, 12, 10, 8, 6]
    rush = Scenario.from_yaml("data/scenarios/h100_llama3_8b_rush.yaml").override({"autoscaler.minReplicas": 3})
    unset = Simulation(rush, seed=0).run()
    assert Simulation(rush.override({"pods.startup_probe.failure_threshold": 12}), seed=0).run().summary == unset.summary
    sim = Simulation(rush.override({"pods.startup_probe.failure_threshold": 6}), seed=0)
    looped = sim.run()
    added = [p for p in sim.cluster.pods if p.id >= rush.pods.replicas]  # the 6 of time 0 go down to the floor, 3
    assert len(added) == 29 and all(p.first_ready_s is None for p in added)
    assert set(looped.crashes["kind"]) == {"startup_probe"} and set(looped.crashes["pod"]) == {p.id for p in added}
    assert looped.summary.error_rate > 0.2 > unset.summary.error_rate
    assert looped.summary.cost > unset.summary.cost  # the pods that never serve are billed


def test_the_shipped_restart_grid_on_the_h100_rush() -> None:
    """data/studies/restart_grid.yaml (docs/studies.md, "A restart that keeps its caches") on the H100 rush from a
    floor of 5, seed 0, crashes every 30 min on average and 8 startup probes every 10 s: cold restarts (60 to 120 s)
    are killed two in three, the crashes turn into crash loops, the HPA adds pods to its 32 that loop too, and the
    rush fails; warm restarts (20 to 40 s) pass, and it meets its SLO."""
    from capsim.studies.sweep import expand_grid, load_grid

    settings_ = expand_grid(load_grid("data/studies/restart_grid.yaml"))
    assert len(settings_) == 12
    changes = {s.values["restart"]: s.changes for s in settings_
               if s.values["pods.startup_probe.failure_threshold"] == 8 and s.values["faults.pod_mtbf_s"] == 1800}
    rush = Scenario.from_yaml("data/scenarios/h100_llama3_8b_rush.yaml").override({"autoscaler.minReplicas": 5})
    cold, warm = (Simulation(rush.override(changes[k]), seed=0).run() for k in ("cold", "warm"))
    assert cold.summary.error_rate > 0.01 and not cold.summary.slo_met and cold.summary.max_replicas == 32
    assert warm.summary.error_rate < 0.001 and warm.summary.slo_met and warm.summary.max_replicas < 32
    assert (cold.crashes.kind == "startup_probe").sum() > 5 * (warm.crashes.kind == "startup_probe").sum()
    assert warm.summary.cost < cold.summary.cost

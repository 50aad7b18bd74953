"""The simulated HPA: its step response (no scale-up before the metric pipeline can show the step,
scale-down only after the stabilization window), and its tolerance and every decision, checked against
``capsim.policy.autoscaling`` called directly on the samples the simulator handed it."""

from __future__ import annotations

import math

import pytest

import capsim.sim.hpa as sim_hpa
from capsim.model.scenario import Scenario
from capsim.policy import autoscaling
from capsim.policy.autoscaling import PodSample, Tolerance
from capsim.sim import Simulation

STEP_UP, STEP_DOWN = 600.0, 1500.0
SCRAPE, WINDOW, LAG, SYNC, DOWN_WINDOW = 15.0, 60.0, 30.0, 15.0, 300.0


def step_scenario() -> Scenario:
    return Scenario.model_validate({
        "horizon_s": 2200,
        "workload": {"arrivals": {"kind": "piecewise",
                                  "rate_per_s": [[0, 4], [STEP_UP, 30], [STEP_DOWN, 4]]}},
        "service": {"kind": "deterministic", "mean_s": 0.1},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0, "queue_capacity": 100000},
        "pods": {"replicas": 2, "startup_s": 30},
        "router": {"kind": "least_outstanding"},
        "autoscaler": {
            "minReplicas": 2, "maxReplicas": 10,
            # busy fraction is linear in the load (3 busy pods' worth after the step), so the HPA settles
            # at 6 pods and stays there: a clean step response
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": "capsim_gpu_busy_ratio"},
                                                  "target": {"type": "AverageValue", "averageValue": "500m"}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": int(DOWN_WINDOW)}},
            "scrape_interval_s": SCRAPE, "query_window_s": WINDOW, "adapter_lag_s": LAG,
            "sync_period_s": SYNC,
        },
        "client": {"timeout_s": 1e6},
    })


def test_scale_up_waits_for_the_pipeline_and_scale_down_for_the_window() -> None:
    sim = Simulation(step_scenario(), seed=0)
    r = sim.run()
    ev = r.scale_events
    ups = ev[ev["to_replicas"] > ev["from_replicas"]]
    downs = ev[ev["to_replicas"] < ev["from_replicas"]]
    assert not ups.empty and not downs.empty
    # the first scrape that can see the step is the first after it (each pod scraped at its own offset);
    # the adapter shows it LAG later; the controller acts at its next sync (at its own phase)
    assert sim.autoscaling is not None
    first_scrape = min(o + math.floor((STEP_UP - o) / SCRAPE) * SCRAPE + SCRAPE
                       for o in sim.autoscaling.scrape_offset_s[:2])
    earliest_up = min(t for t, *_ in sim.autoscaling.syncs if t >= first_scrape + LAG)
    assert ups["time_s"].min() >= earliest_up
    assert ups["time_s"].min() <= earliest_up + WINDOW  # and it does react within one window
    assert (ev["time_s"] < STEP_UP).sum() == 0
    # scale-down: the recommendations of the last DOWN_WINDOW seconds hold the count up. While the load
    # is high the HPA recommends 6 pods (3 busy pods' worth at 50%); after the drop it recommends the
    # minimum, but only once the pre-drop recommendations have left the window may it go below 6.
    need = 6
    early = downs[downs["time_s"] < STEP_DOWN + DOWN_WINDOW]
    assert (early["to_replicas"] >= need).all()
    below = downs[downs["to_replicas"] < need]
    assert below["time_s"].min() >= STEP_DOWN + DOWN_WINDOW
    # the overshoot of the scale-up (the metric lags while new pods cold-start) came down no sooner
    # than a window after the last scale-up
    first_down = downs["time_s"].min()
    assert first_down >= ups["time_s"].max() + DOWN_WINDOW
    assert ups["time_s"].max() < STEP_DOWN + LAG + WINDOW
    # the controller saw the metric through the pipeline: before the step it sat below the target
    syncs = sim.autoscaling.syncs if sim.autoscaling else []
    before = [v for t, _, _, v in syncs if WINDOW + LAG < t < STEP_UP]
    assert before and max(before) < 0.5
    assert r.timeseries.loc[r.timeseries["time_s"].between(1200, 1500), "desired_replicas"].ge(6).all()
    assert r.summary.max_replicas > 2 and r.timeseries["desired_replicas"].iloc[-1] < r.summary.max_replicas


# ---- what the HPA decides inside the simulator, against the policy called directly ----

LOAD_PER_S, SERVICE_S, PODS, TARGET = 20.0, 0.1, 4, 0.5  # busy per pod = 20 * 0.1 / 4 = 0.5: ratio 1.0


def steady_scenario(tolerance: float | None = None, **autoscaler: object) -> Scenario:
    """Four pods whose busy ratio sits at the target: the metric ratio hovers around 1.0. A 240 s query
    window averages about 4800 requests, so the ratio stays within a couple of percent of 1.0, far inside
    a 0.1 tolerance and outside a zero one."""
    spec: dict[str, object] = {
        "minReplicas": 1, "maxReplicas": 12,
        "metrics": [{"type": "Pods", "pods": {"metric": {"name": "capsim_gpu_busy_ratio"},
                                              "target": {"type": "AverageValue", "averageValue": "500m"}}}],
        "scrape_interval_s": 15, "query_window_s": 240, "sync_period_s": 15,
        "queries": {"capsim_gpu_busy_ratio": {"query": "avg_over_time"}},  # the window's mean, not the newest
        **autoscaler,
    }
    if tolerance is not None:
        spec["tolerance"] = tolerance
    return Scenario.model_validate({
        "horizon_s": 1500,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": LOAD_PER_S}},
        "service": {"kind": "deterministic", "mean_s": SERVICE_S},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0, "queue_capacity": 100000},
        "pods": {"replicas": PODS, "startup_s": 5},
        "router": {"kind": "least_outstanding"},
        "autoscaler": spec,
        "client": {"timeout_s": 1e6},
    })


def metric_ratios(sim: Simulation) -> list[float]:
    assert sim.autoscaling is not None
    return [v / TARGET for t, _, _, v in sim.autoscaling.syncs if t > 300 and not math.isnan(v)]


def test_inside_the_default_tolerance_the_hpa_holds_still() -> None:
    sim = Simulation(steady_scenario(), seed=0)
    r = sim.run()
    ratios = metric_ratios(sim)
    assert ratios and max(ratios) > 1.0 and min(ratios) > 0.9 and max(ratios) < 1.1  # the band is used
    assert r.scale_events.empty, r.scale_events  # the 0.1 tolerance absorbs it: no action


def test_with_zero_tolerance_the_same_run_scales_up() -> None:
    sim = Simulation(steady_scenario(tolerance=0.0), seed=0)
    r = sim.run()
    assert not r.scale_events.empty
    first = r.scale_events.iloc[0]
    assert (first["from_replicas"], first["to_replicas"]) == (PODS, PODS + 1)  # ceil(4 * 1.0x) = 5


class PolicySpy:
    """Wraps ``pods_metric_replicas`` where the simulator's HPA looks it up, recording every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[PodSample], float, Tolerance]] = []

    def __call__(self, current: int, samples: list[PodSample], target: float, tol: Tolerance) -> int:
        self.calls.append((current, list(samples), target, tol))
        return autoscaling.pods_metric_replicas(current, samples, target, tol)


@pytest.mark.parametrize("tolerance", [None, 0.0, 0.05, 0.25])
def test_every_decision_matches_the_policy_replayed_on_the_same_samples(
    tolerance: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replays each sync through ``capsim.policy.autoscaling`` with the tolerance and target written in
    the scenario (not read back from the simulator) and a fresh HPA built from the same spec."""
    spy = PolicySpy()
    monkeypatch.setattr(sim_hpa, "pods_metric_replicas", spy)
    scenario = steady_scenario(tolerance, behavior={"scaleDown": {"stabilizationWindowSeconds": 60}})
    sim = Simulation(scenario, seed=1)
    sim.run()
    assert sim.autoscaling is not None
    syncs = sim.autoscaling.syncs
    assert len(spy.calls) == len(syncs) > 50  # one metric: one policy call per sync
    written = 0.1 if tolerance is None else tolerance
    expected_tol = autoscaling.Tolerance(scale_down=written, scale_up=written)
    replay = autoscaling.HorizontalPodAutoscaler.from_k8s(
        scenario.autoscaler.k8s_spec() if scenario.autoscaler else {},
        downscale_window_seconds=300.0,
        tolerance=expected_tol,
    )
    for (t, current, desired, _), (seen_current, samples, target, tol) in zip(syncs, spy.calls, strict=True):
        assert seen_current == current
        assert target == TARGET
        assert tol == expected_tol, f"at {t} s the simulator's HPA used {tol}, the scenario says {written}"
        try:
            proposal: int | None = autoscaling.pods_metric_replicas(current, samples, TARGET, expected_tol)
        except ValueError:  # no pod had a value yet (a busy ratio is NaN at a pod's first scrape)
            proposal = None
        assert replay.reconcile(t, current, [proposal]) == desired, f"decision at {t} s"
    changes = sum(1 for _, c, d, _ in syncs if c != d)
    assert (changes == 0) == (written >= 0.05), (written, changes)  # only a tight band makes it act


def test_each_sync_s_reads_and_proposals_say_which_metric_drove_it() -> None:
    """``SimResult.hpa_syncs``: per sync, each metric's value and proposal. The busy ratio drives the step; queue
    depth, at a target it never reaches, proposes fewer; the count set is the larger proposal within the bounds,
    the rate limits and (down) the stabilization window."""
    sc = step_scenario()
    metrics = [*sc.autoscaler.metrics, {  # type: ignore[union-attr]
        "type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                 "target": {"type": "AverageValue", "averageValue": "1000"}}}]
    sim = Simulation(sc.override({"autoscaler.metrics": metrics}), seed=0)
    r = sim.run()
    f = r.hpa_syncs
    assert sim.autoscaling is not None
    busy, queue = "capsim_gpu_busy_ratio", "capsim_queue_depth"
    assert list(f.columns) == ["time_s", "current", "desired", busy, queue, f"{busy} proposal", f"{queue} proposal"]
    assert len(f) == len(sim.autoscaling.syncs) > 100
    assert f[["time_s", "current", "desired"]].to_numpy().tolist() == [list(s[:3]) for s in sim.autoscaling.syncs]
    same = [(v == s[3]) or (math.isnan(v) and math.isnan(s[3])) for v, s in zip(f[busy], sim.autoscaling.syncs,
                                                                              strict=True)]
    assert all(same)  # the first metric's value is what the time series has as hpa_metric
    ups = f[f["desired"] > f["current"]]
    assert not ups.empty
    # a scale-up goes no further than the largest proposal, and is the busy ratio's: the queue, 1000 a pod, proposes
    # fewer (at most 5, in the step's backlog)
    assert (ups["desired"] <= ups[[f"{busy} proposal", f"{queue} proposal"]].max(axis=1)).all()
    assert (ups[f"{busy} proposal"] > ups[f"{queue} proposal"]).all()
    assert f[f"{queue} proposal"].max() < f[f"{busy} proposal"].max()
    first = f.iloc[0]  # before Prometheus holds a sample: both reads failed, neither proposed
    assert math.isnan(first[busy]) and first[f"{busy} proposal"] == -1 == first[f"{queue} proposal"]
    assert f[busy].dropna().between(0, 1).all() and (f[queue].dropna() >= 0).all()

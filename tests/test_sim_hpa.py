"""HPA step response: no scale-up before the metric pipeline can show the step, scale-down only after
the stabilization window."""

from __future__ import annotations

import math

from capsim.model.scenario import Scenario
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
    # the first scrape that can see the step is the first after it; the adapter shows it LAG later;
    # the controller acts at its next sync
    first_scrape = math.floor(STEP_UP / SCRAPE) * SCRAPE + SCRAPE
    earliest_up = math.ceil((first_scrape + LAG) / SYNC) * SYNC
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

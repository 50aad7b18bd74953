"""KEDA's step to and from zero replicas (``capsim.policy.keda``, ``autoscaler.keda``) and its export; the
check ``scale-to-zero-cannot-wake`` is in ``test_checks.py``."""

from __future__ import annotations

from typing import Any

import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.policy.keda import ScaleExecutor, hpa_min_replicas
from test_autoscaler_validation import GATEWAY, bursts


# ---- the scale executor, branch by branch (RequestScale in kedacore/keda) -----------------------------------
def test_hpa_min_replicas_is_at_least_one() -> None:
    assert [hpa_min_replicas(n) for n in (0, 1, 3)] == [1, 1, 3]


def test_zero_replicas_and_an_active_trigger_scale_to_the_minimum_or_one() -> None:
    ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300)
    assert ex.request_scale(10.0, 0, active=True) == 1
    assert ex.last_active_s == 10.0
    assert ScaleExecutor(min_replica_count=3).request_scale(10.0, 0, active=True) == 3


def test_zero_replicas_and_nothing_active_stay_at_zero() -> None:
    ex = ScaleExecutor(min_replica_count=0, last_active_s=0.0)
    assert ex.request_scale(1000.0, 0, active=False) is None
    assert ex.last_active_s == 0.0


def test_scale_to_zero_waits_a_cooldown_after_the_last_active_poll() -> None:
    ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300)
    assert ex.request_scale(100.0, 4, active=True) is None  # active with pods: only the time is noted
    assert ex.last_active_s == 100.0
    assert ex.request_scale(130.0, 4, active=False) is None  # cooling down
    assert ex.request_scale(400.0, 4, active=False) is None  # exactly the cooldown: not yet (Before)
    assert ex.request_scale(400.5, 4, active=False) == 0
    assert ex.last_active_s == 100.0


def test_activity_during_the_cooldown_restarts_it() -> None:
    ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300)
    ex.request_scale(0.0, 1, active=True)
    assert ex.request_scale(290.0, 1, active=True) is None
    assert ex.request_scale(310.0, 1, active=False) is None  # 300 s after 0, but 20 s after 290
    assert ex.request_scale(600.0, 1, active=False) == 0


def test_never_active_scales_to_zero_at_once() -> None:
    # no lastActiveTime (the Deployment was scaled outside KEDA): the cooldown is ignored
    assert ScaleExecutor(min_replica_count=0).request_scale(5.0, 2, active=False) == 0


def test_a_minimum_above_zero_is_restored_and_never_left_for_zero() -> None:
    ex = ScaleExecutor(min_replica_count=2, cooldown_period_s=0)
    assert ex.request_scale(5.0, 1, active=False) == 2  # set outside KEDA below its minimum
    assert ex.request_scale(5.0, 2, active=False) is None
    assert ex.request_scale(50.0, 5, active=False) is None  # the HPA scales down, not KEDA


@pytest.mark.parametrize("bad", [{"min_replica_count": -1}, {"cooldown_period_s": -1.0},
                                 {"min_replica_count": 1.5}])
def test_bad_executor_settings_name_the_field(bad: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError), match=next(iter(bad))):
        ScaleExecutor(**bad)


# ---- the scenario's section ------------------------------------------------------------------------------
def keda(metric: dict[str, Any] = GATEWAY, **keda_settings: Any) -> Scenario:
    """``bursts`` (2 req/s for 5 minutes, 20 quiet minutes, again) with KEDA driving the autoscaler."""
    return bursts(metric).override({"autoscaler.keda": keda_settings})


def test_keda_needs_external_metrics_and_names_the_metric() -> None:
    queue = {"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                      "target": {"type": "AverageValue", "averageValue": "4"}}}
    with pytest.raises(SettingsError, match=r"autoscaler.metrics\[1\].type must be 'External' with keda"):
        bursts(GATEWAY).override({"autoscaler.minReplicas": 1, "autoscaler.metrics": [GATEWAY, queue],
                                  "autoscaler.keda": {}})
    with pytest.raises(SettingsError, match=r"autoscaler.keda.activation.nope: no metric of this name"):
        keda(activation={"nope": 1})
    with pytest.raises(SettingsError, match=r"autoscaler.keda.polling_interval_s"):
        keda(polling_interval_s=0)


def test_the_hpa_keda_creates_keeps_one_pod() -> None:
    s = keda()
    assert s.autoscaler is not None and s.autoscaler.min_replicas == 0
    assert s.autoscaler.to_hpa().min_replicas == 1
    assert bursts(GATEWAY).autoscaler.to_hpa().min_replicas == 0  # type: ignore[union-attr]  # HPAScaleToZero


# ---- in the simulator ------------------------------------------------------------------------------------
def test_keda_takes_the_deployment_to_zero_a_cooldown_after_the_last_activity_and_back() -> None:
    from capsim.sim import simulate

    r = simulate(keda(cooldown_period_s=300), seed=0)
    ev = r.scale_events
    assert set(ev["by"]) == {"hpa", "keda"}
    assert (ev.loc[ev["by"] == "hpa", "to_replicas"] >= 1).all()  # KEDA's HPA never goes below one
    to_zero = ev[(ev["by"] == "keda") & (ev["to_replicas"] == 0)]
    wake = ev[(ev["by"] == "keda") & (ev["from_replicas"] == 0)]
    assert len(to_zero) == 1 and len(wake) == 1
    # the last request came at 300 s; the gateway's 30 s rate is active until about 330 s, and KEDA waits
    # 300 s from the last poll that saw it (polls 30 s apart)
    assert 330 + 300 - 30 < to_zero["time_s"].iloc[0] <= 330 + 300 + 30
    # the second burst at 1500 s: the rate needs two scrapes (15 s apart), then the next poll
    assert 1500 < wake["time_s"].iloc[0] <= 1500 + 15 + 15 + 30
    assert wake["to_replicas"].iloc[0] == 1
    ts = r.timeseries.set_index("time_s")
    assert (ts["ready_replicas"].loc[700:1490] == 0).all()
    late = r.requests[r.requests["arrival_s"] >= 1500]
    assert (late["outcome"] == "ok").mean() > 0.99  # the first ones retried until a pod was ready
    polls = r.keda_polls
    assert list(polls.columns) == ["time_s", "active", "replicas", "set_replicas"]
    gaps = polls["time_s"].diff().dropna()
    assert gaps.between(30 - 1e-6, 30 + 1e-6).all()
    assert not polls.loc[polls["time_s"].between(700, 1490), "active"].any()


def test_the_cooldown_is_what_scale_to_zero_costs() -> None:
    from capsim.sim import simulate

    hpa_alone = simulate(bursts(GATEWAY), seed=0).summary.gpu_hours  # HPAScaleToZero, 60 s window
    short = simulate(keda(cooldown_period_s=60), seed=0).summary.gpu_hours
    long = simulate(keda(cooldown_period_s=600), seed=0).summary.gpu_hours
    floor = simulate(bursts(GATEWAY, **{"autoscaler.minReplicas": 1}), seed=0).summary.gpu_hours
    # 540 s more cooldown keeps one pod about 540 s longer in each quiet spell (the first; the run ends
    # in the second burst)
    assert long - short == pytest.approx(540 / 3600, abs=60 / 3600)
    assert hpa_alone < long < floor


def test_an_activation_threshold_trades_a_trickle_s_requests_for_gpu_time() -> None:
    from capsim.sim import simulate

    # one agent every 20 s in the quiet spell: at threshold 0 the gateway's 30 s rate is above 0 nearly
    # always, so the Deployment hardly leaves one pod; at 0.5 requests a second a lone request does not
    # activate the trigger, but its retries to a Service with no pod (every 5 s, attempts the gateway
    # counts) add up until one does: more time at zero, fewer GPU hours, and quiet-time requests failed
    trickle = {"workload.arrivals.rate_per_s": [[0, 2], [300, 0.05], [1500, 2]]}
    runs = [simulate(keda(cooldown_period_s=60, activation=act).override(trickle), seed=0)
            for act in ({}, {"capsim_gateway_requests_total": 0.5})]
    at_zero = [(r.timeseries.set_index("time_s")["ready_replicas"].loc[400:1490] == 0).mean() for r in runs]
    quiet = [r.requests[r.requests["arrival_s"].between(400, 1490)] for r in runs]
    assert at_zero[0] < 0.2 < 0.5 < at_zero[1]
    assert (quiet[0]["outcome"] == "ok").all()
    assert (quiet[1]["outcome"] == "failed").sum() >= 5
    assert runs[1].summary.gpu_hours < runs[0].summary.gpu_hours
    woke = runs[1].scale_events.query("by == 'keda' and from_replicas == 0")
    assert len(woke) >= 3  # retries woke it in the quiet spell, not only the second burst


def test_keda_runs_the_same_frames_for_a_seed() -> None:
    from capsim.sim import simulate

    a, b = (simulate(keda(), seed=3) for _ in range(2))
    assert a.scale_events.equals(b.scale_events) and a.keda_polls.equals(b.keda_polls)

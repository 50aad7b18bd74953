"""A Prometheus outage (``faults.metrics_outages``): the HPA holds; KEDA 2.17 and later change nothing and let
the HPA apply the fallback (by its ``behavior``), and a Deployment at zero stays there; KEDA 2.16 goes to zero
without a fallback and to ``fallback.replicas`` with one (``capsim.policy.keda``, ``capsim.sim.hpa``); the
checks are in ``test_checks.py``, the export in ``test_export.py``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.policy.keda import FallbackHealth, ScaleExecutor
from capsim.sim import Simulation, simulate
from test_autoscaler_validation import GATEWAY, bursts

VALUE_GATEWAY = {"type": "External", "external": {"metric": {"name": "capsim_gateway_requests_total"},
                                                  "target": {"type": "Value", "value": "1"}}}


# ---- the scale executor in error (RequestScale with isError) ------------------------------------------------
def test_from_2_17_a_poll_in_error_changes_nothing_fallback_or_not() -> None:
    for fallback in (None, 3):
        ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300, last_active_s=0.0, fallback_replicas=fallback)
        assert ex.release == "2.18"  # the default: 2.18's operator is 2.17's
        assert [ex.request_scale(t, n, active=False, error=True) for t, n in ((30.0, 5), (400.0, 5), (900.0, 0))] \
            == [None, None, None]  # no fallback set, no step to zero past the cooldown, no wake from zero
        assert ex.last_active_s == 0.0
        assert ex.request_scale(930.0, 5, active=False, error=False) == 0  # the idle rule, once it answers
    ex = ScaleExecutor(min_replica_count=2, cooldown_period_s=0)
    assert ex.request_scale(10.0, 1, active=False, error=True) is None  # not even up to minReplicaCount


def test_from_2_17_a_fallback_of_zero_replicas_makes_a_poll_in_error_an_idle_one() -> None:
    """Upstream's switch has a case for an error with a fallback of replicas and one for an error without a
    fallback; a fallback of ``replicas: 0`` matches neither and falls through to the idle poll's rules."""
    ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300, last_active_s=0.0, fallback_replicas=0)
    assert [ex.request_scale(t, n, active=False, error=True) for t, n in ((30.0, 5), (400.0, 5), (900.0, 0))] \
        == [None, 0, None]  # cooling down, then to zero past the cooldown; no wake from zero
    assert ex.last_active_s == 0.0
    up = ScaleExecutor(min_replica_count=2, cooldown_period_s=0, fallback_replicas=0)
    assert up.request_scale(10.0, 1, active=False, error=True) == 2  # up to minReplicaCount, as an idle poll
    idle = ScaleExecutor(min_replica_count=2, cooldown_period_s=300, last_active_s=0.0, fallback_replicas=0,
                         idle_replica_count=0)
    assert [idle.request_scale(t, 2, active=False, error=True) for t in (30.0, 400.0)] == [None, 0]
    partial = ScaleExecutor(min_replica_count=0)
    assert partial.request_scale(10.0, 0, active=True, error=True) == 1 and partial.last_active_s == 10.0
    # some triggers active, another failing: 2.17 sets the Ready condition Unknown and notes no activity
    assert partial.request_scale(40.0, 1, active=True, error=True) is None and partial.last_active_s == 10.0
    assert partial.request_scale(70.0, 1, active=True, error=False) is None and partial.last_active_s == 70.0


def test_a_release_is_one_keda_has() -> None:
    with pytest.raises(ValueError, match=r"release must be one of 2.20, 2.18, 2.17, 2.16, got '2.15'"):
        ScaleExecutor(release="2.15")  # type: ignore[arg-type]


def test_a_poll_in_error_sets_the_fallback_replicas_even_when_they_are_the_count() -> None:
    ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300, last_active_s=0.0, fallback_replicas=3,
                       release="2.16")
    assert ex.request_scale(30.0, 5, active=False, error=True) == 3
    assert ex.request_scale(60.0, 3, active=False, error=True) == 3
    assert ex.request_scale(90.0, 0, active=False, error=True) == 3  # even from zero: doFallbackScaling
    assert ex.last_active_s == 0.0  # a fallback is no activity


def test_an_active_trigger_wins_over_an_error_in_another() -> None:
    ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300, fallback_replicas=3, release="2.16")
    assert ex.request_scale(30.0, 0, active=True, error=True) == 1
    assert ex.request_scale(60.0, 2, active=True, error=True) is None and ex.last_active_s == 60.0


def test_in_2_16_without_a_fallback_an_error_is_an_idle_deployment_and_goes_to_zero_after_the_cooldown() -> None:
    # kedacore/keda#965: a Prometheus outage longer than the cooldown scales a serving Deployment to zero
    for fallback in (None, 0):  # fallback.replicas 0 does not fall back (the executor's != 0)
        ex = ScaleExecutor(min_replica_count=0, cooldown_period_s=300, last_active_s=100.0,
                           fallback_replicas=fallback, release="2.16")
        assert ex.request_scale(390.0, 4, active=False, error=True) is None  # cooling down
        assert ex.request_scale(401.0, 4, active=False, error=True) == 0
    with_min = ScaleExecutor(min_replica_count=2, cooldown_period_s=0, release="2.16")
    assert with_min.request_scale(10.0, 4, active=False, error=True) is None  # the HPA's business


def test_fallback_replicas_must_be_a_count() -> None:
    with pytest.raises(ValueError, match="fallback_replicas"):
        ScaleExecutor(fallback_replicas=-1)


# ---- KEDA's metrics server (status.health and doFallback) --------------------------------------------------
def test_the_fallback_answers_only_after_more_than_the_threshold_failures_in_a_row() -> None:
    h = FallbackHealth(failure_threshold=3, replicas=4)
    assert [h.read(0, None, True, 5.0) for _ in range(3)] == [None, None, None]  # an error to the HPA
    assert h.read(0, None, True, 5.0) == 20.0  # the 4th: 5 x 4, so the HPA proposes 4 pods
    assert h.read(0, 7.5, False, 5.0) == 7.5 and h.failures[0] == 0  # a success resets the count
    assert h.read(0, None, True, 5.0) is None
    assert h.read(1, None, True, 5.0) is None and h.failures == {0: 1, 1: 1}  # counted per metric
    assert h.fallbacks == 1


def test_a_zero_threshold_falls_back_at_the_first_failure() -> None:
    assert FallbackHealth(failure_threshold=0, replicas=2).read(0, None, True, 3.0) == 6.0


def test_the_fallback_truncates_the_target_to_an_integer_as_keda_did_before_2_18() -> None:
    for release in ("2.17", "2.16"):
        h = FallbackHealth(failure_threshold=0, replicas=4, release=release)  # type: ignore[arg-type]
        assert h.read(0, None, True, 2.7) == 8.0  # int64(2.7) x 4
        assert h.read(0, None, True, 0.5) == 0.0  # a target below 1: the HPA goes to its minimum
    new = FallbackHealth(failure_threshold=0, replicas=4)  # 2.18: NewMilliQuantity(int64(target x 1000 x 4))
    assert new.read(0, None, True, 2.7) == 10.8 and new.read(0, None, True, 0.5) == 2.0
    assert FallbackHealth(failure_threshold=0, replicas=3).read(0, None, True, 0.3333) == 0.999  # whole thousandths


def test_from_2_18_a_value_target_falls_back_through_the_ready_pods() -> None:
    # kedacore/keda#6655: target x n / readyReplicas, so the HPA's Value rule (ratio x ready pods) proposes n
    h = FallbackHealth(failure_threshold=0, replicas=6)
    assert h.read(0, None, True, 2.0, value_target=True, ready_replicas=4) == 3.0  # 2 x 6 / 4
    assert h.read(0, None, True, 1.0, value_target=True, ready_replicas=3) == 2.0
    assert h.read(0, None, True, 1.0, value_target=True, ready_replicas=7) == 0.857  # 6/7 in thousandths
    assert h.read(0, None, True, 2.0, value_target=True, ready_replicas=0) is None  # no ready pod: an error
    assert h.fallbacks == 3
    old = FallbackHealth(failure_threshold=0, replicas=6, release="2.17")
    assert old.read(0, None, True, 2.0, value_target=True, ready_replicas=4) is None  # none before 2.18


@pytest.mark.parametrize(("behavior", "current", "proposed"), [
    ("static", 7, 4), ("static", 1, 4),
    ("currentReplicas", 7, 7), ("currentReplicas", 1, 1), ("currentReplicas", 0, 0),
    ("currentReplicasIfHigher", 7, 7), ("currentReplicasIfHigher", 1, 4), ("currentReplicasIfHigher", 4, 4),
    ("currentReplicasIfLower", 7, 4), ("currentReplicasIfLower", 1, 1), ("currentReplicasIfLower", 4, 4),
])
def test_the_fallback_behavior_picks_the_count_from_the_deployment_and_the_replicas(
        behavior: Any, current: int, proposed: int) -> None:
    # kedacore/keda pkg/fallback/fallback.go doFallback, 2.17 on; the value is the target times the count
    h = FallbackHealth(failure_threshold=0, replicas=4, behavior=behavior)
    assert h.fallback_replicas(current) == proposed
    assert h.read(0, None, True, 5.0, current_replicas=current) == 5.0 * proposed


def test_a_fallback_behavior_is_one_keda_has() -> None:
    with pytest.raises(ValueError, match=r"behavior must be one of static, currentReplicas"):
        FallbackHealth(failure_threshold=0, replicas=4, behavior="max")  # type: ignore[arg-type]


def test_no_fallback_or_no_target_is_always_an_error() -> None:
    assert FallbackHealth(failure_threshold=None, replicas=0).read(0, None, True, 5.0) is None
    h = FallbackHealth(failure_threshold=0, replicas=3)
    assert [h.read(0, None, True, None) for _ in range(5)] == [None] * 5
    assert h.read(0, None, False, None) is None  # a query with no value stays no value (no failure)
    assert h.failures[0] == 0


# ---- the scenario's fields ---------------------------------------------------------------------------------
def keda_plan(**keda: Any) -> Scenario:
    """``bursts`` made steady (1.5 req/s throughout) with KEDA on the gateway's rate."""
    return bursts(GATEWAY).override({"workload.arrivals.rate_per_s": [[0, 1.5]], "horizon_s": 2400,
                                     "autoscaler.keda": {"cooldown_period_s": 300, **keda}})


def test_a_fallback_needs_average_value_targets_before_2_18_and_names_the_metric() -> None:
    with pytest.raises(SettingsError, match=r"keda.fallback needs every trigger's metric type AverageValue before "
                                            r"release 2.18 \(KEDA 2.17 refuses.*"
                                            r"metrics\[0\] \(capsim_gateway_requests_total\) targets a Value"):
        bursts(VALUE_GATEWAY).override({"autoscaler.keda": {"fallback": {"replicas": 2}, "release": "2.17"}})
    s = bursts(VALUE_GATEWAY).override({"autoscaler.keda": {"fallback": {"replicas": 2}}})  # 2.18 takes it
    assert s.autoscaler is not None and s.autoscaler.keda is not None and s.autoscaler.keda.release == "2.18"
    with pytest.raises(SettingsError, match=r"autoscaler.keda.fallback.replicas"):
        keda_plan(fallback={"failure_threshold": 3})
    with pytest.raises(SettingsError, match=r"autoscaler.keda.fallback.failure_threshold"):
        keda_plan(fallback={"failure_threshold": -1, "replicas": 2})


def test_a_fallback_behavior_needs_release_2_17_and_says_so() -> None:
    with pytest.raises(SettingsError, match=r"autoscaler.keda.*fallback.behavior 'currentReplicas' needs release "
                                            r"2.17 or later"):
        keda_plan(release="2.16", fallback={"replicas": 2, "behavior": "currentReplicas"})
    with pytest.raises(SettingsError, match=r"autoscaler.keda.fallback.behavior"):
        keda_plan(fallback={"replicas": 2, "behavior": "currentReplica"})
    with pytest.raises(SettingsError, match=r"autoscaler.keda.release"):
        keda_plan(release="2.15")
    assert keda_plan(release="2.16", fallback={"replicas": 2, "behavior": "static"}).autoscaler is not None


def test_an_outage_needs_a_positive_duration_and_names_it() -> None:
    with pytest.raises(SettingsError, match=r"faults.metrics_outages.0.duration_s"):
        keda_plan().override({"faults.metrics_outages": [{"at_s": 10, "duration_s": 0}]})


# ---- in the simulator --------------------------------------------------------------------------------------
OUT = (600.0, 1500.0)  # Prometheus down for 15 minutes


def outage(s: Scenario) -> Scenario:
    return s.override({"faults.metrics_outages": [{"at_s": OUT[0], "duration_s": OUT[1] - OUT[0]}]})


def test_2_17_without_a_fallback_a_serving_deployment_keeps_its_pods_through_the_outage() -> None:
    r = simulate(outage(keda_plan()), seed=0)
    polls = r.keda_polls
    during = polls[polls["time_s"].between(*OUT, inclusive="left")]
    assert len(during) >= 29 and during["error"].all() and (during["set_replicas"] == -1).all()
    ev = r.scale_events
    assert not ev["time_s"].between(*OUT).any()  # neither KEDA nor the HPA (it read no metric) moved it
    ts = r.timeseries.set_index("time_s")
    assert (ts["ready_replicas"].loc[OUT[0]:OUT[1]] == 2).all()
    held = r.requests[r.requests["arrival_s"].between(*OUT)]
    assert len(held) > 1000 and (held["outcome"] == "ok").all()


def test_2_17_a_fallback_acts_through_the_hpa_by_its_behavior() -> None:
    def during(fallback: dict[str, Any]) -> Any:
        r = simulate(outage(keda_plan(fallback={"failure_threshold": 3, **fallback})), seed=0)
        polls = r.keda_polls
        assert (polls.loc[polls["time_s"].between(*OUT, inclusive="left"), "set_replicas"] == -1).all()
        return r.timeseries.set_index("time_s")["desired_replicas"].loc[OUT[0]:OUT[1]]

    up = during({"replicas": 4})  # 2 pods serve: the HPA scales to 4 once its 4th read has failed
    assert up.iloc[0] == 2 and (up.loc[OUT[0] + 4 * 15 + 15:] == 4).all()
    down = during({"replicas": 1})  # and down to 1, after its 60 s scale-down window
    assert (down.loc[OUT[0] + 4 * 15 + 60 + 15:] == 1).all()
    kept = during({"replicas": 1, "behavior": "currentReplicasIfHigher"})  # the 2 it has are more than 1
    assert (kept == 2).all()
    lower = during({"replicas": 4, "behavior": "currentReplicasIfLower"})  # the 2 it has are fewer than 4
    assert (lower == 2).all()


def test_2_18_a_fallback_on_a_value_target_takes_the_hpa_to_its_replicas() -> None:
    # the gateway's rate (1.5 requests/s) as a Value target of 1: the HPA multiplies its pods by the rate over the
    # target and sits at its maximum, 4; in the outage KEDA 2.18 answers target x 2 / ready pods, so the HPA's
    # Value rule (ceil(value / target x ready pods)) proposes 2 once its 4th read has failed, and it goes there
    # after its 60 s scale-down window
    plan = keda_plan(fallback={"failure_threshold": 3, "replicas": 2}).override(
        {"autoscaler.metrics": [VALUE_GATEWAY]})
    r = simulate(outage(plan), seed=0)
    ts = r.timeseries.set_index("time_s")["desired_replicas"]
    assert ts.loc[OUT[0]] == 4 and (ts.loc[OUT[0] + 4 * 15 + 60 + 15:OUT[1]] == 2).all()
    without = simulate(outage(plan.override({"autoscaler.keda.fallback": None})), seed=0)
    held = without.timeseries.set_index("time_s")["desired_replicas"].loc[OUT[0]:OUT[1]]
    assert (held == 4).all()  # no fallback: every read an error, the HPA holds


def test_2_17_a_deployment_at_zero_stays_at_zero_through_the_outage_fallback_or_not() -> None:
    # bursts: at zero from about 700 s, the second burst at 1500 s; Prometheus down from 1000 to 1800 s
    def run(**keda: Any) -> Any:
        return simulate(bursts(GATEWAY).override({"autoscaler.keda": {"cooldown_period_s": 300, **keda},
                                                  "faults.metrics_outages": [{"at_s": 1000, "duration_s": 800}]}),
                        seed=0)

    for r in (run(), run(fallback={"replicas": 2})):  # kedacore/keda#7239
        ts = r.timeseries.set_index("time_s")
        assert (ts["ready_replicas"].loc[800:1800] == 0).all()
        woke = r.scale_events[(r.scale_events["from_replicas"] == 0) & (r.scale_events["time_s"] > 1000)]
        assert 1800 < woke["time_s"].iloc[0] <= 1800 + 15 + 15 + 30  # two fresh scrapes for the rate, a poll
        early = r.requests[r.requests["arrival_s"].between(1500, 1700)]
        assert len(early) > 300 and (early["outcome"] != "ok").mean() > 0.5  # 12 retries 5 s apart: 60 s
    old = run(release="2.16", fallback={"replicas": 2})  # the 2.16 operator sets the fallback at once, from zero
    woke = old.scale_events[(old.scale_events["from_replicas"] == 0) & (old.scale_events["time_s"] > 1000)]
    assert woke["time_s"].iloc[0] <= 1000 + 30 and woke["to_replicas"].iloc[0] == 2
    late = old.requests[old.requests["arrival_s"].between(1500, 1700)]
    assert (late["outcome"] == "ok").all()


def test_2_16_without_a_fallback_takes_a_serving_deployment_to_zero_a_cooldown_into_the_outage() -> None:
    r = simulate(outage(keda_plan(release="2.16")), seed=0)
    polls = r.keda_polls
    during = polls[polls["time_s"].between(*OUT, inclusive="left")]
    assert during["error"].all() and not during["active"].any()
    assert not polls.loc[~polls["time_s"].between(*OUT, inclusive="left"), "error"].any()
    ev = r.scale_events
    down = ev[(ev["by"] == "keda") & (ev["to_replicas"] == 0)]
    assert len(down) == 1
    # the last active poll came at most one polling interval before the outage; zero a cooldown after it
    assert OUT[0] + 300 - 30 < down["time_s"].iloc[0] <= OUT[0] + 300 + 30
    ts = r.timeseries.set_index("time_s")
    assert (ts["ready_replicas"].loc[down["time_s"].iloc[0] + 40:OUT[1]] == 0).all()  # nothing can wake it
    up = ev[(ev["by"] == "keda") & (ev["from_replicas"] == 0)]
    # back once Prometheus is: two scrapes of the gateway (15 s apart) for the rate, then the next poll
    assert OUT[1] < up["time_s"].iloc[0] <= OUT[1] + 15 + 15 + 30
    lost = r.requests[r.requests["arrival_s"].between(OUT[0] + 400, OUT[1] - 100)]
    assert len(lost) > 500 and (lost["outcome"] != "ok").all()  # 12 retries 5 s apart cannot reach a pod


def test_2_17_a_fallback_of_zero_replicas_takes_a_serving_deployment_to_zero_a_cooldown_into_the_outage() -> None:
    kept = simulate(outage(keda_plan()), seed=0)
    r = simulate(outage(keda_plan(fallback={"replicas": 0})), seed=0)  # neither of 2.17's error cases
    ev = r.scale_events
    down = ev[(ev["by"] == "keda") & (ev["to_replicas"] == 0)]
    assert len(down) == 1 and OUT[0] + 300 - 30 < down["time_s"].iloc[0] <= OUT[0] + 300 + 30
    up = ev[(ev["by"] == "keda") & (ev["from_replicas"] == 0)]
    assert OUT[1] < up["time_s"].iloc[0] <= OUT[1] + 15 + 15 + 30
    lost = r.requests[r.requests["arrival_s"].between(OUT[0] + 400, OUT[1] - 100)]
    assert len(lost) > 500 and (lost["outcome"] != "ok").all()
    assert (kept.requests["outcome"] == "ok").all()  # no fallback at all: 2.17 keeps the pods


def test_2_16_with_a_fallback_holds_the_fallback_replicas_through_the_outage() -> None:
    r = simulate(outage(keda_plan(release="2.16", fallback={"failure_threshold": 3, "replicas": 2})), seed=0)
    ev = r.scale_events
    assert not ((ev["to_replicas"] == 0) & (ev["time_s"] < OUT[1])).any()
    polls = r.keda_polls
    during = polls[polls["time_s"].between(*OUT, inclusive="left")]
    assert (during["set_replicas"] == 2).all()  # every poll in error sets fallback.replicas
    first = during["time_s"].iloc[0]
    assert first < OUT[0] + 30
    ts = r.timeseries.set_index("time_s")
    assert (ts["desired_replicas"].loc[first + 10:OUT[1]] == 2).all()  # the HPA's fallback proposal agrees
    held = r.requests[r.requests["arrival_s"].between(OUT[0] + 400, OUT[1] - 100)]
    assert (held["outcome"] == "ok").mean() > 0.99
    # and when Prometheus is back: its first poll (1.5 s after, at this seed's phase) finds the gateway's
    # rate without two fresh samples, so no trigger is active, none was since before the outage, and the
    # cooldown has long passed: KEDA takes the Deployment to zero, and wakes it at the next poll
    after = polls[polls["time_s"] >= OUT[1]]
    assert after["time_s"].iloc[0] < OUT[1] + 15 and not after["active"].iloc[0] and not after["error"].iloc[0]
    assert after["set_replicas"].iloc[0] == 0 and after["set_replicas"].iloc[1] == 1


def test_the_hpa_reads_the_fallback_after_the_threshold_and_errors_before_it() -> None:
    sim = Simulation(outage(keda_plan(fallback={"failure_threshold": 3, "replicas": 2})), seed=0)
    sim.run()
    auto = sim.autoscaling
    assert auto is not None and auto.keda_health is not None
    syncs = [s for s in auto.syncs if OUT[0] <= s[0] < OUT[1]]
    n = len(syncs)
    assert n == pytest.approx((OUT[1] - OUT[0]) / 15, abs=1)
    # the HPA sees the metric (the fallback's value 1 x 2) only from the 4th failed read on
    assert all(np.isnan(s[3]) for s in syncs[:3]) and all(s[3] == 2.0 for s in syncs[3:])
    assert auto.keda_health.fallbacks == n - 3
    after = [s for s in auto.syncs if s[0] >= OUT[1] + 60]
    assert after and not np.isnan(after[0][3])  # back to the gateway's own rate


def rush() -> Scenario:
    """A plain HPA on requests in flight, facing a rush that starts in the outage."""
    return Scenario.model_validate({
        "horizon_s": 1800, "timeseries_interval_s": 10,
        "workload": {"arrivals": {"kind": "piecewise", "rate_per_s": [[0, 4], [700, 16]]}},
        "service": {"kind": "deterministic", "mean_s": 0.4},
        "batching": {"max_batch_size": 1, "queue_capacity": 1000, "overflow": "wait"},
        "pods": {"replicas": 2, "startup_s": 20},
        "autoscaler": {"minReplicas": 2, "maxReplicas": 12, "metrics": [
            {"type": "Pods", "pods": {"metric": {"name": "capsim_requests_in_flight"},
                                      "target": {"type": "AverageValue", "averageValue": "1"}}}]},
        "faults": {"metrics_outages": [{"at_s": 600, "duration_s": 600}]},
    })


def test_the_hpa_holds_its_count_while_prometheus_is_down_and_scales_after() -> None:
    out = simulate(rush(), seed=0)
    up = simulate(rush().override({"faults.metrics_outages": []}), seed=0)
    def ups(r: Any, lo: float, hi: float) -> int:
        ev = r.scale_events
        return int(((ev["to_replicas"] > ev["from_replicas"]) & ev["time_s"].between(lo, hi)).sum())
    assert ups(up, 700, 1200) > 0  # without the outage the rush scales up at once
    assert ups(out, 600, 1200) == 0 and not out.scale_events["time_s"].between(600, 1200).any()
    assert ups(out, 1200, 1320) > 0  # and after it, at the first syncs with fresh samples
    def ttft(r: Any) -> float:
        req = r.requests[r.requests["arrival_s"].between(900, 1200)]
        return float((req["first_token_s"] - req["arrival_s"]).median())
    assert ttft(out) > 10 * ttft(up)  # what holding cost


def test_prometheus_scrapes_nothing_while_down() -> None:
    sc = keda_plan().override({"faults.metrics_outages": [{"at_s": 2200, "duration_s": 200}]})
    sim = Simulation(sc, seed=0)
    sim.run()
    auto = sim.autoscaling
    assert auto is not None
    gw = [t for t, _ in auto.gateway_samples]
    assert gw and max(gw) < 2200  # the samples before it are kept; none after
    pod_times = [s[0] for p in sim.cluster.pods for s in p.samples]
    assert pod_times and max(pod_times) < 2200


def _after_outage(**override: Any) -> tuple[Any, Any]:
    """``keda_plan`` with Prometheus down from 1200 to 1800 s (longer than the cooldown and the HPA's 300 s
    scale-down window): its scale events and KEDA's polls from the outage's end."""
    sc = keda_plan().override({"faults.metrics_outages": [{"at_s": 1200, "duration_s": 600}], **override})
    r = simulate(sc, seed=0)
    return r.scale_events[r.scale_events["time_s"] >= 1800], r.keda_polls[r.keda_polls["time_s"] >= 1800]


def test_after_an_outage_keda_reads_the_empty_rate_as_0_and_takes_a_serving_deployment_to_zero() -> None:
    """When Prometheus answers again the gateway's rate has fewer than two fresh samples: KEDA's default
    (``ignoreNullValues``) reads the empty result as 0, its first poll finds no trigger active more than a
    cooldown after the last that did (before the outage), and it takes the serving Deployment to zero under
    load, to wake it a poll later; without ``ignoreNullValues`` the poll is in error and nothing changes."""
    events, polls = _after_outage()
    first = polls.iloc[0]
    assert first["time_s"] < 1830 and not first["active"] and not first["error"] and first["set_replicas"] == 0
    to_zero = events[(events["by"] == "keda") & (events["to_replicas"] == 0)]
    assert len(to_zero) == 1 and to_zero["time_s"].iloc[0] == first["time_s"]
    assert ((events["by"] == "keda") & (events["from_replicas"] == 0)).any()  # and back, at a later poll
    events, polls = _after_outage(**{"autoscaler.keda.ignore_null_values": False})
    first = polls.iloc[0]
    assert first["error"] and first["set_replicas"] == -1 and bool(polls["active"].iloc[1])
    assert not (events["to_replicas"] == 0).any()


def test_simulate_says_when_keda_took_the_deployment_to_zero_on_the_empty_results(tmp_path: Any) -> None:
    from test_inputs_cli import run
    from test_keda import yaml_of

    path = tmp_path / "outage.yaml"
    plan = keda_plan().override({"faults.metrics_outages": [{"at_s": 1200, "duration_s": 600}]})
    for ignore, said in ((True, "; at its first poll after, 1801 s, KEDA read the queries, empty until Prometheus "
                                "scraped afresh, as 0 (ignoreNullValues) and took it to zero (capsim check: "
                                "keda-empty-after-outage)"),
                         (False, "")):
        path.write_text(yaml_of(plan.override({"autoscaler.keda.ignore_null_values": ignore})))
        code, out, err = run(["simulate", str(path)])
        assert code == 0, err
        (note,) = [line for line in out.splitlines() if line.startswith("note: Prometheus")]
        assert note.endswith("pods meanwhile (scale_events.csv)" + said), note


def test_after_an_outage_without_a_fallback_the_hpa_reads_0_and_scales_to_its_minimum() -> None:
    """The HPA KEDA created: its reads failed through the outage (no recommendation in its scale-down window),
    so the 0 it reads after proposes its minimum, and it scales down until the rate is back; a failed read
    instead (``ignoreNullValues`` false) or a fallback's values in the window hold the count."""
    floor = {"autoscaler.minReplicas": 1}
    events, _ = _after_outage(**floor)
    down = events[(events["by"] == "hpa") & (events["to_replicas"] < events["from_replicas"])]
    assert not down.empty and down["time_s"].iloc[0] < 1830 and down["to_replicas"].iloc[0] == 1
    up = events[(events["by"] == "hpa") & (events["to_replicas"] > events["from_replicas"])]
    assert not up.empty and up["time_s"].iloc[0] < down["time_s"].iloc[0] + 60  # back once the rate is
    for hold in ({"autoscaler.keda.ignore_null_values": False},
                 {"autoscaler.keda.fallback": {"failure_threshold": 3, "replicas": 2}}):
        events, _ = _after_outage(**floor, **hold)
        assert not ((events["time_s"] < 1900) & (events["to_replicas"] < events["from_replicas"])).any(), hold


def test_overlapping_outages_are_one() -> None:
    a = simulate(keda_plan().override({"faults.metrics_outages": [{"at_s": 600, "duration_s": 900},
                                                                  {"at_s": 700, "duration_s": 100}]}), seed=0)
    b = simulate(outage(keda_plan()), seed=0)
    assert a.keda_polls.equals(b.keda_polls) and a.scale_events.equals(b.scale_events)


def test_simulate_says_what_the_deployment_did_while_prometheus_was_down(tmp_path: Any) -> None:
    from test_inputs_cli import run
    from test_keda import yaml_of

    path = tmp_path / "outage.yaml"
    path.write_text(yaml_of(outage(keda_plan(release="2.16"))))
    code, out, err = run(["simulate", str(path), "--out", str(tmp_path / "run")])
    assert code == 0, err
    (note,) = [line for line in out.splitlines() if line.startswith("note: Prometheus")]
    assert note == ("note: Prometheus was down from 600 to 1500 s: KEDA's polls (release 2.16) were in error (no "
                    "fallback) and its HPA read no metric; the Deployment went from 2 to 0 pods meanwhile "
                    "(scale_events.csv)")
    polls = (tmp_path / "run" / "keda_polls.csv").read_text().splitlines()
    assert polls[0] == "time_s,active,error,replicas,set_replicas" and any(",True," in p for p in polls[1:])
    path.write_text(yaml_of(rush()))
    code, out, err = run(["simulate", str(path)])
    assert code == 0, err
    (note,) = [line for line in out.splitlines() if line.startswith("note: Prometheus")]
    assert note.startswith("note: Prometheus was down from 600 to 1200 s: the HPA read no metric")
    assert note.endswith("went from 3 to 3 pods meanwhile (scale_events.csv)")  # it held
    path.write_text(yaml_of(outage(keda_plan(release="2.16", fallback={"replicas": 2}))))
    code, out, err = run(["simulate", str(path)])
    (note,) = [line for line in out.splitlines() if line.startswith("note: Prometheus")]
    assert "KEDA's polls (release 2.16) were in error and set its fallback, 2 pods; the Deployment went from 2 to 2" \
        in note
    for keda, said in (({}, "KEDA's polls were in error and changed nothing (no fallback); its HPA read no metric; "
                            "the Deployment went from 2 to 2 pods"),
                       ({"fallback": {"replicas": 3, "behavior": "currentReplicasIfHigher"}},
                        "KEDA's polls were in error and changed nothing; its HPA read the fallback "
                        "(currentReplicasIfHigher, 3 pods) after 3 failed reads; the Deployment went from 2 to 3")):
        path.write_text(yaml_of(outage(keda_plan(**keda))))
        code, out, err = run(["simulate", str(path)])
        assert code == 0, err
        (note,) = [line for line in out.splitlines() if line.startswith("note: Prometheus")]
        assert said in note, note


def test_the_shipped_outage_space_keeps_a_pod_on_2_17_and_a_fallback_on_2_16(tmp_path: Any) -> None:
    from capsim.studies.space import load_space
    from capsim.studies.tune import tune

    space = load_space("data/studies/scale_to_zero_outage_space.yaml")
    assert {"autoscaler.keda.fallback", "autoscaler.keda.ignore_null_values"} <= {p.path for p in space.params}
    assert set(space.stresses) == {"quiet-hours", "prometheus-down", "prometheus-down-at-zero"}
    # Prometheus down from the end of the quiet hour (at zero pods) into the second working spell
    base = Scenario.from_yaml("data/scenarios/scale_to_zero.yaml").override(
        {"autoscaler.keda.fallback": {"replicas": 1}})
    small = {"params": {"autoscaler.minReplicas": {"choices": [0, 1]}},
             "stresses": {"at-zero": space.stresses["prometheus-down-at-zero"]}}
    r = tune(base, small, seeds=1, budget=2, executor="serial", cache=tmp_path, progress=False)
    assert r.best_params == {"autoscaler.minReplicas": 1}  # 2.17: at zero it stays at zero, fallback or not
    zero = r.trials[r.trials["autoscaler.minReplicas"] == 0]
    assert len(zero) and (zero["status"] == "rejected").all()
    assert zero["reason"].str.contains("kept a request 600 s > max_wake_s 420 s").all()
    old = tune(base.override({"autoscaler.keda.release": "2.16"}), small, seeds=1, budget=2, executor="serial",
               cache=tmp_path, progress=False)
    assert old.best_params == {"autoscaler.minReplicas": 0}  # 2.16: the fallback wakes it at the first poll


# ---- a partial outage: one trigger's source fails, the others answer (faults.trigger_outages) -------------
IN_FLIGHT = {"type": "External", "external": {"metric": {"name": "capsim_requests_in_flight"},
                                              "target": {"type": "AverageValue", "averageValue": "8"}}}


def two_triggers(release: str) -> Scenario:
    """The steady KEDA plan with a second trigger, the requests in flight summed over the pods (2 s a request at
    1.5 requests/s: about 3 in flight, so it is active whenever traffic flows), and the gateway's source down
    from 600 to 1500 s."""
    return keda_plan(release=release).override({
        "service.mean_s": 2.0, "autoscaler.metrics": [GATEWAY, IN_FLIGHT],
        "faults.trigger_outages": [{"at_s": OUT[0], "duration_s": OUT[1] - OUT[0],
                                    "metrics": ["capsim_gateway_requests_total"]}]})


def test_a_partial_outage_errs_only_its_trigger_and_the_other_keeps_the_deployment_active() -> None:
    for release in ("2.16", "2.17"):
        sim = Simulation(two_triggers(release), seed=0)
        r = sim.run()
        polls = r.keda_polls
        during = polls[polls["time_s"].between(*OUT, inclusive="left")]
        assert len(during) >= 29 and during["error"].all()
        assert during["active"].mean() > 0.9  # the requests in flight answered, and were above 0
        assert not polls.loc[~polls["time_s"].between(*OUT, inclusive="left"), "error"].any()
        ev = r.scale_events
        assert not ((ev["by"] == "keda") & (ev["to_replicas"] == 0)).any()  # never to zero: a trigger was active
        assert not r.requests["outcome"].isin(["failed", "timed_out", "rejected"]).any()  # (a few still in flight)
        # stopped in the outage: 2.17 on an active poll with another trigger in error only sets the Ready
        # condition, so the last activity it noted is from before the outage; 2.16 notes each active poll
        mid = Simulation(two_triggers(release).override({"horizon_s": 1400}), seed=0)
        mid.run()
        last = mid.autoscaling.keda.last_active_s  # type: ignore[union-attr]
        assert last is not None
        assert (last < OUT[0]) if release == "2.17" else (last > 1400 - 30)
    # the same outage of the only trigger: 2.16 takes the serving Deployment to zero a cooldown into it
    alone = simulate(keda_plan(release="2.16").override({"faults.trigger_outages": [
        {"at_s": OUT[0], "duration_s": OUT[1] - OUT[0], "metrics": ["capsim_gateway_requests_total"]}]}), seed=0)
    ev = alone.scale_events
    down = ev[(ev["by"] == "keda") & (ev["to_replicas"] == 0)]
    assert len(down) == 1 and OUT[0] + 300 - 30 < down["time_s"].iloc[0] <= OUT[0] + 300 + 30


def test_the_hpa_scales_on_the_metrics_that_answer_but_not_down_while_one_fails() -> None:
    r = simulate(two_triggers("2.17"), seed=0)
    syncs = r.timeseries.set_index("time_s")
    # in the outage the HPA reads the requests in flight alone (its first metric, the gateway's, has no value)
    assert syncs["hpa_metric"].loc[OUT[0] + 30:OUT[1] - 30].isna().all()
    ev = r.scale_events
    during = ev[(ev["by"] == "hpa") & ev["time_s"].between(*OUT)]
    assert (during["to_replicas"] >= during["from_replicas"]).all()  # upstream: no scale-down with a metric failing


def test_two_partial_outages_that_overlap_down_every_trigger_where_they_do() -> None:
    """The gateway's source down from 600 to 1500 s, the other trigger's from 900 to 1400 s: every poll in the
    overlap errs and finds nothing active, as in a Prometheus outage (2.16 without a fallback: to zero a cooldown
    after the last active poll); the simulator needs no rule for it, and `capsim simulate` says it."""
    plan = two_triggers("2.16").override({"faults.trigger_outages": [
        {"at_s": OUT[0], "duration_s": OUT[1] - OUT[0], "metrics": ["capsim_gateway_requests_total"]},
        {"at_s": 900, "duration_s": 500, "metrics": ["capsim_requests_in_flight"]}]})
    assert [(o.at_s, o.duration_s) for o in plan.total_trigger_outages()] == [(900, 500)]
    r = simulate(plan, seed=0)
    polls = r.keda_polls
    both = polls[polls["time_s"].between(900, 1400, inclusive="left")]
    assert len(both) >= 16 and both["error"].all() and not both["active"].any()
    one = polls[polls["time_s"].between(OUT[0], 900, inclusive="left")]
    assert one["error"].all() and one["active"].mean() > 0.9  # the other trigger answered until 900 s
    ev = r.scale_events
    down = ev[(ev["by"] == "keda") & (ev["to_replicas"] == 0)]
    assert len(down) == 1 and 900 + 300 - 30 < down["time_s"].iloc[0] <= 900 + 300 + 30


def test_simulate_notes_when_partial_outages_together_down_every_metric(tmp_path: Any) -> None:
    from test_inputs_cli import run
    from test_keda import yaml_of

    path = tmp_path / "overlap.yaml"
    path.write_text(yaml_of(two_triggers("2.16").override({"faults.trigger_outages": [
        {"at_s": OUT[0], "duration_s": OUT[1] - OUT[0], "metrics": ["capsim_gateway_requests_total"]},
        {"at_s": 900, "duration_s": 500, "metrics": ["capsim_requests_in_flight"]}]})))
    code, out, err = run(["simulate", str(path)])
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: ") and "trigger_outages" in line]
    assert len(notes) == 3  # each entry's, and the overlap's
    assert notes[0].startswith("note: capsim_gateway_requests_total failed from 600 to 1500 s")
    assert notes[1].startswith("note: capsim_requests_in_flight failed from 900 to 1400 s")
    assert notes[2] == ("note: every metric failed from 900 to 1400 s (faults.trigger_outages together): KEDA's polls "
                        "(release 2.16) were in error (no fallback) and its HPA read no metric; the Deployment went "
                        "from 2 to 0 pods meanwhile (scale_events.csv)")


def test_a_trigger_outage_names_metrics_of_the_autoscaler() -> None:
    with pytest.raises(SettingsError, match=r"faults.trigger_outages.0.metrics: 'nope' is not a metric of "
                                            r"autoscaler.metrics"):
        keda_plan().override({"faults.trigger_outages": [{"at_s": 10, "duration_s": 5, "metrics": ["nope"]}]})
    with pytest.raises(SettingsError, match=r"faults.trigger_outages.0.metrics"):
        keda_plan().override({"faults.trigger_outages": [{"at_s": 10, "duration_s": 5, "metrics": []}]})


def test_simulate_says_what_the_deployment_did_while_a_triggers_source_was_down(tmp_path: Any) -> None:
    from test_inputs_cli import run
    from test_keda import yaml_of

    path = tmp_path / "partial.yaml"
    for release, noted in (("2.17", "noted as no activity: the cooldown counts from before the outage"),
                           ("2.16", "release 2.16: noted as activity")):
        path.write_text(yaml_of(two_triggers(release)))
        code, out, err = run(["simulate", str(path)])
        assert code == 0, err
        (note,) = [line for line in out.splitlines() if line.startswith("note: capsim_gateway")]
        assert note == (f"note: capsim_gateway_requests_total failed from 600 to 1500 s (faults.trigger_outages): "
                        f"KEDA's polls were in error, active when another trigger was ({noted}), and its HPA scaled "
                        "on the other metrics, never down while one failed; the Deployment went from 2 to 2 pods "
                        "meanwhile (scale_events.csv)")
        assert not [line for line in out.splitlines() if line.startswith("note: Prometheus")]
    # the only trigger's source down: to the autoscalers, as Prometheus down (2.16 without a fallback: to zero)
    path.write_text(yaml_of(keda_plan(release="2.16").override({"faults.trigger_outages": [
        {"at_s": OUT[0], "duration_s": OUT[1] - OUT[0], "metrics": ["capsim_gateway_requests_total"]}]})))
    code, out, err = run(["simulate", str(path)])
    assert code == 0, err
    (note,) = [line for line in out.splitlines() if line.startswith("note: capsim_gateway")]
    assert note.endswith("KEDA's polls (release 2.16) were in error (no fallback) and its HPA read no metric; the "
                         "Deployment went from 2 to 0 pods meanwhile (scale_events.csv)")
    # an HPA without KEDA, one of its two metrics failing
    plain = two_triggers("2.17").override({"autoscaler.keda": None, "autoscaler.minReplicas": 1})
    path.write_text(yaml_of(plain))
    code, out, err = run(["simulate", str(path)])
    assert code == 0, err
    (note,) = [line for line in out.splitlines() if line.startswith("note: capsim_gateway")]
    assert "(faults.trigger_outages): the HPA scaled on the other metrics, and never down while one failed; " in note

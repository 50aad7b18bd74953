"""Outlier ejection (Envoy's passive outlier detection): a pod refusing requests in a row is ejected for a
while, so least outstanding stops sending a crashed pod, still in the endpoints, most of the traffic."""

from __future__ import annotations

from typing import Any

import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.policy.outlier import OutlierDetector, OutlierSettings
from capsim.sim import simulate


def test_ejects_after_the_consecutive_failures_and_a_success_restarts_the_count() -> None:
    d = OutlierDetector(OutlierSettings(consecutive_failures=3, base_ejection_s=30.0))
    assert not d.failed(7, 0.0, 10) and not d.failed(7, 0.1, 10)
    d.succeeded(7)
    assert not d.failed(7, 0.2, 10) and not d.failed(7, 0.3, 10)
    assert d.failed(7, 0.4, 10)
    assert d.ejected_ids == {7: pytest.approx(30.4)} and d.ejections == 1
    assert not d.failed(7, 1.0, 10)  # already out
    assert d.expire(30.3) == [] and d.expire(30.4) == [7] and not d.ejected_ids


def test_the_ejection_grows_with_each_ejection_up_to_the_cap() -> None:
    d = OutlierDetector(OutlierSettings(consecutive_failures=1, base_ejection_s=30.0, max_ejection_s=70.0))
    outs = []
    now = 0.0
    for _ in range(3):
        assert d.failed(1, now, 10)
        outs.append(d.ejected_ids[1] - now)
        now = d.ejected_ids[1]
        d.expire(now)
    assert outs == [30.0, 60.0, 70.0]
    d.succeeded(1)  # healthy again: the multiplier starts over
    assert d.failed(1, now, 10) and d.ejected_ids[1] - now == 30.0


def test_at_most_the_percentage_but_at_least_one_is_ejected() -> None:
    d = OutlierDetector(OutlierSettings(consecutive_failures=1, max_ejection_percent=10.0))
    assert d.max_ejected(4) == 1 and d.max_ejected(25) == 2
    assert d.failed(0, 0.0, 4)
    assert not d.failed(1, 0.0, 4)  # the cap: 10 % of 4 pods, at least one
    assert d.panic(1, 1) and not d.panic(1, 2) and d.panic(2, 3)
    with pytest.raises(ValueError):
        OutlierSettings(consecutive_failures=0)


def crash_run(ejection: dict[str, Any] | None, kind: str = "least_outstanding") -> Any:
    # 4 pods at light load; pod 0 crashes at 20 s and stays in the endpoints for 6 s (1 s until the kubelet
    # sees it, 5 s until the endpoints do): with 0 requests outstanding, least outstanding favours it
    sc = Scenario.model_validate({
        "horizon_s": 60, "warmup_s": 0,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 40}},
        "service": {"kind": "exponential", "mean_s": 0.05},
        "batching": {"max_batch_size": 4, "max_wait_ms": 0},
        "pods": {"replicas": 4, "endpoints_propagation_s": 5.0, "startup_s": 30},
        "router": {"kind": kind, "outlier_ejection": ejection},
        "client": {"timeout_s": 30, "max_retries": 2, "backoff_s": 0.5},
        "faults": {"crashes": [{"at_s": 20.0, "pod": 0}]},
    })
    return simulate(sc, seed=0)


def test_a_crashed_pod_in_the_endpoints_is_ejected_after_five_refusals() -> None:
    window = slice(20.0, 26.0)
    runs = {"none": crash_run(None), "envoy": crash_run({})}
    refused = {}
    for name, r in runs.items():
        df = r.requests
        w = df[(df.arrival_s >= window.start) & (df.arrival_s < window.stop)]
        refused[name] = int((w.attempts > 1).sum()) / len(w)
    # without ejection the dead pod takes its share of every tie and each retry: many requests refused,
    # some three times (failed); with Envoy's defaults it is out after 5 refusals, each retried elsewhere
    assert refused["none"] > 0.3 and runs["none"].summary.failed > 0
    assert runs["envoy"].summary.retries == 5 and runs["envoy"].summary.failed == 0
    assert refused["envoy"] < 0.05


def test_prefix_aware_ejects_the_crashed_pod_too() -> None:
    # no session history here: the queue scorer favours the empty (dead) pod as least outstanding does
    off, on = crash_run(None, "prefix_aware").summary, crash_run({}, "prefix_aware").summary
    assert off.retries > 100 and off.failed > 0
    assert on.retries == 5 and on.failed == 0


def test_the_setting_validates_and_can_be_switched_off() -> None:
    base = {"horizon_s": 10, "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 1}},
            "service": {"kind": "deterministic", "mean_s": 0.1}}
    sc = Scenario.model_validate(base)
    assert sc.router.outlier_ejection is not None
    assert (sc.router.outlier_ejection.consecutive_failures, sc.router.outlier_ejection.base_ejection_s) == (5, 30.0)
    off = sc.override({"router.outlier_ejection": None})
    assert off.router.outlier_ejection is None
    with pytest.raises(SettingsError, match="consecutive_failures"):
        sc.override({"router.outlier_ejection.consecutive_failures": 0})

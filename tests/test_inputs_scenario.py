"""Scenario inputs: strict types, nothing silently ignored, and limits that keep every run bounded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from capsim.model.scenario import Scenario
from capsim.model.scenario_limits import MAX_CRASHES, MAX_REQUESTS, MAX_TIMESERIES_ROWS
from capsim.model.settings import BatchSettings, SettingsError

QUEUE_METRIC = {"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                         "target": {"type": "AverageValue", "averageValue": "500m"}}}


def data(**changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "horizon_s": 100,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 5}},
        "service": {"kind": "exponential", "mean_s": 0.1},
    }
    d.update(changes)
    return d


def refused(message: str, **changes: Any) -> str:
    with pytest.raises(SettingsError) as err:
        Scenario.model_validate(data(**changes))
    assert message in str(err.value), str(err.value)
    return str(err.value)


# ---- strict types ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"workload": {"arrivals": {"kind": "poisson", "rate_per_s": True}}},
         "workload.arrivals.rate_per_s: must be a number, not a boolean"),
        ({"pods": {"replicas": True}}, "pods.replicas: must be a number, not a boolean"),
        ({"pods": {"replicas": "2"}}, "pods.replicas: must be a number, not a string"),
        ({"horizon_s": "100"}, "horizon_s: must be a number, not a string"),
        ({"workload": {"arrivals": {"kind": "poisson", "rate_per_s": 5},
                       "prompt_tokens": {"kind": "constant", "value": "16"}}},
         "workload.prompt_tokens.value: must be a number, not a string"),
        ({"workload": {"arrivals": {"kind": "poisson", "rate_per_s": 5},
                       "output_tokens": {"kind": "constant", "value": True}}},
         "workload.output_tokens.value: must be a number, not a boolean"),
        ({"pods": {"replicas": 2.5}}, "pods.replicas"),
        ({"horizon_s": float("nan")}, "horizon_s: must be a finite number"),
        ({"service": {"kind": "exponential", "mean_s": 0.1, "noise": "yes"}}, "service.noise: must be true or false"),
        ({"batching": {"max_batch_size": "16"}}, "must be a number, not a string (got '16')"),
        ({"workload": {"arrivals": {"kind": "piecewise", "rate_per_s": [[0, True]]}}},
         "workload.arrivals.rate_per_s.0.1: must be a number, not a boolean"),
        ({"workload": {"arrivals": {"kind": "poisson", "rate_per_s": 5},
                       "prompt_tokens": {"kind": "constant", "value": 3_000_000_000}}},
         "workload.prompt_tokens.value must be <= 2147483647"),  # stored as int32
        ({"autoscaler": {"minReplicas": 1, "maxReplicas": 10**9, "metrics": [QUEUE_METRIC]}},
         "autoscaler.maxReplicas must be <= 100000"),  # the spelling the user wrote
    ],
)
def test_a_boolean_or_a_string_is_not_a_number(changes: dict[str, Any], message: str) -> None:
    refused(message, **changes)


def test_strict_types_keep_numpy_numbers_and_kubernetes_quantities() -> None:
    s = Scenario.model_validate(data(pods={"replicas": np.int64(3)}, horizon_s=np.float64(50.0),
                                     autoscaler={"minReplicas": 1, "maxReplicas": 4, "metrics": [QUEUE_METRIC]}))
    assert s.pods.replicas == 3 and type(s.pods.replicas) is int and s.horizon_s == 50.0
    assert s.autoscaler is not None and s.autoscaler.k8s_spec()["metrics"][0]["pods"]["target"]["averageValue"] == "500m"
    assert BatchSettings(max_batch_size=np.int32(8)).max_batch_size == 8
    with pytest.raises(SettingsError, match="batching.max_batch_size must be a number, not a boolean"):
        BatchSettings(max_batch_size=True)


# ---- nothing silently ignored ------------------------------------------------------------------------
def test_a_fault_naming_a_pod_the_scenario_cannot_have() -> None:
    refused("faults.crashes.0.pod must name a pod the scenario can have (the scenario runs pods 0..3), got 4",
            pods={"replicas": 4}, faults={"crashes": [{"at_s": 5, "pod": 4}]})
    ok = Scenario.model_validate(data(pods={"replicas": 4}, faults={"crashes": [{"at_s": 5, "pod": 3}]}))
    assert ok.faults is not None and ok.faults.crashes[0].pod == 3
    # with an autoscaler, pods up to maxReplicas can exist
    Scenario.model_validate(data(pods={"replicas": 1}, faults={"crashes": [{"at_s": 5, "pod": 5}]},
                                 autoscaler={"minReplicas": 1, "maxReplicas": 6, "metrics": [QUEUE_METRIC]}))


def test_an_unknown_key_inside_a_fault() -> None:
    refused("faults.crashes.0.pod_id is not a known setting", faults={"crashes": [{"at_s": 5, "pod_id": 1}]})
    refused("faults.redis_outages.0.length_s is not a known setting",
            faults={"redis_outages": [{"at_s": 5, "length_s": 1}]})


@pytest.mark.parametrize(("changes", "message"), [
    ({"batching": {"max_batch_szie": 8}}, "batching.max_batch_szie is not a known setting (did you mean max_batch_size?)"),
    ({"batching": {"max-wait-ms": 8}}, "batching.max-wait-ms is not a known setting (did you mean max_wait_ms?)"),
    ({"pods": {"startup": 30}}, "pods.startup is not a known setting (did you mean startup_s?)"),
    ({"hpa": {"minReplicas": 2}}, "hpa is not a known setting (did you mean autoscaler?)"),
    ({"autoscaler": {"minReplica": 1, "maxReplicas": 4, "metrics": [QUEUE_METRIC]}},
     "autoscaler.minReplica is not a known setting (did you mean minReplicas?)"),  # the Kubernetes spelling
    ({"workload": {"arrivals": {"kind": "poisson", "rate": 5}}},
     "workload.arrivals.rate is not a known setting (did you mean rate_per_s?)"),  # inside a union's member
    ({"faults": {"crashes": [{"at_s": 5, "podd": 1}]}}, "faults.crashes.0.podd is not a known setting (did you mean pod?)"),
])
def test_an_unknown_key_names_the_known_one_closest_to_it(changes: dict[str, Any], message: str) -> None:
    refused(message, **changes)


def test_an_unknown_key_far_from_any_gets_no_guess() -> None:
    text = refused("pods.zzzz is not a known setting", pods={"zzzz": 1})
    assert "did you mean" not in text
    with pytest.raises(SettingsError, match=r"^batching.max_batch is not a known setting \(did you mean "
                                            r"max_batch_size\?\)$"):
        BatchSettings(max_batch=3)  # the section alone, as the pod reads it from CAPSIM_* variables


def test_a_key_given_twice_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("horizon_s: 100\nworkload:\n  arrivals: {kind: poisson, rate_per_s: 5, rate_per_s: 50}\n"
                    "service: {kind: exponential, mean_s: 0.1}\n")
    with pytest.raises(SettingsError, match=r"twice\.yaml: line 3: key 'rate_per_s' is given twice \(first at line 3\)"):
        Scenario.from_yaml(path)
    path.write_text("horizon_s: 100\nservice: {kind: exponential, mean_s: 0.1}\nhorizon_s: 10\n")
    with pytest.raises(SettingsError, match=r"line 3: key 'horizon_s' is given twice \(first at line 1\)"):
        Scenario.from_yaml(path)


def test_yaml_reads_exponents_as_numbers(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-6 as a string; with strict numbers that would be refused, so capsim reads YAML 1.2 floats
    path = tmp_path / "s.yaml"
    path.write_text("horizon_s: 1e2\nworkload: {arrivals: {kind: poisson, rate_per_s: 5E-1}}\n"
                    "service: {kind: exponential, mean_s: 1e-1}\n")
    s = Scenario.from_yaml(path)
    assert (s.horizon_s, s.service.mean_s) == (100.0, 0.1)


# ---- bounded runs ------------------------------------------------------------------------------------
def test_a_time_series_row_every_nanosecond_is_refused() -> None:
    msg = refused("timeseries_interval_s 1e-09 makes 1e+11 time-series rows", timeseries_interval_s=1e-9)
    assert f"{MAX_TIMESERIES_ROWS:.0e}" in msg and "use at least 0.0001 s" in msg


def test_a_crash_loop_is_refused() -> None:
    msg = refused("faults.pod_mtbf_s 1e-06", pods={"replicas": 2, "startup_s": 0},
                  faults={"pod_mtbf_s": 1e-6})
    assert "crash loop" in msg and f"{MAX_CRASHES:.0e}" in msg
    # a realistic MTBF passes
    Scenario.model_validate(data(faults={"pod_mtbf_s": 7200}, pods={"startup_s": 0}))


def test_hpa_intervals_of_a_microsecond_are_refused() -> None:
    hpa = {"minReplicas": 1, "maxReplicas": 4, "metrics": [QUEUE_METRIC], "sync_period_s": 1e-6,
           "scrape_interval_s": 1e-6}
    msg = refused("autoscaler.sync_period_s 1e-06 makes 1e+08 HPA syncs", autoscaler=hpa)
    assert "autoscaler.scrape_interval_s 1e-06" in msg  # both problems in one message


def test_keda_polling_every_second_for_years_is_refused() -> None:
    gateway = {"type": "External", "external": {"metric": {"name": "capsim_gateway_requests_total"},
                                                "target": {"type": "AverageValue", "averageValue": "1"}}}
    hpa = {"minReplicas": 0, "maxReplicas": 4, "metrics": [gateway], "keda": {"polling_interval_s": 1},
           "sync_period_s": 60, "scrape_interval_s": 60}
    msg = refused("autoscaler.keda.polling_interval_s 1 makes 2e+06 KEDA polls", horizon_s=2e6, autoscaler=hpa,
                  workload={"arrivals": {"kind": "poisson", "rate_per_s": 0.1}}, timeseries_interval_s=60)
    assert "use at least 2 s" in msg


def test_a_time_series_over_many_pods_is_refused() -> None:
    hpa = {"minReplicas": 1, "maxReplicas": 1000, "metrics": [QUEUE_METRIC]}
    msg = refused("visit up to 1000 pods", horizon_s=1e7, autoscaler=hpa,
                  workload={"arrivals": {"kind": "poisson", "rate_per_s": 0.1}})
    assert "timeseries_interval_s 10 and autoscaler.scrape_interval_s 15" in msg
    Scenario.model_validate(data(horizon_s=1e5, autoscaler=hpa))  # a day on a thousand pods is fine


def test_ten_million_seconds_at_40_per_second_is_refused() -> None:
    msg = refused("about 4e+08 requests in horizon_s 1e+07", horizon_s=1e7,
                  workload={"arrivals": {"kind": "poisson", "rate_per_s": 40}})
    assert f"{MAX_REQUESTS:.0e}" in msg
    # the same horizon at a low rate (and a coarse time series) stays allowed
    Scenario.model_validate(data(horizon_s=1e7, workload={"arrivals": {"kind": "poisson", "rate_per_s": 1}}))


def test_piecewise_rates_count_only_their_own_time() -> None:
    steps = [[0, 1], [100, 1e8], [101, 1]]  # one second at a hundred million per second
    refused("about 1e+08 requests", horizon_s=1000, workload={"arrivals": {"kind": "piecewise", "rate_per_s": steps}})
    Scenario.model_validate(data(horizon_s=99, workload={"arrivals": {"kind": "piecewise", "rate_per_s": steps}}))


# ---- paths -----------------------------------------------------------------------------------------
def test_paths_resolve_against_the_scenario_file_not_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "study" / "traces").mkdir(parents=True)
    (tmp_path / "study" / "traces" / "t.csv").write_text("mine")
    (tmp_path / "elsewhere" / "traces").mkdir(parents=True)
    (tmp_path / "elsewhere" / "traces" / "t.csv").write_text("a decoy in the working directory")
    path = tmp_path / "study" / "s.yaml"
    path.write_text("horizon_s: 10\nworkload: {arrivals: {kind: trace, path: traces/t.csv}}\n"
                    "service: {kind: exponential, mean_s: 0.1}\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    s = Scenario.from_yaml(path)
    assert s.workload.arrivals.kind == "trace"
    assert s.resolve(s.workload.arrivals.path).read_text() == "mine"  # type: ignore[union-attr]

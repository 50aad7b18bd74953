"""Invariants of every run: the books balance, the same seed gives the same frames, arrivals are shared."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from capsim.model.request import REQUEST_COLUMNS
from capsim.model.scenario import Scenario
from capsim.sim import Simulation, simulate

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "data" / "scenarios").glob("*.yaml"))
QUEUE_METRIC = {"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                         "target": {"type": "AverageValue", "averageValue": "4"}}}


def busy_scenario(**changes: object) -> Scenario:
    s = Scenario.model_validate({
        "horizon_s": 300,
        "warmup_s": 30,
        "workload": {"arrivals": {"kind": "piecewise", "rate_per_s": [[0, 30], [100, 90], [200, 30]]},
                     "prompt_tokens": {"kind": "lognormal", "mean": 200, "sigma": 0.5, "max": 1000},
                     "output_tokens": {"kind": "lognormal", "mean": 40, "sigma": 0.5, "max": 200}},
        "service": {"kind": "exponential", "mean_s": 0.3},
        "batching": {"max_batch_size": 8, "max_wait_ms": 20, "queue_capacity": 40},
        "pods": {"replicas": 3, "startup_s": 20},
        "autoscaler": {"minReplicas": 2, "maxReplicas": 12, "metrics": [QUEUE_METRIC]},
        "faults": {"pod_mtbf_s": 300, "crashes": [{"at_s": 150, "pods": 1}]},
        "client": {"timeout_s": 1.5, "max_retries": 2, "backoff_s": 0.5},
    })
    return s.override(changes) if changes else s


def test_books_balance_and_frame_has_the_shared_schema() -> None:
    r = simulate(busy_scenario(), seed=0)
    df, s = r.requests, r.summary
    assert list(df.columns) == list(REQUEST_COLUMNS)
    assert s.arrived == len(df) == s.completed + s.failed + s.timed_out + s.rejected + s.in_flight
    assert s.timed_out > 0 and s.rejected > 0 and s.crashes > 0 and s.scale_events > 0  # all paths ran
    assert df["request_id"].is_unique
    ok = df[df["outcome"] == "ok"]
    assert (ok["arrival_s"] <= ok["start_s"]).all()
    assert (ok["start_s"] < ok["first_token_s"]).all() and (ok["first_token_s"] <= ok["end_s"]).all()
    assert ok["batch_size"].between(1, 8).all()
    assert df["attempts"].between(1, 3).all()
    assert df.loc[df["outcome"].isna(), "end_s"].isna().all()
    assert (df["end_s"].dropna() <= 300).all()
    assert r.provenance["seed"] == 0 and r.provenance["capsim_version"]


def test_same_seed_same_frames_different_seed_differs() -> None:
    a = simulate(busy_scenario(), seed=11)
    b = simulate(busy_scenario(), seed=11)
    pd.testing.assert_frame_equal(a.requests, b.requests)
    pd.testing.assert_frame_equal(a.timeseries, b.timeseries)
    assert a.summary == b.summary
    c = simulate(busy_scenario(), seed=12)
    assert not a.requests["arrival_s"].equals(c.requests["arrival_s"])


def test_changing_only_the_hpa_leaves_the_arrival_stream_identical() -> None:
    base = busy_scenario()
    other = base.override({"autoscaler.metrics": [
        {"type": "Pods", "pods": {"metric": {"name": "capsim_requests_in_flight"},
                                  "target": {"type": "AverageValue", "averageValue": "2"}}}],
        "autoscaler.maxReplicas": 30, "autoscaler.sync_period_s": 5})
    a = Simulation(base, seed=4)
    b = Simulation(other, seed=4)
    np.testing.assert_array_equal(a.workload.session_start_s, b.workload.session_start_s)
    np.testing.assert_array_equal(a.workload.prompt_tokens, b.workload.prompt_tokens)
    np.testing.assert_array_equal(a.workload.output_tokens, b.workload.output_tokens)
    ra, rb = a.run(), b.run()
    assert not ra.scale_events.equals(rb.scale_events)  # the change mattered
    first_a = ra.requests.set_index("request_id")["arrival_s"]
    first_b = rb.requests.set_index("request_id")["arrival_s"]
    np.testing.assert_array_equal(first_a.to_numpy(), first_b.to_numpy())


def test_timeseries_rows_and_columns() -> None:
    r = simulate(busy_scenario(), seed=0)
    ts = r.timeseries
    assert len(ts) == 30 and ts["time_s"].iloc[-1] == 300
    assert ts["arrivals"].sum() == r.summary.arrived
    assert (ts["ready_replicas"] >= 0).all() and ts["hpa_metric"].notna().any()
    for col in ("desired_replicas", "starting_replicas", "pending_replicas", "queue_depth", "in_flight",
                "busy_fraction", "arrival_rate_per_s"):
        assert col in ts.columns


SHIPPED = {"crash_study", "friday_rush", "steady_poisson", "trace_replay"}


def test_the_shipped_scenarios_are_all_found() -> None:
    # an empty or moved directory would otherwise parametrize the next test into zero cases, silently
    assert {p.stem for p in SCENARIOS} >= SHIPPED, sorted(p.stem for p in SCENARIOS)


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_shipped_scenarios_run(path: Path) -> None:
    s = Scenario.from_yaml(path)
    short = s.override({"horizon_s": min(s.horizon_s, 240.0), "warmup_s": 20})
    r = simulate(short, seed=0)
    assert r.summary.arrived > 100
    assert r.summary.completed > 0.5 * r.summary.arrived
    assert r.provenance["profile"] is not None


# ---- conservation from the request frame, independently of the simulator's live counters ----


def test_conservation_holds_in_the_frame_and_the_live_series_agree_with_it() -> None:
    """The frame alone: every sent request has exactly one fate, in one consistent shape. Then the time
    series (built from the client's live counters) must agree with the frame row by row: a counter that
    double-counts, or misses, shows up here even with the simulator's own check switched off."""
    r = simulate(busy_scenario(**{"client.max_retries": 0}), seed=3)  # no retries: crashes fail requests
    df, ts = r.requests, r.timeseries
    horizon = 300.0
    outcome = df["outcome"].astype("string")
    fates = outcome.fillna("in_flight").value_counts().to_dict()
    assert set(fates) <= {"ok", "failed", "timed_out", "rejected", "in_flight"}
    assert sum(fates.values()) == len(df) == df["request_id"].nunique()
    for name in ("ok", "failed", "timed_out", "rejected"):
        assert fates.get(name, 0) > 0, f"the busy scenario should exercise {name}"
    # each fate has its own shape
    ok = df[outcome == "ok"]
    assert ok[["start_s", "first_token_s", "end_s"]].notna().all().all()
    finished_badly = df[outcome.isin(["failed", "timed_out", "rejected"]).fillna(False)]
    assert finished_badly["end_s"].notna().all() and (finished_badly["end_s"] >= finished_badly["arrival_s"]).all()
    in_flight = df[outcome.isna()]
    assert in_flight["end_s"].isna().all() and (in_flight["arrival_s"] <= horizon).all()
    assert (df["end_s"].dropna() <= horizon).all()
    # a batch never answers more requests than it held
    per_batch = ok.groupby(["pod", "start_s"])["batch_size"].agg(["size", "min", "max"])
    assert (per_batch["min"] == per_batch["max"]).all() and (per_batch["size"] <= per_batch["max"]).all()
    # the summary is the frame's
    s = r.summary
    assert (s.arrived, s.completed, s.failed, s.timed_out, s.rejected, s.in_flight) == (
        len(df), fates.get("ok", 0), fates.get("failed", 0), fates.get("timed_out", 0),
        fates.get("rejected", 0), fates.get("in_flight", 0))
    # the live counters, sampled every interval, against the frame at each sample time
    arrivals_by = np.searchsorted(np.sort(df["arrival_s"].to_numpy()), ts["time_s"].to_numpy(), side="right")
    np.testing.assert_array_equal(ts["arrivals"].cumsum().to_numpy(), arrivals_by)
    ok_by = np.searchsorted(np.sort(ok["end_s"].to_numpy()), ts["time_s"].to_numpy(), side="right")
    np.testing.assert_array_equal(ts["completed"].cumsum().to_numpy(), ok_by)
    assert ts["errors"].sum() == len(finished_badly)


def test_the_runtime_invariant_check_fires_on_a_double_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from capsim.sim.client import Client
    from capsim.sim.simulate import InvariantError

    real = Client.on_batch_done

    def twice(self: Client, batch: Any, now: float) -> None:
        real(self, batch, now)
        self.n_ok += batch.live_size  # a completion counted twice

    monkeypatch.setattr(Client, "on_batch_done", twice)
    with pytest.raises(InvariantError, match=r"arrived \d+ != completed \d+ \+ failed"):
        simulate(busy_scenario(), seed=0)


def test_the_runtime_check_compares_the_records_with_the_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    from capsim.sim.recorder import PENDING, Records
    from capsim.sim.simulate import InvariantError

    real = Records.finish

    def forgetful(self: Records, i: int, t: float, outcome: int, pod: int) -> None:
        real(self, i, t, outcome, pod)
        self.outcome[i] = PENDING  # the counters balance, but the records lose the request's fate

    monkeypatch.setattr(Records, "finish", forgetful)
    with pytest.raises(InvariantError, match="records say"):
        simulate(busy_scenario(), seed=0)


def test_young_collections_are_spaced_while_runs_last_and_given_back_after() -> None:
    import gc
    import threading

    from capsim.sim.simulate import young_collections_spaced

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with young_collections_spaced(50_000):
            assert gc.get_threshold() == (50_000, 10, 10)
            inner_done = threading.Event()

            def other_run() -> None:  # a second run in another thread (a Dask worker's) ends first
                with young_collections_spaced(50_000):
                    assert gc.get_threshold() == (50_000, 10, 10)
                inner_done.set()

            t = threading.Thread(target=other_run)
            t.start()
            t.join(10)
            assert inner_done.is_set()
            assert gc.get_threshold() == (50_000, 10, 10)  # still inside the first run
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(0)  # automatic collection off stays off
        with young_collections_spaced():
            assert gc.get_threshold()[0] == 0
        assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)

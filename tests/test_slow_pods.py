"""``faults.slow_pods``: pods that run slow and stay ready (a gray failure), one pod or the whole fleet."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "data" / "scenarios"


def static(**over: Any) -> Scenario:
    sc = Scenario.model_validate({
        "horizon_s": 200,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 3}},
        "service": {"kind": "deterministic", "mean_s": 1.0},
        "batching": {"max_batch_size": 8, "max_wait_ms": 10},
        "pods": {"replicas": 2},
        "router": {"kind": "round_robin"},
        "client": {"timeout_s": 60, "max_retries": 0},
    })
    return sc.override(over) if over else sc


def continuous(**over: Any) -> Scenario:
    sc = Scenario.model_validate({
        "horizon_s": 2000,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 0.01},
                     "prompt_tokens": {"kind": "constant", "value": 100},
                     "output_tokens": {"kind": "constant", "value": 1000}},
        "service": {"kind": "deterministic", "mean_s": 0.01},
        "batching": {"mode": "continuous", "num_blocks": 1000, "max_num_seqs": 16, "max_num_batched_tokens": 512},
        "pods": {"replicas": 1},
        "client": {"timeout_s": 60, "max_retries": 0},
    })
    return sc.override(over) if over else sc


def batch_s(r: Any, pod: int) -> pd.DataFrame:
    req = r.requests
    ok = req[(req["pod"] == pod) & (req["outcome"] == "ok")]
    return ok.assign(took=ok["end_s"] - ok["start_s"])


def test_a_slow_pods_batches_take_factor_times_as_long_during_its_spell() -> None:
    r = simulate(static(**{"faults": {"slow_pods": [{"at_s": 50, "duration_s": 50, "factor": 2.5, "pod": 0}]}}), 1)
    b = batch_s(r, 0)
    during = b[(b["start_s"] >= 50) & (b["start_s"] < 100)]
    outside = b[(b["start_s"] < 50 - 1) | (b["start_s"] >= 100 + 2.5)]
    assert len(during) > 20 and len(outside) > 20
    assert np.allclose(during["took"], 2.5) and np.allclose(outside["took"], 1.0)
    # a batch already on the model at 50 s keeps its end
    assert np.allclose(b.loc[(b["start_s"] > 49) & (b["start_s"] < 50), "took"], 1.0)
    assert np.allclose(batch_s(r, 1)["took"], 1.0)  # the other pod runs at full speed
    assert r.slowdowns.to_dict("records") == [{"start_s": 50.0, "end_s": 100.0, "pod": 0, "factor": 2.5}]
    assert r.skipped_slowdowns.empty
    assert r.summary.error_rate == 0  # slow, not failing: its probes pass and it keeps serving


def test_slowdowns_that_overlap_on_a_pod_multiply_and_a_restart_keeps_them() -> None:
    sc = static(**{"faults": {"slow_pods": [{"at_s": 40, "factor": 2.0, "pod": 0},
                                            {"at_s": 80, "duration_s": 40, "factor": 1.5, "pod": 0}],
                              "crashes": [{"at_s": 130, "pod": 0}]},
                   "pods.startup_s": 5, "client.max_retries": 2})
    r = simulate(sc, 2)
    b = batch_s(r, 0)
    assert np.allclose(b.loc[(b["start_s"] >= 40) & (b["start_s"] < 80), "took"], 2.0)
    assert np.allclose(b.loc[(b["start_s"] >= 80) & (b["start_s"] < 120), "took"], 3.0)
    after = b[b["start_s"] >= 130]  # the kubelet restarted its container: same pod, same GPU, still slow
    assert len(after) > 5 and np.allclose(after["took"], 2.0)
    assert len(r.crashes) == 1


def test_a_slowdown_of_the_whole_fleet_from_the_start_is_service_slowdown() -> None:
    # every pod, those the HPA adds and the ReplicaSet's replacements too, at a factor from time 0: the same
    # run as the margin on the service (arrival_overhead_ms is the pod's HTTP work, which slow_pods leaves)
    hpa = {"minReplicas": 1, "maxReplicas": 6, "sync_period_s": 5, "scrape_interval_s": 5,
           "metrics": [{"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                                 "target": {"type": "AverageValue", "averageValue": "2"}}}]}
    for base in [
        Scenario.from_yaml(SCENARIOS / "steady_poisson.yaml").override(
            {"horizon_s": 120, "warmup_s": 10, "service.request_overhead_ms": 1.5}),
        Scenario.from_yaml(SCENARIOS / "agent_sessions.yaml").override(  # continuous, and a crash
            {"horizon_s": 240, "warmup_s": 10, "service.cached_token_us": 0.8, "faults.crashes": [{"at_s": 120,
                                                                                                   "pod": 1}]}),
        static(**{"pods.replicas": 1, "autoscaler": hpa, "workload.arrivals.rate_per_s": 12}),
    ]:
        faults = base.faults.model_dump() if base.faults is not None else {}
        slowed = base.override({"faults": {**faults, "slow_pods": [{"at_s": 0, "factor": 1.3, "pods": "all"}]}})
        a, b = simulate(slowed, seed=3), simulate(base.override({"service.slowdown": 1.3}), seed=3)
        pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=False, rtol=1e-9)
        assert a.slowdowns["pod"].tolist() == [-1]
        plain = simulate(base, seed=3)
        assert a.summary.ttft_p50_s > plain.summary.ttft_p50_s  # not a no-op
    assert len(a.scale_events) and a.summary.max_replicas > 1  # pods the HPA added ran slow too


def test_a_continuous_pods_run_of_decode_steps_is_cut_where_the_slowdown_begins() -> None:
    sc = continuous()
    lone = simulate(sc, 3).requests
    lone = lone[lone["outcome"] == "ok"]
    t0 = float(lone["arrival_s"].iloc[2])
    # 10 ms steps, 1,000 of them: 501 steps done by t0 + 5.01, then 499 at twice as long
    r = simulate(sc.override({"faults": {"slow_pods": [{"at_s": t0 + 5.005, "factor": 2, "pod": 0}]}}), 3)
    req = r.requests.set_index("request_id")
    rid = int(lone["request_id"].iloc[2])
    assert req.loc[rid, "end_s"] - t0 == pytest.approx(5.01 + 499 * 0.02)
    assert req.loc[rid, "first_token_s"] - t0 == pytest.approx(0.01)
    # and back to full speed where the spell ends: slow steps start until 7.005 s, the last ends at 7.01
    r = simulate(sc.override({"faults": {"slow_pods": [{"at_s": t0 + 5.005, "duration_s": 2.0, "factor": 2,
                                                        "pod": 0}]}}), 3)
    req = r.requests.set_index("request_id")
    assert req.loc[rid, "end_s"] - t0 == pytest.approx(7.01 + 399 * 0.01)
    earlier = int(lone["request_id"].iloc[1])  # one that ended before: untouched
    assert req.loc[earlier, "end_s"] == pytest.approx(lone.set_index("request_id").loc[earlier, "end_s"])


def test_least_outstanding_routes_around_a_slow_pod_where_round_robin_does_not() -> None:
    sc = Scenario.from_yaml(SCENARIOS / "steady_poisson.yaml").override(
        {"horizon_s": 600, "warmup_s": 60, "faults": {"slow_pods": [{"at_s": 100, "factor": 3, "pod": 0}]}})
    share, p99 = {}, {}
    for kind in ("round_robin", "least_outstanding"):
        r = simulate(sc.override({"router.kind": kind}), 4)
        later = r.requests[r.requests["arrival_s"] > 100]
        share[kind] = float((later["pod"] == 0).mean())
        p99[kind] = r.summary.ttft_p99_s
    assert share["round_robin"] == pytest.approx(0.25, abs=0.01)  # its turn comes whatever its queue
    assert share["least_outstanding"] < 0.2
    assert p99["least_outstanding"] < p99["round_robin"]


def test_unnamed_slowdowns_draw_ready_pods_and_report_what_they_could_not_slow() -> None:
    sc = static(**{"pods.replicas": 4, "faults": {"slow_pods": [{"at_s": 20, "factor": 2, "pods": 2},
                                                                {"at_s": 30, "factor": 2, "pods": 9}]}})
    a, b = simulate(sc, 5), simulate(sc, 5)
    first = a.slowdowns[a.slowdowns["start_s"] == 20]
    assert len(first) == 2 and first["pod"].nunique() == 2
    assert a.slowdowns.equals(b.slowdowns)  # the slow_pods stream: the same seed slows the same pods
    assert a.skipped_slowdowns.to_dict("records") == [{"time_s": 30.0, "pod": -1, "why": "9 pods asked, 4 ready: those slowed"}]


def test_a_named_pod_not_there_yet_is_reported_not_dropped() -> None:
    sc = static(**{"autoscaler": {"minReplicas": 2, "maxReplicas": 6,
                                  "metrics": [{"type": "Pods", "pods": {"metric": {"name": "capsim_queue_depth"},
                                                                        "target": {"type": "AverageValue",
                                                                                   "averageValue": "50"}}}]},
                   "faults": {"slow_pods": [{"at_s": 10, "factor": 2, "pod": 5}]}})
    r = simulate(sc, 1)
    assert r.slowdowns.empty
    assert r.skipped_slowdowns.to_dict("records") == [{"time_s": 10.0, "pod": 5, "why": "pod 5 not created (yet): nothing slowed"}]


@pytest.mark.parametrize("entry, message", [
    ({"at_s": 1, "factor": 0.5}, "faults.slow_pods.0.factor: must be at least 1: it multiplies the batch and "
                                 "step times (half speed is 2)"),
    ({"at_s": 1, "factor": 2, "pods": 0}, "pods must be at least 1 or 'all'"),
    ({"at_s": 1, "factor": 2, "pods": "all", "pod": 1}, "pods: all slows every pod"),
    ({"at_s": 1, "factor": 2, "pod": 7}, "faults.slow_pods.0.pod must name a pod the scenario can have"),
    ({"at_s": 1, "factor": 2, "duration_s": 0}, "faults.slow_pods.0.duration_s"),
    ({"at_s": 1, "factor": 2, "speed": 0.5}, "faults.slow_pods.0.speed"),
])
def test_bad_slowdowns_name_their_field(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        static(**{"faults": {"slow_pods": [entry]}})


def test_capsim_simulate_says_what_the_slow_pod_did_and_writes_slowdowns_csv(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from capsim.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "simulate", str(SCENARIOS / "steady_poisson.yaml"), "--out", str(out), "--set", "horizon_s=400",
        "--set", "router.kind=round_robin",
        "--set", "faults={slow_pods: [{at_s: 100, factor: 3, pod: 0}, {at_s: 200, factor: 2, pods: 9}]}"])
    assert res.exit_code == 0, res.output
    assert "note: pod 0 ran 3x slow from 100 s to the end, ready throughout; of the requests sent then" in res.output
    assert "it took 25% (last attempts)" in res.output  # round robin: its turn, whatever its queue
    assert "note: the slowdown scheduled at 200 s: 9 pods asked, 4 ready: those slowed" in res.output
    frame = pd.read_csv(out / "slowdowns.csv")
    assert frame.columns.tolist() == ["start_s", "end_s", "pod", "factor"]
    assert len(frame) == 5 and frame["end_s"].tolist() == [float("inf")] * 5


def test_a_fleet_spell_that_begins_with_no_pod_still_ends() -> None:
    from capsim.sim.simulate import Simulation

    # KEDA has the Deployment at zero from about 1,600 s to the wake at 4,800 s: the spell finds no pod
    sc = Scenario.from_yaml(SCENARIOS / "scale_to_zero.yaml").override(
        {"horizon_s": 6000, "faults": {"slow_pods": [{"at_s": 2000, "duration_s": 600, "factor": 3, "pods": "all"}]}})
    sim = Simulation(sc, 0)
    r = sim.run()
    assert r.slowdowns.to_dict("records") == [{"start_s": 2000.0, "end_s": 2600.0, "pod": -1, "factor": 3.0}]
    woke = [p for p in sim.cluster.pods if p.created_s > 2600]
    assert woke and all(p.slow == 1.0 for p in sim.cluster.pods)  # the pods of the wake run at full speed
    plain = simulate(sc.override({"faults": None}), 0)
    pd.testing.assert_frame_equal(r.requests, plain.requests)  # nothing ran during the spell


# ---- faults.random_slowdowns ---------------------------------------------------------------------------------
def test_random_spells_slow_a_third_of_the_pod_time_when_a_spell_lasts_half_the_time_between() -> None:
    # each pod alternates an exponential wait of mean 100 s and a 50-s spell: slow 50 / 150 of the time
    horizon = 20_000.0
    sc = static(**{"horizon_s": horizon, "pods.replicas": 4, "workload.arrivals.rate_per_s": 0.5,
                   "faults": {"random_slowdowns": {"mtbf_s": 100, "duration_s": 50, "factor": 2}}})
    r = simulate(sc, 3)
    spells = r.slowdowns
    assert set(spells["pod"]) == {0, 1, 2, 3} and (spells["factor"] == 2).all()
    assert np.allclose(spells["end_s"] - spells["start_s"], 50.0)
    slowed = float((spells["end_s"].clip(upper=horizon) - spells["start_s"]).sum()) / (4 * horizon)
    assert slowed == pytest.approx(1 / 3, abs=0.04)  # the renewal process's share (about 530 spells)
    # and every batch took what its pod's speed was when it started
    for pod in range(4):
        b = batch_s(r, pod)
        mine = spells[spells["pod"] == pod]
        starts = b["start_s"].to_numpy()
        inside = np.zeros(len(b), dtype=bool)
        for row in mine.itertuples():
            inside |= (starts >= row.start_s) & (starts < row.end_s)
        assert np.allclose(b["took"].to_numpy()[inside], 2.0) and np.allclose(b["took"].to_numpy()[~inside], 1.0)
    again = simulate(sc, 3)
    assert again.slowdowns.equals(spells)  # the slow_spells stream: the same seed, the same spells


def test_random_spells_leave_the_scheduled_slowdowns_draws_alone() -> None:
    scheduled = {"slow_pods": [{"at_s": 30, "factor": 3, "pods": 2}]}
    alone = simulate(static(**{"pods.replicas": 5, "faults": scheduled}), 4).slowdowns
    both = simulate(static(**{"pods.replicas": 5, "faults": {**scheduled, "random_slowdowns": {"mtbf_s": 60}}}),
                    4).slowdowns
    assert both[both["factor"] == 3].reset_index(drop=True).equals(alone)  # other streams
    assert (both["factor"] == 2).any()
    with pytest.raises(SettingsError, match=re.escape("faults.random_slowdowns.factor: must be at least 1")):
        static(**{"faults": {"random_slowdowns": {"mtbf_s": 60, "factor": 0.5}}})


def test_capsim_simulate_sums_many_spells_up_in_one_note() -> None:
    from typer.testing import CliRunner

    from capsim.cli import app

    res = CliRunner().invoke(app, [
        "simulate", str(SCENARIOS / "steady_poisson.yaml"), "--set", "horizon_s=1200", "--set",
        "faults={random_slowdowns: {mtbf_s: 300, duration_s: 100, factor: 3}}"])
    assert res.exit_code == 0, res.output
    (note,) = [ln for ln in res.output.splitlines() if "slow spells on" in ln]
    assert note.startswith("note: ") and "on 4 pods" in note and "of the requests answered started in one" in note


def test_the_simulator_gives_the_slowed_pod_the_share_the_real_drill_measured() -> None:
    # tests/test_engine_slowdown.py's drill, simulated: two pods of the tiny CPU model (its profile), the second
    # 5x slow, six closed-loop sessions of 10 turns (16 prompt tokens, 48 new); the real router gave the slow
    # pod 50% under round robin and 15 to 25% under least outstanding (docs/pod.md)
    base = Scenario.model_validate({
        "horizon_s": 60,
        "workload": {"arrivals": {"kind": "piecewise", "rate_per_s": [[0, 600], [0.01, 0]]},
                     "prompt_tokens": {"kind": "constant", "value": 16},
                     "output_tokens": {"kind": "constant", "value": 48},
                     "sessions": {"turns": 10, "think_time_s": 0}},
        "service": {"kind": "profile", "profile": str(ROOT / "data" / "profiles" / "cpu-tiny-float32.csv"),
                    "extrapolate": True},
        "batching": {"max_batch_size": 32, "max_wait_ms": 0},
        "pods": {"replicas": 2},
        "faults": {"slow_pods": [{"at_s": 0, "factor": 5, "pod": 1}]},
        "client": {"timeout_s": 60, "max_retries": 0},
    })
    share = {}
    for kind in ("round_robin", "least_outstanding"):
        ok = simulate(base.override({"router.kind": kind}), 1).requests  # seed 1: six sessions, as the drill
        ok = ok[ok["outcome"] == "ok"]
        assert ok["session_id"].nunique() == 6 and len(ok) == 60
        share[kind] = float((ok["pod"] == 1).mean())
    assert share["round_robin"] == 0.5
    assert 0.15 <= share["least_outstanding"] <= 0.25  # 0.20 here

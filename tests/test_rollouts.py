"""Rolling updates (``pods.rollouts``, ``pods.rolling_update``): the Deployment controller's rules
(``capsim.policy.rollout``, checked against upstream's own test tables) and what a rollout does to a run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from capsim.cli import app
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.policy.rollout import (
    Recreate,
    ReplicaSetState,
    RollingUpdate,
    new_rs_new_replicas,
    progressing,
    resolve_fenceposts,
    rollout_recreate,
    rollout_rolling,
    scale,
    sync,
)
from capsim.sim.simulate import simulate

SCENARIOS = Path(__file__).resolve().parent.parent / "data" / "scenarios"


# ---- the rules, against upstream's tables (pkg/controller/deployment/rolling_test.go, sync_test.go) ----------
@pytest.mark.parametrize(("replicas", "surge", "old", "new", "expected"), [
    (10, 0, 10, 0, 0),  # should not scale up
    (10, 2, 10, 0, 2),
    (10, 2, 5, 0, 7),
    (10, 2, 10, 2, 2),
    (10, 2, 2, 11, 10),  # should scale down
])
def test_the_new_replicaset_grows_within_the_surge(replicas, surge, old, new, expected) -> None:
    # TestDeploymentController_reconcileNewReplicaSet (maxUnavailable 0)
    st = RollingUpdate(surge, 0)
    rss = [ReplicaSetState(0, old, old, replicas), ReplicaSetState(1, new, new, replicas)]
    assert rollout_rolling(rss, replicas, st)[-1].replicas == expected
    if new <= replicas:
        assert new_rs_new_replicas(rss, replicas, st) == max(expected, new)


@pytest.mark.parametrize(("unavailable", "old", "new", "ready_old", "ready_new", "expected_old"), [
    (0, 10, 0, 10, 0, 9),
    (2, 10, 0, 10, 0, 8),
    (2, 10, 0, 8, 0, 8),  # the unhealthy old pods are cleaned up first
    (2, 10, 0, 9, 0, 8),  # one unhealthy cleaned up, one ready scaled down
    (2, 8, 2, 8, 0, 8),  # the new ReplicaSet's unavailable pods keep the old from going further
])
def test_the_old_replicasets_shrink_within_the_unavailability(unavailable, old, new, ready_old, ready_new,
                                                              expected_old) -> None:
    # TestDeploymentController_reconcileOldReplicaSets (10 replicas, maxSurge 0); the new ReplicaSet is not
    # scaled first: it already holds what the surge allows, or (the last row) the rule's new-ReplicaSet step is
    # at its size
    st = RollingUpdate(0, unavailable)
    rss = [ReplicaSetState(0, old, ready_old, 10), ReplicaSetState(1, new, ready_new, 10)]
    if new + old < 10:
        pytest.skip("the new ReplicaSet would grow first")
    out = rollout_rolling(rss, 10, st)
    assert out[-1].replicas == new and out[0].replicas == expected_old


@pytest.mark.parametrize(("name", "was", "now", "surge_was", "surge_now", "sizes", "expected"), [
    ("normal scaling event: 10 -> 12", 10, 12, 0, 0, [10], [12]),
    ("normal scaling event: 10 -> 5", 10, 5, 0, 0, [10], [5]),
    ("proportional scaling: 5 -> 10", 5, 10, 0, 0, [3, 2], [6, 4]),
    ("proportional scaling: 5 -> 3", 5, 3, 0, 0, [3, 2], [2, 1]),
    ("proportional scaling: 9 -> 4", 9, 4, 0, 0, [1, 8], [0, 4]),
    ("proportional scaling: 7 -> 10", 7, 10, 0, 0, [2, 3, 2], [3, 4, 3]),
    ("proportional scaling: 13 -> 8", 13, 8, 0, 0, [3, 8, 2], [2, 5, 1]),
    ("leftover distribution: 3 -> 4", 3, 4, 0, 0, [1, 1, 1], [1, 1, 2]),
    ("leftover distribution: 3 -> 2", 3, 2, 0, 0, [1, 1, 1], [0, 1, 1]),
    ("proportional scaling: 6 -> 0", 6, 0, 0, 0, [1, 2, 3], [0, 0, 0]),
    ("proportional scaling: 0 -> 6", 6, 6, 0, 0, [0, 0, 0], [0, 0, 6]),
    ("deployment with surge pods", 10, 20, 2, 2, [6, 6], [11, 11]),
    ("change both surge and size", 10, 50, 3, 6, [8, 5], [34, 22]),
])
def test_a_scaling_event_mid_rollout_is_shared_out_in_proportion(name, was, now, surge_was, surge_now, sizes,
                                                                 expected) -> None:
    # TestScale: the ReplicaSets oldest first; each annotated with the Deployment it was last scaled for
    before = RollingUpdate(surge_was, 0)
    rss = [ReplicaSetState(k, n, n, was, was + before.surge(was)) for k, n in enumerate(sizes)]
    out = scale(rss, now, RollingUpdate(surge_now, 0))
    assert [rs.replicas for rs in out] == expected, name
    # and sync takes it for a scaling event (the annotations differ) unless nothing changed size
    if was != now:
        assert [rs.replicas for rs in sync(rss, now, RollingUpdate(surge_now, 0))] == expected


def test_a_saturated_but_broken_new_replicaset_leaves_the_old_pods() -> None:
    st = RollingUpdate(1, 1)
    rss = [ReplicaSetState(0, 1, 1, 2, 3), ReplicaSetState(1, 2, 0, 2, 3)]
    assert [rs.replicas for rs in scale(rss, 2, st)] == [1, 2]


def test_percentages_round_the_surge_up_and_the_unavailable_down() -> None:
    assert resolve_fenceposts("25%", "25%", 4) == (1, 1)
    assert resolve_fenceposts("25%", "25%", 10) == (3, 2)
    assert resolve_fenceposts("25%", "25%", 3) == (1, 0)
    assert resolve_fenceposts(0, 0, 10) == (0, 1)  # never both 0: the rollout could not move
    assert RollingUpdate("25%", "100%").unavailable(0) == 0


# ---- in a run --------------------------------------------------------------------------------------------
def _fleet(**extra) -> Scenario:
    """Four warm pods, no autoscaler, a steady load they carry, pods ready 60 s after they start."""
    base = {"horizon_s": 900, "warmup_s": 10, "pods.replicas": 4, "pods.startup_s": 60,
            "pods.rollouts": [{"at_s": 200}]}
    return Scenario.from_yaml(SCENARIOS / "steady_poisson.yaml").override({**base, **extra})


def test_a_rollout_replaces_every_pod_within_its_surge_and_unavailability() -> None:
    r = simulate(_fleet(), 0)
    (ro,) = r.rollouts.to_dict("records")
    # 25% of 4: one over, one under. First the new ReplicaSet takes one and the old gives one up (3 ready);
    # the next sync adds a second new pod (5 in the ReplicaSets); when both are ready, 60 s later, the old
    # gives two and the new takes the last two; 60 s after, the last old pod goes: two waves of 60 s
    assert ro["done_s"] == pytest.approx(200 + 2 * 60)
    assert ro["min_ready"] == 3 and ro["pods"] == 4
    ts = r.timeseries
    during = ts[(ts.time_s > 200) & (ts.time_s < ro["done_s"])]
    assert during.ready_replicas.min() >= 3
    assert (during.ready_replicas + during.starting_replicas + during.pending_replicas).max() <= 5
    # four pods more were made (ids 4 to 7), all of which served, and the load was carried throughout
    served = set(r.requests.pod[r.requests.pod >= 0].unique())
    assert served == set(range(8)) and r.summary.error_rate == 0.0
    late = r.requests[r.requests.arrival_s > ro["done_s"] + 30]
    assert set(late.pod.unique()) == {4, 5, 6, 7}  # after it, only the new template's pods
    # the summary has them too (so do sweeps and tunes), and a run without a rollout has none
    s = r.summary
    assert (s.longest_rollout_s, s.rollouts_unfinished, s.rollout_fewest_ready) == (120.0, 0, 3.0)
    plain = simulate(_fleet(**{"pods.rollouts": []}), 0).summary
    assert math.isnan(plain.longest_rollout_s) and plain.rollouts_unfinished == 0 and math.isnan(plain.rollout_fewest_ready)
    # the same seed, the same run
    again = simulate(_fleet(), 0)
    assert again.rollouts.equals(r.rollouts) and again.requests.equals(r.requests)


def test_min_ready_seconds_hold_each_wave_until_its_pods_have_been_ready_that_long() -> None:
    # pods.min_ready_s (minReadySeconds): a new pod counts as available 30 s after it is ready, so each of the two
    # waves takes 60 + 30 s; the controller's ticker sees it within its second
    ro = simulate(_fleet(**{"pods.min_ready_s": 30}), 0).rollouts.iloc[0]
    assert 200 + 2 * 90 <= ro.done_s <= 200 + 2 * 90 + 2
    # the warm pods of time 0 count as available from the start: a rollout at 5 s moves at once
    early = simulate(_fleet(**{"pods.min_ready_s": 30, "pods.rollouts": [{"at_s": 5}]}), 0).rollouts.iloc[0]
    assert early.min_ready == 3 and 5 + 2 * 90 <= early.done_s <= 5 + 2 * 90 + 2


def test_surge_only_never_drops_a_ready_pod_and_unavailable_only_never_adds_one() -> None:
    cluster = {"max_gpus": 8, "node_gpus": 4, "node_provision_s": 240}
    surge = simulate(_fleet(autoscaler=None, cluster=cluster, **{"pods.rolling_update": {
        "max_surge": 1, "max_unavailable": 0}}), 0).rollouts.iloc[0]
    assert surge.min_ready == 4  # never under the replicas
    # the surge pod waits for a node (240 s), then each of the four waves takes 60 s
    assert surge.done_s == pytest.approx(200 + 240 + 4 * 60)
    down = simulate(_fleet(autoscaler=None, cluster=cluster, **{"pods.rolling_update": {
        "max_surge": 0, "max_unavailable": 1}}), 0).rollouts.iloc[0]
    assert down.min_ready == 3 and down.most_pods <= 5  # four, and the one draining as its successor starts
    assert 200 + 4 * 60 <= down.done_s < 200 + 4 * 60 + 5  # each new pod waits for its predecessor's GPU


def test_a_surge_with_no_gpu_to_take_stalls_the_rollout_and_the_cli_says_so(tmp_path: Path) -> None:
    full = {"autoscaler": None, "cluster": {"max_gpus": 4, "node_gpus": 4, "node_provision_s": 240},
            "pods.rolling_update": {"max_surge": 1, "max_unavailable": 0}}
    stalled = simulate(_fleet(**full), 0)
    ro = stalled.rollouts.iloc[0]
    assert math.isnan(ro.done_s) and ro.min_ready == 4 and ro.most_pods == 5  # the fifth Pending for good
    assert stalled.summary.rollouts_unfinished == 1 and stalled.summary.longest_rollout_s == 900 - 200  # to the end
    res = CliRunner().invoke(app, ["simulate", str(SCENARIOS / "steady_poisson.yaml"), "--set", "horizon_s=900",
                                   "--set", "pods.replicas=4", "--set", "pods.rollouts=[{at_s: 200}]",
                                   "--set", "autoscaler=null", "--set",
                                   "cluster={max_gpus: 4, node_gpus: 4, node_provision_s: 240}",
                                   "--set", "pods.rolling_update={max_surge: 1, max_unavailable: 0}",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    import pandas as pd

    written = pd.read_csv(tmp_path / "run" / "rollouts.csv")  # one row: begun at 200 s, never done
    assert list(written.columns) == ["at_s", "revision", "pods", "done_s", "min_ready", "most_pods",
                                     "deadline_exceeded_s", "undo", "undone_s", "undo_refused_s", "canary_checked_s",
                                     "canary_failed", "canary_ttft_p99_s", "baseline_ttft_p99_s",
                                     "canary_itl_mean_s", "baseline_itl_mean_s", "canary_error_rate",
                                     "baseline_error_rate", "canary_measurements", "canary_failures",
                                     "canary_failed_by"]
    assert written.canary_failed_by.isna().all()  # nothing undid it (an empty string in the file)
    assert written.drop(columns=["done_s", "undo", "undone_s", "undo_refused_s", "canary_checked_s", "canary_failed",
                                 "canary_ttft_p99_s", "baseline_ttft_p99_s", "canary_itl_mean_s",
                                 "baseline_itl_mean_s", "canary_error_rate",
                                 "baseline_error_rate", "canary_failed_by"]).values.tolist() == [
        [200.0, 1.0, 4.0, 4.0, 5.0, 800.0, 0, 0]]
    assert written.done_s.isna().all() and written.undone_s.isna().all() and not written.undo.any()
    assert written.undo_refused_s.isna().all()
    # no progress after its first step at 200 s: Kubernetes' 600-s progress deadline passes at 800 s
    assert "reports it stalled (ProgressDeadlineExceeded, 600 s without progress" in res.output
    assert "at 800 s (rollouts.csv)" in res.output
    assert ("note: the rollout at 200 s (maxSurge 1, maxUnavailable 0, 4 pods then) was not done by the end of "
            "the run, 700 s after it began") in res.output


def test_a_rollout_mid_rush_under_the_hpa_finishes_on_the_new_template() -> None:
    rush = Scenario.from_yaml(SCENARIOS / "friday_rush.yaml").override({"pods.rollouts": [{"at_s": 2000}]})
    r = simulate(rush, 0)
    ro = r.rollouts.iloc[0]
    # 8 pods when it began, the HPA scaling meanwhile; every pod on the new template before the rush ends
    assert ro.pods >= 8 and 2000 < ro.done_s < 2700 and ro.most_pods > ro.pods
    assert r.summary.error_rate < 0.001
    plain = simulate(Scenario.from_yaml(SCENARIOS / "friday_rush.yaml"), 0)
    assert plain.rollouts.empty and r.summary.ttft_p99_s > plain.summary.ttft_p99_s  # the rollout costs the tail


@pytest.mark.parametrize(("setting", "match"), [
    ({"max_surge": "abc"}, "pods.rolling_update.max_surge"),
    ({"max_surge": -1}, "max_surge must be at least 0"),
    ({"max_surge": 0, "max_unavailable": "0%"}, "max_unavailable may not be 0 when max_surge is 0"),
    ({"max_unavailable": "150%"}, "over 100%"),
])
def test_a_bad_strategy_is_refused_naming_the_field(setting, match) -> None:
    with pytest.raises(SettingsError, match=match):
        _fleet(**{"pods.rolling_update": setting})


def test_capsim_check_warns_of_a_rollout_with_no_room_to_surge() -> None:
    from capsim.studies.checks import run_checks

    full = _fleet(autoscaler=None, cluster={"max_gpus": 4, "node_gpus": 4, "node_provision_s": 240},
                  **{"pods.rolling_update": {"max_surge": 1, "max_unavailable": 0}})
    (f,) = [f for f in run_checks(full) if f.check == "rollout-no-room"]
    assert f.level == "warn" and f.path == "pods.rolling_update.max_unavailable" and "never ends" in f.message
    # the run agrees: the stalled rollout above; room for one more pod, or a pod allowed down, and it is quiet
    for ok in (full.override({"cluster.max_gpus": 8}),
               full.override({"pods.rolling_update": {"max_surge": 1, "max_unavailable": 1}}),
               full.override({"pods.rollouts": []})):
        assert not [f for f in run_checks(ok) if f.check == "rollout-no-room"]
    # the shipped plan surges onto a node of its own at six pods, but its HPA may run 32, all its GPUs: a deploy
    # then would stall, and the check says so
    (f,) = [f for f in run_checks(Scenario.from_yaml(SCENARIOS / "rollout_rush.yaml")) if f.check == "rollout-no-room"]
    assert "at the plan's most, 32 pods, and the cluster holds 32" in f.message


def test_the_shipped_grid_and_space_apply_to_the_rollout_scenario() -> None:
    from capsim.studies.space import load_space
    from capsim.studies.sweep import expand_grid, load_grid

    root = SCENARIOS.parent / "studies"
    base = Scenario.from_yaml(SCENARIOS / "rollout_rush.yaml")
    settings = expand_grid(load_grid(root / "rollout_grid.yaml"))
    assert len(settings) == 10
    plans = [base.override(st.changes) for st in settings]
    seen = {(p.pods.strategy, p.pods.rolling_update.max_surge, p.pods.rollouts[0].at_s) for p in plans}
    assert seen == {(kind, s, at) for kind, s in (("RollingUpdate", "25%"), ("RollingUpdate", 1), ("RollingUpdate", 0),
                                                  ("RollingUpdate", "100%"), ("Recreate", "25%"))
                    for at in (1900, 3000)}
    sp = load_space(root / "rollout_space.yaml")
    assert sp.scenario is not None and sp.scenario.resolve() == SCENARIOS / "rollout_rush.yaml"
    (strategy,) = [p for p in sp.params if p.path == "strategy"]
    assert strategy.choices is not None
    for bundle in strategy.choices:
        plan = base.override(bundle["set"])
        for changes in sp.stresses.values():
            assert len(plan.override(changes).pods.rollouts) in (0, 1)


def test_each_limit_of_an_analysis_counts_its_own_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """As each metric of an Argo Rollouts analysis counts its failed measurements against its own failureLimit, each
    limit of the pipeline's analysis does: with a failure limit of 1 a canary whose p99 fails one measurement and
    whose error rate fails the next is not undone (each limit failed once), and one whose p99 fails two is. The
    canary's readings are scripted per measurement (at 370, 420, 470 s and the resume at 500 s) over the simulated
    old pods'."""
    from capsim.sim.analysis import AnalysisProm

    check = {"at_s": 500, "resume": True, "undo_if_ttft_p99_over_s": 1.0, "undo_if_error_rate_over": 0.05,
             "check_window_s": 100, "check_interval_s": 50, "check_initial_delay_s": 170, "check_failure_limit": 1}
    real = AnalysisProm._side

    def run(script: dict[float, tuple[float, float]]) -> Any:
        def side(self: AnalysisProm, template: int, canary: bool, at: float, w: float, source: str) -> Any:
            p99, itl, errors = real(self, template, canary, at, w, source)
            if canary:
                p99, errors = script[self.sim.env.now]
            return p99, itl, errors

        monkeypatch.setattr(AnalysisProm, "_side", side)
        return simulate(_paused(check), 0).rollouts.iloc[0]

    ok, slow, erring = (0.2, 0.0), (2.0, 0.0), (0.2, 0.1)
    split = run({370: slow, 420: erring, 470: ok, 500: ok})
    assert not split.canary_failed and (split.canary_measurements, split.canary_failures) == (4, 2)
    assert split.canary_failed_by == ""
    twice = run({370: slow, 420: slow, 470: ok, 500: ok})
    assert twice.canary_failed and twice.undone_s == 420 and twice.canary_failures == 2
    assert twice.canary_failed_by == "undo_if_ttft_p99_over_s"  # rollouts.csv says which limit undid it
    both = run({370: (2.0, 0.1), 420: ok, 470: erring, 500: ok})  # one measurement failing both counts for each
    assert both.canary_failed and both.undone_s == 470 and both.canary_failures == 2
    assert both.canary_failed_by == "undo_if_error_rate_over"
    all_of_it = run({370: (2.0, 0.1), 420: (2.0, 0.1), 470: ok, 500: ok})
    assert all_of_it.canary_failed_by == "undo_if_ttft_p99_over_s and undo_if_error_rate_over"


def test_the_shipped_canary_error_grids_apply_to_the_rollout_scenario() -> None:
    """The error gates of docs/studies.md ("A canary of engine flags", "A store outage during a canary"): the flags
    grid's fifth gate counts the pods' own errors; the outage grid crosses three error gates, three Redis outages
    (none, 30 s, 2 minutes from 2,300 s) and two versions."""
    from capsim.studies.sweep import expand_grid, load_grid

    root = SCENARIOS.parent / "studies"
    base = Scenario.from_yaml(SCENARIOS / "rollout_rush.yaml")
    flags = [base.override(st.changes) for st in expand_grid(load_grid(root / "canary_flags_grid.yaml"))]
    assert len(flags) == 25
    assert sorted({p.pods.rollouts[-1].error_rate_source for p in flags if p.pods.rollouts[-1].error_checked}) == [
        "gateway", "pod"]
    plans = [base.override(st.changes) for st in expand_grid(load_grid(root / "canary_outage_grid.yaml"))]
    assert len(plans) == 18
    seen = {(p.pods.rollouts[2].undo_if_error_rate_over, p.pods.rollouts[2].undo_if_error_rate_over_baseline_by,
             p.pods.rollouts[2].error_rate_source, tuple(o.duration_s for o in p.faults.redis_outages),
             p.pods.rollouts[0].batching is not None) for p in plans if p.faults is not None}
    assert seen == {(fixed, by, source, outage, short)
                    for fixed, by, source in ((0.01, None, "pod"), (None, 0.01, "pod"), (0.01, None, "gateway"))
                    for outage in ((), (30.0,), (120.0,)) for short in (False, True)}


def test_the_shipped_bad_deploy_grid_deploys_broken_and_good_templates_undone_at_the_deadline() -> None:
    from capsim.studies.sweep import expand_grid, load_grid

    base = Scenario.from_yaml(SCENARIOS / "rollout_rush.yaml")
    plans = [base.override(st.changes) for st in expand_grid(load_grid(SCENARIOS.parent / "studies" /
                                                                        "bad_deploy_grid.yaml"))]
    assert len(plans) == 30
    for p in plans:
        (ro,) = p.pods.rollouts
        assert ro.at_s == 1900 and (p.pods.undo_on_deadline or p.pods.undo_after_s == 1200)
    gates = {(p.pods.undo_on_deadline, p.pods.progress_deadline_s, p.pods.undo_after_s) for p in plans}
    assert gates == {(True, 120, None), (True, 600, None), (False, 600, 1200)}
    assert {(p.pods.strategy, p.pods.rollouts[0].crash_after_s) for p in plans} == {
        (k, c) for k in ("RollingUpdate", "Recreate") for c in (30, None)}
    # the shipped scenario's own strategy, surge only, loses nothing to the broken deploy: undone at the deadline
    r = simulate(base.override({"pods.rollouts.0.crash_after_s": 30, "pods.undo_on_deadline": True,
                                "pods.progress_deadline_s": 120}), 0)
    bad, undo = r.rollouts.itertuples()
    assert bad.undone_s == pytest.approx(2020, abs=1) and undo.undo and bad.min_ready == 6
    assert r.summary.error_rate == 0.0 and r.summary.rollouts_undone == 1


def test_the_shipped_canary_grid_pauses_the_deploy_and_checks_each_version() -> None:
    from capsim.studies.sweep import expand_grid, load_grid

    base = Scenario.from_yaml(SCENARIOS / "rollout_rush.yaml")
    settings = expand_grid(load_grid(SCENARIOS.parent / "studies" / "canary_grid.yaml"))
    plans = {tuple(st.values.values()): base.override(st.changes) for st in settings}
    assert len(plans) == 42
    versions = {(p.pods.rollouts[0].crash_after_s, p.pods.rollouts[0].slowdown) for p in plans.values()}
    assert versions == {(30, 1.0), (None, 1.0), (None, 1.3)}  # each setting its own version (no bundle shared)
    canary = plans[("default 25%/25%", "canary 5 min, restarts", "broken", 1200)]
    assert canary.pods.pauses() == [(1900.0, 2200.0)] and canary.pods.rollouts[2].undo_if_restarted
    # the broken canary is undone at the check, five minutes in, nothing lost; unpaused the timeout undoes it
    r = simulate(canary, 0)
    bad, undo = r.rollouts.itertuples()
    assert bad.undone_s == 2200 and undo.undo and r.summary.error_rate == 0.0
    plain = simulate(plans[("default 25%/25%", "no pause", "broken", 1200)], 0).rollouts
    assert plain.undone_s.iloc[0] == pytest.approx(3100)


def test_the_shipped_canary_scenario_catches_the_slower_version_after_the_peak() -> None:
    sc = Scenario.from_yaml(SCENARIOS / "canary_rush.yaml")
    r = simulate(sc, 0)
    slow, undo = r.rollouts.itertuples()
    assert slow.canary_checked_s == 2500 and slow.canary_failed and slow.undone_s == 2500 and undo.undo
    assert slow.canary_ttft_p99_s > 1.2 * slow.baseline_ttft_p99_s and r.summary.slo_met
    good = simulate(sc.override({"pods.rollouts.0.slowdown": 1.0}), 0)
    assert good.summary.rollouts_undone == 0 and not good.rollouts.canary_failed.iloc[0]
    assert good.rollouts.done_s.iloc[0] > 2500  # held by the pause, then rolled out
    broken = simulate(sc.override({"pods.rollouts.0.crash_after_s": 30}), 0)  # its restart poll, every 30 s
    bad, undo = broken.rollouts.itertuples()
    assert bad.canary_checked_s == bad.undone_s == undo.at_s == 1960 and bad.canary_failed and broken.summary.crashes == 3


def test_capsim_check_warns_of_a_canary_window_that_starts_before_its_pods_are_ready() -> None:
    """The shipped canary is checked after the peak over 5 minutes (from 2,200 s; its pods ready by 2,030 s: the
    pause at 1,900 s, a 120-s cold start at most, a 10-s probe period): no warning. Checked in the peak at 2,200 s
    over 5 minutes, the window reaches back to the deploy and holds the new pods' first requests, which least
    outstanding sends in a burst: a good version is undone (seed 0 reads about 3 times the old pods' p99). Over 2
    minutes (from 2,080 s) the same check passes it and still undoes the slower version."""
    from capsim.studies.checks import run_checks

    def found(sc: Scenario) -> list:
        return [f for f in run_checks(sc) if f.check == "canary-window-before-ready"]

    shipped = Scenario.from_yaml(SCENARIOS / "canary_rush.yaml")
    assert not found(shipped)
    good = shipped.override({"pods.rollouts.0.slowdown": 1.0})
    early = good.override({"pods.rollouts.2.at_s": 2200})
    (f,) = found(early)
    assert f.path == "pods.rollouts.2.check_window_s" and f.level == "warn"
    assert "looks back to 1900 s, before the canary's pods can all be ready" in f.message
    assert "until 2030 s" in f.message and "check_window_s 170 s or less" in f.message
    ro = simulate(early, 0).rollouts.iloc[0]
    assert ro.canary_failed and ro.canary_ttft_p99_s > 2 * ro.baseline_ttft_p99_s  # the burst, not the version
    short = early.override({"pods.rollouts.2.check_window_s": 120})
    assert not found(short)
    ro = simulate(short, 0).rollouts.iloc[0]
    assert not ro.canary_failed and ro.canary_ttft_p99_s < 1.1 * ro.baseline_ttft_p99_s
    slower = simulate(short.override({"pods.rollouts.0.slowdown": 1.3}), 0).rollouts.iloc[0]
    assert slower.canary_failed and slower.canary_ttft_p99_s > 1.2 * slower.baseline_ttft_p99_s
    # capsim simulate's note on the check says so too
    out = CliRunner().invoke(app, ["simulate", str(SCENARIOS / "canary_rush.yaml"), "--set", "pods.rollouts.2.at_s=2200",
                                   "--set", "pods.rollouts.0.slowdown=1.0"])
    assert out.exit_code == 0, out.output
    note = next(line for line in out.output.splitlines() if line.startswith("note: the canary check"))
    assert "at 2200 s, failed" in note and "(capsim check: canary-window-before-ready)" in note
    # a resume before the pods can be ready: the path is its time
    (f,) = found(good.override({"pods.rollouts.2.at_s": 2000, "pods.rollouts.2.check_window_s": 60}))
    assert f.path == "pods.rollouts.2.at_s" and "may come before the canary's pods are ready" in f.message
    # the new image's pull and minReadySeconds count; a restart check alone reads no window; nor a pause with no deploy
    slow_start = good.override({"pods.image_pull_s": {"kind": "constant", "value_s": 90}, "pods.min_ready_s": 30,
                                "pods.rollouts.2.check_window_s": 400})  # from 2,100 s
    (f,) = found(slow_start)
    assert "the new image's pull 90 s" in f.message and "minReadySeconds 30 s" in f.message and "until 2150 s" in f.message
    assert not found(slow_start.override({"pods.rollouts.0.new_image": False}))  # ready by 2,060 s
    assert not found(early.override({"pods.rollouts.2": {"at_s": 2200, "resume": True, "undo_if_restarted": True}}))
    assert not found(_fleet(**{"pods.rollouts": [{"at_s": 100, "pause": True}, {"at_s": 200, "resume": True,
                                                                                 "undo_if_ttft_p99_over_s": 1.0}]}))


def test_a_rollout_budget_in_the_slo_fails_a_run_whose_deploy_takes_longer() -> None:
    from capsim.studies.runs import slo_miss

    # two waves of 60 s: 120 s
    slow = simulate(_fleet(**{"slo.max_rollout_s": 100}), 0).summary
    assert not slow.rollout_slo_met and not slow.slo_met and slow.error_rate == 0.0
    why, by = slo_miss(slow.to_dict(), 1.0, 0.001)
    assert why == "a rollout took 120 s, over slo.max_rollout_s" and by > 0
    fast = simulate(_fleet(**{"slo.max_rollout_s": 150}), 0).summary
    assert fast.rollout_slo_met and fast.slo_met
    # a stalled rollout misses it; no rollout, nothing to judge
    full = {"autoscaler": None, "cluster": {"max_gpus": 4, "node_gpus": 4, "node_provision_s": 240},
            "pods.rolling_update": {"max_surge": 1, "max_unavailable": 0}, "slo.max_rollout_s": 3600}
    stalled = simulate(_fleet(**full), 0).summary
    assert not stalled.slo_met and "(not done by the end of the run)" in slo_miss(stalled.to_dict(), 1.0, 0.001)[0]
    none = simulate(_fleet(**{"slo.max_rollout_s": 1, "pods.rollouts": []}), 0).summary
    assert none.rollout_slo_met and none.slo_met


def test_capsim_check_warns_of_a_deploy_budget_no_rollout_can_meet() -> None:
    from capsim.studies.checks import run_checks

    # four pods at 25%/25% move two at a time: two waves of at least 60 s, 120 s (the run's own time, above)
    short = _fleet(**{"slo.max_rollout_s": 100})
    (f,) = [f for f in run_checks(short) if f.check == "rollout-budget-short"]
    assert f.path == "slo.max_rollout_s" and "2 waves of at least 60 s" in f.message and "120 s" in f.message
    assert not [f for f in run_checks(_fleet(**{"slo.max_rollout_s": 120})) if f.check == "rollout-budget-short"]
    # minReadySeconds adds to each wave; a lognormal cold start has no floor to count on
    held = _fleet(**{"slo.max_rollout_s": 150, "pods.min_ready_s": 30})
    assert [f.check for f in run_checks(held) if f.check == "rollout-budget-short"] == ["rollout-budget-short"]
    logn = _fleet(**{"slo.max_rollout_s": 1, "pods.startup_s": {"kind": "lognormal", "mean_s": 60, "sigma": 0.5}})
    assert not [f for f in run_checks(logn) if f.check == "rollout-budget-short"]
    # the simulator agrees with the bound: 150 s meets it without minReadySeconds, misses it with 30
    assert simulate(_fleet(**{"slo.max_rollout_s": 150}), 0).summary.rollout_slo_met
    assert not simulate(held, 0).summary.rollout_slo_met


def test_the_progress_deadline_counts_from_the_last_progress_and_a_done_rollout_keeps_its_stall() -> None:
    # one pod at a time (0/1) with cold starts of 60 s makes progress every 60 s: a deadline of 50 s passes 50 s
    # after the first step, the rollout goes on and is done; with the default 600 s it never passes
    tight = simulate(_fleet(**{"pods.rolling_update": {"max_surge": 0, "max_unavailable": 1},
                               "pods.progress_deadline_s": 50}), 0).rollouts.iloc[0]
    assert tight.deadline_exceeded_s == pytest.approx(250.0, abs=1.0) and tight.done_s > 400
    relaxed = simulate(_fleet(**{"pods.rolling_update": {"max_surge": 0, "max_unavailable": 1}}), 0).rollouts.iloc[0]
    assert math.isnan(relaxed.deadline_exceeded_s) and relaxed.done_s == tight.done_s


@pytest.mark.parametrize(("before", "after", "expected"), [
    ((2, 4, 5, 5), (3, 4, 5, 5), True),  # one more pod on the new template
    ((2, 4, 5, 5), (2, 3, 5, 5), True),  # one fewer on the old
    ((2, 4, 5, 5), (2, 4, 6, 5), True),  # one more ready
    ((2, 4, 5, 5), (2, 4, 5, 6), True),  # one more available
    ((2, 4, 5, 5), (2, 4, 5, 5), False),  # nothing moved
    ((2, 4, 5, 5), (1, 5, 4, 4), False),  # only backwards: the new pods shrank, the old grew (a scale-down)
])
def test_progress_is_what_deployment_progressing_counts(before, after, expected) -> None:
    assert progressing(before, after) is expected


# ---- Recreate (recreate.go) ------------------------------------------------------------------------------
def test_recreate_takes_the_old_replicasets_to_zero_then_waits_for_their_pods() -> None:
    # TestScaleDownOldReplicaSets: an old ReplicaSet of 3 goes to 0 in one sync, and the new one stays at 0
    rss = [ReplicaSetState(0, 3, 3, 3), ReplicaSetState(1, 0, 0, 3)]
    out = sync(rss, 3, Recreate())
    assert [rs.replicas for rs in out] == [0, 0]
    # while a pod of an old ReplicaSet is still there (terminating too: oldPodsRunning), the new one waits
    assert [rs.replicas for rs in sync(out, 3, Recreate(), old_pods_running=True)] == [0, 0]
    # once none is, it takes every replica at once (no surge, no waves) and is annotated for them
    (old, new) = sync(out, 3, Recreate(), old_pods_running=False)
    assert (old.replicas, new.replicas, new.desired, new.max) == (0, 3, 3, 3)
    assert rollout_recreate(out, 3, old_pods_running=False) == [old, new]
    # several old ReplicaSets (a rollout over a rollout) all go in the same sync
    three = [ReplicaSetState(0, 2, 2, 4), ReplicaSetState(1, 2, 1, 4), ReplicaSetState(2, 0, 0, 4)]
    assert [rs.replicas for rs in sync(three, 4, Recreate(), old_pods_running=False)] == [0, 0, 0]
    # a scaling event is upstream's scale() whatever the strategy: the one active ReplicaSet takes it; with two
    # active, only a rolling update shares it out in proportion (sync.go: IsRollingUpdate)
    done = [ReplicaSetState(0, 0, 0, 3), ReplicaSetState(1, 3, 3, 3, 3)]
    assert [rs.replicas for rs in sync(done, 5, Recreate())] == [0, 5]
    both = [ReplicaSetState(0, 2, 2, 4, 4), ReplicaSetState(1, 2, 2, 4, 4)]
    assert [rs.replicas for rs in scale(both, 8, Recreate())] == [2, 2]
    assert [rs.replicas for rs in scale(both, 8, RollingUpdate(0, 1))] == [4, 4]
    assert (Recreate().surge(10), Recreate().unavailable(10)) == (0, 0)


def test_a_recreate_rollout_creates_the_new_pods_only_once_every_old_one_is_gone() -> None:
    from capsim.sim.simulate import Simulation

    sim = Simulation(_fleet(**{"pods.strategy": "Recreate"}), 0)
    gone: dict[int, float] = {}
    forget = sim.cluster._forget

    def recorded(pod, now: float) -> None:
        gone.setdefault(pod.id, now)
        forget(pod, now)

    sim.cluster._forget = recorded  # type: ignore[method-assign]
    r = sim.run()
    (ro,) = r.rollouts.to_dict("records")
    new = [p for p in sim.cluster.pods if p.revision == 1]
    assert [p.id for p in new] == [4, 5, 6, 7] and all(p.revision == 0 for p in sim.cluster.pods[:4])
    # the four old pods drained (their batches in flight) and went; only then were the four new ones created
    assert max(gone[i] for i in range(4)) <= min(p.created_s for p in new)
    assert 200 < min(p.created_s for p in new) < 201
    # one wave: the whole fleet's cold start (60 s), no pod ready meanwhile and never more than four pods
    assert 260 <= ro["done_s"] < 262 and ro["min_ready"] == 0 and ro["most_pods"] == 4
    ts = r.timeseries
    during = ts[(ts.time_s > 200) & (ts.time_s < ro["done_s"])]
    assert (during.ready_replicas == 0).all()
    assert (during.ready_replicas + during.starting_replicas + during.pending_replicas).max() <= 4
    # what was sent meanwhile failed; the rolling update of the same fleet failed nothing
    req = r.requests
    lost = req[(req.arrival_s > 201) & (req.arrival_s < 255)]
    assert len(lost) > 1000 and (lost.outcome != "ok").all()
    assert r.summary.error_rate > 0.05
    assert simulate(_fleet(), 0).summary.error_rate == 0.0


def test_recreate_needs_no_gpu_to_spare_where_a_surge_stalls() -> None:
    full = {"autoscaler": None, "cluster": {"max_gpus": 4, "node_gpus": 4, "node_provision_s": 240}}
    ro = simulate(_fleet(**full, **{"pods.strategy": "Recreate"}), 0).rollouts.iloc[0]
    assert 260 <= ro.done_s < 262 and ro.most_pods == 4  # each new pod takes a GPU its predecessor gave back
    stalled = simulate(_fleet(**full, **{"pods.rolling_update": {"max_surge": 1, "max_unavailable": 0}}), 0)
    assert math.isnan(stalled.rollouts.iloc[0].done_s)


def test_a_recreate_rollout_mid_rush_under_the_hpa_finishes_and_costs_an_outage(tmp_path: Path) -> None:
    rush = Scenario.from_yaml(SCENARIOS / "friday_rush.yaml")
    recreate = simulate(rush.override({"pods.rollouts": [{"at_s": 2000}], "pods.strategy": "Recreate"}), 0)
    rolling = simulate(rush.override({"pods.rollouts": [{"at_s": 2000}]}), 0)
    ro = recreate.rollouts.iloc[0]
    assert ro.pods >= 8 and 2000 < ro.done_s < 2700 and ro.min_ready == 0
    assert ro.most_pods <= max(ro.pods, recreate.scale_events.to_replicas.max())  # never a pod over the replicas
    assert recreate.summary.error_rate > 10 * max(rolling.summary.error_rate, 1e-4)
    res = CliRunner().invoke(app, ["simulate", str(SCENARIOS / "steady_poisson.yaml"), "--set", "horizon_s=900",
                                   "--set", "pods.replicas=4", "--set", "pods.rollouts=[{at_s: 200}]",
                                   "--set", "pods.strategy=Recreate", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "note: the rollout at 200 s (Recreate, 4 pods then) took 60" in res.output
    assert "0 pods ready at the fewest, 4 alive at the most" in res.output


def test_recreate_refuses_a_rolling_update_and_capsim_check_names_its_outage() -> None:
    from capsim.studies.checks import run_checks

    with pytest.raises(SettingsError, match="pods.rolling_update may not be set with strategy Recreate"):
        _fleet(**{"pods.strategy": "Recreate", "pods.rolling_update": {"max_surge": 1, "max_unavailable": 0}})
    with pytest.raises(SettingsError, match="pods.strategy"):
        _fleet(**{"pods.strategy": "BlueGreen"})
    plan = _fleet(**{"pods.strategy": "Recreate", "cluster": {"max_gpus": 4, "node_gpus": 4}, "autoscaler": None})
    found = {f.check: f for f in run_checks(plan)}
    assert "rollout-no-room" not in found  # Recreate needs no GPU to spare
    f = found["recreate-outage"]
    assert f.level == "warn" and f.path == "pods.strategy" and "no pod serving for at least 60 s" in f.message
    assert "recreate-outage" not in {f.check for f in run_checks(plan.override({"pods.rollouts": []}))}
    # its deploy budget is one wave of the whole fleet: 60 s
    assert "rollout-budget-short" not in {f.check for f in run_checks(plan.override({"slo.max_rollout_s": 60}))}
    (short,) = [f for f in run_checks(plan.override({"slo.max_rollout_s": 50})) if f.check == "rollout-budget-short"]
    assert "moves 4 at a time (Recreate): 1 wave of at least 60 s" in short.message


# ---- a broken template, and kubectl rollout undo --------------------------------------------------------------
def _bad(**extra) -> Scenario:
    """The four-pod fleet deployed at 200 s onto a template whose containers exit 30 s after they start (under the
    60-s cold start: never ready), undone at 500 s."""
    return _fleet(**{"pods.rollouts": [{"at_s": 200, "crash_after_s": 30}, {"at_s": 500, "undo": True}], **extra})


def _served_by(r, t0: float, t1: float) -> set[int]:
    req = r.requests
    return set(req.pod[(req.arrival_s > t0) & (req.arrival_s < t1) & (req.pod >= 0)].unique())


def test_a_broken_template_crash_loops_and_an_undo_brings_the_old_one_back() -> None:
    from capsim.sim.simulate import Simulation

    sim = Simulation(_bad(), 0)
    r = sim.run()
    bad, undo = r.rollouts.to_dict("records")
    # 25%/25% of 4: two new pods and one old taken down; the new ones never ready, so nothing more moves
    assert math.isnan(bad["done_s"]) and bad["undone_s"] == 500 and not bad["undo"] and bad["min_ready"] == 3
    assert undo["undo"] and undo["revision"] == 2 and math.isnan(undo["undone_s"])
    # the undo makes the first template's ReplicaSet (its three pods) the new one: it adds the pod it lacks (a 60-s
    # cold start) and the broken pods go
    assert undo["done_s"] == pytest.approx(560, abs=1) and undo["min_ready"] == 3
    new = [p for p in sim.cluster.pods if p.revision == 1]
    assert len(new) == 2 and all(p.first_ready_s is None for p in new)  # never ready
    crashes = r.crashes
    assert set(crashes.kind) == {"rollout"} and set(crashes.pod) == {p.id for p in new}
    assert crashes.time_s.min() == pytest.approx(230, abs=1)  # the first exits 30 s after its start
    late = [p for p in sim.cluster.pods if p.created_s > 499]
    assert len(late) == 1 and late[0].revision == 0  # the replacement runs the template undone to
    assert all(p.revision == 0 for p in sim.cluster.live_pods)
    # three pods carried the load throughout: nothing lost, and the run says how it went
    assert r.summary.error_rate == 0.0
    s = r.summary
    assert (s.rollouts_undone, s.rollouts_unfinished, s.longest_rollout_s, s.rollout_fewest_ready) == (1, 1, 300.0, 3.0)


def test_a_broken_template_costs_what_the_strategy_lets_it_take_down() -> None:
    # one pod over and none under: the broken surge pod takes no old pod down, nothing is lost, the undo is instant
    surge = simulate(_bad(**{"pods.rolling_update": {"max_surge": 1, "max_unavailable": 0}}), 0)
    bad, undo = surge.rollouts.itertuples()
    assert bad.min_ready == 4 and undo.done_s == 500 and surge.summary.error_rate == 0.0
    assert _served_by(surge, 210, 500) == {0, 1, 2, 3}
    # Recreate: every old pod went first, so nothing serves from the deploy until the undo's pods are ready
    recreate = simulate(_bad(**{"pods.strategy": "Recreate"}), 0)
    bad, undo = recreate.rollouts.itertuples()
    assert bad.min_ready == 0 and 560 <= undo.done_s < 562
    assert _served_by(recreate, 205, 555) == set()
    assert recreate.summary.error_rate > 0.35  # 360 of the run's 890 measured seconds without a pod


def test_the_pipeline_undoes_a_rollout_at_its_progress_deadline() -> None:
    one = {"pods.rollouts": [{"at_s": 200, "crash_after_s": 30}], "pods.progress_deadline_s": 120}
    left = simulate(_fleet(**one), 0).rollouts.iloc[0]  # Kubernetes reports it, the broken rollout stays
    assert left.deadline_exceeded_s == pytest.approx(320, abs=1) and math.isnan(left.undone_s)
    assert math.isnan(left.done_s)
    r = simulate(_fleet(**one, **{"pods.undo_on_deadline": True}), 0)
    bad, undo = r.rollouts.itertuples()
    assert bad.undone_s == bad.deadline_exceeded_s == pytest.approx(320, abs=1)
    assert undo.undo and undo.at_s == bad.undone_s and undo.done_s == pytest.approx(undo.at_s + 60, abs=1)
    # a working rollout makes progress every wave: the pipeline has nothing to undo
    fine = simulate(_fleet(**{"pods.progress_deadline_s": 120, "pods.undo_on_deadline": True}), 0).rollouts
    assert len(fine) == 1 and fine.done_s.iloc[0] == pytest.approx(320)


def test_undo_goes_back_one_template_and_a_second_undo_goes_forward_again() -> None:
    from capsim.sim.simulate import Simulation

    # a working deploy, done at 320 s, undone at 400 s: the first template's pods come back, in waves again
    sim = Simulation(_fleet(**{"pods.rollouts": [{"at_s": 200}, {"at_s": 400, "undo": True}]}), 0)
    r = sim.run()
    first, undo = r.rollouts.itertuples()
    assert first.done_s == pytest.approx(320) and first.undone_s == 400 and r.summary.rollouts_undone == 0
    assert undo.done_s == pytest.approx(520) and {p.revision for p in sim.cluster.live_pods} == {0}
    # kubectl rollout undo twice: back to the template the first undo left
    sim = Simulation(_fleet(**{"pods.rollouts": [{"at_s": 200}, {"at_s": 400, "undo": True},
                                                 {"at_s": 600, "undo": True}]}), 0)
    r = sim.run()
    assert list(r.rollouts.revision) == [1, 2, 3] and {p.revision for p in sim.cluster.live_pods} == {1}
    assert r.rollouts.done_s.iloc[-1] == pytest.approx(720) and r.summary.error_rate == 0.0


def test_a_bad_undo_or_template_is_refused_and_the_cli_tells_an_undone_rollout(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"pods.rollouts.1.undo: the undo at 100 s comes before any deploy"):
        _fleet(**{"pods.rollouts": [{"at_s": 300}, {"at_s": 100, "undo": True}]})
    with pytest.raises(SettingsError, match="crash_after_s: an undo goes back to an earlier template"):
        _fleet(**{"pods.rollouts": [{"at_s": 100}, {"at_s": 300, "undo": True, "crash_after_s": 5}]})
    with pytest.raises(SettingsError, match="crash_after_s"):
        _fleet(**{"pods.rollouts": [{"at_s": 100, "crash_after_s": 0}]})
    res = CliRunner().invoke(app, ["simulate", str(SCENARIOS / "steady_poisson.yaml"), "--set", "horizon_s=900",
                                   "--set", "pods.replicas=4", "--set",
                                   "pods.rollouts=[{at_s: 200, crash_after_s: 30}, {at_s: 500, undo: true}]",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert ("note: the rollout at 200 s (maxSurge 25%, maxUnavailable 25%, 4 pods then) was undone at 500 s, 300 s "
            "after it began, before it was done") in res.output
    assert "note: the undo (kubectl rollout undo) at 500 s (maxSurge 25%, maxUnavailable 25%, 4 pods then) took 60" \
        in res.output
    import pandas as pd

    crashes = pd.read_csv(tmp_path / "run" / "crashes.csv")
    assert list(crashes.columns) == ["time_s", "pod", "kind"] and set(crashes.kind) == {"rollout"}


def test_a_slower_template_slows_its_pods_and_an_undo_brings_the_old_speed_back() -> None:
    from capsim.sim.simulate import Simulation

    # one request per batch at 4 requests a second: a request's time on the model is its batch's
    sc = _fleet(**{"pods.rollouts": [{"at_s": 200, "slowdown": 2.0}, {"at_s": 600, "undo": True}],
                   "workload.arrivals.rate_per_s": 4, "batching.max_batch_size": 1, "horizon_s": 1000})
    sim = Simulation(sc, 0)
    r = sim.run()
    req = r.requests[r.requests.outcome == "ok"]
    on_model = (req.end_s - req.start_s).groupby(req.pod.map(lambda i: sim.cluster.pods[i].revision)).median()
    assert on_model[1] / on_model[0] == pytest.approx(2.0, rel=0.05)  # the new template's pods: twice as long
    late = req[req.arrival_s > 800]
    assert set(sim.cluster.pods[i].revision for i in late.pod) == {0}  # undone: the old template, its old speed
    assert (late.end_s - late.start_s).median() == pytest.approx(on_model[0], rel=0.05)
    assert r.slowdowns.empty  # a template's speed is no fault: faults.slow_pods' table stays empty
    with pytest.raises(SettingsError, match="slowdown: an undo goes back to an earlier template"):
        _fleet(**{"pods.rollouts": [{"at_s": 100}, {"at_s": 300, "undo": True, "slowdown": 1.5}]})


def test_a_new_image_is_pulled_on_each_node_and_an_undo_finds_the_old_one_there() -> None:
    from capsim.sim.simulate import Simulation

    # four pods on one 8-GPU node that has the image; a 100-s pull of the new one, once for the node, before the
    # first new pod starts (those placed meanwhile wait for the same pull)
    cluster = {"max_gpus": 8, "node_gpus": 8, "node_provision_s": 240}
    base = {"autoscaler": None, "cluster": cluster, "pods.image_pull_s": 100}
    new = simulate(_fleet(**base), 0).rollouts.iloc[0]
    assert new.done_s == pytest.approx(200 + 100 + 2 * 60)  # the pull, then two waves of cold starts
    same = simulate(_fleet(**base, **{"pods.rollouts": [{"at_s": 200, "new_image": False}]}), 0).rollouts.iloc[0]
    assert same.done_s == pytest.approx(200 + 2 * 60)  # engine flags only: the node has the image
    # back to the first template: its image is still on the node, no pull
    sim = Simulation(_fleet(**base, **{"pods.rollouts": [{"at_s": 200}, {"at_s": 500, "undo": True}]}), 0)
    r = sim.run()
    undo = r.rollouts.iloc[1]
    assert undo.undo and undo.done_s == pytest.approx(500 + 2 * 60)
    (node,) = sim.cluster.nodes.nodes
    assert node.images == {0: 0.0, 1: 300.0}


def test_capsim_check_warns_of_a_deadline_that_undoes_a_good_deploy() -> None:
    from capsim.studies.checks import run_checks

    # 60-s cold starts and 10-s probes: a new pod is available up to 70 s after its creation, with no progress
    # meanwhile; a 50-s deadline reports every wave stalled, and the pipeline undoes a deploy that works
    short = _fleet(**{"pods.progress_deadline_s": 50, "pods.undo_on_deadline": True})
    (f,) = [f for f in run_checks(short) if f.check == "rollout-deadline-short"]
    assert f.level == "warn" and f.path == "pods.progress_deadline_s"
    assert "may take 70 s from its creation to available (a cold start 60 s, a startup probe period 10 s" in f.message
    assert "the pipeline undoes it" in f.message
    r = simulate(short, 0)
    assert r.summary.rollouts_undone == 1 and r.rollouts.undo.iloc[-1]  # the simulator agrees: a good deploy undone
    # a new image's pull and minReadySeconds count; 70 s is enough without them, and no rollout, nothing to warn of
    assert not [f for f in run_checks(short.override({"pods.progress_deadline_s": 70}))
                if f.check == "rollout-deadline-short"]
    (pull,) = [f for f in run_checks(short.override({"pods.progress_deadline_s": 70, "pods.image_pull_s": 30,
                                                     "pods.min_ready_s": 5})) if f.check == "rollout-deadline-short"]
    assert "may take 105 s" in pull.message and "the new image's pull 30 s" in pull.message
    flags = short.override({"pods.progress_deadline_s": 70, "pods.image_pull_s": 30,
                            "pods.rollouts": [{"at_s": 200, "new_image": False}]})
    assert not [f for f in run_checks(flags) if f.check == "rollout-deadline-short"]
    assert not [f for f in run_checks(short.override({"pods.rollouts": []})) if f.check == "rollout-deadline-short"]


def test_the_pipeline_timeout_undoes_a_rollout_on_a_clock_of_its_own() -> None:
    # kubectl rollout status --timeout=250s || kubectl rollout undo: the broken deploy at 200 s is undone at 450 s
    bad = {"pods.rollouts": [{"at_s": 200, "crash_after_s": 30}], "pods.undo_after_s": 250}
    r = simulate(_fleet(**bad), 0)
    first, undo = r.rollouts.itertuples()
    assert first.undone_s == pytest.approx(450) and undo.undo and undo.at_s == pytest.approx(450)
    assert r.summary.rollouts_undone == 1
    # a good one done within it (120 s) is left alone; one slower than it (0/1: four waves, 240 s) is undone too
    assert simulate(_fleet(**{"pods.undo_after_s": 250}), 0).summary.rollouts_undone == 0
    slow = simulate(_fleet(**{"pods.undo_after_s": 200, "pods.rolling_update": {"max_surge": 0,
                                                                                 "max_unavailable": 1}}), 0)
    assert slow.summary.rollouts_undone == 1 and slow.rollouts.undone_s.iloc[0] == pytest.approx(400)
    # a deploy overtaken by the next one is not undone by its own timeout; the next one's timeout still runs
    two = simulate(_fleet(**{"pods.rollouts": [{"at_s": 200, "crash_after_s": 30}, {"at_s": 300}],
                             "pods.undo_after_s": 250}), 0)
    assert list(two.rollouts.undo) == [False, False] and two.summary.rollouts_undone == 0
    from capsim.studies.checks import run_checks

    # capsim check: four pods at 25%/25% take two waves of at least 60 s; a 100-s timeout undoes every deploy
    (f,) = [f for f in run_checks(_fleet(**{"pods.undo_after_s": 100})) if f.check == "rollout-timeout-short"]
    assert f.path == "pods.undo_after_s" and "2 waves of at least 60 s" in f.message and "undoes every deploy" in f.message
    assert not [f for f in run_checks(_fleet(**{"pods.undo_after_s": 120})) if f.check == "rollout-timeout-short"]
    undone = simulate(_fleet(**{"pods.undo_after_s": 100, "slo.max_rollout_s": 600}), 0).summary
    assert undone.rollouts_undone == 1 and not undone.rollout_slo_met  # and it does: the deploy budget is missed
    from capsim.studies.runs import slo_miss

    assert slo_miss(undone.to_dict(), 1.0, 0.001)[0] == (
        "a rollout was undone before it was done (slo.max_rollout_s needs every deploy done within it)")


def test_capsim_check_warns_that_an_autoscaler_can_keep_a_broken_rollout_from_its_deadline() -> None:
    from capsim.studies.checks import run_checks

    # the study's case: 25%/25% in the H100 rush, undone at the 600-s deadline alone; seed 2's HPA kept it progressing
    rush = Scenario.from_yaml(SCENARIOS / "rollout_rush.yaml").override({
        "pods.rolling_update": {"max_surge": "25%", "max_unavailable": "25%"}, "pods.undo_on_deadline": True,
        "pods.rollouts.0.crash_after_s": 30})
    (f,) = [f for f in run_checks(rush) if f.check == "deadline-under-autoscaler"]
    assert f.level == "warn" and f.path == "pods.undo_on_deadline" and "pods.undo_after_s" in f.message
    r = simulate(rush, 2)
    assert r.summary.rollouts_undone == 0 and math.isnan(r.rollouts.done_s.iloc[0])  # never undone, never done
    assert len(r.scale_events) >= 2  # the HPA scaled meanwhile
    # with a timeout of the pipeline's own it is quiet (and the rollout is undone); without an autoscaler too
    timed = rush.override({"pods.undo_after_s": 1200})
    assert not [f for f in run_checks(timed) if f.check == "deadline-under-autoscaler"]
    assert simulate(timed, 2).summary.rollouts_undone == 1
    fixed = _fleet(**{"pods.undo_on_deadline": True})
    assert fixed.autoscaler is None and not [f for f in run_checks(fixed) if f.check == "deadline-under-autoscaler"]



# ---- kubectl rollout pause / resume (spec.paused) ---------------------------------------------------------------
def _paused(*entries: dict, **extra) -> Scenario:
    """The four-pod fleet deployed at 200 s and paused at once (a canary of the first wave), then ``entries``."""
    return _fleet(**{"pods.rollouts": [{"at_s": 200}, {"at_s": 200, "pause": True}, *entries], **extra})


def test_a_pause_holds_a_rollout_at_its_first_wave_and_the_resume_finishes_it() -> None:
    from capsim.sim.simulate import Simulation

    sim = Simulation(_paused({"at_s": 500, "resume": True}), 0)
    r = sim.run()
    (ro,) = r.rollouts.itertuples()
    # 25%/25% of 4: the deploy's sync takes the new ReplicaSet to two and the old to three; paused, the controller
    # only scales, and two new pods serve beside three old ones for five minutes (nothing moves when they turn
    # ready at 260 s); the resume goes on: the last two new pods (a 60-s cold start) and the old ones go
    new = sorted(p.created_s for p in sim.cluster.pods if p.revision == 1)
    assert new == [200, 200, 500, 500]
    assert _served_by(r, 270, 500) == {1, 2, 3, 4, 5}  # pod 0 went at the deploy
    assert ro.done_s == pytest.approx(560, abs=1) and ro.min_ready == 3 and r.summary.error_rate == 0.0
    assert r.summary.longest_rollout_s == pytest.approx(360, abs=1)  # the pause is part of the deploy's time
    # never resumed, it stays a canary to the end of the run
    left = simulate(_paused(), 0)
    assert math.isnan(left.rollouts.done_s.iloc[0]) and left.summary.rollouts_unfinished == 1
    assert _served_by(left, 300, 900) == {1, 2, 3, 4, 5}


def test_a_deploy_while_paused_waits_for_the_resume_and_rolls_out_the_newest_template() -> None:
    from capsim.sim.simulate import Simulation

    # `kubectl rollout pause; kubectl set image ...` twice; the resume rolls out the last template only
    sc = _fleet(**{"pods.rollouts": [{"at_s": 100, "pause": True}, {"at_s": 200, "slowdown": 2.0},
                                     {"at_s": 300, "crash_after_s": 30}, {"at_s": 400, "resume": True}]})
    sim = Simulation(sc, 0)
    r = sim.run()
    (ro,) = r.rollouts.itertuples()
    assert ro.at_s == 400 and ro.revision == 1 and not ro.undo  # one ReplicaSet made, at the resume
    assert min(p.created_s for p in sim.cluster.pods if p.revision != 0) == 400
    assert r.crashes.time_s.min() >= 430  # the broken template's: nothing crashed before its pods started
    assert _served_by(r, 10, 400) == {0, 1, 2, 3}


def test_a_paused_rollout_is_never_stalled_and_its_deadline_counts_from_the_resume() -> None:
    # a broken deploy with a 120-s deadline, undone at it by the pipeline: paused 600 s, Kubernetes checks no
    # progress meanwhile (the Progressing condition is DeploymentPaused), and the resume starts its clock afresh
    sc = _paused({"at_s": 800, "resume": True}, **{"pods.rollouts.0.crash_after_s": 30, "horizon_s": 1200,
                                                   "pods.progress_deadline_s": 120, "pods.undo_on_deadline": True})
    r = simulate(sc, 0)
    bad, undo = r.rollouts.itertuples()
    assert bad.deadline_exceeded_s == pytest.approx(920, abs=1) and bad.undone_s == pytest.approx(920, abs=1)
    assert undo.undo and undo.done_s == pytest.approx(980, abs=1)
    # the pause cost nothing: the old ReplicaSet kept its three pods while the two broken ones crash-looped
    assert r.summary.error_rate == 0.0 and bad.min_ready == 3


def test_the_pipelines_undo_of_a_paused_rollout_is_refused_as_kubectl_refuses_it(tmp_path: Path) -> None:
    # kubectl rollout status --timeout=250s times out on the paused Deployment, and its undo fails ("you cannot
    # rollback a paused deployment"): the broken canary stays until the resume, and nothing undoes it after
    sc = _paused({"at_s": 600, "resume": True}, **{"pods.rollouts.0.crash_after_s": 30, "pods.undo_after_s": 250})
    r = simulate(sc, 0)
    (bad,) = r.rollouts.itertuples()
    assert bad.undo_refused_s == pytest.approx(450) and math.isnan(bad.undone_s) and math.isnan(bad.done_s)
    assert r.summary.rollout_undos_refused == 1 and r.summary.rollouts_undone == 0
    # a resume before the timeout: the pipeline's undo goes through
    ok = simulate(_paused({"at_s": 400, "resume": True}, **{"pods.rollouts.0.crash_after_s": 30,
                                                           "pods.undo_after_s": 250}), 0)
    assert ok.summary.rollouts_undone == 1 and ok.summary.rollout_undos_refused == 0
    # the CLI says so, and capsim check saw it coming
    out = CliRunner().invoke(app, ["simulate", str(SCENARIOS / "steady_poisson.yaml"), "--set", "horizon_s=900",
                                   "--set", "pods.replicas=4", "--set", "pods.startup_s=60", "--set",
                                   "pods.rollouts=[{at_s: 200, crash_after_s: 30}, {at_s: 200, pause: true}, "
                                   "{at_s: 600, resume: true}]", "--set", "pods.undo_after_s=250",
                                   "--out", str(tmp_path / "run")])
    assert out.exit_code == 0, out.output
    assert "the deploy pipeline's undo at 450 s was refused: the Deployment was paused" in out.output
    import pandas as pd

    assert pd.read_csv(tmp_path / "run" / "rollouts.csv").undo_refused_s.iloc[0] == pytest.approx(450)
    from capsim.studies.checks import run_checks

    (f,) = [f for f in run_checks(sc) if f.check == "undo-while-paused"]
    assert f.path == "pods.undo_after_s" and "450 s" in f.message and "paused from 200 s" in f.message
    assert "unless the pipeline's look" not in f.message
    # a pipeline that looks at the canary during the pause may resume and undo it first: the warning says so, and
    # the run shows it (the restart poll undoes the broken canary, nothing is refused)
    polled = sc.override({"pods.rollouts.2": {"at_s": 600, "resume": True, "undo_if_restarted": True,
                                              "restart_poll_s": 30}})
    (f,) = [f for f in run_checks(polled) if f.check == "undo-while-paused"]
    assert "unless the pipeline's look at the canary during the pause, restart_poll_s or check_interval_s, resumes " \
           "it first" in f.message
    r = simulate(polled, 0)
    assert r.summary.rollouts_undone == 1 and r.summary.rollout_undos_refused == 0
    early = sc.override({"pods.rollouts.2.at_s": 400})
    assert early.pods.pauses() == [(200.0, 400.0)]
    assert not [f for f in run_checks(early) if f.check == "undo-while-paused"]


def test_a_paused_deployment_still_scales_in_proportion() -> None:
    # upstream's own example (kubernetes/kubernetes#28105): 40 replicas, maxSurge 3, maxUnavailable 2, paused with
    # 38 old and 5 new; scaled to 30 the two ReplicaSets get 29 and 4
    st = RollingUpdate(3, 2)
    rss = [ReplicaSetState(0, 38, 38, 40, 43), ReplicaSetState(1, 5, 5, 40, 43)]
    assert [rs.replicas for rs in scale(rss, 30, st)] == [29, 4]
    # in a run: a paused canary's two pods and three old ones; the HPA's step to eight shares the pods out
    from capsim.sim.simulate import Simulation

    sim = Simulation(_paused(), 0)
    sim.env.run(until=300)
    sim.cluster.scale_to(8, 300.0)
    by = {t: sum(1 for p in sim.cluster.live_pods if p.revision == t) for t in (0, 1)}
    assert by == {0: 6, 1: 4}  # 3 x 10/5 and 2 x 10/5: the old share grows as the new one does


def test_a_saturated_new_replicaset_finishes_its_rollout_even_while_paused() -> None:
    # maxSurge 100%: the deploy's sync gives the new ReplicaSet every replica; paused, the controller's scale()
    # still takes the old ReplicaSets to zero once the new one is saturated (IsSaturated), as upstream's does
    r = simulate(_paused(**{"pods.rolling_update": {"max_surge": "100%", "max_unavailable": 0}}), 0)
    assert r.rollouts.done_s.iloc[0] == pytest.approx(260, abs=1)


def test_a_pause_or_resume_out_of_turn_is_refused_naming_the_entry() -> None:
    with pytest.raises(SettingsError, match=r"rollouts.3.undo: the undo at 300 s comes while rollouts.1 has paused "
                                            r"the Deployment.*resume it first"):
        _paused({"at_s": 250}, {"at_s": 300, "undo": True})
    with pytest.raises(SettingsError, match=r"rollouts.2.pause: the Deployment is already paused at 300 s \(since "
                                            r"rollouts.1\)"):
        _paused({"at_s": 300, "pause": True})
    with pytest.raises(SettingsError, match=r"rollouts.1.resume: the Deployment is not paused at 300 s"):
        _fleet(**{"pods.rollouts": [{"at_s": 200}, {"at_s": 300, "resume": True}]})
    with pytest.raises(SettingsError, match=r"crash_after_s: a pause changes no template"):
        _fleet(**{"pods.rollouts": [{"at_s": 200}, {"at_s": 300, "pause": True, "crash_after_s": 5}]})
    with pytest.raises(SettingsError, match=r"resume: an entry is one action.*sets pause and resume"):
        _fleet(**{"pods.rollouts": [{"at_s": 200, "pause": True, "resume": True}]})
    # a resume and an undo at one time, in that order, is the pipeline's `kubectl rollout resume; kubectl rollout
    # undo`; entries keep their order through a dump (sweeps and --set re-validate one)
    sc = _paused({"at_s": 400, "resume": True}, {"at_s": 400, "undo": True})
    assert sc.override({"horizon_s": 800}).pods.pauses() == [(200.0, 400.0)]
    assert [ro.action for ro in sc.pods.rollouts] == ["deploy", "pause", "resume", "undo"]


def test_a_canary_check_at_the_resume_undoes_a_crashing_template_and_passes_a_good_one() -> None:
    gate = {"at_s": 500, "resume": True, "undo_if_restarted": True}
    # the broken canary's two pods crash-looped during the pause: resumed and undone at once; the old ReplicaSet
    # kept its three pods throughout, so nothing was lost and the undo only adds the pod it lacks
    r = simulate(_paused(gate, **{"pods.rollouts.0.crash_after_s": 30}), 0)
    bad, undo = r.rollouts.itertuples()
    assert bad.undone_s == 500 and undo.undo and undo.done_s == pytest.approx(560, abs=1)
    assert bad.canary_checked_s == 500 and bad.canary_failed and not undo.canary_failed
    assert r.summary.error_rate == 0.0 and r.summary.rollouts_undone == 1 and bad.min_ready == 3
    # a good template passes and the rollout finishes as with a plain resume; so does a slower one (nothing exits)
    good = simulate(_paused(gate), 0)
    assert good.summary.rollouts_undone == 0 and good.rollouts.done_s.iloc[0] == pytest.approx(560, abs=1)
    assert good.rollouts.canary_checked_s.iloc[0] == 500 and not good.rollouts.canary_failed.iloc[0]
    slow = simulate(_paused(gate, **{"pods.rollouts.0.slowdown": 2.0}), 0)
    assert slow.summary.rollouts_undone == 0
    # a template that turns ready and dies later (past the 60-s cold start) is caught as well
    late = simulate(_paused(gate, **{"pods.rollouts.0.crash_after_s": 120}), 0)
    assert late.summary.rollouts_undone == 1
    with pytest.raises(SettingsError, match="undo_if_restarted: the canary check comes with a resume"):
        _paused({"at_s": 500, "undo_if_restarted": True})


def test_a_latency_check_compares_the_canary_with_the_old_pods_and_undoes_a_slower_one() -> None:
    check = {"at_s": 500, "resume": True, "undo_if_ttft_p99_over_baseline": 1.5, "check_window_s": 200}
    # the p99 TTFT of what the canary's two pods answered from 300 to 500 s, histogram_quantile over vLLM's buckets,
    # against the three old pods' over the same window: a good version reads the same and passes
    good = simulate(_paused(check), 0)
    row = good.rollouts.iloc[0]
    assert good.summary.rollouts_undone == 0 and row.canary_ttft_p99_s == pytest.approx(row.baseline_ttft_p99_s, rel=0.05)
    assert 0.01 < row.canary_ttft_p99_s < 0.05
    # a version twice as slow reads about 1.7 times theirs: resumed and undone at the check
    slower = {"pods.rollouts.0.slowdown": 2.0}
    slow = simulate(_paused(check, **slower), 0)
    bad, undo = slow.rollouts.itertuples()
    assert bad.undone_s == 500 and undo.undo and bad.canary_ttft_p99_s > 1.5 * bad.baseline_ttft_p99_s
    # against a number instead of the old pods
    limit = {**check, "undo_if_ttft_p99_over_baseline": None, "undo_if_ttft_p99_over_s": 0.03}
    assert simulate(_paused(limit, **slower), 0).summary.rollouts_undone == 1
    assert simulate(_paused(limit), 0).summary.rollouts_undone == 0
    # a canary that answered nothing in the window (never ready) fails it, restart check or not
    broken = simulate(_paused(check, **{"pods.rollouts.0.crash_after_s": 30}), 0)
    assert math.isnan(broken.rollouts.canary_ttft_p99_s.iloc[0]) and broken.summary.rollouts_undone == 1
    # the CLI says what the check read and what the pipeline did
    out = CliRunner().invoke(app, ["simulate", str(SCENARIOS / "steady_poisson.yaml"), "--set", "horizon_s=900",
                                   "--set", "pods.replicas=4", "--set", "pods.startup_s=60", "--set",
                                   "pods.rollouts=[{at_s: 200, slowdown: 2.0}, {at_s: 200, pause: true}, {at_s: 500, "
                                   "resume: true, undo_if_ttft_p99_over_baseline: 1.5, check_window_s: 200}]"])
    assert out.exit_code == 0, out.output
    assert ("note: the canary check of the rollout at 200 s, at 500 s, failed on undo_if_ttft_p99_over_baseline: "
            "resumed and undone: its pods' p99 TTFT") in out.output
    with pytest.raises(SettingsError, match="check_window_s: the window of the metric checks"):
        _paused({"at_s": 500, "resume": True, "check_window_s": 60})
    with pytest.raises(SettingsError, match="undo_if_ttft_p99_over_baseline: the canary check comes with a resume"):
        _paused({"at_s": 500, "undo_if_ttft_p99_over_baseline": 1.2})


def test_the_inter_token_latency_check_reads_the_slowdown_itself() -> None:
    """The canary's mean inter-token latency over a window after its pods are ready, against the old pods': in the
    H100 rush (least outstanding, checked at 2,500 s over 5 minutes) a good version reads 1.000 to 1.006 times theirs
    and a version 30% slower 1.285 to 1.303 (seeds 0 to 4, docs/studies.md), the slowdown itself, where the p99 TTFT
    reads 1.24 to 1.48. Seed 0 here; over a window from the deploy it reads light (an emptier batch), and the warning
    says so."""
    from capsim.studies.checks import run_checks

    itl = {"at_s": 2500, "resume": True, "undo_if_itl_mean_over_baseline": 1.2}
    sc = Scenario.from_yaml(SCENARIOS / "canary_rush.yaml").override({"pods.rollouts.2": itl})
    slower = simulate(sc, 0).rollouts.iloc[0]
    assert slower.canary_failed and slower.undone_s == 2500
    assert 1.25 < slower.canary_itl_mean_s / slower.baseline_itl_mean_s < 1.35
    assert 0.005 < slower.baseline_itl_mean_s < 0.05 and math.isnan(slower.canary_ttft_p99_s)  # seconds; no TTFT check
    good = simulate(sc.override({"pods.rollouts.0.slowdown": 1.0}), 0).rollouts.iloc[0]
    assert not good.canary_failed and 0.97 < good.canary_itl_mean_s / good.baseline_itl_mean_s < 1.03
    # an absolute limit between the two: the slower one over it, the good one under
    limit = (good.canary_itl_mean_s + slower.canary_itl_mean_s) / 2
    absolute = sc.override({"pods.rollouts.2": {"at_s": 2500, "resume": True, "undo_if_itl_mean_over_s": limit}})
    assert simulate(absolute, 0).rollouts.canary_failed.iloc[0]
    assert not simulate(absolute.override({"pods.rollouts.0.slowdown": 1.0}), 0).rollouts.canary_failed.iloc[0]
    # a window from the deploy reads the new pods' emptier first batches: light, and the slower version passes
    early = sc.override({"pods.rollouts.2.at_s": 2200})
    (f,) = [f for f in run_checks(early) if f.check == "canary-window-before-ready"]
    assert "inter-token latency read fast" in f.message
    missed = simulate(early, 0).rollouts.iloc[0]
    assert not missed.canary_failed and missed.canary_itl_mean_s < 1.1 * missed.baseline_itl_mean_s
    # the CLI note and the export's README say what it read and the query
    out = CliRunner().invoke(app, ["simulate", str(SCENARIOS / "canary_rush.yaml"), "--set",
                                   "pods.rollouts.2={at_s: 2500, resume: true, undo_if_itl_mean_over_baseline: 1.2}"])
    assert out.exit_code == 0, out.output
    assert "failed on undo_if_itl_mean_over_baseline: resumed and undone: its pods' mean inter-token latency" \
        in out.output
    # static batching has no inter-token latency to check
    with pytest.raises(SettingsError, match=r"pods.rollouts.2: the inter-token latency check .* needs batching.mode: "
                                            "continuous"):
        _paused({"at_s": 500, "resume": True, "undo_if_itl_mean_over_baseline": 1.2})


def test_a_restart_poll_undoes_a_broken_canary_at_its_first_restart() -> None:
    """A broken canary (its containers exit 30 s after they start, inside the 60-s cold start) deployed and paused at
    200 s: checked only at the resume (500 s) it crash-loops for five minutes; with the pipeline looking every 20 s
    of the pause it is undone at 240 s, the first look after the first exits (230 s), and the resume entry then does
    nothing (one undo, not two)."""
    check = {"at_s": 500, "resume": True, "undo_if_restarted": True}
    broken = {"pods.rollouts.0.crash_after_s": 30}
    at_resume = simulate(_paused(check).override(broken), 0)
    polled = simulate(_paused({**check, "restart_poll_s": 20}).override(broken), 0)
    bad, undo = at_resume.rollouts.itertuples()
    assert bad.undone_s == 500 and bad.canary_checked_s == 500 and undo.at_s == 500
    bad, undo = polled.rollouts.itertuples()
    assert bad.undone_s == 240 and bad.canary_checked_s == 240 and bad.canary_failed
    assert undo.undo and undo.at_s == 240 and undo.done_s == pytest.approx(300)  # the old pod taken down, replaced
    assert polled.summary.rollouts_undone == 1 and polled.summary.rollout_undos_refused == 0
    # undone 40 s after the deploy; the longest rollout is the undo's own (the old pod it brings back, 60 s)
    assert polled.summary.undone_after_s == 40 and polled.summary.longest_rollout_s == pytest.approx(60)
    assert at_resume.summary.undone_after_s == 300
    assert polled.summary.crashes < at_resume.summary.crashes  # 2 against 10
    assert (polled.crashes.time_s <= 240).all() and len(polled.crashes) == polled.summary.crashes
    # a working version, and a slower one, restart nothing: the poll passes them and the resume finishes the rollout
    for version in ({}, {"pods.rollouts.0.slowdown": 1.5}):
        (ro,) = simulate(_paused({**check, "restart_poll_s": 20}).override(version), 0).rollouts.itertuples()
        assert ro.canary_checked_s == 500 and not ro.canary_failed and ro.done_s == pytest.approx(560)
    # the CLI says which look undid it
    path = SCENARIOS / "canary_rush.yaml"
    out = CliRunner().invoke(app, ["simulate", str(path), "--set", "pods.rollouts.0.crash_after_s=30",
                                   "--set", "pods.rollouts.2.restart_poll_s=30"])
    assert out.exit_code == 0, out.output
    assert ("failed on undo_if_restarted: resumed and undone by the pipeline's restart poll during the pause"
            in out.output)
    # a poll that undid the canary before any latency measurement: no caveat about a window nothing read, though the
    # resume's window (at 2,200 s, over 300 s) would have begun before the canary's pods were ready
    early = CliRunner().invoke(app, ["simulate", str(path), "--set", "pods.rollouts.0.crash_after_s=30",
                                     "--set", "pods.rollouts.2.at_s=2200"])
    assert early.exit_code == 0, early.output
    assert "at 1960 s, failed on undo_if_restarted: resumed and undone by the pipeline's restart poll" in early.output
    assert "window began before the canary's pods" not in early.output
    measured = CliRunner().invoke(app, ["simulate", str(path), "--set", "pods.rollouts.2.at_s=2200"])
    assert "its check's window began before the canary's pods could all be ready" in measured.output
    # capsim check: a poll as long as the pause never looks
    from capsim.studies.checks import run_checks

    def never(sc: Scenario) -> list:
        return [f for f in run_checks(sc) if f.check == "restart-poll-never-looks"]

    (f,) = never(_paused({**check, "restart_poll_s": 300}))
    assert f.path == "pods.rollouts.2.restart_poll_s" and "the pause it looks through lasts 300 s" in f.message
    late = simulate(_paused({**check, "restart_poll_s": 300}).override(broken), 0).rollouts
    assert late.undone_s.iloc[0] == 500  # as it says: the resume's check, not the poll
    assert not never(_paused({**check, "restart_poll_s": 299})) and not never(_paused(check))
    with pytest.raises(SettingsError, match="restart_poll_s: how often the pipeline looks for a restart"):
        _paused({"at_s": 500, "resume": True, "restart_poll_s": 20})


def test_capsim_check_warns_of_a_pause_that_holds_no_canary() -> None:
    from capsim.studies.checks import run_checks

    def found(sc: Scenario) -> list:
        return [f for f in run_checks(sc) if f.check == "pause-holds-no-canary"]

    # maxSurge 100%: the new ReplicaSet takes every replica at once, and a working version finishes paused
    double = _paused({"at_s": 500, "resume": True}, **{"pods.rolling_update": {"max_surge": "100%", "max_unavailable": 0}})
    (f,) = found(double)
    assert f.path == "pods.rollouts" and "maxSurge 100% gives the new ReplicaSet all 4 replicas" in f.message
    assert simulate(double, 0).rollouts.done_s.iloc[0] < 500  # as it says: done inside the pause
    recreate = _paused(**{"pods.strategy": "Recreate", "pods.rolling_update": {"max_surge": "25%",
                                                                              "max_unavailable": "25%"}})
    (f,) = found(recreate)
    assert "Recreate takes the old ReplicaSets to zero" in f.message
    r = simulate(recreate, 0)  # paused, the newest ReplicaSet takes every replica: done one cold start later
    assert r.rollouts.done_s.iloc[0] == pytest.approx(260, abs=1)
    # the default 25% / 25% holds its first wave; a pause before any deploy holds nothing to warn of
    assert not found(_paused({"at_s": 500, "resume": True}))
    assert not found(_fleet(**{"pods.rollouts": [{"at_s": 100, "pause": True}, {"at_s": 200},
                                                 {"at_s": 300, "resume": True}],
                               "pods.rolling_update": {"max_surge": "100%", "max_unavailable": 0}}))


def test_an_analysis_through_the_pause_undoes_at_the_measurement_over_its_failure_limit() -> None:
    """The pipeline measures the canary's p99 TTFT against the old pods' every 50 s of the pause (an Argo Rollouts
    analysis' interval), the first 170 s after the pause at 200 s (at 370 s: its 100-s window starts at 270 s, when
    the canary's pods are ready), then at 420 and 470 s, and the resume at 500 s measures last. A version twice as
    slow reads about twice the old pods' p99: undone at the measurement that makes the failures more than the
    failure limit (370 s with 0, 420 s with 1); a good one passes all four. A broken one answers nothing, which fails
    a measurement too."""
    from capsim.studies.checks import run_checks

    check = {"at_s": 500, "resume": True, "undo_if_ttft_p99_over_baseline": 1.5, "check_window_s": 100,
             "check_interval_s": 50, "check_initial_delay_s": 170}
    assert _paused(check).pods.analysis_times() == {2: [370.0, 420.0, 470.0]}
    slower, broken = {"pods.rollouts.0.slowdown": 2.0}, {"pods.rollouts.0.crash_after_s": 30}
    for limit, at in ((0, 370), (1, 420)):
        for version in (slower, broken):
            r = simulate(_paused({**check, "check_failure_limit": limit}, **version), 0)
            bad, undo = r.rollouts.itertuples()
            assert bad.undone_s == at and bad.canary_checked_s == at and bad.canary_failed
            assert bad.canary_measurements == bad.canary_failures == limit + 1
            assert undo.undo and undo.at_s == at and r.summary.rollouts_undone == 1  # one undo: the resume does nothing
            assert r.summary.undone_after_s == at - 200  # from the deploy to the undo
            assert math.isnan(bad.canary_ttft_p99_s) == (version is broken)  # nothing answered
        passed = simulate(_paused({**check, "check_failure_limit": limit}), 0)
        (good,) = passed.rollouts.itertuples()
        assert math.isnan(passed.summary.undone_after_s)
        assert good.canary_checked_s == 500 and not good.canary_failed and good.done_s == pytest.approx(560)
        assert good.canary_measurements == 4 and good.canary_failures == 0
    # a measurement fails when it reads over the limit, not the version: the slower canary's last two (at 470 and
    # 500 s) read under 1.5 times the old pods', so with a limit of 3 it passes with 2 of 4 failed; a broken one
    # fails all four and is undone at the resume, and with a limit of 4 passes even so (the limit is the user's)
    (slow,) = simulate(_paused({**check, "check_failure_limit": 3}, **slower), 0).rollouts.itertuples()
    assert not slow.canary_failed and (slow.canary_measurements, slow.canary_failures) == (4, 2)
    assert slow.canary_ttft_p99_s < 1.5 * slow.baseline_ttft_p99_s
    for limit, undone in ((3, True), (4, False)):
        r = simulate(_paused({**check, "check_failure_limit": limit}, **broken), 0).rollouts.iloc[0]
        assert r.canary_failed == undone and (r.canary_measurements, r.canary_failures) == (4, 4)
    # without the delay the first measurement comes with the pause, before the canary has answered anything: it fails,
    # and the deploy is undone at once. capsim check says so, and how long to wait
    hasty = _paused({**check, "check_initial_delay_s": 0})
    r = simulate(hasty, 0).rollouts.iloc[0]
    assert r.undone_s == 200 and math.isnan(r.canary_ttft_p99_s)
    (f,) = [f for f in run_checks(hasty) if f.check == "canary-window-before-ready"]
    assert f.path == "pods.rollouts.2.check_initial_delay_s" and "Wait 170 s or more" in f.message
    assert not [f for f in run_checks(_paused(check)) if f.check == "canary-window-before-ready"]
    assert [f for f in run_checks(_paused({**check, "check_initial_delay_s": 169}))
            if f.check == "canary-window-before-ready"]
    # a first measurement at or after the resume never comes: only the resume measures, and a failure limit above 0
    # can never be passed
    late = _paused({**check, "check_initial_delay_s": 300, "check_failure_limit": 1})
    assert late.pods.analysis_times() == {2: []}
    (f,) = [f for f in run_checks(late) if f.check == "analysis-never-measures"]
    assert f.path == "pods.rollouts.2.check_initial_delay_s" and "never undone by a measurement" in f.message
    r = simulate(late.override(broken), 0).rollouts.iloc[0]  # even a broken canary fails the resume's, and passes
    assert not r.canary_failed and (r.canary_measurements, r.canary_failures) == (1, 1)
    assert not [f for f in run_checks(_paused(check)) if f.check == "analysis-never-measures"]
    # the CLI says which measurement undid it and how many failed
    out = CliRunner().invoke(app, ["simulate", str(SCENARIOS / "canary_rush.yaml"), "--set",
                                   "pods.rollouts.2={at_s: 2500, resume: true, undo_if_ttft_p99_over_baseline: 1.2, "
                                   "check_window_s: 120, check_interval_s: 60, check_initial_delay_s: 250, "
                                   "check_failure_limit: 1}"])
    assert out.exit_code == 0, out.output
    assert ("failed on undo_if_ttft_p99_over_baseline: resumed and undone by the pipeline's analysis during the "
            "pause (2 of 2 measurements failed a limit, each limit's failure limit 1)") in out.output
    for bad_entry, match in (
            ({"check_interval_s": 50, "undo_if_ttft_p99_over_baseline": None, "check_window_s": 300},
             "check_interval_s: how often the pipeline measures the canary during the pause, which needs a metric "
             "check"),
            ({"check_interval_s": None, "check_initial_delay_s": 0, "check_failure_limit": 1},
             "check_failure_limit: a setting of the "
             "measurements during the pause, which needs check_interval_s"),
            ({"check_interval_s": None, "check_initial_delay_s": 10}, "check_initial_delay_s: a setting of the"),
            ({"check_failure_limit": -1}, "check_failure_limit"),
            ({"check_interval_s": 0}, "check_interval_s")):
        with pytest.raises(SettingsError, match=match):
            _paused({**check, **bad_entry})


def test_the_inter_token_latency_analysis_catches_the_slower_canary_at_its_first_measurement() -> None:
    """In the H100 rush (docs/studies.md, "Measuring through the pause") the canary's mean inter-token latency
    measured every 60 s over 2 minutes from 2,150 s reads the slowdown itself at the first measurement: a version 30%
    slower is undone then, 350 s before the resume, a good one passes every measurement (seed 0 here)."""
    itl = {"at_s": 2500, "resume": True, "undo_if_itl_mean_over_baseline": 1.2, "check_window_s": 120,
           "check_interval_s": 60, "check_initial_delay_s": 250}
    sc = Scenario.from_yaml(SCENARIOS / "canary_rush.yaml").override({"pods.rollouts.2": itl})
    assert sc.pods.analysis_times() == {2: [2150.0, 2210.0, 2270.0, 2330.0, 2390.0, 2450.0]}
    slower = simulate(sc, 0).rollouts.iloc[0]
    assert slower.undone_s == slower.canary_checked_s == 2150 and slower.canary_measurements == 1
    assert 1.25 < slower.canary_itl_mean_s / slower.baseline_itl_mean_s < 1.35
    good = simulate(sc.override({"pods.rollouts.0.slowdown": 1.0}), 0).rollouts.iloc[0]
    assert not good.canary_failed and (good.canary_measurements, good.canary_failures) == (7, 0)
    assert 0.95 < good.canary_itl_mean_s / good.baseline_itl_mean_s < 1.05


def _continuous_fleet(**extra: Any) -> Scenario:
    """Two continuous-batching pods, each step 10 ms, up to 16 requests running and 1,000 KV blocks a pod, ready 20 s
    after they start; a load that keeps several running on each."""
    base = {"horizon_s": 400, "warmup_s": 0,
            "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 40},
                         "prompt_tokens": {"kind": "constant", "value": 100},
                         "output_tokens": {"kind": "constant", "value": 20}},
            "service": {"kind": "deterministic", "mean_s": 0.01},
            "batching": {"mode": "continuous", "num_blocks": 1000, "max_num_seqs": 16, "max_num_batched_tokens": 512},
            "pods": {"replicas": 2, "startup_s": 20}, "client": {"timeout_s": 30, "max_retries": 0}}
    return Scenario.model_validate(base).override(extra)


def test_a_deploy_of_engine_flags_gives_the_new_pods_their_limits_and_an_undo_takes_them_back() -> None:
    """``pods.rollouts[].batching``: a new template's vLLM arguments (here ``--max-num-seqs 1`` and a KV cache of 14
    blocks, room for two requests of 120 tokens). The new pods run one request at a time and preempt none (one
    fits); an undo brings back pods with the scenario's limits: several running at once, as before."""
    from capsim.sim.simulate import Simulation

    flags = {"max_num_seqs": 1}
    sim = Simulation(_continuous_fleet(**{"pods.rollouts": [{"at_s": 100, "batching": flags},
                                                            {"at_s": 250, "undo": True}]}), 0)
    r = sim.run()
    revision = {p.id: p.revision for p in sim.cluster.pods}
    req = r.requests[r.requests.outcome == "ok"]
    by_template = req.assign(template=req["pod"].map(revision)).groupby("template")["batch_size"].max()
    assert by_template[1] == 1 and by_template[0] > 2  # the old pods (and the undo's) batch; the new ones do not
    undo_pods = {p.id for p in sim.cluster.pods if p.revision == 0 and p.created_s >= 250}
    assert undo_pods and req[req["pod"].isin(undo_pods)].batch_size.max() > 2
    # a KV cache too small for the load: only the new template's pods preempt
    small = Simulation(_continuous_fleet(**{"pods.rollouts": [{"at_s": 100, "batching": {"num_blocks": 14}}]}), 0)
    r = small.run()
    revision = {p.id: p.revision for p in small.cluster.pods}
    pre = r.requests.assign(template=r.requests["pod"].map(revision)).groupby("template")["preemptions"].sum()
    assert pre.get(0, 0) == 0 and pre[1] > 0
    # the flags are checked as the scenario's batching section is, with the entry's path; static pods have none
    with pytest.raises(SettingsError, match=r"pods.rollouts.0.batching.block_size is not a known setting"):
        _continuous_fleet(**{"pods.rollouts": [{"at_s": 100, "batching": {"block_size": 32}}]})
    with pytest.raises(SettingsError, match=r"pods.rollouts.0.batching.max_num_seqs must be >= 1"):
        _continuous_fleet(**{"pods.rollouts": [{"at_s": 100, "batching": {"max_num_seqs": 0}}]})
    with pytest.raises(SettingsError, match=r"pods.rollouts.0.batching: gpu_memory_utilization sizes the KV cache "
                                            r"from batching.gpu_memory_gb"):
        _continuous_fleet(**{"pods.rollouts": [{"at_s": 100, "batching": {"gpu_memory_utilization": 0.5}}]})
    with pytest.raises(SettingsError, match=r"pods.rollouts.0.batching: a template's engine flags need "
                                            r"batching.mode: continuous"):
        _fleet(**{"pods.rollouts": [{"at_s": 100, "batching": {"max_num_seqs": 4}}]})
    with pytest.raises(SettingsError, match=r"batching: an undo goes back to an earlier template"):
        _continuous_fleet(**{"pods.rollouts": [{"at_s": 100}, {"at_s": 200, "undo": True,
                                                               "batching": {"max_num_seqs": 4}}]})
    # on an H100 (blocks from the GPU's memory) a lower --gpu-memory-utilization leaves fewer blocks
    rush = Scenario.from_yaml(SCENARIOS / "canary_rush.yaml")
    lower = rush.override({"pods.rollouts.0.batching": {"gpu_memory_utilization": 0.5}}).pods.rollouts[0].batching
    assert lower is not None and lower.apply(rush.batching).kv_cache_blocks() < rush.batching.kv_cache_blocks() / 2


def test_a_canary_of_capping_engine_flags_reads_fast_between_tokens_and_slow_to_its_first() -> None:
    """In the H100 rush (docs/studies.md, "A canary of engine flags") a deploy of ``--max-num-seqs 32`` (from 1,024)
    caps each new pod's batch: its requests wait for a slot, so the canary's p99 TTFT reads over 1.2 times the old
    pods' (undone at the second failed measurement, 310 s after the deploy, with a failure limit of 1), while its
    mean inter-token latency reads *under* theirs (fewer requests share each step) and an ITL gate passes it. Seed
    0 here."""
    def canary(check: dict) -> Scenario:
        gate = {"at_s": 2500, "resume": True, "check_window_s": 120, "check_interval_s": 60,
                "check_initial_delay_s": 250, **check}
        return Scenario.from_yaml(SCENARIOS / "canary_rush.yaml").override(
            {"pods.rollouts": [{"at_s": 1900, "batching": {"max_num_seqs": 32}}, {"at_s": 1900, "pause": True}, gate]})

    p99 = simulate(canary({"undo_if_ttft_p99_over_baseline": 1.2, "check_failure_limit": 1}), 0)
    row = p99.rollouts.iloc[0]
    assert p99.summary.undone_after_s == 310 and row.canary_ttft_p99_s > 1.2 * row.baseline_ttft_p99_s
    itl = simulate(canary({"undo_if_itl_mean_over_baseline": 1.2}), 0)
    row = itl.rollouts.iloc[0]
    assert itl.summary.rollouts_undone == 0 and row.canary_measurements == 7 and row.canary_failures == 0
    assert row.canary_itl_mean_s < row.baseline_itl_mean_s


def test_an_error_rate_check_undoes_a_canary_that_turns_requests_away() -> None:
    """``undo_if_error_rate_over``: the share of the attempts the canary's pods ended with an error over the window
    (an Argo Rollouts success-rate analysis). A new template with ``--max-model-len 110`` turns away every request of
    120 tokens (vLLM's 400, unservable): its two pods' error rate reads 1 against the old pods' 0, and the check at
    the resume undoes it; with the scenario's flags the canary answers everything and passes."""
    from capsim.sim.simulate import Simulation

    check = {"at_s": 300, "resume": True, "undo_if_error_rate_over": 0.05, "check_window_s": 100}
    steps = [{"at_s": 100, "batching": {"max_model_len": 110}}, {"at_s": 100, "pause": True}, check]
    sim = Simulation(_continuous_fleet(**{"pods.rollouts": steps}), 0)
    r = sim.run()
    bad = r.rollouts.iloc[0]
    assert bad.canary_failed and bad.undone_s == 300
    assert bad.canary_error_rate == 1.0 and bad.baseline_error_rate == 0.0
    canary = [p for p in sim.cluster.pods if p.revision == 1]  # the pause's one, and the resume's, undone at once
    assert sum(p.answered for p in canary) == 0 and canary[0].errors > 1000
    turned_away = r.requests[r.requests.unservable]
    assert set(turned_away["pod"]) == {canary[0].id} and len(turned_away) <= canary[0].errors
    assert sum(p.answered for p in sim.cluster.pods) == r.summary.completed
    good = simulate(_continuous_fleet(**{"pods.rollouts": [{"at_s": 100}, *steps[1:]]}), 0).rollouts.iloc[0]
    assert not good.canary_failed and good.canary_error_rate == 0.0
    with pytest.raises(SettingsError, match="undo_if_error_rate_over: the canary check comes with a resume"):
        _continuous_fleet(**{"pods.rollouts": [{"at_s": 100, "undo_if_error_rate_over": 0.1}]})
    with pytest.raises(SettingsError, match="undo_if_error_rate_over"):
        _continuous_fleet(**{"pods.rollouts": [steps[0], steps[1], {**check, "undo_if_error_rate_over": 1.5}]})


def test_a_canary_that_rejects_long_prompts_reads_fast_and_only_its_error_rate_catches_it() -> None:
    """In the H100 rush (docs/studies.md, "A canary of engine flags") ``--max-model-len 4096`` (from 8,192) turns
    away the agents' longest turns: the canary answers the rest faster than the old pods (its p99 TTFT reads under
    theirs, and the p99 gate passes it in every measurement) while 2.5% of its attempts fail, and an error-rate gate
    of 1% undoes it at its first measurement. Seed 0 here."""
    def canary(check: dict) -> Scenario:
        gate = {"at_s": 2500, "resume": True, "check_window_s": 120, "check_interval_s": 60,
                "check_initial_delay_s": 250, **check}
        return Scenario.from_yaml(SCENARIOS / "canary_rush.yaml").override(
            {"pods.rollouts": [{"at_s": 1900, "batching": {"max_model_len": 4096}}, {"at_s": 1900, "pause": True},
                               gate]})

    p99 = simulate(canary({"undo_if_ttft_p99_over_baseline": 1.2}), 0).rollouts.iloc[0]
    assert not p99.canary_failed and (p99.canary_measurements, p99.canary_failures) == (7, 0)
    assert p99.canary_ttft_p99_s < p99.baseline_ttft_p99_s
    errors = simulate(canary({"undo_if_error_rate_over": 0.01}), 0)
    row = errors.rollouts.iloc[0]
    assert errors.summary.undone_after_s == 250 and 0.01 < row.canary_error_rate < 0.05
    assert row.baseline_error_rate == 0.0


def test_an_error_rate_from_the_pods_own_count_leaves_a_scale_downs_refusals_out() -> None:
    """``error_rate_source``: in the H100 rush (docs/studies.md, "A canary of engine flags") the HPA scales down
    after the peak while a good canary is paused, the ReplicaSets' shares take a canary pod each time, and in the
    moment before it leaves the endpoints it refuses what it is sent (503, retried elsewhere). As the gateway
    counts them (the default) those refusals make 1.9% of the canary's attempts in the window and the three gates
    (failure limit 1) undo the good canary at 2,450 s, 550 s after its deploy; as the pods' own servers count them
    (``pod``: a draining server takes no more requests and counts none) the canary reads no error and rolls out.
    Every error of that run is a refusal (``Pod.refused``), the old pods' too. A canary that turns requests away
    (``--max-model-len 4096``) answers its 400s itself: the pods' own count catches it as the gateway's does. Seed 1
    here (seed 0 for the short context)."""
    from capsim.sim.simulate import Simulation

    def canary(version: dict, source: str) -> Scenario:
        gate = {"at_s": 2500, "resume": True, "check_window_s": 120, "check_interval_s": 60,
                "check_initial_delay_s": 250, "check_failure_limit": 1, "undo_if_ttft_p99_over_baseline": 1.2,
                "undo_if_itl_mean_over_baseline": 1.2, "undo_if_error_rate_over": 0.01, "error_rate_source": source}
        return Scenario.from_yaml(SCENARIOS / "canary_rush.yaml").override(
            {"pods.rollouts": [{"at_s": 1900, **version}, {"at_s": 1900, "pause": True}, gate]})

    gateway = Simulation(canary({}, "gateway"), 1)
    r = gateway.run()
    row = r.rollouts.iloc[0]
    assert row.canary_failed and r.summary.undone_after_s == 550 and row.canary_failures == 2
    assert row.canary_error_rate > 0.01 > row.baseline_error_rate > 0
    refusals = [p.refused for p in gateway.cluster.pods if p.revision == 1]
    assert sum(refusals) > 50 and all(p.refused == p.errors for p in gateway.cluster.pods)
    pod = simulate(canary({}, "pod"), 1)
    row = pod.rollouts.iloc[0]
    assert not row.canary_failed and pod.summary.rollouts_undone == 0 and row.canary_measurements == 7
    assert row.canary_error_rate == 0.0 and row.baseline_error_rate == 0.0
    short = simulate(canary({"batching": {"max_model_len": 4096}}, "pod"), 0)
    row = short.rollouts.iloc[0]
    assert short.summary.undone_after_s == 310 and 0.01 < row.canary_error_rate < 0.05
    # capsim check warns of the gateway's count under an autoscaler that may scale the paused canary down
    from capsim.studies.checks import run_checks

    (f,) = [f for f in run_checks(canary({}, "gateway")) if f.check == "gateway-errors-under-autoscaler"]
    assert f.path == "pods.rollouts.2.error_rate_source" and "(from 1900 s; replicas 6 to 32)" in f.message
    assert not [f for f in run_checks(canary({}, "pod")) if f.check == "gateway-errors-under-autoscaler"]
    fixed = canary({}, "gateway").override({"autoscaler.maxReplicas": 6})  # nothing to scale: no warning
    assert not [f for f in run_checks(fixed) if f.check == "gateway-errors-under-autoscaler"]
    with pytest.raises(SettingsError, match="error_rate_source: whose errors the error-rate check counts, which "
                                            "needs undo_if_error_rate_over"):
        canary({}, "pod").override({"pods.rollouts.2.undo_if_error_rate_over": None})
    with pytest.raises(SettingsError, match="error_rate_source"):
        canary({}, "engine")


def test_an_error_rate_against_the_old_pods_reads_no_store_outage_as_the_canarys() -> None:
    """``undo_if_error_rate_over_baseline_by``: in the H100 rush (docs/studies.md, "A store outage during a canary")
    Redis is out for 30 s during a good canary's pause. Every pod answers 503 to the turns it cannot read then (and
    its store writes fail), the old pods' as the canary's: the canary's error rate reads over a fixed 1% in two
    windows (undone 490 s after the deploy, at the second failed measurement), but within a point of the old pods'
    (it rolls out). The same gate still undoes
    a canary that turns requests away (``--max-model-len 4096``) at 310 s through the outage, and ``capsim check``
    warns of the fixed limit over the outage. Seed 0 here."""
    from capsim.studies.checks import run_checks

    def canary(version: dict, gate: dict) -> Scenario:
        resume = {"at_s": 2500, "resume": True, "check_window_s": 120, "check_interval_s": 60,
                  "check_initial_delay_s": 250, "check_failure_limit": 1, "error_rate_source": "pod", **gate}
        return Scenario.from_yaml(SCENARIOS / "canary_rush.yaml").override(
            {"pods.rollouts": [{"at_s": 1900, **version}, {"at_s": 1900, "pause": True}, resume],
             "faults.redis_outages": [{"at_s": 2300, "duration_s": 30}]})

    fixed = canary({}, {"undo_if_error_rate_over": 0.01})
    r = simulate(fixed, 0)
    row = r.rollouts.iloc[0]
    assert r.summary.undone_after_s == 490 and row.canary_error_rate > 0.01 and row.baseline_error_rate > 0.01
    against = canary({}, {"undo_if_error_rate_over_baseline_by": 0.01})
    r = simulate(against, 0)
    row = r.rollouts.iloc[0]
    assert r.summary.rollouts_undone == 0 and row.canary_measurements == 7
    short = simulate(canary({"batching": {"max_model_len": 4096}}, {"undo_if_error_rate_over_baseline_by": 0.01}), 0)
    row = short.rollouts.iloc[0]
    assert short.summary.undone_after_s == 310 and row.canary_error_rate > row.baseline_error_rate + 0.01
    (f,) = [f for f in run_checks(fixed) if f.check == "error-gate-in-store-outage"]
    assert f.path == "pods.rollouts.2.undo_if_error_rate_over" and f.level == "warn"
    assert "out from 2300 to 2330 s, inside the window of the canary's measurements at 2330 and 2390 s" in f.message
    assert not [f for f in run_checks(against) if f.check == "error-gate-in-store-outage"]
    assert not [f for f in run_checks(fixed.override({"faults.redis_outages": [{"at_s": 2600, "duration_s": 30}]}))
                if f.check == "error-gate-in-store-outage"]  # after the resume: no window holds it
    with pytest.raises(SettingsError, match="undo_if_error_rate_over_baseline_by: the canary check comes with a "
                                            "resume"):
        fixed.override({"pods.rollouts.0.undo_if_error_rate_over_baseline_by": 0.01})
    with pytest.raises(SettingsError, match="undo_if_error_rate_over_baseline_by"):
        fixed.override({"pods.rollouts.2.undo_if_error_rate_over_baseline_by": 0})


def test_capsim_check_estimates_the_share_of_requests_a_setting_turns_away() -> None:
    """``requests-unservable``: the share of the workload's requests longer than ``max_model_len`` (or needing more KV
    blocks than the cache), estimated from the token distributions, for the scenario's settings and each deploy's
    flags; it agrees with what the simulated pods with those flags turned away."""
    from capsim.sim.simulate import Simulation
    from capsim.studies.checks import requests_unservable, run_checks

    rush = Scenario.from_yaml(SCENARIOS / "canary_rush.yaml")
    assert not [f for f in run_checks(rush) if f.check == "requests-unservable"]
    short = rush.override({"pods.rollouts": [{"at_s": 1900, "batching": {"max_model_len": 4096}}]})
    (f,) = requests_unservable(short)
    assert f.path == "pods.rollouts.0.batching.max_model_len" and f.level == "warn"
    estimated = float(f.message.split("%")[0]) / 100
    sim = Simulation(short, 0)
    req = sim.run().requests
    revision = {p.id: p.revision for p in sim.cluster.pods}
    on_new = req[req["pod"].map(revision) == 1]
    assert len(on_new) > 10_000 and abs(on_new.unservable.mean() - estimated) < 0.01  # 3.0% against ~3%
    (f,) = requests_unservable(rush.override({"pods.rollouts.0.batching": {"num_blocks": 300}}))
    assert f.path == "pods.rollouts.0.batching.num_blocks" and "300 blocks of 16 tokens" in f.message
    (f,) = requests_unservable(rush.override({"batching.max_model_len": 4096}))
    assert f.path == "batching.max_model_len"
    assert not requests_unservable(_fleet())  # static pods turn nothing away by length

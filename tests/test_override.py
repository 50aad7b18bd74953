"""Scenario.override: dotted paths through sections and list indices, with errors that name the path."""

from __future__ import annotations

from pathlib import Path

import pytest

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError

ROOT = Path(__file__).resolve().parent.parent
RUSH = ROOT / "data" / "scenarios" / "friday_rush.yaml"


@pytest.fixture(scope="module")
def rush() -> Scenario:
    return Scenario.from_yaml(RUSH)


def test_list_index_path_reaches_the_hpa_target(rush: Scenario) -> None:
    new = rush.override({"autoscaler.metrics.0.pods.target.averageValue": "12"})
    assert new.autoscaler is not None and rush.autoscaler is not None
    assert new.autoscaler.metrics[0]["pods"]["target"]["averageValue"] == "12"
    assert new.autoscaler.to_hpa().metrics[0].target == pytest.approx(12)
    # the original is untouched (override copies)
    assert rush.autoscaler.metrics[0]["pods"]["target"]["averageValue"] == "8"


def test_nested_list_in_behavior_and_kubernetes_spelling(rush: Scenario) -> None:
    new = rush.override({"autoscaler.behavior.scaleUp.policies.1.value": 200, "autoscaler.minReplicas": 5})
    assert new.autoscaler is not None and rush.autoscaler is not None
    assert new.autoscaler.behavior is not None and rush.autoscaler.behavior is not None
    assert new.autoscaler.behavior["scaleUp"]["policies"][1]["value"] == 200
    assert new.autoscaler.behavior["scaleUp"]["policies"][0] == rush.autoscaler.behavior["scaleUp"]["policies"][0]
    assert new.autoscaler.min_replicas == 5


def test_index_equal_to_length_appends(rush: Scenario) -> None:
    extra = {"type": "Pods", "pods": {"metric": {"name": "capsim_requests_in_flight"},
                                      "target": {"type": "AverageValue", "averageValue": "40"}}}
    new = rush.override({"autoscaler.metrics.1": extra})
    assert new.autoscaler is not None
    assert len(new.autoscaler.metrics) == 2 and new.autoscaler.metrics[1] == extra


def test_missing_section_is_created(rush: Scenario) -> None:
    assert rush.faults is None
    new = rush.override({"faults.crashes": [{"at_s": 1900, "pods": 2}]})
    assert new.faults is not None and new.faults.crashes[0].pods == 2
    assert new.faults.pod_mtbf_s is None and new.faults.redis_outages == ()  # the rest keeps its defaults


@pytest.mark.parametrize(("path", "words"), [
    ("autoscaler.metrics.3.pods", "index 3 is past the end of autoscaler.metrics (length 1)"),
    ("autoscaler.metrics.first", "autoscaler.metrics is a list, 'first' is not an index"),
    ("horizon_s.value", "horizon_s is a float, not a section"),
    ("pods..replicas", "empty part"),
])
def test_bad_paths_name_the_path(rush: Scenario, path: str, words: str) -> None:
    with pytest.raises(SettingsError, match="override path") as info:
        rush.override({path: 1})
    assert path in str(info.value) and words in str(info.value)


def test_a_bad_value_still_names_the_field(rush: Scenario) -> None:
    with pytest.raises(SettingsError, match="max_batch_size"):
        rush.override({"batching.max_batch_size": 0})


def test_a_path_into_a_value_set_before_leaves_the_callers_object_alone(rush: Scenario) -> None:
    # a sweep's bundle sets a list and a later axis a field of its first entry: the bundle, shared by every
    # setting of the grid, must come out as it went in (it did not: the second setting saw the first's field)
    entries = [{"at_s": 100}, {"at_s": 200, "undo": True}]
    broken = rush.override({"pods.rollouts": entries, "pods.rollouts.0.crash_after_s": 30})
    assert entries == [{"at_s": 100}, {"at_s": 200, "undo": True}]
    assert broken.pods.rollouts[0].crash_after_s == 30
    good = rush.override({"pods.rollouts": entries, "pods.rollouts.0.slowdown": 1.3})
    assert good.pods.rollouts[0].crash_after_s is None and good.pods.rollouts[0].slowdown == 1.3
    from capsim.studies.sweep import expand_grid

    grid = {"rollouts": [{"name": "canary", "set": {"pods.rollouts": entries}}],
            "version": [{"name": "broken", "set": {"pods.rollouts.0.crash_after_s": 30}},
                        {"name": "slower", "set": {"pods.rollouts.0.slowdown": 1.3}}]}
    made = [rush.override(s.changes).pods.rollouts[0] for s in expand_grid(grid)]
    assert [(r.crash_after_s, r.slowdown) for r in made] == [(30, 1.0), (None, 1.3)]

"""A scenario file's ``include:`` (capsim.model.includes): a validation's calibrated pod taken into a plan by one
line, the plan's own keys over it, the fragment's paths found beside it, and errors that name the file and entry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim import simulate

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "data" / "profiles" / "cpu-tiny-float32.csv"

PLAN = {"horizon_s": 30, "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 20.0},
                                      "prompt_tokens": {"kind": "constant", "value": 64},
                                      "output_tokens": {"kind": "constant", "value": 32}}}


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture()
def fragment(tmp_path: Path) -> Path:
    """A calibrated pod as ``capsim validate`` leaves it: service.yaml beside its profile, named by a path
    relative to where the validation ran (here: the folder above the fragment's)."""
    cal = tmp_path / "runs" / "cal"
    cal.mkdir(parents=True)
    shutil.copy(PROFILE, cal / "profile.csv")
    return _write(cal / "service.yaml", {
        "service": {"kind": "profile", "profile": "cal/profile.csv", "time_scale": 1.3, "answer_ms": 2.0},
        "batching": {"mode": "continuous", "max_num_seqs": 16, "max_num_batched_tokens": 512, "num_blocks": 1024}})


def test_a_plan_takes_the_calibrated_pod_and_its_own_keys_win(tmp_path: Path, fragment: Path) -> None:
    plan = _write(tmp_path / "plans" / "plan.yaml", {
        "include": "../runs/cal/service.yaml", **PLAN,
        "service": {"extrapolate": True}, "batching": {"max_model_len": 4096, "max_num_seqs": 8}})
    sc = Scenario.from_yaml(plan)
    # the fragment's service, with the plan's key added; its batching under the plan's (one level deep)
    assert (sc.service.time_scale, sc.service.answer_ms, sc.service.extrapolate) == (1.3, 2.0, True)
    assert (sc.batching.mode, sc.batching.max_num_seqs, sc.batching.max_num_batched_tokens) == ("continuous", 8, 512)
    assert (sc.batching.max_model_len, sc.batching.num_blocks) == (4096, 1024)
    # the profile the fragment names is the one beside it, though the plan lives elsewhere
    assert Path(sc.service.profile) == (fragment.parent / "profile.csv").resolve()
    assert sc.resolve(sc.service.profile).exists()
    assert simulate(sc, seed=0).summary.completed > 400


def test_later_includes_override_earlier_ones_and_the_same_file_loads_alike(tmp_path: Path, fragment: Path) -> None:
    _write(tmp_path / "slower.yaml", {"service": {"time_scale": 2.0}, "pods": {"replicas": 3}})
    plan = _write(tmp_path / "plan.yaml", {"include": [str(fragment), "slower.yaml"], **PLAN})
    sc = Scenario.from_yaml(plan)
    assert (sc.service.time_scale, sc.service.answer_ms, sc.pods.replicas) == (2.0, 2.0, 3)
    # the loaded scenario holds the settings, not the include: a copy made from it needs no files
    data = sc.model_dump(by_alias=True)
    assert "include" not in data and Scenario.model_validate(data).model_dump(by_alias=True) == data
    assert Scenario.from_yaml(plan) == sc


def test_the_committed_calibrated_pod_can_be_included_from_any_folder(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # neither the working directory nor the plan's folder holds the profile
    plan = _write(tmp_path / "plan.yaml", {"include": str(ROOT / "data" / "validation" / "service.yaml"), **PLAN})
    sc = Scenario.from_yaml(plan)
    assert sc.service.first_token_scale > 1 and sc.service.cycle_noise
    assert Path(sc.service.profile) == (ROOT / "data" / "validation" / "profile.csv").resolve()
    assert simulate(sc, seed=0).summary.completed > 400


@pytest.mark.parametrize(("include", "message"), [
    ("nowhere.yaml", r"plan.yaml: include.0: nowhere.yaml not found"),
    ([], None),  # an empty list includes nothing
    (3, r"include must be a file path or a list of file paths, got 3"),
    (["ok.yaml", ""], r"include must be a file path or a list of file paths"),
    ("list.yaml", r"include.0: .*list.yaml must be a mapping of settings, got list"),
    ("self.yaml", r"include.0: .*self.yaml includes itself \(.*self.yaml -> .*self.yaml\)"),
    ("loop_a.yaml", r"include.0: .*loop_a.yaml: include.0: .*loop_b.yaml: include.1: .*loop_a.yaml includes "
                    r"itself \(.*loop_a.yaml -> .*loop_b.yaml -> .*loop_a.yaml\)"),
    ("deep.yaml", r"include.0: .*deep.yaml: include.1: missing.yaml not found"),
    ("plan.yaml", r"include.0: .*plan.yaml includes itself \(.*plan.yaml -> .*plan.yaml\)"),
    ("broken.yaml", r"include.0: .*broken.yaml: not valid YAML at line 2"),
])
def test_a_bad_include_names_the_file_and_the_entry(tmp_path: Path, include: object, message: str | None) -> None:
    _write(tmp_path / "ok.yaml", {"pods": {"replicas": 2}})
    _write(tmp_path / "list.yaml", [1, 2])
    _write(tmp_path / "self.yaml", {"include": "self.yaml"})
    _write(tmp_path / "loop_a.yaml", {"include": "loop_b.yaml"})
    _write(tmp_path / "loop_b.yaml", {"include": ["ok.yaml", "loop_a.yaml"]})  # ok.yaml before the loop: read
    _write(tmp_path / "deep.yaml", {"include": ["ok.yaml", "missing.yaml"]})
    (tmp_path / "broken.yaml").write_text("service: {kind: [\n")
    plan = _write(tmp_path / "plan.yaml", {"include": include, **PLAN,
                                           "service": {"kind": "profile", "profile": str(PROFILE)}})
    if message is None:
        assert Scenario.from_yaml(plan).pods.replicas == 1
        return
    with pytest.raises(SettingsError, match=message):
        Scenario.from_yaml(plan)


def test_a_setting_from_an_include_is_validated_as_the_plans_own(tmp_path: Path) -> None:
    _write(tmp_path / "bad.yaml", {"batching": {"max_num_seqs": 0}})
    plan = _write(tmp_path / "plan.yaml", {"include": "bad.yaml", **PLAN,
                                           "service": {"kind": "profile", "profile": str(PROFILE)}})
    with pytest.raises(SettingsError, match=r"plan.yaml: .*batching.max_num_seqs"):
        Scenario.from_yaml(plan)


def test_an_included_file_may_include_others_each_level_under_its_includer(tmp_path: Path, fragment: Path) -> None:
    # base.yaml (beside the calibrated pod's folder) takes the pod and sets a fleet; the plan takes base.yaml
    base = _write(tmp_path / "runs" / "base.yaml", {
        "include": "cal/service.yaml", **PLAN,
        "service": {"time_scale": 1.5}, "pods": {"replicas": 3}, "batching": {"max_num_seqs": 12}})
    plan = _write(tmp_path / "plans" / "plan.yaml", {
        "include": str(base), "pods": {"replicas": 2}, "batching": {"max_model_len": 2048}})
    sc = Scenario.from_yaml(plan)
    # the plan over base.yaml over the fragment, a mapping merged key by key at each level
    assert (sc.service.time_scale, sc.service.answer_ms) == (1.5, 2.0)
    assert (sc.pods.replicas, sc.horizon_s) == (2, 30)
    assert (sc.batching.mode, sc.batching.max_num_seqs, sc.batching.num_blocks, sc.batching.max_model_len) == (
        "continuous", 12, 1024, 2048)
    # the fragment's profile found beside the fragment, two files away from the plan
    assert Path(sc.service.profile) == (fragment.parent / "profile.csv").resolve()
    # two files including the same one is no loop
    _write(tmp_path / "other.yaml", {"include": str(fragment), "pods": {"replicas": 4}})
    both = _write(tmp_path / "both.yaml", {"include": [str(base), str(tmp_path / "other.yaml")]})
    assert Scenario.from_yaml(both).pods.replicas == 4


def test_a_plan_on_a_shipped_scenario_that_takes_the_calibrated_pod(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = ROOT / "data" / "scenarios" / "calibrated_pod.yaml"
    plan = _write(tmp_path / "plan.yaml", {"include": str(shipped), "horizon_s": 60, "warmup_s": 10,
                                           "autoscaler": {"minReplicas": 2}})
    sc, ref = Scenario.from_yaml(plan), Scenario.from_yaml(shipped)
    assert (sc.horizon_s, ref.horizon_s) == (60, 1800)
    assert sc.service == ref.service and sc.batching == ref.batching and sc.workload == ref.workload
    assert sc.autoscaler.min_replicas == 2 and sc.autoscaler.max_replicas == ref.autoscaler.max_replicas
    assert simulate(sc, seed=0).summary.completed > 1000

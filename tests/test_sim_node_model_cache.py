"""The model's files on the node (``pods.node_model_cache``): a new pod placed on a node where a container of its
image has loaded the model starts in ``pods.restart_startup_s``, as a restart in place does; a node that never ran
it, a new image, or a pod placed while the node's first container still loads starts cold."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import yaml

from capsim.export.pod import build_deployment_patch
from capsim.export.target import DeployTarget
from capsim.export.writer import export_scenario
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.sim.simulate import Simulation
from capsim.studies.checks import run_checks


def scenario(cache: bool = True, dotted: dict[str, Any] | None = None, **changes: Any) -> Scenario:
    """Idle traffic; a cold start of 60 s, a warm one of 10 s (probes every 10 s from each pod's placement, so both
    land on a probe); nodes of 2 GPUs, provisioned in 30 s, none removed within the run."""
    s = Scenario.model_validate({
        "horizon_s": 400,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 0.001}},
        "service": {"kind": "deterministic", "mean_s": 0.1},
        "pods": {"replicas": 1, "startup_s": 60, "restart_startup_s": 10, "node_model_cache": cache,
                 "endpoints_propagation_s": 0.0},
        "cluster": {"max_gpus": 8, "node_gpus": 2, "node_provision_s": 30, "scale_down_enabled": False},
    })
    changes.update(dotted or {})
    return s.override(changes) if changes else s


def run(s: Scenario, *steps: tuple[float, int]) -> tuple[Simulation, Any]:
    """Scale to each count at its time, run to the horizon: the simulation and its result."""
    sim = Simulation(s, seed=0)

    def proc() -> Generator[Any, Any, None]:
        for t, n in steps:
            yield sim.env.timeout(t - sim.env.now)
            sim.cluster.scale_to(n, t)
    sim.env.process(proc())
    return sim, sim.run()


def timeline(ran: tuple[Simulation, Any]) -> dict[int, tuple[int, float, float]]:
    """Pod id -> (its node, its first placement, its first ready time)."""
    sim, res = ran
    out: dict[int, tuple[int, float, float]] = {}
    for row in res.placements.itertuples():
        if row.pod not in out:
            pod = sim.cluster.pods[row.pod]
            assert pod.first_ready_s is not None, f"pod {row.pod} never ready"
            out[row.pod] = (row.node, row.time_s, pod.first_ready_s)
    return out


def test_a_pod_on_the_node_that_ran_the_model_starts_warm_and_one_on_a_new_node_cold() -> None:
    # pod 0 ran at 0 on node 0; pod 1 takes node 0's other GPU at 0 and loads in 10 s (ready at 10); pods 2 and 3
    # wait for node 1 (ready at 30) and load cold, 60 s (ready at 90); pod 4 at 100 waits for node 2 (cold, 130 + 60)
    t = timeline(run(scenario(), (0.0, 4), (100.0, 5)))
    assert t[1] == (0, 0.0, 10.0)
    assert t[2] == (1, 30.0, 90.0) and t[3] == (1, 30.0, 90.0)
    assert t[4] == (2, 130.0, 190.0)
    # without the node's cache pod 1 is as cold as the rest
    cold = timeline(run(scenario(cache=False), (0.0, 4)))
    assert cold[1] == (0, 0.0, 60.0) and cold[2] == (1, 30.0, 90.0)


def test_a_node_holds_the_model_once_a_container_has_loaded_it() -> None:
    # two pods on node 0 (full); pod 2 on node 1 from 30, loaded at 90: pod 3, placed on node 1 at 150, starts warm
    s = scenario(dotted={"pods.replicas": 2})
    t = timeline(run(s, (0.0, 3), (150.0, 4)))
    assert t[2] == (1, 30.0, 90.0)
    assert t[3] == (1, 150.0, 160.0)
    # a pod placed on node 1 while pod 2 still loads there (at 50) finds no files yet: cold, placed at 50, ready 110
    t = timeline(run(s, (0.0, 3), (50.0, 4)))
    assert t[3] == (1, 50.0, 110.0)


def test_a_new_image_is_not_on_the_node_but_new_engine_flags_are() -> None:
    # a deploy at 100 rolls the one pod to a new template; maxSurge 25% of 1 rounds up: the new pod takes node 0's
    # free GPU at 100. A new image is pulled (none here, 0 s) and its model loads cold; the same image with new
    # engine flags finds the model's files there
    def deploy(new_image: bool) -> dict[int, tuple[int, float, float]]:
        s = scenario(dotted={"pods.rollouts": [{"at_s": 100, "new_image": new_image, "slowdown": 1.1}]})
        return timeline(run(s))
    assert deploy(True)[1] == (0, 100.0, 160.0)
    assert deploy(False)[1] == (0, 100.0, 110.0)


def test_without_a_cluster_section_every_pod_has_a_node_of_its_own_and_starts_cold() -> None:
    s = scenario(cluster=None)
    sim, _ = run(s, (0.0, 3))
    assert [p.first_ready_s for p in sim.cluster.pods] == [0.0, 60.0, 60.0]
    assert [f.check for f in run_checks(s) if f.path == "pods.node_model_cache"] == ["node-cache-without-cluster"]
    assert not [f for f in run_checks(scenario()) if f.path == "pods.node_model_cache"]


def test_a_restart_in_place_is_warm_either_way() -> None:
    # the cache setting changes first starts only: pod 0 (warm at 0, its probes at a random phase) crashes at 100, is
    # restarted a second later (the kubelet's relist) and loads in 10 s both ways, ready at its next probe; a cold
    # restart (no restart_startup_s) loads in 60 s
    crash = {"crashes": [{"at_s": 100, "pod": 0}]}
    ready = [run(scenario(cache=cache, faults=crash))[0].cluster.pods[0].ready_s for cache in (True, False)]
    cold = run(scenario(cache=False, faults=crash, dotted={"pods.restart_startup_s": None}))[0].cluster.pods[0].ready_s
    assert ready[0] == ready[1] and cold is not None and ready[0] == pytest.approx(cold - 50.0)
    assert 111.0 <= cold - 50.0 <= 121.0


def test_the_cache_needs_a_warm_start_time() -> None:
    with pytest.raises(SettingsError, match=r"^pods\.node_model_cache: .*restart_startup_s, which is not set"):
        scenario(dotted={"pods.restart_startup_s": None})


def test_the_export_puts_the_caches_on_the_volume_the_run_assumed() -> None:
    target = DeployTarget(name="agents")
    def volumes(s: Scenario) -> tuple[list[Any], list[Any], list[Any]]:
        spec = build_deployment_patch(s, target)["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        return spec.get("volumes", []), c.get("volumeMounts", []), c.get("env", [])
    # the node's cache: a hostPath the pods of this Deployment share, kept when a pod goes
    vols, mounts, env = volumes(scenario())
    assert vols == [{"name": "model-cache", "hostPath": {"path": "/var/cache/capsim/default/agents", "type": "DirectoryOrCreate"}}]
    assert mounts == [{"name": "model-cache", "mountPath": "/model-cache"}]
    assert {e["name"]: e["value"] for e in env} == {"HF_HUB_CACHE": "/model-cache/huggingface/hub",
                                                     "VLLM_CACHE_ROOT": "/model-cache/vllm"}
    # a restart's warm start alone: an emptyDir, which lives as long as the pod (a restart in place keeps it)
    vols, mounts, env = volumes(scenario(cache=False))
    assert vols == [{"name": "model-cache", "emptyDir": {}}] and mounts and env
    # neither: no volume (a restart loads as a first start does)
    assert volumes(scenario(cache=False, dotted={"pods.restart_startup_s": None})) == ([], [], [])
    yaml.safe_dump(build_deployment_patch(scenario(), target))


def test_the_readme_says_what_the_hostpath_needs(tmp_path: Path) -> None:
    rush = Scenario.from_yaml("data/scenarios/h100_llama3_8b_rush.yaml").override(
        {"pods.restart_startup_s": {"kind": "uniform", "low_s": 20, "high_s": 40}, "pods.node_model_cache": True})
    export_scenario(rush, tmp_path, DeployTarget(name="agents", namespace="llm"))
    readme = (tmp_path / "README.md").read_text()
    assert ("a container's restart on its node, or a new pod's start on a node that ran the model, at most 40 s"
            in readme)
    assert "mounts the node's `/var/cache/capsim/llm/agents` (a hostPath, created as root)" in readme
    assert "Pod Security's baseline and restricted levels refuse a hostPath" in readme
    # every first start killed by a startup probe of 5 x 10 s, warm starts pass: the check says where pods come from
    short = scenario(dotted={"pods.startup_probe.failure_threshold": 5})
    (finding,) = [f for f in run_checks(short) if f.check == "startup-probe-short"]
    assert finding.level == "warn" and "a warm start on a node that ran the model (pods.node_model_cache)" in finding.message


def test_the_shipped_node_cache_grid_on_a_deploy_in_the_rush() -> None:
    """data/studies/node_cache_grid.yaml (docs/studies.md, "The model's files on the node"), seed 1, one pod at a time
    (surge 1/0): six cold waves take over 500 s; with the files on the node a deploy of new flags takes under half
    that, and a new image's first pod loads cold, so it takes longer than new flags; the emptyDir alone changes no
    run without a restart."""
    from capsim.studies.sweep import expand_grid, load_grid

    settings_ = expand_grid(load_grid("data/studies/node_cache_grid.yaml"))
    assert len(settings_) == 12
    changes = {(s.values["caches"], s.values["pods.rollouts.0.new_image"]): s.changes for s in settings_
               if s.values["pods.strategy"] == "surge 1/0"}
    rush = Scenario.from_yaml("data/scenarios/rollout_rush.yaml")
    took = {k: Simulation(rush.override(c), seed=1).run().summary for k, c in changes.items()
            if k in {("cold", False), ("pod", False), ("node", False), ("node", True)}}
    assert all(r.slo_met and r.rollouts_unfinished == 0 for r in took.values())
    cold, pod, flags, image = (took[k].longest_rollout_s for k in (("cold", False), ("pod", False), ("node", False),
                                                                   ("node", True)))
    assert cold > 500 and pod == cold
    assert flags < cold / 2 and flags < image < cold

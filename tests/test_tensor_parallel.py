"""Pods of several GPUs (``batching.tensor_parallel_size``): the KV cache they hold, where they are placed,
what they cost, what the checks say and what the export asks Kubernetes and vLLM for."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsim.errors import CapsimError
from capsim.export.pod import build_deployment_patch
from capsim.export.target import DeployTarget
from capsim.export.writer import export_scenario, vllm_args
from capsim.model.kv_cache import GIB, ModelShape, kv_cache_blocks
from capsim.model.scenario import Scenario
from capsim.model.settings import BatchSettings
from capsim.sim.simulate import Simulation
from capsim.studies.checks import run_checks
from test_sim_nodes import at
from test_sim_nodes import idle as idle_cluster

ROOT = Path(__file__).resolve().parents[1]
#: Llama 3 70B's KV shape (80 layers, 8 KV heads of 128) with 131.4 GiB of bf16 weights
LLAMA_70B = ModelShape(n_layers=80, n_kv_heads=8, head_dim=128, kv_dtype="bfloat16", weights_gb=131.4)


# ---- the KV cache of a pod of several GPUs ------------------------------------------------------------
def test_each_gpu_holds_its_share_of_the_weights_and_of_every_block() -> None:
    # 4 x 80 GiB at 0.9: each GPU keeps 72 - 131.4 / 4 = 39.15 GiB for 2 of the 8 KV heads:
    # 2 x 80 layers x 2 heads x 128 x 2 bytes = 81,920 bytes a token, 1,310,720 a block of 16
    assert kv_cache_blocks(80, 0.9, LLAMA_70B, 16, 4) == int(39.15 * GIB // 1_310_720) == 32_071
    # 16 GPUs, 8 heads: every GPU holds one head (replicated, as vLLM does), not half of one
    assert LLAMA_70B.kv_bytes_per_token_per_gpu(16) == LLAMA_70B.kv_bytes_per_token_per_gpu(8) == 40_960
    assert kv_cache_blocks(80, 0.9, LLAMA_70B, 16, 16) == int((72 - 131.4 / 16) * GIB // (16 * 40_960))
    # one GPU cannot hold the weights at all
    assert kv_cache_blocks(80, 0.9, LLAMA_70B, 16, 1) < 0
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        kv_cache_blocks(80, 0.9, LLAMA_70B, 16, 0)


def test_batch_settings_size_the_cache_of_the_pods_gpus() -> None:
    settings = {"mode": "continuous", "gpu_memory_gb": 80, "model": LLAMA_70B.model_dump()}
    assert BatchSettings(**settings, tensor_parallel_size=4).kv_cache_blocks() == 32_071
    assert BatchSettings().tensor_parallel_size == 1  # the default: one GPU
    with pytest.raises(CapsimError, match=r"gpu_memory_gb leaves no KV cache.*weights 131.4 - activations"):
        BatchSettings(**settings)  # one GPU cannot even hold the weights
    # two 70 GiB GPUs: 63 GiB each at 0.9, less than half the weights (65.7 GiB)
    with pytest.raises(CapsimError, match=r"gpu_memory_gb.*131.4 / 2 GPUs \(tensor_parallel_size\)"):
        BatchSettings(**{**settings, "gpu_memory_gb": 70}, tensor_parallel_size=2)


def test_a_pod_must_fit_on_one_node_and_nodes_are_whole() -> None:
    rush = Scenario.from_yaml(ROOT / "data/scenarios/friday_rush.yaml")  # nodes of 8 GPUs, at most 32
    with pytest.raises(CapsimError, match=r"batching.tensor_parallel_size must fit on one node.*got 16"):
        rush.override({"batching.tensor_parallel_size": 16})
    with pytest.raises(CapsimError, match=r"cluster.max_gpus must hold one whole node of node_gpus \(8\).*got 4"):
        rush.override({"cluster.max_gpus": 4})
    with pytest.raises(CapsimError, match=r"batching.tensor_parallel_size must be >= 1"):
        rush.override({"batching.tensor_parallel_size": 0})
    assert rush.override({"batching.tensor_parallel_size": 8}).batching.tensor_parallel_size == 8


# ---- placement, provisioning and cost -----------------------------------------------------------------
def idle(**changes: Any) -> Scenario:
    """test_sim_nodes' idle cluster (nodes of 4 GPUs, 8 at most, provisioned in 30 s; pods start in 10 s) with
    3 pods of 2 GPUs: two a node."""
    return idle_cluster(**{"batching.tensor_parallel_size": 2, "pods.replicas": 3, **changes})


def test_pods_hold_and_pay_for_all_their_gpus() -> None:
    sim = Simulation(idle(), seed=0)
    r = sim.run().summary
    nodes = sim.cluster.nodes.nodes
    assert [(n.gpus, n.used) for n in nodes] == [(4, 4), (4, 2)]  # 3 pods of 2: two on node 0, one on node 1
    assert r.gpu_hours == pytest.approx(3 * 2 * 2000 / 3600)
    assert r.node_gpu_hours == pytest.approx(8 * 2000 / 3600)
    assert r.cost == pytest.approx(2.0 * 8 * 2000 / 3600)  # billing: node
    pod_billed = Simulation(idle(**{"cluster.billing": "pod"}), seed=0).run().summary
    assert pod_billed.cost == pytest.approx(2.0 * 3 * 2 * 2000 / 3600)
    no_cluster_run = Simulation(idle(cluster=None, **{"batching.tensor_parallel_size": 4}), seed=0).run()
    no_cluster = no_cluster_run.summary
    assert (no_cluster_run.timeseries["gpus_held"] == 12).all() and no_cluster_run.timeseries["node_gpus"].isna().all()
    assert no_cluster.gpu_hours == pytest.approx(3 * 4 * 2000 / 3600)
    assert no_cluster.cost == pytest.approx(2.0 * 3 * 4 * 2000 / 3600)


def test_a_pod_waits_for_a_node_with_enough_free_gpus() -> None:
    # nodes of 3 GPUs hold one pod of 2 each (a GPU left over); max_gpus 6: two nodes, two pods
    sim = Simulation(idle(**{"pods.replicas": 1, "cluster.node_gpus": 3, "cluster.max_gpus": 6}), seed=0)
    at(sim, (0.0, lambda: sim.cluster.scale_to(3, 0.0)))
    ts = sim.run().timeseries.set_index("time_s")
    assert [(n.gpus, n.used) for n in sim.cluster.nodes.nodes] == [(3, 2), (3, 2)]
    # the second pod waits for the node provisioned for it (ready at 30 s, its pod ready after 10 s more);
    # the third can never be placed: a third node would pass max_gpus, and no node has 2 GPUs free
    assert ts["pending_replicas"][29] == 2 and ts["pending_replicas"][45] == 1 and ts["ready_replicas"][45] == 2
    assert ts["pending_replicas"].iloc[-1] == 1
    # the time series: the second node is billed while it boots; its pod holds its GPUs once placed (30 s)
    assert (ts["node_gpus"][29], ts["gpus_held"][29]) == (6, 2) and (ts["node_gpus"][45], ts["gpus_held"][45]) == (6, 4)


def test_nodes_are_whole_within_max_gpus() -> None:
    # max_gpus 10 in nodes of 4: two nodes (a third would make 12), four pods of 2; the fifth stays Pending
    sim = Simulation(idle(**{"cluster.max_gpus": 10}), seed=0)
    at(sim, (0.0, lambda: sim.cluster.scale_to(5, 0.0)))
    ts = sim.run().timeseries.set_index("time_s")
    assert [n.gpus for n in sim.cluster.nodes.nodes] == [4, 4]
    assert ts["pending_replicas"].iloc[-1] == 1 and ts["ready_replicas"].iloc[-1] == 4


def test_a_node_is_drained_when_its_pods_fit_elsewhere_by_whole_pods() -> None:
    # 3 pods: node 0 has two, node 1 one pod, 2 of its 4 GPUs (0.5, under a threshold of 0.6), but its pod
    # fits nowhere else: unremovable, so not unneeded. At 55 s the Deployment goes to 2 and the ReplicaSet
    # deletes from the crowded node 0: both nodes hold one pod (0.5). The scan of 60 s finds node 0 removable
    # first (its pod, two GPUs whole, fits on node 1's two free ones) and then node 1 not (node 0 is going):
    # node 0 is unneeded from 60 s and drained at 660 s, its pod moving to node 1.
    sim = Simulation(idle(**{"cluster.scale_down_utilization_threshold": 0.6}), seed=0)
    at(sim, (55.0, lambda: sim.cluster.scale_to(2, 55.0)))
    ts = sim.run().timeseries.set_index("time_s")
    assert sim.cluster.nodes.removals == [(660.0, 0)]
    assert [(n.gpus, n.used) for n in sim.cluster.nodes.nodes] == [(4, 0), (4, 4)]
    assert ts["ready_replicas"][659] == 2 and ts["ready_replicas"].iloc[-1] == 2
    assert (ts["node_gpus"][659], ts["node_gpus"].iloc[-1]) == (8, 4) and ts["gpus_held"].iloc[-1] == 4
    # without the scale-in node 1's pod has nowhere to go: two GPUs are free, but on node 1 itself
    full = Simulation(idle(**{"cluster.scale_down_utilization_threshold": 0.6}), seed=0)
    full.run()
    assert full.cluster.nodes.removals == []
    # at the default threshold (0.5) neither node is unneeded
    stays = Simulation(idle(), seed=0)
    at(stays, (55.0, lambda: stays.cluster.scale_to(2, 55.0)))
    stays.run()
    assert stays.cluster.nodes.removals == []


def test_one_gpu_pods_are_placed_as_before() -> None:
    one = Simulation(idle(**{"batching.tensor_parallel_size": 1, "pods.replicas": 5}), seed=0)
    one.run()
    assert [(n.gpus, n.used) for n in one.cluster.nodes.nodes] == [(4, 4), (4, 1)]


# ---- checks and export ------------------------------------------------------------------------------------
def _checks(s: Scenario) -> dict[str, str]:
    return {f.check: f"{f.path}: {f.message}" for f in run_checks(s)}


def test_max_replicas_counts_pods_of_several_gpus() -> None:
    rush = Scenario.from_yaml(ROOT / "data/scenarios/friday_rush.yaml")
    assert rush.autoscaler is not None and rush.autoscaler.max_replicas > 8
    assert "max-replicas-over-gpus" not in _checks(rush)
    # 32 GPUs in nodes of 8 hold 8 pods of 4 GPUs
    found = _checks(rush.override({"batching.tensor_parallel_size": 4}))["max-replicas-over-gpus"]
    assert "holds 8" in found and "4 GPUs (batching.tensor_parallel_size)" in found
    # nodes of 8 hold two pods of 3 each (2 GPUs a node unused): 4 nodes, 8 pods
    assert "holds 8" in _checks(rush.override({"batching.tensor_parallel_size": 3}))["max-replicas-over-gpus"]
    assert "max-replicas-over-gpus" not in _checks(rush.override({"batching.tensor_parallel_size": 4,
                                                                  "autoscaler.maxReplicas": 8}))


def test_an_estimate_for_other_gpus_a_pod_fails_the_checks() -> None:
    h100 = Scenario.from_yaml(ROOT / "data/scenarios/h100_llama3_8b_rush.yaml")  # estimated for one GPU a pod
    assert "profile-tensor-parallel" not in _checks(h100)
    found = _checks(h100.override({"batching.tensor_parallel_size": 2}))["profile-tensor-parallel"]
    assert found.startswith("batching.tensor_parallel_size: 2, but") and "pods of 1 GPU" in found
    # the KV cache sized for an H200's memory with an H100's step times: a warning
    assert "profile-gpu-memory" not in _checks(h100)  # 79.6 GiB, as the estimate's H100
    found = _checks(h100.override({"batching.gpu_memory_gb": 139.8}))["profile-gpu-memory"]
    assert found.startswith("batching.gpu_memory_gb: 139.8 GiB, but") and "NVIDIA H100 SXM of 79.6 GiB" in found


def test_the_export_asks_for_the_pods_gpus(tmp_path: Path) -> None:
    sc = Scenario.from_yaml(ROOT / "data/scenarios/friday_rush_continuous.yaml").override(
        {"batching.tensor_parallel_size": 2, "autoscaler.maxReplicas": 8})
    patch = build_deployment_patch(sc, DeployTarget())
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 2}}
    args = vllm_args(sc)
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    export_scenario(sc, tmp_path)
    assert yaml.safe_load((tmp_path / "vllm-args.yaml").read_text())["args"] == args
    readme = (tmp_path / "README.md").read_text()
    assert "2 GPUs on one node (tensor parallel) per pod" in readme and "`nvidia.com/gpu: 2`" in readme
    assert "| `batching.tensor_parallel_size` (GPUs a pod) | 2 |" in readme
    assert "capsim's own pod runs its model on one device" in readme
    one = tmp_path / "one"
    export_scenario(sc.override({"batching.tensor_parallel_size": 1}), one)
    assert "capsim's own pod runs its model on one device" not in (one / "README.md").read_text()


def test_a_drain_never_splits_a_pod_over_the_free_gpus_of_several_nodes() -> None:
    # three nodes of 3 GPUs, one pod of 2 on each (2/3 of a node, under a threshold of 0.7: all unneeded);
    # the other nodes have 2 GPUs free between them, but no node has 2: nothing can be drained
    s = idle(**{"cluster.node_gpus": 3, "cluster.max_gpus": 9, "cluster.scale_down_utilization_threshold": 0.7})
    sim = Simulation(s, seed=0)
    sim.run()
    assert [(n.gpus, n.used) for n in sim.cluster.nodes.nodes] == [(3, 2)] * 3
    assert sim.cluster.nodes.removals == []


# ---- placement invariants over random cluster histories --------------------------------------------------
@st.composite
def cluster_histories(draw: st.DrawFn) -> tuple[Scenario, list[tuple[float, int]], list[tuple[float, int]]]:
    """A cluster of random node size, pod size and limit; a Deployment scaled at random times; random crashes."""
    node_gpus = draw(st.sampled_from([2, 3, 4, 8]))
    tp = draw(st.integers(1, node_gpus))
    s = idle_cluster(**{
        "batching.tensor_parallel_size": tp, "pods.replicas": draw(st.integers(1, 4)),
        "cluster.node_gpus": node_gpus, "cluster.max_gpus": node_gpus * draw(st.integers(1, 4)) + draw(st.integers(0, 1)),
        "cluster.node_provision_s": draw(st.sampled_from([0, 5, 30])),
        "cluster.scale_down_unneeded_time_s": draw(st.sampled_from([0, 30, 600])),
        "cluster.scale_down_delay_after_add_s": draw(st.sampled_from([0, 60])),
        "cluster.scale_down_utilization_threshold": draw(st.sampled_from([0.5, 0.75, 1.0])),
        "horizon_s": 900})
    scales = sorted((draw(st.floats(0, 800)), draw(st.integers(0, 12))) for _ in range(draw(st.integers(1, 6))))
    crashes = sorted((draw(st.floats(0, 800)), draw(st.integers(0, 20))) for _ in range(draw(st.integers(0, 3))))
    return s, scales, crashes


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_histories())
def test_pods_always_sit_whole_on_nodes_within_the_limit(history: tuple[Scenario, list[Any], list[Any]]) -> None:
    scenario, scales, crashes = history
    sim = Simulation(scenario, seed=0)
    cluster, nodes = sim.cluster, sim.cluster.nodes
    tp, node_gpus, max_gpus = nodes.pod_gpus, nodes.node_gpus, nodes.max_gpus
    seen: list[str] = []

    def check() -> None:
        live = [n for n in nodes.nodes if n.removed_s is None]
        assert sum(n.gpus for n in live) <= max_gpus and all(n.gpus == node_gpus for n in nodes.nodes)
        for n in nodes.nodes:
            assert 0 <= n.used <= n.gpus and n.used % tp == 0, n
        placed = [p for p in cluster.pods if p.gpu_since is not None]
        assert sum(n.used for n in nodes.nodes) == len(placed) * tp == cluster.gpus_held()
        for p in placed:  # every placed pod on a node that is there
            node = cluster._node.get(p.id)
            assert node is not None and node.removed_s is None, (p.id, node)
        seen.append("ok")

    def crash(k: int) -> None:
        ready = [p for p in cluster.pods if p.state.name == "READY"]
        if ready:
            cluster.crash(ready[k % len(ready)], sim.env.now)

    def every_second() -> Generator[Any, Any, None]:
        while True:
            yield sim.env.timeout(1.0)
            check()

    events = [(t, (lambda n=n: cluster.scale_to(n, sim.env.now))) for t, n in scales]
    events += [(t, (lambda k=k: crash(k))) for t, k in crashes]
    at(sim, *sorted(events, key=lambda e: e[0]))
    sim.env.process(every_second())
    ts = sim.run().timeseries
    assert len(seen) >= 899
    assert (ts["gpus_held"] <= ts["node_gpus"]).all()
    pods_room = (ts["node_gpus"] // node_gpus) * (node_gpus // tp)
    assert (ts["ready_replicas"] <= pods_room).all()

"""Exporting a continuous-batching scenario: the pod's engine settings, and the same as vLLM arguments."""

from __future__ import annotations

from pathlib import Path

import yaml

from capsim.core.service import PodConfig
from capsim.core.session_history import HistorySettings
from capsim.export.pod import pod_env
from capsim.export.target import DeployTarget
from capsim.export.writer import export_scenario, vllm_args
from capsim.model.scenario import Scenario


def test_the_pod_reads_the_exported_engine_settings_and_vllm_gets_the_same(tmp_path: Path) -> None:
    sc = Scenario.from_yaml("data/scenarios/friday_rush_continuous.yaml")
    env = pod_env(sc, DeployTarget())
    cfg = PodConfig.from_env(env)
    assert cfg.batch_mode == "continuous"
    lim = cfg.scheduler_limits()
    b = sc.batching
    assert (lim.max_num_seqs, lim.max_num_batched_tokens, lim.block_size, lim.num_blocks, lim.max_model_len) == (
        b.max_num_seqs, b.max_num_batched_tokens, b.block_size, b.kv_cache_blocks(), b.max_model_len)
    assert cfg.enable_prefix_caching is b.enable_prefix_caching is True  # the plan counted prefix hits
    assert vllm_args(sc) == ["--max-num-seqs", "32", "--max-num-batched-tokens", "2048", "--block-size", "16",
                             "--max-model-len", "2048", "--tensor-parallel-size", "1", "--num-gpu-blocks-override", "1024",
                             "--enable-prefix-caching"]
    sized = sc.override({"batching.num_blocks": None, "batching.gpu_memory_gb": 80, "batching.gpu_memory_utilization": 0.85,
                         "batching.model": {"n_layers": 32, "n_kv_heads": 8, "head_dim": 128, "weights_gb": 15},
                         "batching.enable_prefix_caching": False})
    assert vllm_args(sized)[-3:] == ["--gpu-memory-utilization", "0.85", "--no-enable-prefix-caching"]
    # a cache planned in fp8 must be fp8 in vLLM too, or it holds half the tokens the plan counted
    fp8 = sized.override({"batching.model.kv_dtype": "fp8"})
    assert vllm_args(fp8)[-5:-1] == ["--gpu-memory-utilization", "0.85", "--kv-cache-dtype", "fp8"]
    assert "--kv-cache-dtype" not in vllm_args(sized)
    assert PodConfig.from_env(pod_env(sized, DeployTarget())).enable_prefix_caching is False
    res = export_scenario(sc, tmp_path / "out", force=True)
    args = tmp_path / "out" / "vllm-args.yaml"
    assert args in res.files
    assert yaml.safe_load(args.read_text())["args"] == vllm_args(sc)
    # the README names the file and the engine limits the pod runs with, not the static batcher's settings
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "| `vllm-args.yaml` |" in readme and "static batcher" not in readme
    assert "| `batching.mode` | continuous |" in readme and "| `batching.max_num_seqs` | 32 |" in readme
    assert "| KV-cache blocks | 1024 |" in readme and "| `batching.enable_prefix_caching` | True |" in readme
    assert "batching.max_wait_ms" not in readme  # the static batcher's, which the continuous pod does not read


def test_the_pod_gets_the_simulated_behaviour_in_a_store_outage() -> None:
    sc = Scenario.from_yaml("data/scenarios/chat_sessions.yaml")
    assert sc.state.on_unavailable == "serve_local"
    assert HistorySettings.from_env(pod_env(sc, DeployTarget())).on_unavailable == "serve_local"
    failing = sc.override({"state.on_unavailable": "fail"})
    assert HistorySettings.from_env(pod_env(failing, DeployTarget())).on_unavailable == "fail"


def test_a_static_scenario_exports_no_engine_settings(tmp_path: Path) -> None:
    sc = Scenario.from_yaml("data/scenarios/friday_rush.yaml")
    assert "CAPSIM_BATCH_MODE" not in pod_env(sc, DeployTarget())
    export_scenario(sc, tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "vllm-args.yaml").exists()
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "vllm-args.yaml" not in readme and "| `batching.max_wait_ms` |" in readme

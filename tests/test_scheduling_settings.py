"""Continuous-batching settings: defaults, the KV-cache size from GPU memory, and errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest

from capsim.model.kv_cache import GIB, ModelShape, kv_cache_blocks
from capsim.model.scenario import Scenario
from capsim.model.settings import BatchSettings, SettingsError
from capsim.policy.scheduling import SchedulerLimits

# Llama-3-8B's shape (config.json on the Hugging Face hub): 32 layers, 8 KV heads of 128, bf16 weights ~15 GiB
LLAMA3_8B = {"n_layers": 32, "n_kv_heads": 8, "head_dim": 128, "kv_dtype": "bfloat16", "weights_gb": 15.0,
             "activation_peak_gb": 2.0}


def test_static_stays_the_default_and_continuous_fields_default_to_vllms() -> None:
    b = BatchSettings()
    assert b.mode == "static"
    assert (b.max_num_seqs, b.max_num_batched_tokens, b.block_size, b.gpu_memory_utilization) == (256, 2048, 16, 0.9)
    assert b.long_prefill_token_threshold == 0


def test_blocks_follow_from_memory_weights_activations_and_bytes_per_token() -> None:
    m = ModelShape(**LLAMA3_8B)
    assert m.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB: K and V, every layer
    # 80 GiB x 0.9 = 72; minus 15 and 2 leaves 55 GiB; a block of 16 tokens holds 2 MiB
    assert kv_cache_blocks(80, 0.9, m, 16) == 55 * GIB // (16 * 128 * 1024) == 28160
    b = BatchSettings(mode="continuous", gpu_memory_gb=80, model=LLAMA3_8B)
    assert b.kv_cache_blocks() == 28160 and SchedulerLimits.from_settings(b).num_blocks == 28160
    assert BatchSettings(mode="continuous", num_blocks=77).kv_cache_blocks() == 77
    # fp8 KV halves the bytes: twice the blocks
    fp8 = BatchSettings(mode="continuous", gpu_memory_gb=80, model={**LLAMA3_8B, "kv_dtype": "fp8"})
    assert fp8.kv_cache_blocks() == 2 * 28160


@pytest.mark.parametrize(("kw", "message"), [
    ({}, r"batching.num_blocks \(or gpu_memory_gb with model\) is required in continuous mode"),
    ({"num_blocks": 10, "gpu_memory_gb": 80}, r"batching.gpu_memory_gb and num_blocks are exclusive"),
    ({"gpu_memory_gb": 16, "model": LLAMA3_8B}, r"batching.gpu_memory_gb leaves no KV cache: 16.0 GiB x 0.9"),
    ({"num_blocks": 0}, r"batching.num_blocks must be >= 1, got 0"),
    ({"num_blocks": 8, "gpu_memory_utilization": 1.5}, r"batching.gpu_memory_utilization must be <= 1"),
    ({"num_blocks": 8, "block_size": 0}, r"batching.block_size must be >= 1"),
    ({"num_blocks": 8, "max_num_seqs": 0}, r"batching.max_num_seqs must be >= 1"),
])
def test_errors_name_the_field(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        BatchSettings(mode="continuous", **kw)


def test_a_scenario_carries_the_continuous_section_and_names_its_path() -> None:
    sc = Scenario.from_yaml("data/scenarios/friday_rush_continuous.yaml")
    assert sc.batching.mode == "continuous" and sc.batching.kv_cache_blocks() == 1024
    with pytest.raises(SettingsError, match=r"batching.num_blocks \(or gpu_memory_gb with model\) is required"):
        sc.override({"batching.num_blocks": None})
    with pytest.raises(SettingsError, match=r"batching.mode"):
        sc.override({"batching.mode": "paged"})

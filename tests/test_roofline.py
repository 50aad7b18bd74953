"""The roofline estimate of a GPU's service times (capsim.model.roofline, capsim estimate-profile)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from capsim.cli import app
from capsim.model.kv_cache import kv_cache_blocks
from capsim.model.profile import ServiceTimeProfile
from capsim.model.roofline import (
    GPUS,
    MODELS,
    GpuSpec,
    ModelArch,
    Roofline,
    RooflineError,
    is_estimate,
    load_gpu,
    load_model,
    roofline_profile,
)
from capsim.model.scenario import Scenario
from capsim.model.step_model import StepTimeFit
from capsim.policy.scheduling import Step
from capsim.sim import simulate
from capsim.sim.step_time import RooflineStepTime, step_ends
from capsim.studies.checks import run_checks

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "data" / "profiles" / "roofline-h100-llama-3-8b-bfloat16.csv"
LLAMA3_8B_CONFIG = {  # the keys of meta-llama/Meta-Llama-3-8B's config.json that size it
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "hidden_act": "silu", "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "rope_theta": 500000.0,
}


def test_parameter_counts_match_the_published_models() -> None:
    # the models' published totals (their safetensors index), norms included
    assert MODELS["llama-3-8b"].params == 8_030_261_248
    assert MODELS["llama-3-70b"].params == 70_553_706_496
    assert MODELS["mistral-7b"].params == 7_241_732_096
    assert MODELS["llama-3-8b"].kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB
    # GPT-2 small (124,439,808 with its 786,432 position embeddings and its biases, which are left out)
    assert MODELS["gpt2-small"].params == pytest.approx(124_439_808, rel=0.01)


def test_the_gpt2_preset_has_capsims_reference_shape() -> None:
    from capsim.core.engine import PRESETS

    ref, arch = PRESETS["gpt2-small"], MODELS["gpt2-small"]
    assert (arch.vocab_size, arch.d_model, arch.n_layers, arch.n_heads, arch.d_ff) == \
        (ref.vocab_size, ref.d_model, ref.n_layers, ref.n_heads, ref.d_ff)


def test_a_config_json_reads_as_the_preset(tmp_path: Path) -> None:
    folder = tmp_path / "Meta-Llama-3-8B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    got = load_model(str(folder))
    assert got.name == "Meta-Llama-3-8B"
    assert got.model_copy(update={"name": "llama-3-8b"}) == MODELS["llama-3-8b"]
    assert load_model(str(folder / "config.json")) == got


@pytest.mark.parametrize(("text", "needle"), [
    ('{"hidden_size": 4096}', "'num_attention_heads' must be a positive integer, got None"),
    (json.dumps({**LLAMA3_8B_CONFIG, "num_hidden_layers": "32"}), "'num_hidden_layers' must be a positive integer"),
    (json.dumps({**LLAMA3_8B_CONFIG, "torch_dtype": "int4"}), "'torch_dtype' must be one of"),
    ('{"hidden_size": 4096,\n oops}', "line 2: not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_a_bad_config_names_the_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(RooflineError, match=str(path)) as err:
        load_model(str(path))
    assert needle in str(err.value)


def test_unknown_gpu_or_model_and_bad_shares_are_named() -> None:
    with pytest.raises(RooflineError, match="GPU 'h999' is not one of"):
        load_gpu("h999")
    with pytest.raises(RooflineError, match="neither one of"):
        load_model("no-such-model")
    with pytest.raises(RooflineError, match="mfu must be <= 1, got 2"):
        load_gpu("h100", mfu=2.0)
    assert load_gpu("h100", mbu=None).mbu == GPUS["h100"].mbu  # None keeps the default
    with pytest.raises(RooflineError, match="tensor_parallel must be >= 1"):
        Roofline(GPUS["h100"], MODELS["llama-3-8b"], tensor_parallel=0)
    # 32 query heads and 8 KV heads: 3 GPUs split neither; 16 split the query heads, each KV head on 2 GPUs
    with pytest.raises(RooflineError, match="tensor_parallel 3 does not split llama-3-8b's heads: its 32"):
        Roofline(GPUS["h100"], MODELS["llama-3-8b"], tensor_parallel=3)
    assert Roofline(GPUS["h100"], MODELS["llama-3-8b"], tensor_parallel=16).tp == 16
    # qwen2.5-7b: 28 query heads, 4 KV heads: 8 GPUs split the KV heads (2 copies each) but not the query heads
    with pytest.raises(RooflineError, match="its 28 attention heads must divide evenly"):
        Roofline(GPUS["h100"], MODELS["qwen2.5-7b"], tensor_parallel=8)


def test_a_small_decode_is_the_weights_over_the_bandwidth() -> None:
    gpu, m = GPUS["h100"], MODELS["llama-3-8b"]
    weights = (m.layer_params + m.head_params) * 2
    expected = gpu.step_overhead_ms / 1e3 + weights / gpu.bytes_per_s
    rl = Roofline(gpu, m)
    assert rl.decode_s(1, 1) == pytest.approx(expected, rel=1e-3)
    # below the ridge point the batch rides on the same weight read: 8 decodes cost what 1 does, but the cache
    assert rl.decode_s(8, 1) == pytest.approx(rl.decode_s(1, 1), rel=1e-3)
    assert rl.decode_s(1, 8192) > rl.decode_s(1, 1) * 1.02


def test_a_long_prefill_is_bound_by_the_arithmetic() -> None:
    gpu, m = GPUS["h100"], MODELS["llama-3-8b"]
    rl = Roofline(gpu, m)
    t = 8192
    linear = 2 * (m.layer_params * t + m.head_params) / gpu.flops_per_s
    attention = 4 * m.n_layers * m.n_heads * m.head_dim * t * (t + 1) / 2 / gpu.flops_per_s
    assert rl.prefill_s(1, t) == pytest.approx(gpu.step_overhead_ms / 1e3 + linear + attention, rel=1e-9)
    # quadratic attention: twice the prompt costs a little over twice as much
    assert 2.0 < (rl.prefill_s(1, t) - 1e-3) / (rl.prefill_s(1, t // 2) - 1e-3) < 2.3
    # a faster memory does not speed up a compute-bound prefill, and it does speed up a small decode
    h200 = Roofline(GPUS["h200"], m)
    assert h200.prefill_s(1, t) == pytest.approx(rl.prefill_s(1, t), rel=1e-3)
    assert h200.decode_s(1, 1024) < 0.8 * rl.decode_s(1, 1024)


def test_tensor_parallel_splits_the_weights_and_pays_the_links() -> None:
    m = MODELS["llama-3-70b"]
    one, four = Roofline(GPUS["h100"], m), Roofline(GPUS["h100"], m, tensor_parallel=4)
    overhead = GPUS["h100"].step_overhead_ms / 1e3
    # a small decode reads a quarter of the weights per GPU, plus the all-reduces
    ratio = (four.decode_s(1, 1) - overhead) / (one.decode_s(1, 1) - overhead)
    assert 0.25 < ratio < 0.3
    # 8 KV heads over 16 GPUs: each GPU still holds one head's cache (replicated), not half of one
    sixteen = Roofline(GPUS["h100"], m, tensor_parallel=16)
    assert sixteen._kv_bytes == four._kv_bytes / 2 == m.kv_bytes_per_token / 8
    # over PCIe the all-reduces of a long prefill cost much more than over NVLink
    pcie = Roofline(GPUS["h100"].model_copy(update={"link_gb_s": 32.0}), m, tensor_parallel=4)
    assert pcie.prefill_s(1, 4096) > 1.1 * four.prefill_s(1, 4096)


def test_each_all_reduce_waits_out_the_links_latency() -> None:
    m, h100 = MODELS["llama-3-70b"], GPUS["h100"]
    instant = h100.model_copy(update={"link_latency_us": 0.0})
    # 80 layers, 2 all-reduces each, 8 us apiece over NVLink: 1.28 ms a step on top of the bytes, at any batch
    for tp in (2, 4, 8):
        for step in ((lambda r: r.decode_s(1, 100)), (lambda r: r.decode_s(64, 2000)), (lambda r: r.prefill_s(1, 512))):
            assert step(Roofline(h100, m, tp)) - step(Roofline(instant, m, tp)) == pytest.approx(2 * 80 * 8e-6)
    # one GPU has nothing to reduce, and an idle step no all-reduce
    assert Roofline(h100, m).decode_s(1, 100) == Roofline(instant, m).decode_s(1, 100)
    assert Roofline(h100, m, 4).step_s() == h100.step_overhead_ms / 1e3
    # so doubling a pod's GPUs gains less: the latency floor (2 x 80 x 8 us) stays while the weights' share
    # halves (8 over 4 H100s, one stream: 0.53 of the time without it, 0.57 with it); over PCIe it is 20 us
    def gain(gpu: GpuSpec) -> float:
        return Roofline(gpu, m, 8).decode_s(1, 100) / Roofline(gpu, m, 4).decode_s(1, 100)

    assert gain(instant) == pytest.approx(0.532, abs=0.005) and gain(h100) == pytest.approx(0.567, abs=0.005)
    assert GPUS["l40s"].link_latency_us == 2.5 * h100.link_latency_us
    # an estimate written before the latency was modelled (its GPU without the field) reads as 0: its steps
    # are what it was made with
    prof = roofline_profile(h100, m, tensor_parallel=4, max_batch_size=2)
    prof.metadata["estimate"]["gpu"].pop("link_latency_us")
    assert Roofline.from_profile(prof).gpu.link_latency_us == 0.0


@given(decodes=st.lists(st.integers(0, 8192), max_size=64), chunk=st.integers(1, 4096),
       context=st.integers(0, 4096), tp=st.sampled_from([1, 2, 4]),
       model=st.sampled_from(["qwen2.5-7b", "mixtral-8x7b"]))
def test_more_work_never_takes_less_time(decodes: list[int], chunk: int, context: int, tp: int, model: str) -> None:
    rl = Roofline(GPUS["l40s"], MODELS[model], tensor_parallel=tp)
    base = rl.step_s([(chunk, context)], decodes)
    assert base >= rl.step_s([], decodes)
    assert rl.step_s([(chunk, context)], [*decodes, 0]) >= base
    assert rl.step_s([(chunk + 1, context)], decodes) >= base
    assert rl.step_s([(chunk, context + 1)], decodes) >= base
    assert rl.step_s() == pytest.approx(GPUS["l40s"].step_overhead_ms / 1e3)


def test_the_profile_is_complete_marked_estimated_and_fits_its_steps() -> None:
    prof = roofline_profile(GPUS["h100"], MODELS["llama-3-8b"], max_batch_size=64)
    again = ServiceTimeProfile.from_text(prof.to_text(), "<roofline>")
    assert again.batch_sizes("decode") == again.batch_sizes("prefill") == (1, 2, 4, 8, 16, 32, 64)
    assert is_estimate(again) and not is_estimate(ServiceTimeProfile.from_csv(ROOT / "data/profiles/cpu-tiny-float32.csv"))
    assert again.metadata["estimate"]["gpu"]["mfu"] == 0.5
    assert "step_model" not in again.metadata  # the simulator takes the roofline, not a fit to it
    fit = StepTimeFit.from_dict(again.metadata["estimate"]["linear_fit"])
    assert fit.r2 > 0.97 and set(fit.residuals_by_kind) == {"decode", "prefill", "mixed"}
    # the fit's overhead carries the weights' read, which every step pays, and misses small decode steps
    rl = Roofline(GPUS["h100"], MODELS["llama-3-8b"])
    assert fit.overhead_s == pytest.approx(rl.decode_s(1, 1), rel=0.35)
    assert fit.predict(0, 0, 4, 4 * 1500) < 0.95 * rl.decode_s(4, 1500)
    assert Roofline.from_profile(again).decode_s(4, 1500) == rl.decode_s(4, 1500)


def test_the_simulator_takes_each_step_from_the_roofline() -> None:
    prof = roofline_profile(GPUS["l40s"], MODELS["mistral-7b"], tensor_parallel=2, max_batch_size=4)
    rl = Roofline.from_profile(prof)
    sim = RooflineStepTime(rl, scale=1.5)
    step = Step(prefills=1, prefill_tokens=300, prefill_max_tokens=300, prefill_context=300 * 700, decodes=12,
                decode_context=12 * 900)
    assert sim.step_s(step) == 1.5 * rl.step_s([(300, 700)], [900] * 12)
    plain = Step(decodes=5, decode_context=5 * 100)
    assert sim.decode_step_s(5, 500) == sim.step_s(plain)  # bit for bit, as the pod's decode runs need
    for decodes, context in ((1, 0), (5, 500), (64, 64 * 3000), (256, 256 * 8000)):  # both sides of the ridge
        assert sim.decode_step_s(decodes, context) == pytest.approx(1.5 * rl.aggregate_s(0, 0, 0, 0, decodes, context),
                                                                    rel=1e-12)
    ends = sim.decode_step_ends(2.0, 5, 500, 4)
    assert ends == step_ends(sim.decode_step_s, 2.0, 5, 500, 4)
    assert sim.decode_run_s(5, 500, 4) == pytest.approx(ends[-1] - 2.0, rel=1e-12)
    with pytest.raises(RooflineError, match="not a roofline estimate"):
        Roofline.from_profile(ServiceTimeProfile.from_csv(ROOT / "data/profiles/cpu-tiny-float32.csv"))


def test_the_shipped_profile_is_what_the_command_writes() -> None:
    shipped = ServiceTimeProfile.from_csv(SHIPPED)
    fresh = ServiceTimeProfile.from_text(roofline_profile(GPUS["h100"], MODELS["llama-3-8b"]).to_text())
    assert [(p.phase, p.batch_size, p.tokens, p.mean_ms) for p in shipped.points] == \
        [(p.phase, p.batch_size, p.tokens, p.mean_ms) for p in fresh.points]
    old, new = dict(shipped.metadata["estimate"]), dict(fresh.metadata["estimate"])
    assert old.pop("linear_fit")["coefficients"] == pytest.approx(new.pop("linear_fit")["coefficients"], rel=1e-6)
    assert old == new
    assert shipped.metadata["model"]["params"] == MODELS["llama-3-8b"].params


def test_the_gpu_scenario_simulates_and_check_warns_it_is_estimated() -> None:
    sc = Scenario.from_yaml(ROOT / "data" / "scenarios" / "h100_llama3_8b_rush.yaml")
    findings = [f for f in run_checks(sc) if f.check == "estimated-profile"]
    assert len(findings) == 1 and findings[0].level == "warn" and findings[0].path == "service.profile"
    assert "not measured" in findings[0].message
    assert sc.batching.kv_cache_blocks() == 27_997  # (79.6 GiB x 0.9 - 15 GiB of weights - 2 GiB) / 2 MiB a block
    short = sc.override({"horizon_s": 240, "warmup_s": 30, "workload.arrivals.rate_per_s": [[0, 4]]})
    s = simulate(short, seed=0).summary
    assert s.completed > 500 and s.error_rate == 0
    # a GPU-sized step: tokens come every 7 to 30 ms, not the CPU model's fraction of a millisecond
    assert 0.007 < s.itl_p50_s < 0.03


def test_check_is_quiet_on_a_measured_profile() -> None:
    sc = Scenario.from_yaml(ROOT / "data" / "scenarios" / "friday_rush_continuous.yaml")
    assert not [f for f in run_checks(sc) if f.check == "estimated-profile"]


def test_the_command_writes_keeps_and_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    out = tmp_path / "p"
    got = runner.invoke(app, ["estimate-profile", "--gpu", "l40s", "--model", "mistral-7b", "--max-batch-size", "8",
                              "--out-dir", str(out)])
    assert got.exit_code == 0, got.output
    path = out / "roofline-l40s-mistral-7b-bfloat16.csv"
    assert "ESTIMATED" in got.output and path.exists()
    assert ServiceTimeProfile.from_csv(path).batch_sizes("decode") == (1, 2, 4, 8)
    got = runner.invoke(app, ["estimate-profile", "--model", "llama-3-70b", "--tensor-parallel", "4",
                              "--mbu", "0.6", "--max-batch-size", "4", "--out-dir", str(out)])
    assert got.exit_code == 0, got.output
    prof = ServiceTimeProfile.from_csv(out / "roofline-h100x4-llama-3-70b-bfloat16.csv")
    assert prof.metadata["estimate"]["tensor_parallel"] == 4 and prof.metadata["estimate"]["gpu"]["mbu"] == 0.6
    # the cache of a pod of 4: each GPU's 79.6 GiB less a quarter of the weights, for 2 of the 8 KV heads
    blocks = kv_cache_blocks(79.6, 0.9, MODELS["llama-3-70b"].shape(), 16, 4)
    assert f"(79.6 GiB each) at gpu_memory_utilization 0.9 and no activation peak, {blocks:,} blocks" in got.output
    assert "batching.gpu_memory_gb 79.6, batching.tensor_parallel_size 4" in got.output
    assert "8 us an all-reduce, 160 all-reduces a step" in got.output
    assert prof.metadata["estimate"]["gpu"]["link_latency_us"] == 8.0
    # the latency is an option too, kept in the metadata the simulator rebuilds the roofline from
    got = runner.invoke(app, ["estimate-profile", "--model", "llama-3-70b", "--tensor-parallel", "4",
                              "--link-latency-us", "0", "--max-batch-size", "4", "--out-dir", str(tmp_path / "q")])
    assert got.exit_code == 0, got.output
    instant = ServiceTimeProfile.from_csv(tmp_path / "q" / "roofline-h100x4-llama-3-70b-bfloat16.csv")
    assert Roofline.from_profile(instant).gpu.link_latency_us == 0.0
    # the default folder keeps what is there
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "profiles").mkdir(parents=True)
    kept = tmp_path / "data" / "profiles" / "roofline-h100-llama-3-8b-bfloat16.csv"
    kept.write_text("mine")
    got = runner.invoke(app, ["estimate-profile", "--max-batch-size", "2"])
    assert got.exit_code == 2 and "exists and is kept" in got.output and kept.read_text() == "mine"
    got = runner.invoke(app, ["estimate-profile", "--model", "llama-3-70b"])
    assert got.exit_code == 2 and "--tensor-parallel 1" in got.output and "leave no KV cache" in got.output
    got = runner.invoke(app, ["estimate-profile", "--gpu", "tpu"])
    assert got.exit_code == 2 and "GPU 'tpu' is not one of" in got.output


def test_model_arch_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="n_layers"):
        ModelArch(name="x", n_layers=0, d_model=1, n_heads=1, n_kv_heads=1, head_dim=1, d_ff=1, vocab_size=1)


def test_compare_profiles_draws_an_estimate_dashed() -> None:
    from capsim import plots

    measured = ServiceTimeProfile.from_csv(ROOT / "data/profiles/cpu-tiny-float32.csv")
    fig = plots.compare_profiles({"cpu": measured, "h100": ServiceTimeProfile.from_csv(SHIPPED)})
    lines = {line.get_label(): line.get_linestyle() for line in fig.axes[0].get_lines()}
    assert lines == {"cpu": "-", "h100 (estimated)": "--"}
    assert "estimated, not measured" in fig.get_suptitle()


def test_exporting_the_gpu_plan_carries_the_warning(tmp_path: Path) -> None:
    from capsim.export.writer import export_scenario

    sc = Scenario.from_yaml(ROOT / "data" / "scenarios" / "h100_llama3_8b_rush.yaml")
    result = export_scenario(sc, tmp_path / "deploy")
    assert [f.check for f in result.findings] == ["estimated-profile"]
    readme = (tmp_path / "deploy" / "README.md").read_text()
    assert "not measured" in readme
    args = (tmp_path / "deploy" / "vllm-args.yaml").read_text()
    assert "--max-num-seqs" in args and "'1024'" in args and "--gpu-memory-utilization" in args


def test_the_defaults_are_a_little_slow_against_published_single_stream_decodes() -> None:
    # Llama 3.1 8B, bf16, vLLM, concurrency 1 (docs/profiles.md, "Against published measurements"):
    # InferenceBench on one H100 80GB: TPOT p50 6.48 ms; J. Musgrave on one A100 40GB: ~75 tokens/s
    m = MODELS["llama-3-8b"]
    h100 = Roofline(GPUS["h100"], m).step_s([], [200])
    a100_40gb = GPUS["a100-80gb"].model_copy(update={"name": "NVIDIA A100 40GB SXM", "hbm_gb_s": 1555.0,
                                                     "memory_gib": 39.6})
    a100 = Roofline(a100_40gb, m).step_s([], [1024 + 64])  # mid-answer of a 1,024-token prompt
    for estimate, published in ((h100, 6.48e-3), (a100, 1 / 75)):
        assert 1.05 < estimate / published < 1.25, (estimate, published)


# ---- mixtures of experts ---------------------------------------------------------------------------------
MIXTRAL_CONFIG = {  # mistralai/Mixtral-8x7B-v0.1's config.json, the keys that size it
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "vocab_size": 32000, "hidden_act": "silu", "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "num_local_experts": 8, "num_experts_per_tok": 2,
}
QWEN3_30B_A3B_CONFIG = {  # Qwen/Qwen3-30B-A3B's config.json, the keys that size it
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_attention_heads": 32,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "num_experts": 128, "num_experts_per_tok": 8,
    "decoder_sparse_step": 1, "mlp_only_layers": [],
}


def test_mixture_of_experts_counts_every_expert_and_runs_a_few(tmp_path: Path) -> None:
    mixtral = MODELS["mixtral-8x7b"]
    assert mixtral.params == 46_702_792_704  # the published total (its safetensors index)
    active = mixtral.active_layer_params + mixtral.head_params + mixtral.vocab_size * mixtral.d_model
    assert active == pytest.approx(12.9e9, rel=0.01)  # "12.9B active parameters"
    (tmp_path / "Mixtral").mkdir()
    (tmp_path / "Mixtral" / "config.json").write_text(json.dumps(MIXTRAL_CONFIG))
    assert load_model(str(tmp_path / "Mixtral")).model_copy(update={"name": "mixtral-8x7b"}) == mixtral
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B_CONFIG))
    qwen = load_model(str(tmp_path / "config.json"))
    assert (qwen.n_experts, qwen.experts_per_token, qwen.d_ff) == (128, 8, 768)
    assert qwen.params == pytest.approx(30.5e9, rel=0.005)  # "30.5B in total, 3.3B activated"
    assert qwen.active_layer_params + 2 * qwen.head_params == pytest.approx(3.3e9, rel=0.03)
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3_30B_A3B_CONFIG, "shared_expert_intermediate_size": 5632}))
    with pytest.raises(RooflineError, match="'shared_expert_intermediate_size' = 5632: shared experts"):
        load_model(str(tmp_path / "config.json"))
    with pytest.raises(ValueError, match="experts_per_token must be <= n_experts"):
        mixtral.model_copy(update={}).model_validate({**mixtral.model_dump(), "experts_per_token": 9})


def test_a_mixture_reads_the_experts_its_tokens_were_routed_to() -> None:
    m = MODELS["mixtral-8x7b"]
    # each token picks 2 of 8: one token reads 2 experts a layer, 8 tokens 8 x (1 - 0.75^8) = 7.2, many all 8
    assert [m.experts_read(n) for n in (0, 1)] == [0.0, 2.0]
    assert m.experts_read(8) == pytest.approx(8 * (1 - 0.75**8)) and m.experts_read(200) == pytest.approx(8.0)
    h100 = GPUS["h100"]
    rl = Roofline(h100, m, tensor_parallel=2)
    bw = h100.hbm_gb_s * 1e9 * h100.mbu
    # one decode: the shared weights (attention, router, norms, LM head) and 2 experts of 3 x 4096 x 14336 a
    # layer, over 2 GPUs, plus the overhead; its attention (one token over 512) is small beside them
    shared = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 8 + 2 * 4096) + 32000 * 4096
    expert = 32 * 3 * 4096 * 14336
    link_s = 2 * 32 * 2 * (1 / 2) * 4096 * 2 / (h100.link_gb_s * 1e9)  # a token's 2 all-reduces a layer
    wait_s = 2 * 32 * h100.link_latency_us / 1e6  # and the step's: each all-reduce's latency
    expected = h100.step_overhead_ms / 1e3 + (shared + 2 * expert) * 2 / 2 / bw + link_s + wait_s
    assert rl.decode_head_s(1) == pytest.approx(expected, rel=1e-9)
    assert rl.decode_s(1, 512) == pytest.approx(expected, rel=0.02)
    # a batch of 64 reads all 8 experts: its weights take (shared + 8 experts) / (shared + 2 experts) longer
    dense_read = (shared + 8 * expert) * 2 / 2 / bw
    assert rl.decode_head_s(64) == pytest.approx(h100.step_overhead_ms / 1e3 + dense_read + 64 * link_s + wait_s,
                                                 rel=1e-6)
    # a dense model of the same weights (no router) reads them all at any batch: at batch 1 the mixture's
    # step is 3.2 times shorter
    dense = Roofline(h100, m.model_copy(update={"n_experts": 1, "experts_per_token": 1,
                                                "d_ff": 14336 * 8}), tensor_parallel=2)
    dense_s = h100.step_overhead_ms / 1e3 + (shared - 32 * 4096 * 8 + 8 * expert) * 2 / 2 / bw + link_s + wait_s
    assert dense.decode_head_s(1) == pytest.approx(dense_s, rel=1e-9)
    assert dense.decode_head_s(1) / rl.decode_head_s(1) == pytest.approx(dense_s / expected)
    assert 2.5 < dense_s / expected < 3.5


def test_an_fp8_kv_cache_holds_twice_the_tokens(tmp_path: Path) -> None:
    m = MODELS["llama-3-8b"]
    fp8 = m.model_copy(update={"kv_dtype": "fp8"})
    assert fp8.kv_bytes_per_token == m.kv_bytes_per_token // 2 and fp8.params == m.params
    assert fp8.shape().kv_dtype == "fp8" and m.shape().kv_dtype == "bfloat16"
    assert Roofline(GPUS["h100"], fp8)._kv_bytes == Roofline(GPUS["h100"], m)._kv_bytes / 2
    runner = CliRunner()
    got = runner.invoke(app, ["estimate-profile", "--kv-cache-dtype", "fp8", "--max-batch-size", "2",
                              "--out-dir", str(tmp_path)])
    assert got.exit_code == 0, got.output
    prof = ServiceTimeProfile.from_csv(tmp_path / "roofline-h100-llama-3-8b-bfloat16-kvfp8.csv")
    assert Roofline.from_profile(prof).model.kv_dtype == "fp8"  # the simulator's steps read the fp8 cache
    blocks = kv_cache_blocks(79.6, 0.9, fp8.shape(), 16)
    bf16 = kv_cache_blocks(79.6, 0.9, m.shape(), 16)
    assert blocks in (2 * bf16, 2 * bf16 + 1) and f"{blocks:,} blocks" in got.output  # twice, floored once
    got = runner.invoke(app, ["estimate-profile", "--kv-cache-dtype", "int4", "--out-dir", str(tmp_path)])
    assert got.exit_code == 2 and "--kv-cache-dtype 'int4'" in got.output

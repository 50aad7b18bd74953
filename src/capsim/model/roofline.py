"""Estimated service times of a GPU that is not at hand: a roofline of the model's work on the GPU's datasheet.

capsim's profiles are measured (``capsim profile`` on the device, docs/profiles.md). Before a GPU is at
hand, a plan for one still needs service times; this estimates them the way roofline-based LLM simulators
do (LLMCompass, GenZ, BLIS's roofline mode; the roofline model itself is Williams, Waterman and Patterson,
"Roofline: an insightful visual performance model", CACM 2009). A step is two kinds of work, each bound by
the slower of its arithmetic and its memory traffic:

- the **linear layers** (attention projections, MLP, the LM head for each sequence that emits a token):
  ``2 x params`` FLOPs per token, and every weight read once a step, so a small batch is bound by the
  memory bandwidth (the weights over the bandwidth) and a large one by the arithmetic;
- the **attention** over the KV cache: ``4 x layers x heads x head_dim`` FLOPs per (query, key) pair, and
  the cache read once per sequence (its context) plus the new tokens' K and V written.

A mixture of experts (``ModelArch.n_experts`` > 1) runs ``experts_per_token`` experts a token: its FLOPs are
the active weights', and a step reads the weights every token runs plus the experts its tokens were routed
to (their expected number under uniform routing, ``ModelArch.experts_read``).

``seconds = overhead + max(linear FLOPs / (peak x mfu), weight bytes / (bandwidth x mbu))
+ max(attention FLOPs / (peak x mfu), KV bytes / (bandwidth x mbu))``.

``mfu`` and ``mbu`` (the shares of the peak FLOPs and bandwidth that real kernels reach) and the per-step
``overhead`` (the engine's scheduling and launch time) are **assumptions**, not measurements: the defaults
(0.5, 0.7, 1 ms) are round numbers of the size serving engines are reported to reach on large GPUs, and a
plan that depends on them should be checked by measuring the GPU (``scripts/device_profile.sh``). The
GPUs' peak dense 16-bit tensor FLOPs (no sparsity), HBM bandwidth and memory are NVIDIA's datasheet
figures. Models are read from a Hugging Face ``config.json`` or taken from ``MODELS`` (the published
configs' numbers). Pure: no torch, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from capsim.errors import CapsimError
from capsim.model.kv_cache import DTYPE_BYTES, ModelShape
from capsim.model.profile import ProfilePoint, ServiceTimeProfile, make_profile, powers_of_two
from capsim.model.settings import format_validation_error
from capsim.model.step_model import StepTimeFit, fit_step_time


class RooflineError(CapsimError, ValueError):
    """A GPU or model description is unusable; the message names the file, key or field."""


class GpuSpec(BaseModel):
    """A GPU as its datasheet gives it, plus the shares of its peaks that real kernels reach."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    peak_tflops: float = Field(gt=0, description="dense 16-bit tensor TFLOPS (no sparsity)")
    hbm_gb_s: float = Field(gt=0, description="memory bandwidth, GB/s (10^9 bytes)")
    memory_gib: float = Field(gt=0, description="memory as nvidia-smi counts it, GiB")
    link_gb_s: float = Field(gt=0, description="GPU-to-GPU bandwidth one way, GB/s (NVLink, else PCIe)")
    link_latency_us: float = Field(0.0, ge=0, description="one all-reduce's time besides its bytes (launch, "
                                   "synchronisation), us; 0 in estimates made before it was modelled")
    mfu: float = Field(0.5, gt=0, le=1, description="share of the peak FLOPs the kernels reach (assumed)")
    mbu: float = Field(0.7, gt=0, le=1, description="share of the bandwidth the kernels reach (assumed)")
    step_overhead_ms: float = Field(1.0, ge=0, description="the engine's time per step besides kernels (assumed)")

    @property
    def flops_per_s(self) -> float:
        return self.peak_tflops * 1e12 * self.mfu

    @property
    def bytes_per_s(self) -> float:
        return self.hbm_gb_s * 1e9 * self.mbu


#: One small all-reduce's time, us: the floor a decode step's all-reduces meet whatever their bytes. Over
#: NVLink on H100s vLLM's custom all-reduce takes 9 to 12 us at the smallest sizes (512 to 32,768) at TP 2,
#: 4 and 8 (SGLang PR #2904's table, no CUDA graph) and 10 us for a 0.5 MiB (32 x 8192 bf16) tensor at TP 4
#: (vLLM PR #24532);
#: NCCL's NVLS on two H100s about 6 us in a CUDA graph (NCCL issue #1259): 8 us, for the A100's NVLink too
#: (assumed, no measurement at hand). Over PCIe NCCL took 19 to 24 us for 4 to 32 KiB on four GPUs behind
#: one switch, in a CUDA graph (sglang-V100 PR #2): 20 us.
NVLINK_ALLREDUCE_US, PCIE_ALLREDUCE_US = 8.0, 20.0

#: NVIDIA datasheet figures (SXM parts where there are two): dense BF16/FP16 tensor TFLOPS, GB/s, GiB.
GPUS: dict[str, GpuSpec] = {
    "a100-80gb": GpuSpec(name="NVIDIA A100 80GB SXM", peak_tflops=312, hbm_gb_s=2039, memory_gib=79.2, link_gb_s=300,
                         link_latency_us=NVLINK_ALLREDUCE_US),
    "h100": GpuSpec(name="NVIDIA H100 SXM", peak_tflops=989, hbm_gb_s=3350, memory_gib=79.6, link_gb_s=450,
                    link_latency_us=NVLINK_ALLREDUCE_US),
    "h200": GpuSpec(name="NVIDIA H200 SXM", peak_tflops=989, hbm_gb_s=4800, memory_gib=139.8, link_gb_s=450,
                    link_latency_us=NVLINK_ALLREDUCE_US),
    "l40s": GpuSpec(name="NVIDIA L40S", peak_tflops=362, hbm_gb_s=864, memory_gib=44.4, link_gb_s=32,
                    link_latency_us=PCIE_ALLREDUCE_US),
    "l4": GpuSpec(name="NVIDIA L4", peak_tflops=121, hbm_gb_s=300, memory_gib=22.0, link_gb_s=32,
                  link_latency_us=PCIE_ALLREDUCE_US),
}


class ModelArch(BaseModel):
    """A decoder-only transformer's shape: what its weights, FLOPs and KV cache follow from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    n_layers: int = Field(ge=1)
    d_model: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    n_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    d_ff: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    gated_mlp: bool = True  # SwiGLU (gate, up, down): three matrices; else two
    tied_embeddings: bool = False
    dtype: Literal["float32", "float16", "bfloat16", "fp8"] = "bfloat16"  # the weights'
    # the KV cache's (vLLM's --kv-cache-dtype; None: the weights' dtype, vLLM's "auto")
    kv_dtype: Literal["float32", "float16", "bfloat16", "fp8"] | None = None
    # mixture of experts: every layer's MLP is n_experts experts of d_ff each (and a router); a token runs
    # experts_per_token of them. 1 expert: a dense model
    n_experts: int = Field(1, ge=1)
    experts_per_token: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _experts(self) -> Self:
        if self.experts_per_token > self.n_experts:
            raise ValueError(f"experts_per_token must be <= n_experts ({self.n_experts}), got {self.experts_per_token}")
        return self

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    @property
    def expert_params(self) -> int:
        """One expert's weights in one layer (the dense MLP of a dense model)."""
        return (3 if self.gated_mlp else 2) * self.d_model * self.d_ff

    @property
    def shared_layer_params(self) -> int:
        """Weights every token runs in the transformer layers: projections, norms, the router."""
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = self.d_model * q_out + 2 * self.d_model * kv_out + q_out * self.d_model
        router = self.d_model * self.n_experts if self.is_moe else 0
        return self.n_layers * (attention + router + 2 * self.d_model)

    @property
    def layer_params(self) -> int:
        """Weights of the transformer layers (projections, MLP or experts, norms)."""
        return self.shared_layer_params + self.n_layers * self.n_experts * self.expert_params

    @property
    def active_layer_params(self) -> int:
        """Weights of the transformer layers one token runs (``layer_params`` for a dense model)."""
        return self.shared_layer_params + self.n_layers * self.experts_per_token * self.expert_params

    def experts_read(self, tokens: int) -> float:
        """Experts a layer reads for ``tokens`` tokens, each routed to ``experts_per_token`` of them
        uniformly: ``n_experts x (1 - (1 - k / n_experts)^tokens)``, the expected number touched."""
        if not self.is_moe:
            return 1.0 if tokens > 0 else 0.0
        return self.n_experts * (1.0 - (1.0 - self.experts_per_token / self.n_experts) ** tokens)

    @property
    def head_params(self) -> int:
        """The LM head's weights (the output projection to the vocabulary)."""
        return self.vocab_size * self.d_model

    @property
    def params(self) -> int:
        """All weights, the input embedding included (once when it is tied to the head)."""
        embedding = 0 if self.tied_embeddings else self.vocab_size * self.d_model
        return self.layer_params + self.head_params + embedding + self.d_model

    @property
    def bytes_per_param(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def weights_gib(self) -> float:
        return self.params * self.bytes_per_param / 1024**3

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * DTYPE_BYTES[self.cache_dtype]

    @property
    def cache_dtype(self) -> Literal["float32", "float16", "bfloat16", "fp8"]:
        """The KV cache's dtype: ``kv_dtype``, else the weights'."""
        return self.kv_dtype or self.dtype

    def shape(self, activation_peak_gb: float = 0.0) -> ModelShape:
        """The scenario's ``batching.model`` for this model (its KV cache's size follows from it)."""
        return ModelShape(n_layers=self.n_layers, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                          kv_dtype=self.cache_dtype, weights_gb=round(self.weights_gib, 3), activation_peak_gb=activation_peak_gb)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], name: str, source: str = "config") -> ModelArch:
        """From a Hugging Face ``config.json``'s keys (Llama, Mistral, Qwen2 spelling); a missing or bad
        key raises ``RooflineError`` naming ``source`` and the key."""
        def need(key: str) -> int:
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RooflineError(f"{source}: {key!r} must be a positive integer, got {value!r}")
            return value

        d_model, n_heads = need("hidden_size"), need("num_attention_heads")
        n_kv = need("num_key_value_heads") if "num_key_value_heads" in config else n_heads
        experts_key = next((k for k in ("num_local_experts", "num_experts") if config.get(k)), None)
        n_experts, per_token, d_ff_key = 1, 1, "intermediate_size"
        if experts_key is not None:  # Mixtral's or Qwen-MoE's spelling
            n_experts, per_token = need(experts_key), need("num_experts_per_tok")
            d_ff_key = "moe_intermediate_size" if "moe_intermediate_size" in config else "intermediate_size"
            for key, allowed in (("shared_expert_intermediate_size", (None, 0)), ("mlp_only_layers", (None, [])),
                                 ("decoder_sparse_step", (None, 1)), ("n_shared_experts", (None, 0))):
                if config.get(key) not in allowed:
                    raise RooflineError(f"{source}: {key!r} = {config.get(key)!r}: shared experts and dense layers "
                                        "among the expert ones are not modelled (every layer routed, no shared expert)")
        head_dim = need("head_dim") if config.get("head_dim") is not None else d_model // n_heads
        dtype = str(config.get("torch_dtype") or "bfloat16")
        if dtype not in DTYPE_BYTES:
            raise RooflineError(f"{source}: 'torch_dtype' must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
        act = str(config.get("hidden_act", "silu"))
        return cls(name=name, n_layers=need("num_hidden_layers"), d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv,
                   head_dim=head_dim, d_ff=need(d_ff_key), vocab_size=need("vocab_size"),
                   gated_mlp=act in ("silu", "swiglu", "gelu_pytorch_tanh") or "glu" in act,
                   tied_embeddings=bool(config.get("tie_word_embeddings", False)), dtype=dtype,
                   n_experts=n_experts, experts_per_token=per_token)


#: Published configs (their Hugging Face ``config.json``): Meta's Llama 3 8B and 70B, Mistral 7B v0.1,
#: Qwen2.5 7B; and GPT-2 small's shape, which capsim's own ``gpt2-small`` reference model has
#: (``capsim.core.engine``), so a GPU profile measured by ``scripts/device_profile.sh`` can be set beside
#: its estimate (position embeddings and biases, 0.7% of its weights, are left out).
MODELS: dict[str, ModelArch] = {
    "gpt2-small": ModelArch(name="gpt2-small", n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, head_dim=64,
                            d_ff=3072, vocab_size=50257, gated_mlp=False, tied_embeddings=True),
    "llama-3-8b": ModelArch(name="llama-3-8b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128,
                            d_ff=14336, vocab_size=128256),
    "llama-3-70b": ModelArch(name="llama-3-70b", n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8,
                             head_dim=128, d_ff=28672, vocab_size=128256),
    "mistral-7b": ModelArch(name="mistral-7b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128,
                            d_ff=14336, vocab_size=32000),
    "qwen2.5-7b": ModelArch(name="qwen2.5-7b", n_layers=28, d_model=3584, n_heads=28, n_kv_heads=4, head_dim=128,
                            d_ff=18944, vocab_size=152064),
    # a mixture of experts: 8 experts of 14,336 a layer, 2 a token (46.7B weights, 12.9B run per token)
    "mixtral-8x7b": ModelArch(name="mixtral-8x7b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8,
                              head_dim=128, d_ff=14336, vocab_size=32000, n_experts=8, experts_per_token=2),
}


def load_model(spec: str) -> ModelArch:
    """A name from ``MODELS`` or the path of a Hugging Face ``config.json`` (its folder's name names it)."""
    if spec in MODELS:
        return MODELS[spec]
    path = Path(spec)
    if not path.exists():
        raise RooflineError(f"model {spec!r} is neither one of {sorted(MODELS)} nor a config.json that exists")
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RooflineError(f"{path}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise RooflineError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise RooflineError(f"{path}: must hold a JSON object")
    return ModelArch.from_hf_config(config, name=path.parent.name or path.stem, source=str(path))


def load_gpu(name: str, **overrides: float | None) -> GpuSpec:
    """A GPU from ``GPUS`` with any of ``mfu``, ``mbu``, ``step_overhead_ms``, ``link_latency_us`` replaced
    (``None`` keeps it)."""
    if name not in GPUS:
        raise RooflineError(f"GPU {name!r} is not one of {sorted(GPUS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    try:
        return GpuSpec(**{**GPUS[name].model_dump(), **changes})
    except ValidationError as exc:
        raise RooflineError(f"GPU {name!r}: {format_validation_error(exc)}") from None


class Roofline:
    """Seconds of one engine step of ``model`` on ``tensor_parallel`` GPUs like ``gpu`` (see the module
    docstring). With tensor parallelism (Megatron-style, as vLLM's ``--tensor-parallel-size``) each GPU
    holds and runs ``1 / tensor_parallel`` of the weights, heads and KV cache (a KV head is replicated
    where there are fewer than GPUs), and each layer adds two
    all-reduces of the step's activations (a ring moves ``2 (n - 1) / n`` of them over each GPU's link), each
    also taking the link's latency (``GpuSpec.link_latency_us``) whatever its bytes."""

    def __init__(self, gpu: GpuSpec, model: ModelArch, tensor_parallel: int = 1) -> None:
        if tensor_parallel < 1:
            raise RooflineError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
        # vLLM's rules for splitting the heads (its ModelConfig and QKVParallelLinear): the query heads evenly,
        # the KV heads evenly or each replicated on a whole number of GPUs
        kv = model.n_kv_heads
        if model.n_heads % tensor_parallel or (kv % tensor_parallel and tensor_parallel % kv):
            raise RooflineError(
                f"tensor_parallel {tensor_parallel} does not split {model.name}'s heads: its {model.n_heads} attention "
                f"heads must divide evenly, and its {kv} KV heads evenly or replicated evenly (vLLM refuses it)")
        self.gpu, self.model, self.tp = gpu, model, tensor_parallel
        # a step reads the weights every token runs, and a mixture of experts the experts its tokens were routed
        # to (each GPU a 1/tp slice of every expert, as vLLM shards experts without expert parallelism); a dense
        # model's MLP is in the first term, which keeps its arithmetic (and the shipped profiles' digits)
        bpp = model.bytes_per_param
        if model.is_moe:
            self._shared_bytes = (model.shared_layer_params + model.head_params) * bpp / tensor_parallel
            self._expert_bytes = model.n_layers * model.expert_params * bpp / tensor_parallel
        else:
            self._shared_bytes = (model.layer_params + model.head_params) * bpp / tensor_parallel
            self._expert_bytes = 0.0
        self._attn_flops = 4 * model.n_layers * model.n_heads * model.head_dim / tensor_parallel  # per pair
        # KV heads split over the GPUs, each replicated where there are fewer heads than GPUs: the cache's rule
        self._kv_bytes = model.shape().kv_bytes_per_token_per_gpu(tensor_parallel)
        # bytes each GPU sends per token computed: 2 all-reduces a layer of d_model activations
        self._link_bytes = (0.0 if tensor_parallel == 1 else
                            2 * model.n_layers * 2 * (tensor_parallel - 1) / tensor_parallel * model.d_model
                            * model.bytes_per_param)
        # and a step's 2 all-reduces a layer each wait out the link's latency, however few its tokens
        self._link_latency_s = 0.0 if tensor_parallel == 1 else 2 * model.n_layers * gpu.link_latency_us / 1e6

    @classmethod
    def from_profile(cls, profile: ServiceTimeProfile) -> Roofline:
        """The roofline an estimated profile (``roofline_profile``) was made with."""
        est = profile.metadata.get("estimate")
        if not is_estimate(profile) or not isinstance(est, dict) or est.get("method") != "roofline":
            raise RooflineError(f"{profile.source}: not a roofline estimate (its metadata has no 'estimate')")
        try:
            model = ModelArch(**{k: v for k, v in profile.metadata["model"].items() if k in ModelArch.model_fields})
            return cls(GpuSpec(**est["gpu"]), model, int(est.get("tensor_parallel", 1)))
        except (KeyError, TypeError, ValidationError) as exc:
            raise RooflineError(f"{profile.source}: the estimate's GPU or model is unusable ({exc})") from None

    def step_s(self, chunks: Sequence[tuple[int, int]] = (), decode_contexts: Sequence[int] = ()) -> float:
        """A step running prefill ``chunks`` (tokens, tokens already cached) and one decode per entry of
        ``decode_contexts`` (its context); ``aggregate_s`` of their sums."""
        tokens = sum(n for n, _ in chunks)
        return self.aggregate_s(len(chunks), tokens, max((n for n, _ in chunks), default=0),
                                sum(n * c for n, c in chunks), len(decode_contexts), sum(decode_contexts))

    def aggregate_s(self, prefills: int, prefill_tokens: int, prefill_max_tokens: int, prefill_context: int,
                    decodes: int, decode_context: int) -> float:
        """A step from the sums a scheduler's ``Step`` keeps: ``prefills`` chunks of ``prefill_tokens`` in
        all (the longest ``prefill_max_tokens``; ``prefill_context`` sums tokens x tokens already cached)
        and ``decodes`` decodes whose contexts sum to ``decode_context``. The LM head runs once per chunk
        and per decode. Exact for one chunk or chunks of one size and context; otherwise a chunk's own
        attention counts as if every chunk were the longest (an upper bound) and the cached tokens it
        reads as the token-weighted mean context."""
        g = self.gpu
        tokens = prefill_tokens + decodes
        if tokens == 0:
            return g.step_overhead_ms / 1e3
        pairs = prefill_context + prefill_tokens * (prefill_max_tokens + 1) / 2 + decode_context + decodes
        cached = prefills * prefill_context / prefill_tokens if prefill_tokens else 0.0
        kv_tokens = cached + prefill_tokens + decode_context + decodes
        attention = max(self._attn_flops * pairs / g.flops_per_s, self._kv_bytes * kv_tokens / g.bytes_per_s)
        return g.step_overhead_ms / 1e3 + self._dense_s(tokens, prefills + decodes) + attention

    def _dense_s(self, tokens: int, sequences: int) -> float:
        """The linear layers (the LM head once per sequence), bound by their FLOPs or the weights' read,
        and the all-reduces of ``tokens`` activations over the links."""
        g, m = self.gpu, self.model
        linear_flops = 2.0 * (m.active_layer_params * tokens + m.head_params * sequences) / self.tp
        weights = self._shared_bytes + self._expert_bytes * m.experts_read(tokens)
        linear = max(linear_flops / g.flops_per_s, weights / g.bytes_per_s)
        return linear + self._link_latency_s + self._link_bytes * tokens / (g.link_gb_s * 1e9)

    def decode_head_s(self, decodes: int) -> float:
        """A plain decode step of ``decodes`` sequences less its attention: the overhead, the linear
        layers and the links (``aggregate_s`` of such a step is this plus ``decode_attention_s_per_token x
        (context + decodes)``, up to rounding)."""
        overhead = self.gpu.step_overhead_ms / 1e3
        return overhead + self._dense_s(decodes, decodes) if decodes else overhead

    @property
    def decode_attention_s_per_token(self) -> float:
        """Seconds a decode's attention takes per token it attends (its context and itself): the larger
        of the arithmetic's and the cache read's time, as the same tokens set both."""
        g = self.gpu
        return max(self._attn_flops / g.flops_per_s, self._kv_bytes / g.bytes_per_s)

    def prefill_s(self, batch_size: int, prompt_tokens: int) -> float:
        """A static batch's prefill: ``batch_size`` prompts of ``prompt_tokens`` in one pass."""
        return self.step_s([(prompt_tokens, 0)] * batch_size)

    def decode_s(self, batch_size: int, context: int) -> float:
        """One decode step of ``batch_size`` sequences whose caches hold ``context`` tokens."""
        return self.step_s((), [context] * batch_size)


def synthetic_steps(roofline: Roofline, *, n: int = 600, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                    max_context: int = 8192, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random steps of the mixes a continuous engine runs (decodes alone, a prefill chunk alone, a chunk
    joining decodes), as ``fit_step_time``'s features and the roofline's seconds."""
    rng = np.random.default_rng(seed)
    rows, secs = [], []
    for k in range(n):
        kind = k % 3  # 0: decodes only, 1: one prefill chunk only, 2: a chunk joining decodes
        decodes = 0 if kind == 1 else int(rng.integers(1, max_num_seqs + 1))
        contexts = rng.integers(16, max_context + 1, decodes).tolist()
        chunks: list[tuple[int, int]] = []
        if kind:
            room = max(max_num_batched_tokens - decodes, 1)
            size = min(room, int(rng.integers(16, max_num_batched_tokens + 1)))
            chunks = [(size, int(rng.integers(0, max(max_context - size, 1))))]
        rows.append([sum(t for t, _ in chunks), sum(t * c for t, c in chunks), decodes, sum(contexts)])
        secs.append(roofline.step_s(chunks, contexts))
    return np.asarray(rows, dtype=float), np.asarray(secs, dtype=float)


def roofline_profile(gpu: GpuSpec, model: ModelArch, *, tensor_parallel: int = 1, max_batch_size: int = 256,
                     prompt_tokens: Sequence[int] = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
                     context_tokens: Sequence[int] = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
                     max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, seed: int = 0) -> ServiceTimeProfile:
    """A service-time profile from the roofline: the static grid's prefill and decode rows (every
    statistic the estimate, ``count`` 1), which static pods read, and in its metadata the GPU, the model and
    the tensor parallelism (``estimate``, ``model``), from which continuous pods take each step's time
    from the roofline itself (``capsim.sim.step_time.RooflineStepTime``). ``estimate.linear_fit`` is the
    step-time model fitted to synthetic steps as ``capsim profile-steps`` fits measured ones, for reading
    beside measured coefficients; the simulator does not use it (it misses small decode steps by 15%)."""
    if max_batch_size < 1 or not prompt_tokens or not context_tokens:
        raise RooflineError("the grid needs max_batch_size >= 1 and at least one prompt and one context length")
    rl = Roofline(gpu, model, tensor_parallel)
    points = []
    for b in powers_of_two(max_batch_size):
        for phase, lengths, f in (("prefill", prompt_tokens, rl.prefill_s), ("decode", context_tokens, rl.decode_s)):
            for t in sorted(set(lengths)):
                ms = f(b, t) * 1e3
                points.append(ProfilePoint(phase, b, t, 1, ms, ms, ms, ms, 0.0))  # type: ignore[arg-type]
    x, y = synthetic_steps(rl, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                           max_context=max(context_tokens), seed=seed)
    fit: StepTimeFit = fit_step_time(x, y)
    meta = {
        "device": "cuda", "device_name": gpu.name, "dtype": model.dtype, "torch_version": "none (estimated)",
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "cuda_version": None,
        "model": {**model.model_dump(), "params": model.params, "weights_gib": round(model.weights_gib, 3),
                  "kv_bytes_per_token": model.kv_bytes_per_token},
        "estimate": {"method": "roofline", "gpu": gpu.model_dump(), "tensor_parallel": tensor_parallel,
                     "measured": False, "linear_fit": fit.to_dict(),
                     "note": "mfu, mbu and step_overhead_ms are assumptions; measure the GPU to replace them"},
    }
    return make_profile(points, meta)


def is_estimate(profile: ServiceTimeProfile) -> bool:
    """Whether a profile was estimated (``roofline_profile``) rather than measured."""
    est = profile.metadata.get("estimate")
    return isinstance(est, dict) and est.get("measured") is False

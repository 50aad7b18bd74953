"""A reference decoder-only transformer with KV-cache generation, the real model capsim batches and profiles.

Weights are random and seeded (nothing is downloaded); what matters is that prefill and decode run
real kernels of a realistic shape, so batching gains, time to first token and per-token latency are
measured, not assumed. ``tiny`` runs fast on two CPU cores; ``gpt2-small`` has GPT-2 small's shape
(12 layers, 768 wide, 12 heads, 50,257-token vocabulary) for GPUs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the reference model."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int

    def __post_init__(self) -> None:
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, f) < 1:
                raise ValueError(f"ModelConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})"
            )

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig("tiny", vocab_size=512, d_model=128, n_layers=2, n_heads=4, d_ff=512, max_seq_len=4096),
    "gpt2-small": ModelConfig(
        "gpt2-small", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=8192
    ),
}

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else the platform's machine name."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


class _Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(
        self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, mask: torch.Tensor
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k_cache[:, :, start : start + t] = k
        v_cache[:, :, start : start + t] = v
        keys = k_cache[:, :, : start + t]
        values = v_cache[:, :, : start + t]
        att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        out: torch.Tensor = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return out


class ReferenceTransformer(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-norm blocks, tied output head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        start: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits of the last position for tokens written into cache slots [start, start + T)."""
        x = self.tok(tokens) + self.pos(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.k[i], cache.v[i], start, mask)
        last = self.ln_f(x[:, -1])
        logits: torch.Tensor = last @ self.tok.weight.T
        return logits


@dataclass
class KVCache:
    """Preallocated keys and values per layer: (batch, heads, slots, head_dim)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (batch, cfg.n_heads, slots, cfg.d_model // cfg.n_heads)
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
        )


TokenCallback = Callable[[int, int, float], None]
"""Called from the generating thread as ``(index, token, seconds_from_batch_start)`` for each token."""


@dataclass(frozen=True)
class GenerationRequest:
    """One request: a prompt (token ids), how many tokens to generate, and an optional streaming hook."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    on_token: TokenCallback | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("GenerationRequest.prompt must hold at least one token")
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerationRequest.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class GenerationResult:
    """Tokens generated for one request and its timings, in seconds from the batch's start.

    ``started_at`` is the batch's start on the ``time.perf_counter`` clock, so a caller who noted when
    it submitted the request can tell its queue wait."""

    tokens: list[int]
    first_token_s: float
    total_s: float
    batch_size: int
    prompt_tokens: int
    token_times_s: list[float] = field(default_factory=list, repr=False)
    started_at: float = 0.0
    cached_tokens: int | None = None  # continuous mode: prompt tokens reused from the prefix cache


def _stream(
    streaming: list[tuple[int, GenerationRequest]], step: int, tokens: torch.Tensor, t_s: float
) -> None:
    """Hand token ``step`` to the requests that stream and still want it."""
    if not streaming:
        return
    values = tokens.tolist()
    for i, req in streaming:
        if step < req.max_new_tokens and req.on_token is not None:
            req.on_token(step, int(values[i]), t_s)


def synthetic_prompt(n_tokens: int, vocab_size: int, salt: int = 0) -> tuple[int, ...]:
    """A deterministic prompt of ``n_tokens`` ids (a stand-in for tokenized text)."""
    if n_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {n_tokens}")
    return tuple((7919 * i + 104729 * salt + 13) % vocab_size for i in range(n_tokens))


class ReferenceEngine:
    """Runs static-batch greedy generation of the reference model on one device.

    ``device`` 'auto' uses CUDA when present; ``dtype`` is 'float32', 'float16' or 'bfloat16'
    (half precision only on CUDA). The same seed gives the same weights. ``threads`` sets torch's
    intra-op thread count for the whole process (None: torch's default, one per core). ``slowdown`` (a
    gray-failure drill, the simulator's ``faults.slow_pods``): after each prefill and decode step the engine
    holds the model ``slowdown - 1`` times that step's time longer, sleeping, as a throttled GPU would take
    longer; the output is unchanged.
    """

    def __init__(
        self,
        config: ModelConfig | str = "tiny",
        *,
        device: str = "auto",
        dtype: str = "float32",
        seed: int = 0,
        threads: int | None = None,
        slowdown: float = 1.0,
    ) -> None:
        if not 1.0 <= slowdown <= 100.0:
            raise ValueError(f"slowdown must be between 1 and 100, got {slowdown}")
        self.slowdown = float(slowdown)
        if isinstance(config, str):
            if config not in PRESETS:
                raise ValueError(f"unknown model {config!r}; choose one of {sorted(PRESETS)}")
            config = PRESETS[config]
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)  # process-wide: a pod process runs one engine
        self.config = config
        self.device = resolve_device(device)
        if self.device.type == "cpu" and dtype != "float32":
            raise ValueError(f"dtype {dtype} needs a GPU; use float32 on the CPU")
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        gen = torch.Generator().manual_seed(seed)
        model = ReferenceTransformer(config)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / math.sqrt(p.shape[-1])))
        self.model = model.to(self.device, self.dtype).eval()

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return _cpu_name()

    def hold(self, since: float) -> float:
        """A slowed engine (``slowdown`` over 1): sleep ``slowdown - 1`` times the time since ``since``
        (``time.perf_counter``), the step's own; the seconds asked (0 at full speed)."""
        if self.slowdown == 1.0:
            return 0.0
        extra = (self.slowdown - 1.0) * (time.perf_counter() - since)
        time.sleep(extra)
        return extra

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- the two phases, exposed for the profiler -------------------------------------------
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the prompt (batch, T) through the model into cache slots [0, T); return next tokens.

        ``valid`` (batch, slots) is True where a slot holds a real (not padding) token.
        """
        _, t = tokens.shape
        positions = (valid[:, :t].long().cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        mask = causal[None] & valid[:, None, :t]
        mask |= torch.eye(t, dtype=torch.bool, device=tokens.device)[None]  # pad rows: attend to self
        logits = self.model(tokens, positions, cache, 0, mask[:, None])
        return torch.argmax(logits, -1)

    @torch.inference_mode()
    def decode(
        self, token: torch.Tensor, position: torch.Tensor, slot: int, valid: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """One decode step: write ``token`` (batch,) into cache ``slot``; return the next tokens."""
        mask = valid[:, None, None, : slot + 1]
        logits = self.model(token[:, None], position[:, None], cache, slot, mask)
        return torch.argmax(logits, -1)

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Greedy static-batch generation: prompts are left-padded, the batch runs until every request
        has its ``max_new_tokens``. Timings are measured on this device (synchronized on CUDA)."""
        if not requests:
            return []
        cfg = self.config
        b = len(requests)
        t = max(len(r.prompt) for r in requests)
        n = max(r.max_new_tokens for r in requests)
        if t + n > cfg.max_seq_len:
            raise ValueError(
                f"prompt ({t}) + new tokens ({n}) exceed the model's max_seq_len ({cfg.max_seq_len})"
            )
        dev = self.device
        tokens = torch.zeros(b, t, dtype=torch.long)
        valid = torch.zeros(b, t + n, dtype=torch.bool)
        for i, r in enumerate(requests):
            tokens[i, t - len(r.prompt) :] = torch.tensor(r.prompt)
            valid[i, t - len(r.prompt) :] = True  # the prompt, and every generated slot after it
        tokens, valid = tokens.to(dev), valid.to(dev)
        cache = KVCache.empty(cfg, b, t + n, dev, self.dtype)
        lengths = torch.tensor([len(r.prompt) for r in requests], device=dev)
        streaming = [(i, r) for i, r in enumerate(requests) if r.on_token is not None]
        start = time.perf_counter()
        out = [self.prefill(tokens, valid, cache)]
        self.synchronize()
        self.hold(start)
        times = [time.perf_counter() - start]
        _stream(streaming, 0, out[-1], times[-1])
        for step in range(1, n):
            began = time.perf_counter()
            out.append(self.decode(out[-1], lengths + step - 1, t + step - 1, valid, cache))
            if self.device.type == "cuda":
                self.synchronize()
            self.hold(began)
            times.append(time.perf_counter() - start)
            _stream(streaming, step, out[-1], times[-1])
        generated = torch.stack(out, dim=1).tolist()
        return [
            GenerationResult(
                tokens=generated[i][: r.max_new_tokens],
                first_token_s=times[0],
                total_s=times[r.max_new_tokens - 1],
                batch_size=b,
                prompt_tokens=len(r.prompt),
                token_times_s=times[: r.max_new_tokens],
                started_at=start,
            )
            for i, r in enumerate(requests)
        ]

    def request(self, prompt_tokens: int, max_new_tokens: int, salt: int = 0) -> GenerationRequest:
        """A request with a synthetic prompt of ``prompt_tokens`` tokens."""
        return GenerationRequest(synthetic_prompt(prompt_tokens, self.config.vocab_size, salt), max_new_tokens)

    def runner(self) -> Any:
        """An async batch runner for ``DynamicBatcher``: generation runs in a worker thread."""
        from capsim.core.batcher import as_runner

        return as_runner(self.generate)

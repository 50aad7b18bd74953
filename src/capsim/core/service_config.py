"""The pod's configuration: ``PodConfig``, from flags or the ``CAPSIM_*`` variables the exporter writes."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from capsim.core.engine import PRESETS
from capsim.core.state import StoreURLError, check_store_url
from capsim.model.settings import BatchSettings, FrozenModel
from capsim.policy.scheduling import SchedulerLimits

_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class PodConfig(FrozenModel):
    """Everything a pod is configured with; each field also reads from ``CAPSIM_<FIELD>``."""

    _error_prefix: ClassVar[str] = "pod"

    model: str = Field("tiny", description="reference model preset")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_batch_size: int = Field(32, ge=1)
    max_wait_ms: float = Field(10.0, ge=0)
    queue_capacity: int = Field(1024, ge=1)
    overflow: Literal["reject", "wait"] = "reject"
    max_concurrent_batches: int = Field(1, ge=1)
    redis_url: str = Field("memory://", description="session store: redis://, rediss://, unix://, memory://")
    session_ttl_s: float = Field(1800.0, gt=0, le=365 * 86400, description="session store: an idle session's "
                                 "state expires this long after its last turn (sliding; the scenario's state.ttl_s)")
    max_prompt_tokens: int = Field(2048, ge=1, description="longer prompts get 413")
    max_new_tokens: int = Field(512, ge=1, description="larger max_new_tokens get 413")
    drain_timeout_s: float = Field(25.0, ge=0, description="SIGTERM grace for in-flight work")
    warmup: bool = True
    gc_freeze: bool = Field(True, description="freeze the start-up heap (gc.collect, gc.freeze) once the pod is "
                            "ready, as vLLM and SGLang do: the collector's full passes then skip the model's and "
                            "the libraries' objects")
    pod_name: str = Field(default_factory=lambda: os.environ.get("HOSTNAME", "capsim-pod"))
    seed: int = 0
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: one per core)")
    slowdown: float = Field(1.0, ge=1, le=100, description="a gray-failure drill: the engine holds the model this "
                            "many times each batch's or step's time, sleeping the rest, as a throttled GPU would "
                            "(the simulator's faults.slow_pods); 1: full speed")
    keep_alive_on_engine_death: bool = Field(
        False, description="after a forward pass or step that raises (out of memory, a driver error), fail the "
        "requests it held and serve on; false: fail them, go unhealthy and exit 1 for the kubelet to restart the "
        "container, as vLLM's server does (VLLM_KEEP_ALIVE_ON_ENGINE_DEATH, off by default)")
    # continuous batching (docs/continuous.md): CAPSIM_BATCH_MODE=continuous and vLLM's engine limits
    batch_mode: Literal["static", "continuous"] = Field("static", description="static batches or per-step")
    max_num_seqs: int = Field(256, ge=1, description="continuous: requests running at once")
    max_num_batched_tokens: int = Field(2048, ge=1, description="continuous: tokens one step computes")
    block_size: int = Field(16, ge=1, description="continuous: tokens per KV-cache block")
    num_blocks: int = Field(4096, ge=1, description="continuous: KV-cache blocks")
    max_model_len: int = Field(4096, ge=2, description="continuous: longest prompt + output")
    long_prefill_token_threshold: int = Field(0, ge=0, description="continuous: largest prefill chunk (0: off)")
    trace_steps: int | None = Field(None, ge=1, description="the last engine steps (continuous) or batches "
                                    "(static) kept for GET /debug/batches (None: 16,384 steps, about 0.5 kB each "
                                    "and 10 s of 0.6-ms steps; 8,192 batches)")
    # off by default for now: a count prompt_tokens is the same synthetic prompt in every request, so every
    # request would hit the cache, unlike the simulator's workloads without a prefix source
    enable_prefix_caching: bool = Field(False, description="continuous: reuse the KV blocks of a cached prefix "
                                        "(vLLM V1 has it on)")

    ENV_PREFIX: ClassVar[str] = "CAPSIM_"

    # Checked here, so `capsim serve` refuses a bad value before it loads a model or opens a port.
    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"must be one of {', '.join(sorted(PRESETS))}, got {v!r}")
        return v

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not _DEVICE_RE.fullmatch(v):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v

    @field_validator("redis_url")
    @classmethod
    def _store_url(cls, v: str) -> str:
        try:
            check_store_url(v)
        except StoreURLError as exc:
            raise ValueError(str(exc)) from None
        return v

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> PodConfig:
        """Read ``CAPSIM_*`` variables (e.g. ``CAPSIM_MAX_BATCH_SIZE``), then apply ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            key = cls.ENV_PREFIX + name.upper()
            if key in env:
                values[name] = env[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def batch_settings(self) -> BatchSettings:
        return BatchSettings(
            max_batch_size=self.max_batch_size,
            max_wait_ms=self.max_wait_ms,
            queue_capacity=self.queue_capacity,
            overflow=self.overflow,
            max_concurrent_batches=self.max_concurrent_batches,
        )

    def scheduler_limits(self) -> SchedulerLimits:
        """The continuous-batching engine's limits."""
        return SchedulerLimits(self.max_num_seqs, self.max_num_batched_tokens, self.block_size, self.num_blocks,
                               self.max_model_len, self.long_prefill_token_threshold, self.enable_prefix_caching)

    def env(self) -> dict[str, str]:
        """The ``CAPSIM_*`` variables that reproduce this configuration."""
        return {self.ENV_PREFIX + k.upper(): str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in self.model_dump().items() if v is not None}

"""How many KV-cache blocks a GPU holds for a model: memory minus weights minus activations, over bytes per block.

vLLM sizes its cache the same way (``num_gpu_blocks`` in vllm/v1/worker/gpu_worker.py, see
``/work/shared/reference/serving_engines.md``): it takes ``gpu_memory_gb x gpu_memory_utilization``, subtracts
the weights and the activation peak measured in a profiling run, and divides the rest by the bytes one
block of ``block_size`` tokens holds: ``2 (K and V) x layers x kv_heads x head_dim x dtype bytes`` per token.

With tensor parallelism over ``tp`` GPUs every GPU holds ``1/tp`` of the weights and ``max(1, kv_heads // tp)``
of the KV heads (a head is replicated where there are fewer heads than GPUs: vLLM's ``get_num_kv_heads``), and
every GPU holds the same number of blocks, each for its own heads: the cache holds what one GPU's share leaves,
``gpu_memory_gb`` being one GPU's memory and ``activation_peak_gb`` one GPU's peak.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GIB = 1024**3

#: Bytes per element of the KV cache's dtype.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}


class ModelShape(BaseModel):
    """The parts of a model that size its KV cache (``batching.model`` in a scenario)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_layers: int = Field(ge=1, description="transformer layers")
    n_kv_heads: int = Field(ge=1, description="key/value heads per layer (fewer than query heads with GQA)")
    head_dim: int = Field(ge=1, description="dimension of one head")
    kv_dtype: Literal["float32", "float16", "bfloat16", "fp8"] = "float16"
    weights_gb: float = Field(ge=0, description="GiB the weights take on the GPU")
    activation_peak_gb: float = Field(0.0, ge=0, description="GiB of the forward pass's activation peak")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token stores across all layers."""
        return self.kv_bytes_per_token_per_gpu(1)

    def kv_bytes_per_token_per_gpu(self, tensor_parallel_size: int) -> int:
        """Bytes of K and V one token stores on each of ``tensor_parallel_size`` GPUs (its share of the heads)."""
        heads = max(1, self.n_kv_heads // tensor_parallel_size)
        return 2 * self.n_layers * heads * self.head_dim * DTYPE_BYTES[self.kv_dtype]


def kv_cache_blocks(gpu_memory_gb: float, gpu_memory_utilization: float, model: ModelShape, block_size: int,
                    tensor_parallel_size: int = 1) -> int:
    """Whole blocks of ``block_size`` tokens that fit in the GPU memory left to the cache (may be <= 0).

    ``gpu_memory_gb`` is one GPU's, in GiB, as vLLM and ``nvidia-smi`` count it; with ``tensor_parallel_size``
    GPUs each holds its share of the weights and of every block (see the module doc). The result is floored.
    """
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    weights = model.weights_gb / tensor_parallel_size
    free = (gpu_memory_gb * gpu_memory_utilization - weights - model.activation_peak_gb) * GIB
    return int(free // (block_size * model.kv_bytes_per_token_per_gpu(tensor_parallel_size)))

"""Frozen, validated settings for batching, shared by the real batcher and the simulated pod."""

from __future__ import annotations

import difflib
import math
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Literal, NoReturn, Self

from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError

from capsim.errors import CapsimError
from capsim.errors import did_you_mean as suggest
from capsim.model.kv_cache import ModelShape, kv_cache_blocks


class SettingsError(CapsimError, ValueError):
    """A setting has a bad value; the message names the field path and the value."""


def _number(v: Any) -> Any:
    # Pydantic's lax mode reads YAML ``true`` as 1 and the string "16" as 16; strict mode would also refuse
    # numpy's integers, which sweeps pass. So: any number type, but neither a boolean nor a string.
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        raise ValueError(f"must be a number, not a boolean (got {v!r})")
    if isinstance(v, str | bytes):
        raise ValueError(f"must be a number, not a string (got {v!r}); write it without quotes")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"must be a finite number, got {v!r}")
    return v


def _boolean(v: Any) -> Any:
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return bool(v)
    raise ValueError(f"must be true or false, got {v!r}")


#: Numbers and flags for settings read from YAML, environment or JSON: a boolean is not a number (YAML
#: ``true`` is not a rate of 1) and a string is not one either (``"16"`` is not 16 tokens); a float with a
#: fraction is not an integer; ``Float`` refuses NaN and infinity. numpy scalars pass (sweeps use them).
Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number), AllowInfNan(False)]
Bool = Annotated[bool, BeforeValidator(_boolean)]


def format_validation_error(exc: ValidationError, prefix: str = "", root: type[BaseModel] | None = None) -> str:
    """Render a pydantic error as 'a.b must ..., got X' lines, one per problem; an unknown key of ``root``'s
    (or a section's in it) with the known one closest to it."""
    lines = []
    for err in exc.errors():
        line = format_error(err, prefix)
        hint = did_you_mean(root, tuple(err["loc"])) if root and err["type"] == "extra_forbidden" else None
        lines.append(line + suggest(hint))
    return "; ".join(lines)


def format_error(err: Mapping[str, Any], prefix: str = "") -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) as 'a.b must ..., got X'."""
    path = ".".join(str(p) for p in err["loc"])
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    msg = err["msg"]
    if msg.startswith("Input should be"):
        msg = "must be" + msg[len("Input should be") :]
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    for long, short in _COMPARISONS:
        msg = msg.replace(long, short)
    if err["type"] == "missing":
        return f"{path} is required"
    if err["type"] == "extra_forbidden":
        return f"{path} is not a known setting"
    if err["type"] == "value_error" and "got " in msg:  # the check already names the value
        return f"{path} {msg}"
    return f"{path} {msg}, got {err.get('input')!r}"


_COMPARISONS = (
    ("greater than or equal to", ">="),
    ("less than or equal to", "<="),
    ("greater than", ">"),
    ("less than", "<"),
)


class FrozenModel(BaseModel):
    """Base for settings: immutable, no unknown keys, errors re-raised as SettingsError."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: object) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SettingsError(format_validation_error(exc, _error_prefix(type(self)), type(self))) from None


def _error_prefix(cls: type) -> str:
    return getattr(cls, "_error_prefix", "") or ""


class BatchSettings(FrozenModel):
    """How a pod groups requests into batches (same meaning in the real batcher and the simulator)."""

    _error_prefix: ClassVar[str] = "batching"

    max_batch_size: Int = Field(32, ge=1, le=65536, description="largest batch one forward pass takes")
    max_wait_ms: Float = Field(10.0, ge=0.0, le=3_600_000.0, description="longest the oldest queued request waits")
    queue_capacity: Int = Field(1024, ge=1, description="requests a pod queues before overflow applies")
    overflow: Literal["reject", "wait"] = Field("reject", description="full queue: reject at once, or wait")
    max_concurrent_batches: Int = Field(1, ge=1, le=64, description="batches in flight at once")
    tensor_parallel_size: Int = Field(
        1, ge=1, le=64, description="GPUs a pod holds and splits the model over (vLLM's --tensor-parallel-size): "
        "it requests, is placed on one node with, and is billed for this many GPUs; each GPU holds its share "
        "of the weights and the KV cache (gpu_memory_gb is one GPU's)")
    # continuous batching (vLLM's names and defaults; see capsim.policy.scheduling and docs/continuous.md)
    mode: Literal["static", "continuous"] = Field("static", description="static batches, or per-step scheduling")
    max_num_seqs: Int = Field(256, ge=1, le=65536, description="continuous: requests running at once")
    max_num_batched_tokens: Int = Field(2048, ge=1, description="continuous: tokens one step computes")
    block_size: Int = Field(16, ge=1, le=4096, description="continuous: tokens per KV-cache block")
    num_blocks: Int | None = Field(None, ge=1, description="continuous: KV-cache blocks (or gpu_memory_gb + model)")
    gpu_memory_gb: Float | None = Field(None, gt=0, description="continuous: GPU memory (GiB) the cache is sized from")
    gpu_memory_utilization: Float = Field(0.9, gt=0, le=1, description="continuous: share of GPU memory vLLM takes")
    model: ModelShape | None = Field(None, description="continuous: the model's shape, for gpu_memory_gb")
    max_model_len: Int = Field(8192, ge=2, description="continuous: longest prompt + output a request may have")
    long_prefill_token_threshold: Int = Field(0, ge=0, description="continuous: largest prefill chunk (0: off)")
    enable_prefix_caching: bool = Field(True, description="continuous: reuse cached KV blocks by hash (vLLM V1 default)")

    @model_validator(mode="after")
    def _cache_size(self) -> Self:
        if self.mode != "continuous":
            return self
        if self.num_blocks is not None and self.gpu_memory_gb is not None:
            _field_error(self, "gpu_memory_gb", "and num_blocks are exclusive: give the blocks or the memory, "
                         f"got {self.gpu_memory_gb} with num_blocks {self.num_blocks}")
        if self.num_blocks is None:
            if self.gpu_memory_gb is None or self.model is None:
                _field_error(self, "num_blocks", "(or gpu_memory_gb with model) is required in continuous mode, "
                             f"got num_blocks={self.num_blocks}, gpu_memory_gb={self.gpu_memory_gb}, "
                             f"model={'set' if self.model else None}")
            if self.kv_cache_blocks() < 1:
                m = self.model
                assert m is not None
                _field_error(self, "gpu_memory_gb", (
                    f"leaves no KV cache: {self.gpu_memory_gb} GiB x {self.gpu_memory_utilization} - weights "
                    f"{m.weights_gb}{self._weights_share()} - activations {m.activation_peak_gb} holds no block of "
                    f"{self.block_size} tokens, got {self.gpu_memory_gb}"))
        return self

    @property
    def max_wait_s(self) -> float:
        """The wait bound in seconds."""
        return self.max_wait_ms / 1000.0

    def kv_cache_blocks(self) -> int:
        """KV-cache blocks per pod: ``num_blocks``, or those ``gpu_memory_gb`` leaves for ``model``."""
        if self.num_blocks is not None:
            return self.num_blocks
        if self.gpu_memory_gb is None or self.model is None:
            raise SettingsError("batching.num_blocks (or gpu_memory_gb with model) is required in continuous mode")
        return kv_cache_blocks(self.gpu_memory_gb, self.gpu_memory_utilization, self.model, self.block_size,
                               self.tensor_parallel_size)

    def _weights_share(self) -> str:
        tp = self.tensor_parallel_size
        return f" / {tp} GPUs (tensor_parallel_size)" if tp > 1 else ""


def _field_error(model: BaseModel, name: str, message: str) -> NoReturn:
    """Fail a cross-field check at field ``name``, so the error names it as a field error does."""
    raise ValidationError.from_exception_data(type(model).__name__, [InitErrorDetails(
        type=PydanticCustomError("value_error", message.replace("{", "{{").replace("}", "}}")),
        loc=(name,), input=getattr(model, name))])


#: names people reach for that capsim spells otherwise (a section's own name when it is close is found anyway)
_SYNONYMS = {"hpa": "autoscaler", "horizontalpodautoscaler": "autoscaler", "scaling": "autoscaler",
             "batch": "batching", "batcher": "batching", "deployment": "pods", "replicas": "pods"}


def did_you_mean(root: type[BaseModel], loc: tuple[Any, ...],
                 skip: Callable[[object], bool] = lambda part: False) -> str | None:
    """The known setting closest to the unknown one at ``loc`` (pydantic's error path from ``root``), in the
    section it was written in; ``None`` when nothing is close. ``skip(part)``: a part of the path that names
    no field (a discriminated union's tag)."""
    models: list[type[BaseModel]] = [root]
    for part in loc[:-1]:
        inner = [m for model in models for m in _models_in(_field_annotation(model, part))]
        if inner:
            models = inner
        elif not (isinstance(part, int) or skip(part)):
            return None  # a path through something that is not a section
    return _closest(str(loc[-1]), _known(models))


def unknown_path(root: type[BaseModel], dotted: str) -> str | None:
    """Why the dotted path of an override (``batching.max_batch_size``, list indices allowed) names no setting
    of ``root``: its first part that names none, with the closest known one; ``None`` when it names one, or
    goes into a part whose keys are not fixed (a mapping of free keys)."""
    parts = dotted.split(".")
    models: list[type[BaseModel]] = [root]
    for depth, part in enumerate(parts):
        if part.isdigit():
            continue  # an index into a list of sections
        annotations = [a for m in models if (a := _field_annotation(m, part)) is not None]
        if not annotations and any(part in getattr(m, "_deprecated_keys", ()) for m in models):
            return None  # a key older files hold, which the section still takes (with its warning)
        if not annotations:
            hint = _closest(part, _known(models))
            return f"{'.'.join(parts[:depth + 1])} is not a known setting" + suggest(hint)
        models = [m for a in annotations for m in _models_in(a)]
        if not models:
            return None  # a value, or a free mapping: what follows is the value's to check
    return None


def aliased_path(root: type[BaseModel], dotted: str) -> str:
    """``dotted`` with each part that names a field by its Python name spelled as the YAML spells it (its alias:
    ``autoscaler.min_replicas`` -> ``autoscaler.minReplicas``), so an override lands on the key a dump by alias
    holds; parts that name no field, and what follows them, stay as written."""
    parts = dotted.split(".")
    models: list[type[BaseModel]] = [root]
    for depth, part in enumerate(parts):
        if part.isdigit():
            continue
        fields = [found for m in models if (found := _field(m, part)) is not None]
        if not fields:
            break
        alias = next((f.alias for name, f in fields if name == part and f.alias), None)
        if alias is not None:
            parts[depth] = alias
        models = [m for _, f in fields for m in _models_in(f.annotation)]
        if not models:
            break
    return ".".join(parts)


def _known(models: list[type[BaseModel]]) -> list[str]:
    return sorted({n for m in models for name, f in m.model_fields.items() for n in (name, f.alias) if n})


def _closest(wrote: str, known: list[str]) -> str | None:
    """The known name closest to ``wrote``: a synonym, the same letters, the name with a unit, a close spelling."""
    synonym = _SYNONYMS.get(wrote.lower())
    if synonym in known:
        return synonym
    flat = {k.replace("_", "").lower(): k for k in known}
    same = flat.get(wrote.replace("_", "").replace("-", "").lower())  # case or separators apart
    if same:
        return same
    longer = sorted((k for k in known if k.startswith(wrote + "_")), key=len)  # a unit left off (rate_per_s)
    if longer:
        return longer[0]
    close = difflib.get_close_matches(wrote, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _field(model: type[BaseModel], part: object) -> tuple[str, FieldInfo] | None:
    """The field of ``model`` that ``part`` names, by its Python name or its alias: (name, field)."""
    for name, f in model.model_fields.items():
        if part in (name, f.alias):
            return name, f
    return None


def _field_annotation(model: type[BaseModel], part: object) -> Any:
    found = _field(model, part)
    return found[1].annotation if found is not None else None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The setting sections an annotation holds: itself, or the members of its union, list or tuple."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]

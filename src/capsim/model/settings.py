"""Frozen, validated settings for batching, shared by the real batcher and the simulated pod."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class SettingsError(ValueError):
    """A setting has a bad value; the message names the field path and the value."""


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Render a pydantic error as 'a.b must ..., got X' lines, one per problem."""
    return "; ".join(format_error(err, prefix) for err in exc.errors())


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
            raise SettingsError(format_validation_error(exc, _error_prefix(type(self)))) from None


def _error_prefix(cls: type) -> str:
    return getattr(cls, "_error_prefix", "") or ""


class BatchSettings(FrozenModel):
    """How a pod groups requests into batches (same meaning in the real batcher and the simulator)."""

    _error_prefix: ClassVar[str] = "batching"

    max_batch_size: int = Field(32, ge=1, le=65536, description="largest batch one forward pass takes")
    max_wait_ms: float = Field(10.0, ge=0.0, le=3_600_000.0, description="longest the oldest queued request waits")
    queue_capacity: int = Field(1024, ge=1, description="requests a pod queues before overflow applies")
    overflow: Literal["reject", "wait"] = Field("reject", description="full queue: reject at once, or wait")
    max_concurrent_batches: int = Field(1, ge=1, le=64, description="batches in flight at once")

    @property
    def max_wait_s(self) -> float:
        """The wait bound in seconds."""
        return self.max_wait_ms / 1000.0

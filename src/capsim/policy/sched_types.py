"""The continuous-batching scheduler's vocabulary: engine limits, why a request is refused, one request's
state, and what one step runs (``capsim.policy.scheduling`` decides; these only hold)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from capsim.model.settings import BatchSettings

if TYPE_CHECKING:
    from capsim.policy.block_pool import Run


class Rejection(StrEnum):
    """Why a request can never be served by this engine configuration."""

    TOO_LONG = "longer_than_max_model_len"  # prompt + max_tokens > max_model_len
    EXCEEDS_CACHE = "more_blocks_than_cache"  # its KV blocks alone outgrow the whole cache


class SchedulerError(ValueError):
    """A shell used the scheduler wrongly (a duplicate id, an unknown id); the message names it."""


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    """The engine limits one step respects (vLLM's names); all counts, ``>= 1`` unless said."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_blocks: int = 1024
    max_model_len: int = 8192
    long_prefill_token_threshold: int = 0  # 0: off
    enable_prefix_caching: bool = False  # off unless asked (BatchSettings turns it on, as vLLM V1)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_blocks", "max_model_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")

    @classmethod
    def from_settings(cls, s: BatchSettings) -> SchedulerLimits:
        """The limits of a ``batching`` section in continuous mode (blocks derived as it says)."""
        return cls(s.max_num_seqs, s.max_num_batched_tokens, s.block_size, s.kv_cache_blocks(),
                   s.max_model_len, s.long_prefill_token_threshold, s.enable_prefix_caching)

    def rejection(self, prompt_tokens: int, max_tokens: int) -> Rejection | None:
        """Why a request of this size can never run, or ``None`` when it can."""
        if prompt_tokens + max_tokens > self.max_model_len:
            return Rejection.TOO_LONG
        # the last emitted token is never fed back, so its KV is never stored
        if -(-(prompt_tokens + max_tokens - 1) // self.block_size) > self.num_blocks:
            return Rejection.EXCEEDS_CACHE
        return None


class Request:
    """One request's scheduling state (``num_tokens`` = prompt + generated so far)."""

    __slots__ = ("blocks", "cached", "computed", "emitted_step", "generated", "hashes", "max_tokens", "num_tokens",
                 "preemptions", "prompt", "refs", "reg", "request_id", "started", "tail")

    def __init__(self, request_id: int, prompt_tokens: int, max_tokens: int, hashes: list[int] | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt_tokens
        self.max_tokens = max_tokens
        self.num_tokens = prompt_tokens
        self.computed = 0  # num_computed_tokens
        self.generated = 0
        self.blocks = 0  # KV blocks held
        self.preemptions = 0
        self.started = False  # scheduled at least once
        self.hashes: list[int] = hashes if hashes is not None else []  # chained hashes of full blocks
        self.refs: list[int] = []  # the stretches of its blocks it holds in the prefix cache (see BlockPool)
        self.tail: Run | None = None  # the cache's run holding its last referenced block
        self.reg = 0  # blocks looked at for registration
        self.cached = 0  # tokens served from the prefix cache at its first admission
        #: the step (the scheduler's ``steps`` after it) of ``Scheduler.step`` in which it last emitted a token; a run
        #: of decode steps (``advance_decodes``) leaves it as it was. 0: none yet
        self.emitted_step = 0

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, computed={self.computed}/{self.num_tokens}, "
                f"generated={self.generated}/{self.max_tokens}, blocks={self.blocks})")


@dataclass(slots=True)
class Step:
    """What runs in one engine step, and what it produced (the scheduler has already applied it).

    ``request_ids``/``num_tokens``/``contexts`` list every scheduled request in running order with the
    tokens it computes this step and the tokens already in its cache (its context); a scheduler made with
    ``detail=False`` leaves them empty. The aggregates are
    what a step-time model needs: prefill chunks (requests computing prompt or recomputed tokens, i.e.
    more than a decode's one token or a first chunk) and decodes. ``first_token`` lists requests that
    emitted their first token, ``finished`` those that emitted their last (their blocks are free),
    ``preempted`` those sent back to waiting, ``started`` those scheduled for the first time, ``cached``
    the admissions that hit the prefix cache (request id -> tokens reused; the shell copies their KV).
    """

    request_ids: list[int] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    contexts: list[int] = field(default_factory=list)
    prefills: int = 0
    prefill_tokens: int = 0
    prefill_max_tokens: int = 0
    prefill_context: int = 0  # sum over prefill chunks of tokens x context (attention work)
    decodes: int = 0
    decode_context: int = 0  # sum of the decodes' contexts
    first_token: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    started: list[int] = field(default_factory=list)
    cached: dict[int, int] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        """Tokens computed in this step (at most ``max_num_batched_tokens``)."""
        return self.prefill_tokens + self.decodes

    @property
    def empty(self) -> bool:
        """Nothing was scheduled: the engine has no work."""
        return not (self.decodes or self.prefills)

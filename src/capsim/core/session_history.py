"""How the pod turns a session's stored history and a new message into the prompt it prefills, and what it
does when the store has no history (expired: a fresh start) or is out (``on_unavailable``).

A turn's engine prompt is every earlier message of the session (user prompts and assistant answers, in
order) followed by the new message, so what the store holds decides the GPU work, as in production; the
store keeps only the new message and the answer (the pod appends them after the turn). A message's
tokens are read back from its stored content: the pod stores token ids as decimal text, so they come
back exactly; any other text (written by another client) becomes a synthetic prompt of the message's
token count, salted with the text's CRC-32, so the same content always prefills the same tokens.

The pod keeps a small least-recently-used cache of the sessions it served lately. It tells an expired
session (the store lost what this pod saw stored) from a new one, and with ``on_unavailable:
serve_local`` it serves a turn while the store is out from that copy and keeps the turn there, the
session marked at risk: those turns are lost if the pod dies or when the store comes back (the store
stays the truth; the loss is counted). With ``fail`` (the default) such a turn is a 503.
"""

from __future__ import annotations

import functools
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field

from capsim.core.engine import synthetic_prompt
from capsim.core.state_model import Message, SessionState, StateStoreError, StoreUnavailableError
from capsim.model.settings import FrozenModel

Source = Literal["store", "fresh", "local"]


class HistorySettings(FrozenModel):
    """What the pod does with a session's history; each field also reads from ``CAPSIM_<FIELD>``."""

    _error_prefix: ClassVar[str] = "history"

    history_prefill: bool = Field(
        True, description="prefill the stored history before the new message (False: the message alone, as "
        "the simulator's sessions without new_tokens)"
    )
    on_unavailable: Literal["fail", "serve_local"] = Field(
        "fail", description="store out: 503, or serve from the pod's local copy (the session at risk)"
    )
    local_history_sessions: int = Field(256, ge=0, description="sessions the pod's local LRU copy keeps")
    history_overflow: Literal["truncate", "reject"] = Field(
        "truncate", description="history + message past the prompt limit: drop the oldest turns, or 413"
    )

    ENV_PREFIX: ClassVar[str] = "CAPSIM_"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> HistorySettings:
        values = {n: environ[cls.ENV_PREFIX + n.upper()] for n in cls.model_fields
                  if cls.ENV_PREFIX + n.upper() in environ}
        return cls(**values)


class HistoryTooLongError(StateStoreError):
    """The session's context does not fit the prompt limit (``history_overflow: reject``, or the new
    message alone is too long for the limit once the answer's tokens are reserved); the pod answers 413."""


def message_tokens(message: Message, vocab_size: int) -> tuple[int, ...]:
    """The token ids a stored message prefills (see the module docstring)."""
    return _content_tokens(message.content, message.tokens, vocab_size)


@functools.lru_cache(maxsize=8192)
def _content_tokens(content: str, tokens: int, vocab_size: int) -> tuple[int, ...]:
    # cached: a session's earlier messages come back every turn (hashing the text is cheaper than parsing it)
    words = content.split()
    if words and all(w.isdecimal() for w in words):
        ids = tuple(map(int, words))
        if max(ids) < vocab_size:
            return ids
    n = tokens or len(words)
    if n == 0:
        return ()
    return synthetic_prompt(n, vocab_size, salt=zlib.crc32(content.encode()))


def fit_history(
    messages: list[tuple[int, ...]], new: tuple[int, ...], limit: int
) -> tuple[tuple[int, ...], int]:
    """The prompt (kept messages, then ``new``) within ``limit`` tokens, dropping the oldest messages
    two at a time (a user prompt and its answer); also how many were dropped."""
    total = sum(map(len, messages)) + len(new)
    drop = 0
    while total > limit and drop < len(messages):
        step = min(2, len(messages) - drop)
        total -= sum(len(m) for m in messages[drop : drop + step])
        drop += step
    if total > limit:
        raise HistoryTooLongError(f"the new message ({len(new)} tokens) is over the prompt limit {limit} "
                                 "(the least of max_prompt_tokens, max_model_len and the model's max_seq_len, "
                                 "less max_new_tokens)")
    return tuple(t for m in messages[drop:] for t in m) + new, drop


@dataclass(frozen=True)
class Loaded:
    """A session as the turn found it: its state (version 0 when there is none), and where it came from."""

    state: SessionState
    source: Source
    fresh_reason: Literal["new", "expired"] | None = None


@dataclass(frozen=True)
class Turn:
    """What the engine prefills for one turn."""

    loaded: Loaded
    prompt: tuple[int, ...]  # history + the new message: the engine request's prompt
    history_tokens: int
    message_tokens: int
    dropped_messages: int


@dataclass
class _Copy:
    state: SessionState
    at_risk: bool  # holds turns the store does not have
    base_version: int  # the version the store last confirmed


class HistoryMetrics:
    """The history counters, on the pod's registry (docs/metrics.md)."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        kw: dict[str, Any] = {"namespace": "capsim", "registry": registry}
        self.turns = Counter("session_history_turns", "Turns by where their history came from.",
                             ("source",), **kw)
        self.fresh = Counter("session_fresh_starts", "Turns that found no history (new, or expired in the "
                             "store while this pod still knew the session).", ("reason",), **kw)
        self.history_tokens = Counter("session_history_tokens", "History tokens prefilled ahead of new "
                                      "messages.", **kw)
        self.dropped = Counter("session_history_dropped_messages", "Oldest messages dropped to fit the "
                               "prompt limit.", **kw)
        self.local_writes = Counter("session_local_writes", "Turns kept only in the pod's local copy (the "
                                    "store was out): sessions at risk.", **kw)
        self.lost = Counter("session_local_turns_lost", "Turns kept locally that the store did not have "
                            "when it answered again (the store's history won).", **kw)


class FallbackStore:
    """The pod's store with the local copy in front: reads and writes go to the store and are remembered;
    with ``serve_local`` a read or write the store cannot answer uses the copy (see the module docstring)."""

    def __init__(self, inner: Any, settings: HistorySettings, metrics: HistoryMetrics | None = None) -> None:
        self.inner = inner
        self.settings = settings
        self.metrics = metrics
        self._copies: OrderedDict[str, _Copy] = OrderedDict()

    def _remember(self, state: SessionState) -> None:
        if self.settings.local_history_sessions == 0:
            return
        self._copies[state.session_id] = _Copy(state, False, state.version)
        self._copies.move_to_end(state.session_id)
        while len(self._copies) > self.settings.local_history_sessions:
            self._copies.popitem(last=False)

    def known(self, session_id: str) -> bool:
        """Whether this pod saw the session stored (and still remembers it)."""
        return session_id in self._copies

    def at_risk(self, session_id: str) -> bool:
        copy = self._copies.get(session_id)
        return copy is not None and copy.at_risk

    def _local(self, session_id: str, exc: StoreUnavailableError) -> _Copy:
        copy = self._copies.get(session_id) if self.settings.on_unavailable == "serve_local" else None
        if copy is None:
            why = ("on_unavailable=fail: the pod serves no turn without its history"
                   if self.settings.on_unavailable == "fail" else "and this pod holds no local copy of the session")
            raise StoreUnavailableError(f"{exc}; {why}") from None
        return copy

    async def read(self, session_id: str) -> tuple[SessionState | None, bool]:
        """The session's state and whether it came from the local copy (the store was out)."""
        try:
            state: SessionState | None = await self.inner.get(session_id)
        except StoreUnavailableError as exc:
            return self._local(session_id, exc).state, True
        copy = self._copies.get(session_id)
        if copy is not None and copy.at_risk and self.metrics is not None:
            stored = len(state.messages) if state is not None else 0
            self.metrics.lost.inc(max(0, len(copy.state.messages) - stored) // 2)
        if state is not None:
            self._remember(state)
        else:
            self._copies.pop(session_id, None)
        return state, False

    async def get(self, session_id: str) -> SessionState | None:
        return (await self.read(session_id))[0]

    async def put(self, state: SessionState) -> SessionState:
        try:
            saved: SessionState = await self.inner.put(state)
        except StoreUnavailableError as exc:
            return self._write_local(state.session_id, exc, lambda _: state)
        self._remember(saved)
        return saved

    async def update(
        self, session_id: str, fn: Callable[[SessionState], SessionState], *, idempotency_key: str | None = None
    ) -> SessionState:
        try:
            if idempotency_key is None:
                saved: SessionState = await self.inner.update(session_id, fn)
            else:
                saved = await self.inner.update(session_id, fn, idempotency_key=idempotency_key)
        except StoreUnavailableError as exc:
            return self._write_local(session_id, exc, fn)
        self._remember(saved)
        return saved

    def _write_local(
        self, session_id: str, exc: StoreUnavailableError, fn: Callable[[SessionState], SessionState]
    ) -> SessionState:
        copy = self._local(session_id, exc)
        new = fn(copy.state)
        new = new.model_copy(update={"version": copy.state.version + 1})
        self._copies[session_id] = _Copy(new, True, copy.base_version)
        self._copies.move_to_end(session_id)
        if self.metrics is not None:
            self.metrics.local_writes.inc()
        return new

    async def delete(self, session_id: str) -> bool:
        self._copies.pop(session_id, None)
        deleted: bool = await self.inner.delete(session_id)
        return deleted

    async def ping(self) -> None:
        ping = getattr(self.inner, "ping", None)
        if ping is not None:
            await ping()
        else:
            await self.inner.get("capsim-readiness-probe")

    async def aclose(self) -> None:
        await self.inner.aclose()


class SessionHistory:
    """One pod's history handling: load a session (with the fallback), build a turn's prompt, report it."""

    def __init__(self, store: Any, settings: HistorySettings, *, vocab_size: int,
                 prompt_limit: Callable[[int], int], registry: Any = None) -> None:
        """``prompt_limit(max_new_tokens)``: the longest prompt the engine takes with that many new tokens."""
        self.settings = settings
        self.metrics = HistoryMetrics(registry) if registry is not None else None
        self.store = store if isinstance(store, FallbackStore) else FallbackStore(store, settings, self.metrics)
        self.vocab_size = vocab_size
        self.prompt_limit = prompt_limit

    async def load(self, session_id: str) -> Loaded:
        """The session's state: from the store, from the local copy (store out, ``serve_local``), or a new
        state (no history: a fresh start, counted). Raises ``StoreUnavailableError`` under ``fail``."""
        known = self.store.known(session_id)
        state, local = await self.store.read(session_id)
        if local:
            assert state is not None
            return self._counted(Loaded(state, "local"))
        if state is None:
            reason: Literal["new", "expired"] = "expired" if known else "new"
            if self.metrics is not None:
                self.metrics.fresh.labels(reason).inc()
            return self._counted(Loaded(SessionState.new(session_id), "fresh", reason))
        return self._counted(Loaded(state, "store"))

    def _counted(self, loaded: Loaded) -> Loaded:
        if self.metrics is not None:
            self.metrics.turns.labels(loaded.source).inc()
        return loaded

    def turn(self, loaded: Loaded, message: tuple[int, ...], max_new_tokens: int) -> Turn:
        """The engine prompt for ``message`` after ``loaded``'s history (oldest turns dropped to fit, or
        ``HistoryTooLongError`` under ``history_overflow: reject``)."""
        messages = loaded.state.messages if self.settings.history_prefill else ()
        history = [message_tokens(m, self.vocab_size) for m in messages]
        limit = self.prompt_limit(max_new_tokens)
        if self.settings.history_overflow == "reject" and sum(map(len, history)) + len(message) > limit:
            raise HistoryTooLongError(
                f"session {loaded.state.session_id!r}: history of {sum(map(len, history))} tokens + the new "
                f"message's {len(message)} is over the prompt limit {limit} (history_overflow=reject)"
            )
        prompt, dropped = fit_history(history, message, limit)
        if self.metrics is not None:
            self.metrics.history_tokens.inc(len(prompt) - len(message))
            self.metrics.dropped.inc(dropped)
        return Turn(loaded, prompt, len(prompt) - len(message), len(message), dropped)

    def report(self, turn: Turn, result: Any) -> dict[str, Any]:
        """The answer's ``history`` object: what was prefilled and whether the session is at risk."""
        out: dict[str, Any] = {
            "source": turn.loaded.source,
            "fresh_reason": turn.loaded.fresh_reason,
            "history_tokens": turn.history_tokens,
            "message_tokens": turn.message_tokens,
            "prompt_tokens": result.prompt_tokens,
            "dropped_messages": turn.dropped_messages,
            "at_risk": self.store.at_risk(turn.loaded.state.session_id),
        }
        cached = getattr(result, "cached_tokens", None)
        if cached is not None:
            out["cached_tokens"] = cached
        return out


def for_pod(pod: Any, environ: Mapping[str, str] | None = None) -> SessionHistory:
    """The pod's ``SessionHistory``, made on its first turn from ``CAPSIM_*`` settings; from then on the
    pod's store is the fallback store, so every read and write of a turn goes through the local copy."""
    history: SessionHistory | None = getattr(pod, "session_history", None)
    if history is None:
        import os

        cfg = pod.config
        settings = HistorySettings.from_env(os.environ if environ is None else environ)
        seq: int = pod.engine.config.max_seq_len
        model_len: int = cfg.max_model_len if cfg.batch_mode == "continuous" else seq

        def limit(max_new: int) -> int:
            return max(1, min(int(cfg.max_prompt_tokens), seq - max_new, model_len - max_new))

        history = SessionHistory(pod.store, settings, vocab_size=pod.engine.config.vocab_size,
                                 prompt_limit=limit, registry=pod.metrics.registry)
        pod.store = history.store
        pod.session_history = history
    return history

"""RedisSessionStore keeps session state in Redis with atomic compare-and-set, sliding TTLs and deadlines.

One key per session (``key_prefix + session_id``) holds the state's JSON. Reads refresh the TTL in the
same atomic step (``GETEX``, or a script when an absolute expiry caps the TTL). Writes are one atomic
compare-and-set that also sets the TTL: a Lua script, or a WATCH/MULTI/EXEC transaction where scripting
is unavailable (fakeredis without ``lupa``, or a server with EVAL disabled). No write leaves a key
without a TTL. Every network round trip runs under a deadline, so a dead or frozen server becomes a
:class:`StoreUnavailableError` within ``op_deadline_s`` (1.5 s by default).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from typing import ClassVar, Literal, Protocol, cast

from pydantic import Field
from redis.asyncio import Redis
from redis.exceptions import WatchError

from capsim.core.state_cache import StateCache
from capsim.core.state_lua import CAS_EXACT_LUA, CAS_LUA, READ_CAPPED_LUA
from capsim.core.state_model import (
    ConflictError,
    CorruptStateError,
    InvalidSessionIdError,
    SessionState,
    StateTooLargeError,
    StoreReplyError,
    StoreUnavailableError,
    decode_state,
    encode_state,
    head_created_at_s,
    head_version,
    validate_session_id,
)
from capsim.core.state_transport import KeyLocks, Transport
from capsim.model.settings import FrozenModel

Outcome = Literal[
    "ok", "not_found", "conflict", "unavailable", "corrupt", "too_large", "invalid_id", "error", "cancelled"
]


class StoreMetrics(Protocol):
    """Where the store reports each operation (implemented by capsim.core.metrics.InferenceMetrics)."""

    def observe_store_op(self, op: str, outcome: str, seconds: float) -> None: ...


class StoreSettings(FrozenModel):
    """How the session-state store names keys, expires sessions, and bounds every network call."""

    _error_prefix: ClassVar[str] = "state_store"

    key_prefix: str = Field(default="capsim:session:", max_length=256, description="prefix of session keys")
    sliding_ttl_s: float = Field(default=1800.0, gt=0, le=365 * 86400, description="idle time to expiry")
    absolute_ttl_s: float | None = Field(default=None, gt=0, description="cap on life from creation")
    socket_timeout_s: float = Field(
        default=10.0, gt=0, le=60,
        description="redis-py's socket timeout, a backstop: op_deadline_s and the server's silence decide",
    )
    connect_timeout_s: float = Field(default=1.0, gt=0, le=60, description="connect timeout")
    op_deadline_s: float = Field(default=1.5, gt=0, le=60, description="one round trip, retries included")
    retries: int = Field(default=2, ge=0, le=10, description="redis-py retries on connection errors")
    retry_backoff_base_s: float = Field(default=0.02, ge=0, le=10, description="first retry backoff")
    retry_backoff_cap_s: float = Field(default=0.25, ge=0, le=60, description="largest retry backoff")
    max_state_bytes: int = Field(default=1 << 20, ge=256, description="largest encoded state accepted")
    max_connections: int = Field(
        default=64, ge=1, le=10_000,
        description="pooled connections; callers beyond it wait for one (up to pool_wait_s)",
    )
    pool_wait_s: float = Field(
        default=60.0, gt=0, le=600,
        description="longest wait for a free connection under load (an outage fails waiters at once)",
    )
    max_update_attempts: int = Field(default=64, ge=1, le=10_000, description="CAS attempts per update")
    conflict_backoff_base_s: float = Field(default=0.0005, ge=0, le=10, description="smallest backoff slot")
    conflict_backoff_cap_s: float = Field(default=0.25, ge=0, le=60, description="largest conflict backoff")
    cache_sessions: int = Field(
        default=1024, ge=0, le=1_000_000,
        description="decoded states kept (64 MiB at most): a read of the same bytes skips decoding, an update "
        "of a held session starts with one compare-and-set instead of a read (0: off)",
    )
    scripting: Literal["auto", "lua", "watch"] = Field(
        default="auto", description="auto: Lua, falling back to WATCH/MULTI if the server refuses scripts"
    )


class RedisSessionStore:
    """Session state in one Redis (or fakeredis) database; use as ``async with open_store(url) as store``."""

    def __init__(
        self,
        client: Redis,
        settings: StoreSettings | None = None,
        *,
        metrics: StoreMetrics | None = None,
        where: str = "redis",
    ) -> None:
        self._client = client
        self._s = settings or StoreSettings()
        self._metrics = metrics
        self._where = where
        self._mode: Literal["auto", "lua", "watch"] = self._s.scripting
        self._cas_script = client.register_script(CAS_LUA)
        self._cas_exact_script = client.register_script(CAS_EXACT_LUA)
        self._read_script = client.register_script(READ_CAPPED_LUA)
        self._sliding_ms = max(1, round(self._s.sliding_ttl_s * 1000))
        self._rng = random.Random()
        self._ids = random.Random(os.urandom(32))  # write ids: 128 random bits, seeded by the OS per store
        self._cache = StateCache(self._s.cache_sessions, 64 << 20)
        self._io = Transport(self._s, where)
        self._net = self._io.call
        self._locks = KeyLocks(self._s.op_deadline_s, where)
        self._closed = False

    @property
    def settings(self) -> StoreSettings:
        return self._s

    @property
    def client(self) -> Redis:
        """The underlying redis-py client, for diagnostics and tests (bypasses every check)."""
        return self._client

    @property
    def scripting(self) -> Literal["auto", "lua", "watch"]:
        """The write path in use: 'lua', 'watch', or 'auto' until the first write decides."""
        return self._mode

    def key(self, session_id: str) -> str:
        """The Redis key that holds a session."""
        return self._s.key_prefix + validate_session_id(session_id)

    async def __aenter__(self) -> RedisSessionStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for abandoned round trips to unwind, then close the client and its connections."""
        if self._closed:
            return
        self._closed = True
        await self._io.aclose()
        await self._client.aclose()

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailableError` unless the server answers within the deadline."""
        with self._observed("ping"):
            await self._net(lambda: self._client.ping())

    async def get(self, session_id: str) -> SessionState | None:
        """The stored state (refreshing its TTL), or None if there is no such session or it expired."""
        with self._observed("get") as box:
            key = self.key(session_id)
            state = await self._read(key, session_id)
            if state is None:
                box.outcome = "not_found"
            return state

    async def put(self, state: SessionState) -> SessionState:
        """Write ``state`` if the stored version is still ``state.version``; return it at version + 1.

        Raises :class:`ConflictError` if another writer got there first (a stale writer never
        overwrites a newer version), :class:`StateTooLargeError` before any network call.
        """
        with self._observed("put"):
            key = self.key(state.session_id)
            new = state.model_copy(
                update={"version": state.version + 1, "updated_at_s": time.time(), "write_id": self._write_id()}
            )
            raw = encode_state(new, self._s.max_state_bytes)
            if not await self._cas(key, state.version, raw, new.created_at_s):
                self._cache.forget(key)
                raise ConflictError(
                    f"session {state.session_id!r} changed since version {state.version} was read "
                    "(or passed its absolute expiry); read it again and reapply the change"
                )
            self._cache.put(key, raw, new, optimistic=True)
            return new

    async def update(
        self,
        session_id: str,
        fn: Callable[[SessionState], SessionState],
        *,
        idempotency_key: str | None = None,
    ) -> SessionState:
        """Read, apply ``fn``, and compare-and-set, retrying on conflict; return the committed state.

        ``fn`` gets the stored state, or a new empty one (version 0) if there is none; it may run more
        than once, so it must be a pure function of its argument. With ``idempotency_key``, a stored
        state that already remembers that key (``SessionState.write_for``; ``fn`` records it with
        ``with_write``) is returned as it is, without calling ``fn`` or writing. Raises
        :class:`ConflictError` after ``max_update_attempts`` lost races.

        When this store holds the exact value it last wrote or read for the session (``cache_sessions``),
        the first attempt applies ``fn`` to it and writes only if the stored value is still those very
        bytes: one round trip. Otherwise, or if that write loses, it reads and retries as above.
        """
        with self._observed("update"):
            key = self.key(session_id)
            async with self._locks.hold(key):
                return await self._update(key, session_id, fn, idempotency_key)

    async def _update(
        self,
        key: str,
        session_id: str,
        fn: Callable[[SessionState], SessionState],
        idempotency_key: str | None = None,
    ) -> SessionState:
        held = self._cache.optimistic(key)
        for attempt in range(self._s.max_update_attempts):
            t0 = time.perf_counter()
            expected_raw: bytes | None = None
            if held is not None and (idempotency_key is None or held[1].write_for(idempotency_key) is None):
                expected_raw, base = held  # optimistic: what we hold, unless the write may have landed
            else:
                base = await self._read(key, session_id) or SessionState.new(session_id)
                if idempotency_key is not None and base.write_for(idempotency_key) is not None:
                    return base  # this write already landed: answer as it did, write nothing
            changed = fn(base)
            if not isinstance(changed, SessionState) or changed.session_id != session_id:
                raise TypeError(
                    f"update fn must return the state of session {session_id!r}, got {changed!r:.80}"
                )
            new = changed.model_copy(
                update={
                    "version": base.version + 1,
                    "created_at_s": base.created_at_s,
                    "updated_at_s": time.time(),
                    "write_id": self._write_id(),
                }
            )
            raw = encode_state(new, self._s.max_state_bytes)
            if await self._cas(key, base.version, raw, new.created_at_s, expected_raw):
                self._cache.put(key, raw, new, optimistic=attempt == 0)  # no race lost: start from it next time
                return new
            self._cache.forget(key)
            if held is not None:
                held = None  # what we held is stale: read, and retry at once (no race was lost yet)
                continue
            # Binary exponential backoff in slots of one attempt's duration (as Ethernet does): the
            # losers spread out over the time a winner needs, so few attempts are wasted.
            slot = max(self._s.conflict_backoff_base_s, time.perf_counter() - t0)
            delay = min(self._s.conflict_backoff_cap_s, slot * 2 ** min(attempt + 1, 10))
            await asyncio.sleep(self._rng.uniform(0, delay))
        raise ConflictError(
            f"session {session_id!r}: {self._s.max_update_attempts} compare-and-set attempts all lost to "
            "concurrent writers; retry later or raise max_update_attempts"
        )

    async def delete(self, session_id: str) -> bool:
        """Remove a session; True if it existed."""
        with self._observed("delete") as box:
            key = self.key(session_id)
            self._cache.forget(key)
            n = await self._net(lambda: self._client.delete(key), key=key)
            if not n:
                box.outcome = "not_found"
            return bool(n)

    # -- reads ------------------------------------------------------------------------------------

    async def _read(self, key: str, session_id: str) -> SessionState | None:
        raw = await self._read_raw(key)
        if raw is None:
            self._cache.forget(key)
            return None
        state = self._cache.decoded(key, raw)
        if state is None:
            state = decode_state(key, raw, session_id)
            self._cache.put(key, raw, state)
        return state

    async def _read_raw(self, key: str) -> bytes | None:
        abs_s = self._s.absolute_ttl_s
        if abs_s is None:
            return cast(
                bytes | None, await self._net(lambda: self._client.getex(key, px=self._sliding_ms), key=key)
            )
        if self._mode != "watch":
            args = [self._sliding_ms, round(abs_s * 1000), round(time.time() * 1000)]
            try:
                return cast(
                    bytes | None, await self._net(lambda: self._read_script(keys=[key], args=args), key=key)
                )
            except StoreReplyError as exc:
                self._scripting_refused(exc)
        return await self._net(lambda: self._read_capped_watch(key), detach=True, key=key)

    async def _read_capped_watch(self, key: str) -> bytes | None:
        for _ in range(self._s.max_update_attempts):
            async with self._client.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                cur = cast(bytes | None, await pipe.get(key))
                if cur is None:
                    return None
                created = head_created_at_s(cur)
                ttl = self._sliding_ms if created is None else self._ttl_ms(created)
                pipe.multi()  # type: ignore[no-untyped-call]
                if ttl <= 0:
                    pipe.delete(key)
                else:
                    pipe.pexpire(key, ttl)
                try:
                    await pipe.execute()
                except WatchError:
                    continue  # written meanwhile, which set a fresh TTL: read again
                return cur if ttl > 0 else None
        raise ConflictError(f"key {key!r} changed under every one of {self._s.max_update_attempts} reads")

    # -- writes -----------------------------------------------------------------------------------

    def _ttl_ms(self, created_at_s: float) -> int:
        """Sliding TTL, capped by the absolute expiry; <= 0 means the session is past its cap."""
        if self._s.absolute_ttl_s is None:
            return self._sliding_ms
        left = int((created_at_s + self._s.absolute_ttl_s - time.time()) * 1000)
        return min(self._sliding_ms, left)

    async def _cas(
        self, key: str, expected: int, raw: bytes, created_at_s: float, expected_raw: bytes | None = None
    ) -> bool:
        """One atomic compare-and-set with TTL; False on conflict. The stored version must be
        ``expected``, or with ``expected_raw`` the stored value must be exactly those bytes."""
        ttl = self._ttl_ms(created_at_s)
        if ttl <= 0:
            return False
        if self._mode != "watch":
            args: tuple[int | bytes, ...]
            if expected_raw is None:
                script, args = self._cas_script, (expected, raw, ttl)
            else:
                script, args = self._cas_exact_script, (expected_raw, raw, ttl)
            try:
                res = await self._net(lambda: script(keys=(key,), args=args), key=key)
            except StoreReplyError as exc:
                self._scripting_refused(exc)
            else:
                self._mode = "lua"
                if res == -2:
                    raise CorruptStateError(key, "stored value does not start with a capsim state head")
                return bool(res == 1)
        outcome = await self._net(
            lambda: self._cas_watch(key, expected, raw, ttl, expected_raw), detach=True, key=key
        )
        if outcome == "corrupt":
            raise CorruptStateError(key, "stored value does not start with a capsim state head")
        return outcome == "ok"

    async def _cas_watch(
        self, key: str, expected: int, raw: bytes, ttl_ms: int, expected_raw: bytes | None = None
    ) -> str:
        async with self._client.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            cur = cast(bytes | None, await pipe.get(key))
            if expected_raw is not None:
                if cur == raw:
                    return "ok"
                if cur != expected_raw:
                    return "conflict"
            elif cur is not None:
                if cur == raw:
                    return "ok"
                version = head_version(cur)
                if version is None:
                    return "corrupt"
                if version != expected:
                    return "conflict"
            elif expected != 0:
                return "conflict"
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.set(key, raw, px=ttl_ms)
            try:
                await pipe.execute()
            except WatchError:
                return "conflict"
            return "ok"

    def _scripting_refused(self, exc: StoreReplyError) -> None:
        """Switch to WATCH/MULTI if the server refuses scripts (in 'auto' mode); else re-raise."""
        msg = exc.reply.lower()
        # redis-py strips the NOPERM prefix ("this user has no permissions to run the 'evalsha' command")
        refused = any(m in msg for m in ("unknown command", "noperm", "no permissions", "scripting"))
        if self._mode == "auto" and refused:
            self._mode = "watch"
            return
        raise StoreReplyError(exc.key, f"script refused by {self._where}: {exc.reply}") from exc

    # -- metrics ---------------------------------------------------------------------------------

    def _write_id(self) -> str:
        return f"{self._ids.getrandbits(128):032x}"

    def _observed(self, op: str) -> _Observed:
        return _Observed(self._metrics, op)


class _Observed:
    """Times one operation and reports its outcome to the store's metrics (a class, not a generator:
    it wraps every operation)."""

    __slots__ = ("metrics", "op", "outcome", "t0")

    def __init__(self, metrics: StoreMetrics | None, op: str) -> None:
        self.metrics, self.op = metrics, op
        self.outcome: Outcome = "ok"
        self.t0 = time.perf_counter()

    def __enter__(self) -> _Observed:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self.outcome = _outcome_of(exc)
        if self.metrics is not None:
            self.metrics.observe_store_op(self.op, self.outcome, time.perf_counter() - self.t0)


def _outcome_of(exc: BaseException) -> Outcome:
    if isinstance(exc, StoreUnavailableError):
        return "unavailable"
    if isinstance(exc, ConflictError):
        return "conflict"
    if isinstance(exc, CorruptStateError):
        return "corrupt"
    if isinstance(exc, StateTooLargeError):
        return "too_large"
    if isinstance(exc, InvalidSessionIdError):
        return "invalid_id"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "error"

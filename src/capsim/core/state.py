"""The session-state store's public face: the SessionStore protocol and open_store(url).

Agents are stateful during a session; pods are not. Every turn is written to the store before it is
acknowledged, so the next request, on any pod, resumes the session. See ``docs/state.md``.

    async with open_store("redis://127.0.0.1:6379/0") as store:
        state = await store.update("chat-42", lambda s: s.with_message("user", "hi", tokens=1))

URLs: ``redis://`` and ``rediss://`` (TLS) ``[user:password@]host:port/db``, ``unix:///path/redis.sock``,
and ``memory://`` (an embedded fakeredis server private to this store) or ``memory://name`` (one
fakeredis server shared by every store opened with that name in this process).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from capsim.core.state_model import (
    ConflictError,
    CorruptStateError,
    InvalidSessionIdError,
    Message,
    SessionState,
    StateStoreError,
    StateTooLargeError,
    StoreReplyError,
    StoreUnavailableError,
    StoreURLError,
    ToolOutput,
    WriteRecord,
    validate_session_id,
)
from capsim.core.state_redis import RedisSessionStore, StoreMetrics, StoreSettings

__all__ = [
    "ConflictError",
    "CorruptStateError",
    "InvalidSessionIdError",
    "Message",
    "RedisSessionStore",
    "SessionState",
    "SessionStore",
    "StateStoreError",
    "StateTooLargeError",
    "StoreMetrics",
    "StoreReplyError",
    "StoreSettings",
    "StoreURLError",
    "StoreUnavailableError",
    "ToolOutput",
    "WriteRecord",
    "check_store_url",
    "open_store",
    "validate_session_id",
]


@runtime_checkable
class SessionStore(Protocol):
    """What a pod needs from a session store; tests may swap in any object with these methods."""

    async def get(self, session_id: str) -> SessionState | None: ...

    async def put(self, state: SessionState) -> SessionState: ...

    async def update(
        self,
        session_id: str,
        fn: Callable[[SessionState], SessionState],
        *,
        idempotency_key: str | None = None,
    ) -> SessionState: ...

    async def delete(self, session_id: str) -> bool: ...

    async def aclose(self) -> None: ...


# Named in-process fakeredis servers for memory://name; unnamed memory:// gets a private one.
_MEMORY_SERVERS: dict[str, Any] = {}


def open_store(
    url: str = "memory://",
    settings: StoreSettings | None = None,
    *,
    metrics: StoreMetrics | None = None,
    **overrides: Any,
) -> RedisSessionStore:
    """Open a store at ``url`` (no network traffic until the first operation; call ``ping`` to check).

    ``overrides`` are :class:`StoreSettings` fields (``key_prefix=...``, ``sliding_ttl_s=...``) applied
    on top of ``settings``. Raises ``SettingsError`` for a bad setting and :class:`StoreURLError` (a
    ``ValueError``) for an unsupported scheme or a database that is not a number.

    The connection pool holds at most ``max_connections``; callers beyond that wait for a free
    connection within the operation's deadline rather than fail.
    """
    if overrides:
        base = settings.model_dump() if settings is not None else {}
        settings = StoreSettings(**{**base, **overrides})
    s = settings or StoreSettings()
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return _open_memory(parts.netloc + parts.path, s, metrics)
    where = check_store_url(url)
    try:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=s.max_connections,
            timeout=None,  # the wait for a connection is bounded by the operation's deadline
            socket_timeout=s.socket_timeout_s,
            socket_connect_timeout=s.connect_timeout_s,
            retry=Retry(
                ExponentialWithJitterBackoff(base=s.retry_backoff_base_s, cap=s.retry_backoff_cap_s), s.retries
            ),
            decode_responses=False,
            **_client_info(),
        )
    except ValueError as exc:
        raise StoreURLError(f"state store URL {where!r}: {exc}") from None
    client = Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # the store owns the pool: aclose() closes it
    return RedisSessionStore(client, s, metrics=metrics, where=where)


@functools.cache
def _client_info() -> dict[str, Any]:
    """What each new connection sends in CLIENT SETINFO, looked up once per process.

    Left to itself, redis-py looks its own version up in the installed packages' metadata for every
    connection it opens (a scan of site-packages, several ms of the event loop's CPU); a pod opening its
    pool under a burst of requests paid that per connection, in the requests' way.
    """
    version = importlib.metadata.version("redis")
    try:
        from redis.driver_info import DriverInfo  # redis-py >= 7 (lib_name/lib_version deprecated there)
    except ImportError:
        return {"lib_version": version}
    return {"driver_info": DriverInfo(lib_version=version)}


def check_store_url(url: str) -> str:
    """Check a store URL without connecting; return it without credentials, for messages.

    Raises :class:`StoreURLError` for an unsupported scheme or a database that is not a number.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return f"memory://{parts.netloc}{parts.path}"
    if scheme not in ("redis", "rediss", "unix"):
        raise StoreURLError(
            f"state store URL must start with redis://, rediss://, unix:// or memory://, got {_redact(url, scheme)!r}"
        )
    where = _redact(parts.geturl(), scheme)
    _check_database(parts.path if scheme != "unix" else "", parts.query, where)
    return where


_DB_PATH = re.compile(r"/?(\d*)")


def _check_database(path: str, query: str, where: str) -> None:
    """A database is a number, in the path (``/0``) or the query (``?db=0``); refuse anything else
    (redis-py reads ``/abc`` as database 0 and ``/3/4`` as database 34)."""
    if not _DB_PATH.fullmatch(path):
        raise StoreURLError(f"state store URL {where!r}: the database must be a number such as /0, got {path!r}")
    for db in parse_qs(query).get("db", []):
        if not db.isdigit():
            raise StoreURLError(f"state store URL {where!r}: db must be a number, got {db!r}")


def _open_memory(name: str, s: StoreSettings, metrics: StoreMetrics | None) -> RedisSessionStore:
    import fakeredis  # imported here: only notebooks, demos and tests need it

    has_lua = importlib.util.find_spec("lupa") is not None
    if s.scripting == "lua" and not has_lua:
        raise StateStoreError(
            "memory:// with scripting='lua' needs the 'lupa' package (pip install 'fakeredis[lua]'); "
            "use scripting='auto' or 'watch'"
        )
    server = _MEMORY_SERVERS.setdefault(name, fakeredis.FakeServer()) if name else fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(
        server=server, connection_pool_class=BlockingConnectionPool, max_connections=s.max_connections, timeout=None
    )
    if not has_lua:
        s = StoreSettings(**{**s.model_dump(), "scripting": "watch"})
    return RedisSessionStore(client, s, metrics=metrics, where=f"memory://{name}")


def _redact(url: str, scheme: str) -> str:
    """The URL without credentials or query, for error messages."""
    parts = urlsplit(url)
    if scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{scheme}://{host}{port}{parts.path}"

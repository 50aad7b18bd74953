"""The session-state store's contract, on fakeredis and on a real redis-server (Lua and WATCH paths)."""

from __future__ import annotations

import asyncio
import importlib.util
import pickle
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsim.core.state import (
    ConflictError,
    CorruptStateError,
    InvalidSessionIdError,
    RedisSessionStore,
    SessionState,
    SessionStore,
    StateStoreError,
    StateTooLargeError,
    StoreSettings,
    open_store,
)
from capsim.core.state_model import encode_state
from capsim.model.settings import SettingsError

# fakeredis runs without lupa here, so it exercises the WATCH/MULTI path; the real server runs both.
BACKENDS = ["fakeredis", "redis-lua", "redis-watch"]

MakeStore = Callable[..., RedisSessionStore]


@pytest.fixture(params=BACKENDS)
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    """Open stores on one backend under a key prefix private to the test; closes them after."""
    tag = uuid.uuid4().hex[:12]
    # fakeredis: one in-process server shared by the stores of this test (a named memory:// URL).
    fake = request.param == "fakeredis"
    url = f"memory://t{tag}" if fake else request.getfixturevalue("redis_server").url
    mode = "watch" if request.param == "redis-watch" else "auto"
    stores: list[RedisSessionStore] = []

    def make(**overrides: Any) -> RedisSessionStore:
        overrides.setdefault("key_prefix", f"test:{tag}:")
        overrides.setdefault("scripting", mode)
        store = open_store(url, **overrides)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.aclose()


def add(text: str) -> Callable[[SessionState], SessionState]:
    return lambda s: s.with_message("user", text, tokens=1)


# -- basics --------------------------------------------------------------------------------------


async def test_round_trip_and_versions(make_store: MakeStore) -> None:
    store = make_store()
    assert isinstance(store, SessionStore)
    assert await store.get("chat-1") is None
    s1 = await store.update("chat-1", add("hello"))
    assert s1.version == 1 and [m.content for m in s1.messages] == ["hello"]
    s2 = await store.update("chat-1", lambda s: s.with_tool_output("c1", "search", {"hits": [1, 2]}))
    assert s2.version == 2 and s2.created_at_s == s1.created_at_s and s2.updated_at_s >= s1.updated_at_s
    got = await store.get("chat-1")
    assert got == s2
    assert got is not None and got.tool_outputs[0].output == {"hits": [1, 2]}
    assert await store.delete("chat-1") is True
    assert await store.delete("chat-1") is False
    assert await store.get("chat-1") is None


async def test_put_creates_then_requires_the_stored_version(make_store: MakeStore) -> None:
    store = make_store()
    s1 = await store.put(SessionState.new("p").with_message("user", "a"))
    assert s1.version == 1
    with pytest.raises(ConflictError):
        await store.put(SessionState.new("p"))  # version 0 means "must not exist yet"
    s2 = await store.put(s1.with_message("assistant", "b"))
    assert s2.version == 2 and len(s2.messages) == 2


async def test_wire_format_is_plain_json_with_the_session_id_inside(make_store: MakeStore) -> None:
    store = make_store()
    await store.update("wire", add("x"))
    raw = await store.client.get(store.key("wire"))
    assert raw.startswith(b'{"session_id":"wire","version":1,"created_at_s":')


async def test_a_stale_writer_never_overwrites_a_newer_version(make_store: MakeStore) -> None:
    a, b = make_store(), make_store()  # two pods
    await a.update("s", add("v1"))
    read_by_a = await a.get("s")
    read_by_b = await b.get("s")
    assert read_by_a is not None and read_by_b is not None
    await b.put(read_by_b.with_message("user", "b wins"))
    with pytest.raises(ConflictError):
        await a.put(read_by_a.with_message("user", "a is stale"))
    final = await a.get("s")
    assert final is not None and final.version == 2
    assert [m.content for m in final.messages] == ["v1", "b wins"]


async def test_update_retries_a_lost_race_and_reapplies_fn(make_store: MakeStore) -> None:
    a, b = make_store(), make_store()
    await b.update("race", add("0"))  # written by b: a holds nothing of it, so a reads first
    calls = 0

    def slow_fn(s: SessionState) -> SessionState:
        nonlocal calls
        calls += 1
        return s.with_message("user", "a")

    # Let b commit between a's read and a's write, once.
    orig_read = a._read

    async def read_then_interfere(key: str, sid: str) -> SessionState | None:
        state = await orig_read(key, sid)
        if calls == 0:
            await b.update("race", add("b"))
        return state

    a._read = read_then_interfere  # type: ignore[method-assign]
    final = await a.update("race", slow_fn)
    assert calls == 2
    assert [m.content for m in final.messages] == ["0", "b", "a"] and final.version == 3


async def test_an_update_from_the_state_held_is_one_round_trip_and_loses_to_any_other_write(
    make_store: MakeStore,
) -> None:
    a, b = make_store(), make_store()
    await a.update("held", add("0"))  # a holds what it wrote
    reads = 0
    orig_read = a._read

    async def counted(key: str, sid: str) -> SessionState | None:
        nonlocal reads
        reads += 1
        return await orig_read(key, sid)

    a._read = counted  # type: ignore[method-assign]
    await a.update("held", add("1"))
    assert reads == 0  # written against the bytes a holds, without reading them back
    await b.update("held", add("b"))  # a does not know
    calls = 0

    def fn(s: SessionState) -> SessionState:
        nonlocal calls
        calls += 1
        return s.with_message("user", "a")

    final = await a.update("held", fn)
    assert calls == 2 and reads == 1  # the write against stale bytes lost; a read and reapplied
    assert [m.content for m in final.messages] == ["0", "1", "b", "a"] and final.version == 4


async def test_a_session_recreated_at_the_same_version_is_not_overwritten_from_the_state_held(
    make_store: MakeStore,
) -> None:
    """The session a holds expires (here: is deleted) and another writer creates it again up to the
    same version: a's update must apply to the new session, not write over it from the old one."""
    a, b = make_store(), make_store()
    await a.update("aba", add("old"))
    assert await b.delete("aba")
    await b.update("aba", add("new"))  # version 1 again, other bytes
    final = await a.update("aba", add("a"))
    assert [m.content for m in final.messages] == ["new", "a"] and final.version == 2


async def test_a_read_of_the_bytes_held_skips_decoding(make_store: MakeStore, monkeypatch: Any) -> None:
    store = make_store()
    written = await store.update("dec", add("x"))
    from capsim.core import state_redis

    monkeypatch.setattr(state_redis, "decode_state", lambda *a: pytest.fail("decoded bytes it holds"))
    assert await store.get("dec") == written


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_no_lost_updates_with_8_concurrent_writers(make_store: MakeStore, request: Any) -> None:
    """8 writers (8 stores: as if 8 pods) append 100 messages each to one session: exactly 800 stay.

    Every attempt decodes the whole growing state on this one CPU, so the run is quadratic: 8 x 100 on
    fakeredis (the WATCH path) and on the real server's Lua path, 8 x 40 on its WATCH path. The stores
    share one event loop here; tests/test_reliability_store.py races writers in separate processes and
    threads, where no in-process lock can stand in for the compare-and-set.
    """
    per_writer = 40 if request.node.callspec.params["make_store"] == "redis-watch" else 100
    stores = [make_store() for _ in range(8)]

    async def writer(w: int) -> None:
        for i in range(per_writer):
            await stores[w].update("shared", add(f"w{w}-{i}"))

    await asyncio.gather(*(writer(w) for w in range(8)))
    final = await stores[0].get("shared")
    assert final is not None
    contents = [m.content for m in final.messages]
    total = 8 * per_writer
    assert len(contents) == total and len(set(contents)) == total and final.version == total
    for w in range(8):  # each writer's messages kept their order
        mine = [c for c in contents if c.startswith(f"w{w}-")]
        assert mine == [f"w{w}-{i}" for i in range(per_writer)]


async def test_concurrent_updates_through_one_store_take_turns(make_store: MakeStore) -> None:
    store = make_store()
    await asyncio.gather(*(store.update("one", add(str(i))) for i in range(50)))
    final = await store.get("one")
    assert final is not None and len(final.messages) == 50 and final.version == 50


async def test_conflict_error_after_the_attempt_bound(make_store: MakeStore) -> None:
    a, b = make_store(max_update_attempts=3, conflict_backoff_base_s=0.0), make_store()
    await b.update("hot", add("0"))  # a holds nothing of it: every attempt of a reads
    n = 0

    def always_loses(s: SessionState) -> SessionState:
        nonlocal n
        n += 1
        return s.with_message("user", "never")

    orig_read = a._read

    async def read_then_interfere(key: str, sid: str) -> SessionState | None:
        state = await orig_read(key, sid)
        await b.update("hot", add("other"))
        return state

    a._read = read_then_interfere  # type: ignore[method-assign]
    with pytest.raises(ConflictError, match="3 compare-and-set attempts"):
        await a.update("hot", always_loses)
    assert n == 3


# -- expiry --------------------------------------------------------------------------------------


async def test_writes_set_and_reads_refresh_the_sliding_ttl(make_store: MakeStore) -> None:
    store = make_store(sliding_ttl_s=100)
    await store.update("ttl", add("x"))
    key = store.key("ttl")
    assert 90_000 < await store.client.pttl(key) <= 100_000
    await store.client.pexpire(key, 2_000)  # as if the session idled for 98 s
    assert await store.get("ttl") is not None
    assert await store.client.pttl(key) > 90_000


async def test_absolute_expiry_caps_the_sliding_ttl(make_store: MakeStore) -> None:
    store = make_store(sliding_ttl_s=100, absolute_ttl_s=5)
    await store.update("cap", add("x"))
    key = store.key("cap")
    assert 0 < await store.client.pttl(key) <= 5_000
    await store.client.pexpire(key, 90_000)  # a stray long TTL: the next read caps it again
    assert await store.get("cap") is not None
    assert 0 < await store.client.pttl(key) <= 5_000


async def test_a_session_past_its_absolute_expiry_is_gone(make_store: MakeStore) -> None:
    store = make_store(sliding_ttl_s=100, absolute_ttl_s=5)
    old = SessionState.new("old", now_s=time.time() - 10).model_copy(update={"version": 3})
    await store.client.set(store.key("old"), encode_state(old, 1 << 20), px=60_000)
    assert await store.get("old") is None
    assert await store.client.exists(store.key("old")) == 0
    fresh = await store.update("old", add("new life"))  # starts over as a new session
    assert fresh.version == 1 and fresh.created_at_s > old.created_at_s + 5


OPS = st.lists(
    st.tuples(st.sampled_from(["update", "get", "put", "stale_put", "delete"]), st.integers(0, 2)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, capped=st.booleans())
async def test_no_session_key_ever_lacks_a_ttl(
    make_store: MakeStore, ops: list[tuple[str, int]], capped: bool
) -> None:
    store = make_store(
        key_prefix=f"prop:{uuid.uuid4().hex[:8]}:", sliding_ttl_s=60, absolute_ttl_s=30 if capped else None
    )
    for op, i in ops:
        sid = f"s{i}"
        if op == "update":
            await store.update(sid, add(op))
        elif op == "get":
            await store.get(sid)
        elif op == "put":
            current = await store.get(sid) or SessionState.new(sid)
            await store.put(current.with_message("user", "put"))
        elif op == "stale_put":
            with pytest.raises(ConflictError):
                await store.put(SessionState.new(sid).model_copy(update={"version": 10_000}))
        else:
            await store.delete(sid)
        keys = [k async for k in store.client.scan_iter(match=store.settings.key_prefix + "*")]
        for key in keys:
            ttl = await store.client.pttl(key)
            assert ttl > 0, f"{key!r} has PTTL {ttl} after {op}"
            assert ttl <= (30_000 if capped else 60_000)


# -- typed errors --------------------------------------------------------------------------------


async def test_corrupt_json_names_the_key(make_store: MakeStore) -> None:
    store = make_store()
    key = store.key("bad")
    await store.client.set(key, b'{"session_id": "bad", "version": ', px=60_000)
    with pytest.raises(CorruptStateError, match=key) as info:
        await store.get("bad")
    assert info.value.key == key
    with pytest.raises(CorruptStateError):
        await store.update("bad", add("x"))
    with pytest.raises(CorruptStateError):  # the compare-and-set refuses to overwrite foreign data
        await store.put(SessionState.new("bad"))


async def test_valid_json_of_the_wrong_shape_is_corrupt(make_store: MakeStore) -> None:
    store = make_store()
    await store.client.set(store.key("shape"), b'{"session_id":"shape","messages":"nope"}', px=60_000)
    with pytest.raises(CorruptStateError, match="shape"):
        await store.get("shape")


async def test_another_sessions_payload_is_refused(make_store: MakeStore) -> None:
    store = make_store()
    other = await store.update("other", add("secret of other"))
    await store.client.set(store.key("mine"), encode_state(other, 1 << 20), px=60_000)
    with pytest.raises(CorruptStateError, match="holds session 'other'"):
        await store.get("mine")
    with pytest.raises(CorruptStateError):
        await store.update("mine", add("x"))


class _Evil:
    marker: Path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


async def test_a_pickle_payload_is_refused_and_never_executed(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store()
    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    await store.client.set(store.key("pkl"), pickle.dumps(evil), px=60_000)
    with pytest.raises(CorruptStateError, match="not a JSON object"):
        await store.get("pkl")
    with pytest.raises(CorruptStateError):
        await store.update("pkl", add("x"))
    assert not evil.marker.exists()


async def test_an_oversized_state_is_refused_before_any_network_call() -> None:
    # Port 1 on loopback has no server: any network call would be a StoreUnavailableError instead.
    async with open_store("redis://127.0.0.1:1/0", max_state_bytes=4096) as store:
        big = SessionState.new("big").with_message("user", "x" * 5000)
        with pytest.raises(StateTooLargeError, match="over the cap of 4096 bytes") as info:
            await store.put(big)
        assert info.value.size_bytes > 4096 and info.value.max_bytes == 4096


async def test_an_update_that_grows_too_large_leaves_the_stored_state_alone(make_store: MakeStore) -> None:
    store = make_store(max_state_bytes=4096)
    await store.update("grow", add("small"))
    with pytest.raises(StateTooLargeError):
        await store.update("grow", add("y" * 5000))
    kept = await store.get("grow")
    assert kept is not None and kept.version == 1


BAD_IDS: list[Any] = ["", "a" * 129, "has space", "slash/", "ünï", "new\nline", "*", None, 42]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
async def test_bad_session_ids_are_refused_before_any_network_call(bad: Any) -> None:
    async with open_store("redis://127.0.0.1:1/0") as store:
        for call in (store.get(bad), store.update(bad, add("x")), store.delete(bad)):
            with pytest.raises(InvalidSessionIdError):
                await call
        with pytest.raises(InvalidSessionIdError):
            SessionState.new(bad)


def test_good_session_ids_of_every_allowed_character() -> None:
    for sid in ["a", "A" * 128, "agent-7:chat_2024.01", "0"]:
        assert SessionState.new(sid).session_id == sid


def test_errors_share_one_base_and_invalid_ids_are_value_errors() -> None:
    assert issubclass(InvalidSessionIdError, StateStoreError) and issubclass(
        InvalidSessionIdError, ValueError
    )
    for cls in (ConflictError, CorruptStateError, StateTooLargeError):
        assert issubclass(cls, StateStoreError)


# -- URLs, settings and instrumentation ----------------------------------------------------------


async def test_unix_socket_url(redis_server: Any) -> None:
    async with open_store(redis_server.unix_url, key_prefix=f"unix:{uuid.uuid4().hex}:") as store:
        await store.update("u", add("via unix socket"))
        assert (await store.get("u")) is not None


async def test_named_memory_stores_share_a_server_and_unnamed_ones_do_not() -> None:
    name = f"memory://n{uuid.uuid4().hex[:8]}"
    async with open_store(name) as a, open_store(name) as b, open_store("memory://") as c:
        await a.update("x", add("hi"))
        assert await b.get("x") is not None
        assert await c.get("x") is None


async def test_scripting_auto_falls_back_to_watch_where_scripts_are_refused() -> None:
    # A store built straight on fakeredis (open_store("memory://") picks WATCH up front, so it would not
    # exercise the fallback). fakeredis runs Lua only with lupa installed; without it, it refuses
    # EVALSHA ("unknown command"), and 'auto' must fall back to WATCH and still write.
    import fakeredis

    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    store = RedisSessionStore(client, StoreSettings(scripting="auto"), where="fakeredis")
    try:
        assert store.scripting == "auto"
        await store.update("f", add("x"))
        expected = "lua" if importlib.util.find_spec("lupa") is not None else "watch"
        assert store.scripting == expected
        assert (await store.get("f")) is not None  # and the update went through
    finally:
        await store.aclose()


async def test_the_real_server_uses_the_lua_script(redis_server: Any) -> None:
    async with open_store(redis_server.url, key_prefix=f"lua:{uuid.uuid4().hex}:") as store:
        assert store.scripting == "auto"
        await store.update("l", add("x"))
        assert store.scripting == "lua"


def test_unsupported_url_scheme() -> None:
    with pytest.raises(ValueError, match="redis://, rediss://, unix:// or memory://"):
        open_store("http://localhost:6379")


def test_bad_settings_name_the_field_and_value() -> None:
    with pytest.raises(SettingsError, match=r"state_store.sliding_ttl_s must be > 0, got -1"):
        StoreSettings(sliding_ttl_s=-1)
    with pytest.raises(SettingsError, match="state_store.socket_timeout_s"):
        open_store("memory://", socket_timeout_s=0)


def test_defaults_match_the_issue() -> None:
    s = StoreSettings()
    assert s.sliding_ttl_s == 1800 and s.absolute_ttl_s is None
    # the deadline (under 2 s) decides; redis-py's socket timeout is only a backstop, because a busy
    # event loop trips a socket timer while the server is answering (issue 12)
    assert s.op_deadline_s < 2.0 and s.socket_timeout_s > s.op_deadline_s
    assert s.max_connections >= 1 and s.pool_wait_s > s.op_deadline_s
    assert s.max_state_bytes == 1 << 20


class _Recorder:
    def __init__(self) -> None:
        self.ops: list[tuple[str, str]] = []

    def observe_store_op(self, op: str, outcome: str, seconds: float) -> None:
        assert seconds >= 0
        self.ops.append((op, outcome))


async def test_operations_are_reported_to_metrics() -> None:
    rec = _Recorder()
    async with open_store("memory://", metrics=rec) as store:
        await store.get("m")
        await store.update("m", add("x"))
        await store.get("m")
        with pytest.raises(ConflictError):
            await store.put(SessionState.new("m"))
        with pytest.raises(InvalidSessionIdError):
            await store.get("bad id")
        await store.delete("m")
    assert rec.ops == [
        ("get", "not_found"),
        ("update", "ok"),
        ("get", "ok"),
        ("put", "conflict"),
        ("get", "invalid_id"),
        ("delete", "ok"),
    ]


async def test_a_closed_store_refuses_calls() -> None:
    store = open_store("memory://")
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(StateStoreError, match="closed"):
        await store.get("x")

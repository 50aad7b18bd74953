"""The session store under overload, racing writers, retries, refused scripts and bad replies (issues 12, 16)."""

from __future__ import annotations

import asyncio
import multiprocessing
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from capsim.core import state_redis
from capsim.core.state import (
    ConflictError,
    SessionState,
    StateStoreError,
    StoreReplyError,
    StoreURLError,
    open_store,
)

pytestmark = pytest.mark.timeout(120)


def add(text: str) -> Callable[[SessionState], SessionState]:
    return lambda s: s.with_message("user", text, tokens=1)


@pytest.fixture(params=["fakeredis", "redis-lua", "redis-watch"])
async def store_url(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str]]:
    """(url, scripting mode): fakeredis (WATCH path without lupa), a real server's Lua and WATCH paths."""
    if request.param == "fakeredis":
        yield f"memory://r{uuid.uuid4().hex[:10]}", "auto"
    else:
        yield request.getfixturevalue("redis_server").url, "watch" if request.param == "redis-watch" else "lua"


def _prefix() -> str:
    return f"rel:{uuid.uuid4().hex[:10]}:"


# -- overload: a full pool is not an outage ----------------------------------------------------------


async def test_more_concurrent_calls_than_connections_wait_for_one(store_url: tuple[str, str]) -> None:
    url, mode = store_url
    async with open_store(url, key_prefix=_prefix(), scripting=mode, max_connections=4) as store:
        states = await asyncio.gather(*(store.update(f"s{i}", add("hi")) for i in range(300)))
        assert [s.version for s in states] == [1] * 300
        got = await asyncio.gather(*(store.get(f"s{i}") for i in range(300)))
        assert all(g is not None and g.version == 1 for g in got)


async def test_the_default_pool_serves_a_thousand_concurrent_reads(store_url: tuple[str, str]) -> None:
    # redis-py's own pools refuse the 101st concurrent call ("Too many connections"); the store queues
    url, mode = store_url
    async with open_store(url, key_prefix=_prefix(), scripting=mode) as store:
        got = await asyncio.gather(*(store.get(f"absent-{i}") for i in range(1000)))
        assert got == [None] * 1000


# -- compare-and-set: two writers at one version -------------------------------------------------


async def test_two_writers_at_one_version_never_both_win(
    store_url: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pods write the same turn at the same version with a frozen clock: the bytes would be identical
    but for the write id, and the old shortcut took that for "my write already landed"."""
    url, mode = store_url
    monkeypatch.setattr(state_redis.time, "time", lambda: 1_700_000_000.0)
    prefix = _prefix()
    async with open_store(url, key_prefix=prefix, scripting=mode) as a, \
            open_store(url, key_prefix=prefix, scripting=mode) as b:
        for version in range(3):
            base = await a.get("same") or SessionState.new("same", now_s=1_700_000_000.0)
            assert base.version == version
            turn = base.with_message("user", "identical turn")
            results = await asyncio.gather(a.put(turn), b.put(turn), return_exceptions=True)
            won = [r for r in results if isinstance(r, SessionState)]
            lost = [r for r in results if isinstance(r, ConflictError)]
            assert len(won) == 1 and len(lost) == 1, results
        final = await b.get("same")
        assert final is not None and final.version == 3 and len(final.messages) == 3


# -- idempotent writes ---------------------------------------------------------------------------


async def test_a_repeated_idempotency_key_is_applied_once(store_url: tuple[str, str]) -> None:
    url, mode = store_url
    prefix = _prefix()
    calls = 0

    def turn(s: SessionState) -> SessionState:
        nonlocal calls
        calls += 1
        return s.with_message("user", "once").with_write("key-1", {"turn": len(s.messages) + 1})

    async with open_store(url, key_prefix=prefix, scripting=mode) as a, \
            open_store(url, key_prefix=prefix, scripting=mode) as b:
        first = await a.update("idem", turn, idempotency_key="key-1")
        again = await b.update("idem", turn, idempotency_key="key-1")
        assert again == first and calls == 1
        rec = again.write_for("key-1")
        assert rec is not None and rec.version == 1 and rec.reply == {"turn": 1}
        # concurrent retries of one write on two pods: still applied once
        results = await asyncio.gather(
            a.update("idem2", turn_with("k2"), idempotency_key="k2"),
            b.update("idem2", turn_with("k2"), idempotency_key="k2"),
        )
        assert results[0] == results[1] and results[0].version == 1
        # a different key is a different write
        third = await a.update("idem", turn_with("key-2"), idempotency_key="key-2")
        assert third.version == 2 and len(third.messages) == 2


def turn_with(key: str) -> Callable[[SessionState], SessionState]:
    return lambda s: s.with_message("user", key).with_write(key)


def test_only_the_most_recent_keys_are_remembered() -> None:
    s = SessionState.new("k")
    for i in range(40):
        s = s.with_write(f"k{i}").model_copy(update={"version": s.version + 1})
    assert s.write_for("k39") is not None and s.write_for("k8") is not None and s.write_for("k7") is None


# -- concurrent writers on separate connections, loops and processes -----------------------------


def _writer_process(url: str, prefix: str, mode: str, w: int, n: int, start: Any) -> None:
    async def run() -> None:
        async with open_store(url, key_prefix=prefix, scripting=mode, conflict_backoff_cap_s=0.02) as store:
            start.wait()
            for i in range(n):
                await store.update("shared", add(f"w{w}-{i}"))

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["lua", "watch"])
def test_no_lost_updates_across_processes(redis_server: Any, mode: str) -> None:
    """4 processes (own event loop, own connections: no in-process lock helps) append 40 messages each
    to one session; only the server's compare-and-set keeps every one of the 160."""
    prefix, writers, per = _prefix(), 4, 40
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer_process, args=(redis_server.url, prefix, mode, w, per, start))
             for w in range(writers)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=90)
        assert p.exitcode == 0, f"writer exited with {p.exitcode}"

    async def final() -> SessionState | None:
        async with open_store(redis_server.url, key_prefix=prefix) as store:
            return await store.get("shared")

    state = asyncio.run(final())
    assert state is not None
    contents = [m.content for m in state.messages]
    assert len(contents) == len(set(contents)) == writers * per and state.version == writers * per
    for w in range(writers):
        assert [c for c in contents if c.startswith(f"w{w}-")] == [f"w{w}-{i}" for i in range(per)]


@pytest.mark.parametrize("mode", ["lua", "watch"])
async def test_writers_on_separate_event_loops_in_threads(redis_server: Any, mode: str) -> None:
    """Three threads, each with its own loop and store, race on one session (no shared lock).
    (A real server only: a fakeredis server belongs to one event loop.)"""
    url = redis_server.url
    prefix = _prefix()

    def thread(w: int) -> None:
        async def run() -> None:
            async with open_store(url, key_prefix=prefix, scripting=mode, conflict_backoff_cap_s=0.02) as s:
                for i in range(50):
                    await s.update("t", add(f"{w}-{i}"))

        asyncio.run(run())

    await asyncio.gather(*(asyncio.to_thread(thread, w) for w in range(3)))
    async with open_store(url, key_prefix=prefix) as store:
        state = await store.get("t")
    assert state is not None and state.version == 150 and len({m.content for m in state.messages}) == 150


# -- refused scripts, bad replies, bad URLs ------------------------------------------------------


async def test_auto_falls_back_to_watch_when_scripts_are_refused(redis_server: Any) -> None:
    """A user without the scripting commands (Redis ACL): 'auto' switches to WATCH, 'lua' says why not."""
    user = f"noscript{uuid.uuid4().hex[:6]}"
    async with open_store(redis_server.url) as admin:
        await admin.client.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"],
                                       commands=["+@all", "-@scripting"])
    url = redis_server.url.replace("redis://", f"redis://{user}:pw@")
    prefix = _prefix()
    async with open_store(url, key_prefix=prefix, scripting="auto") as store:
        assert store.scripting == "auto"
        s = await store.update("f", add("x"))
        assert s.version == 1 and store.scripting == "watch"
        assert (await store.update("f", add("y"))).version == 2
    async with open_store(url, key_prefix=prefix, scripting="auto", absolute_ttl_s=60) as store:
        got = await store.get("f")  # the capped read is a script too
        assert got is not None and got.version == 2 and store.scripting == "watch"
    async with open_store(url, key_prefix=prefix, scripting="lua") as store:
        with pytest.raises(StoreReplyError, match=f"{prefix}g.*script refused.*evalsha"):
            await store.update("g", add("x"))


async def test_wrongtype_is_a_typed_error_naming_the_key(store_url: tuple[str, str]) -> None:
    url, mode = store_url
    async with open_store(url, key_prefix=_prefix(), scripting=mode) as store:
        await store.client.lpush(store.key("list"), "not a session")
        for op in (store.get("list"), store.update("list", add("x")), store.put(SessionState.new("list"))):
            with pytest.raises(StoreReplyError, match=f"{store.key('list')}.*not a string") as err:
                await op
            assert err.value.key == store.key("list") and "WRONGTYPE" in err.value.reply


async def test_a_database_out_of_range_is_typed(redis_server: Any) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/99"
    async with open_store(url) as store:
        with pytest.raises(StoreReplyError, match="database number does not exist"):
            await store.get("x")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/abc", "redis://127.0.0.1:6379/3/4",
                                 "redis://127.0.0.1:6379/0?db=x", "unix:///tmp/r.sock?db=one"])
def test_a_database_name_that_is_not_a_number_is_refused(url: str) -> None:
    with pytest.raises(StoreURLError, match="must be a number") as err:
        open_store(url)
    assert isinstance(err.value, StateStoreError) and isinstance(err.value, ValueError)


def test_good_database_urls_open() -> None:
    for url in ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/15",
                "unix:///tmp/r.sock?db=2"):
        open_store(url)  # no network traffic until the first call

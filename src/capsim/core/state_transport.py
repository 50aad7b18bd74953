"""Round trips to the session store's server under deadlines: connection slots, the watchdog, typed errors.

:class:`Transport` runs one redis-py call at a time per pooled connection and turns what can go wrong
into the store's own errors: a server that is silent past ``op_deadline_s`` (while our own event loop is
responsive) or refuses connections is :class:`StoreUnavailableError`; a refusal that retrying will not
fix is :class:`StoreReplyError`. :class:`KeyLocks` makes one store's updates of one session take turns.
The hot path uses plain ``__aenter__``/``__aexit__`` classes and one timer per call, no generator-based
context managers and no task of its own: this code runs twice per turn of every pod.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from capsim.core.state_model import StateStoreError, StoreReplyError, StoreUnavailableError

if TYPE_CHECKING:
    from capsim.core.state_redis import StoreSettings

T = TypeVar("T")

# Server replies that mean "not able to serve now" rather than "you sent something wrong".
_UNAVAILABLE_PREFIXES = (
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "OOM",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MISCONF",
)


class Transport:
    """Every network round trip of one store: deadlines, ``max_connections`` slots, outage memory."""

    def __init__(self, settings: StoreSettings, where: str) -> None:
        self.settings = settings
        self.where = where
        self.closed = False
        self._deadline = settings.op_deadline_s
        self._inflight: set[asyncio.Future[Any]] = set()
        # One slot per pooled connection: a caller waits for a slot (overload) apart from its round
        # trip's deadline (outage); when a round trip finds the server unavailable, callers that were
        # waiting meanwhile fail at once instead of each spending a deadline to learn the same.
        self._slots = asyncio.Semaphore(settings.max_connections)
        self._unavailable_at = float("-inf")
        self._unavailable = ""
        self.last_reply = float("-inf")  # loop time of the server's latest answer to this store

    async def aclose(self) -> None:
        """Refuse new calls; cancel abandoned round trips and wait for them to unwind."""
        self.closed = True
        for fut in list(self._inflight):
            fut.cancel()
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=self.settings.socket_timeout_s + 1.0)

    async def call(self, make: Callable[[], Awaitable[T]], *, detach: bool = False, key: str | None = None) -> T:
        """Run one round trip under the deadline, mapping transport failures to StoreUnavailableError
        and any other refusal to :class:`StoreReplyError` naming ``key`` (or the URL).

        Under load a caller first waits for one of ``max_connections`` slots (up to ``pool_wait_s``;
        overload is not an outage), then its round trip runs under ``op_deadline_s``: only a server
        that does not answer, or refuses connections, becomes unavailable.

        How the deadline is judged, and what ``detach`` does: :meth:`_round_trip_raw`.
        """
        if self.closed:
            raise StateStoreError(f"the store for {self.where} is closed")
        slots = self._slots
        if not slots.locked():
            await slots.acquire()  # free: no timer to arm
        else:
            await self._wait_for_slot()
        try:
            return await self._round_trip_typed(make, key, detach)
        except StoreUnavailableError as exc:
            self._unavailable_at, self._unavailable = time.monotonic(), str(exc)
            raise
        finally:
            slots.release()

    async def _wait_for_slot(self) -> None:
        entered = time.monotonic()
        s = self.settings
        try:
            async with asyncio.timeout(s.pool_wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise StoreUnavailableError(
                f"{self.where}: waited {s.pool_wait_s:g} s for one of {s.max_connections} "
                "connections (overloaded; raise max_connections or pool_wait_s)"
            ) from None
        if self._unavailable_at >= entered:
            self._slots.release()
            raise StoreUnavailableError(self._unavailable)

    async def _round_trip_typed(self, make: Callable[[], Awaitable[T]], key: str | None, detach: bool) -> T:
        """:meth:`_round_trip_raw` with redis-py's errors mapped to the store's own."""
        try:
            return await self._round_trip_raw(make, detach)
        except (TimeoutError, RedisTimeoutError) as exc:
            raise StoreUnavailableError(
                f"{self.where} did not answer within {self._deadline:g} s (frozen, overloaded or unreachable)"
            ) from exc
        except (RedisConnectionError, OSError) as exc:
            raise StoreUnavailableError(f"{self.where} is unreachable: {exc}") from exc
        except ResponseError as exc:
            if str(exc).startswith(_UNAVAILABLE_PREFIXES):
                raise StoreUnavailableError(f"{self.where} cannot serve now: {exc}") from exc
            raise StoreReplyError(key or self.where, _explain(str(exc))) from exc
        except RedisError as exc:
            raise StateStoreError(f"{self.where} failed: {exc!r}") from exc

    async def _round_trip_raw(self, make: Callable[[], Awaitable[T]], detach: bool) -> T:
        """One round trip, judged unavailable by the server's silence, not by our own delay.

        A busy event loop (a pod taking 1,000 requests at once spends over a second in one loop turn)
        delays every reply it has already received, and opening a connection takes several turns; a
        timer alone would call that an outage. So at the deadline the call is given one more loop turn;
        then the server is unavailable only if the loop is responsive (that turn, and the timer's own
        lateness, under a quarter of ``op_deadline_s``: more than an OS scheduler's hiccup) and the
        server answered no call of this store within the last ``op_deadline_s``. Otherwise the call
        waits another deadline, up to ``pool_wait_s`` in all. An idle pod thus learns of a frozen
        server in ``op_deadline_s``; a saturated one once its loop catches its breath.

        The call runs in the caller's task under a watchdog (no task of its own: the hot path), or,
        with ``detach``, as its own task, so that a WATCH transaction's cleanup on a frozen server
        cannot hold the caller past the deadline (``aclose`` waits for such tasks).
        """
        loop = asyncio.get_running_loop()
        try:
            if not detach:
                async with asyncio.timeout(None) as timeout:
                    watchdog = _Watchdog(self, loop, timeout)
                    try:
                        result = await make()
                    finally:
                        watchdog.handle.cancel()
                self.last_reply = loop.time()  # the server answered
                return result
            return await self._detached(make, loop)
        except ResponseError:
            self.last_reply = loop.time()  # a refusal is an answer too
            raise

    def loop_was_busy(self, due: float, before: float, now: float) -> bool:
        """At a deadline check: did the loop run it late, or take long over its one turn (more than a quarter
        of the deadline, past an OS scheduler's hiccup)? Then the check waits another deadline."""
        return max(now - before, before - due) > 0.25 * self._deadline

    def gives_up(self, started: float, due: float, before: float, now: float) -> bool:
        """At a deadline: is the server silent while the loop is responsive (or the wait too long)?"""
        silent = self.last_reply < now - self._deadline
        return (silent and not self.loop_was_busy(due, before, now)) or now - started >= self.settings.pool_wait_s

    async def _detached(self, make: Callable[[], Awaitable[T]], loop: asyncio.AbstractEventLoop) -> T:
        deadline = self._deadline
        started = loop.time()
        task: asyncio.Future[T] = asyncio.ensure_future(make())
        self._inflight.add(task)
        task.add_done_callback(_forget(self._inflight))
        try:
            due = started + deadline
            while True:
                await asyncio.wait((task,), timeout=max(0.0, due - loop.time()))
                if task.done():
                    break
                before = loop.time()
                await asyncio.sleep(0)  # one loop turn: read what arrived with the timer, and time it
                if task.done():
                    break
                now = loop.time()
                if self.gives_up(started, due, before, now):
                    raise TimeoutError
                due = now + deadline
            result = task.result()
            self.last_reply = loop.time()
            return result
        except BaseException:
            task.cancel()
            raise


class _Watchdog:
    """The deadline of a round trip that runs in the caller's task (see ``_round_trip_raw``): at the
    deadline it looks again one loop turn later, then expires the caller's timeout or re-arms."""

    __slots__ = ("before", "due", "handle", "loop", "started", "timeout", "transport")

    def __init__(self, transport: Transport, loop: asyncio.AbstractEventLoop, timeout: asyncio.Timeout) -> None:
        self.transport, self.loop, self.timeout = transport, loop, timeout
        self.started = loop.time()
        self.due = self.started + transport._deadline
        self.before = self.due
        self.handle: asyncio.Handle = loop.call_at(self.due, self._look)

    def _look(self) -> None:
        self.before = self.loop.time()
        self.handle = self.loop.call_soon(self._judge)  # after the replies this loop turn read

    def _judge(self) -> None:
        now = self.loop.time()
        if self.transport.gives_up(self.started, self.due, self.before, now):
            self.timeout.reschedule(now)  # the caller gets TimeoutError
        else:
            self.due = now + self.transport._deadline
            self.handle = self.loop.call_at(self.due, self._look)


class KeyLocks:
    """Updates of one session from one store take turns: racing them would only waste decode/encode
    work on compare-and-sets that must lose. Other processes still race (the compare-and-set decides).

    ``async with locks.hold(key):``; waiting in line counts against ``op_deadline_s`` too, and behind
    an update that just found the server unavailable a caller fails at once rather than wait again.
    """

    def __init__(self, op_deadline_s: float, where: str) -> None:
        self._deadline = op_deadline_s
        self._where = where
        self._locks: dict[str, _KeyLock] = {}

    def hold(self, key: str) -> _Held:
        return _Held(self, key)


class _KeyLock:
    __slots__ = ("failed_at", "failure", "lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
        self.failed_at: float | None = None  # when an update holding the lock found the server unavailable
        self.failure = ""


class _Held:
    """One caller's turn on a key (a class, not a generator: cheaper on the hot path)."""

    __slots__ = ("entered", "entry", "key", "locked", "locks")

    def __init__(self, locks: KeyLocks, key: str) -> None:
        self.locks, self.key = locks, key
        self.locked = False

    async def __aenter__(self) -> None:
        table = self.locks._locks
        entry = table.get(self.key)
        if entry is None:
            entry = table[self.key] = _KeyLock()
        entry.users += 1
        self.entry = entry
        self.entered = time.monotonic()
        try:
            if entry.lock.locked():
                try:
                    async with asyncio.timeout(self.locks._deadline):
                        await entry.lock.acquire()
                except TimeoutError:
                    raise StoreUnavailableError(
                        f"{self.locks._where}: waited {self.locks._deadline:g} s behind other updates of "
                        f"{self.key!r} (the server is slow or not answering)"
                    ) from None
            else:
                await entry.lock.acquire()  # free: no timer to arm
            self.locked = True
            if entry.failed_at is not None and entry.failed_at >= self.entered:
                # The update ahead of us just found the server unavailable: say so now rather than
                # spend a second deadline finding out again.
                raise StoreUnavailableError(entry.failure)
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, StoreUnavailableError):
            self.entry.failed_at, self.entry.failure = time.monotonic(), str(exc)
        self._leave()

    def _leave(self) -> None:
        entry = self.entry
        if self.locked:
            entry.lock.release()
            self.locked = False
        entry.users -= 1
        if entry.users == 0:
            del self.locks._locks[self.key]


def _explain(reply: str) -> str:
    """The server's error text, with what it means for a session key where that is not obvious."""
    if reply.startswith("WRONGTYPE"):
        return f"the key holds a value that is not a string, so not a session ({reply})"
    if "DB index is out of range" in reply:
        return f"the URL's database number does not exist on this server ({reply})"
    return reply


def _forget(inflight: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    def done(fut: asyncio.Future[Any]) -> None:
        inflight.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved, so an abandoned call's error is not logged as unhandled

    return done

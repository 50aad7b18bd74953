"""DynamicBatcher: dispatch, overflow, cancellation, failures and close, with fake runners.

Waits are extreme (0 or 1000 s) so no test races the clock: a 1000 s wait never expires in a test,
so a partial batch can only leave because it filled up or because the batcher is draining on close.
The timer tests at the end use real finite waits and assert only lower bounds and generous upper ones.

Every await on a request goes through ``within``: a request the batcher loses fails the test in
seconds with a message naming it, instead of hanging the run (pytest-timeout is the backstop).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsim.core.batcher import (
    BatcherClosedError,
    BatchResultMismatchError,
    DynamicBatcher,
    QueueFullError,
    as_runner,
)
from capsim.model.settings import BatchSettings

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
RESOLVE_WITHIN_S = 5.0  # a request the runner has answered resolves in a few loop turns; 5 s is generous


async def within(aw: Awaitable[T], seconds: float = RESOLVE_WITHIN_S) -> T:
    """Await ``aw``, failing (not hanging) if it does not finish in ``seconds``."""
    try:
        return await asyncio.wait_for(aw, seconds)
    except TimeoutError:
        raise AssertionError(f"not resolved within {seconds} s: the batcher lost a request") from None


async def settled(cond: Any, seconds: float = RESOLVE_WITHIN_S) -> None:
    """Wait until ``cond()`` holds, a millisecond at a time, failing after ``seconds``: a state the batcher
    reaches in a few turns of the event loop, however long the OS holds the process off its core meanwhile
    (a fixed sleep guessed at the time those turns take)."""
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.001)

    try:
        await asyncio.wait_for(poll(), seconds)
    except TimeoutError:
        raise AssertionError(f"not reached within {seconds} s") from None
    for _ in range(20):  # and it stays so for more turns: a bound that is passed a turn later fails the caller
        await asyncio.sleep(0)


async def all_resolved(tasks: list[asyncio.Task[Any]], seconds: float = RESOLVE_WITHIN_S) -> None:
    """Assert every task finishes within ``seconds`` (results and errors alike), naming those that did not."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=seconds)
    lost = sorted(tasks.index(t) for t in pending)
    for t in pending:
        t.cancel()  # do not leave them to the loop's shutdown
    assert not lost, f"{len(lost)} of {len(tasks)} requests never resolved: {lost}"


FOREVER_MS = 1_000_000.0


class Recorder:
    """A runner that records its batches and doubles each payload."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate
        self.running = 0
        self.max_running = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            return [2 * i for i in items]
        finally:
            self.running -= 1


async def test_full_batches_leave_without_waiting():
    rec = Recorder()
    async with DynamicBatcher(rec, BatchSettings(max_batch_size=4, max_wait_ms=FOREVER_MS)) as b:
        out = await within(asyncio.gather(*[b.submit(i) for i in range(8)]))
        out += await within(asyncio.gather(*[b.submit(i) for i in range(8, 12)]))
    assert out == [2 * i for i in range(12)]
    assert rec.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert b.batches_run == 3


async def test_zero_wait_sends_singletons_in_order():
    rec = Recorder()
    async with DynamicBatcher(rec, BatchSettings(max_batch_size=8, max_wait_ms=0)) as b:
        for i in range(3):
            assert await within(b.submit(i)) == 2 * i
    assert rec.batches == [[0], [1], [2]]


async def test_partial_batch_leaves_after_max_wait():
    rec = Recorder()
    async with DynamicBatcher(rec, BatchSettings(max_batch_size=64, max_wait_ms=20)) as b:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out = await within(asyncio.gather(*[b.submit(i) for i in range(3)]))
        waited = loop.time() - t0
    assert out == [0, 2, 4]
    assert rec.batches == [[0, 1, 2]]
    assert 0.015 <= waited < 5.0  # generous upper bound: the point is that it did wait


async def test_reject_overflow_raises_queue_full_at_once():
    gate = asyncio.Event()
    rec = Recorder(gate)
    s = BatchSettings(max_batch_size=1, max_wait_ms=0, queue_capacity=2, overflow="reject")
    async with DynamicBatcher(rec, s) as b:
        running = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.01)  # batch [0] is running and blocked on the gate
        queued = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="queue is full") as info:
            await within(b.submit(3))
        assert info.value.retry_after_s == 1.0  # max(max_wait, 1 s)
        gate.set()
        assert await within(running) == 0
        assert await within(asyncio.gather(*queued)) == [2, 4]


async def test_wait_overflow_applies_back_pressure_then_times_out():
    gate = asyncio.Event()
    rec = Recorder(gate)
    s = BatchSettings(max_batch_size=1, max_wait_ms=0, queue_capacity=1, overflow="wait")
    async with DynamicBatcher(rec, s) as b:
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(b.submit(1))  # fills the queue
        await asyncio.sleep(0)
        waiting = asyncio.create_task(b.submit(2))  # waits for space
        await asyncio.sleep(0.01)
        assert not waiting.done()
        with pytest.raises(QueueFullError, match="stayed full") as info:
            await within(b.submit(3, space_timeout_s=0.01))
        assert info.value.retry_after_s == 1.0  # the same hint as a rejection: max(max_wait, 1 s)
        gate.set()
        assert await within(asyncio.gather(first, second, waiting)) == [0, 2, 4]


async def test_cancelled_submit_never_runs():
    rec = Recorder()
    async with DynamicBatcher(rec, BatchSettings(max_batch_size=3, max_wait_ms=FOREVER_MS)) as b:
        t1 = asyncio.create_task(b.submit(1))
        t2 = asyncio.create_task(b.submit(2))
        await asyncio.sleep(0)
        t1.cancel()
        await asyncio.sleep(0)
        assert b.queue_depth() == 1
        rest = await within(asyncio.gather(b.submit(3), b.submit(4)))
        assert await within(t2) == 4 and rest == [6, 8]
        await all_resolved([t1])
        assert t1.cancelled()
    assert [1 in batch for batch in rec.batches] == [False] * len(rec.batches)


async def test_runner_exception_fails_only_its_batch_and_batcher_keeps_serving():
    calls = 0

    async def flaky(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return items

    async with DynamicBatcher(flaky, BatchSettings(max_batch_size=2, max_wait_ms=FOREVER_MS)) as b:
        first = await within(asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True))
        second = await within(asyncio.gather(b.submit(3), b.submit(4)))
    assert [type(e) for e in first] == [RuntimeError, RuntimeError]
    assert first[0] is first[1]  # each request of the batch gets the batch's own exception
    assert second == [3, 4]


async def test_item_exception_fails_only_that_item():
    async def picky(items: list[int]) -> list[int | BaseException]:
        return [ValueError(f"bad {i}") if i % 2 else i for i in items]

    async with DynamicBatcher(picky, BatchSettings(max_batch_size=4, max_wait_ms=FOREVER_MS)) as b:
        out = await within(asyncio.gather(*[b.submit(i) for i in range(4)], return_exceptions=True))
    assert out[0] == 0 and out[2] == 2
    assert isinstance(out[1], ValueError) and str(out[1]) == "bad 1"
    assert isinstance(out[3], ValueError)


async def test_wrong_result_count_fails_batch_clearly():
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async with DynamicBatcher(short, BatchSettings(max_batch_size=2, max_wait_ms=FOREVER_MS)) as b:
        out = await within(asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True))
        assert len(out) == 2 and all(isinstance(e, BatchResultMismatchError) for e in out)
        assert "returned 1 results for a batch of 2" in str(out[0])
        # still serving: the next batch runs (and fails the same way, since the runner is wrong)
        again = await within(asyncio.gather(b.submit(3), b.submit(4), return_exceptions=True))
        assert len(again) == 2 and all(isinstance(e, BatchResultMismatchError) for e in again)
        assert not b.closed


async def test_close_drains_queued_work_and_rejects_new():
    rec = Recorder()
    b = DynamicBatcher(rec, BatchSettings(max_batch_size=10, max_wait_ms=FOREVER_MS))
    b.start()
    pending = [asyncio.create_task(b.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    await within(b.aclose())
    await all_resolved(pending)
    assert [p.result() for p in pending] == [0, 2, 4]
    with pytest.raises(BatcherClosedError):
        await within(b.submit(9))


@pytest.mark.parametrize("where", ["argument", "constructor"])
async def test_close_timeout_fails_what_is_left(where):
    gate = asyncio.Event()  # never set: the runner hangs
    rec = Recorder(gate)
    m = FakeMetrics()
    s = BatchSettings(max_batch_size=1, max_wait_ms=0, queue_capacity=10)
    b = DynamicBatcher(rec, s, metrics=m, close_timeout_s=0.05 if where == "constructor" else 30.0)
    b.start()
    tasks = [asyncio.create_task(b.submit(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    if where == "argument":
        await b.aclose(timeout_s=0.05)  # not wrapped: what aclose promises holds the moment it returns
    else:
        await b.aclose()  # the constructor's close_timeout_s bounds it
    assert loop.time() - t0 < 5.0
    assert sorted(m.outcomes) == ["closed"] * 3  # every request ended, the running one included
    assert b.in_flight_batches == 0  # the cancelled batch is gone too
    await all_resolved(tasks)
    results = [t.exception() for t in tasks]
    assert all(isinstance(r, BatcherClosedError) for r in results), results
    assert str(results[0]) == "batcher closed while the batch was running"
    assert [str(r) for r in results[1:]] == ["batcher closed before the request ran"] * 2  # queued leftovers


async def test_submit_before_start_is_refused():
    b = DynamicBatcher(Recorder(), BatchSettings())
    with pytest.raises(BatcherClosedError, match="^batcher is not running$"):
        await within(b.submit(1))


@pytest.mark.parametrize("bad", [-0.5, -1])
def test_a_negative_close_timeout_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=rf"^close_timeout_s must be >= 0, got {bad}$"):
        DynamicBatcher(Recorder(), BatchSettings(), close_timeout_s=bad)
    DynamicBatcher(Recorder(), BatchSettings(), close_timeout_s=0)  # zero: fail at once on close


async def test_a_cancelled_queued_request_gives_its_slot_to_the_next_waiter():
    # the caller's own handler (not the dispatcher) takes the request off the queue
    s = BatchSettings(max_batch_size=2, max_wait_ms=FOREVER_MS, queue_capacity=1, overflow="wait")
    async with DynamicBatcher(Recorder(), s) as b:
        first = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(b.submit(2))
        await asyncio.sleep(0.01)
        assert b.queue_depth() == 1 and not second.done()  # 2 waits for space
        first.cancel()
        await all_resolved([first])
        await asyncio.sleep(0.01)
        assert b.queue_depth() == 1  # 2 took the freed slot
    await all_resolved([second])
    assert second.result() == 4  # drained by close, not failed as a waiter


async def test_start_twice_or_after_close_is_refused_and_the_dispatcher_is_named():
    b = DynamicBatcher(Recorder(), BatchSettings())
    b.start()
    assert any(t.get_name() == "capsim-batcher" for t in asyncio.all_tasks())  # findable in task dumps
    with pytest.raises(RuntimeError, match="^batcher already started$"):
        b.start()
    await within(b.aclose())
    fresh = DynamicBatcher(Recorder(), BatchSettings())
    await within(fresh.aclose())  # closed before it ever started
    with pytest.raises(BatcherClosedError, match="^batcher is closed$"):
        fresh.start()
    with pytest.raises(BatcherClosedError, match="^batcher is closed$"):
        await within(b.submit(1))


@pytest.mark.parametrize("with_metrics", [False, True])
async def test_the_next_batch_is_dispatched_before_the_finished_batchs_callers_resume(with_metrics):
    # the model starts on the next batch while the loop answers this one (store writes, responses)
    rec = Recorder()
    s = BatchSettings(max_batch_size=2, max_wait_ms=FOREVER_MS, max_concurrent_batches=1)
    seen: list[int] = []
    async with DynamicBatcher(rec, s, metrics=FakeMetrics() if with_metrics else None) as b:

        async def first() -> int:
            result = await b.submit(0)
            seen.append(b.queue_depth())  # what is still queued when the first caller resumes
            return result

        out = await within(asyncio.gather(first(), b.submit(1), b.submit(2), b.submit(3)))
    assert out == [0, 2, 4, 6]
    assert seen == [0]  # [2, 3] had already left as the next batch
    assert rec.batches == [[0, 1], [2, 3]]


async def test_a_caller_cancelled_as_its_space_wait_expires_is_counted_once():
    # The expiry rejects the request; the caller is cancelled before it resumes to see that. The
    # metrics hook cancels it at exactly that moment (just after the rejection is reported).
    gate = asyncio.Event()
    waiting: list[asyncio.Task[int]] = []

    class CancelOnReject(FakeMetrics):
        def observe_request(self, outcome, queue_wait_s, ttft_s, latency_s):
            super().observe_request(outcome, queue_wait_s, ttft_s, latency_s)
            if outcome == "rejected":
                waiting[0].cancel()

    m = CancelOnReject()
    s = BatchSettings(max_batch_size=1, max_wait_ms=0, queue_capacity=1, overflow="wait")
    async with DynamicBatcher(Recorder(gate), s, metrics=m) as b:
        running = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0)
        waiting.append(asyncio.create_task(b.submit(2, space_timeout_s=0.01)))
        await all_resolved(waiting)
        gate.set()
        await all_resolved([running, queued])
    assert waiting[0].cancelled()
    assert sorted(m.outcomes) == ["ok", "ok", "rejected"]


async def test_concurrent_batches_are_bounded():
    gate = asyncio.Event()
    rec = Recorder(gate)
    s = BatchSettings(max_batch_size=1, max_wait_ms=0, max_concurrent_batches=3)
    async with DynamicBatcher(rec, s) as b:
        tasks = [asyncio.create_task(b.submit(i)) for i in range(10)]
        await settled(lambda: rec.running >= 3)
        assert rec.running == 3 and b.in_flight_batches == 3
        gate.set()
        await within(asyncio.gather(*tasks))
    assert rec.max_running == 3


class FakeMetrics:
    def __init__(self) -> None:
        self.depth = None
        self.batches: list[int] = []
        self.outcomes: list[str] = []
        self.ttfts: list[float | None] = []
        self.calls: list[tuple[str, float | None, float | None, float | None]] = []

    def bind_queue_depth(self, read):
        self.depth = read

    def observe_batch(self, size, service_s):
        assert 0 <= service_s < RESOLVE_WITHIN_S  # the runner's time, not a clock reading
        self.batches.append(size)

    def observe_request(self, outcome, queue_wait_s, ttft_s, latency_s):
        self.outcomes.append(outcome)
        self.ttfts.append(ttft_s)
        self.calls.append((outcome, queue_wait_s, ttft_s, latency_s))


@dataclass
class Timed:
    value: int
    first_token_s: float


async def test_metrics_protocol_sees_batches_outcomes_and_ttft():
    m = FakeMetrics()

    async def runner(items: list[int]) -> list[Timed | BaseException]:
        return [Timed(i, 0.5) if i else ValueError("x") for i in items]

    s = BatchSettings(max_batch_size=2, max_wait_ms=FOREVER_MS, queue_capacity=2)
    async with DynamicBatcher(runner, s, metrics=m) as b:
        assert m.depth is not None and m.depth() == 0
        await within(asyncio.gather(b.submit(0), b.submit(1), return_exceptions=True))
    assert m.batches == [2]
    assert sorted(m.outcomes) == ["failed", "ok"]
    ok_ttft = m.ttfts[m.outcomes.index("ok")]
    assert ok_ttft is not None and ok_ttft >= 0.5
    _, wait, _, latency = m.calls[m.outcomes.index("ok")]
    assert wait is not None and latency is not None
    assert wait <= latency < RESOLVE_WITHIN_S  # arrival to last token: a duration, not a clock reading


# ---- property test: every request resolves exactly once, in FIFO batches within the bound ----

FAIL_BATCH = 10_000  # a payload >= this makes the runner raise for its whole batch
FAIL_ITEM = 20_000  # a payload >= this makes the runner fail that item only


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 40))
    kinds = draw(st.lists(st.sampled_from(["ok", "ok", "ok", "batch", "item"]), min_size=n, max_size=n))
    payloads = [i + (FAIL_BATCH if k == "batch" else FAIL_ITEM if k == "item" else 0) for i, k in enumerate(kinds)]
    cancel = draw(st.sets(st.integers(0, n - 1), max_size=n // 3))
    pauses = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    s = BatchSettings(
        max_batch_size=draw(st.integers(1, 8)),
        max_wait_ms=draw(st.sampled_from([0.0, FOREVER_MS])),
        queue_capacity=draw(st.integers(1, 50)),
        overflow=draw(st.sampled_from(["reject", "wait"])),
        max_concurrent_batches=draw(st.integers(1, 3)),
    )
    return s, payloads, cancel, pauses


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_property_every_request_resolves_exactly_once(case):
    s, payloads, cancel, pauses = case
    batches: list[list[int]] = []
    running = 0
    max_running = 0

    async def runner(items: list[int]) -> list[int | BaseException]:
        nonlocal running, max_running
        batches.append(list(items))
        running += 1
        max_running = max(max_running, running)
        await asyncio.sleep(0)
        running -= 1
        if any(FAIL_BATCH <= i < FAIL_ITEM for i in items):
            raise RuntimeError("batch failed")
        return [ValueError("item failed") if i >= FAIL_ITEM else i for i in items]

    metrics = FakeMetrics()
    entered: list[int] = []

    async def main() -> tuple[list[asyncio.Task[int]], list[int]]:
        b = DynamicBatcher(runner, s, metrics=metrics, close_timeout_s=5.0)
        b.start()
        tasks = []

        async def submit(p: int) -> int:
            entered.append(p)  # a task cancelled before it starts never submits anything
            return await b.submit(p)

        for idx, p in enumerate(payloads):
            tasks.append(asyncio.create_task(submit(p)))
            if pauses[idx]:
                await asyncio.sleep(0)
        for idx in cancel:
            tasks[idx].cancel()
        await asyncio.sleep(0)
        await b.aclose()
        # aclose has resolved every request's future; each task needs one loop turn to see it. Checking
        # after a few turns (not a timeout) keeps a lost request a fast, deterministic failure, which
        # matters because Hypothesis replays a failing case many times while shrinking it.
        for _ in range(3):
            await asyncio.sleep(0)
        lost = [i for i, t in enumerate(tasks) if not t.done()]
        for t in tasks:
            t.cancel()  # so asyncio.run can finish even when a request was lost
        return tasks, lost

    tasks, lost = asyncio.run(asyncio.wait_for(main(), 30))
    assert not lost, f"requests never resolved after aclose: {lost} of {len(payloads)}"
    ran = [p for batch in batches for p in batch]
    # nothing runs twice; batches respect the bound and the concurrency limit
    assert len(ran) == len(set(ran))
    assert all(1 <= len(batch) <= s.max_batch_size for batch in batches)
    assert max_running <= s.max_concurrent_batches
    # FIFO: requests run in submission order
    assert ran == sorted(ran, key=payloads.index)
    position = {p: bi for bi, batch in enumerate(batches) for p in batch}
    for t, p in zip(tasks, payloads, strict=True):
        assert t.done()  # resolved: nothing left hanging
        if t.cancelled():
            continue
        exc = t.exception()
        if p not in position:
            # never ran: rejected by a full queue or failed by close
            assert isinstance(exc, QueueFullError | BatcherClosedError), exc
            continue
        batch = batches[position[p]]
        if any(FAIL_BATCH <= i < FAIL_ITEM for i in batch):
            assert isinstance(exc, RuntimeError) and str(exc) == "batch failed"
        elif p >= FAIL_ITEM:
            assert isinstance(exc, ValueError)
        else:
            assert exc is None and t.result() == p
    # one metrics outcome per request, and the outcome is the request's fate (a cancelled caller's
    # request may have ended any way, but is still counted once)
    assert len(metrics.outcomes) == len(entered), Counter(metrics.outcomes)
    fate: Counter[str] = Counter()
    for t in tasks:
        if t.cancelled():
            continue
        exc = t.exception()
        fate[
            "ok" if exc is None
            else "rejected" if isinstance(exc, QueueFullError)
            else "closed" if isinstance(exc, BatcherClosedError)
            else "failed"
        ] += 1
    observed = Counter(metrics.outcomes)
    assert all(observed[k] >= n for k, n in fate.items()), (observed, fate)
    assert observed["cancelled"] <= sum(t.cancelled() for t in tasks)
    assert sorted(metrics.batches) == sorted(len(batch) for batch in batches)
    # with 'wait' overflow and no timeout, nothing is rejected
    if s.overflow == "wait":
        assert not any(
            not t.cancelled() and isinstance(t.exception(), QueueFullError) for t in tasks
        )


# ---- one metrics outcome per request, on every path that ends one ----


async def test_cancelled_while_queued_is_counted_once_even_when_the_dispatcher_pops_it_first():
    # The reproduction: the dispatcher takes the full queue off before the cancelled task's
    # handler runs, so the handler sees its request dispatched; it used to leave no outcome at all.
    m = FakeMetrics()
    rec = Recorder()
    async with DynamicBatcher(rec, BatchSettings(max_batch_size=2, max_wait_ms=FOREVER_MS), metrics=m) as b:
        t1 = asyncio.create_task(b.submit(1))
        t2 = asyncio.create_task(b.submit(2))
        await asyncio.sleep(0)
        t1.cancel()
        t3 = asyncio.create_task(b.submit(3))
        await all_resolved([t1, t2])
    await all_resolved([t3])
    assert t1.cancelled() and t2.result() == 4 and t3.result() == 6
    assert sorted(m.outcomes) == ["cancelled", "ok", "ok"]
    assert rec.batches == [[2, 3]]


async def test_a_cancelled_request_inside_a_leaving_batch_is_dropped_and_counted_once():
    # the dispatcher takes [1, 2, 3] off the queue before 2's cancelled caller has run its handler
    m = FakeMetrics()
    rec = Recorder()
    async with DynamicBatcher(rec, BatchSettings(max_batch_size=3, max_wait_ms=FOREVER_MS), metrics=m) as b:
        tasks = [asyncio.create_task(b.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        tasks[1].cancel()
        await all_resolved(tasks)
    assert rec.batches == [[1, 3]]
    assert tasks[1].cancelled() and [tasks[0].result(), tasks[2].result()] == [2, 6]
    assert sorted(m.outcomes) == ["cancelled", "ok", "ok"]


async def test_a_cancelled_head_frees_exactly_one_slot():
    # capacity 2: [a, b] queued, c and d wait for space; a is cancelled and the dispatcher drops it
    # before a's handler runs: one slot frees, so c enters and d keeps waiting
    s = BatchSettings(max_batch_size=3, max_wait_ms=FOREVER_MS, queue_capacity=2, overflow="wait")
    async with DynamicBatcher(Recorder(), s) as b:
        tasks = [asyncio.create_task(b.submit(i)) for i in range(4)]
        await asyncio.sleep(0)
        tasks[0].cancel()
        await all_resolved(tasks[:1])
        await asyncio.sleep(0.01)
        assert b.queue_depth() == 2 and not tasks[3].done()
    await all_resolved(tasks)
    assert [t.result() for t in tasks[1:3]] == [2, 4]  # close drains the queue...
    assert isinstance(tasks[3].exception(), BatcherClosedError)  # ...and fails who waits for space


@pytest.mark.parametrize("with_metrics", [True, False])  # without metrics the batcher takes a leaner path
async def test_cancelled_while_its_batch_runs_is_counted_once_as_cancelled(with_metrics):
    m = FakeMetrics()
    gate = asyncio.Event()
    s = BatchSettings(max_batch_size=3, max_wait_ms=0)
    async with DynamicBatcher(Recorder(gate), s, metrics=m if with_metrics else None) as b:
        t0 = asyncio.create_task(b.submit(0))
        t1 = asyncio.create_task(b.submit(1))
        t2 = asyncio.create_task(b.submit(2))
        await asyncio.sleep(0.01)  # the batch [0, 1, 2] is running, blocked on the gate
        assert b.in_flight_batches == 1
        t1.cancel()
        await asyncio.sleep(0)
        gate.set()
        await all_resolved([t0, t1, t2])
    assert t1.cancelled() and t0.result() == 0 and t2.result() == 4  # the one after it still resolves
    assert b.batches_run == 1
    if with_metrics:
        assert sorted(m.outcomes) == ["cancelled", "ok", "ok"]
        cancelled = m.calls[m.outcomes.index("cancelled")]
        assert cancelled[1] is not None  # it waited in the queue before its batch: that is reported


async def test_every_way_out_is_counted_once():
    # rejected at intake, rejected after a space timeout, cancelled while waiting for space, closed
    # while waiting for space, closed while queued, closed while running: six requests, six outcomes.
    m = FakeMetrics()
    gate = asyncio.Event()  # never set: the first batch hangs until close cancels it
    s = BatchSettings(max_batch_size=1, max_wait_ms=0, queue_capacity=1, overflow="wait")
    b = DynamicBatcher(Recorder(gate), s, metrics=m)
    b.start()
    running = asyncio.create_task(b.submit(0))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(b.submit(1))
    await asyncio.sleep(0)
    expired = asyncio.create_task(b.submit(2, space_timeout_s=0.01))
    await all_resolved([expired])
    cancelled = asyncio.create_task(b.submit(3))
    closed_waiting = asyncio.create_task(b.submit(4))
    await asyncio.sleep(0)
    cancelled.cancel()
    await all_resolved([cancelled])
    b.settings = BatchSettings(max_batch_size=1, max_wait_ms=0, queue_capacity=1, overflow="reject")
    with pytest.raises(QueueFullError):
        await within(b.submit(5))
    await within(b.aclose(timeout_s=0.05))
    await all_resolved([running, queued, closed_waiting])
    assert isinstance(expired.exception(), QueueFullError)
    for t in (running, queued, closed_waiting):
        assert isinstance(t.exception(), BatcherClosedError)
    assert str(closed_waiting.exception()) == "batcher closed while waiting for queue space"
    assert sorted(m.outcomes) == sorted(["closed", "closed", "closed", "rejected", "rejected", "cancelled"])


# ---- the timer path: real, finite waits ----


async def test_a_lone_request_leaves_after_max_wait_not_before():
    m = FakeMetrics()
    rec = Recorder()
    waits: list[float | None] = []
    m.observe_request = lambda outcome, wait, ttft, latency: waits.append(wait)  # type: ignore[method-assign]
    async with DynamicBatcher(rec, BatchSettings(max_batch_size=8, max_wait_ms=50), metrics=m) as b:
        loop = asyncio.get_running_loop()
        for i in range(3):  # the timer re-arms for each new lone request
            t0 = loop.time()
            assert await within(b.submit(i)) == 2 * i
            assert loop.time() - t0 >= 0.05
    assert rec.batches == [[0], [1], [2]]
    assert all(w is not None and 0.05 <= w < 5.0 for w in waits), waits


async def test_the_deadline_is_the_oldest_requests():
    # r1 at 0 s, r2 at 0.6 s, max_wait 1 s: the batch leaves at about 1 s, so r2 waited about 0.4 s.
    # Were the deadline taken from the newest request, r2 would wait the full second. The bound
    # (0.9 s) leaves half a second for a slow machine to fire the timer late.
    waits: dict[str, float] = {}
    m = FakeMetrics()
    outcomes: list[float] = []
    m.observe_request = lambda outcome, wait, ttft, latency: outcomes.append(wait)  # type: ignore[method-assign]
    rec = Recorder()
    async with DynamicBatcher(rec, BatchSettings(max_batch_size=8, max_wait_ms=1000), metrics=m) as b:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r1 = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.6)
        r2 = asyncio.create_task(b.submit(2))
        await all_resolved([r1, r2])
        waits["batch"] = loop.time() - t0
    assert rec.batches == [[1, 2]]
    assert waits["batch"] >= 1.0
    first, second = outcomes
    assert first >= 1.0
    assert second < 0.9, f"the second request waited {second:.3f} s: the deadline was not the oldest's"


async def test_as_runner_runs_a_blocking_function_off_the_loop():
    import threading

    loop_thread = threading.get_ident()
    seen: list[int] = []

    def blocking(items: list[int]) -> list[int | BaseException]:
        seen.append(threading.get_ident())
        return [ValueError("odd") if i % 2 else i * 10 for i in items]

    async with DynamicBatcher(as_runner(blocking), BatchSettings(max_batch_size=2, max_wait_ms=FOREVER_MS)) as b:
        out = await within(asyncio.gather(b.submit(2), b.submit(3), return_exceptions=True))
    assert out[0] == 20 and isinstance(out[1], ValueError)
    assert seen and all(t != loop_thread for t in seen)


async def test_failed_requests_report_their_wait_and_latency():
    m = FakeMetrics()

    async def runner(items: list[int]) -> list[int | BaseException]:
        await asyncio.sleep(0.01)
        if 2 in items:  # the last batch fails: its count must still go up by one
            raise RuntimeError("batch failed")
        return [ValueError("item") if i == 1 else i for i in items]

    async with DynamicBatcher(runner, BatchSettings(max_batch_size=2, max_wait_ms=FOREVER_MS), metrics=m) as b:
        await within(asyncio.gather(*[b.submit(i) for i in range(4)], return_exceptions=True))
    assert sorted(c[0] for c in m.calls) == ["failed", "failed", "failed", "ok"]
    assert b.batches_run == 2  # a batch that failed still ran
    for outcome, wait, ttft, latency in m.calls:
        assert wait is not None and latency is not None, outcome
        assert wait >= 0 and wait + 0.009 <= latency < RESOLVE_WITHIN_S  # the runner's 10 ms, not a clock reading
        assert ttft is None  # no result, no first token (and an ok int carries none)


async def test_cancelled_while_its_failing_batch_runs_is_counted_as_cancelled_with_its_wait():
    m = FakeMetrics()
    gate = asyncio.Event()

    async def runner(items: list[int]) -> list[int]:
        await gate.wait()
        raise RuntimeError("batch failed")

    async with DynamicBatcher(runner, BatchSettings(max_batch_size=2, max_wait_ms=0), metrics=m) as b:
        t1 = asyncio.create_task(b.submit(1))
        t2 = asyncio.create_task(b.submit(2))
        await asyncio.sleep(0.01)
        assert b.in_flight_batches == 1
        t1.cancel()
        await asyncio.sleep(0)
        gate.set()
        await all_resolved([t1, t2])
    assert t1.cancelled() and isinstance(t2.exception(), RuntimeError)
    by_outcome = {c[0]: c for c in m.calls}
    assert sorted(by_outcome) == ["cancelled", "failed"] and len(m.calls) == 2
    assert by_outcome["cancelled"][1] is not None  # it did wait in the queue: that is reported
    assert by_outcome["failed"][3] is not None


async def test_freed_space_admits_exactly_as_many_waiters_as_it_frees():
    gate = asyncio.Event()
    depths: list[int] = []
    s = BatchSettings(max_batch_size=1, max_wait_ms=0, queue_capacity=1, overflow="wait")
    b: DynamicBatcher[int, int]

    async def runner(items: list[int]) -> list[int]:
        depths.append(b.queue_depth())  # a batch just left the queue and a waiter took its place
        await gate.wait()
        return items

    async with DynamicBatcher(runner, s) as b:
        tasks = [asyncio.create_task(b.submit(i)) for i in range(4)]
        await asyncio.sleep(0.01)
        assert b.queue_depth() == 1  # [0] runs, [1] queued, [2, 3] wait for space
        gate.set()
        assert await within(asyncio.gather(*tasks)) == [0, 1, 2, 3]
    assert depths and max(depths) <= s.queue_capacity, depths


async def test_a_waiter_cancelled_as_space_frees_does_not_hold_up_those_behind_it():
    # The cancelled waiter's future is done but its handler has not run when the dispatcher frees a
    # slot; the slot must go to the next live waiter. The metrics hook cancels it at that moment.
    gate = asyncio.Event()
    tasks: list[asyncio.Task[int]] = []

    class CancelOnFirstBatch(FakeMetrics):
        def observe_batch(self, size, service_s):
            super().observe_batch(size, service_s)
            if len(self.batches) == 1:
                tasks[2].cancel()  # the first waiter, just as batch [0]'s slot frees the queue

    s = BatchSettings(max_batch_size=1, max_wait_ms=0, queue_capacity=1, overflow="wait")
    async with DynamicBatcher(Recorder(gate), s, metrics=CancelOnFirstBatch()) as b:
        for i in range(4):
            tasks.append(asyncio.create_task(b.submit(i)))
            await asyncio.sleep(0.01)  # [0] runs, [1] queued, [2, 3] wait for space, in that order
        gate.set()
        await all_resolved(tasks)
        assert tasks[2].cancelled()
        assert [tasks[i].result() for i in (0, 1, 3)] == [0, 2, 6]  # 3 ran: it was not stuck behind 2


async def test_a_crashed_dispatcher_fails_what_is_queued_and_refuses_new_work():
    # A bug in the dispatch path (here: settings that blow up when the policy reads them) must not
    # leave callers hanging: the queued requests fail at once, the batcher refuses new work, and
    # aclose surfaces the bug instead of hiding it.
    class PolicyBug:
        queue_capacity = 100
        overflow = "reject"
        max_wait_s = 0.0

        def __getattr__(self, name: str) -> object:
            raise RuntimeError(f"policy bug reading {name}")

    m = FakeMetrics()
    b = DynamicBatcher(Recorder(), BatchSettings(max_batch_size=8, max_wait_ms=FOREVER_MS), metrics=m)
    b.start()
    queued = [asyncio.create_task(b.submit(i)) for i in range(2)]
    await asyncio.sleep(0.01)  # queued; the dispatcher has looked and waits for more
    assert b.queue_depth() == 2
    b.settings = PolicyBug()  # type: ignore[assignment]
    third = asyncio.create_task(b.submit(2))  # wakes the dispatcher, which crashes
    await all_resolved([*queued, third])
    for t in (*queued, third):
        exc = t.exception()
        assert isinstance(exc, BatcherClosedError)
        assert str(exc).startswith("batcher failed: RuntimeError('policy bug reading")
    assert m.outcomes == ["closed"] * 3
    assert b.closed
    with pytest.raises(BatcherClosedError, match="^batcher is closed$"):
        await within(b.submit(3))
    with pytest.raises(RuntimeError, match="policy bug"):
        await within(b.aclose())


async def test_a_leaving_batch_admits_one_waiter_per_freed_slot():
    # [0, 1] runs; [2, 3] fill the queue; 4 and 5 wait. When [2, 3] leaves, both waiters must enter,
    # or the lone one left never makes a full batch and (with an endless max_wait) never runs.
    gate = asyncio.Event()
    s = BatchSettings(max_batch_size=2, max_wait_ms=FOREVER_MS, queue_capacity=2, overflow="wait")
    rec = Recorder(gate)
    async with DynamicBatcher(rec, s) as b:
        tasks = [asyncio.create_task(b.submit(i)) for i in range(6)]
        await settled(lambda: len(rec.batches) >= 1 and b.queue_depth() >= 2)
        assert b.queue_depth() == 2 and rec.batches == [[0, 1]]
        gate.set()
        assert await within(asyncio.gather(*tasks)) == [0, 2, 4, 6, 8, 10]
    assert rec.batches == [[0, 1], [2, 3], [4, 5]]


async def test_a_full_queue_hints_a_retry_after_the_longer_of_max_wait_and_one_second():
    # max_wait 2.5 s: a lone queued request holds the only slot (its batch is not full and not due)
    s = BatchSettings(max_batch_size=2, max_wait_ms=2500, queue_capacity=1, overflow="wait")
    async with DynamicBatcher(Recorder(), s) as b:
        held = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="stayed full") as expired:
            await within(b.submit(2, space_timeout_s=0.01))
        b.settings = BatchSettings(max_batch_size=2, max_wait_ms=2500, queue_capacity=1, overflow="reject")
        with pytest.raises(QueueFullError, match="is full") as rejected:
            await within(b.submit(3))
    await all_resolved([held])
    assert held.result() == 2
    assert expired.value.retry_after_s == rejected.value.retry_after_s == 2.5

"""Batcher overhead per request: DynamicBatcher vs a naive queue + wait_for batcher, no-op runner.

256 concurrent clients each submit requests back to back; batches of 32. The process is pinned to
one core. Also reports a bare asyncio.Queue handoff as the floor. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, print_table, write_result
from capsim.core.batcher import DynamicBatcher
from capsim.model.settings import BatchSettings

CLIENTS = 256
BATCH = 32


async def noop_runner(items: list[int]) -> list[int]:
    return items


async def run_capsim(total: int) -> float:
    settings = BatchSettings(max_batch_size=BATCH, max_wait_ms=1.0, queue_capacity=4096)
    per_client = total // CLIENTS
    async with DynamicBatcher(noop_runner, settings) as b:

        async def client() -> None:
            for i in range(per_client):
                await b.submit(i)

        t0 = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(CLIENTS)])
        return (time.perf_counter() - t0) / (per_client * CLIENTS)


class NaiveBatcher:
    """The textbook version: an asyncio.Queue, and wait_for on each further item until the deadline."""

    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        self.queue: asyncio.Queue[tuple[int, asyncio.Future[int]]] = asyncio.Queue()
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.task: asyncio.Task[None] | None = None

    async def submit(self, item: int) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await self.queue.put((item, fut))
        return await fut

    async def loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            results = await noop_runner([i for i, _ in batch])
            for (_, fut), r in zip(batch, results, strict=True):
                fut.set_result(r)


async def run_naive(total: int) -> float:
    nb = NaiveBatcher(BATCH, 0.001)
    task = asyncio.create_task(nb.loop())
    per_client = total // CLIENTS

    async def client() -> None:
        for i in range(per_client):
            await nb.submit(i)

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(CLIENTS)])
    elapsed = time.perf_counter() - t0
    task.cancel()
    return elapsed / (per_client * CLIENTS)


async def run_bare_queue(total: int) -> float:
    q: asyncio.Queue[int] = asyncio.Queue()

    async def consumer() -> None:
        for _ in range(total):
            await q.get()

    c = asyncio.create_task(consumer())
    t0 = time.perf_counter()
    for i in range(total):
        q.put_nowait(i)
        if i % 64 == 0:
            await asyncio.sleep(0)
    await c
    return (time.perf_counter() - t0) / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer requests and repeats")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    total = 256 * (40 if args.quick else 200)
    repeats = 3 if args.quick else 7
    cases = {"capsim DynamicBatcher": run_capsim, "naive queue + wait_for": run_naive, "bare queue handoff": run_bare_queue}
    results: dict[str, float] = {}
    for name, fn in cases.items():
        asyncio.run(fn(total // 4))  # warm up
        results[name] = median([asyncio.run(fn(total)) for _ in range(repeats)]) * 1e6
    base = results["naive queue + wait_for"]
    rows = [[name, us, us / base] for name, us in results.items()]
    print_table(
        f"batcher overhead per request, {CLIENTS} clients, batch {BATCH}, no-op runner, one core "
        f"(median of {repeats} runs of {total} requests)",
        ["batcher", "us/request", "ratio to naive"],
        rows,
    )
    target = results["capsim DynamicBatcher"] <= 5.0
    print(f"\ntarget <= 5 us/request: {'met' if target else 'NOT met'}")
    write_result(
        "batcher",
        {"requests": total, "repeats": repeats, "us_per_request": results, "target_5us_met": target},
    )


if __name__ == "__main__":
    main()

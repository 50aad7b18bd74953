"""What the validation reads from the pod and the load generator: the batcher's batch trace."""

from __future__ import annotations

import asyncio
import time

from capsim.core.batcher import TRACE_BATCHES, BatchRecord, DynamicBatcher
from capsim.model.settings import BatchSettings


def test_the_batcher_keeps_each_batch_with_its_requests_enqueue_times():
    async def runner(items: list[int]) -> list[int]:
        await asyncio.sleep(0.01)
        return [i * 2 for i in items]

    async def main() -> list[BatchRecord]:
        async with DynamicBatcher(runner, BatchSettings(max_batch_size=3, max_wait_ms=50)) as b:
            before = time.monotonic()
            assert await asyncio.gather(*[b.submit(i) for i in range(4)]) == [0, 2, 4, 6]
            assert b.trace.maxlen == TRACE_BATCHES
            records = list(b.trace)
            for r in records:  # the loop's clock is the monotonic one other processes can read
                assert before <= min(r.enqueued) <= max(r.enqueued) <= r.start < r.end <= time.monotonic()
            return records

    records = asyncio.run(main())
    assert [r.size for r in records] == [3, 1]  # a full batch at once, the fourth after its wait
    assert [len(r.enqueued) for r in records] == [3, 1]
    assert records[1].start - records[1].enqueued[0] >= 0.045
    assert records[0].end - records[0].start >= 0.009
    assert records[0].engine_start == 0.0  # plain ints say nothing of an engine's own clock

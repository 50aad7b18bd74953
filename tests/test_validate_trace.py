"""What the validation reads from the pod and the load generator: the batcher's batch trace."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

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


def test_trace_diagnostics_find_a_request_that_missed_a_batch_it_was_sent_in_time_for():
    import numpy as np
    import pandas as pd
    import pytest

    from capsim.model.profile import ServiceTimeProfile
    from capsim.studies.validate import ValidationSpec
    from capsim.studies.validate_calibrate import Calibration
    from capsim.studies.validate_report import trace_diagnostics

    # sent at 0.89, 0.94, 1.09, 1.19; queued 10 ms later, the last 20 ms later: after the batch that
    # started at 1.2 with room for it
    trace = [[1.0, 1.2, 2, [0.90, 0.95], 0.0, 0.0], [1.2, 1.4, 1, [1.10], 0.0, 0.0], [1.4, 1.5, 1, [1.21], 0.0, 0.0]]
    sent = np.array([0.89, 0.94, 1.09, 1.19])
    real = pd.DataFrame({"arrival_s": sent, "start_s": sent + 0.1, "first_token_s": sent + 0.2, "end_s": sent + 0.3,
                         "outcome": ["ok"] * 4, "batch_size": [2, 2, 1, 1]})
    real.attrs.update(t0_monotonic=0.0, send_error_s=[0.0, 0.001, 0.002, 0.003])
    d = trace_diagnostics(trace, real, real, ServiceTimeProfile.from_csv(Path(__file__).parents[1] / "data" / "profiles" / "cpu-tiny-float32.csv"), ValidationSpec(),
                          Calibration(1.0, 0.0, ((1.0, 0.05, 0.05),)))
    assert d["missed_batch_share"] == pytest.approx(0.25)
    assert d["ingress_p50_ms"] == pytest.approx(10.0) and d["ingress_p99_ms"] == pytest.approx(19.7)
    assert d["real_mean_size"] == pytest.approx(4 / 3) and d["real_after_first_p50_ms"] == pytest.approx(100.0)
    assert d["send_error_p99_ms"] == pytest.approx(2.97)

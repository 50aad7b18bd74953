"""The continuous pod's step trace (``ContinuousBatcher.trace``, ``GET /debug/batches``): one record per engine
step with its composition, the arrivals and tokens around it, and its times."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from capsim.core.continuous_batcher import ContinuousBatcher, StepRecord
from capsim.core.engine import ReferenceEngine
from capsim.policy.scheduling import SchedulerLimits

LIMITS = SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=64, block_size=4, num_blocks=64, max_model_len=96)


@pytest.fixture(scope="module")
def engine() -> ReferenceEngine:
    return ReferenceEngine("tiny", device="cpu", dtype="float32", seed=5, threads=1)


def test_every_step_is_recorded_with_what_it_computed_and_the_arrivals_before_it(engine: ReferenceEngine) -> None:
    shapes = [(10, 6), (3, 9), (17, 4), (6, 7), (25, 5), (8, 8)]

    async def main() -> list[StepRecord]:
        async with ContinuousBatcher(engine, LIMITS) as b:
            first = [asyncio.create_task(b.submit(engine.request(p, o, salt=k))) for k, (p, o) in enumerate(shapes[:3])]
            while not b.trace:  # the rest arrive once the first step is done, while the first ones run
                await asyncio.sleep(0.0005)
            rest = [asyncio.create_task(b.submit(engine.request(p, o, salt=9 + k))) for k, (p, o) in enumerate(shapes[3:])]
            await asyncio.gather(*first, *rest)
            return list(b.trace)

    trace = asyncio.run(main())
    n, outputs = len(shapes), sum(o for _, o in shapes)
    assert sum(r.arrivals for r in trace) == n
    assert sum(r.emitted for r in trace) == outputs  # every token, once
    assert sum(r.finished for r in trace) == n
    # no preemption (the cache is large): every prompt token is computed once, and every output token but
    # each request's last is decoded once
    assert sum(r.prefill_tokens for r in trace) == sum(p for p, _ in shapes)
    assert sum(r.decodes for r in trace) == outputs - n
    assert trace[0].after_idle and trace[0].arrivals == 3
    assert max(r.decodes for r in trace) <= LIMITS.max_num_seqs
    for prev, r in itertools.pairwise(trace):
        assert prev.end <= r.start <= r.end  # steps run one after another on the loop's clock
        assert not r.after_idle  # work was waiting at every step: the loop never went idle
    for r in trace:
        assert 0 < r.engine_s <= r.end - r.start and r.engine_cpu_s > 0
    assert StepRecord.fields()[:2] == ["start", "end"]


def test_the_pod_serves_its_steps_at_debug_batches(engine: ReferenceEngine) -> None:
    from fastapi.testclient import TestClient

    from capsim.core.service import PodConfig, create_app

    cfg = PodConfig(device="cpu", warmup=False, batch_mode="continuous", num_blocks=64, max_num_seqs=4,
                    max_model_len=96)
    with TestClient(create_app(cfg, engine=engine)) as client:
        assert client.get("/debug/batches").json()["batches"] == []
        r = client.post("/v1/sessions/t-1/turns", json={"prompt_tokens": 5, "max_new_tokens": 4})
        assert r.status_code == 200, r.text
        body = client.get("/debug/batches").json()
    assert body["fields"] == StepRecord.fields()
    steps = [dict(zip(body["fields"], b, strict=True)) for b in body["batches"]]
    assert len(steps) == 4 and sum(s["emitted"] for s in steps) == 4 and steps[0]["arrivals"] == 1
    assert steps[0]["prefill_tokens"] == 5 and [s["decodes"] for s in steps[1:]] == [1, 1, 1]

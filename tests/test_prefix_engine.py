"""Prefix caching in the real engine: a hit reuses cached KV, computes fewer tokens, and changes no output."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from capsim.core.continuous import ContinuousEngine
from capsim.core.engine import GenerationRequest, ReferenceEngine
from capsim.policy.scheduling import SchedulerLimits

LIMITS = SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=64, block_size=4, num_blocks=256, max_model_len=256,
                         enable_prefix_caching=True)


@pytest.fixture(scope="module")
def engine() -> ReferenceEngine:
    return ReferenceEngine("tiny", device="cpu", dtype="float32", seed=3, threads=1)


def shared(engine: ReferenceEngine) -> tuple[GenerationRequest, GenerationRequest, GenerationRequest]:
    base = engine.request(40, 6, salt=1).prompt
    other = engine.request(40, 6, salt=2).prompt
    first = GenerationRequest(list(base), 6)
    # the same 33-token prefix (8 full blocks of 4), then a different tail
    second = GenerationRequest(list(base[:33]) + list(other[:7]), 6)
    third = GenerationRequest(list(base), 6)  # the whole prompt again: capped one token short
    return first, second, third


def run_one_by_one(ce: ContinuousEngine, reqs: list[GenerationRequest]) -> tuple[list[list[int]], list[int]]:
    """Each request after the previous one ended; the tokens each first step computed."""
    outs, first_step = [], []
    for i, r in enumerate(reqs):
        assert ce.add(i, r) is None
        report = ce.step()
        first_step.append(report.scheduled_tokens)
        while ce.has_work:
            ce.step()
        outs.append(ce.results.pop(i))
    return outs, first_step


def test_a_hit_gives_the_same_greedy_output_and_computes_only_the_rest(engine: ReferenceEngine) -> None:
    reqs = list(shared(engine))
    on = ContinuousEngine(engine, LIMITS)
    off = ContinuousEngine(engine, replace(LIMITS, enable_prefix_caching=False))
    got_on, steps_on = run_one_by_one(on, reqs)
    got_off, steps_off = run_one_by_one(off, reqs)
    assert got_on == got_off == [engine.generate([r])[0].tokens for r in reqs]
    assert steps_off == [40, 40, 40]
    # 2nd: 8 blocks (32 tokens) hit, 8 computed; 3rd: 9 blocks of the first's 10, then decode-time blocks
    assert steps_on == [40, 8, 4]
    assert on.scheduler.prefix_hit_tokens == 32 + 36
    assert set(on.kv_blocks) == set(on.scheduler.pool.users)  # type: ignore[union-attr]


def test_blocks_completed_while_decoding_are_cached_too(engine: ReferenceEngine) -> None:
    p = engine.request(10, 12, salt=4).prompt
    ce = ContinuousEngine(engine, LIMITS)
    (out,), _ = run_one_by_one(ce, [GenerationRequest(list(p), 12)])
    # the follow-up turn re-sends the prompt and the answer: 21 stored tokens, 5 full blocks cached
    follow = GenerationRequest(list(p) + out + [7, 8, 9], 4)
    ce.add(1, follow)
    assert ce.step().plan.cached == {1: 20}
    while ce.has_work:
        ce.step()
    assert ce.results.pop(1) == engine.generate([follow])[0].tokens


def test_evicted_blocks_leave_the_kv_store_and_concurrent_hits_stay_exact(engine: ReferenceEngine) -> None:
    reqs = [engine.request(30, 5, salt=k) for k in range(6)]
    # a small cache: blocks are evicted and preempted requests find their own blocks again
    lim = replace(LIMITS, num_blocks=24, max_num_batched_tokens=32)
    ce = ContinuousEngine(engine, lim)
    got = ce.generate(reqs + reqs)
    assert got == [engine.generate([r])[0].tokens for r in reqs] * 2
    pool = ce.scheduler.pool
    assert pool is not None and len(pool.users) <= lim.num_blocks
    assert set(ce.kv_blocks) == set(pool.users)
    assert ce.scheduler.prefix_hit_tokens > 0


def test_a_hits_rest_computed_on_its_cached_context_gives_the_keys_a_full_prefill_does(
        engine: ReferenceEngine) -> None:
    # greedy tokens of the tiny random model barely depend on far context, so compare the KV itself
    _, second, _ = shared(engine)
    first = GenerationRequest(list(second.prompt[:33]) + [5] * 7, 1)
    caches = []
    for lim in (LIMITS, replace(LIMITS, enable_prefix_caching=False)):
        ce = ContinuousEngine(engine, lim)
        run_one_by_one(ce, [first])
        ce.add(1, second)
        report = ce.step()  # with caching: 32 tokens loaded, 8 computed on them; without: all 40
        assert report.scheduled_tokens == (8 if lim.enable_prefix_caching else 40)
        a = ce.active[1]
        assert a.k is not None and a.v is not None
        caches.append([t[0, :, :40].clone() for t in a.k + a.v])
    for hit, full in zip(*caches, strict=True):
        torch.testing.assert_close(hit, full)


def test_each_answer_says_how_many_prompt_tokens_its_admission_reused(engine: ReferenceEngine) -> None:
    import asyncio

    from capsim.core.continuous_batcher import ContinuousBatcher

    first, second, third = shared(engine)

    async def main() -> list[int | None]:
        async with ContinuousBatcher(engine, LIMITS, queue_capacity=8) as b:
            return [(await b.submit(r)).cached_tokens for r in (first, second, third)]

    # one after another: none for the first, 8 blocks of 4 for the second, 9 for the whole prompt again
    assert asyncio.run(main()) == [0, 32, 36]


def test_a_hits_kv_copy_is_reported_as_part_of_its_step(engine: ReferenceEngine) -> None:
    p = list(engine.request(40, 1, salt=9).prompt)
    ce = ContinuousEngine(engine, LIMITS)
    ce.add(0, GenerationRequest(p, 1))
    miss = ce.step()
    assert not miss.plan.cached and miss.hit_copy_s == 0.0
    while ce.has_work:
        ce.step()
    ce.add(1, GenerationRequest([*p, 5, 6], 1))
    hit = ce.step()
    assert hit.plan.cached == {1: 40} and 0.0 < hit.hit_copy_s <= hit.seconds

"""The reference engine: batched greedy generation equals solo generation, timings are real."""

import asyncio

import pytest
import torch

from capsim.core.batcher import DynamicBatcher
from capsim.core.engine import (
    PRESETS,
    GenerationRequest,
    ModelConfig,
    ReferenceEngine,
    synthetic_prompt,
)
from capsim.model.settings import BatchSettings


@pytest.fixture(scope="module")
def engine() -> ReferenceEngine:
    return ReferenceEngine("tiny", device="cpu", seed=0)


def test_batched_greedy_equals_solo_generation(engine):
    shapes = [(5, 8), (17, 4), (3, 12), (30, 6), (1, 1)]
    reqs = [engine.request(p, n, salt=i) for i, (p, n) in enumerate(shapes)]
    batched = engine.generate(reqs)
    for req, got in zip(reqs, batched, strict=True):
        alone = engine.generate([req])[0]
        assert got.tokens == alone.tokens
        assert len(got.tokens) == req.max_new_tokens
        assert got.batch_size == len(reqs) and alone.batch_size == 1


def test_same_seed_same_weights_and_tokens():
    a = ReferenceEngine("tiny", device="cpu", seed=3)
    b = ReferenceEngine("tiny", device="cpu", seed=3)
    c = ReferenceEngine("tiny", device="cpu", seed=4)
    req = a.request(12, 6)
    assert a.generate([req])[0].tokens == b.generate([req])[0].tokens
    assert any(
        not torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters(), strict=True)
    )


def test_timings_are_ordered_and_per_request(engine):
    reqs = [engine.request(8, 3), engine.request(8, 9)]
    short, long_ = engine.generate(reqs)
    assert 0 < short.first_token_s <= short.total_s <= long_.total_s
    assert short.first_token_s == long_.first_token_s  # one prefill for the whole batch
    assert len(long_.token_times_s) == 9
    assert long_.token_times_s == sorted(long_.token_times_s)


def test_empty_batch_and_bad_requests(engine):
    assert engine.generate([]) == []
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        GenerationRequest((1, 2), 0)
    with pytest.raises(ValueError, match="at least one token"):
        GenerationRequest((), 3)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate([engine.request(4000, 200)])


def test_config_and_constructor_validation():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        ModelConfig("x", 10, 10, 1, 3, 10, 10)
    with pytest.raises(ValueError, match="ModelConfig.n_layers must be >= 1"):
        ModelConfig("x", 10, 12, 0, 3, 10, 10)
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        ReferenceEngine("huge")
    with pytest.raises(ValueError, match="needs a GPU"):
        ReferenceEngine("tiny", device="cpu", dtype="float16")
    assert PRESETS["gpt2-small"].d_model == 768


def test_synthetic_prompt_is_deterministic_and_in_vocab():
    p = synthetic_prompt(50, 512, salt=2)
    assert p == synthetic_prompt(50, 512, salt=2)
    assert p != synthetic_prompt(50, 512, salt=3)
    assert all(0 <= t < 512 for t in p)


async def test_engine_runner_batches_concurrent_requests_off_the_loop(engine):
    settings = BatchSettings(max_batch_size=4, max_wait_ms=1_000_000)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async with DynamicBatcher(engine.runner(), settings) as batcher:
        t = asyncio.create_task(ticker())
        reqs = [engine.request(32, 64, salt=i) for i in range(4)]
        results = await asyncio.gather(*[batcher.submit(r) for r in reqs])
        t.cancel()
    assert [r.batch_size for r in results] == [4] * 4
    assert [r.tokens for r in results] == [engine.generate([r])[0].tokens for r in reqs]
    assert ticks > 10  # the loop kept running while the model worked in a thread

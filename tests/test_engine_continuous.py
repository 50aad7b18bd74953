"""The real engine in continuous mode: greedy output equals generating each request alone, preempted or not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from capsim.core.continuous import ContinuousEngine
from capsim.core.continuous_forward import Row, forward_alone, forward_padded, forward_split
from capsim.core.engine import GenerationRequest, ReferenceEngine
from capsim.policy.scheduling import Rejection, SchedulerLimits


@pytest.fixture(scope="module")
def engine() -> ReferenceEngine:
    return ReferenceEngine("tiny", device="cpu", dtype="float32", seed=3, threads=1)


def alone(engine: ReferenceEngine, r: GenerationRequest) -> list[int]:
    return engine.generate([r])[0].tokens


REQUESTS = [(37, 9), (5, 14), (60, 3), (1, 12), (23, 1), (48, 10), (12, 16)]


def make(engine: ReferenceEngine) -> list[GenerationRequest]:
    return [engine.request(p, o, salt=k) for k, (p, o) in enumerate(REQUESTS)]


def test_continuous_batching_equals_each_request_alone(engine: ReferenceEngine) -> None:
    reqs = make(engine)
    ce = ContinuousEngine(engine, SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
                                                  num_blocks=256, max_model_len=256,
                                                  long_prefill_token_threshold=16))
    got = ce.generate(reqs)
    assert got == [alone(engine, r) for r in reqs]
    assert ce.scheduler.steps > max(o for _, o in REQUESTS)  # chunks and admission took extra steps


def test_preempted_and_recomputed_requests_still_equal_each_alone(engine: ReferenceEngine) -> None:
    reqs = make(engine)
    # 20 blocks of 4 tokens: the longest request alone needs 18; together they must preempt
    ce = ContinuousEngine(engine, SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=64, block_size=4,
                                                  num_blocks=20, max_model_len=256))
    got = ce.generate(reqs)
    assert ce.scheduler.num_preemptions > 0
    assert got == [alone(engine, r) for r in reqs]


def test_tokens_stream_as_they_are_made_and_unservable_requests_are_refused(engine: ReferenceEngine) -> None:
    seen: list[tuple[int, int]] = []
    r = GenerationRequest(engine.request(8, 5).prompt, 5, on_token=lambda i, tok, s: seen.append((i, tok)))
    ce = ContinuousEngine(engine, SchedulerLimits(max_num_seqs=2, max_num_batched_tokens=16, block_size=4,
                                                  num_blocks=8, max_model_len=64))
    big = engine.request(40, 30)
    out = ce.generate([r, big])
    assert out[1] is Rejection.TOO_LONG
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4] and [tok for _, tok in seen] == out[0] == alone(engine, r)
    with pytest.raises(ValueError, match="max_model_len"):
        ContinuousEngine(engine, SchedulerLimits(max_model_len=10**6))


def test_the_async_batcher_answers_concurrent_requests_as_each_alone(engine: ReferenceEngine) -> None:
    import asyncio

    from capsim.core.batcher import BatcherClosedError, QueueFullError
    from capsim.core.continuous_batcher import ContinuousBatcher

    reqs = make(engine)
    limits = SchedulerLimits(max_num_seqs=3, max_num_batched_tokens=48, block_size=4, num_blocks=40,
                             max_model_len=128)

    async def main() -> None:
        async with ContinuousBatcher(engine, limits, queue_capacity=64) as b:
            results = await asyncio.gather(*(b.submit(r) for r in reqs))
            assert [res.tokens for res in results] == [alone(engine, r) for r in reqs]
            for res, r in zip(results, reqs, strict=True):
                assert res.prompt_tokens == len(r.prompt) and len(res.token_times_s) == r.max_new_tokens
                assert 0 < res.first_token_s <= res.total_s and 1 <= res.batch_size <= 3
            with pytest.raises(ValueError, match="longer_than_max_model_len"):
                await b.submit(engine.request(120, 20))
        with pytest.raises(BatcherClosedError):
            await b.submit(reqs[0])
        async with ContinuousBatcher(engine, limits, queue_capacity=1) as small:
            # the second submit runs before the step loop has taken the first: the queue is full
            first, second = await asyncio.gather(small.submit(reqs[0]), small.submit(reqs[1]),
                                                 return_exceptions=True)
            assert isinstance(second, QueueFullError)
            assert not isinstance(first, BaseException) and first.tokens == alone(engine, reqs[0])

    asyncio.run(main())


def test_a_pod_with_capsim_batch_mode_continuous_serves_turns_and_streams(tmp_path: Path) -> None:
    import json

    import httpx

    from capsim.core.service import PodConfig
    from capsim.studies.pods import PodProcess

    cfg = PodConfig.from_env({"CAPSIM_BATCH_MODE": "continuous", "CAPSIM_NUM_BLOCKS": "64",
                              "CAPSIM_MAX_MODEL_LEN": "300"})
    assert cfg.batch_mode == "continuous" and cfg.scheduler_limits().num_blocks == 64
    pod = PodProcess(tmp_path, batch_mode="continuous", num_blocks=256, max_num_seqs=8, max_model_len=200,
                     max_prompt_tokens=256, max_new_tokens=64).start()
    try:
        url = f"{pod.url}/v1/sessions"
        a = httpx.post(f"{url}/c-1/turns", json={"prompt_tokens": 12, "max_new_tokens": 5}, timeout=60)
        assert a.status_code == 200, a.text
        body = a.json()
        assert len(body["tokens"]) == 5 and body["batch_size"] >= 1
        # too long for max_model_len (200) though within the pod's own limits: 413, named
        big = httpx.post(f"{url}/c-2/turns", json={"prompt_tokens": 190, "max_new_tokens": 20}, timeout=60)
        assert big.status_code == 413 and "max_model_len" in big.text
        with httpx.stream("POST", f"{url}/s-1/turns", json={"prompt_tokens": 8, "max_new_tokens": 4, "stream": True},
                          timeout=60) as resp:
            assert resp.status_code == 200
            data = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
        assert [d["index"] for d in data[:-1]] == [0, 1, 2, 3] and [d["token"] for d in data[:-1]] == data[-1]["tokens"]
        text = httpx.get(f"{pod.url}/metrics", timeout=30).text
        for name in ("vllm:num_requests_waiting{", "vllm:num_requests_running{", "vllm:kv_cache_usage_perc{",
                     "vllm:num_preemptions_total{", "vllm:time_to_first_token_seconds_count{",
                     "vllm:inter_token_latency_seconds_count{"):
            assert name in text, name
        ttft = [ln for ln in text.splitlines() if ln.startswith("vllm:time_to_first_token_seconds_count{")]
        itl = [ln for ln in text.splitlines() if ln.startswith("vllm:inter_token_latency_seconds_count{")]
        assert float(ttft[0].split()[-1]) == 2 and float(itl[0].split()[-1]) == 4 + 3  # 2 answers: 5 and 4 tokens
        tokens = {ln.split("{")[0]: float(ln.split()[-1]) for ln in text.splitlines()
                  if ln.startswith(("vllm:prompt_tokens_total{", "vllm:generation_tokens_total{"))}
        assert tokens == {"vllm:prompt_tokens_total": 12 + 8, "vllm:generation_tokens_total": 5 + 4}
        assert 'model_name="tiny"' in ttft[0]
    finally:
        pod.stop()


def _rows(engine: ReferenceEngine, specs: list[tuple[int, int, int]]) -> list[Row]:
    """Rows ``(salt, context, new)``: each with a fresh cache holding its first ``context`` tokens' KV."""
    cfg = engine.config
    rows = []
    for salt, c, n in specs:
        toks = list(engine.request(c + n, 1, salt=salt).prompt)
        shape = (1, cfg.n_heads, c + n + 4, cfg.d_model // cfg.n_heads)
        k = [torch.zeros(shape) for _ in range(cfg.n_layers)]
        v = [torch.zeros(shape) for _ in range(cfg.n_layers)]
        if c:
            forward_alone(engine.model, Row(toks[:c], 0, k, v))
        rows.append(Row(toks[c:], c, k, v))
    return rows


def test_a_mixed_step_split_gives_the_padded_passs_tokens_and_keys_in_place(engine: ReferenceEngine) -> None:
    # decodes at different contexts, a first prefill chunk and a later chunk on a cached context
    specs = [(1, 20, 1), (2, 7, 1), (3, 33, 1), (4, 0, 12), (5, 9, 6), (6, 1, 1)]
    with torch.inference_mode():
        padded, split = _rows(engine, specs), _rows(engine, specs)
        ptrs = [r.k[0].data_ptr() for r in split]
        assert forward_split(engine.model, split) == forward_padded(engine.model, padded)
    for (_, c, n), p, s, ptr in zip(specs, padded, split, ptrs, strict=True):
        assert s.k[0].data_ptr() == ptr  # written in place, never reallocated
        for layer in range(engine.config.n_layers):
            assert s.k[layer][0, :, c : c + n].abs().sum() > 0  # the new keys landed in the row's own cache
            torch.testing.assert_close(s.k[layer], p.k[layer])
            torch.testing.assert_close(s.v[layer], p.v[layer])


def test_steps_that_mix_a_chunk_with_decodes_still_equal_each_alone(engine: ReferenceEngine) -> None:
    reqs = make(engine)
    ce = ContinuousEngine(engine, SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=20, block_size=4,
                                                  num_blocks=256, max_model_len=256,
                                                  long_prefill_token_threshold=8))
    for i, r in enumerate(reqs):
        ce.add(i, r)
    mixed = 0
    while ce.has_work:
        counts = ce.step().plan.num_tokens
        mixed += 1 in counts and max(counts) > 1
    assert mixed >= 3  # the case the split step exists for was exercised
    assert [ce.results[i] for i in range(len(reqs))] == [alone(engine, r) for r in reqs]


def _leaver(loop: Any, tasks: dict[str, Any]) -> Callable[[str, int], Callable[[int, int, float], None]]:
    """``leave(name, index)``: a token callback that cancels task ``name`` as the step making its token ``index``
    runs (queued from the engine's thread, so it lands before the loop sees the step end)."""
    def leave(name: str, index: int) -> Callable[[int, int, float], None]:
        def on_token(i: int, tok: int, s: float) -> None:
            if i == index:
                loop.call_soon_threadsafe(tasks[name].cancel)
        return on_token
    return leave


def test_a_token_made_in_the_step_its_client_left_in_counts_in_no_vllm_metric(engine: ReferenceEngine) -> None:
    """vLLM's output processor drops the output of a request aborted while a step ran: the token that step made
    for it counts in no token counter, gap or first token. Request b's client leaves as the step making its third
    token runs (the cancel is queued from the engine's thread before the step's end is), and a second client as
    the step making its first token runs."""
    import asyncio

    from capsim.core.continuous_batcher import ContinuousBatcher
    from capsim.core.metrics import InferenceMetrics

    limits = SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=64, block_size=4, num_blocks=64,
                             max_model_len=128)
    metrics = InferenceMetrics()

    def counter(name: str) -> float:
        value = metrics.registry.get_sample_value(name, {"model_name": "tiny"})
        return 0.0 if value is None else value

    async def main() -> None:
        tasks: dict[str, asyncio.Task[Any]] = {}
        leave_at = _leaver(asyncio.get_running_loop(), tasks)

        a = engine.request(8, 5, salt=1)
        b = engine.request(12, 6, salt=2)
        c = engine.request(6, 4, salt=3)
        b = GenerationRequest(b.prompt, b.max_new_tokens, on_token=leave_at("b", 2))
        c = GenerationRequest(c.prompt, c.max_new_tokens, on_token=leave_at("c", 0))
        async with ContinuousBatcher(engine, limits, queue_capacity=8, metrics=metrics) as batcher:
            tasks["a"] = asyncio.create_task(batcher.submit(a))
            tasks["b"] = asyncio.create_task(batcher.submit(b))
            tasks["c"] = asyncio.create_task(batcher.submit(c))
            done = await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert len(done[0].tokens) == 5
        assert isinstance(done[1], asyncio.CancelledError) and isinstance(done[2], asyncio.CancelledError)

    asyncio.run(main())
    # a: 5 tokens; b: its first two (the third's step ran as it left); c: none
    assert counter("vllm:generation_tokens_total") == 5 + 2
    assert counter("vllm:prompt_tokens_total") == 8 + 12
    assert counter("vllm:time_to_first_token_seconds_count") == 2
    assert counter("vllm:inter_token_latency_seconds_count") == 4 + 1


def _outcomes(metrics: Any) -> dict[str, float]:
    from capsim.core.metrics import REQUEST_OUTCOMES

    return {o: metrics.registry.get_sample_value("capsim_requests_total", {"outcome": o}) or 0.0
            for o in REQUEST_OUTCOMES}


def test_a_failed_step_fails_the_requests_it_held_and_the_batcher_serves_on(engine: ReferenceEngine) -> None:
    """A step that raises (out of memory, a driver error) fails every request the engine held with that error, at
    once, not at their clients' timeouts (until stop 69 the step loop died with it: every request then and after
    waited for ever); the engine starts again empty and answers the next request as if alone."""
    import asyncio

    from capsim.core.continuous_batcher import ContinuousBatcher
    from capsim.core.metrics import InferenceMetrics

    limits = SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=64, block_size=4, num_blocks=64,
                             max_model_len=128, enable_prefix_caching=True)
    metrics = InferenceMetrics()
    reqs = make(engine)[:3]

    async def main() -> None:
        async with ContinuousBatcher(engine, limits, queue_capacity=8, metrics=metrics) as batcher:
            step = batcher.engine.step
            calls = 0

            def fails_third() -> Any:
                nonlocal calls
                calls += 1
                if calls == 3:
                    raise RuntimeError("CUDA error: out of memory")
                return step()

            batcher.engine.step = fails_third  # type: ignore[method-assign]
            got = await asyncio.wait_for(asyncio.gather(batcher.submit(reqs[0]), batcher.submit(reqs[1]),
                                                        return_exceptions=True), 60)
            assert [str(g) for g in got] == ["CUDA error: out of memory"] * 2
            assert not batcher.engine.scheduler.requests and not batcher.engine.kv_blocks
            again = await asyncio.wait_for(batcher.submit(reqs[2]), 60)
            assert again.tokens == alone(engine, reqs[2])

    asyncio.run(main())
    assert _outcomes(metrics) == {"ok": 1, "failed": 2, "rejected": 0, "cancelled": 0, "closed": 0}


def test_the_continuous_batcher_reports_each_requests_one_outcome(engine: ReferenceEngine) -> None:
    """``capsim_requests_total{outcome}`` as the static batcher counts it: a full queue's refusal is rejected, a
    client that leaves is cancelled wherever its request is (not yet handed to the engine, running, or finishing in
    the step it left in), and a request the pod shuts down under is closed. (Until stop 69 the continuous batcher
    counted its answers only.) A step is held open with a gate in a token callback, so nothing here races."""
    import asyncio
    import threading

    from capsim.core.batcher import BatcherClosedError, QueueFullError
    from capsim.core.continuous_batcher import ContinuousBatcher
    from capsim.core.metrics import InferenceMetrics

    limits = SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=64, block_size=4, num_blocks=64,
                             max_model_len=128)
    metrics = InferenceMetrics()
    shut = InferenceMetrics()  # a second pod's (each registers vLLM's names once)

    async def main() -> None:
        gate = threading.Event()
        held = threading.Event()
        tasks: dict[str, asyncio.Task[Any]] = {}
        leave = _leaver(asyncio.get_running_loop(), tasks)

        def hold(i: int, tok: int, s: float) -> None:  # the engine's thread: hold the step open
            if i == 0:
                held.set()
                gate.wait(60)

        def req(salt: int, n: int, on_token: Callable[[int, int, float], None] | None = None) -> GenerationRequest:
            r = engine.request(6, n, salt=salt)
            return GenerationRequest(r.prompt, n, on_token=on_token)

        async with ContinuousBatcher(engine, limits, queue_capacity=1, metrics=metrics) as batcher:
            ok, full = await asyncio.gather(batcher.submit(req(1, 3)), batcher.submit(req(2, 3)),
                                            return_exceptions=True)
            assert not isinstance(ok, BaseException) and isinstance(full, QueueFullError)
            batcher.queue_capacity = 8
            tasks["run"] = asyncio.create_task(batcher.submit(req(3, 4, leave("run", 1))))  # aborted running
            tasks["end"] = asyncio.create_task(batcher.submit(req(4, 1, leave("end", 0))))  # left in its last step
            for name in ("run", "end"):
                with pytest.raises(asyncio.CancelledError):
                    await tasks[name]
            gate.clear()
            held.clear()
            slow = asyncio.create_task(batcher.submit(req(5, 2, hold)))
            await asyncio.to_thread(held.wait, 60)  # its first step runs, held open
            queued = asyncio.create_task(batcher.submit(req(6, 2)))
            await asyncio.sleep(0.05)  # it is handed over at the next step: cancel it before
            queued.cancel()
            gate.set()
            assert len((await slow).tokens) == 2
            with pytest.raises(asyncio.CancelledError):
                await queued

        closing = ContinuousBatcher(engine, limits, queue_capacity=4, metrics=shut)
        closing.start()
        gate.clear()
        held.clear()
        cut = asyncio.create_task(closing.submit(req(7, 2, hold)))
        await asyncio.to_thread(held.wait, 60)
        await closing.aclose(timeout_s=0.1)  # the step outlasts the grace: the request is closed
        gate.set()
        with pytest.raises(BatcherClosedError):
            await cut

    asyncio.run(main())
    assert _outcomes(metrics) == {"ok": 2, "failed": 0, "rejected": 1, "cancelled": 3, "closed": 0}
    assert _outcomes(shut) == {"ok": 0, "failed": 0, "rejected": 0, "cancelled": 0, "closed": 1}

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


def test_the_trace_keeps_its_last_steps_and_says_how_many_it_dropped_and_since_when(engine: ReferenceEngine) -> None:
    # CAPSIM_TRACE_STEPS bounds the trace; the pod reports the steps that fell off and the oldest it holds, so
    # a reader whose window began before that knows it lacks the window's start (fetch_steps' "truncated")
    from fastapi.testclient import TestClient

    from capsim.core.service import PodConfig, create_app

    cfg = PodConfig(device="cpu", warmup=False, batch_mode="continuous", num_blocks=64, max_num_seqs=4,
                    max_model_len=96, trace_steps=3)
    with TestClient(create_app(cfg, engine=engine)) as client:
        for k in range(2):  # 4 steps each (a prefill, then 3 decodes): 8 steps, 3 kept
            r = client.post(f"/v1/sessions/t-{k}/turns", json={"prompt_tokens": 5, "max_new_tokens": 4})
            assert r.status_code == 200, r.text
        body = client.get("/debug/batches").json()
        steps = [dict(zip(body["fields"], b, strict=True)) for b in body["batches"]]
        assert len(steps) == 3 and body["dropped"] == 5
        assert body["oldest_start"] == steps[0]["start"]
        assert [s["decodes"] for s in steps] == [1, 1, 1]  # the second turn's last three steps
        later = client.get("/debug/batches", params={"since": steps[0]["end"]}).json()
        assert [b[1] for b in later["batches"]] == [s["end"] for s in steps[1:]]  # ended after `since`
        assert later["dropped"] == 5 and later["oldest_start"] == steps[0]["start"]


def test_fetch_steps_says_when_the_pods_trace_lacks_the_windows_start(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from capsim.studies.validate_continuous_calibrate import fetch_steps

    fields = StepRecord.fields()
    rows = [[10.0 + k, 10.5 + k] + [0] * (len(fields) - 2) for k in range(3)]  # steps at 10, 11, 12 s
    asked: list[dict[str, float]] = []

    def answer(dropped: int):  # the pod's answer: it filters on `since` itself
        def get(url: str, params: dict[str, float] | None = None, timeout: float | None = None) -> httpx.Response:
            assert timeout is not None and url.endswith("/debug/batches")
            asked.append(dict(params or {}))
            since = (params or {}).get("since", float("-inf"))
            return httpx.Response(200, json={"fields": fields, "batches": [r for r in rows if r[1] > since],
                                             "dropped": dropped, "oldest_start": rows[0][0]},
                                  request=httpx.Request("GET", url))
        return get

    monkeypatch.setattr(httpx, "get", answer(dropped=7))
    early = fetch_steps("http://pod", 9.0, 20.0)  # the window began before the oldest step kept: steps lost
    assert early.attrs["truncated"] and len(early) == 3 and asked[-1] == {"since": 9.0}
    late = fetch_steps("http://pod", 10.7, 12.0)  # it began after: nothing of it was dropped
    assert not late.attrs["truncated"] and list(late.end) == [11.5]
    whole = fetch_steps("http://pod")  # the whole trace (no `since` sent), which lost 7 steps
    assert whole.attrs["truncated"] and len(whole) == 3 and asked[-1] == {}
    monkeypatch.setattr(httpx, "get", answer(dropped=0))
    assert not fetch_steps("http://pod", 9.0, 20.0).attrs["truncated"]  # nothing dropped: the pod's whole run


def test_the_static_validations_fetch_trace_warns_when_the_batch_trace_lacks_the_windows_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from capsim.studies.validate_calibrate import TraceShortWarning, fetch_trace

    rows = [[10.0 + k, 10.5 + k, 1, [10.0 + k], 0.0, 0.0] for k in range(3)]  # batches started at 10, 11, 12 s

    def answer(dropped: int):
        def get(url: str, timeout: float | None = None, **_: object) -> httpx.Response:
            assert timeout is not None
            return httpx.Response(200, json={"batches": rows, "dropped": dropped, "oldest_start": rows[0][0]},
                                  request=httpx.Request("GET", url))
        return get

    monkeypatch.setattr(httpx, "get", answer(dropped=4))
    with pytest.warns(TraceShortWarning, match="1.5 s into it"):
        assert len(fetch_trace("http://pod", 8.5)) == 3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(fetch_trace("http://pod", 10.5)) == 2  # began after the oldest batch kept: nothing lost
        monkeypatch.setattr(httpx, "get", answer(dropped=0))
        assert len(fetch_trace("http://pod", 8.5)) == 3  # nothing dropped: the pod's whole run

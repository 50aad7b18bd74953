"""The agent pod over real HTTP: turns, streaming, errors, metrics, readiness, SIGTERM drain, store outage."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from capsim.core.service import PodConfig
from podproc import PodProcess


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    p = PodProcess(tmp_path_factory.mktemp("pod"), max_wait_ms=2, max_prompt_tokens=256, max_new_tokens=64).start()
    yield p
    p.stop()


def post(url: str, session: str, body: object, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/sessions/{session}/turns", json=body, timeout=30, **kw)


def test_turns_append_to_the_session(pod):
    first = post(pod.url, "chat-1", {"prompt_tokens": 12, "max_new_tokens": 5})
    assert first.status_code == 200, first.text
    a = first.json()
    assert a["turn"] == 1 and a["version"] == 1 and len(a["tokens"]) == 5
    t = a["timings"]
    assert 0 <= t["queue_s"] <= t["ttft_s"] <= t["total_s"]
    assert a["batch_size"] >= 1
    second = post(pod.url, "chat-1", {"prompt_tokens": [1, 2, 3], "max_new_tokens": 2}).json()
    assert second["turn"] == 2 and second["version"] == 2
    other = post(pod.url, "chat-2", {"prompt_tokens": 4}).json()
    assert other["turn"] == 1


def test_streaming_sends_each_token_then_done(pod):
    with httpx.stream(
        "POST", f"{pod.url}/v1/sessions/stream-1/turns",
        json={"prompt_tokens": 8, "max_new_tokens": 6, "stream": True}, timeout=30,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = []
        event = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    kinds = [e for e, _ in events]
    assert kinds == ["token"] * 6 + ["done"]
    done = events[-1][1]
    assert [d["token"] for _, d in events[:-1]] == done["tokens"]
    assert [d["index"] for _, d in events[:-1]] == list(range(6))


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"prompt_tokens": 10_000}, 413, "over this pod's limit 256"),
        ({"prompt_tokens": 4, "max_new_tokens": 65}, 413, "max_new_tokens 65"),
        ({"prompt_tokens": "many"}, 422, "prompt_tokens"),
        ({"prompt_tokens": 4, "max_new_tokens": 0}, 422, "max_new_tokens"),
        ({"prompt_tokens": 4, "temperature": 1}, 422, "temperature"),
        ({"prompt_tokens": [1, 999_999]}, 422, "token ids must be in [0, 512)"),
        ({"max_new_tokens": 3}, 422, "prompt_tokens"),
    ],
)
def test_bad_requests_get_clear_errors(pod, body, status, needle):
    resp = post(pod.url, "chat-err", body)
    assert resp.status_code == status
    assert needle in resp.json()["detail"]


def test_bad_json_and_bad_session_id(pod):
    resp = httpx.post(f"{pod.url}/v1/sessions/x/turns", content=b"{bad", headers={"content-type": "application/json"})
    assert resp.status_code == 422 and "JSON" in resp.json()["detail"]
    resp = post(pod.url, "a" * 200, {"prompt_tokens": 3})
    assert resp.status_code == 422 and "session_id" in resp.json()["detail"]


def test_health_readiness_and_metrics(pod):
    assert httpx.get(f"{pod.url}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{pod.url}/readyz").json() == {"ready": True}
    post(pod.url, "chat-m", {"prompt_tokens": 3, "max_new_tokens": 2})
    text = httpx.get(f"{pod.url}/metrics").text
    for name in ("capsim_requests_total", "capsim_time_to_first_token_seconds_bucket", "capsim_queue_depth",
                 "capsim_batch_size_bucket", "capsim_state_store_operations_total",
                 "capsim_requests_in_flight", "capsim_gpu_busy_ratio"):
        assert name in text
    ok = [line for line in text.splitlines() if line.startswith('capsim_requests_total{outcome="ok"}')]
    assert ok and float(ok[0].split()[-1]) >= 1


def _http(url: str) -> dict[str, float]:
    """The pod's http_requests_total of the turn route, by status class."""
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('http_requests_total{handler="/v1/sessions/{session_id}/turns",method="POST",status="'):
            out[line.split('status="')[1][:3]] = float(line.split()[-1])
    return out


def test_http_requests_total_counts_each_answer_by_status_class(pod):
    """vLLM's server counter (prometheus-fastapi-instrumentator's, status grouped), which a canary's error rate
    from the pods' own count reads (error_rate_source: pod; capsim export's analysis-template.yaml)."""
    before = _http(pod.url)
    assert set(before) == {"2xx", "4xx", "5xx"}  # published at zero before the first answer of each
    assert post(pod.url, "http-1", {"prompt_tokens": 3, "max_new_tokens": 2}).status_code == 200
    assert post(pod.url, "http-1", {"prompt_tokens": 10_000}).status_code == 413
    assert post(pod.url, "http-2", {"prompt_tokens": "many"}).status_code == 422
    after = _http(pod.url)
    assert {k: after[k] - before[k] for k in after} == {"2xx": 1, "4xx": 2, "5xx": 0}


def test_queue_full_gives_429_with_retry_after(tmp_path):
    p = PodProcess(tmp_path, max_batch_size=1, max_wait_ms=0, queue_capacity=1, overflow="reject").start()
    try:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*[
                    c.post(f"{p.url}/v1/sessions/b{i}/turns", json={"prompt_tokens": 64, "max_new_tokens": 512})
                    for i in range(12)
                ])

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes, codes
        rejected = next(r for r in responses if r.status_code == 429)
        assert int(rejected.headers["retry-after"]) >= 1
        assert "queue is full" in rejected.json()["detail"]
    finally:
        p.stop()


def test_sigterm_drains_in_flight_work_and_exits_zero(tmp_path):
    from test_reliability_pod import wait_in_flight

    p = PodProcess(tmp_path, max_batch_size=4, max_wait_ms=0, drain_timeout_s=30).start()

    async def in_flight() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            tasks = [asyncio.create_task(c.post(f"{p.url}/v1/sessions/d{i}/turns",
                                                json={"prompt_tokens": 64, "max_new_tokens": 512}))
                     for i in range(8)]
            # proof, not hope, that all 8 reached the pod before SIGTERM (its in-flight gauge)
            await asyncio.to_thread(wait_in_flight, p.url, 8)
            p.signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    responses = asyncio.run(in_flight())
    assert [r.status_code for r in responses] == [200] * 8
    assert all(r.json()["turn"] == 1 and len(r.json()["tokens"]) == 512 for r in responses)
    assert p.wait(timeout_s=40) == 0


def test_store_outage_gives_503_fast_and_readiness_false(tmp_path, redis_server_factory):
    server = redis_server_factory()
    p = PodProcess(tmp_path, redis_url=server.url).start()
    try:
        assert post(p.url, "r1", {"prompt_tokens": 4, "max_new_tokens": 2}).status_code == 200
        server.freeze()  # accepting, never answering
        t0 = time.monotonic()
        resp = post(p.url, "r1", {"prompt_tokens": 4, "max_new_tokens": 2})
        elapsed = time.monotonic() - t0
        assert resp.status_code == 503
        assert _http(p.url)["5xx"] == 1  # the pod answered it: in its own error count
        assert "session store unavailable" in resp.json()["detail"]
        assert int(resp.headers["retry-after"]) >= 1
        assert elapsed < 5.0
        time.sleep(1.1)  # past the readiness cache
        assert httpx.get(f"{p.url}/readyz", timeout=10).status_code == 503
        assert httpx.get(f"{p.url}/healthz").status_code == 200  # alive: do not restart it
        server.thaw()
        time.sleep(1.1)
        assert httpx.get(f"{p.url}/readyz", timeout=10).status_code == 200
        resumed = post(p.url, "r1", {"prompt_tokens": 4, "max_new_tokens": 2}).json()
        assert resumed["turn"] == 2  # the acknowledged first turn survived
    finally:
        p.stop()


def test_pod_config_reads_environment_and_names_bad_fields():
    cfg = PodConfig.from_env({"CAPSIM_MAX_BATCH_SIZE": "8", "CAPSIM_REDIS_URL": "redis://x:1/0", "HOME": "/"})
    assert cfg.max_batch_size == 8 and cfg.redis_url == "redis://x:1/0"
    assert cfg.batch_settings().max_batch_size == 8
    assert PodConfig.from_env(cfg.env()) == cfg  # round-trips through the environment
    with pytest.raises(ValueError, match="pod.max_batch_size must be >= 1, got '0'"):
        PodConfig.from_env({"CAPSIM_MAX_BATCH_SIZE": "0"})

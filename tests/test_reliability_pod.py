"""The pod's promises when things go wrong: drain, readiness, idempotent retries, typed store errors, 413/503.

Real pod processes where the promise is about the process (SIGTERM, exit time); the app in this process
(FastAPI's TestClient, or uvicorn on a thread) where the test must reach a state HTTP cannot (a closed
batcher, the instant after SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from capsim.cli import app as cli_app
from capsim.core import service
from capsim.core.continuous import ContinuousEngine
from capsim.core.engine import ReferenceEngine
from capsim.core.service import DRAIN_MARGIN_S, ENGINE_DIED_EXIT, PodConfig, create_app, make_server
from capsim.core.state import open_store
from podproc import PodProcess, free_port

pytestmark = pytest.mark.timeout(180)

LONG = {"prompt_tokens": 64, "max_new_tokens": 2000}  # about 0.6 s of the tiny model on one core (2026-12-06)


def turn_url(base: str, session: str) -> str:
    return f"{base}/v1/sessions/{session}/turns"


def in_flight(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    m = re.search(r"^capsim_requests_in_flight(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    assert m, "capsim_requests_in_flight missing from /metrics"
    return float(m.group(1))


def wait_in_flight(base: str, n: int, timeout_s: float = 30.0) -> None:
    """Block until the pod reports ``n`` requests in flight (proof that they reached it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if in_flight(base) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the pod never had {n} requests in flight (last: {in_flight(base)})")


def assert_503(resp: httpx.Response) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert int(resp.headers["retry-after"]) >= 1
    assert resp.json()["detail"]


# -- drain ---------------------------------------------------------------------------------------


def test_turns_that_outlast_the_drain_get_503_json_and_the_pod_exits_in_time(tmp_path: Any) -> None:
    """8 turns of 2,000 tokens each, one at a time, and a drain budget of 0.5 s: the ones that cannot finish
    get a JSON 503 with Retry-After (never a 500), and the process exits 0 within the budget + margin.
    A turn took 0.8 s on 2026-12-06 (1,500 tokens took 1.1 s on 2026-12-02 and 0.6 s on 2026-12-06: the
    machine's speed varies 2x), so 8 of them need 6 s or so, against a drain of at most 2 x 0.5 s."""
    drain_s = 0.5
    p = PodProcess(tmp_path, max_batch_size=1, max_wait_ms=0, drain_timeout_s=drain_s, torch_threads=1,
                   max_new_tokens=2000).start()
    long = {"prompt_tokens": 64, "max_new_tokens": 2000}  # all 8 are in flight long before one ends

    async def run() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(timeout=60) as c:
            tasks = [asyncio.create_task(c.post(turn_url(p.url, f"drain-{i}"), json=long)) for i in range(8)]
            await asyncio.to_thread(wait_in_flight, p.url, 8)
            p.signal(signal.SIGTERM)
            sent = time.monotonic()
            responses = await asyncio.gather(*tasks)
            code = await asyncio.to_thread(p.wait, 30)
            assert code == 0, p.log()
            return responses, time.monotonic() - sent

    responses, exit_s = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1, codes  # 8 x 0.8 s of serial work cannot fit in the drain (at most 2 x 0.5 s)
    for r in responses:
        if r.status_code == 503:
            assert_503(r)
            assert "drained" in r.json()["detail"]
    assert exit_s <= drain_s + DRAIN_MARGIN_S, f"exit took {exit_s:.2f} s"
    log = p.log()
    assert "Traceback" not in log and "CancelledError" not in log, log


def test_streams_that_outlast_the_drain_end_with_a_503_event(tmp_path: Any) -> None:
    """Streaming turns at SIGTERM: one already streaming, two queued. Each ends with `done`, an `error`
    event of status 503 (the stream had begun), or a JSON 503 with Retry-After (it had not), never a cut
    connection; and the pod exits in time.

    The stream at SIGTERM must outlast the drain whatever the machine's speed: a drain takes at most twice its
    budget (uvicorn waits for open requests up to it, then the batcher's close up to it again), 0.5 s here,
    and a stream of 4,000 tokens (the tiny model's longest) took 3.4 to 4.0 s on 2026-12-02 and 2.3 s on
    2026-12-06 (1,500 tokens, 1.1 s, had let it finish inside a 1 s budget's 2 s: a CI run saw it end `done`)."""
    drain_s = 0.25
    p = PodProcess(tmp_path, max_batch_size=1, max_wait_ms=0, drain_timeout_s=drain_s, torch_threads=1,
                   max_new_tokens=4000).start()
    body = {"prompt_tokens": 64, "max_new_tokens": 4000, "stream": True}  # 2.3-4 s of model time each

    async def stream(c: httpx.AsyncClient, i: int, first: asyncio.Event) -> list[str]:
        events = []
        async with c.stream("POST", turn_url(p.url, f"sd-{i}"), json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                assert_503(resp)
                return ["http 503"]
            async for line in resp.aiter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    first.set()
                elif line.startswith("data: ") and events[-1] == "error":
                    events[-1] = f"error {json.loads(line[6:])['status']}"
        return events

    async def run() -> tuple[list[list[str]], float]:
        async with httpx.AsyncClient(timeout=60) as c:
            streaming = asyncio.Event()
            tasks = [asyncio.create_task(stream(c, i, streaming)) for i in range(3)]
            await asyncio.wait_for(streaming.wait(), 30)  # one is streaming, two wait in the queue
            await asyncio.to_thread(wait_in_flight, p.url, 3)
            p.signal(signal.SIGTERM)
            sent = time.monotonic()
            results = await asyncio.gather(*tasks)
            assert await asyncio.to_thread(p.wait, 30) == 0
            return results, time.monotonic() - sent

    streams, exit_s = asyncio.run(run())
    ends = [events[-1] for events in streams]
    assert set(ends) <= {"done", "error 503", "http 503"}, streams
    assert "error 503" in ends  # the one streaming at SIGTERM needs 2 s more, the drain at most 0.5 s
    assert exit_s <= drain_s + DRAIN_MARGIN_S
    assert "Traceback" not in p.log()


def test_sigterm_makes_the_pod_unready_and_refuse_new_turns() -> None:
    """uvicorn in this process: a long turn is in flight, SIGTERM arrives (the server's own handler),
    and at once /readyz is 503 and a new turn is 503 with Retry-After; the long turn still gets 200."""
    port = free_port()
    config = PodConfig(device="cpu", max_batch_size=1, max_wait_ms=0, drain_timeout_s=20, torch_threads=1,
                       max_new_tokens=4000)
    server = make_server(config, port=port, log_level="warning")
    runner = threading.Thread(target=server.run, daemon=True)
    runner.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    app = server.config.app
    long_result: list[httpx.Response] = []
    sender = threading.Thread(
        target=lambda: long_result.append(httpx.post(
            turn_url(base, "long"), json={"prompt_tokens": 64, "max_new_tokens": 4000}, timeout=60)))  # 2-4 s
    sender.start()
    wait_in_flight(base, 1)

    server.handle_exit(signal.SIGTERM, None)  # what the signal does

    async def probe() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pod") as c:
            return await c.get("/readyz"), await c.post("/v1/sessions/new/turns", json={"prompt_tokens": 4})

    ready, new_turn = asyncio.run_coroutine_threadsafe(probe(), app.state.pod.loop).result(timeout=30)
    assert ready.status_code == 503 and ready.json() == {"ready": False, "reason": "draining"}
    assert_503(new_turn)
    assert "draining" in new_turn.json()["detail"]
    sender.join(timeout=60)
    runner.join(timeout=60)
    assert long_result and long_result[0].status_code == 200  # in flight at SIGTERM: finished
    assert not runner.is_alive()


# -- the app in this process: states HTTP alone cannot reach -------------------------------------


@pytest.fixture(scope="module")
def small_store_client() -> Any:
    """The app with a store whose state cap is 6 KiB (a few long turns)."""
    store = open_store("memory://", max_state_bytes=6 * 1024)
    app = create_app(PodConfig(device="cpu", max_wait_ms=0, warmup=False, torch_threads=1), store=store)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_an_oversized_session_is_413_not_500(small_store_client: TestClient) -> None:
    codes = []
    for _ in range(12):
        r = small_store_client.post("/v1/sessions/big/turns", json={"prompt_tokens": 200, "max_new_tokens": 2})
        codes.append(r.status_code)
        if r.status_code != 200:
            break
    assert codes[0] == 200 and codes[-1] == 413, codes
    assert "over the cap" in r.json()["detail"]


def test_a_closed_batcher_answers_503() -> None:
    app = create_app(PodConfig(device="cpu", warmup=False, torch_threads=1))
    with TestClient(app, raise_server_exceptions=False) as client:
        pod = app.state.pod
        client.portal.call(pod.batcher.aclose)  # the batcher closed while the pod still takes turns
        r = client.post("/v1/sessions/c/turns", json={"prompt_tokens": 4, "max_new_tokens": 2})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
    assert "shutting down" in r.json()["detail"]


def test_a_draining_pod_refuses_turns_and_is_not_ready() -> None:
    app = create_app(PodConfig(device="cpu", warmup=False, torch_threads=1))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/sessions/d/turns", json={"prompt_tokens": 4}).status_code == 200
        app.state.pod.begin_drain()
        r = client.post("/v1/sessions/d/turns", json={"prompt_tokens": 4})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert client.get("/readyz").json() == {"ready": False, "reason": "draining"}


def fail_first_pass(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The engine's first forward pass (static: a batch's generate; continuous: a step) raises, as a GPU out of
    memory would; the passes after it run."""
    cls: Any = ReferenceEngine if mode == "static" else ContinuousEngine
    name = "generate" if mode == "static" else "step"
    real = getattr(cls, name)
    calls = []

    def fails_first(self: Any, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: out of memory")
        return real(self, *args)

    monkeypatch.setattr(cls, name, fails_first)


TURN = {"prompt_tokens": 4, "max_new_tokens": 2}


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_a_failed_forward_pass_kills_the_pod_as_vllms_engine_death_does(monkeypatch: pytest.MonkeyPatch,
                                                                          mode: str) -> None:
    """vLLM's server dies with its engine: the requests it held fail (500), and the API server shuts down
    (``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH`` off). So does the pod: the turn the pass held is 500 naming the error,
    then the pod is unhealthy (the liveness probe restarts it) and unready, and refuses new turns with 503, though
    the engine would run again."""
    fail_first_pass(monkeypatch, mode)
    app = create_app(PodConfig(device="cpu", warmup=False, torch_threads=1, batch_mode=mode))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/healthz").json() == {"status": "alive"}
        r = client.post("/v1/sessions/x/turns", json=TURN)
        assert r.status_code == 500 and "CUDA error: out of memory" in r.json()["detail"], r.text
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json() == {"status": "dead", "reason": "engine died: RuntimeError: CUDA error: out of memory"}
        assert client.get("/readyz").json() == {"ready": False,
                                                 "reason": "engine died: RuntimeError: CUDA error: out of memory"}
        again = client.post("/v1/sessions/y/turns", json=TURN)
        assert again.status_code == 503 and int(again.headers["retry-after"]) >= 1
        assert "engine died" in again.json()["detail"]


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_kept_alive_the_pod_serves_on_after_a_failed_forward_pass(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """``CAPSIM_KEEP_ALIVE_ON_ENGINE_DEATH=true`` (vLLM's ``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH``): the turn the pass
    held still fails, and the next one is answered."""
    fail_first_pass(monkeypatch, mode)
    config = PodConfig.from_env({"CAPSIM_KEEP_ALIVE_ON_ENGINE_DEATH": "true"}, device="cpu", warmup=False,
                                torch_threads=1, batch_mode=mode)
    assert config.keep_alive_on_engine_death
    app = create_app(config)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/v1/sessions/x/turns", json=TURN).status_code == 500
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        assert client.post("/v1/sessions/y/turns", json=TURN).status_code == 200


def test_a_served_pod_whose_engine_died_shuts_down_and_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` on uvicorn in this process: the failed step's turn gets its 500, the server shuts itself down
    with no signal, and ``serve`` ends the process with ``ENGINE_DIED_EXIT`` (1) for the kubelet to restart it."""
    fail_first_pass(monkeypatch, "continuous")
    exits: list[int] = []
    monkeypatch.setattr(service, "_exit_now", exits.append)  # not os._exit: this is the test's process
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # keep the test's handlers (serve and uvicorn set them)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    answers: list[httpx.Response] = []

    def client() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.05)
        answers.append(httpx.post(turn_url(base, "x"), json=TURN, timeout=30))

    sender = threading.Thread(target=client, daemon=True)
    sender.start()
    began = time.monotonic()
    service.serve(PodConfig(device="cpu", batch_mode="continuous", warmup=False, torch_threads=1,
                            drain_timeout_s=5), port=port, log_level="warning")  # returns once the server is down
    sender.join(timeout=30)
    assert answers and answers[0].status_code == 500, answers
    assert exits == [ENGINE_DIED_EXIT] == [1]
    assert time.monotonic() - began < 60


@pytest.mark.parametrize(
    "body",
    [{"prompt_tokens": "16"}, {"prompt_tokens": True}, {"prompt_tokens": 16.0}, {"prompt_tokens": [1, True]},
     {"prompt_tokens": ["1"]}, {"prompt_tokens": 4, "max_new_tokens": "4"},
     {"prompt_tokens": 4, "max_new_tokens": False}, {"prompt_tokens": 4, "stream": "yes"}, {"prompt_tokens": None}],
    ids=repr,
)
def test_strings_and_booleans_are_not_token_counts(small_store_client: TestClient, body: dict[str, Any]) -> None:
    r = small_store_client.post("/v1/sessions/strict/turns", json=body)
    assert r.status_code == 422, r.text
    field = next(k for k in body if k != "prompt_tokens" or len(body) == 1)
    assert field in r.json()["detail"]


# -- idempotent retries --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Any:
    p = PodProcess(tmp_path_factory.mktemp("relpod"), max_wait_ms=0, torch_threads=1, max_new_tokens=2000).start()
    yield p
    p.stop()


def test_a_retried_turn_with_the_same_idempotency_key_is_stored_once(pod: PodProcess) -> None:
    """The client gives up after 0.1 s and retries with the same key. Whether the abandoned attempt was
    still running when the retry came (the usual case: the turn takes ~0.6 s here) or had already ended
    (a fast machine), the session holds the turn once and every attempt answers the same."""
    session, key = f"idem-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    headers = {"Idempotency-Key": key}
    with contextlib.suppress(httpx.TimeoutException):  # the client gave up; the pod goes on with the turn
        httpx.post(turn_url(pod.url, session), json=LONG, headers=headers, timeout=0.1)
    retry = httpx.post(turn_url(pod.url, session), json=LONG, headers=headers, timeout=60)
    assert retry.status_code == 200, retry.text
    first = retry.json()
    assert first["turn"] == 1 and first["version"] == 1
    again = httpx.post(turn_url(pod.url, session), json=LONG, headers=headers, timeout=60)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["tokens"] == first["tokens"]
    assert again.json()["turn"] == 1 and again.json()["version"] == 1
    # the session holds one turn: the next one is turn 2
    nxt = httpx.post(turn_url(pod.url, session), json={"prompt_tokens": 4, "max_new_tokens": 1}, timeout=60)
    assert nxt.json()["turn"] == 2 and nxt.json()["version"] == 2


def test_two_attempts_of_one_turn_at_once_store_it_once(pod: PodProcess) -> None:
    """Two attempts with the same key sent together (a client that retried on another connection while
    the first was running): both run the model, one writes, the other finds the key at its
    compare-and-set and answers what the first stored. No timing is assumed: overlapping or not, the
    promise is the same."""
    session, key = f"idem2-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    headers = {"Idempotency-Key": key}

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            return list(await asyncio.gather(
                *(c.post(turn_url(pod.url, session), json=LONG, headers=headers) for _ in range(2))))

    a, b = asyncio.run(both())
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json()["tokens"] == b.json()["tokens"]
    assert a.json()["turn"] == b.json()["turn"] == 1 and a.json()["version"] == b.json()["version"] == 1
    nxt = httpx.post(turn_url(pod.url, session), json={"prompt_tokens": 4, "max_new_tokens": 1}, timeout=60)
    assert nxt.json()["turn"] == 2 and nxt.json()["version"] == 2


def test_without_a_key_a_retry_is_a_new_turn(pod: PodProcess) -> None:
    session = f"nokey-{uuid.uuid4().hex[:8]}"
    a = httpx.post(turn_url(pod.url, session), json={"prompt_tokens": 4, "max_new_tokens": 1}, timeout=60)
    b = httpx.post(turn_url(pod.url, session), json={"prompt_tokens": 4, "max_new_tokens": 1}, timeout=60)
    assert (a.json()["turn"], b.json()["turn"]) == (1, 2)


@pytest.mark.parametrize("key", ["", "a b", "x" * 257, "é"])
def test_a_bad_idempotency_key_is_422(pod: PodProcess, key: str) -> None:
    r = httpx.post(turn_url(pod.url, "k"), json={"prompt_tokens": 4}, headers={"Idempotency-Key": key.encode()},
                   timeout=30)
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["detail"]


# -- typed store errors --------------------------------------------------------------------------


def test_a_store_error_is_json_naming_the_key(tmp_path: Any, redis_server: Any) -> None:
    p = PodProcess(tmp_path, redis_url=redis_server.url, torch_threads=1).start()
    try:
        session = f"wrongtype-{uuid.uuid4().hex[:8]}"

        async def plant() -> None:
            async with open_store(redis_server.url) as store:
                await store.client.lpush(store.key(session), "a list, not a session")

        asyncio.run(plant())
        r = httpx.post(turn_url(p.url, session), json={"prompt_tokens": 4}, timeout=30)
        assert r.status_code == 500 and r.headers["content-type"].startswith("application/json")
        assert f"capsim:session:{session}" in r.json()["detail"] and "not a string" in r.json()["detail"]
    finally:
        p.stop()


# -- capsim serve checks its arguments first -----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--model", "gpt5"], "--model"), (["--dtype", "float8"], "--dtype"), (["--device", "tpu"], "--device"),
     (["--port", "70000"], "--port"), (["--redis-url", "redis://h:1/abc"], "--redis-url"),
     (["--redis-url", "http://h"], "--redis-url")],
)
def test_serve_checks_its_arguments_before_loading(args: list[str], needle: str) -> None:
    result = CliRunner().invoke(cli_app, ["serve", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output

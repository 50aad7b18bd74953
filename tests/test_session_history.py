"""The pod prefills a session's stored history + the new message: prompt lengths, expiry, a store outage."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from capsim.core.engine import GenerationRequest, ReferenceEngine
from capsim.core.service import PodConfig, create_app
from capsim.core.session_history import HistoryTooLongError, fit_history, message_tokens
from capsim.core.state import SessionState, StoreUnavailableError, open_store
from capsim.core.state_model import Message


@pytest.fixture(scope="module")
def engine() -> ReferenceEngine:
    return ReferenceEngine("tiny", device="cpu", seed=0)


class Switchable:
    """A real in-memory store that a test can take down: every call then raises StoreUnavailableError."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailableError("redis at memory:// did not answer within 1.5 s (test outage)")

    async def get(self, session_id: str) -> SessionState | None:
        self._check()
        return await self.inner.get(session_id)  # type: ignore[no-any-return]

    async def put(self, state: SessionState) -> SessionState:
        self._check()
        return await self.inner.put(state)  # type: ignore[no-any-return]

    async def update(self, session_id: str, fn: Callable[..., SessionState], **kw: Any) -> SessionState:
        self._check()
        return await self.inner.update(session_id, fn, **kw)  # type: ignore[no-any-return]

    async def delete(self, session_id: str) -> bool:
        return await self.inner.delete(session_id)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        await self.inner.aclose()


def client_for(engine: ReferenceEngine, store: Any = None, **config: Any) -> TestClient:
    cfg = PodConfig(device="cpu", max_wait_ms=0, warmup=False, **config)
    return TestClient(create_app(cfg, engine=engine, store=store), raise_server_exceptions=False)


def turn(client: TestClient, session: str, prompt: int | list[int], new: int) -> dict[str, Any]:
    resp = client.post(f"/v1/sessions/{session}/turns", json={"prompt_tokens": prompt, "max_new_tokens": new})
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def metric(client: TestClient, name: str) -> float:
    text = client.get("/metrics").text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_turn_three_prefills_turns_one_and_two(engine: ReferenceEngine, mode: str) -> None:
    with client_for(engine, batch_mode=mode) as client:
        one = turn(client, "s1", 10, 3)
        two = turn(client, "s1", [1, 2, 3, 4], 4)
        three = turn(client, "s1", [5, 6, 7, 8, 9], 2)
    assert one["history"]["prompt_tokens"] == 10 and one["history"]["source"] == "fresh"
    assert two["history"]["prompt_tokens"] == 10 + 3 + 4
    h = three["history"]
    assert h["source"] == "store" and h["history_tokens"] == 10 + 3 + 4 + 4
    assert h["prompt_tokens"] == 10 + 3 + 4 + 4 + 5  # what the engine saw
    assert three["turn"] == 3
    # the very tokens: turn 3's answer is the model's answer to the whole conversation so far
    prompt1 = engine.request(10, 1).prompt
    whole = (*prompt1, *one["tokens"], 1, 2, 3, 4, *two["tokens"], 5, 6, 7, 8, 9)
    assert engine.generate([GenerationRequest(whole, 2)])[0].tokens == three["tokens"]


def test_streamed_turns_prefill_the_history_too(engine: ReferenceEngine) -> None:
    with client_for(engine) as client:
        turn(client, "st", 6, 2)
        with client.stream("POST", "/v1/sessions/st/turns",
                           json={"prompt_tokens": [3, 4], "max_new_tokens": 3, "stream": True}) as resp:
            assert resp.status_code == 200
            body = "".join(resp.iter_text())
        assert "event: done" in body
        assert metric(client, "capsim_session_history_tokens_total") == 6 + 2
        third = turn(client, "st", [1], 1)
    assert third["history"]["history_tokens"] == 6 + 2 + 2 + 3  # the stream stored [3, 4], not the history


def test_an_expired_session_starts_fresh_and_is_counted(engine: ReferenceEngine) -> None:
    # a TTL of 2 s: two turns one after the other fall within it on a loaded machine too (0.3 s did not promise it)
    store = open_store("memory://", sliding_ttl_s=2.0)
    with client_for(engine, store=store) as client:
        turn(client, "ttl", 8, 2)
        kept = turn(client, "ttl", 4, 2)  # within the TTL: the history is there
        assert kept["history"]["history_tokens"] == 10
        time.sleep(3.0)  # > 2 s idle: the store drops the session
        fresh = turn(client, "ttl", 4, 2)
        assert fresh["turn"] == 1 and fresh["history"]["source"] == "fresh"
        assert fresh["history"]["fresh_reason"] == "expired" and fresh["history"]["prompt_tokens"] == 4
        assert metric(client, 'capsim_session_fresh_starts_total{reason="expired"}') == 1
        assert metric(client, 'capsim_session_fresh_starts_total{reason="new"}') == 1


def test_the_pods_session_ttl_comes_from_its_config(engine: ReferenceEngine) -> None:
    cfg = PodConfig.from_env({"CAPSIM_SESSION_TTL_S": "2"})
    assert cfg.session_ttl_s == 2.0 and PodConfig.from_env(cfg.env()) == cfg
    with client_for(engine, session_ttl_s=cfg.session_ttl_s) as client:  # the pod opens its own store
        turn(client, "cfg-ttl", 8, 2)
        assert turn(client, "cfg-ttl", 4, 2)["history"]["history_tokens"] == 10  # within 2 s: kept
        time.sleep(3.0)  # idle past the TTL: the store drops the session
        fresh = turn(client, "cfg-ttl", 4, 2)
    assert fresh["turn"] == 1 and fresh["history"]["fresh_reason"] == "expired"


def test_store_outage_serve_local_serves_from_the_copy_at_risk(
    engine: ReferenceEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPSIM_ON_UNAVAILABLE", "serve_local")
    store = Switchable(open_store("memory://"))
    with client_for(engine, store=store) as client:
        turn(client, "out", 8, 2)
        store.down = True
        local = turn(client, "out", 4, 2)
        assert local["history"]["source"] == "local" and local["history"]["at_risk"] is True
        assert local["history"]["history_tokens"] == 10 and local["turn"] == 2
        again = turn(client, "out", 4, 2)  # the local copy holds the turn served locally
        assert again["history"]["history_tokens"] == 16 and again["history"]["at_risk"] is True
        unknown = client.post("/v1/sessions/never-seen/turns", json={"prompt_tokens": 4})
        assert unknown.status_code == 503 and "no local copy" in unknown.json()["detail"]
        ready = client.get("/readyz")  # still serving: the pod stays in the Service's endpoints
        assert ready.status_code == 200 and "serving local copies" in ready.json()["store"]
        assert metric(client, "capsim_session_local_writes_total") == 2
        store.down = False
        back = turn(client, "out", 4, 2)  # the store's history wins; the local turns are counted lost
        assert back["history"]["source"] == "store" and back["history"]["history_tokens"] == 10
        assert back["history"]["at_risk"] is False
        assert metric(client, "capsim_session_local_turns_lost_total") == 2


def test_store_outage_fail_is_a_503_with_the_reason(engine: ReferenceEngine) -> None:
    store = Switchable(open_store("memory://"))
    with client_for(engine, store=store) as client:
        turn(client, "f", 8, 2)
        store.down = True
        resp = client.post("/v1/sessions/f/turns", json={"prompt_tokens": 4})
        ready = client.get("/readyz")
    assert ready.status_code == 503 and "session store unavailable" in ready.json()["reason"]
    assert resp.status_code == 503 and resp.headers["Retry-After"]
    assert "session store unavailable" in resp.json()["detail"]
    assert "on_unavailable=fail" in resp.json()["detail"]


def test_long_history_drops_oldest_turns_or_rejects(engine: ReferenceEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    with client_for(engine, max_prompt_tokens=40) as client:
        turn(client, "long", 20, 4)
        turn(client, "long", 10, 2)
        cut = turn(client, "long", 8, 2)  # 20+4+10+2+8 = 44 > 40: the first turn goes
        assert cut["history"]["dropped_messages"] == 2 and cut["history"]["prompt_tokens"] == 10 + 2 + 8
    monkeypatch.setenv("CAPSIM_HISTORY_OVERFLOW", "reject")
    with client_for(engine, max_prompt_tokens=40) as client:
        turn(client, "long", 20, 4)
        turn(client, "long", 10, 2)
        resp = client.post("/v1/sessions/long/turns", json={"prompt_tokens": 8, "max_new_tokens": 2})
    assert resp.status_code == 413 and "history_overflow=reject" in resp.json()["detail"]


def test_message_tokens_are_read_back_from_the_content() -> None:
    assert message_tokens(Message(role="user", content="1 2 511", tokens=3), 512) == (1, 2, 511)
    text = Message(role="user", content="hello there", tokens=5)
    assert len(message_tokens(text, 512)) == 5
    assert message_tokens(text, 512) == message_tokens(Message(role="user", content="hello there", tokens=5), 512)
    assert message_tokens(text, 512) != message_tokens(Message(role="user", content="hello here", tokens=5), 512)
    assert message_tokens(Message(role="user", content="", tokens=0), 512) == ()


def test_fit_history_drops_whole_turns_from_the_front() -> None:
    msgs = [(1,) * 5, (2,) * 3, (3,) * 4, (4,) * 2]
    assert fit_history(msgs, (9,), 100) == ((1,) * 5 + (2,) * 3 + (3,) * 4 + (4,) * 2 + (9,), 0)
    assert fit_history(msgs, (9,), 8) == ((3,) * 4 + (4,) * 2 + (9,), 2)
    assert fit_history(msgs, (9,) * 3, 3) == ((9,) * 3, 4)
    with pytest.raises(HistoryTooLongError):
        fit_history(msgs, (9,) * 4, 3)



def test_a_second_turn_on_the_same_pod_reuses_the_first_turns_kv(engine: ReferenceEngine) -> None:
    hits = 'vllm:prefix_cache_hits_total{model_name="tiny"}'
    queries = 'vllm:prefix_cache_queries_total{model_name="tiny"}'
    with client_for(engine, batch_mode="continuous", block_size=16, enable_prefix_caching=True) as client:
        one = turn(client, "pc", 40, 8)
        after_one = metric(client, hits), metric(client, queries)
        two = turn(client, "pc", 8, 4)
        after_two = metric(client, hits), metric(client, queries)
        other = turn(client, "pc-other", [(3 * i + 1) % 512 for i in range(56)], 4)  # as long, nothing shared
        after_other = metric(client, hits)
    assert after_one[0] == 0 and one["history"]["prompt_tokens"] == 40
    assert two["history"]["prompt_tokens"] == 40 + 8 + 8 and after_two[1] - after_one[1] == 56
    # turn 2 reuses turn 1's full blocks (its prompt's at least: 32 of 40 tokens; its answer's where
    # the engine hashed the blocks it completed), so its prefill computes the rest only
    hit = after_two[0] - after_one[0]
    assert 32 <= hit < 56
    assert after_other == after_two[0]  # a prompt sharing no block gets no hit
    # the greedy answer is the model's answer to the whole conversation, cache or not
    whole = (*engine.request(40, 1).prompt, *one["tokens"], *engine.request(8, 1).prompt)
    assert engine.generate([GenerationRequest(whole, 4)])[0].tokens == two["tokens"]
    assert other["turn"] == 1


def test_real_redis_killed_serve_local_keeps_serving_the_session(
    engine: ReferenceEngine, redis_server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPSIM_ON_UNAVAILABLE", "serve_local")
    server = redis_server_factory()
    with client_for(engine, redis_url=server.url) as client:
        turn(client, "rk", 8, 2)
        server.kill()
        t0 = time.monotonic()
        local = turn(client, "rk", 4, 2)
        assert time.monotonic() - t0 < 10  # the store's deadlines, not a hang
        assert local["history"]["source"] == "local" and local["history"]["at_risk"] is True
        assert local["history"]["history_tokens"] == 10
        other = client.post("/v1/sessions/rk-other/turns", json={"prompt_tokens": 4})
        assert other.status_code == 503 and other.headers["Retry-After"]


def test_history_prefill_off_prefills_the_message_alone(
    engine: ReferenceEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPSIM_HISTORY_PREFILL", "false")
    with client_for(engine) as client:
        turn(client, "off", 10, 3)
        two = turn(client, "off", [1, 2, 3], 2)
    assert two["turn"] == 2 and two["history"]["prompt_tokens"] == 3 and two["history"]["history_tokens"] == 0
    assert two["tokens"] == engine.generate([GenerationRequest((1, 2, 3), 2)])[0].tokens

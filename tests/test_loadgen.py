"""The load generator against a real pod: open loop, records in the simulator's schema, retries, bounds."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass

import numpy as np
import pytest

from capsim.core.http_pools import ConnectionPools, HttpPoolsError
from capsim.core.loadgen import (
    CUT_OFF,
    ClientPolicy,
    LoadgenError,
    check_targets,
    frozen_heap,
    generator_saturated,
    off_pod_clock,
    run_load,
)
from capsim.model.request import REQUEST_COLUMNS
from podproc import PodProcess, Served


@dataclass(frozen=True)
class Plan:
    session_start_s: np.ndarray
    turns: int
    think_time_s: float
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray


def plan(n_sessions: int, turns: int = 1, rate: float = 50.0, prompt: int = 16, output: int = 4) -> Plan:
    rng = np.random.default_rng(0)
    starts = np.cumsum(rng.exponential(1 / rate, n_sessions))
    n = n_sessions * turns
    return Plan(starts, turns, 0.0, np.full(n, prompt), np.full(n, output))


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    p = PodProcess(tmp_path_factory.mktemp("lg"), max_wait_ms=5).start()
    yield p
    p.stop()


def test_records_have_the_simulator_columns_and_sane_times(pod):
    df = asyncio.run(run_load([pod.url], plan(30, turns=2), seed=1))
    assert list(df.columns) == list(REQUEST_COLUMNS)
    assert len(df) == 60
    # each answer's history read (the pod's receipt to its engine), kept per row beside the columns
    load = np.array(df.attrs["load_s"])
    assert len(load) == 60 and np.isfinite(load).all() and (load >= 0).all()
    assert (df.outcome == "ok").all()
    assert (df.attempts == 1).all()
    ok = df
    assert (ok.arrival_s <= ok.start_s + 1e-3).all()
    assert (ok.start_s <= ok.first_token_s).all() and (ok.first_token_s <= ok.end_s).all()
    # turn 2 of a session is sent after turn 1 is answered
    by = df.set_index("request_id")
    for s in range(30):
        assert by.loc[2 * s + 1, "arrival_s"] >= by.loc[2 * s, "end_s"]
    assert set(df.session_id) == set(range(30))
    assert (df.batch_size >= 1).all()


def test_open_loop_sends_on_schedule_not_on_answers(pod):
    # 20 sessions due within ~0.1 s, each answer taking tens of ms: a closed loop (one request at a
    # time) would send the last one about a second late; the open loop sends each one on time
    p = plan(20, rate=200.0, prompt=64, output=128)
    df = asyncio.run(run_load([pod.url], p))
    lag = df.sort_values("request_id").arrival_s.to_numpy() - p.session_start_s
    serial_s = (df.end_s - df.arrival_s).sum()  # what sending one at a time would take at least
    assert serial_s > 0.5
    assert lag.max() < 0.25 * serial_s


def test_on_the_pods_clock_every_answer_lines_up_with_the_send(pod):
    df = asyncio.run(run_load([pod.url], plan(20), pod_clock=True))
    assert (df.outcome == "ok").all()
    assert df.attrs["pod_clock_rows"] == 20 and df.attrs["pod_clock_rejected"] == 0
    assert (df.arrival_s <= df.start_s).all()
    assert (df.start_s <= df.first_token_s).all() and (df.first_token_s <= df.end_s).all()


#: a stand-in pod's way in: it takes this long to receive a request (an HTTP server whose loop is busy)
WAY_IN_S = 0.05
#: the stand-in pod's own time to first token, from its receipt
POD_TTFT_S = 0.002


def stand_in_pod(clock_offset_s: float = 0.0):
    """A pod that receives each request ``WAY_IN_S`` after it arrives and answers 3 ms later, with the real
    pod's timings; its ``received_at`` is on this process's ``perf_counter`` plus ``clock_offset_s``."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/sessions/{session_id}/turns")
    async def turn(session_id: str) -> dict:
        await asyncio.sleep(WAY_IN_S)
        received = time.perf_counter()
        await asyncio.sleep(0.003)  # its total_s: the first token comes before the answer leaves
        return {"session_id": session_id, "turn": 1, "version": 1, "tokens": [1], "batch_size": 1,
                "timings": {"queue_s": 0.001, "ttft_s": POD_TTFT_S, "model_s": 0.002, "total_s": 0.003,
                            "received_at": received + clock_offset_s}}

    return Served(app)


def test_the_pods_clock_puts_the_way_in_into_the_time_to_first_token():
    with stand_in_pod() as p:
        on_receipt = asyncio.run(run_load([p.url], plan(5, rate=20.0)))
        from_send = asyncio.run(run_load([p.url], plan(5, rate=20.0), pod_clock=True))
    # by default the pod's timings count from its receipt: the way in is left out
    assert (on_receipt.first_token_s - on_receipt.arrival_s).max() < WAY_IN_S
    assert on_receipt.attrs["pod_clock_rows"] == 0
    # on its clock they count from the send: the way in is in, and the answer still comes after
    ttft = from_send.first_token_s - from_send.arrival_s
    assert (ttft >= WAY_IN_S + POD_TTFT_S).all()
    assert (from_send.first_token_s <= from_send.end_s).all()
    assert from_send.attrs["pod_clock_rows"] == 5 and from_send.attrs["pod_clock_rejected"] == 0
    assert off_pod_clock(from_send) is None
    assert off_pod_clock(on_receipt) == "5 of 5 answers not on this host's clock: their TTFT counts from the pod's receipt"
    way_in = np.array(from_send.attrs["way_in_s"])
    assert len(way_in) == 5 and (way_in >= WAY_IN_S).all()
    # the way in is what pod_clock adds: the rest is the pod's own TTFT and the send's lag behind the arrival
    assert (ttft.to_numpy() - way_in - POD_TTFT_S >= -1e-9).all()
    assert np.isnan(on_receipt.attrs["way_in_s"]).all()


def test_a_receipt_off_this_hosts_clock_keeps_the_send_time():
    # a pod on another host (a port forward looks like loopback): its clock reads an hour off ours
    with stand_in_pod(clock_offset_s=3600.0) as p:
        df = asyncio.run(run_load([p.url], plan(4, rate=20.0), pod_clock=True))
    assert (df.outcome == "ok").all()
    assert df.attrs["pod_clock_rows"] == 0 and df.attrs["pod_clock_rejected"] == 4
    assert off_pod_clock(df) == ("4 of 4 answers not on this host's clock (4 with a receipt outside their send and "
                                 "answer): their TTFT counts from the pod's receipt")
    assert ((df.first_token_s - df.arrival_s) < WAY_IN_S).all()  # the send plus the pod's own timings
    assert np.isnan(df.attrs["way_in_s"]).all()


def test_streaming_measures_time_to_first_token_on_the_client(pod):
    df = asyncio.run(run_load([pod.url], plan(5, output=16), stream=True))
    assert (df.outcome == "ok").all()
    assert (df.first_token_s < df.end_s).all()


def test_a_streamed_answer_is_placed_on_the_pods_clock_as_an_unstreamed_one(pod):
    # the stream's done event carries the answer: its receipt puts the start on the pod's clock and its
    # timings give the pod's own token span, while the time to first token stays the client's
    df = asyncio.run(run_load([pod.url], plan(5, output=16), stream=True, pod_clock=True))
    assert (df.outcome == "ok").all()
    assert df.attrs["pod_clock_rows"] == 5 and df.attrs["pod_clock_rejected"] == 0
    way_in = np.array(df.attrs["way_in_s"])
    assert np.isfinite(way_in).all() and (way_in >= 0).all()
    span = np.array(df.attrs["token_span_s"])
    assert np.isfinite(span).all() and (span > 0).all()  # 15 tokens after the first take time
    assert (df.start_s >= df.arrival_s + way_in - 1e-9).all()  # the receipt, then the pod's queue
    assert (df.first_token_s < df.end_s).all()


def test_the_connection_layout_bounds_what_is_in_flight(pod):
    # 12 requests due at once over 2 pools of 1 connection: never more than 2 at the pod, so no batch of the
    # pod's (it batches whatever is waiting within 5 ms) holds more than 2; every request is still answered
    p = Plan(np.zeros(12), 1, 0.0, np.full(12, 16), np.full(12, 16))
    df = asyncio.run(run_load([pod.url], p, pools=ConnectionPools(shards=2, connections=1, keepalive=1)))
    assert (df.outcome == "ok").all() and len(df) == 12
    assert df.batch_size.max() <= 2


def test_the_generator_measures_its_own_cpu(pod):
    import gc

    df = asyncio.run(run_load([pod.url], plan(30, rate=20.0)))
    assert gc.get_freeze_count() == 0  # the heap frozen for the run is given back
    busy = df.attrs["generator_busy"]
    assert len(busy) >= 1  # one window a second over a run of about 1.5 s, and the last part
    assert all(0.0 <= b <= 1.5 for b in busy)  # a share of a core (a bit over 1 where other threads ran)
    assert df.attrs["generator_cpu_s"] > 0.0


def test_the_heap_is_frozen_for_a_run_and_given_back():
    import gc

    async def inside() -> tuple[int, int, int, list[list[int]]]:
        async with frozen_heap():
            during = gc.get_freeze_count()
            fresh = [[] for _ in range(1000)]  # tracked after the freeze: a second freeze would take them
            async with frozen_heap():  # already frozen: left as it is, neither frozen again nor given back
                nested = gc.get_freeze_count()
            after = gc.get_freeze_count()
        return during, nested, after, fresh

    during, nested, after, _ = asyncio.run(inside())
    assert during > 10_000  # numpy, pandas, httpx and the rest of this process
    # a frozen object that dies leaves the count (a few do meanwhile): it may fall, but never take the 1,000 new
    assert nested < during + 1000 and after > during - 1000
    assert gc.get_freeze_count() == 0


def test_a_saturated_generator_is_named_and_an_idle_one_is_not():
    import pandas as pd

    frame = pd.DataFrame({"outcome": ["ok"] * 4})
    assert generator_saturated(frame) is None  # kept before the measurement: nothing to say
    frame.attrs.update(generator_busy=[0.3, 0.5, 0.2], generator_cpu_s=0.02, send_error_s=[0.001] * 4)
    assert generator_saturated(frame) is None
    frame.attrs.update(generator_busy=[0.3, 0.97, 1.0], send_error_s=[0.001, 0.002, 0.5, 1.2])
    why = generator_saturated(frame)
    assert why is not None and "in 2 of 3 1-s windows" in why and "5.0 ms CPU a request" in why
    assert "sends late by 1179 ms at p99" in why


@pytest.mark.parametrize("field", ["shards", "connections", "keepalive"])
def test_a_connection_layout_below_one_names_the_field(field):
    with pytest.raises(HttpPoolsError, match=f"ConnectionPools.{field} must be >= 1, got 0"):
        ConnectionPools(**{field: 0})


def test_a_client_drops_an_idle_connection_before_the_server_would_close_it() -> None:
    """capsim's clients (``http_clients``: the load generator, the router's forwarding) reuse an idle connection
    for ``KEEPALIVE_EXPIRY_S`` only, under the servers' keep-alive (``SERVER_KEEP_ALIVE_S``, the pod's and the
    router's uvicorn): a request after 4.3 s idle goes out on a new connection, where the server would still have
    kept the old one for 0.7 s more. With both at 5 s a request could meet the server closing its connection
    (``RemoteProtocolError``, the router's 502)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from capsim.core.http_pools import KEEPALIVE_EXPIRY_S, SERVER_KEEP_ALIVE_S, http_clients
    from capsim.core.service import PodConfig, make_server

    assert KEEPALIVE_EXPIRY_S < SERVER_KEEP_ALIVE_S
    assert make_server(PodConfig(device="cpu"), port=0).config.timeout_keep_alive == SERVER_KEEP_ALIVE_S

    async def port(request: Request) -> JSONResponse:
        assert request.client is not None
        return JSONResponse({"port": request.client.port})

    async def ports(url: str) -> list[int]:
        async with http_clients(ConnectionPools(shards=1)) as (client,):
            first = (await client.get(url)).json()["port"]
            again = (await client.get(url)).json()["port"]  # at once: the same connection
            await asyncio.sleep(KEEPALIVE_EXPIRY_S + 0.3)
            later = (await client.get(url)).json()["port"]
            return [first, again, later]

    with Served(Starlette(routes=[Route("/", port)])) as server:
        first, again, later = asyncio.run(ports(server.url + "/"))
    assert again == first and later != first


def test_bounds_are_respected(pod):
    df = asyncio.run(run_load([pod.url], plan(50), max_requests=7))
    assert len(df) == 7
    df = asyncio.run(run_load([pod.url], plan(200, rate=20.0), max_duration_s=0.5))
    assert 0 < len(df) < 200
    assert df.arrival_s.max() <= 0.6


def test_unreachable_pod_is_retried_then_failed(tmp_path):
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    client = ClientPolicy(timeout_s=2.0, max_retries=2, backoff_s=0.01)
    df = asyncio.run(run_load([dead], plan(3), client=client))
    assert (df.outcome == "failed").all()
    assert (df.attempts == 3).all()
    assert df.first_token_s.isna().all()


def test_targets_must_be_loopback_unless_allowed():
    assert check_targets(["http://localhost:8000/"]) == ["http://localhost:8000"]
    with pytest.raises(LoadgenError, match="not on loopback"):
        check_targets(["http://10.0.0.5:8000"])
    with pytest.raises(LoadgenError, match="http\\(s\\) URL"):
        check_targets(["ftp://127.0.0.1"])
    assert check_targets(["http://10.0.0.5:8000"], allow_remote=True)
    with pytest.raises(LoadgenError, match="max_requests"):
        asyncio.run(run_load(["http://127.0.0.1:1"], plan(1), max_requests=0))


def _silent_server() -> tuple[socket.socket, str]:
    """A TCP server that accepts connections and never answers (the kernel does the accepting)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    return srv, f"http://127.0.0.1:{srv.getsockname()[1]}"


def test_max_duration_bounds_requests_in_flight() -> None:
    """A target that never answers and a client timeout of 60 s: the run still ends at 1 s."""
    srv, url = _silent_server()
    try:
        t0 = time.monotonic()
        df = asyncio.run(run_load([url], plan(5, rate=100.0), client=ClientPolicy(timeout_s=60.0),
                                  max_duration_s=1.0))
        took = time.monotonic() - t0
    finally:
        srv.close()
    assert took < 5.0, f"the run took {took:.1f} s"
    assert len(df) == 5 and (df.outcome == "timed_out").all()
    # cut off together at the bound (and not much later: the run's clock, not the 60-s client timeout)
    assert df.end_s.nunique() == 1 and 1.0 <= df.end_s.iloc[0] < 3.0
    assert df.attrs["failures"] == {CUT_OFF: 5}


def test_failures_are_explained(tmp_path) -> None:
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    df = asyncio.run(run_load([dead], plan(2), client=ClientPolicy(timeout_s=2.0, max_retries=1, backoff_s=0.01)))
    assert df.attrs["failures"] == {"connection refused": 4}
    srv, url = _silent_server()
    try:
        df = asyncio.run(run_load([url], plan(2), client=ClientPolicy(timeout_s=0.3, max_retries=0)))
    finally:
        srv.close()
    assert df.attrs["failures"] == {"timeout": 2}


def test_failures_name_the_http_status(tmp_path) -> None:
    # a pod whose queue holds one request: a burst gets 429s, counted by status
    p = PodProcess(tmp_path, max_batch_size=1, max_wait_ms=0, queue_capacity=1, torch_threads=1).start()
    try:
        df = asyncio.run(run_load([p.url], plan(12, rate=10_000.0, prompt=64, output=200),
                                  client=ClientPolicy(timeout_s=30.0, max_retries=0)))
    finally:
        p.stop()
    assert df.attrs["failures"].get("HTTP 429", 0) == (df.outcome == "rejected").sum() >= 1


def _history_tokens(url: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("capsim_session_history_tokens_total"))


def test_each_run_starts_new_conversations_on_the_same_pod(pod):
    # the pod prefills a session's stored history: a second run reusing the first run's session ids would
    # continue those conversations, and every prompt would grow run after run
    before = _history_tokens(pod.url)
    for _ in range(2):
        df = asyncio.run(run_load([pod.url], plan(5), seed=3))
        assert (df.outcome == "ok").all()
    assert _history_tokens(pod.url) == before
    # the same tag twice does continue them (what the fresh tag avoids)
    for _ in range(2):
        asyncio.run(run_load([pod.url], plan(5), seed=3, session_tag="same"))
    assert _history_tokens(pod.url) > before


def test_every_turn_names_its_session_in_a_header_a_proxy_can_hash_on():
    # the export's DestinationRule for session affinity hashes on this header (Envoy's ring hash): each turn
    # of a session carries the same value, the session id in its URL, and different sessions differ
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from capsim.policy.routing import SESSION_HEADER

    seen: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append((self.path, self.headers.get(SESSION_HEADER)))
            body = json.dumps({"timings": {"ttft_s": 0.001, "queue_s": 0.0}, "batch_size": 1}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        df = asyncio.run(run_load([f"http://127.0.0.1:{srv.server_address[1]}"], plan(3, turns=2),
                                  client=ClientPolicy(timeout_s=10.0)))
    finally:
        srv.shutdown()
        srv.server_close()
    assert (df.outcome == "ok").all() and len(seen) == 6
    for path, header in seen:
        assert path == f"/v1/sessions/{header}/turns"
    assert len({h for _, h in seen}) == 3  # one value per session, shared by its turns

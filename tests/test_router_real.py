"""The router in front of real pods on loopback: policies, affinity, failover when a pod dies, 504 on a hang."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from capsim.core.router import (
    POLICIES,
    PodView,
    Router,
    RouterConfig,
    SessionView,
    create_router_app,
    preference,
    rendezvous,
    resolve_pods,
)
from capsim.model.settings import SettingsError
from capsim.studies.pods import stop_process
from podproc import PodProcess, Served, free_port


# ---- the decision alone ---------------------------------------------------------------------------------
def test_rendezvous_is_stable_and_moves_only_a_removed_pods_sessions() -> None:
    pods = [f"http://127.0.0.1:{8000 + i}" for i in range(4)]
    first = {f"s{k}": pods[rendezvous(f"s{k}", pods)[0]] for k in range(200)}
    assert first == {f"s{k}": pods[rendezvous(f"s{k}", pods)[0]] for k in range(200)}
    assert len(set(first.values())) == 4  # spread over every pod
    fewer = pods[:2] + pods[3:]
    moved = {s for s, p in first.items() if fewer[rendezvous(s, fewer)[0]] != p}
    assert moved == {s for s, p in first.items() if p == pods[2]}


def test_round_robin_least_outstanding_and_prefix_aware_orders() -> None:
    urls = ["a", "b", "c"]
    idle = [PodView(0, True)] * 3
    assert [preference("round_robin", "s", urls, idle, None, 4, t)[0] for t in range(4)] == [0, 1, 2, 0]
    busy = [PodView(3, True), PodView(1, True), PodView(2, True)]
    assert preference("least_outstanding", "s", urls, busy, None, 4, 0) == [1, 2, 0]
    # prefix_aware: the last turn's pod holds 90% of the prompt; it wins unless it is far busier
    last = SessionView(last_pod=2, tokens=90)
    assert preference("prefix_aware", "s", urls, idle, last, 10, 0)[0] == 2
    assert preference("prefix_aware", "s", urls, [PodView(0, True), PodView(0, True), PodView(5, True)],
                      last, 10, 0)[0] == 2  # 3 x 0.9 beats a queue score of 1
    assert preference("prefix_aware", "s", urls, [PodView(0, True), PodView(0, True), PodView(5, True)],
                      SessionView(2, 10), 90, 0)[0] == 0  # a small expected hit loses to a short queue
    assert preference("prefix_aware", "s", urls, busy, None, 4, 0)[0] == 1  # no history: the shortest queue
    assert set(POLICIES) == {"session_affinity", "round_robin", "least_outstanding", "prefix_aware"}


def test_pods_come_from_a_list_or_a_name_never_both() -> None:
    assert RouterConfig(pods_from_dns="agent-pods.agents.svc.cluster.local:8000").pods == ()
    assert RouterConfig(pods_from_dns="[fd00::1]:8000").pods_from_dns == "[fd00::1]:8000"
    for kw in ({}, {"pods": ("http://127.0.0.1:1",), "pods_from_dns": "pods:1"}):
        with pytest.raises(SettingsError, match="either pods .* or pods_from_dns"):
            RouterConfig(**kw)
    for bad in ("pods", "pods:", ":80", "pods:0", "pods:65536", "pods:http"):
        with pytest.raises(SettingsError, match="pods_from_dns must be HOST:PORT"):
            RouterConfig(pods_from_dns=bad)


def test_a_lookup_gives_each_address_as_a_pod_and_an_unknown_name_fails() -> None:
    import asyncio

    port = free_port()
    # a real lookup through the resolver (localhost is in every /etc/hosts): one pod URL per address
    urls = asyncio.run(resolve_pods(f"localhost:{port}", 5.0))
    assert f"http://127.0.0.1:{port}" in urls and urls == sorted(set(urls))
    assert asyncio.run(resolve_pods("[::1]:8000", 5.0)) == ["http://[::1]:8000"]  # a literal, bracketed
    with pytest.raises((OSError, TimeoutError)):  # NXDOMAIN, or no DNS server answering within the bound
        asyncio.run(resolve_pods("no-such-pods.invalid:8000", 5.0))


def test_a_new_pod_list_keeps_what_the_router_knew_of_the_pods_that_stay() -> None:
    a, b, c = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"
    r = Router(RouterConfig(pods_from_dns="pods:8000", policy="session_affinity"))
    assert r.order("s", 4) == ([], None)  # no pod known yet: nothing to try
    r.set_pods([a, b])
    sids = [f"s{k}" for k in range(200)]
    first = {s: r.order(s, 4)[0][0] for s in sids}
    r._begin(b)  # a turn in flight on b
    r.down_until[a] = time.monotonic() + 60
    r.remember("s0", first["s0"], {"history": {"prompt_tokens": 10}, "tokens": [1, 2]})
    r.set_pods([a, c])  # b leaves, c comes
    assert r.outstanding[b] == 1 and not r.is_up(a, time.monotonic())  # a's mark and b's turn survive
    r._end(b)
    assert b not in r.outstanding  # b's last turn ended: forgotten
    r.down_until.clear()
    moved = {s for s in sids if r.order(s, 4)[0][0] != first[s]}
    # rendezvous hashing: only b's sessions and those c now wins move; none goes from a to a pod that stayed
    assert all(first[s] == b or r.order(s, 4)[0][0] == c for s in moved)
    assert {s for s in sids if first[s] == b} <= moved and len(moved) < len(sids)
    assert r.sessions["s0"] == (first["s0"], 12)  # sessions are kept by pod URL


def test_an_ejected_pod_is_left_out_of_the_order_and_one_that_left_and_came_back_starts_afresh() -> None:
    a, b = "http://10.0.0.1:8000", "http://10.0.0.2:8000"
    r = Router(RouterConfig(pods=(a, b), policy="least_outstanding",
                            outlier_ejection={"consecutive_failures": 2, "base_ejection_s": 60.0}))
    r.observe(a, failed=True)
    assert sorted(r.order("s", 4)[0]) == [a, b]  # one failure: still balanced over
    r.observe(a, failed=True)
    for k in range(20):
        assert r.order(f"s{k}", 4)[0] == [b]
    r.set_pods([b])
    r.set_pods([a, b])  # it left the Service and came back: Envoy forgets a removed host
    assert sorted(r.order("s", 4)[0]) == [a, b]
    r.observe(a, failed=True)
    assert sorted(r.order("s", 4)[0]) == [a, b]  # its run starts again from none


def test_with_envoys_sweeps_an_ejected_pod_returns_at_the_first_sweep_after_its_ejection_time() -> None:
    """``interval_s``: the router counts sweeps from its start, as Envoy from the cluster's; a pod ejected for
    30 s comes back at the first sweep at least 30 s after it went out, not before (the simulator's rule)."""
    a, b = "http://10.0.0.1:8000", "http://10.0.0.2:8000"
    r = Router(RouterConfig(pods=(a, b), policy="least_outstanding",
                            outlier_ejection={"consecutive_failures": 1, "base_ejection_s": 30.0, "interval_s": 10.0}))
    assert r.outliers is not None
    start = r.outliers.origin
    r.observe(a, failed=True)  # out from a moment after the start, at most one sweep later (asserted)
    assert time.monotonic() - start < 10.0 and r.outliers.ejected_ids == {0: start + 40.0}
    assert r.ejected(start + 39.999) == {a}  # over 30 s out, and still out until the sweep
    assert r.ejected(start + 40.0) == set()



@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The router's monotonic clock, at 1000 s until a test sets ``clock[0]``."""
    import capsim.core.router as router_module

    now = [1000.0]
    monkeypatch.setattr(router_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_a_failure_seen_after_a_pods_ejection_ended_counts_though_no_order_came_between(clock: list[float]) -> None:
    """An attempt that fails after the pod's ejection ended (it ran across the end, or the router sent it in panic
    mode) counts: the pods whose ejection is over return before the failure is seen, as in the simulator."""
    a, b = "http://10.0.0.1:8000", "http://10.0.0.2:8000"
    r = Router(RouterConfig(pods=(a, b), policy="least_outstanding",
                            outlier_ejection={"consecutive_failures": 1, "base_ejection_s": 30.0}))
    assert r.outliers is not None
    r.observe(a, failed=True)
    assert r.outliers.ejected_ids == {0: 1030.0}
    clock[0] = 1031.0
    r.observe(a, failed=True)  # no order between: back, and out again for twice as long
    assert r.outliers.ejections == 2 and r.outliers.ejected_ids == {0: 1091.0}
    assert r.order("s", 4)[0] == [b]


def test_the_ejected_gauge_reads_the_ejections_at_the_scrape(clock: list[float]) -> None:
    """``capsim_router_ejected`` counts the pods out when it is scraped: an ejection that ended shows as over though
    no turn came since (it changed only at a pick or a failure), and a pod that left the list is not counted."""
    a, b, c = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"
    r = Router(RouterConfig(pods=(a, b, c), policy="least_outstanding",
                            outlier_ejection={"consecutive_failures": 1, "max_ejection_percent": 100.0}))

    def gauge() -> float | None:
        return r.metrics.registry.get_sample_value("capsim_router_ejected")

    assert gauge() == 0
    r.observe(a, failed=True)
    clock[0] = 1010.0
    r.observe(b, failed=True)
    assert gauge() == 2
    clock[0] = 1030.0  # a's 30 s are over, b's are not
    assert gauge() == 1
    r.set_pods([a, c])  # b left the Service
    assert gauge() == 0
    assert Router(RouterConfig(pods=(a,), policy="round_robin")).metrics.registry.get_sample_value(
        "capsim_router_ejected") == 0  # no ejection: always none


def test_with_jitter_each_ejection_lasts_up_to_the_jitter_longer(clock: list[float]) -> None:
    """``max_ejection_time_jitter_s`` (Envoy's ``max_ejection_time_jitter``): the real router draws each ejection's
    jitter at random, whole milliseconds from 0 to the jitter, as the simulator's router does from its stream."""
    a = "http://10.0.0.1:8000"
    ends = set()
    for _ in range(20):
        r = Router(RouterConfig(pods=(a, "http://10.0.0.2:8000"), policy="least_outstanding",
                                outlier_ejection={"consecutive_failures": 1, "max_ejection_time_jitter_s": 2.0}))
        r.observe(a, failed=True)
        assert r.outliers is not None
        (until,) = r.outliers.ejected_ids.values()
        assert 1030.0 <= until <= 1032.0 and (until - 1030.0) * 1000 == pytest.approx(round((until - 1030.0) * 1000))
        ends.add(until)
    assert len(ends) > 10  # drawn, not fixed

# ---- real servers ---------------------------------------------------------------------------------------
def router(pods: list[str], **kw: Any) -> Served:
    return Served(create_router_app(RouterConfig(pods=tuple(pods), **kw)))


@pytest.fixture
def hanging_pod() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def post(url: str, session: str, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/sessions/{session}/turns", json=body, timeout=timeout)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M))


@pytest.mark.parametrize("stream", [False, True])
def test_a_hanging_pod_is_a_504_within_the_timeout(hanging_pod: str, stream: bool) -> None:
    with router([hanging_pod], timeout_s=1.0) as r:
        t0 = time.monotonic()
        resp = post(r.url, "h1", {"prompt_tokens": 4, "stream": stream}, timeout=10)
        took = time.monotonic() - t0
        assert resp.status_code == 504 and "timeout_s=1" in resp.json()["detail"]
        assert 1.0 <= took < 3.0  # the router's deadline, not the client's 10 s
        assert metric(r.url, "capsim_router_timeouts_total") == 1


def test_no_pod_reachable_is_a_502(tmp_path: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with router([dead], timeout_s=1.0) as r:
        resp = post(r.url, "d1", {"prompt_tokens": 4})
        assert resp.status_code == 502 and "no pod reachable" in resp.json()["detail"]
        assert httpx.get(f"{r.url}/readyz", timeout=5).status_code == 503


def fake_pod(status: int, detail: str) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/v1/sessions/{sid}/turns")
    async def turns(sid: str) -> JSONResponse:
        body = {"detail": detail} if status != 200 else {"session_id": sid, "turn": 1, "tokens": [1]}
        return JSONResponse(body, status, headers={"Retry-After": "1"} if status == 503 else None)

    return app


def test_a_draining_pods_503_goes_to_the_next_pod_but_a_store_503_does_not() -> None:
    with Served(fake_pod(503, "pod is draining; retry on another pod")) as draining, \
            Served(fake_pod(200, "")) as ok, Served(fake_pod(503, "session store unavailable: down")) as nostore:
        with router([draining.url, ok.url], policy="round_robin") as r:
            resp = post(r.url, "dr", {"prompt_tokens": 4})
            assert resp.status_code == 200 and resp.headers["X-Capsim-Pod"] == ok.url
            assert metric(r.url, 'capsim_router_fallbacks_total{reason="draining"}') == 1
        with router([nostore.url, ok.url], policy="round_robin") as r:
            resp = post(r.url, "ns", {"prompt_tokens": 4})
            assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"  # passed through
            assert metric(r.url, "capsim_router_fallbacks_total") == 0


def turns_until_ejected(r: Served, n: int) -> list[tuple[str, int]]:
    """Send turns one after another (at most ``n``) until the router has ejected a pod: (pod, status) of each."""
    seen = []
    for k in range(n):
        resp = post(r.url, f"e{k}", {"prompt_tokens": 4})
        seen.append((resp.headers.get("X-Capsim-Pod", ""), resp.status_code))
        if metric(r.url, "capsim_router_ejections_total") >= 1:
            break
    return seen


def test_a_pod_answering_5xx_is_ejected_after_its_failures_in_a_row_as_envoy_ejects_it() -> None:
    """Least outstanding is a proxy's policy: the simulator's outlier detection (``capsim.policy.outlier``)
    ejects the pod whose own 503s (a Redis outage) come ``consecutive_failures`` times in a row; the other pod's
    answers in between do not end that pod's run. Ejected, it takes no turn; after the ejection it does again."""
    with Served(fake_pod(503, "session store unavailable: down")) as bad, Served(fake_pod(200, "")) as ok:
        with router([bad.url, ok.url], policy="least_outstanding",
                    outlier_ejection={"consecutive_failures": 3, "base_ejection_s": 30.0}) as r:
            seen = turns_until_ejected(r, 200)
            assert [s for p, s in seen if p == bad.url] == [503, 503, 503]  # its three failures, passed through
            assert metric(r.url, "capsim_router_ejected") == 1
            later = [post(r.url, f"l{k}", {"prompt_tokens": 4}) for k in range(30)]
            assert {(x.status_code, x.headers["X-Capsim-Pod"]) for x in later} == {(200, ok.url)}
            assert metric(r.url, f'capsim_router_ejections_total{{pod="{bad.url}"}}') == 1
        with router([bad.url, ok.url], policy="least_outstanding",
                    outlier_ejection={"consecutive_failures": 3, "base_ejection_s": 0.2}) as r:
            turns_until_ejected(r, 200)
            time.sleep(0.3)  # the ejection is over: the pod is balanced over again
            back = [post(r.url, f"b{k}", {"prompt_tokens": 4}).headers["X-Capsim-Pod"] for k in range(60)]
            assert bad.url in back


def test_only_the_proxys_own_failures_eject_when_answered_5xx_do_not_count() -> None:
    """``count_answered_5xx: false`` (Istio's split local-origin errors): a pod's 503 is an answer, never a
    failure, while refused connections still eject; and a policy that is not a proxy's never ejects."""
    with Served(fake_pod(503, "session store unavailable: down")) as bad, Served(fake_pod(200, "")) as ok:
        with router([bad.url, ok.url], policy="least_outstanding",
                    outlier_ejection={"consecutive_failures": 3, "count_answered_5xx": False}) as r:
            seen = [post(r.url, f"n{k}", {"prompt_tokens": 4}).headers["X-Capsim-Pod"] for k in range(60)]
            assert seen.count(bad.url) > 10 and metric(r.url, "capsim_router_ejections_total") == 0
        with router([bad.url, ok.url], policy="round_robin",
                    outlier_ejection={"consecutive_failures": 3}) as r:
            seen = [post(r.url, f"n{k}", {"prompt_tokens": 4}).headers["X-Capsim-Pod"] for k in range(20)]
            assert seen.count(bad.url) == 10 and metric(r.url, "capsim_router_ejections_total") == 0
    dead = f"http://127.0.0.1:{free_port()}"
    with Served(fake_pod(200, "")) as ok:
        with router([dead, ok.url], policy="least_outstanding", down_s=0.0,
                    outlier_ejection={"consecutive_failures": 3, "count_answered_5xx": False}) as r:
            seen = turns_until_ejected(r, 200)
            assert {s for _, s in seen} == {200}  # each refused turn went on to the other pod
            assert metric(r.url, 'capsim_router_fallbacks_total{reason="refused"}') == 3
            for k in range(30):  # ejected: not even tried
                assert post(r.url, f"d{k}", {"prompt_tokens": 4}).status_code == 200
            assert metric(r.url, 'capsim_router_fallbacks_total{reason="refused"}') == 3
        with router([dead, ok.url], policy="least_outstanding", down_s=0.0, outlier_ejection=None) as r:
            for k in range(40):
                assert post(r.url, f"d{k}", {"prompt_tokens": 4}).status_code == 200
            assert metric(r.url, 'capsim_router_fallbacks_total{reason="refused"}') > 5  # tried again and again


def test_without_always_eject_one_host_ten_percent_of_two_pods_ejects_neither() -> None:
    """Envoy's own default (no ``always_eject_one_host``, all an Istio DestinationRule can say): 10 % of 2 pods
    is under one, so the pod answering 503 keeps its share; at 50 % it is ejected after its failures."""
    with Served(fake_pod(503, "session store unavailable: down")) as bad, Served(fake_pod(200, "")) as ok:
        with router([bad.url, ok.url], policy="least_outstanding",
                    outlier_ejection={"consecutive_failures": 3, "always_eject_one_host": False}) as r:
            seen = [post(r.url, f"n{k}", {"prompt_tokens": 4}).headers["X-Capsim-Pod"] for k in range(40)]
            assert seen.count(bad.url) > 10 and metric(r.url, "capsim_router_ejections_total") == 0
        with router([bad.url, ok.url], policy="least_outstanding", outlier_ejection={
                "consecutive_failures": 3, "always_eject_one_host": False, "max_ejection_percent": 50}) as r:
            seen = turns_until_ejected(r, 200)
            assert [s for p, s in seen if p == bad.url] == [503, 503, 503]
            assert metric(r.url, "capsim_router_ejected") == 1


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Iterator[list[PodProcess]]:
    """Two real pods of the tiny model sharing one real Redis (the seed's design)."""
    log = tmp_path_factory.mktemp("pods")
    ps = [PodProcess(log, f"pod{i}", redis_url=redis_server.url, max_wait_ms=0, warmup="false") for i in range(2)]
    for p in ps:
        p.start(wait_ready=False)
    try:
        for p in ps:
            p.wait_ready(timeout_s=150)  # two model loads at once on a busy 2-core machine
        yield ps
    finally:
        for p in ps:
            p.kill()


def sessions_on_each(urls: list[str], n: int, prefix: str = "aff") -> list[str]:
    """Session ids, ``n`` of them placed first on each pod by rendezvous hashing."""
    out: dict[int, list[str]] = {i: [] for i in range(len(urls))}
    k = 0
    while any(len(v) < n for v in out.values()):
        sid = f"{prefix}-{k}"
        first = rendezvous(sid, urls)[0]
        if len(out[first]) < n:
            out[first].append(sid)
        k += 1
    return [s for v in out.values() for s in v]


def test_pods_from_a_lookup_follow_the_pods_that_come_and_go(pods: list[PodProcess]) -> None:
    # the router in front of a Deployment whose HPA adds a pod and then removes the first: the lookup's
    # answer (here injected; in a cluster a headless Service's addresses) is what the router places on
    urls = [p.url for p in pods]
    answer: list[str] = [urls[0]]
    failing = False

    async def lookup() -> list[str]:
        if failing:
            raise OSError("the resolver is down")
        return list(answer)

    def wait_for(cond: Any) -> None:
        deadline = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < deadline, "the router did not pick up the lookup"
            time.sleep(0.05)

    config = RouterConfig(pods_from_dns="agent-pods:8000", refresh_s=0.1, policy="session_affinity",
                          timeout_s=20, down_s=30)
    sids = sessions_on_each(urls, 2, prefix="dns")  # not the sessions the affinity test counts turns of
    with Served(create_router_app(config, resolve=lookup)) as r:
        assert metric(r.url, "capsim_router_pods") == 1  # looked up before serving
        for sid in sids:  # one pod: every session on it
            resp = post(r.url, sid, {"prompt_tokens": 6, "max_new_tokens": 2})
            assert resp.status_code == 200 and resp.headers["X-Capsim-Pod"] == urls[0], resp.text
        answer.append(urls[1])  # scaled up
        wait_for(lambda: metric(r.url, "capsim_router_pods") == 2)
        placed = {sid: post(r.url, sid, {"prompt_tokens": 6, "max_new_tokens": 2}).headers["X-Capsim-Pod"]
                  for sid in sids}
        assert placed == {sid: urls[rendezvous(sid, urls)[0]] for sid in sids}  # only pod 1's sessions moved
        failing = True  # a failed lookup keeps the pods
        wait_for(lambda: metric(r.url, 'capsim_router_pod_lookups_total{result="failed"}') >= 1)
        assert metric(r.url, "capsim_router_pods") == 2
        failing = False
        answer.remove(urls[0])  # scaled down: pod 0's sessions go to pod 1 and continue there
        wait_for(lambda: metric(r.url, "capsim_router_pods") == 1)
        for sid in sids:
            resp = post(r.url, sid, {"prompt_tokens": 6, "max_new_tokens": 2})
            assert resp.status_code == 200 and resp.headers["X-Capsim-Pod"] == urls[1], resp.text
            assert resp.json()["turn"] == 3  # the history from the shared store, whichever pod had it
        assert metric(r.url, "capsim_router_fallbacks_total") == 0  # the gone pod was never tried


def test_affinity_keeps_a_session_on_its_pod_and_a_dead_pod_fails_over(pods: list[PodProcess]) -> None:
    urls = [p.url for p in pods]
    sids = sessions_on_each(urls, 2)
    with router(urls, policy="session_affinity", timeout_s=20, down_s=30) as r:
        served: dict[str, set[str]] = {s: set() for s in sids}
        last: dict[str, dict[str, Any]] = {}
        for _ in range(3):
            for sid in sids:
                resp = post(r.url, sid, {"prompt_tokens": 6, "max_new_tokens": 2})
                assert resp.status_code == 200, resp.text
                served[sid].add(resp.headers["X-Capsim-Pod"])
                last[sid] = resp.json()
        assert all(len(p) == 1 for p in served.values())
        assert {next(iter(served[s])) for s in sids} == set(urls)  # both pods serve
        assert all(a["history"]["history_tokens"] == 2 * (6 + 2) for a in last.values())
        assert metric(r.url, "capsim_router_fallbacks_total") == 0
        # pod 1 dies: its sessions go to pod 0, which prefills their whole history from Redis
        pods[1].kill()
        on_dead = [s for s in sids if urls[1] in served[s]]
        for sid in on_dead:
            resp = post(r.url, sid, {"prompt_tokens": 6, "max_new_tokens": 2})
            assert resp.status_code == 200, resp.text
            assert resp.headers["X-Capsim-Pod"] == urls[0]
            assert resp.json()["turn"] == 4 and resp.json()["history"]["history_tokens"] == 3 * (6 + 2)
        assert metric(r.url, 'capsim_router_fallbacks_total{reason="refused"}') == 1
        assert metric(r.url, 'capsim_router_fallbacks_total{reason="down"}') == len(on_dead) - 1
        assert metric(r.url, "capsim_router_session_moves_total") == len(on_dead)


def test_capsim_router_command_serves(tmp_path: Any) -> None:
    port, dead = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "capsim.cli", "router", "--pod", f"http://127.0.0.1:{dead}",
                             "--policy", "round_robin", "--port", str(port), "--timeout-s", "2",
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert resp.status_code == 200
        assert post(f"http://127.0.0.1:{port}", "c1", {"prompt_tokens": 4}).status_code == 502
    finally:
        stop_process(proc, 10)  # SIGTERM, then SIGKILL if it outlasts the wait: never a router left behind

"""A small HTTP router in front of N real pods that places each session turn by a policy, as issue 14 §3's
routers do in the simulator (``capsim.sim.router``).

Policies: ``session_affinity`` (the session's pod by rendezvous hashing over the pods, so a session stays on
one pod and only the sessions of a pod that goes away move), ``round_robin``, ``least_outstanding`` (the
fewest turns this router has in flight there, at random among equals) and ``prefix_aware`` (the Kubernetes
inference gateway's scorers, ``capsim.policy.routing``: the pod that served the session's last turn is
expected to hold the history's share of the prompt, weighed against each pod's turns in flight).

Each policy gives an order of preference, not one pod. A pod that refuses the connection (or does not
accept it within ``connect_timeout_s``) has received nothing, so the turn goes to the next pod in that
order, the fallback counted in ``/metrics``, and the pod is skipped for ``down_s``; so does a turn a pod
answers 503 "pod is draining" or "pod is shutting down" (it did nothing with it). Every call to a pod has
a deadline: a pod that accepted the turn but does not answer within ``timeout_s`` gets the client a
**504** (the turn is not retried elsewhere: it may have been stored; a client with an ``Idempotency-Key``
may retry it safely). No pod reachable: **502**. Answers are passed through with the pod's status and
the header ``X-Capsim-Pod`` naming the pod.

Under ``least_outstanding`` and ``prefix_aware`` (a proxy's policies: Envoy, the inference gateway) the router
also ejects a failing pod as Envoy's outlier detection does, with the simulator's policy and settings
(``capsim.policy.outlier``, ``outlier_ejection``: the scenario's ``router.outlier_ejection``): after
``consecutive_failures`` failures in a row (a refused connection, a timeout, a reset, and unless
``count_answered_5xx`` is off every 5xx a pod answers, a draining pod's included; a streamed answer's status
counts with its headers) the pod is left out of the order for ``base_ejection_s`` x its ejections, if then at
most ``max_ejection_percent`` of the pods are out, or none is and ``always_eject_one_host`` is on (the default),
and all of them are balanced over again when fewer than half would be left (Envoy's panic mode).

The pods are a fixed list (``pods``) or, in a cluster whose HPA adds and removes them, the addresses of a
headless Service (``pods_from_dns: "NAME.NS.svc.cluster.local:PORT"``), looked up again every ``refresh_s``
(each lookup bounded by ``connect_timeout_s``; a failed or empty one keeps the last list). The router's
state is kept by pod URL, so a pod that stays keeps its counts and its sessions; under session affinity a
pod that comes or goes moves only the sessions rendezvous hashing gives it or took from it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import Field, field_validator, model_validator

from capsim.core.http_pools import SERVER_KEEP_ALIVE_S, ConnectionPools, http_clients
from capsim.model.scenario import OutlierEjection, router_ejects
from capsim.model.settings import FrozenModel
from capsim.policy.outlier import OutlierDetector
from capsim.policy.routing import SERVED_BY, Candidate, Weights, scores

Policy = Literal["session_affinity", "round_robin", "least_outstanding", "prefix_aware"]
POLICIES: tuple[Policy, ...] = ("session_affinity", "round_robin", "least_outstanding", "prefix_aware")
_PASSED_HEADERS = ("retry-after", "idempotent-replayed", "content-type")


class RouterConfig(FrozenModel):
    """The router's pods, policy and deadlines."""

    _error_prefix: ClassVar[str] = "router"

    pods: tuple[str, ...] = Field((), description="pod base URLs, e.g. http://127.0.0.1:8001")
    pods_from_dns: str | None = Field(None, description="instead of pods: HOST:PORT of a headless Service, whose "
                                      "addresses are the pods (http://ADDRESS:PORT), looked up every refresh_s")
    refresh_s: float = Field(5.0, gt=0, description="pods_from_dns: seconds between lookups")
    policy: Policy = "session_affinity"
    timeout_s: float = Field(60.0, gt=0, description="a turn's whole call to a pod (a stream: each read)")
    connect_timeout_s: float = Field(1.0, gt=0, description="a pod that does not accept by then is skipped")
    down_s: float = Field(5.0, ge=0, description="a pod that refused a connection is skipped this long")
    sessions: int = Field(100_000, ge=1, description="sessions whose last pod and length the router keeps")
    prefix_weight: float = Field(3.0, ge=0, description="prefix_aware: weight of the expected prefix hit")
    queue_weight: float = Field(1.0, ge=0, description="prefix_aware: weight of a short queue")
    outlier_ejection: OutlierEjection | None = Field(
        OutlierEjection(), description="least_outstanding and prefix_aware (a proxy's policies): eject a pod after "
        "consecutive failures, as Envoy's outlier detection and the simulator's router.outlier_ejection; null: never")

    @property
    def ejects(self) -> bool:
        """Whether the router ejects failing pods: a proxy's policy with ``outlier_ejection`` (as the simulator's)."""
        return router_ejects(self.policy, self.outlier_ejection)

    @field_validator("pods")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for url in v:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"a pod is an http(s) base URL, got {url!r}")
        if len(set(v)) != len(v):
            raise ValueError("a pod is listed twice")
        return tuple(u.rstrip("/") for u in v)

    @field_validator("pods_from_dns")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            split_host_port(v)
        return v

    @model_validator(mode="after")
    def _one_source(self) -> RouterConfig:
        if bool(self.pods) == (self.pods_from_dns is not None):
            raise ValueError("give either pods (a list of URLs) or pods_from_dns (HOST:PORT), not both or neither")
        return self


def split_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for an IPv6 literal) as (host, port); ``ValueError`` naming what is wrong."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"pods_from_dns must be HOST:PORT with a port in [1, 65535], got {address!r}")
    return host, int(port)


def pod_url(address: str, port: int) -> str:
    """A pod's base URL from its address (an IPv6 one in brackets) and port."""
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


async def resolve_pods(address: str, timeout_s: float) -> list[str]:
    """The pods behind a headless Service: each address ``HOST`` resolves to, as ``http://ADDRESS:PORT``,
    sorted; the lookup is bounded by ``timeout_s`` (``TimeoutError``; ``OSError`` when the name is unknown)."""
    import socket

    host, port = split_host_port(address)
    async with asyncio.timeout(timeout_s):
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({pod_url(str(info[4][0]), port) for info in infos})


# ---- the decision: pure, no clock and no I/O ---------------------------------------------------------------
@dataclass(frozen=True)
class PodView:
    """What the router knows of a pod when it places a turn."""

    outstanding: int  # turns this router has in flight there
    up: bool  # not skipped after a refused connection


@dataclass(frozen=True)
class SessionView:
    """What the router remembers of a session: the pod of its last turn and its tokens after that turn."""

    last_pod: int
    tokens: int


def rendezvous(session_id: str, pods: Sequence[str]) -> list[int]:
    """Pods in the session's rendezvous-hash order (highest-random-weight): stable per session, and removing
    a pod moves only its own sessions."""
    def weight(i: int) -> bytes:
        return hashlib.blake2b(f"{session_id}\x00{pods[i]}".encode(), digest_size=8).digest()

    return sorted(range(len(pods)), key=weight, reverse=True)


def preference(policy: Policy, session_id: str, urls: Sequence[str], pods: Sequence[PodView],
               session: SessionView | None, new_tokens: int, turn_number: int,
               weights: Weights | None = None, tiebreak: Sequence[float] | None = None) -> list[int]:
    """Every pod in the policy's order of preference (the router then tries the pods that are up first).
    Least outstanding and prefix-aware order equals by ``tiebreak`` (one uniform draw per pod: at random,
    as Envoy and the inference gateway's picker do; the pod index without it)."""
    n = len(pods)
    tie = tiebreak if tiebreak is not None else range(n)
    if policy == "session_affinity":
        order = rendezvous(session_id, urls)
    elif policy == "round_robin":
        order = [(turn_number + k) % n for k in range(n)]
    elif policy == "least_outstanding":
        order = sorted(range(n), key=lambda i: (pods[i].outstanding, tie[i]))
    else:
        hit = [0.0] * n
        if session is not None and session.last_pod < n:
            hit[session.last_pod] = session.tokens / max(1, session.tokens + new_tokens)
        cands = [Candidate(queue=p.outstanding, kv_cache_usage=0.0, prefix_hit=h) for p, h in zip(pods, hit, strict=True)]
        s = scores(cands, weights or Weights())
        order = sorted(range(n), key=lambda i: (-s[i], tie[i]))
    return order


# ---- the process ----------------------------------------------------------------------------------------------
class RouterMetrics:
    """The router's Prometheus series (docs/pod.md, "Sessions and history")."""

    def __init__(self, pods: Sequence[str]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry(auto_describe=True)
        kw: dict[str, Any] = {"namespace": "capsim_router", "registry": self.registry}
        self.turns = Counter("turns", "Turns answered, by pod and HTTP status.", ("pod", "status"), **kw)
        self.fallbacks = Counter("fallbacks", "Turns sent to a pod other than the policy's first choice because "
                                 "that pod refused the connection, was down or was ejected.", ("reason",), **kw)
        self.timeouts = Counter("timeouts", "Turns a pod did not answer within timeout_s (504).", ("pod",), **kw)
        self.moved = Counter("session_moves", "Turns of a known session placed on another pod than its last "
                             "turn's (its prefix cache there is lost).", **kw)
        self.outstanding = Gauge("outstanding", "Turns in flight per pod.", ("pod",), **kw)
        self.pods = Gauge("pods", "Pods the router places turns on (the list, or the last lookup's).", **kw)
        self.lookups = Counter("pod_lookups", "Lookups of pods_from_dns, by result (ok, failed, empty: the "
                               "last list is kept).", ("result",), **kw)
        self.ejections = Counter("ejections", "Pods ejected by outlier detection (Envoy's "
                                 "ejections_enforced_total), by pod.", ("pod",), **kw)
        self.ejected = Gauge("ejected", "Pods ejected by outlier detection now.", **kw)
        for p in pods:
            self.outstanding.labels(p).set(0)
        self.pods.set(len(pods))


class Router:
    """The router's live state: outstanding counts, pods down until, sessions' last pods."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.urls = list(config.pods)  # the pods now (pods_from_dns: the last lookup's, sorted)
        # by pod URL, so a new list keeps what it knew of the pods that stay (and a turn in flight on a pod
        # that left still ends on its own count)
        self.outstanding: dict[str, int] = dict.fromkeys(self.urls, 0)
        self.down_until: dict[str, float] = {}
        self.sessions: OrderedDict[str, tuple[str, int]] = OrderedDict()  # session -> (last pod, tokens)
        self.turns = 0
        self.metrics = RouterMetrics(self.urls)
        self.weights = Weights(prefix=config.prefix_weight, queue=config.queue_weight, kv_cache=0.0)
        self._rng = random.Random()  # ties at random, not to the first pod (issue 14 §3)
        # the forwarding clients (``http_pools.http_clients``), one per turn in turn: several small pools,
        # since httpcore walks every connection of a pool on each request
        self.clients: list[httpx.AsyncClient] = []
        self._next_client = 0
        # Envoy's outlier detection, the simulator's policy (``capsim.policy.outlier``), on pod ids by URL
        # (its sweeps, with ``interval_s``, counted from now, as Envoy's from the cluster's start)
        self.outliers = OutlierDetector(config.outlier_ejection.settings(), origin=time.monotonic(),
                                        draw=random.Random().random) \
            if config.ejects and config.outlier_ejection is not None else None
        self._ids: dict[str, int] = {}
        self._next_id = 0
        if self.outliers is not None:  # read at each scrape: an ejection that ended shows as over at once
            self.metrics.ejected.set_function(self._ejected_now)

    def next_client(self) -> httpx.AsyncClient:
        """The client for the next forward, in turn over ``clients`` (each call moves on to the next)."""
        if not self.clients:
            raise RuntimeError("the router's clients exist only inside the app's lifespan")
        self._next_client = (self._next_client + 1) % len(self.clients)
        return self.clients[self._next_client]

    def set_pods(self, urls: Sequence[str]) -> None:
        """Place turns on ``urls`` from now on (a lookup's answer). Pods that stay keep their counts, down
        marks and sessions; a pod that left keeps its count until its turns in flight end."""
        new = list(dict.fromkeys(urls))
        gone = set(self.urls) - set(new)
        for url in new:
            if url not in self.outstanding:
                self.outstanding[url] = 0
                self.metrics.outstanding.labels(url).set(0)
        self.urls = new
        for url in gone:
            self.down_until.pop(url, None)
            if self.outliers is not None and url in self._ids:
                self.outliers.forget(self._ids.pop(url))  # a pod that comes back starts afresh, as in Envoy
            self._forget_if_idle(url)
        self.metrics.pods.set(len(new))

    def _forget_if_idle(self, url: str) -> None:
        """Drop a pod that left the list once no turn of it is in flight (its count and its gauge)."""
        if url not in self.urls and not self.outstanding.get(url):
            self.outstanding.pop(url, None)
            with suppress(KeyError):
                self.metrics.outstanding.remove(url)

    def is_up(self, url: str, now: float) -> bool:
        return self.down_until.get(url, 0.0) <= now

    def _id(self, url: str) -> int:
        """The pod's id for outlier detection (by URL: a pod that stays keeps its record)."""
        i = self._ids.get(url)
        if i is None:
            self._ids[url] = i = self._next_id  # never reused: a pod that left and came back is new
            self._next_id += 1
        return i

    def ejected(self, now: float) -> set[str]:
        """The pods outlier detection keeps out of the balancing set now (none in Envoy's panic mode)."""
        out = self.outliers
        if out is None or not out.ejected_ids:
            return set()
        out.expire(now)
        ids = out.ejected_ids
        gone = {u for u in self.urls if self._ids.get(u, -1) in ids}
        return set() if out.panic(len(gone), len(self.urls)) else gone

    def _ejected_now(self) -> int:
        """The pods ejected now, for the ``capsim_router_ejected`` gauge: those of the list whose ejection has not
        ended (the detector refiles the others at the next pick or failure; a scrape does not wait for one)."""
        out = self.outliers
        assert out is not None
        now = time.monotonic()
        ids = out.ejected_ids
        return sum(1 for u in self.urls if ids.get(self._ids.get(u, -1), now) > now)

    def observe(self, url: str, failed: bool, local: bool = False) -> None:
        """Outlier detection sees an attempt on ``url`` end: ``failed`` (a 5xx, or, ``local``, the router's own:
        refused, reset, timed out) or not. A streamed answer's status is known with its headers, as Envoy's."""
        out = self.outliers
        if out is None:
            return
        if not (failed and (local or out.settings.count_answered_5xx)):
            # an answer: with count_answered_5xx off a 5xx answered is a connection that worked (Envoy's
            # local-origin success), and ends the run as the simulator's router has it
            out.succeeded(self._id(url))
            return
        now = time.monotonic()
        self.ejected(now)  # those whose ejection ended while the attempt ran return first
        if out.failed(self._id(url), now, len(self.urls)):
            self.metrics.ejections.labels(url).inc()

    def order(self, session_id: str, new_tokens: int) -> tuple[list[str], str | None]:
        """The pods to try, up ones first, ejected ones left out; and why the policy's first choice is not first
        (``down``, ``ejected``; None: it is)."""
        now = time.monotonic()
        urls = self.urls
        if not urls:
            return [], None
        views = [PodView(self.outstanding[u], self.is_up(u, now)) for u in urls]
        last = self.sessions.get(session_id)
        session = None
        if last is not None and last[0] in urls:
            session = SessionView(urls.index(last[0]), last[1])
        self.turns += 1
        order = preference(self.config.policy, session_id, urls, views, session,
                           new_tokens, self.turns - 1, self.weights, [self._rng.random() for _ in urls])
        out = self.ejected(now)
        tried = [urls[i] for i in order if views[i].up and urls[i] not in out]
        tried += [urls[i] for i in order if not views[i].up and urls[i] not in out]
        first = urls[order[0]]
        return tried, "ejected" if first in out else None if views[order[0]].up else "down"

    def remember(self, session_id: str, pod: str, answer: Any) -> None:
        history = answer.get("history") if isinstance(answer, dict) else None
        tokens = 0
        if isinstance(history, dict):
            tokens = int(history.get("prompt_tokens", 0)) + len(answer.get("tokens", ()))
        last = self.sessions.get(session_id)
        if last is not None and last[0] != pod:
            self.metrics.moved.inc()
        self.sessions[session_id] = (pod, tokens)
        self.sessions.move_to_end(session_id)
        while len(self.sessions) > self.config.sessions:
            self.sessions.popitem(last=False)

    def _begin(self, url: str) -> None:
        self.outstanding[url] = n = self.outstanding.get(url, 0) + 1
        self.metrics.outstanding.labels(url).set(n)

    def _end(self, url: str) -> None:
        self.outstanding[url] = n = self.outstanding[url] - 1
        self.metrics.outstanding.labels(url).set(n)
        self._forget_if_idle(url)  # a pod that left, its last turn ended

    async def forward(self, session_id: str, body: bytes, payload: Any, headers: dict[str, str]) -> Response:
        new = payload.get("prompt_tokens") if isinstance(payload, dict) else None
        new_tokens = new if isinstance(new, int) else len(new) if isinstance(new, list) else 0
        stream = isinstance(payload, dict) and payload.get("stream") is True
        order, reason = self.order(session_id, new_tokens)
        path = f"/v1/sessions/{session_id}/turns"
        http = self.next_client()
        for url in order:
            if reason is not None:  # not the policy's first choice: counted once, with why
                self.metrics.fallbacks.labels(reason).inc()
            self._begin(url)
            try:
                if stream:
                    return await self._stream(http, url, path, body, headers, session_id, new_tokens)
                async with asyncio.timeout(self.config.timeout_s):
                    resp = await http.post(url + path, content=body, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                # nothing reached the pod: safe to place the turn on the next pod
                self.down_until[url] = time.monotonic() + self.config.down_s
                self.observe(url, failed=True, local=True)
                reason = "refused"
                continue
            except (TimeoutError, httpx.TimeoutException):
                self.observe(url, failed=True, local=True)
                self.metrics.timeouts.labels(url).inc()
                self.metrics.turns.labels(url, "504").inc()
                return JSONResponse({"detail": f"pod {url} did not answer within timeout_s="
                                     f"{self.config.timeout_s:g} s; the turn may have been stored (retry with "
                                     "the same Idempotency-Key)"}, 504, headers={SERVED_BY: url})
            except httpx.HTTPError as exc:
                self.observe(url, failed=True, local=True)  # reset, or a broken answer
                self.metrics.turns.labels(url, "502").inc()
                return JSONResponse({"detail": f"pod {url} failed: {type(exc).__name__}: {exc}"}, 502,
                                    headers={SERVED_BY: url})
            finally:
                if not stream:
                    self._end(url)
            self.metrics.turns.labels(url, str(resp.status_code)).inc()
            self.observe(url, failed=resp.status_code >= 500)
            if resp.status_code == 503 and _refused_unseen(resp):
                reason = "draining"  # the pod turned it away before any work: the next choice takes it
                self.down_until[url] = time.monotonic() + self.config.down_s
                continue
            if resp.status_code == 200:
                with suppress(ValueError):  # a 200 that is not JSON: nothing to remember
                    self.remember(session_id, url, resp.json())
            out = {k: v for k, v in resp.headers.items() if k.lower() in _PASSED_HEADERS}
            return Response(resp.content, resp.status_code, headers={**out, SERVED_BY: url})
        self.metrics.turns.labels("none", "502").inc()
        detail = (f"no pod reachable (tried {', '.join(order)})" if order else
                  f"no pod known yet (pods_from_dns {self.config.pods_from_dns} gave no address)")
        return JSONResponse({"detail": detail}, 502, headers={"Retry-After": "1"})

    async def _stream(self, http: httpx.AsyncClient, url: str, path: str, body: bytes, headers: dict[str, str],
                      session_id: str, new_tokens: int) -> Response:
        """Relay a streamed turn: the pod's status and first bytes within ``timeout_s``, then each read too."""
        req = http.build_request("POST", url + path, content=body, headers=headers)
        try:
            async with asyncio.timeout(self.config.timeout_s):
                resp = await http.send(req, stream=True)
        except BaseException:
            self._end(url)
            raise
        self.metrics.turns.labels(url, str(resp.status_code)).inc()
        self.observe(url, failed=resp.status_code >= 500)  # its status, with its headers
        if resp.status_code == 200:  # the answer's length is in its last event: counted as the message's
            last = self.sessions.get(session_id)
            self.remember(session_id, url, {"history": {"prompt_tokens": (last[1] if last else 0) + new_tokens}})

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():  # each read bounded by the client's read timeout
                    yield chunk
            except httpx.TimeoutException:
                self.metrics.timeouts.labels(url).inc()
                yield (b'event: error\ndata: {"status": 504, "detail": "pod did not answer within timeout_s"}\n\n')
            finally:
                await resp.aclose()
                self._end(url)

        out = {k: v for k, v in resp.headers.items() if k.lower() in _PASSED_HEADERS}
        return StreamingResponse(relay(), resp.status_code, headers={**out, SERVED_BY: url})


#: The pod's 503s that say it did nothing with the turn (docs/pod.md): safe to place it on another pod.
_UNSEEN_503 = ("pod is draining", "pod is shutting down")


def _refused_unseen(resp: httpx.Response) -> bool:
    try:
        detail = resp.json().get("detail", "")
    except (ValueError, AttributeError):
        return False
    return isinstance(detail, str) and detail.startswith(_UNSEEN_503)


Resolver = Callable[[], Awaitable[list[str]]]


async def refresh_pods(router: Router, resolve: Resolver) -> None:
    """One lookup: its pods replace the router's, unless it failed or found none (then the last list stays)."""
    try:
        urls = await resolve()
    except (OSError, TimeoutError):
        router.metrics.lookups.labels("failed").inc()
        return
    if not urls:
        router.metrics.lookups.labels("empty").inc()
        return
    router.metrics.lookups.labels("ok").inc()
    router.set_pods(urls)


def create_router_app(config: RouterConfig, resolve: Resolver | None = None) -> FastAPI:
    """The router's ASGI app: ``POST /v1/sessions/{id}/turns`` (placed and passed through), ``/metrics``,
    ``/healthz`` and ``/readyz`` (200 while some pod is not marked down). With ``pods_from_dns`` the pods
    come from ``resolve`` (default :func:`resolve_pods` on it), once before serving and every ``refresh_s``."""
    router = Router(config)
    if resolve is None and config.pods_from_dns is not None:
        address = config.pods_from_dns

        async def resolve() -> list[str]:
            return await resolve_pods(address, config.connect_timeout_s)

    async def keep_looking(lookup: Resolver) -> None:
        while True:
            await asyncio.sleep(config.refresh_s)
            await refresh_pods(router, lookup)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        async with http_clients(ConnectionPools(shards=16, connections=64, keepalive=16), timeout) as clients:
            router.clients = clients
            looker = None
            if config.pods_from_dns is not None:
                assert resolve is not None
                await refresh_pods(router, resolve)
                looker = asyncio.create_task(keep_looking(resolve))
            try:
                yield
            finally:
                if looker is not None:
                    looker.cancel()
                    with suppress(asyncio.CancelledError):
                        await looker
        router.clients = []

    app = FastAPI(title="capsim router", version="1", lifespan=lifespan)
    app.state.router = router

    @app.post("/v1/sessions/{session_id}/turns", response_model=None)
    async def turn(session_id: str, request: Request) -> Response:
        body = await request.body()
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None  # the pod answers the 422 with its reason
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "idempotency-key")}
        return await router.forward(session_id, body, payload, headers)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import generate_latest

        return PlainTextResponse(generate_latest(router.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        now = time.monotonic()
        up = [u for u in router.urls if router.is_up(u, now)]
        return JSONResponse({"ready": bool(up), "pods_up": up}, 200 if up else 503)

    return app


def serve_router(config: RouterConfig, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Run the router on uvicorn until SIGTERM/SIGINT."""
    import uvicorn

    uvicorn.run(create_router_app(config), host=host, port=port, log_level=log_level, access_log=False,
                timeout_keep_alive=SERVER_KEEP_ALIVE_S)  # over the clients' keepalive_expiry (http_pools)

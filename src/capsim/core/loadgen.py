"""An open-loop HTTP load generator for agent pods that writes the simulator's request records.

Sessions start at the workload's times whether or not earlier requests have been answered (open loop);
a session's later turns follow its previous answer after the think time. Each attempt has a timeout;
failed, rejected (429) and timed-out attempts are retried with exponential backoff, as the simulated
client does. Every request becomes one row with the columns of ``capsim.model.request``; why attempts
failed (connection refused, timeout, HTTP status) is counted in ``frame.attrs["failures"]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import random
import secrets
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import httpx
import numpy as np

from capsim.core.http_pools import ConnectionPools, http_clients
from capsim.errors import CapsimError
from capsim.model.request import OUTCOMES, requests_frame
from capsim.policy.retry import retry_delay_s
from capsim.policy.routing import SERVED_BY, SESSION_HEADER

Routing = Literal["round_robin", "random", "session_affinity"]


class WorkloadLike(Protocol):
    """What the load generator needs of a workload (``capsim.model.workload.Workload`` has it)."""

    @property
    def session_start_s(self) -> np.ndarray: ...
    @property
    def turns(self) -> int: ...
    @property
    def think_time_s(self) -> float: ...
    @property
    def prompt_tokens(self) -> np.ndarray: ...
    @property
    def output_tokens(self) -> np.ndarray: ...


class LoadgenError(CapsimError, ValueError):
    """Bad load-generator input: a target off loopback without ``allow_remote``, a bad bound."""


@dataclass(frozen=True)
class ClientPolicy:
    """The simulated client's settings: per-attempt timeout and retries with backoff."""

    timeout_s: float = 60.0
    max_retries: int = 2
    backoff_s: float = 1.0
    backoff_multiplier: float = 2.0
    backoff_jitter: float = 0.0  # share of each backoff drawn at random (capsim.policy.retry)


def check_targets(targets: Sequence[str], allow_remote: bool = False) -> list[str]:
    """Normalize target base URLs; refuse anything but loopback unless ``allow_remote``."""
    if not targets:
        raise LoadgenError("at least one target URL is needed")
    out = []
    for url in targets:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LoadgenError(f"target must be an http(s) URL with a host, got {url!r}")
        if not allow_remote and not _is_loopback(parts.hostname):
            raise LoadgenError(f"target {url!r} is not on loopback; pass allow_remote to send load elsewhere")
        out.append(url.rstrip("/"))
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


_OK, _REJECTED, _TIMED_OUT, _FAILED = (OUTCOMES.index(o) for o in ("ok", "rejected", "timed_out", "failed"))


# One attempt: (outcome, queue_s, ttft_s, batch_size, why it failed or None)
_Result = tuple[int, float, float, int, str | None]
CUT_OFF = "cut off at max_duration_s"


def _nothing(outcome: int, why: str) -> _Result:
    """An attempt that produced no answer."""
    return outcome, float("nan"), float("nan"), 0, why


def _status(status: int) -> _Result:
    """A non-200 answer: 429 is a rejection (the client may retry later), anything else a failure."""
    return _nothing(_REJECTED if status == 429 else _FAILED, f"HTTP {status}")


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (httpx wraps the OS error in its own)."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(out) < 10:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _transport_failure(exc: BaseException) -> _Result:
    """A request that got no HTTP answer, with the reason a person would want in the summary."""
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return _nothing(_TIMED_OUT, "timeout")
    if isinstance(exc, httpx.ConnectError):
        refused = any(isinstance(e, ConnectionRefusedError) or "refused" in str(e).lower() for e in _chain(exc))
        return _nothing(_FAILED, "connection refused" if refused else f"cannot connect ({exc})")
    if isinstance(exc, httpx.RemoteProtocolError):
        return _nothing(_FAILED, "connection closed by the server")
    return _nothing(_FAILED, f"{type(exc).__name__}: {exc}")


class _Records:
    """Preallocated columns, one row per request."""

    def __init__(self, n: int, prompt: np.ndarray, output: np.ndarray, turns: int) -> None:
        self.request_id = np.arange(n, dtype=np.int64)
        self.session_id = self.request_id // turns
        self.pod = np.full(n, -1, dtype=np.int32)
        self.arrival_s = np.full(n, np.nan)
        self.start_s = np.full(n, np.nan)
        self.first_token_s = np.full(n, np.nan)
        self.end_s = np.full(n, np.nan)
        self.token_span_s = np.full(n, np.nan)  # the pod's own first-to-last-token time (answer timings)
        self.received_s = np.full(n, np.nan)  # when the pod received the last attempt, on its clock less t0
        self.way_in_s = np.full(n, np.nan)  # its send to that receipt, where the row is on the pod's clock
        self.load_s = np.full(n, np.nan)  # the pod's receipt to its engine (the history read; answer's history)
        self.served_by = [""] * n  # the pod a router says answered (its SERVED_BY header; "" without one)
        self.batch_size = np.zeros(n, dtype=np.int32)
        self.prompt_tokens = prompt[:n].astype(np.int32)
        self.output_tokens = output[:n].astype(np.int32)
        self.attempts = np.zeros(n, dtype=np.int32)
        self.outcome = np.full(n, -1, dtype=np.int8)  # -1: never sent (bounded run ended first)
        # the schedule of each session's first turn, against which its send time is late (or not)
        self.scheduled_s = np.full(n, np.nan)

    def frame(self) -> Any:
        sent = self.outcome >= 0
        cols = {k: getattr(self, k)[sent] for k in (
            "request_id", "session_id", "pod", "arrival_s", "start_s", "first_token_s", "end_s",
            "batch_size", "prompt_tokens", "output_tokens", "attempts", "outcome")}
        return requests_frame(cols)


async def run_load(
    targets: Sequence[str],
    workload: WorkloadLike,
    *,
    client: ClientPolicy | None = None,
    routing: Routing = "round_robin",
    max_requests: int | None = None,
    max_duration_s: float = 600.0,
    stream: bool = False,
    allow_remote: bool = False,
    seed: int = 0,
    progress: bool = False,
    session_tag: str | None = None,
    messages: Callable[[int], Sequence[int]] | None = None,
    think: Callable[[], float] | None = None,
    pod_clock: bool = False,
    pools: ConnectionPools | None = None,
    on_start: Callable[[], None] | None = None,
) -> Any:
    """Replay ``workload`` against the pods at ``targets``; return the requests DataFrame.

    Bounded: at most ``max_requests`` requests are sent, and the whole run, requests in flight
    included, ends after ``max_duration_s`` seconds: a request still open then is recorded as
    timed out (reason ``CUT_OFF``). ``frame.attrs["failures"]`` counts failed attempts by reason.

    Session ``k`` of the run is ``{session_tag}-s{k}`` on the pods; the tag is fresh per run unless given,
    so a second run against the same pods starts new conversations rather than continuing the first run's
    (the pod prefills a session's stored history: reused ids would grow every prompt run after run).

    Growing sessions (``capsim validate --mode sessions``): ``messages(r)`` gives request ``r``'s new message
    as token ids (its count is then the workload's ``prompt_tokens[r]``); the frame's ``prompt_tokens`` is
    then what the pod prefilled (history plus message, from the answer) and a column ``cached_tokens`` holds
    the prompt tokens the pod served from its prefix cache (NaN where its answer does not say). ``think()``
    draws each think time when the previous answer arrives (the simulated client's order), instead of the
    workload's constant.

    A row's ``start_s`` and ``first_token_s`` are its send time plus the pod's ``queue_s`` and ``ttft_s``,
    which the pod counts from when it received the request: the way in (the pod's HTTP server reading and
    parsing the request, late when its event loop is busy) is left out of the time to first token. With
    ``pod_clock`` (a pod on this host, whose ``perf_counter`` is the same monotonic clock) they are the
    pod's own receipt (its answer's ``timings.received_at``) plus those timings, so the time to first token
    counts from the send, as a client sees it and as the simulator counts it. A receipt before the send or
    after the answer came back is not this clock: that row keeps the send time, and
    ``frame.attrs["pod_clock_rejected"]`` counts such rows (``["pod_clock_rows"]`` those on the pod's clock;
    ``["way_in_s"]``, per sent row, the send to the receipt, NaN off the pod's clock; ``["load_s"]``, per sent
    row, the pod's receipt to its engine, the history read its answer reports, on any clock).
    A streamed row's time to first token is the client's own in either case (its start, receipt, way in and
    the pod's token span come from the stream's done event, as from an unstreamed answer).

    ``pools``: how the generator holds its connections (``ConnectionPools``; default 16 pools of 128). The
    send time is taken before the client's own work on the request, so a generator short of CPU shows up in
    the way in, and in ``frame.attrs["send_error_s"]`` when it falls behind its schedule;
    ``["generator_cpu_s"]`` and ``["generator_busy"]`` (the process's share of a core per
    ``GENERATOR_WINDOW_S``) say whether it was, and ``generator_saturated(frame)`` words it.

    ``on_start()`` is called at the schedule's zero (``frame.attrs["t0_monotonic"]``), before the first send: a
    fault timed from it (the sessions validation's crash) falls on the rows' clock.
    """
    urls = check_targets(targets, allow_remote)
    policy = client or ClientPolicy()
    tag = secrets.token_hex(4) if session_tag is None else session_tag
    if max_duration_s <= 0:
        raise LoadgenError(f"max_duration_s must be > 0, got {max_duration_s}")
    turns = workload.turns
    n = len(workload.prompt_tokens)
    if max_requests is not None:
        if max_requests < 1:
            raise LoadgenError(f"max_requests must be >= 1, got {max_requests}")
        n = min(n, max_requests)
    rec = _Records(n, workload.prompt_tokens, workload.output_tokens, turns)
    rng = random.Random(seed)
    jitter_rng = random.Random(f"{seed}:retries")  # its own stream: jitter leaves the routing draws alone
    rr = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc="requests", disable=not progress)
    failures: Counter[str] = Counter()
    open_requests: set[int] = set()
    clock = [0, 0]  # rows placed on the pod's clock, rows whose receipt was not on this host's clock
    histories: dict[int, dict[str, Any]] = {}  # request -> the answer's "history" (messages given)
    timeout = httpx.Timeout(policy.timeout_s, connect=min(policy.timeout_s, 5.0))

    async with frozen_heap(), http_clients(pools, timeout) as shards:
        # the schedule's zero once the clients are built, so building them delays no request
        t0 = time.perf_counter()
        deadline = t0 + max_duration_s
        if on_start is not None:
            on_start()

        def pick(session: int) -> int:
            nonlocal rr
            if routing == "session_affinity":
                return session % len(urls)
            if routing == "random":
                return rng.randrange(len(urls))
            rr += 1
            return (rr - 1) % len(urls)

        async def attempt(r: int, pod: int) -> _Result:
            """One HTTP attempt: (outcome, queue_s, ttft_s, batch_size, why) with times from sending."""
            http = shards[r % len(shards)]
            session_key = f"{tag}-s{rec.session_id[r]}"
            url = f"{urls[pod]}/v1/sessions/{session_key}/turns"
            headers = {SESSION_HEADER: session_key}  # for a proxy that hashes sessions onto pods
            tokens: int | list[int] = int(rec.prompt_tokens[r]) if messages is None else list(messages(r))
            body = {"prompt_tokens": tokens, "max_new_tokens": int(rec.output_tokens[r])}
            client_ttft: float | None = None  # streamed: the client's own, from its send
            if stream:
                got = await _attempt_stream(http, url, body, policy.timeout_s, headers)
                if len(got) != 3:
                    return got  # a failure
                data, client_ttft, rec.served_by[r] = got
            else:
                try:
                    resp = await asyncio.wait_for(http.post(url, json=body, headers=headers), policy.timeout_s)
                except (TimeoutError, httpx.HTTPError) as exc:
                    return _transport_failure(exc)
                if resp.status_code != 200:
                    return _status(resp.status_code)
                data = resp.json()
                rec.served_by[r] = resp.headers.get(SERVED_BY, "")
            # the same answer either way (a stream's done event carries it): its timings, receipt and history
            t = data["timings"]
            if "model_s" in t:  # model_s runs from the request's first step; its first token came ttft_s - queue_s in
                rec.token_span_s[r] = t["model_s"] - (t["ttft_s"] - t["queue_s"])
            if isinstance(t.get("received_at"), int | float):
                rec.received_s[r] = float(t["received_at"]) - t0
            history = data.get("history")
            if isinstance(history, dict):
                if isinstance(history.get("load_s"), int | float):
                    rec.load_s[r] = float(history["load_s"])
                if messages is not None:
                    histories[r] = history
            ttft_s = t["ttft_s"] if client_ttft is None else client_ttft
            return _OK, t["queue_s"], ttft_s, int(data["batch_size"]), None

        async def request(r: int) -> bool:
            """Send request ``r`` with retries; True when it succeeded."""
            session = int(rec.session_id[r])
            rec.arrival_s[r] = time.perf_counter() - t0
            open_requests.add(r)
            for k in range(policy.max_retries + 1):
                pod = pick(session)
                sent = time.perf_counter() - t0
                # what the row says if the run's bound cuts this attempt off
                rec.attempts[r], rec.pod[r], rec.outcome[r] = k + 1, pod, _TIMED_OUT
                rec.received_s[r] = rec.load_s[r] = np.nan
                rec.served_by[r] = ""
                outcome, queue_s, ttft_s, batch, why = await attempt(r, pod)
                rec.outcome[r] = outcome
                if why is not None:
                    failures[why] += 1
                if outcome == _OK:
                    base = pod_receipt(rec.received_s[r], sent, time.perf_counter() - t0) if pod_clock else None
                    if base is None:
                        if pod_clock and np.isfinite(rec.received_s[r]):
                            clock[1] += 1
                        base = sent
                    else:
                        clock[0] += 1
                        rec.way_in_s[r] = base - sent
                    rec.start_s[r] = base + queue_s
                    # streamed: the client's own time to first token, from its send
                    rec.first_token_s[r] = (sent if stream else base) + ttft_s
                    rec.batch_size[r] = batch
                    break
                if k < policy.max_retries:
                    u = jitter_rng.random() if policy.backoff_jitter > 0 else 0.0
                    await asyncio.sleep(retry_delay_s(k + 1, policy.backoff_s, policy.backoff_multiplier,
                                                      policy.backoff_jitter, u))
            rec.end_s[r] = time.perf_counter() - t0
            open_requests.discard(r)
            bar.update(1)
            return bool(rec.outcome[r] == _OK)

        async def session(s: int) -> None:
            await asyncio.sleep(max(float(workload.session_start_s[s]) - (time.perf_counter() - t0), 0.0))
            if s * turns < n:
                rec.scheduled_s[s * turns] = workload.session_start_s[s]
            for turn in range(turns):
                r = s * turns + turn
                if r >= n or time.perf_counter() > deadline:
                    return
                if not await request(r):
                    return  # a failed turn ends the conversation, as in the simulator
                pause = think() if think is not None and turn + 1 < turns else workload.think_time_s
                if turn + 1 < turns and pause > 0:
                    await asyncio.sleep(pause)

        sessions = [s for s in range(len(workload.session_start_s)) if s * turns < n
                    and workload.session_start_s[s] <= max_duration_s]
        busy = [(time.perf_counter(), time.process_time())]

        async def watch() -> None:  # the generator's own CPU, a point a window (late when its loop is saturated)
            while True:
                await asyncio.sleep(GENERATOR_WINDOW_S)
                busy.append((time.perf_counter(), time.process_time()))

        watcher = asyncio.create_task(watch())
        try:
            async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
                await asyncio.gather(*[session(s) for s in sessions])
        except TimeoutError:
            ended = time.perf_counter() - t0
            for r in open_requests:
                rec.end_s[r] = ended
            failures[CUT_OFF] += len(open_requests)
        finally:
            watcher.cancel()
            busy.append((time.perf_counter(), time.process_time()))
    bar.close()
    frame = rec.frame()
    sent = rec.outcome >= 0  # the frame's rows
    if messages is not None:  # what the pod prefilled and what of it its prefix cache served
        ids = frame["request_id"].to_numpy()
        frame["prompt_tokens"] = [int(histories.get(int(r), {}).get("prompt_tokens", p))
                                  for r, p in zip(ids, frame["prompt_tokens"], strict=True)]
        # NaN where the answer does not say (a pod whose engine does not report it), never a false 0
        frame["cached_tokens"] = [float(histories.get(int(r), {}).get("cached_tokens", np.nan)) for r in ids]
        # how long the pod took to read the session's history from its store, before the engine saw the turn
        frame["load_s"] = rec.load_s[sent]
    frame.attrs["failures"] = dict(failures.most_common())
    # how late each session's first request left against its schedule (s; the generator's own lag), and
    # the run's zero on the monotonic clock, so a pod's own timings can be lined up with these rows
    frame.attrs["send_error_s"] = (rec.arrival_s - rec.scheduled_s)[sent].tolist()  # a list: pandas compares attrs
    # the pod's own token span per row (NaN: failed, or an answer without model_s): the continuous validation's real ITL
    frame.attrs["token_span_s"] = rec.token_span_s[sent].tolist()
    frame.attrs["t0_monotonic"] = t0
    frame.attrs["pod_clock_rows"], frame.attrs["pod_clock_rejected"] = clock
    # per sent row, the way in (send to the pod's receipt, s; NaN off the pod's clock), what pod_clock adds
    frame.attrs["way_in_s"] = rec.way_in_s[sent].tolist()
    # per sent row, the pod's receipt to its engine (reading the session's history; NaN where the answer lacks it)
    frame.attrs["load_s"] = rec.load_s[sent].tolist()
    # per sent row, the pod that answered it as the router in front says (``SERVED_BY``; "" without a router or
    # an answer): the sessions validation's crash run tells the turns that moved off the crashed pod by it
    frame.attrs["served_by"] = [rec.served_by[int(r)] for r in np.flatnonzero(sent)]
    # the generator process's CPU seconds over the run and its busy share per window (generator_saturated)
    points = np.asarray(busy)
    if len(points) > 2 and points[-1, 0] - points[-2, 0] < GENERATOR_WINDOW_S / 2:
        points = np.delete(points, -2, axis=0)  # a short last window joins the one before: no share of a sliver
    frame.attrs["generator_cpu_s"] = float(points[-1, 1] - points[0, 1])
    frame.attrs["generator_busy"] = (np.diff(points[:, 1]) / np.maximum(np.diff(points[:, 0]), 1e-9)).tolist()
    return frame


#: the windows over which the generator's busy share is measured (s)
GENERATOR_WINDOW_S = 1.0
#: a window in which the generator's process used this share of a core or more counts as saturated
GENERATOR_SATURATED = 0.9


def generator_saturated(frame: Any) -> str | None:
    """What to warn when the load generator itself was short of CPU in a ``run_load`` frame: windows in which
    its process used ``GENERATOR_SATURATED`` of a core or more (its asyncio loop then sends late and reads
    answers late, a queue that looks like the target's); ``None`` otherwise, and for a frame without the
    measurement (kept before stop 31)."""
    shares = np.asarray(frame.attrs.get("generator_busy", ()), dtype=float)
    hot = int((shares >= GENERATOR_SATURATED).sum())
    if hot == 0:
        return None
    lag = np.asarray(frame.attrs.get("send_error_s", ()), dtype=float)
    late = f", sends late by {np.percentile(lag, 99) * 1e3:.0f} ms at p99" if lag.size else ""
    n = max(len(frame), 1)
    return (f"the load generator used {GENERATOR_SATURATED:.0%} of a core or more in {hot} of {shares.size} "
            f"{GENERATOR_WINDOW_S:g}-s windows ({frame.attrs.get('generator_cpu_s', 0.0) / n * 1e3:.1f} ms CPU a "
            f"request{late}): its own queue is in the way in and the answers")


@contextlib.asynccontextmanager
async def frozen_heap() -> AsyncIterator[None]:
    """The caller's heap frozen (``gc.collect``, ``gc.freeze``) while the block runs, then given back; nothing
    when something is frozen already (a pod in the same process). CPython's full collections walk every
    tracked object: in a process that has torch, pandas and the simulator loaded, 55 to 115 ms a pass
    measured in the load generator here (stop 31), and every send and answer due then waits."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


#: how far before its send a pod's receipt may read and still be on this host's clock (rounding)
_CLOCK_SLACK_S = 1e-3


def off_pod_clock(frame: Any) -> str | None:
    """``None`` when every answered row of a ``run_load(pod_clock=True)`` frame was placed on the pod's clock
    (its TTFT counts from the send); else what to warn: how many were not, whose TTFT counts from the pod's
    receipt. A frame without the counts (a run kept before stop 28) has no row on the pod's clock."""
    ok = int((frame.outcome == "ok").sum())
    on = int(frame.attrs.get("pod_clock_rows", 0))
    if on >= ok:
        return None
    rejected = frame.attrs.get("pod_clock_rejected")
    why = f" ({rejected} with a receipt outside their send and answer)" if rejected else ""
    return f"{ok - on} of {ok} answers not on this host's clock{why}: their TTFT counts from the pod's receipt"


def pod_receipt(received: float, sent: float, answered: float) -> float | None:
    """The pod's receipt of an attempt on the run's clock, when it lies between the attempt's send and its
    answer (less :data:`_CLOCK_SLACK_S`); ``None`` otherwise (absent, or the pod's clock is not this host's)."""
    if np.isfinite(received) and sent - _CLOCK_SLACK_S <= received <= answered + _CLOCK_SLACK_S:
        return max(float(received), sent)
    return None


async def _attempt_stream(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], timeout_s: float, headers: dict[str, str] | None = None
) -> _Result | tuple[dict[str, Any], float, str]:
    """A streaming attempt: its done event's answer (the same as an unstreamed answer: timings, receipt,
    history), the client's time to first token, when the first token event arrived, and the pod a router
    says served it (``SERVED_BY``, "" without one); or a failure."""
    import json

    start = time.perf_counter()
    ttft = np.nan
    try:
        async with asyncio.timeout(timeout_s), http.stream("POST", url, json={**body, "stream": True},
                                                         headers=headers) as resp:
            if resp.status_code != 200:
                return _status(resp.status_code)
            event = None
            async for line in resp.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    if event == "token" and np.isnan(ttft):
                        ttft = time.perf_counter() - start
                elif line.startswith("data: ") and event == "done":
                    return json.loads(line[6:]), ttft, resp.headers.get(SERVED_BY, "")
                elif line.startswith("data: ") and event == "error":
                    return _nothing(_FAILED, f"stream error {json.loads(line[6:]).get('status', '')}".strip())
    except (TimeoutError, httpx.HTTPError) as exc:
        return _transport_failure(exc)
    return _nothing(_FAILED, "stream ended without a done event")

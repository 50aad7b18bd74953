"""The real half of ``capsim validate --mode sessions``: a redis-server, two continuous pods with prefix
caching and a ``capsim router`` in front of them, and a growing-session workload replayed through it.

Every process is started fresh for each router policy, so each policy starts with empty prefix caches and
an empty store. The pods share the store (a session's history is in Redis, as the seed's design has it):
a turn the router sends to the other pod prefills the whole history there. Each message is token ids
drawn per session and turn (``message_ids``), so no two sessions share a KV block, as the simulator's
per-session block hashes assume; with counts instead, every prompt would start with the same synthetic
tokens and hit the cache across sessions.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capsim.errors import CapsimError
from capsim.studies.pods import PodProcess, free_port, metric_totals, stop_process

START_S = 180.0  # a pod's start on a busy machine (torch's import alone can take tens of seconds)
COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total")


class SessionsValidationError(CapsimError, RuntimeError):
    """The sessions validation cannot run here (no redis-server on PATH, a process that did not start)."""


def message_ids(seed: int, session: int, turn: int, n: int, vocab: int) -> list[int]:
    """The token ids of turn ``turn``'s new message in session ``session`` (turn 0: the first prompt):
    uniform over the vocabulary, from their own generator, so sessions share no block."""
    gen = np.random.default_rng([seed, session, turn])
    return [int(t) for t in gen.integers(0, vocab, n)]


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on loopback (no persistence) once it answers PING; and its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SessionsValidationError("redis-server is not on PATH (apt-get install redis-server): the pods share "
                                      "the sessions' history through it")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--logfile", str(workdir / f"redis-{port}.log")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise SessionsValidationError(f"redis-server on port {port} did not answer PING within 10 s")


def start_router(pod_urls: Sequence[str], policy: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A ``capsim router`` process in front of ``pod_urls`` (with ``policy``, else the router's default),
    once ``/healthz`` answers."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "capsim.cli", "router", "--port", str(port), "--log-level", "warning"]
    cmd += ["--policy", policy] if policy else []
    for url in pod_urls:
        cmd += ["--pod", url]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SessionsValidationError(f"capsim router exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SessionsValidationError("capsim router did not answer /healthz within 60 s")


def pod_counters(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """The prefix-cache and preemption counters of a pod's /metrics (summed over labels)."""
    return metric_totals(url, COUNTERS, timeout_s)


@dataclass
class Fleet:
    """The store, the two pods and the router of one policy; ``stop()`` ends them all."""

    pods: list[PodProcess]
    router_url: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self) -> None:
        for p in self.pods:
            p.stop()
        for proc in self.procs:
            stop_process(proc, 10.0)


def start_fleet(work: Path, policy: str, settings: dict[str, object], cores: Sequence[int | None]) -> Fleet:
    """A fresh redis-server, one pod per entry of ``cores`` (pinned there) with ``settings``, and the router."""
    redis, redis_url = start_redis(work)
    fleet = Fleet([], "", [redis])
    try:
        fleet.pods = [PodProcess(work, f"{policy}-{i}", core=core, redis_url=redis_url, **settings)
                      for i, core in enumerate(cores)]
        for p in fleet.pods:
            p.start(wait_ready=False)
        for p in fleet.pods:
            p.wait_ready(timeout_s=START_S)
        router, fleet.router_url = start_router([p.url for p in fleet.pods], policy)
        fleet.procs.append(router)
    except BaseException:
        fleet.stop()
        raise
    return fleet


@dataclass(frozen=True)
class Crash:
    """Kill pod ``pod`` of the fleet (SIGKILL: no drain, as a crashed container) ``at_s`` seconds into a run;
    it is not restarted (a real pod's start, torch's import first, outlasts the run)."""

    at_s: float
    pod: int = 1


@dataclass
class RealRun:
    """What a run through the fleet gave: the requests frame, the pods' counters over it (a crashed pod's up to
    its crash) and, with a crash, when it fell on the run's clock (seconds from the load generator's zero)
    and the URL of the pod it took."""

    frame: Any
    counters: dict[str, float]
    crashed_at_s: float | None = None
    crashed_url: str | None = None
    # from the SIGKILL until the killed process was reaped (its sockets closed: the window in which its kernel
    # still accepted turns and then reset them; data/validation/sessions/teardown-2026-12-05), s
    teardown_s: float | None = None


def run_real(fleet: Fleet, workload: Any, messages: Callable[[int], list[int]], think: Callable[[], float],
             max_duration_s: float, seed: int, crash: Crash | None = None) -> RealRun:
    """Replay ``workload`` through the fleet's router (no retries): the requests frame (with the pods'
    ``prompt_tokens`` and ``cached_tokens``) and the pods' counters over the run. With ``crash``, a timer
    scrapes the victim's counters and kills it ``crash.at_s`` after the replay starts; the turns it held fail
    at the router (502), and the router places the later turns of its sessions on the other pod, which
    prefills their whole history from the store."""
    import httpx

    from capsim.core.loadgen import ClientPolicy, run_load

    before = [pod_counters(p.url) for p in fleet.pods]
    at_crash: dict[str, float] | None = None
    killed = [float("nan"), float("nan")]  # the SIGKILL, and the victim reaped

    def kill() -> None:
        nonlocal at_crash
        assert crash is not None
        victim = fleet.pods[crash.pod]
        try:
            at_crash = pod_counters(victim.url, timeout_s=1.0)  # the crash waits at most this
        except (httpx.HTTPError, ValueError):  # a pod too busy to answer: its counters are lost, the crash goes on
            at_crash = None
        killed[0] = time.perf_counter()
        victim.kill()  # SIGKILL, then waits until the process is reaped: its memory torn down, its sockets closed
        killed[1] = time.perf_counter()

    timer = threading.Timer(crash.at_s, kill) if crash is not None else None
    if timer is not None:
        timer.daemon = True
    try:
        # the pods' timings on this host's clock: a turn's TTFT counts from its send, the way in through the router
        # included, as the simulator's does (``FleetProbe.way_in_ms``); the crash timed from the schedule's zero
        frame = asyncio.run(run_load([fleet.router_url], workload, client=ClientPolicy(timeout_s=60, max_retries=0),
                                     max_duration_s=max_duration_s, seed=seed, messages=messages, think=think,
                                     pod_clock=True, on_start=timer.start if timer is not None else None))
    finally:
        if timer is not None:
            timer.cancel()
            if timer.is_alive():
                timer.join()
    totals = dict.fromkeys(COUNTERS, 0.0)
    for i, pod in enumerate(fleet.pods):
        if crash is not None and i == crash.pod:
            after = at_crash if at_crash is not None else before[i]
        else:
            after = pod_counters(pod.url)
        for k in COUNTERS:
            totals[k] += after[k] - before[i][k]
    if crash is None or not np.isfinite(killed[0]):
        return RealRun(frame, totals)
    return RealRun(frame, totals, killed[0] - float(frame.attrs["t0_monotonic"]), fleet.pods[crash.pod].url,
                   killed[1] - killed[0] if np.isfinite(killed[1]) else None)

"""The load generator's own cost: CPU per request and lateness with many requests in flight.

The generator (``capsim.core.loadgen.run_load``) sends an open-loop Poisson schedule to a stub server that
answers each request after a fixed delay, so ``rate x delay`` requests are in flight; the stub runs as its
own process (uvicorn, a bare ASGI app) pinned to one core and the generator to the other. Each condition
runs with the connection layout before stop 31 (``ONE_POOL``: one httpx pool of 2048 connections keeping
512 idle) and with the default (``ConnectionPools()``: 16 pools of 128 keeping 16 idle), one after the other
in the same run. Reported per layout: the generator's CPU seconds per request (its process, from the
kernel's accounting), how late the requests left against their schedule (``send_error_s``, p50 and p99),
the way in (send to the stub's receipt) p99, and the ratio of the default's CPU per request to one pool's.

httpcore 1.0.9 walks every connection of a pool on each request's enqueue and release, so one pool's CPU
per request grows with the connections it holds (docs/validation.md, "The load generator's own queue").

    python benchmarks/bench_loadgen.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result
from capsim.core.http_pools import ONE_POOL, ConnectionPools
from capsim.core.loadgen import run_load
from capsim.sim.arrivals import Workload
from capsim.studies.pods import free_port, pinned

STUB = r"""
import asyncio, json, sys, time
import uvicorn
delay = float(sys.argv[2])
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    received = time.perf_counter()
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await asyncio.sleep(delay)
    body = json.dumps({"timings": {"queue_s": 0.0, "ttft_s": 0.0, "received_at": received},
                       "batch_size": 1}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", backlog=4096)
"""


def schedule(rate: float, seconds: float, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 1.5) + 10))
    t = t[t < seconds]
    return Workload(t, 1, 0.0, np.full(len(t), 16), np.full(len(t), 4))


def wait_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"stub server on port {port} not up within {timeout_s} s")


def one_run(url: str, rate: float, seconds: float, layout: ConnectionPools, seed: int) -> dict[str, float]:
    plan = schedule(rate, seconds, seed)
    c0 = time.process_time()
    df = asyncio.run(run_load([url], plan, max_duration_s=seconds + 60, seed=seed, pod_clock=True, pools=layout))
    cpu = time.process_time() - c0
    lag = np.asarray(df.attrs["send_error_s"])
    way = np.asarray(df.attrs["way_in_s"])
    ok = int((df.outcome == "ok").sum())
    return {"requests": len(df), "ok": ok, "cpu_ms_per_request": cpu / max(len(df), 1) * 1e3,
            "lag_p50_ms": float(np.percentile(lag, 50)) * 1e3, "lag_p99_ms": float(np.percentile(lag, 99)) * 1e3,
            "way_in_p99_ms": float(np.nanpercentile(way, 99)) * 1e3 if np.isfinite(way).any() else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    args = ap.parse_args()
    seconds = 4.0 if args.quick else 8.0
    # (rate per s, answer delay s): about 5, 100 and 400 requests in flight
    conditions = [(50.0, 0.1), (100.0, 1.0), (200.0, 2.0)]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    stub_core, gen_core = (cores[0], cores[1]) if len(cores) > 1 else (None, None)
    rows: list[list[object]] = []
    result: list[dict[str, object]] = []
    for rate, delay in conditions:
        port = free_port()
        server = subprocess.Popen(pinned([sys.executable, "-c", STUB, str(port), str(delay)], stub_core))
        try:
            wait_port(port)
            if gen_core is not None:
                os.sched_setaffinity(0, {gen_core})
            url = f"http://127.0.0.1:{port}"
            one_run(url, 20.0, 1.0, ConnectionPools(), 99)  # warm up the imports and the stub
            measured = {name: one_run(url, rate, seconds, layout, 0)
                        for name, layout in (("one pool", ONE_POOL), ("16 pools", ConnectionPools()))}
            ratio = measured["16 pools"]["cpu_ms_per_request"] / measured["one pool"]["cpu_ms_per_request"]
            for name, m in measured.items():
                rows.append([f"{rate:.0f}/s x {delay:g} s", f"{rate * delay:.0f}", name, m["requests"], m["ok"],
                             f"{m['cpu_ms_per_request']:.2f}", f"{m['lag_p50_ms']:.1f}", f"{m['lag_p99_ms']:.1f}",
                             f"{m['way_in_p99_ms']:.1f}", f"{ratio:.2f}" if name == "16 pools" else ""])
                result.append({"rate_per_s": rate, "delay_s": delay, "layout": name, **m})
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
            if cores:
                os.sched_setaffinity(0, set(cores))
    print_table("load generator: CPU per request and lateness by connection layout (ratio: 16 pools / one pool)",
                ["load", "in flight", "layout", "requests", "ok", "CPU ms/req", "late p50 ms", "late p99 ms",
                 "way in p99 ms", "CPU ratio"], rows)
    write_result("loadgen", {"seconds_per_run": seconds, "runs": result})


if __name__ == "__main__":
    main()

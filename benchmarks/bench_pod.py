"""The agent pod over HTTP versus its engine alone: what the HTTP and session-state layers cost.

The pod runs as its own process pinned to one core with one torch thread; a closed loop of clients
runs on the other core. The baseline is the same engine, same workload and same batch settings
driven in-process through the batcher on the same core, in the same run. Reports requests/s with
p50/p99 at batch 1 and at the best batch, the engine's busy share, the pod/engine throughput ratio
(target, issue 11: the pod keeps at least 90% of the engine's batched throughput), and the CPU time
each request costs the process (all its threads, from the kernel's accounting): on a machine shared
with other work the throughput ratio moves with their load, the CPU per request much less, and
engine CPU / pod CPU is the share the pod would keep on a core of its own.

The pod's session store is a real redis-server (pinned to the clients' core) when one is on PATH, as
in a deployment; ``--store memory`` measures the embedded fakeredis instead, whose emulation of Redis
runs in the pod's own event loop (``docs/benchmarks.md`` has both).

    python benchmarks/bench_pod.py [--quick] [--rounds N] [--store redis|memory]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result
from capsim.studies.pods import PodProcess, pinned

PROMPT, OUTPUT = 64, 128

ENGINE_ONLY = r"""
import asyncio, json, sys, time
from capsim.core.batcher import DynamicBatcher
from capsim.core.engine import ReferenceEngine
from capsim.model.settings import BatchSettings
batch, clients, duration, prompt, output = (int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
                                            int(sys.argv[4]), int(sys.argv[5]))
engine = ReferenceEngine("tiny", device="cpu", threads=1)
engine.generate([engine.request(prompt, output)])
busy = 0.0
inner = engine.runner()
async def timed(items):
    global busy
    t0 = time.perf_counter()
    try:
        return await inner(items)
    finally:
        busy += time.perf_counter() - t0
async def main():
    lat = []
    async with DynamicBatcher(timed, BatchSettings(max_batch_size=batch, max_wait_ms=2)) as b:
        stop = time.perf_counter() + duration
        async def client(k):
            i = 0
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                await b.submit(engine.request(prompt, output, salt=k * 10000 + i))
                lat.append(time.perf_counter() - t0)
                i += 1
        t0, c0, l0 = time.perf_counter(), time.process_time(), time.thread_time()
        await asyncio.gather(*[client(k) for k in range(clients)])
        wall, cpu, loop = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - l0
    print(json.dumps({"n": len(lat), "wall": wall, "busy": busy, "lat": lat, "cpu": cpu, "loop": loop}))
asyncio.run(main())
"""


def engine_only(batch: int, clients: int, duration: float, core: int | None) -> dict[str, float]:
    cmd = [sys.executable, "-c", ENGINE_ONLY, str(batch), str(clients), str(duration), str(PROMPT), str(OUTPUT)]
    out = subprocess.run(pinned(cmd, core), capture_output=True, text=True, check=True, timeout=600)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return _row(batch, data["n"], data["wall"], np.asarray(data["lat"]), data["busy"] / data["wall"], data["cpu"],
                data["loop"])


def _row(batch: int, n: int, wall: float, lat: np.ndarray, busy: float, cpu_s: float,
         loop_s: float) -> dict[str, float]:
    return {"batch": batch, "requests": n, "req_per_s": n / wall, "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "busy_share": busy, "cpu_ms_per_req": cpu_s / n * 1e3,
            "loop_cpu_ms_per_req": loop_s / n * 1e3}


def _cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (all threads) or of one of its threads, from ``/proc``
    (NaN where there is none). The main thread of the pod runs the event loop: HTTP, JSON, the store
    and the batcher; the model runs in worker threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pod_run(batch: int, clients: int, duration: float, core: int | None, store_url: str) -> dict[str, float]:
    # the pod prefills a session's stored history ahead of the new message, and one redis-server serves every
    # row: a session name reused by a later row would continue an earlier row's conversation with a longer
    # prompt than the engine-only baseline's, so every row gets its own (as the load generator's run tags)
    tag = os.urandom(4).hex()
    with tempfile.TemporaryDirectory() as logs:
        pod = PodProcess(Path(logs), "bench", core=core, torch_threads=1, max_batch_size=batch, max_wait_ms=2,
                         queue_capacity=4096, redis_url=store_url).start(wait_ready=False)
        try:
            pod.wait_ready(timeout_s=600)  # a loaded machine can take minutes to import torch
            lat: list[float] = []
            errors: list[str] = []

            async def main() -> float:
                async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=512)) as c:
                    stop = time.perf_counter() + duration

                    async def client(k: int) -> None:
                        i = 0
                        while time.perf_counter() < stop:
                            t0 = time.perf_counter()
                            r = await c.post(f"{pod.url}/v1/sessions/{tag}-b{k}-{i}/turns",
                                             json={"prompt_tokens": PROMPT, "max_new_tokens": OUTPUT})
                            if r.status_code == 200:
                                lat.append(time.perf_counter() - t0)
                            else:  # counted, not fatal: an overloaded shared machine can starve the pod
                                errors.append(f"{r.status_code} {r.text[:120]}")
                            i += 1

                    t0 = time.perf_counter()
                    await asyncio.gather(*[client(k) for k in range(clients)])
                    return time.perf_counter() - t0

            cpu0, loop0 = _cpu_s(pod.pid), _cpu_s(pod.pid, pod.pid)
            wall = asyncio.run(main())
            cpu, loop = _cpu_s(pod.pid) - cpu0, _cpu_s(pod.pid, pod.pid) - loop0
            metrics = httpx.get(f"{pod.url}/metrics", timeout=5).text
            service = _metric_sum(metrics, "capsim_batch_service_seconds_sum")
            busy = service / wall if service is not None else float("nan")
            if errors:
                print(f"pod at batch {batch}: {len(errors)} failed requests, e.g. {errors[0]}", file=sys.stderr)
            return _row(batch, len(lat), wall, np.asarray(lat), busy, cpu, loop)
        finally:
            pod.stop()
            pod.kill()


def _metric_sum(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.split()[-1])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--rounds", type=int, default=1, help="engine/pod pairs at the best batch (median reported)")
    ap.add_argument("--store", choices=("redis", "memory"), default="redis" if shutil.which("redis-server") else
                    "memory", help="the pod's session store: a redis-server on loopback, or embedded fakeredis")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pod_core = cores[0] if len(cores) > 1 else None
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[1]})
    duration = 4.0 if args.quick else 10.0
    rows = []
    with tempfile.TemporaryDirectory(prefix="capsim-bench-redis-") as tmp:
        redis = None
        store_url = "memory://"
        if args.store == "redis":
            from capsim.studies.validate_sessions_real import start_redis

            redis, store_url = start_redis(Path(tmp))
            if len(cores) > 1:
                os.sched_setaffinity(redis.pid, {cores[1]})  # on the clients' core, not the pod's
        try:
            # each pair runs engine then pod back to back, so the other load on the machine hits both alike
            for batch in (1, *[16] * max(1, args.rounds)):
                clients = 2 * batch
                eng = engine_only(batch, clients, duration, pod_core)
                pod = pod_run(batch, clients, duration, pod_core, store_url)
                rows.append((batch, eng, pod))
        finally:
            if redis is not None:
                redis.terminate()
                redis.wait(timeout=10)
    table = []
    for batch, eng, pod in rows:
        for name, r in (("engine only", eng), ("pod over HTTP", pod)):
            table.append([batch, name, r["requests"], r["req_per_s"], r["p50_ms"], r["p99_ms"],
                          f"{r['busy_share']:.1%}", r["cpu_ms_per_req"], r["loop_cpu_ms_per_req"],
                          r["req_per_s"] / eng["req_per_s"],
                          eng["cpu_ms_per_req"] / r["cpu_ms_per_req"]])
    print_table(
        f"pod vs engine alone: prompt {PROMPT}, output {OUTPUT} tokens, tiny model, 1 core + 1 torch thread, "
        f"closed loop of 2 x batch clients, {duration:g} s per row, session store {args.store}",
        ["batch", "what", "requests", "req/s", "p50 ms", "p99 ms", "model busy", "CPU ms/req", "loop CPU ms/req",
         "ratio to engine",
         "engine CPU / CPU"],
        table,
    )
    best = [(e, p) for b, e, p in rows if b == 16]
    kept = float(np.median([p["req_per_s"] / e["req_per_s"] for e, p in best]))
    cpu_kept = float(np.median([e["cpu_ms_per_req"] / p["cpu_ms_per_req"] for e, p in best]))
    extra = float(np.median([p["cpu_ms_per_req"] - e["cpu_ms_per_req"] for e, p in best]))
    loop_extra = float(np.median([p["loop_cpu_ms_per_req"] - e["loop_cpu_ms_per_req"] for e, p in best]))
    print(f"\npod keeps {kept:.1%} of the engine's batched throughput (target >= 90%); by CPU per request "
          f"{cpu_kept:.1%} (the pod spends {extra:.2f} ms more per request than the engine alone, "
          f"{loop_extra:.2f} ms of it in its event loop: HTTP, JSON, the session store)")
    write_result("pod", {"prompt": PROMPT, "output": OUTPUT, "duration_s": duration, "store": args.store,
                         "rows": [{"batch": b, "engine": e, "pod": p} for b, e, p in rows],
                         "pod_to_engine_at_best_batch": kept, "engine_cpu_to_pod_cpu_at_best_batch": cpu_kept,
                         "pod_extra_cpu_ms_per_request": extra, "pod_extra_loop_cpu_ms_per_request": loop_extra})


if __name__ == "__main__":
    main()

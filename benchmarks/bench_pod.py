"""The agent pod over HTTP versus its engine alone: what the HTTP and session-state layers cost.

The pod runs as its own process pinned to one core with one torch thread; a closed loop of clients
runs on the other core. The baseline is the same engine, same workload and same batch settings
driven in-process through the batcher on the same core, in the same run. Reports requests/s with
p50/p99 at batch 1 and at the best batch, the engine's busy share, and the pod/engine throughput ratio
(target: the pod keeps at least 85% of the engine's batched throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
        t0 = time.perf_counter()
        await asyncio.gather(*[client(k) for k in range(clients)])
        wall = time.perf_counter() - t0
    print(json.dumps({"n": len(lat), "wall": wall, "busy": busy, "lat": lat}))
asyncio.run(main())
"""


def engine_only(batch: int, clients: int, duration: float, core: int | None) -> dict[str, float]:
    cmd = [sys.executable, "-c", ENGINE_ONLY, str(batch), str(clients), str(duration), str(PROMPT), str(OUTPUT)]
    out = subprocess.run(pinned(cmd, core), capture_output=True, text=True, check=True, timeout=600)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return _row(batch, data["n"], data["wall"], np.asarray(data["lat"]), data["busy"] / data["wall"])


def _row(batch: int, n: int, wall: float, lat: np.ndarray, busy: float) -> dict[str, float]:
    return {"batch": batch, "requests": n, "req_per_s": n / wall, "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "busy_share": busy}


def pod_run(batch: int, clients: int, duration: float, core: int | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as logs:
        pod = PodProcess(Path(logs), "bench", core=core, torch_threads=1, max_batch_size=batch, max_wait_ms=2,
                         queue_capacity=4096).start()
        try:
            lat: list[float] = []

            async def main() -> float:
                async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=512)) as c:
                    stop = time.perf_counter() + duration

                    async def client(k: int) -> None:
                        i = 0
                        while time.perf_counter() < stop:
                            t0 = time.perf_counter()
                            r = await c.post(f"{pod.url}/v1/sessions/b{k}-{i}/turns",
                                             json={"prompt_tokens": PROMPT, "max_new_tokens": OUTPUT})
                            r.raise_for_status()
                            lat.append(time.perf_counter() - t0)
                            i += 1

                    t0 = time.perf_counter()
                    await asyncio.gather(*[client(k) for k in range(clients)])
                    return time.perf_counter() - t0

            wall = asyncio.run(main())
            metrics = httpx.get(f"{pod.url}/metrics", timeout=5).text
            service = _metric_sum(metrics, "capsim_batch_service_seconds_sum")
            busy = service / wall if service is not None else float("nan")
            return _row(batch, len(lat), wall, np.asarray(lat), busy)
        finally:
            pod.stop()


def _metric_sum(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.split()[-1])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pod_core = cores[0] if len(cores) > 1 else None
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[1]})
    duration = 4.0 if args.quick else 10.0
    rows = []
    for batch in (1, 16):
        clients = 2 * batch
        eng = engine_only(batch, clients, duration, pod_core)
        pod = pod_run(batch, clients, duration, pod_core)
        rows.append((batch, eng, pod))
    table = []
    for batch, eng, pod in rows:
        for name, r in (("engine only", eng), ("pod over HTTP", pod)):
            table.append([batch, name, r["requests"], r["req_per_s"], r["p50_ms"], r["p99_ms"],
                          f"{r['busy_share']:.1%}", r["req_per_s"] / eng["req_per_s"]])
    print_table(
        f"pod vs engine alone: prompt {PROMPT}, output {OUTPUT} tokens, tiny model, 1 core + 1 torch thread, "
        f"closed loop of 2 x batch clients, {duration:g} s per row",
        ["batch", "what", "requests", "req/s", "p50 ms", "p99 ms", "model busy", "ratio to engine"],
        table,
    )
    best_eng, best_pod = rows[-1][1], rows[-1][2]
    kept = best_pod["req_per_s"] / best_eng["req_per_s"]
    print(f"\npod keeps {kept:.1%} of the engine's batched throughput (target >= 85%)")
    write_result("pod", {"prompt": PROMPT, "output": OUTPUT, "duration_s": duration,
                         "rows": [{"batch": b, "engine": e, "pod": p} for b, e, p in rows],
                         "pod_to_engine_at_best_batch": kept})


if __name__ == "__main__":
    main()

"""The real engine end to end through the batcher: throughput and latency at batch 1 vs batched.

Decode-heavy requests (short prompt, long output) from a closed loop of 2 x batch clients keep the
pod saturated. Reports requests/s, p50/p99 latency, the batching speedup over batch 1 measured in the
same run, and the share of wall time the model is busy. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result
from capsim.core.batcher import DynamicBatcher
from capsim.core.engine import GenerationRequest, ReferenceEngine
from capsim.model.settings import BatchSettings

PROMPT, OUTPUT = 16, 64


async def saturate(engine: ReferenceEngine, batch: int, duration_s: float) -> dict[str, float]:
    busy = 0.0
    inner = engine.runner()

    async def timed(items: list[GenerationRequest]) -> object:
        nonlocal busy
        t0 = time.perf_counter()
        try:
            return await inner(items)
        finally:
            busy += time.perf_counter() - t0

    settings = BatchSettings(max_batch_size=batch, max_wait_ms=5.0, queue_capacity=4 * batch)
    latencies: list[float] = []
    async with DynamicBatcher(timed, settings) as b:
        # One untimed full batch first: each row runs on a fresh event loop, so on a fresh worker thread, and on
        # a GPU the first pass of a thread and of a batch shape pays one-off costs (cuBLAS handles, lazily
        # loaded kernels) of seconds, more than a quick row lasts (on the H200, every quick row measured that).
        await asyncio.gather(*[b.submit(engine.request(PROMPT, OUTPUT, salt=-1 - k)) for k in range(batch)])
        busy = 0.0
        stop = time.perf_counter() + duration_s

        async def client(k: int) -> None:
            i = 0
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                await b.submit(engine.request(PROMPT, OUTPUT, salt=k * 1000 + i))
                latencies.append(time.perf_counter() - t0)
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*[client(k) for k in range(2 * batch)])
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies)
    return {
        "batch": batch,
        "requests": len(lat),
        "req_per_s": len(lat) / wall,
        "tokens_per_s": len(lat) * OUTPUT / wall,
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "busy_share": busy / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="shorter runs, fewer batch sizes")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    engine = ReferenceEngine(args.model, device=args.device, dtype=args.dtype)
    engine.generate([engine.request(PROMPT, OUTPUT)] * 4)  # warm up
    duration = 2.0 if args.quick else 6.0
    batches = [1, 8, 32] if args.quick else [1, 4, 8, 16, 32, 64]
    rows = [asyncio.run(saturate(engine, b, duration)) for b in batches]
    base = rows[0]["req_per_s"]
    best = max(rows, key=lambda r: r["req_per_s"])
    print_table(
        f"{args.model} on {engine.device_name} ({engine.device.type}, {args.dtype}): prompt {PROMPT}, "
        f"output {OUTPUT} tokens, closed loop of 2 x batch clients, {duration:g} s per row",
        ["batch", "requests", "req/s", "tokens/s", "p50 ms", "p99 ms", "model busy", "speedup vs batch 1"],
        [
            [r["batch"], r["requests"], r["req_per_s"], r["tokens_per_s"], r["p50_ms"], r["p99_ms"],
             f"{r['busy_share']:.1%}", r["req_per_s"] / base]
            for r in rows
        ],
    )
    speedup = best["req_per_s"] / base
    busy_target = 0.95 if engine.device.type == "cuda" else 0.90
    print(
        f"\nbest batch {best['batch']}: {speedup:.1f}x batch 1 (target >= 8x); "
        f"model busy {best['busy_share']:.1%} at saturation (target >= {busy_target:.0%})"
    )
    write_result(
        f"engine-{engine.device.type}-{args.model}",
        {
            "device": engine.device.type,
            "device_name": engine.device_name,
            "model": args.model,
            "dtype": args.dtype,
            "rows": rows,
            "best_batch": best["batch"],
            "speedup": speedup,
            "busy_share_at_best": best["busy_share"],
        },
    )


if __name__ == "__main__":
    main()

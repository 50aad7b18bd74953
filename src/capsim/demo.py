"""The main job on embedded defaults: measure this machine, show what batching buys, plan with it.

``make demo`` runs it. Every step uses the real parts (the reference model on this machine's CPU or
GPU, the dynamic batcher) and the embedded defaults (``memory://`` state store).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _say(echo: Callable[[str], None], title: str) -> None:
    echo("")
    echo(f"== {title}")


async def _throughput(engine: object, batch: int, n: int) -> tuple[float, float]:
    from capsim.core.batcher import DynamicBatcher
    from capsim.core.engine import ReferenceEngine
    from capsim.model.settings import BatchSettings

    assert isinstance(engine, ReferenceEngine)
    latencies: list[float] = []
    settings = BatchSettings(max_batch_size=batch, max_wait_ms=5.0, queue_capacity=max(n, 1))
    async with DynamicBatcher(engine.runner(), settings) as batcher:

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            await batcher.submit(engine.request(16, 32, salt=i))
            latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*[one(i) for i in range(n)])
        wall = time.perf_counter() - t0
    return n / wall, float(np.percentile(latencies, 50))


def run_demo(echo: Callable[[str], None] = print, profile_dir: str | Path = "data/profiles") -> dict[str, object]:
    """Run the demo and return its key numbers (also printed through ``echo``)."""
    from capsim.cli import _profile_summary
    from capsim.core.engine import ReferenceEngine
    from capsim.core.profiler import run_profile
    from capsim.model.profile import ServiceTimeProfile

    results: dict[str, object] = {}
    _say(echo, "1. Measure the reference model's kernels on this machine (quick profile)")
    path = run_profile("tiny", quick=True, out_dir=profile_dir, progress=False)
    profile = ServiceTimeProfile.from_csv(path)
    echo(f"device: {profile.metadata['device_name']} ({profile.metadata['device']}), torch {profile.metadata['torch_version']}")
    echo(f"wrote {path}")
    echo(_profile_summary(profile))
    results["profile"] = str(path)

    _say(echo, "2. What dynamic batching buys: 64 concurrent requests (16-token prompts, 32 new tokens)")
    engine = ReferenceEngine("tiny")
    engine.generate([engine.request(16, 32)])
    rows = []
    for batch in (1, 8, 32):
        rps, p50 = asyncio.run(_throughput(engine, batch, 64))
        rows.append((batch, rps, p50))
        echo(f"  max_batch_size={batch:>2}: {rps:8.1f} requests/s, median latency {p50 * 1000:7.1f} ms")
    results["batching_speedup"] = rows[-1][1] / rows[0][1]
    echo(f"  batching speedup at 32 vs 1: {results['batching_speedup']:.1f}x")
    return results

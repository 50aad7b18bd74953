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

from capsim.paths import shipped


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

    _say(echo, "3. A pod crash loses no conversation: sessions live in the store (memory://, embedded)")
    results["resumed_turns"] = asyncio.run(_store_demo(echo))

    _say(echo, f"4. The Friday-night rush, simulated (SimPy) with the profile in {RUSH_PROFILE}")
    results["rush"] = _rush_demo(echo)
    return results


RUSH_SCENARIO = str(shipped("data/scenarios/friday_rush.yaml"))  # from any working directory
RUSH_PROFILE = "data/profiles/cpu-tiny-float32.csv"
RUSH_VARIANTS: dict[str, dict[str, object]] = {
    "as configured (HPA 3..24 pods)": {},
    "HPA minReplicas 4": {"autoscaler.minReplicas": 4},
    "HPA minReplicas 6": {"autoscaler.minReplicas": 6},
}


async def _store_demo(echo: Callable[[str], None]) -> int:
    from capsim.core.state import SessionState, open_store

    def turn(t: int) -> Callable[[SessionState], SessionState]:
        return lambda s: s.with_message("user", f"question {t}", tokens=8).with_message(
            "assistant", f"answer {t}", tokens=16
        )

    async with open_store("memory://demo") as pod_a:
        for t in range(1, 3):
            await pod_a.update("agent-7", turn(t))
        echo("  pod A answered two turns of session agent-7, then crashed (its store client is gone)")
    async with open_store("memory://demo") as pod_b:
        state = await pod_b.get("agent-7")
        assert state is not None
        echo(f"  pod B resumed agent-7 at version {state.version}: {len(state.messages)} messages, "
             f"{state.total_tokens} tokens, last: {state.messages[-1].content!r}")
        await pod_b.delete("agent-7")
        return len(state.messages) // 2


def _rush_demo(echo: Callable[[str], None]) -> list[dict[str, object]]:
    from capsim.model.scenario import Scenario
    from capsim.sim import simulate

    base = Scenario.from_yaml(RUSH_SCENARIO)
    echo("  one simulated hour; sessions start at 8/s, 96/s from 30 to 40 min, 3 turns each; SLO: p99 TTFT <= 1 s")
    echo(f"  {'setting':<38} {'p99 TTFT':>9} {'errors':>8} {'max pods':>9} {'GPU cost':>9}  SLO")
    rows = []
    for name, changes in RUSH_VARIANTS.items():
        s = simulate(base.override(changes), seed=0).summary
        rows.append({"setting": name, "ttft_p99_s": s.ttft_p99_s, "error_rate": s.error_rate,
                     "max_replicas": s.max_replicas, "cost": s.cost, "slo_met": s.slo_met})
        echo(f"  {name:<38} {s.ttft_p99_s:>8.2f}s {s.error_rate:>8.2%} {s.max_replicas:>9} "
             f"{s.cost:>8.2f}$  {'met' if s.slo_met else 'MISSED'}")
    echo("  the HPA reacts only after scrape + window + lag + sync and a cold start, then overshoots on the")
    echo("  backlog it let build; a floor that covers the rush meets the SLO for about the same GPU cost")
    return rows

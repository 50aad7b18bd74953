"""The main job on embedded defaults: measure this machine, show what batching buys, plan, tune, export.

``make demo`` runs it. Every step uses the real parts (the reference model on this machine's CPU or
GPU, the dynamic batcher, the ``memory://`` state store, the simulator and the exporter) and
writes what a person keeps into one folder (``out/``): ``report.md`` with its tables and figures, the
PNGs, and the Kubernetes files of the tuned setting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from capsim.paths import shipped

RUSH_SCENARIO = str(shipped("data/scenarios/friday_rush.yaml"))  # from any working directory
RUSH_PROFILE = "data/profiles/cpu-tiny-float32.csv"
BASELINE = "before tuning (HPA 3..24 pods)"
#: The settings the demo tries on the rush: the HPA with the floor of 3 it had before tuning (the shipped
#: scenario has the tuned floor, 8: data/scenarios/friday_rush.yaml says how it was found), and higher floors.
RUSH_VARIANTS: dict[str, dict[str, object]] = {
    BASELINE: {"autoscaler.minReplicas": 3},
    "HPA minReplicas 4": {"autoscaler.minReplicas": 4},
    "HPA minReplicas 6": {"autoscaler.minReplicas": 6},
}

Echo = Callable[[str], None]
T = TypeVar("T")


def _say(echo: Echo, title: str) -> None:
    echo("")
    echo(f"== {title}")


async def _throughput(engine: object, batch: int, n: int) -> tuple[float, float]:
    """(requests/s, median latency s) of ``n`` concurrent requests through a batcher of ``batch``."""
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


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, also from inside a running loop (a notebook's): then on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def measure_batching(sizes: Sequence[int] = (1, 8, 32), n: int = 64, timeout_s: float = 300.0) -> Any:
    """Requests/s and median latency of ``n`` concurrent 16-token requests on the real engine at each
    ``max_batch_size``: a frame with ``max_batch_size, requests_per_s, p50_latency_s``."""
    import pandas as pd

    from capsim.core.engine import ReferenceEngine

    engine = ReferenceEngine("tiny")
    engine.generate([engine.request(16, 32)])  # warm-up
    rows = []
    for batch in sizes:
        try:  # a lost wake-up in the batcher would otherwise hang the demo silently
            rps, p50 = _run(asyncio.wait_for(_throughput(engine, batch, n), timeout_s))
        except TimeoutError:
            raise RuntimeError(f"{n} requests through the batcher at max_batch_size={batch} did not finish "
                               f"in {timeout_s:g} s: the batcher lost a request") from None
        rows.append({"max_batch_size": batch, "requests_per_s": rps, "p50_latency_s": p50})
    return pd.DataFrame(rows)


async def _store_demo(echo: Echo) -> int:
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


def _rush_demo(echo: Echo, scenario: Any = RUSH_SCENARIO,
               variants: Mapping[str, Mapping[str, object]] = RUSH_VARIANTS,
               progress: bool = False, runs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Simulate the rush under each variant (one seed: the same arrivals for every setting) and return
    one row per variant: its name, changes and summary numbers. ``runs`` (if given) receives each
    variant's ``SimResult`` by name, for the figures."""
    from capsim.model.scenario import Scenario
    from capsim.sim import simulate

    base = scenario if isinstance(scenario, Scenario) else Scenario.from_yaml(scenario)
    results = {name: simulate(base.override(changes), seed=0)
               for name, changes in _bar(list(variants.items()), progress, "simulate")}
    echo(f"  {'setting':<38} {'p99 TTFT':>9} {'errors':>8} {'max pods':>9} {'GPU cost':>9}  SLO")
    rows = []
    for name, changes in variants.items():
        r = results[name].summary
        rows.append({"setting": name, "changes": dict(changes), "ttft_p99_s": r.ttft_p99_s,
                     "error_rate": r.error_rate, "max_replicas": int(r.max_replicas), "cost": r.cost,
                     "slo_met": bool(r.slo_met)})
        echo(f"  {name:<38} {r.ttft_p99_s:>8.2f}s {r.error_rate:>8.2%} {r.max_replicas:>9} "
             f"{r.cost:>8.2f}$  {'met' if r.slo_met else 'MISSED'}")
    if runs is not None:
        runs.update(results)
    return rows


def pick_tuned(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The cheapest row that met the SLO (ties: the lower p99 TTFT), or None when none did."""
    met = [r for r in rows if r["slo_met"]]
    return min(met, key=lambda r: (r["cost"], r["ttft_p99_s"])) if met else None


def _export(echo: Echo, scenario: Any, out: Path) -> list[Path]:
    """Write the Kubernetes files of ``scenario`` under ``out`` with ``capsim.export``."""
    try:
        from capsim.export import ChecksFailedError, export_scenario
    except ImportError as exc:  # pragma: no cover - only while the exporter is missing
        echo(f"  capsim.export is not available ({exc}); no manifests written")
        return []
    try:
        result = export_scenario(scenario, out)
    except ChecksFailedError as exc:
        echo(f"  the checks before deploy failed; writing anyway so the files can be read:\n{exc}")
        result = export_scenario(scenario, out, force=True)
    for f in result.findings:
        echo(f"  check: {f}")
    return list(result.files)


def run_demo(echo: Echo = print, profile_dir: str | Path = "data/profiles", out_dir: str | Path = "out", *,
             rush_scenario: Any = RUSH_SCENARIO, variants: Mapping[str, Mapping[str, object]] = RUSH_VARIANTS,
             progress: bool = True) -> dict[str, Any]:
    """Run the demo, write ``out_dir`` (report, PNGs, manifests) and return its key numbers."""
    from capsim import plots
    from capsim.cli import _profile_summary
    from capsim.core.profiler import run_profile
    from capsim.model.profile import ServiceTimeProfile
    from capsim.model.scenario import Scenario

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    results: dict[str, Any] = {"out": str(out)}

    _say(echo, "1. Measure the reference model's kernels on this machine (quick profile)")
    path = run_profile("tiny", quick=True, out_dir=profile_dir, progress=progress)
    profile = ServiceTimeProfile.from_csv(path)
    echo(f"device: {profile.metadata['device_name']} ({profile.metadata['device']}), "
         f"torch {profile.metadata['torch_version']}")
    echo(f"wrote {path}")
    echo(_profile_summary(profile))
    results["profile"] = str(path)
    figures["profile"] = plots.save(plots.profile_curves(profile), out / "profile.png")

    _say(echo, "2. What dynamic batching buys: 64 concurrent requests (16-token prompts, 32 new tokens)")
    batching = measure_batching()
    for r in batching.itertuples():
        echo(f"  max_batch_size={r.max_batch_size:>2}: {r.requests_per_s:8.1f} requests/s, "
             f"median latency {r.p50_latency_s * 1000:7.1f} ms")
    results["batching"] = batching
    results["batching_speedup"] = float(batching.requests_per_s.iloc[-1] / batching.requests_per_s.iloc[0])
    echo(f"  batching speedup at {batching.max_batch_size.iloc[-1]} vs 1: {results['batching_speedup']:.1f}x")
    figures["batching"] = plots.save(plots.batching_speedup(batching, profile), out / "batching.png")

    _say(echo, "3. A pod crash loses no conversation: sessions live in the store (memory://, embedded)")
    results["resumed_turns"] = asyncio.run(_store_demo(echo))

    base = rush_scenario if isinstance(rush_scenario, Scenario) else Scenario.from_yaml(rush_scenario)
    _say(echo, f"4. The Friday-night rush, simulated (SimPy) with the profile in {base.service.profile}")
    echo(f"  {base.description.strip() or base.name}")
    echo(f"  SLO: p99 TTFT <= {base.slo.ttft_p99_s:g} s, errors <= {base.slo.max_error_rate:.1%}")
    all_runs: dict[str, Any] = {}
    rows = _rush_demo(echo, base, variants, progress=progress, runs=all_runs)
    results["rush"] = rows
    tuned = pick_tuned(rows)
    results["tuned"] = tuned
    baseline = rows[0]
    if not baseline["slo_met"]:
        echo("  the HPA reacts only after scrape + window + lag + sync and a cold start, then overshoots on the")
        echo("  backlog it let build")
    if tuned is not None:
        echo(f"  tuned: {tuned['setting']}, the cheapest that met the SLO: ${tuned['cost']:.2f} against "
             f"${baseline['cost']:.2f} for the baseline")

    _say(echo, "5. Baseline against the tuned setting, over time")
    chosen = [baseline] + ([tuned] if tuned is not None and tuned is not baseline else [])
    runs = {row["setting"]: all_runs[row["setting"]] for row in chosen}
    slo = base.slo.ttft_p99_s
    for k, (name, run) in enumerate(runs.items()):
        label = "baseline" if k == 0 else "tuned"
        figures[f"rush_{label}"] = plots.save(
            plots.run_timeline(run, title=f"the rush, {label}: {name}", slo_s=slo), out / f"rush_{label}.png")
    figures["latency_cdf"] = plots.save(
        plots.latency_cdfs({n: r.requests for n, r in runs.items()}, slo_s=slo, warmup_s=base.warmup_s),
        out / "latency_cdf.png")
    import pandas as pd

    points = pd.DataFrame(rows)
    highlight = {"baseline": 0} | ({"tuned": next(i for i, r in enumerate(rows) if r is tuned)}
                                   if tuned is not None else {})
    figures["cost_vs_ttft"] = plots.save(
        plots.cost_vs_ttft(points, label="setting", slo_s=slo, highlight=highlight, feasible="slo_met",
                           title="the rush: GPU cost against p99 TTFT per setting"), out / "cost_vs_ttft.png")

    _say(echo, "6. Export the tuned setting as Kubernetes files")
    exported: list[Path] = []
    if tuned is None:
        echo("  no setting met the SLO; nothing to export")
    else:
        exported = _export(echo, base.override(tuned["changes"]), out / "k8s")
        echo(f"  wrote {', '.join(p.name for p in exported)} under {out / 'k8s'}")
    results["exported"] = [str(p) for p in exported]
    results["figures"] = {k: str(v) for k, v in figures.items()}

    report = write_report(out / "report.md", profile=profile, batching=batching, rows=rows, tuned=tuned,
                          figures=figures, exported=exported, scenario=base)
    results["report"] = str(report)
    _say(echo, f"report: {report.resolve()}")
    return results


def _bar(items: Sequence[Any], on: bool, desc: str) -> Any:
    if not on:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="run")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path: Path, *, profile: Any, batching: Any, rows: Sequence[Mapping[str, Any]],
                 tuned: Mapping[str, Any] | None, figures: Mapping[str, Path], exported: Sequence[Path],
                 scenario: Any) -> Path:
    """``report.md``: what was measured, simulated and exported, with the tables and figures (relative links)."""
    import capsim

    meta = profile.metadata
    base = path.parent

    def img(key: str, alt: str) -> str:
        return f"![{alt}]({figures[key].relative_to(base).as_posix()})" if key in figures else ""

    speed = batching.requests_per_s / batching.requests_per_s.iloc[0]
    lines = [
        "# capsim demo report", "",
        f"capsim {capsim.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; device "
        f"{meta['device_name']} ({meta['device']}), torch {meta['torch_version']}.", "",
        "## 1. The kernels measured on this machine", "",
        f"Quick profile of the `{meta['model']['name']}` reference model ({meta['dtype']}): median latency and "
        "throughput of each phase against batch size.", "",
        img("profile", "profile"), "",
        "## 2. What dynamic batching buys", "",
        "64 concurrent requests (16-token prompts, 32 new tokens) through the real batcher and engine:", "",
        _table(["max_batch_size", "requests/s", "speedup", "median latency (ms)"],
               [(r.max_batch_size, f"{r.requests_per_s:.1f}", f"{s:.1f}x", f"{r.p50_latency_s * 1000:.1f}")
                for r, s in zip(batching.itertuples(), speed, strict=True)]), "",
        img("batching", "batching speedup"), "",
        "## 3. The rush, simulated", "",
        f"Scenario `{scenario.name}`: {scenario.description.strip()} SLO: p99 TTFT <= {scenario.slo.ttft_p99_s:g} s, "
        f"errors <= {scenario.slo.max_error_rate:.1%}. One seed, the same arrivals for every setting.", "",
        _table(["setting", "p99 TTFT (s)", "errors", "max pods", "GPU cost ($)", "SLO"],
               [(r["setting"], f"{r['ttft_p99_s']:.2f}", f"{r['error_rate']:.2%}", r["max_replicas"],
                 f"{r['cost']:.2f}", "met" if r["slo_met"] else "missed") for r in rows]), "",
        "Tuned setting: " + (f"**{tuned['setting']}** (the cheapest that met the SLO)." if tuned
                             else "none met the SLO."), "",
        img("cost_vs_ttft", "cost against p99 TTFT"), "",
        img("rush_baseline", "the rush under the baseline"), "",
        img("rush_tuned", "the rush under the tuned setting"), "",
        img("latency_cdf", "latency CDFs"), "",
        "## 4. The tuned setting, exported", "",
    ]
    if exported:
        lines += [f"- [`{p.relative_to(base).as_posix()}`]({p.relative_to(base).as_posix()})" for p in exported]
    else:
        lines.append("Nothing exported.")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

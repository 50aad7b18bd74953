"""Sim-versus-real validation: drive the real pod and the simulator with the same workload and compare.

The pod runs as its own process pinned to one core with one torch thread, the load generator on the
other core; the profile is measured under the same conditions. For each load level (a fraction of the
capacity the profile implies) the same Poisson workload (same seed, same arrival times) goes to the
real pod over HTTP and to the simulator, and the two request frames are summarized the same way.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import capsim
from capsim.model.profile import ServiceTimeProfile
from capsim.model.scenario import Scenario
from capsim.model.settings import BatchSettings
from capsim.studies.pods import PodProcess, pinned

METRICS: tuple[str, ...] = (
    "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s",
    "throughput_per_s", "mean_batch_size",
)
TARGETS: dict[str, float] = {"p50": 0.10, "p99": 0.15, "throughput_per_s": 0.03}


@dataclass(frozen=True)
class ValidationSpec:
    """What to validate: the workload, the pod's batch settings, the load levels and run lengths."""

    levels: tuple[float, ...] = (0.3, 0.6, 0.85)
    requests_per_level: int = 3000
    prompt_tokens: int = 64
    output_tokens: int = 128
    batching: BatchSettings = field(default_factory=lambda: BatchSettings(max_batch_size=16, max_wait_ms=5))
    warmup_fraction: float = 0.1
    seed: int = 0
    model: str = "tiny"
    threads: int = 1
    calibrate: bool = True  # fit the pod's batch cycle under load (scale, per-request overhead) first
    calibration_s: float = 5.0

    @classmethod
    def quick(cls) -> ValidationSpec:
        return cls(levels=(0.3, 0.85), requests_per_level=300, calibration_s=3.0)


def capacity_per_s(
    profile: ServiceTimeProfile,
    batching: BatchSettings,
    prompt: int,
    output: int,
    calibration: Calibration | None = None,
) -> float:
    """Requests per second one pod serves at best: max over batch sizes of size / batch time (with the
    calibration's scale and per-request overhead, if given)."""
    scale, overhead = (calibration.time_scale, calibration.overhead_s) if calibration else (1.0, 0.0)
    sizes = [b for b in range(1, batching.max_batch_size + 1) if b <= profile.batch_sizes("decode")[-1]]
    return max(b / (scale * profile.batch_timing(b, prompt, output).total_s + b * overhead) for b in sizes)


def summarize_frame(df: Any, warmup_s: float, end_s: float) -> dict[str, float]:
    """The compared metrics over requests that arrived in [warmup_s, end_s) and succeeded."""
    window = df[(df.arrival_s >= warmup_s) & (df.arrival_s < end_s)]
    ok = window[window.outcome == "ok"]
    ttft = (ok.first_token_s - ok.arrival_s).to_numpy()
    e2e = (ok.end_s - ok.arrival_s).to_numpy()
    span = end_s - warmup_s
    out = {"requests": float(len(window)), "ok": float(len(ok))}
    for name, values in (("ttft", ttft), ("e2e", e2e)):
        for q in (50, 95, 99):
            out[f"{name}_p{q}_s"] = float(np.percentile(values, q)) if len(values) else float("nan")
    out["throughput_per_s"] = len(ok) / span
    out["mean_batch_size"] = float(ok.batch_size.mean()) if len(ok) else float("nan")
    return out


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def measure_profile(spec: ValidationSpec, out_dir: Path, core: int | None) -> Path:
    """Profile the model in a fresh process pinned like the pod, over the lengths the workload needs."""
    p, o = spec.prompt_tokens, spec.output_tokens
    prompts = sorted({max(p // 2, 1), p, 2 * p})
    contexts = sorted({max(p // 2, 1), p, p + o, 2 * (p + o)})
    cmd = [sys.executable, "-m", "capsim.cli", "profile", "--quick", "--model", spec.model, "--device", "cpu",
           "--max-batch-size", str(spec.batching.max_batch_size), "--threads", str(spec.threads),
           "--prompt-tokens", ",".join(map(str, prompts)), "--context-tokens", ",".join(map(str, contexts)),
           "--out-dir", str(out_dir)]
    subprocess.run(pinned(cmd, core), check=True, capture_output=True, timeout=600)
    return out_dir / f"cpu-{spec.model}-float32-quick.csv"


@dataclass(frozen=True)
class Calibration:
    """The pod's batch cycle under load, ``W(b) = time_scale x T_profile(b) + b x overhead_s``."""

    time_scale: float
    overhead_s: float
    points: tuple[tuple[float, float, float], ...]  # (mean batch size, profile batch s, pod cycle s)


def calibrate(pod: PodProcess, spec: ValidationSpec, profile: ServiceTimeProfile, duration_s: float) -> Calibration:
    """Fit how much longer a batch cycle takes in the pod than on the idle engine.

    Two closed-loop runs (2 clients, then 2 x max_batch_size clients) with the validation's own request
    shape keep the pod saturated at a small and a large batch size; the pod's /metrics give the batches
    and their sizes, so the wall time per batch is the pod's batch cycle (model, HTTP and store work on
    the same core). Two points fix the scale of the profile's times and the CPU cost per request.
    """
    import httpx

    async def drive(clients: int) -> float:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=4 * clients)) as c:
            stop = time.perf_counter() + duration_s

            async def one(k: int) -> None:
                i = 0
                while time.perf_counter() < stop:
                    r = await c.post(f"{pod.url}/v1/sessions/calibrate-{clients}-{k}-{i}/turns",
                                     json={"prompt_tokens": spec.prompt_tokens, "max_new_tokens": spec.output_tokens})
                    r.raise_for_status()
                    i += 1

            t0 = time.perf_counter()
            await asyncio.gather(*[one(k) for k in range(clients)])
            return time.perf_counter() - t0

    points = []
    for clients in (2, 2 * spec.batching.max_batch_size):
        before = _batches(pod.url)
        wall = asyncio.run(drive(clients))
        after = _batches(pod.url)
        n = max(after[0] - before[0], 1.0)
        size = (after[1] - before[1]) / n
        points.append((size, _profile_ms(profile, size, spec) / 1000.0, wall / n))
    return fit_cycle(points)


def fit_cycle(points: Sequence[tuple[float, float, float]]) -> Calibration:
    """Solve ``cycle = scale x profile + size x overhead`` through two (size, profile s, cycle s) points;
    where noise makes the overhead negative, fall back to a pure scale (the mean ratio)."""
    (b1, t1, w1), (b2, t2, w2) = points
    det = t1 * b2 - t2 * b1
    scale = (w1 * b2 - w2 * b1) / det if det else w1 / t1
    overhead = (t1 * w2 - t2 * w1) / det if det else 0.0
    if overhead < 0 or scale <= 0:
        scale, overhead = (w1 / t1 + w2 / t2) / 2, 0.0
    return Calibration(scale, overhead, tuple(points))


def _batches(url: str) -> tuple[float, float, float]:
    """(batches, requests in batches, seconds the runner spent) so far, from the pod's /metrics."""
    import httpx

    values = {"capsim_batch_size_count": 0.0, "capsim_batch_size_sum": 0.0, "capsim_batch_service_seconds_sum": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        name = line.split(" ", 1)[0]
        if name in values:
            values[name] = float(line.split()[-1])
    return (values["capsim_batch_size_count"], values["capsim_batch_size_sum"],
            values["capsim_batch_service_seconds_sum"])


def sim_batches(requests: Any) -> tuple[float, float]:
    """(mean batch size, mean batch service seconds) of a simulated run's batches."""
    ok = requests[requests.outcome == "ok"]
    batches = ok.groupby(["pod", "start_s"]).agg(size=("batch_size", "first"), end=("end_s", "max"))
    if batches.empty:
        return float("nan"), float("nan")
    starts = batches.index.get_level_values("start_s").to_numpy()
    return float(batches["size"].mean()), float((batches["end"].to_numpy() - starts).mean())


def _profile_ms(profile: ServiceTimeProfile, size: float, spec: ValidationSpec) -> float:
    """The profile's mean batch time (ms) at a fractional batch size (interpolated)."""
    lo, hi = int(np.floor(size)), int(np.ceil(size))
    t_lo = profile.batch_timing(max(lo, 1), spec.prompt_tokens, spec.output_tokens).total_s
    t_hi = profile.batch_timing(max(hi, 1), spec.prompt_tokens, spec.output_tokens).total_s
    return 1000 * (t_lo + (size - lo) * (t_hi - t_lo))


def level_scenario(
    spec: ValidationSpec, profile_path: Path, rate: float, calibration: Calibration | None = None
) -> Scenario:
    """The simulator's view of one load level: one always-ready pod, the same batching, no faults."""
    horizon = spec.requests_per_level / rate
    return Scenario.model_validate({
        "horizon_s": horizon,
        "warmup_s": horizon * spec.warmup_fraction,
        "workload": {
            "arrivals": {"kind": "poisson", "rate_per_s": rate},
            "prompt_tokens": {"kind": "constant", "value": spec.prompt_tokens},
            "output_tokens": {"kind": "constant", "value": spec.output_tokens},
        },
        "service": {
            "kind": "profile",
            "profile": str(profile_path),
            "request_overhead_ms": calibration.overhead_s * 1000 if calibration else 0.0,
            "time_scale": calibration.time_scale if calibration else 1.0,
        },
        "batching": spec.batching.model_dump(),
        "pods": {"replicas": 1, "startup_s": 0},
        "router": {"kind": "random"},
        "client": {"timeout_s": 600, "max_retries": 0},
    })


def run_validation(
    spec: ValidationSpec | None = None,
    *,
    out_dir: str | Path = "data/validation",
    echo: Callable[[str], None] = print,
) -> Any:
    """Run the validation; write ``results.csv``, ``validation.png`` and ``provenance.json`` under
    ``out_dir`` and return the results frame (one row per level and metric)."""
    import pandas as pd

    from capsim.core.loadgen import ClientPolicy, run_load
    from capsim.sim.arrivals import make_workload
    from capsim.sim.simulate import simulate
    from capsim.sim.streams import Streams

    spec = spec or ValidationSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cores = _cores()
    pod_core = cores[0] if len(cores) > 1 else None
    gen_core = cores[1] if len(cores) > 1 else None
    work = Path(tempfile.mkdtemp(prefix="capsim-validate-"))
    echo(f"profiling {spec.model} with {spec.threads} thread(s) on core {pod_core} ...")
    profile_path = measure_profile(spec, work, pod_core)
    profile = ServiceTimeProfile.from_csv(profile_path)
    kept_profile = out / "profile.csv"
    profile.to_csv(kept_profile)
    if gen_core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {gen_core})
    rows = []
    b = spec.batching
    pod = PodProcess(work, "validate", core=pod_core, torch_threads=spec.threads, model=spec.model,
                     max_batch_size=b.max_batch_size, max_wait_ms=b.max_wait_ms, queue_capacity=b.queue_capacity,
                     overflow=b.overflow, max_concurrent_batches=b.max_concurrent_batches)
    try:
        pod.start()
        calibration = calibrate(pod, spec, profile, spec.calibration_s) if spec.calibrate else None
        if calibration is not None:
            echo(f"calibration: pod batch cycle = {calibration.time_scale:.3f} x profile + "
                 f"{calibration.overhead_s * 1000:.2f} ms per request "
                 f"(points: {[(round(b, 2), round(t * 1e3, 1), round(w * 1e3, 1)) for b, t, w in calibration.points]})")
        cap = capacity_per_s(profile, spec.batching, spec.prompt_tokens, spec.output_tokens, calibration)
        echo(f"capacity: {cap:.1f} requests/s (prompt {spec.prompt_tokens}, output {spec.output_tokens})")
        for level in spec.levels:
            rate = level * cap
            scenario = level_scenario(spec, kept_profile, rate, calibration)
            workload = make_workload(scenario, Streams(spec.seed))
            echo(f"level {level:.0%}: {rate:.1f} requests/s, {workload.n_requests} requests ...")
            before = _batches(pod.url)
            real_df = asyncio.run(run_load([pod.url], workload, client=ClientPolicy(timeout_s=60, max_retries=0),
                                           max_duration_s=scenario.horizon_s + 5, seed=spec.seed))
            after = _batches(pod.url)
            sim = simulate(scenario, seed=spec.seed)
            n_batches = max(after[0] - before[0], 1.0)
            real_size, real_batch_s = (after[1] - before[1]) / n_batches, (after[2] - before[2]) / n_batches
            sim_size, sim_batch_s = sim_batches(sim.requests)
            echo(f"  batches: real mean size {real_size:.2f}, {real_batch_s * 1000:.1f} ms each "
                 f"(profile at that size: {_profile_ms(profile, real_size, spec):.1f} ms); "
                 f"sim mean size {sim_size:.2f}, {sim_batch_s * 1000:.1f} ms each")
            real = summarize_frame(real_df, scenario.warmup_s, scenario.horizon_s)
            simulated = summarize_frame(sim.requests, scenario.warmup_s, scenario.horizon_s)
            for metric in METRICS:
                r, s = real[metric], simulated[metric]
                rows.append({"level": level, "rate_per_s": rate, "metric": metric, "real": r, "sim": s,
                             "rel_error": (s - r) / r if r else float("nan")})
    finally:
        pod.stop()
    results = pd.DataFrame(rows)
    results.to_csv(out / "results.csv", index=False)
    _plot(results, out / "validation.png")
    provenance = {
        "capsim_version": capsim.__version__,
        "spec": {**asdict(spec), "batching": spec.batching.model_dump()},
        "profile": str(kept_profile),
        "profile_metadata": dict(profile.metadata),
        "capacity_per_s": cap,
        "calibration": asdict(calibration) if calibration else None,
        "cores": {"pod": pod_core, "loadgen": gen_core},
        "created_unix": time.time(),
        "targets": TARGETS,
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
    echo(format_results(results))
    return results


def format_results(results: Any) -> str:
    """A text table: one row per level and metric, real vs simulated with the relative error."""
    lines = [f"{'level':>6} {'metric':>18} {'real':>10} {'sim':>10} {'error':>8}"]
    for r in results.itertuples():
        lines.append(f"{r.level:>6.0%} {r.metric:>18} {r.real:>10.4g} {r.sim:>10.4g} {r.rel_error:>+8.1%}")
    return "\n".join(lines)


def _plot(results: Any, path: Path) -> None:
    from capsim import plots

    plots.save(plots.sim_vs_real(results), path)


def worst_errors(results: Any, metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """The largest absolute relative error of each metric across levels."""
    return {m: float(results[results.metric == m].rel_error.abs().max()) for m in metrics}

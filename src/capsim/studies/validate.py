"""Sim-versus-real validation: drive the real pod and the simulator with the same workload and compare.

The pod runs as its own process pinned to one core with one torch thread, the load generator on the
other core; the profile is measured under the same conditions, then calibrated under load
(``capsim.studies.validate_calibrate``). Each load level (a fraction of the calibrated capacity) runs
``replications`` times with different seeds; each replication's Poisson schedule goes to the real pod
over HTTP and to the simulator. Every metric carries a 95% interval (``capsim.studies.validate_stats``:
a block bootstrap over the pooled replications), and so does the error; the comparison is in
``capsim.studies.validate_report``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import capsim
from capsim.model.profile import ServiceTimeProfile
from capsim.model.scenario import ConstantTokens, Scenario
from capsim.model.settings import BatchSettings
from capsim.studies import validate_stats as vs
from capsim.studies.pods import PodProcess, pinned, remove_scratch, scratch_dir
from capsim.studies.validate_calibrate import (
    VALIDATION_TRACE_STEPS,
    Calibration,
    CalibrationError,
    CalibrationWarning,
    calibrate,
    fetch_trace,
    fit_cycle,
    ingress_s,
    open_loop_noise,
    probe_answers,
    trace_rows,
)
from capsim.studies.validate_report import (
    METRICS,
    TARGETS,
    batch_fit,
    compare_level,
    format_results,
    matched_sends,
    queue_times,
    replay_factors,
    trace_diagnostics,
    verdicts,
    worst_errors,
)
from capsim.studies.validate_runs import (
    RUNS_DIR,
    SERVICE_FILE,
    TRACES_FILE,
    TTFT_FROM_SEND,
    KeptRunsError,
    RealRun,
    calibration_fields,
    load_runs,
    note_observed_speed,
    observed_speed,
    probe_requests,
    read_provenance,
    run_caveats,
    save_run,
    save_traces,
    spec_fields,
    ttft_from,
    write_service_fragment,
)

__all__ = [
    "METRICS", "SERVICE_FILE", "TARGETS", "Calibration", "PodProcess", "ValidationSpec", "capacity_per_s", "fit_cycle",
    "format_results", "level_scenario", "pinned", "resimulate", "run_validation", "sim_batches", "summarize_frame",
    "worst_errors",
]


@dataclass(frozen=True)
class ValidationSpec:
    """What to validate: the workload, the pod's batch settings, the load levels and run lengths.

    ``requests_per_level`` are split evenly among ``replications`` runs (seeds ``seed``, ``seed + 1``...).
    By default they are sized from the measured capacity so that the levels' runs take ``level_budget_s``
    and one run of ``capsim validate`` stays under 7 minutes on a 2-core machine (docs/validation.md)."""

    levels: tuple[float, ...] = (0.3, 0.6, 0.85)
    requests_per_level: int | None = None  # None: as many as fit level_budget_s at the measured capacity
    replications: int = 3
    prompt_tokens: int = 64
    output_tokens: int = 128
    batching: BatchSettings = field(default_factory=lambda: BatchSettings(max_batch_size=16, max_wait_ms=5))
    warmup_fraction: float = 0.1
    seed: int = 0
    model: str = "tiny"
    threads: int = 1
    calibrate: bool = True  # fit the pod's batch cycle under load (scale, per-request overhead) first
    calibration_s: float = 60.0  # at most; the runs stop after 15 answers a client each (~20 s on 2 quiet cores)
    block_s: float = vs.BLOCK_S
    level_budget_s: float = 290.0  # the levels' real runs together, when requests_per_level is None

    @classmethod
    def quick(cls) -> ValidationSpec:
        return cls(levels=(0.3, 0.85), requests_per_level=900, calibration_s=20.0)

    @property
    def requests_per_run(self) -> int:
        if self.requests_per_level is None:
            raise ValueError("requests_per_level is set from the capacity (sized_for) before any run")
        return max(self.requests_per_level // self.replications, 1)

    def sized_for(self, capacity_per_s: float) -> ValidationSpec:
        """This spec with ``requests_per_level`` set, if it was not, so that the levels' real runs take
        ``level_budget_s`` together at ``capacity_per_s`` (the same count at every level)."""
        if self.requests_per_level is not None:
            return self
        seconds_per_request = sum(1 / (level * capacity_per_s) for level in self.levels)
        n = int(self.level_budget_s / seconds_per_request) // self.replications * self.replications
        return replace(self, requests_per_level=max(n, 50 * self.replications))


def capacity_per_s(
    profile: ServiceTimeProfile,
    batching: BatchSettings,
    prompt: int,
    output: int,
    calibration: Calibration | None = None,
) -> float:
    """Requests per second one pod serves at best: max over batch sizes of size / batch time (with the
    calibration's scale and per-request overhead, if given)."""
    # at saturation a batch of b has b arrivals during it, whichever term the pod's HTTP work is charged to
    scale, overhead = ((calibration.time_scale, calibration.overhead_s + calibration.arrival_overhead_s)
                       if calibration else (1.0, 0.0))
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
    """Profile the model in a fresh process pinned like the pod, over the lengths the workload needs, its
    points timed in shuffled rounds (``capsim profile --interleave``: this machine's speed moves in spells,
    which a one-pass sweep bends into the profile's shape, since stop 33)."""
    p, o = spec.prompt_tokens, spec.output_tokens
    prompts = sorted({max(p // 2, 1), p, 2 * p})
    contexts = sorted({max(p // 2, 1), p, p + o, 2 * (p + o)})
    cmd = [sys.executable, "-m", "capsim.cli", "profile", "--quick", "--model", spec.model, "--device", "cpu",
           "--max-batch-size", str(spec.batching.max_batch_size), "--threads", str(spec.threads), "--interleave",
           "--prompt-tokens", ",".join(map(str, prompts)), "--context-tokens", ",".join(map(str, contexts)),
           "--out-dir", str(out_dir)]
    subprocess.run(pinned(cmd, core), check=True, capture_output=True, timeout=600)
    return out_dir / f"cpu-{spec.model}-float32-quick.csv"


def sim_batches(requests: Any) -> tuple[float, float]:
    """(mean batch size, mean batch service seconds) of a simulated run's batches."""
    ok = requests[requests.outcome == "ok"]
    batches = ok.groupby(["pod", "start_s"]).agg(size=("batch_size", "first"), end=("end_s", "max"))
    if batches.empty:
        return float("nan"), float("nan")
    starts = batches.index.get_level_values("start_s").to_numpy()
    return float(batches["size"].mean()), float((batches["end"].to_numpy() - starts).mean())


#: seconds the load generator waits for answers after a run's last send, and the simulator runs on after
#: its horizon (``Scenario.drain_s``): both count the requests sent before the horizon that finish by then
DRAIN_S = 5.0


def calibrated_service(profile_path: Path, calibration: Calibration | None = None,
                       noise_block: int = 1) -> dict[str, Any]:
    """A scenario's ``service`` section for the calibrated pod: the profile and every term the calibration
    measured (``level_scenario``'s, and ``service.yaml``'s beside a validation's results)."""
    return {
        "kind": "profile",
        "profile": str(profile_path),
        "request_overhead_ms": calibration.overhead_s * 1000 if calibration else 0.0,
        "time_scale": calibration.time_scale if calibration else 1.0,
        "arrival_overhead_ms": calibration.arrival_overhead_s * 1000 if calibration else 0.0,
        "ingress_ms": calibration.ingress_s * 1000 if calibration else 0.0,
        "answer_ms": calibration.answer_s * 1000 if calibration else 0.0,
        "answer_per_request_ms": calibration.answer_per_request_s * 1000 if calibration else 0.0,
        "first_token_scale": calibration.first_token_scale if calibration else 1.0,
        "cycle_noise": list(calibration.cycle_noise) if calibration and calibration.cycle_noise else None,
        "cycle_noise_block_steps": noise_block,
    }


def write_service(out: Path, spec: ValidationSpec, profile_path: Path, calibration: Calibration) -> Path:
    """``out/service.yaml`` (:func:`~capsim.studies.validate_runs.write_service_fragment`): the calibrated pod's
    ``service`` section and the ``batching`` it was measured with."""
    return write_service_fragment(
        out, f"{spec.model} model, {spec.threads} torch thread(s), prompt {spec.prompt_tokens}, output "
        f"{spec.output_tokens} tokens", calibrated_service(Path(profile_path), calibration), spec.batching.model_dump())


def level_scenario(
    spec: ValidationSpec, profile_path: Path, rate: float, calibration: Calibration | None = None,
    noise_block: int = 1,
) -> Scenario:
    """The simulator's view of one replication of a load level: one always-ready pod, the same batching,
    no faults; the calibration's ``cycle_noise`` walked ``noise_block`` batches at a time (1: at random)."""
    horizon = spec.requests_per_run / rate
    return Scenario.model_validate({
        "horizon_s": horizon,
        "warmup_s": horizon * spec.warmup_fraction,
        "drain_s": DRAIN_S,
        "workload": {
            "arrivals": {"kind": "poisson", "rate_per_s": rate},
            "prompt_tokens": {"kind": "constant", "value": spec.prompt_tokens},
            "output_tokens": {"kind": "constant", "value": spec.output_tokens},
        },
        "service": calibrated_service(profile_path, calibration, noise_block),
        "batching": spec.batching.model_dump(),
        "pods": {"replicas": 1, "startup_s": 0},
        "router": {"kind": "random"},
        "client": {"timeout_s": 600, "max_retries": 0},
    })


#: the open-loop probe sends at least this many requests per replication (about 30 batches of the five a
#: batch holds at half the capacity), so a slow host's pod, whose capacity sizes a short probe, still gives
#: ``probe_answers`` its 20 batches (a pod of 31 requests/s ran 13 batches in a probe of 64)
PROBE_MIN_REQUESTS = 150
#: and lasts at least this many full batches of the calibrated pod: a batch takes no longer than a full one
#: (but for noise), so the probe holds this many batches whatever the host's speed, three times the 20 that
#: ``open_loop_noise`` and ``probe_answers`` need (a CI host 1.4 x slower than this one ran fewer than 20 in
#: the 4-s probe the request count alone gave, and the probe's fit was skipped)
PROBE_MIN_BATCHES = 60


def probe_requests_per_run(cap: float, full_batch_s: float) -> int:
    """Requests a replication of the open-loop probe sends at half the capacity ``cap`` (per second): at
    least ``2 x cap`` (4 s), ``PROBE_MIN_REQUESTS``, and enough for ``PROBE_MIN_BATCHES`` batches of
    ``full_batch_s`` (the calibrated pod's full batch)."""
    return max(int(2 * cap), PROBE_MIN_REQUESTS, math.ceil(0.5 * cap * PROBE_MIN_BATCHES * full_batch_s))
#: the ablation's entry for the full model without the answers' way out and the first token's place (stop 38)
NO_ANSWERS = "full fit, no way out, profile's first token"
#: the ablation's entry for the full model simulated at each run's own measured pod speed
RUN_SPEED = "full model at the run's speed"
#: the full model at the speed the pod kept in the replication before (its batches' mean wall over the fit)
RUN_PREVIOUS = "full model at the previous replication's speed"
#: and replaying each run's speed batch by batch (its batches' wall over the fit, in order, from the first)
RUN_REPLAY = "full model replaying the run's batches"
#: the ablation's entries whose targets are counted too (``provenance.json``, ``targets_by_entry``)
JUDGED = (RUN_PREVIOUS, RUN_SPEED, RUN_REPLAY)
#: and also on the load generator's actual send times instead of the schedule it was late on
RUN_SENDS = "full model replaying the run's batches and sends"
#: and on the times the pod's batcher queued each request (sent, read and parsed), its latency from the send
RUN_PARSED = "full model replaying the run's batches and queue times"
#: the time columns of a request frame, shifted together when a simulated frame is moved in time
_TIME_COLUMNS = ("arrival_s", "start_s", "first_token_s", "end_s")


def on_sends(scenario: Scenario, real_df: Any, path: Path) -> tuple[Scenario, float]:
    """``scenario`` with its arrivals replaced by the real run's actual sends (``real_df.arrival_s``, each
    request's send time from the run's start, late where the load generator was) and its requests' token
    counts, written to ``path`` as an Azure-format trace; and the first send's time, which the trace's
    times count from (add it to a simulated frame's times to compare it with the real one)."""
    import datetime as dt

    sent = real_df[np.isfinite(real_df.arrival_s.to_numpy(dtype=float))].sort_values("arrival_s", kind="stable")
    if sent.empty:
        raise ValueError("the run sent no request: no sends to replay")
    base = dt.datetime(2000, 1, 1)
    prompt, output = scenario.workload.prompt_tokens, scenario.workload.output_tokens
    if not isinstance(prompt, ConstantTokens) or not isinstance(output, ConstantTokens):
        raise ValueError("replaying sends needs constant prompt and output tokens (the validation's)")
    with open(path, "w") as f:
        f.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        for t in sent.arrival_s.to_numpy(dtype=float):
            f.write(f"{(base + dt.timedelta(seconds=float(t))).isoformat(sep=' ', timespec='microseconds')},"
                    f"{prompt.value},{output.value}\n")
    first = float(sent.arrival_s.iloc[0])
    trace = scenario.override({"workload.arrivals": {"kind": "trace", "path": str(path)},
                               "horizon_s": scenario.horizon_s - first})
    return trace, first


def shifted(df: Any, by: float) -> Any:
    """A request frame with its times moved ``by`` seconds later."""
    return df.assign(**{c: df[c] + by for c in _TIME_COLUMNS if c in df})


def on_parsed(scenario: Scenario, real_df: Any, trace: Sequence[Sequence[Any]], path: Path, seed: int) -> Any | None:
    """Simulate ``scenario`` with each request arriving when the real pod's batcher queued it (the pod's
    trace: sent, then read and parsed by its HTTP server, however late that came), without the simulator's
    own ``ingress_ms``; then give each simulated request the real send time of the same rank (the k-th sent
    is the k-th queued, as ``trace_diagnostics`` matches them), so its latencies count from the send as the
    real ones do. ``None`` when the run's frame has no clock (``t0_monotonic``) or the trace no request."""
    import pandas as pd

    from capsim.sim.simulate import simulate

    sends, queued = matched_sends(queue_times(trace), real_df)
    if not len(sends):
        return None
    parsed, first = on_sends(scenario.override({"service.ingress_ms": 0.0}),
                             pd.DataFrame({"arrival_s": queued}), path)
    sim = shifted(simulate(parsed, seed=seed).requests, first).sort_values("arrival_s", kind="stable")
    return sim.assign(arrival_s=sends[:len(sim)])


def run_validation(
    spec: ValidationSpec | None = None,
    *,
    out_dir: str | Path = "data/validation",
    echo: Callable[[str], None] = print,
) -> Any:
    """Run the validation; write ``results.csv`` (one row per level and metric, with intervals and the
    targets), ``replications.csv``, ``validation.png``, ``provenance.json`` and the real runs
    (``runs/``, :mod:`capsim.studies.validate_runs`) under ``out_dir`` and return the results frame."""
    from capsim.core.loadgen import ClientPolicy, run_load
    from capsim.sim.arrivals import make_workload
    from capsim.sim.streams import Streams

    spec = spec or ValidationSpec()
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cores = _cores()
    pod_core = cores[0] if len(cores) > 1 else None
    gen_core = cores[1] if len(cores) > 1 else None
    work = scratch_dir("capsim-validate-")  # removed at exit, also after Ctrl-C or SIGTERM (studies.pods)
    echo(f"profiling {spec.model} with {spec.threads} thread(s) on core {pod_core} ...")
    profile_path = measure_profile(spec, work, pod_core)
    profile = ServiceTimeProfile.from_csv(profile_path)
    kept_profile = out / "profile.csv"
    profile.to_csv(kept_profile)
    if gen_core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {gen_core})
    b = spec.batching
    pod = PodProcess(work, "validate", core=pod_core, torch_threads=spec.threads, model=spec.model,
                     max_batch_size=b.max_batch_size, max_wait_ms=b.max_wait_ms, queue_capacity=b.queue_capacity,
                     overflow=b.overflow, max_concurrent_batches=b.max_concurrent_batches,
                     trace_steps=VALIDATION_TRACE_STEPS)
    calibration: Calibration | None = None
    kept_traces: dict[str, Any] = {}  # the calibration's and the probe's batch traces (``save_traces``)
    try:
        pod.start()
        if spec.calibrate:
            with warnings.catch_warnings():  # said once, below, on stdout and in the results
                warnings.simplefilter("ignore", CalibrationWarning)
                calibration, kept_traces["calibration"] = calibrate(
                    pod.url, profile, spec.prompt_tokens, spec.output_tokens, spec.calibration_s, seed=spec.seed)
            echo(f"calibration: {calibration.describe()}")
            echo("  points (size, profile ms, pod ms, residual ms): " + ", ".join(
                f"({b_:.0f}, {t * 1e3:.1f}, {w * 1e3:.1f}, {r * 1e3:+.1f})"
                for (b_, t, w), r in zip(calibration.points, calibration.residuals_s, strict=True)))
            for warning in calibration.warnings:
                echo(f"WARNING (CalibrationWarning): {warning}")
        cap = capacity_per_s(profile, spec.batching, spec.prompt_tokens, spec.output_tokens, calibration)
        echo(f"capacity: {cap:.1f} requests/s (prompt {spec.prompt_tokens}, output {spec.output_tokens})")
        if calibration is not None:
            # the send-to-queue delay under the validation's own open-loop generator (a closed loop sends in
            # bursts, whose client-side wait is no part of it): a short Poisson probe at half the capacity,
            # with a seed of its own
            full = min(spec.batching.max_batch_size, profile.batch_sizes("decode")[-1])
            full_s = calibration.cycle_s(full, profile.batch_timing(full, spec.prompt_tokens, spec.output_tokens).total_s)
            probe_n = spec.replications * probe_requests_per_run(cap, full_s)
            probe = level_scenario(replace(spec, requests_per_level=probe_n),
                                   kept_profile, 0.5 * cap, calibration)
            since = time.monotonic()
            probe_df = asyncio.run(run_load([pod.url], make_workload(probe, Streams(spec.seed + 10_000)),
                                            client=ClientPolicy(timeout_s=60, max_retries=0),
                                            max_duration_s=probe.horizon_s + 5, seed=spec.seed + 10_000,
                                            pod_clock=True))
            sends = (probe_df.attrs["t0_monotonic"] + probe_df.arrival_s).tolist()
            probe_trace = fetch_trace(pod.url, since)
            kept_traces.update(probe=probe_trace, probe_sends=sends, probe_requests=probe_requests(probe_df))
            tokens = (spec.prompt_tokens, spec.output_tokens)

            def timing(b: int) -> Any:
                return profile.batch_timing(b, *tokens)

            calibration, probe_speed = open_loop_noise(calibration, trace_rows(probe_trace, lambda b: timing(b).total_s))
            if np.isfinite(probe_speed) and probe_speed > 0:
                # the levels are open loops: the fit at the probe's speed (the levels' rates stay the closed
                # loop's capacity times the level); docs/validation.md, stop 38
                calibration = replace(_at_speed(calibration, probe_speed), open_loop_speed=probe_speed)
            calibration = replace(calibration, ingress_s=ingress_s(probe_trace, sends))
            calibration = probe_answers(calibration, probe_df, probe_trace, lambda b: timing(b).prefill_s)
            echo(f"open-loop probe ({probe.horizon_s:.0f} s at half the capacity): its batches took "
                 f"{probe_speed:.3f} x the fit, which the simulator's pod takes on (the spread of single batches is "
                 f"taken from them too); a request sent "
                 f"while a batch runs reaches the queue {calibration.ingress_s * 1000:.1f} ms later (median); "
                 f"a batch of b answers its clients {calibration.answer_s * 1000:.2f} + b x "
                 f"{calibration.answer_per_request_s * 1000:.2f} ms after it ends; its first token comes "
                 f"{calibration.first_token_scale:.2f} x as far into it as the fit's split")
        sized = spec.sized_for(cap)
        if sized.requests_per_level != spec.requests_per_level:
            echo(f"{sized.requests_per_level} requests a level ({sized.level_budget_s:.0f} s of real runs at "
                 f"this capacity; --requests-per-level sets it)")
        spec = sized
        levels = _Levels(spec, profile, kept_profile, calibration, work, echo)
        kept: list[RealRun] = []
        saturated: list[str] = []
        for level in spec.levels:
            rate = level * cap
            scenario = level_scenario(spec, kept_profile, rate, calibration)
            echo(f"level {level:.0%}: {rate:.1f} requests/s, {spec.replications} x {spec.requests_per_run} requests ...")
            runs = []
            for r in range(spec.replications):
                seed = spec.seed + r
                workload = make_workload(scenario, Streams(seed))
                since = time.monotonic()
                # the pod's times on this host's clock: the real TTFT counts from the send, as the simulator's
                real_df = asyncio.run(run_load([pod.url], workload, client=ClientPolicy(timeout_s=60, max_retries=0),
                                               max_duration_s=scenario.horizon_s + DRAIN_S, seed=seed,
                                               pod_clock=True))
                runs.append(RealRun(level, r, seed, rate, real_df, fetch_trace(pod.url, since)))
                _, busy = run_caveats(real_df, f"{level:.0%}, seed {seed}", echo)
                if busy is not None:
                    saturated.append(busy)
                save_run(out, runs[-1])
            levels.add(level, rate, runs)
            kept += runs
    finally:
        pod.stop()
        remove_scratch(work)
        if kept_traces:
            save_traces(out, kept_traces)
    provenance = {
        "capsim_version": capsim.__version__,
        "spec": {**asdict(spec), "batching": spec.batching.model_dump()},
        "profile": str(kept_profile),
        "profile_metadata": dict(profile.metadata),
        "capacity_per_s": cap,
        "calibration": asdict(calibration) if calibration else None,
        "calibration_warnings": list(calibration.warnings) if calibration else [],
        "generator_saturated": saturated,  # runs whose load generator was short of CPU (loadgen.generator_saturated)
        "cores": {"pod": pod_core, "loadgen": gen_core},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "wall_s": time.perf_counter() - started,
        "created_unix": time.time(),
        "targets": TARGETS,
        "intervals": {"confidence": vs.CONFIDENCE, "method": "percentile block bootstrap over pooled replications",
                      "block_s": spec.block_s, "n_resamples": vs.N_RESAMPLES},
        "runs": RUNS_DIR,
        "real_ttft_from": ttft_from(kept),
    }
    return levels.write(out, provenance)


def resimulate(from_dir: str | Path, out_dir: str | Path, echo: Callable[[str], None] = print) -> Any:
    """Simulate a validation's kept real runs again (``from_dir/runs/``, with the profile and calibration
    it kept) and write the results as :func:`run_validation` does under ``out_dir``; the real side is the
    same, so a change of the simulator is judged on the same runs. Returns the results frame."""
    src, out = Path(from_dir), Path(out_dir)
    prov = read_provenance(src)
    try:
        spec = ValidationSpec(**spec_fields(prov["spec"]))
        calibration = Calibration(**calibration_fields(prov["calibration"])) if prov["calibration"] else None
    except (TypeError, ValueError, KeyError) as exc:
        raise KeptRunsError(f"{src / 'provenance.json'}: its spec or calibration does not fit this capsim "
                            f"({type(exc).__name__}: {exc})") from exc
    runs = load_runs(src)
    try:
        profile = ServiceTimeProfile.from_csv(src / "profile.csv")
    except (OSError, ValueError) as exc:
        raise KeptRunsError(f"{src / 'profile.csv'}: cannot read the validation's profile ({exc})") from exc
    out.mkdir(parents=True, exist_ok=True)
    kept_profile = out / "profile.csv"
    profile.to_csv(kept_profile)
    work = scratch_dir("capsim-resimulate-")
    try:
        levels = _Levels(spec, profile, kept_profile, calibration, work, echo)
        for level in sorted({r.level for r in runs}):
            these = [r for r in runs if r.level == level]
            echo(f"level {level:.0%}: {these[0].rate_per_s:.1f} requests/s, {len(these)} kept runs ...")
            levels.add(level, these[0].rate_per_s, these)
    finally:
        remove_scratch(work)
    if out.resolve() != src.resolve():  # the kept runs go with the results, byte for byte
        shutil.copytree(src / RUNS_DIR, out / RUNS_DIR, dirs_exist_ok=True)
        if (src / TRACES_FILE).exists():
            shutil.copyfile(src / TRACES_FILE, out / TRACES_FILE)
    prov.update({"profile": str(kept_profile), "capsim_version": capsim.__version__, "real_ttft_from": ttft_from(runs),
                 "resimulated": {"from": str(src), "created_unix": time.time()}})
    if prov["real_ttft_from"] != TTFT_FROM_SEND:
        echo(f"note: these runs' real TTFT counts from {prov['real_ttft_from']}, not from the send as the simulator's "
             "does (kept before the load generator placed the pod's times on the host's clock)")
    return levels.write(out, prov)


class _Levels:
    """The simulated side of a validation, level by level: each kept real run simulated (the full model on
    its schedule, and the ablation's simpler and run-replaying models), compared, and written."""

    def __init__(self, spec: ValidationSpec, profile: ServiceTimeProfile, kept_profile: Path,
                 calibration: Calibration | None, work: Path, echo: Callable[[str], None]) -> None:
        self.spec, self.profile, self.kept_profile = spec, profile, kept_profile
        self.calibration, self.work, self.echo = calibration, work, echo
        self.variants = _variants(calibration)
        self.rows: list[dict[str, Any]] = []
        self.reps: list[dict[str, Any]] = []
        self.diagnostics: dict[str, Any] = {}
        self.ablation: dict[str, dict[str, dict[str, float]]] = {}
        self.last_speed = 1.0  # the pod's speed over the calibration in the last replication simulated
        self.judged: dict[str, list[dict[str, Any]]] = {}  # compare_level's rows of the JUDGED entries

    def add(self, level: float, rate: float, runs: Sequence[RealRun]) -> None:
        """Simulate and compare one level's real runs (its replications)."""
        from capsim.sim.simulate import simulate

        spec, profile, kept_profile, calibration, work = (self.spec, self.profile, self.kept_profile,
                                                          self.calibration, self.work)
        scenario = level_scenario(spec, kept_profile, rate, calibration)
        window = (scenario.warmup_s, scenario.horizon_s)
        real_runs, sim_runs, level_diag = [], [], []
        variant_runs: dict[str, list[vs.Blocks]] = {name: [] for name in self.variants}
        for run in runs:
            real_df, trace, seed, r = run.requests, run.trace, run.seed, run.replication
            sim = simulate(scenario, seed=seed)
            real_runs.append(vs.cut_blocks(real_df, *window, block_s=spec.block_s))
            sim_runs.append(vs.cut_blocks(sim.requests, *window, block_s=spec.block_s))
            # each batch's wall and calibrated cycle, once for the diagnostics and the replay
            fitted = batch_fit(trace, profile, spec, calibration) if calibration is not None and len(
                trace) >= 2 else None
            level_diag.append(trace_diagnostics(trace, real_df, sim.requests, profile, spec, calibration,
                                                fitted=fitted))
            for name, cal in self.variants.items():  # the same real run against simpler models of the pod
                other = simulate(level_scenario(spec, kept_profile, rate, cal), seed=seed)
                variant_runs[name].append(vs.cut_blocks(other.requests, *window, block_s=spec.block_s))
            speed = level_diag[-1].get("wall_over_fit_mean", float("nan"))
            if calibration is not None:
                # the full model at the speed the pod kept in the replication before this one (the
                # calibration's for the first): measured before this run, so still a prediction of it
                other = simulate(level_scenario(spec, kept_profile, rate, _at_speed(calibration, self.last_speed)),
                                 seed=seed)
                variant_runs.setdefault(RUN_PREVIOUS, []).append(
                    vs.cut_blocks(other.requests, *window, block_s=spec.block_s))
            if calibration is not None and np.isfinite(speed) and speed > 0:
                self.last_speed = speed
                # the full model at the pod's own speed in this run (its batches' mean wall over the fit):
                # the simulator's queueing apart from the machine's drift (docs/validation.md)
                at_speed = _at_speed(calibration, speed)
                other = simulate(level_scenario(spec, kept_profile, rate, at_speed), seed=seed)
                variant_runs.setdefault(RUN_SPEED, []).append(
                    vs.cut_blocks(other.requests, *window, block_s=spec.block_s))
                replay = replay_factors(trace, profile, spec, calibration, fitted=fitted)
                if replay:  # and its slow spells where they came: the run's own batches in order
                    replayed = level_scenario(spec, kept_profile, rate, replace(at_speed, cycle_noise=replay),
                                              noise_block=len(replay))
                    other = simulate(replayed, seed=seed)
                    variant_runs.setdefault(RUN_REPLAY, []).append(
                        vs.cut_blocks(other.requests, *window, block_s=spec.block_s))
                    # and the requests when they were really sent (the generator runs late under load)
                    sends, first = on_sends(replayed, real_df, work / f"sends-{level:g}-{r}.csv")
                    other = simulate(sends, seed=seed)
                    variant_runs.setdefault(RUN_SENDS, []).append(
                        vs.cut_blocks(shifted(other.requests, first), *window, block_s=spec.block_s))
                    # and when the pod's batcher saw each request (its parsing, late under load)
                    seen = on_parsed(replayed, real_df, trace, work / f"parsed-{level:g}-{r}.csv", seed)
                    if seen is not None:
                        variant_runs.setdefault(RUN_PARSED, []).append(
                            vs.cut_blocks(seen, *window, block_s=spec.block_s))
            real_sum, sim_sum = summarize_frame(real_df, *window), summarize_frame(sim.requests, *window)
            for metric in METRICS:
                rv, sv = real_sum[metric], sim_sum[metric]
                self.reps.append({"level": level, "replication": r, "seed": seed, "metric": metric, "real": rv,
                                  "sim": sv, "rel_error": (sv - rv) / rv if rv else float("nan")})
        self.diagnostics[f"{level:g}"] = level_diag
        self.echo(_describe_diagnostics(level_diag))
        whole = {k: v for k, v in variant_runs.items() if len(v) == len(real_runs)}  # every replication
        self.ablation[f"{level:g}"] = _ablation(real_runs, {**whole, "full model": sim_runs})
        self.echo("  model parts, error of ttft p50/p99, e2e p99: " + "; ".join(
            f"{name} {e['ttft_p50_s']:+.1%}/{e['ttft_p99_s']:+.1%}, {e['e2e_p99_s']:+.1%}"
            for name, e in self.ablation[f"{level:g}"].items()))
        self.rows.extend(compare_level(level, rate, real_runs, sim_runs, seed=spec.seed))
        for name in JUDGED:  # the targets on the entries that take the pod's speed from its trace, too
            if name in whole:
                self.judged.setdefault(name, []).extend(compare_level(level, rate, real_runs, whole[name],
                                                                      seed=spec.seed))

    def write(self, out: Path, provenance: dict[str, Any]) -> Any:
        """``results.csv``, ``replications.csv``, ``validation.png`` and ``provenance.json`` (``provenance``
        with this side's diagnostics and ablation) under ``out``; the results frame, also printed."""
        import pandas as pd

        results = pd.DataFrame(self.rows)
        calibration = self.calibration
        results.attrs["calibration_warnings"] = list(calibration.warnings) if calibration else []
        results.to_csv(out / "results.csv", index=False)
        pd.DataFrame(self.reps).to_csv(out / "replications.csv", index=False)
        _plot(results, out / "validation.png")
        judged = {}
        for name, rows in self.judged.items():
            checks = verdicts(pd.DataFrame(rows))
            judged[name] = {"met": sum(ok for _, ok in checks), "of": len(checks),
                            "missed": [what for what, ok in checks if not ok]}
        drift = speed_warnings(self.diagnostics)
        # each replication's batches over the calibrated cycle: the margin a plan on this pod needs
        observed = observed_speed(d.get("wall_over_fit_mean") for runs in self.diagnostics.values() for d in runs)
        provenance = {**provenance, "diagnostics": self.diagnostics, "ablation": self.ablation,
                      "targets_by_entry": judged, "speed_warnings": drift, "observed_speed": observed}
        (out / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
        margin = None
        if calibration is not None:
            write_service(out, self.spec, self.kept_profile, calibration)
            margin = note_observed_speed(out, observed, "the pod")
        self.echo(format_results(results))
        if judged:
            self.echo("targets met by the entries that take the pod's speed from its trace: " + "; ".join(
                f"{name} {v['met']} of {v['of']}" for name, v in judged.items()))
        for line in drift:
            self.echo(f"WARNING (the pod's speed): {line}")
        if margin is not None:
            self.echo(f"after the calibration, {margin}")
        return results


#: a replication whose pod ran its batches more than this far off the calibrated cycle, on the mean, is warned of
SPEED_TOLERANCE = 0.10


def speed_warnings(diagnostics: dict[str, list[dict[str, float]]],
                   tolerance: float = SPEED_TOLERANCE) -> list[str]:
    """One line per level in which the real pod ran off the calibrated batch cycle by more than ``tolerance``
    in some replication (its batches' mean wall over the fit, ``wall_over_fit_mean``, per replication).

    The full model runs at the calibration's speed; a pod 10% slower at 85% load runs at 94%, and the
    full model's errors there measure the machine's drift more than the model (stop 33: 1.4 times at 30%
    in one run). ``provenance.json`` keeps the lines (``speed_warnings``)."""
    out = []
    for level, runs in diagnostics.items():
        speeds = [float(d.get("wall_over_fit_mean", float("nan"))) for d in runs]
        off = [v for v in speeds if np.isfinite(v) and abs(v - 1.0) > tolerance]
        if off:
            out.append(f"at {float(level):.0%} load the pod ran its batches at "
                       f"{', '.join(f'{v:.2f}' for v in speeds)} times the calibrated cycle (replication by "
                       f"replication; {len(off)} more than {tolerance:.0%} off): the full model's errors there are "
                       "mostly the machine's drift; 'full model at the run's speed' takes it out")
    return out


def _at_speed(calibration: Calibration, speed: float) -> Calibration:
    """``calibration`` with the pod running ``speed`` times as long: its scale and both overheads."""
    return replace(calibration, time_scale=calibration.time_scale * speed, overhead_s=calibration.overhead_s * speed,
                   arrival_overhead_s=calibration.arrival_overhead_s * speed)


def _variants(calibration: Calibration | None) -> dict[str, Calibration]:
    """Simpler models of the pod, simulated on the same runs to show what each part of the full one
    buys: the two-term fit (scale, per-request overhead) with the profile's gamma noise, the issue's
    model; then with the measured cycle noise; then the full fit (per-arrival term) without the ingress
    delay; the full model has all of them."""
    if calibration is None or len(calibration.points) < 2:
        return {}
    try:
        two = fit_cycle(calibration.points, warn=False)
    except CalibrationError:
        return {}
    return {"two-term fit, profile noise": two,
            "two-term fit, measured noise": replace(two, cycle_noise=calibration.cycle_noise),
            "full fit, no ingress delay": replace(calibration, ingress_s=0.0),
            NO_ANSWERS: replace(calibration, answer_s=0.0, answer_per_request_s=0.0, first_token_scale=1.0)}


def _ablation(real_runs: list[vs.Blocks], models: dict[str, list[vs.Blocks]]) -> dict[str, dict[str, float]]:
    """Each model's error per metric over the pooled replications (point estimates)."""
    real = vs.pool(real_runs)
    every = np.arange(len(real))
    out = {}
    for name, runs in models.items():
        sim = vs.pool(runs)
        errs = {}
        for metric in METRICS:
            r = vs.statistic(metric)(real, every)
            errs[metric] = (vs.statistic(metric)(sim, every) - r) / r if r else float("nan")
        out[name] = errs
    return out


def _describe_diagnostics(runs: list[dict[str, float]]) -> str:
    """The trace's numbers of a level (median over its replications), two lines."""
    def med(key: str) -> float:
        values = [d[key] for d in runs if key in d]
        return float(np.median(values)) if values else float("nan")

    return (f"  batches: real {med('real_mean_size'):.2f} requests, {med('real_mean_batch_ms'):.1f} ms; "
            f"sim {med('sim_mean_size'):.2f}, {med('sim_mean_batch_ms'):.1f} ms; real wall / fit: cv "
            f"{med('wall_over_fit_cv'):.1%}, p99 {med('wall_over_fit_p99'):.3f}, "
            f"{med('ms_per_arrival_during'):+.2f} ms per arrival and {med('ms_per_waiting'):+.2f} ms per "
            f"waiting request left unfitted (waiting p99 {med('waiting_at_start_p99'):.0f})\n"
            f"  send -> receipt (in the real TTFT) p50 {med('way_in_p50_ms'):.1f} / p99 {med('way_in_p99_ms'):.1f} ms, "
            f"send -> queue p99 {med('ingress_p99_ms'):.1f} ms, missed a batch {med('missed_batch_share'):.2%}, "
            f"generator late p99 {med('send_error_p99_ms'):.1f} ms, loop lag at batch end p99 "
            f"{med('end_lag_p99_ms'):.1f} ms; after the first token p50 real {med('real_after_first_p50_ms'):.1f} "
            f"/ sim {med('sim_after_first_p50_ms'):.1f} ms")


def _plot(results: Any, path: Path) -> None:
    from capsim import plots

    plots.save(plots.sim_vs_real(results), path)

"""The continuous validation's calibration: the real pod's step cycle under load, fitted over its step trace.

The step model (``StepTimeFit``) times the engine alone, on an idle core. In the pod, the same core also
parses each arriving request's HTTP and reads its session, answers and stores each finished one, and
hands every emitted token to its request; the engine's thread and the event loop share the GIL. Between
two tokens of a running request lies exactly one *cycle*: from the end of one engine step to the end of
the next (the loop's work in between, then the step). The pod's step trace (``GET /debug/batches`` in
continuous mode, ``capsim.core.continuous_batcher.StepRecord``) gives every step's composition, its arrivals,
tokens and answers, and its times; per run, the means of these give one point of

    cycle = time_scale x model(step) + extra_s + arrivals x arrival_s  [+ emitted x token_s]

fitted through the runs' points by bounded least squares (every term >= 0, ``time_scale`` > 0), each run
weighted by ``1 / its mean cycle``, the time per arrival first fitted from the steps within each run
(``arrival_within_runs``: across runs, arrivals a step move with the requests running) and then held. Means, because the simulator must meet the mean cycle of each load (an
ITL, a throughput), and a single long cycle (the core taken by another process) belongs to its run's mean;
a step-by-step fit let a few such cycles pull every run's fit (on the shared machine it met the runs' means
to 27% rms, over-predicting the short runs by up to 40%). Closed-loop runs (a client sends its next request when the last
is answered) cover 2 to ``max_num_seqs`` requests running; open-loop Poisson runs at the validated levels'
rates (and half the capacity) give the arrivals per step of each level and separate arrivals from answers
(in a closed loop each answer brings an arrival). The simulator
takes ``time_scale`` as ``service.time_scale``, ``extra_s`` into the model's ``c0`` and ``token_s`` into
its ``c3`` (per decode; both divided by the scale that multiplies them back), and ``arrival_s`` as
``service.arrival_overhead_ms``, charged to the step in progress when a request arrives.

This module runs the calibration against a pod (the load, the trace, the pod's CPU); the fitting itself,
pure, is ``capsim.studies.validate_continuous_cycle``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from capsim.model.step_model import StepTimeFit
from capsim.studies.pods import pinned
from capsim.studies.validate_calibrate import VALIDATION_TRACE_STEPS, lost_window_start
from capsim.studies.validate_continuous_cycle import (
    ABLATION,
    FIT_TERMS,
    MAX_REL_RESIDUAL,
    MIN_RUNS,
    MIN_STEPS,
    MIN_THROUGH,
    TERMS,
    StepCalibration,
    arrival_within_runs,
    calibrated_fit,
    capacity_per_s,
    closed_loop_step_s,
    cycle_parts,
    cycles,
    fit_cycle_terms,
    fit_pod_cpu,
    fit_step_cycles,
    open_run_label,
    reached_rate,
    run_means,
    term_ablation,
)

# the cycle's fitting lives in validate_continuous_cycle; its names are here too, for one import
__all__ = [
    "ABLATION",
    "BASE_PROFILE",
    "FIT_TERMS",
    "MAX_ARRIVAL_OVER_CPU",
    "MAX_REL_RESIDUAL",
    "MIN_RUNS",
    "MIN_STEPS",
    "TERMS",
    "VALIDATION_TRACE_STEPS",
    "StepCalibration",
    "arrival_within_runs",
    "calibrate_steps",
    "calibrated_fit",
    "capacity_per_s",
    "closed_loop_step_s",
    "cycle_parts",
    "cycles",
    "drive_closed",
    "drive_open",
    "fetch_steps",
    "fit_cycle_terms",
    "fit_pod_cpu",
    "fit_step_cycles",
    "measure_step_fit",
    "open_run_label",
    "process_cpu_s",
    "reached_rate",
    "request_split",
    "run_means",
    "term_ablation",
]

# the measured static profile the step model is added to (its kernels are not used; its metadata is kept)
BASE_PROFILE = Path(__file__).resolve().parents[3] / "data" / "profiles" / "cpu-tiny-float32.csv"


# ---- the trace ----------------------------------------------------------------------------------------------
def fetch_steps(url: str, since: float = float("-inf"), until: float = float("inf")) -> Any:
    """The pod's step trace as a frame (``StepRecord``'s fields), steps that ended in ``(since, until]`` on
    ``time.perf_counter`` (the pod's clock too: both read ``CLOCK_MONOTONIC``). ``frame.attrs["truncated"]``
    is True when the pod's trace had already dropped steps of that window (its oldest kept step began after
    ``since``: the pod ran more steps than ``CAPSIM_TRACE_STEPS`` since then), so the frame lacks its start."""
    import httpx
    import pandas as pd

    params = {"since": since} if np.isfinite(since) else {}
    body = httpx.get(f"{url}/debug/batches", params=params, timeout=30).json()
    frame = pd.DataFrame(body["batches"], columns=body["fields"] or None)
    if not frame.empty:
        frame = frame[(frame.end > since) & (frame.end <= until)].reset_index(drop=True)
    frame.attrs["truncated"] = lost_window_start(body, since)
    return frame


def measure_step_fit(out: Path, core: int | None, *, model: str, threads: int, workloads: int, max_num_seqs: int,
                     prompt: int, output: int, seed: int) -> Path:
    """Measure and fit the step model in a fresh process pinned like the pod, over the workload's lengths;
    the base profile with the fit in its metadata goes to ``out``."""
    p, o = prompt, output
    code = (
        "from pathlib import Path\n"
        "from capsim.core.engine import ReferenceEngine\n"
        "from capsim.core.step_profile import fit_steps, measure_steps, probe_steps, with_step_model\n"
        "from capsim.model.profile import ServiceTimeProfile\n"
        f"e = ReferenceEngine({model!r}, device='cpu', dtype='float32', seed=0, threads={threads})\n"
        f"s = measure_steps(e, workloads={workloads}, requests={2 * max_num_seqs}, "
        f"max_prompt={p}, max_output={o}, seed={seed}, repeats=2)\n"
        f"s += probe_steps(e, max_decodes={max_num_seqs}, contexts=({p}, {p + o}), prompts=(1, {p}), repeats=3)\n"
        f"with_step_model(ServiceTimeProfile.from_csv({str(BASE_PROFILE)!r}), fit_steps(s)).to_csv(Path({str(out)!r}))\n"
    )
    done = subprocess.run(pinned([sys.executable, "-c", code], core), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the step measurement failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return out


# ---- the calibration runs ----------------------------------------------------------------------------------
async def _post(client: Any, url: str, session: str, prompt: int, output: int) -> tuple[float, ...]:
    """One turn; (client round trip, the answer's queue_s, ttft_s, model_s, total_s, the way in, the history
    read), seconds. The way in is the send to the pod's receipt (its answer's ``received_at`` on this host's
    monotonic clock, ``loadgen.pod_receipt``); NaN when the answer has none or it is not on this clock. The
    history read is the pod's receipt to its engine (the answer's ``history.load_s``; NaN without it)."""
    from capsim.core.loadgen import pod_receipt

    sent = time.perf_counter()
    r = await client.post(f"{url}/v1/sessions/{session}/turns",
                          json={"prompt_tokens": prompt, "max_new_tokens": output})
    answered = time.perf_counter()
    r.raise_for_status()
    answer = r.json()
    t = answer["timings"]
    got = t.get("received_at")
    receipt = pod_receipt(float(got), sent, answered) if isinstance(got, int | float) else None
    load = (answer.get("history") or {}).get("load_s")
    return (answered - sent, t["queue_s"], t["ttft_s"], t["model_s"], t["total_s"],
            float("nan") if receipt is None else receipt - sent,
            float(load) if isinstance(load, int | float) else float("nan"))


def request_split(rows: Sequence[tuple[float, ...]], output: int) -> dict[str, float]:
    """Where requests' time went, medians over ``rows`` of ``_post``: the way in and out (the client's round
    trip less the pod's ``total_s``: HTTP before the pod's clock starts, the answer's transfer), the pod's
    answer path after the last token (the store write), and the ITL two ways: the pod's own token span
    and the span to the client's receipt that a frame of client times gives (``validate_continuous.itl_frame``).
    Rows with the way in (a sixth column, since stop 30) also give it and the way out apart (``way_in_s``,
    ``way_out_s``: medians over the rows that have it)."""
    a = np.asarray(rows, dtype=float)
    if a.size == 0:
        return {}
    client, queue, ttft, model, total = a.T[:5]
    first = ttft - queue
    n = max(output - 1, 1)
    pod_itl, receipt_itl = (model - first) / n, (client - ttft) / n
    split = {"requests": float(len(a)), "way_in_and_out_s": float(np.median(client - total)),
             "answer_path_s": float(np.median(total - queue - model)), "pod_itl_s": float(np.median(pod_itl)),
             "receipt_itl_s": float(np.median(receipt_itl)),
             "receipt_over_pod_itl": float(np.median(receipt_itl) / np.median(pod_itl) - 1)}
    way_in = a[:, 5] if a.shape[1] > 5 else np.full(len(a), np.nan)
    on = np.isfinite(way_in)
    if on.any():
        split["way_in_s"] = float(np.median(way_in[on]))
        split["way_out_s"] = float(np.median((client - total - way_in)[on]))
    return split


def drive_closed(url: str, clients: int, seconds: float, prompt: int, output: int) -> tuple[float, float]:
    """``clients`` closed-loop clients for ``seconds``; the run's start and end (``perf_counter``: from once
    the clients are built to the last answer, so neither building nor closing them is in the run's span)."""
    from capsim.core.http_pools import http_clients

    async def main() -> tuple[float, float]:
        async with http_clients() as cs:
            start = time.perf_counter()
            stop = start + seconds

            async def one(k: int) -> None:
                i = 0
                while time.perf_counter() < stop:
                    await _post(cs[k % len(cs)], url, f"cal-{clients}-{k}-{i}-{time.time_ns()}", prompt, output)
                    i += 1

            await asyncio.gather(*[one(k) for k in range(clients)])
            return start, time.perf_counter()

    return asyncio.run(main())


def drive_open(url: str, rate: float, seconds: float, prompt: int, output: int,
               seed: int = 0) -> tuple[float, float, list[tuple[float, ...]]]:
    """Poisson arrivals at ``rate`` per second for ``seconds`` (each request its own session), waiting for
    the answers; the run's start (the schedule's zero, once the clients are built) and end (the last answer;
    ``perf_counter``) and each answer's times (``_post``)."""
    from capsim.core.http_pools import http_clients

    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=max(1, int(rate * seconds * 1.5) + 10))
    at = np.cumsum(gaps)
    at = at[at < seconds]

    async def main() -> tuple[float, float, list[tuple[float, ...]]]:
        async with http_clients() as cs:
            t0 = time.perf_counter()
            tag = time.time_ns()
            tasks: list[asyncio.Task[tuple[float, ...]]] = []
            for k, t in enumerate(at):
                delay = t0 + t - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_post(cs[k % len(cs)], url, f"open-{tag}-{k}", prompt, output)))
            rows = list(await asyncio.gather(*tasks))
            return t0, time.perf_counter(), rows

    return asyncio.run(main())


def process_cpu_s(pid: int) -> float:
    """A process's CPU seconds so far, all its threads (user + system, ``/proc/PID/stat``; Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


MAX_ARRIVAL_OVER_CPU = 2.0  # a fitted time per arrival past this many times the pod's CPU per request is doubtful


def calibrate_steps(url: str, fit: StepTimeFit, *, clients: Sequence[int], levels: Sequence[float], seconds: float,
                    max_num_seqs: int, prompt: int, output: int, pid: int | None = None,
                    echo: Any = None, history_read: bool = True, open_loop_fit: bool = False,
                    prefill_scale: bool = False) -> tuple[StepCalibration, Any, dict[str, dict[str, float]]]:
    """Closed-loop runs with each of ``clients``, fitted; then open-loop runs at each of ``levels`` of the
    capacity that fit gives, ``seconds`` each; all fitted together over the pod's step trace. The
    calibration, every step's cycle frame (with its run's label), and each open-loop run's
    ``request_split`` (its requests' way in, plus with ``history_read`` the pod's history read before its
    engine: ``StepCalibration.way_in_s``). With the pod's ``pid``, each
    run's CPU of the pod process off its engine thread is fitted per request and per step
    (``StepCalibration.request_cpu_s``, ``step_cpu_s``). With ``open_loop_fit`` and three open-loop runs or
    more, the final fit goes through those alone (``fit_step_cycles(through=...)``; the closed loops are
    weighed against it), else through all runs. With ``prefill_scale``, the final fit first scales the step
    model's prefill terms to what the fitted runs' prefill steps took (``StepCalibration.prefill_scale``)."""
    import pandas as pd

    runs = []
    splits: dict[str, dict[str, float]] = {}
    cpu_runs: list[tuple[float, float, float]] = []
    ways: dict[str, tuple[float, ...]] = {}  # each open-loop run's way in per request (StepCalibration.way_in_s)

    def cpu() -> float:
        return process_cpu_s(pid) if pid is not None else float("nan")

    def keep_cpu(before: float, after: float, steps: Any) -> None:
        if pid is not None and len(steps):
            cpu_runs.append((float(steps.arrivals.sum()), float(len(steps)),
                             after - before - float(steps.engine_cpu_s.sum())))

    for n in clients:
        c0 = cpu()
        t0, t1 = drive_closed(url, n, seconds, prompt, output)
        c1 = cpu()  # before the trace's fetch, which the pod also serves
        runs.append((f"closed {n}", fetch_steps(url, t0, t1)))
        keep_cpu(c0, c1, runs[-1][1])
    first = fit_step_cycles(runs, fit)
    cap = capacity_per_s(fit, first, max_num_seqs, prompt, output)
    if echo is not None:
        echo(f"  closed loop: {first.describe()}; capacity {cap:.1f} requests/s")
    late = []
    for k, level in enumerate(levels):
        c0 = cpu()
        t0, t1, rows = drive_open(url, level * cap, seconds, prompt, output, seed=k)
        c1 = cpu()
        steps = fetch_steps(url, t0, t1)
        keep_cpu(c0, c1, steps)
        label = open_run_label(level)
        runs.append((label, steps))
        splits[label] = request_split(rows, output)
        way_in = np.asarray([row[5] for row in rows], dtype=float)  # the rows are in send order
        if history_read:  # to the engine: the pod reads the session's history after its receipt
            way_in = way_in + np.asarray([row[6] for row in rows], dtype=float)
        if np.isfinite(way_in).any():
            ways[label] = tuple(np.round(way_in[np.isfinite(way_in)], 6).tolist())
        got, scheduled = reached_rate(steps, t0, seconds), len(rows) / seconds  # the schedule, not rate x s
        if got < 0.9 * scheduled:
            late.append(f"the open-loop run at {level:.0%} ({scheduled:.1f} requests/s scheduled) reached the "
                        f"engine at {got:.1f}/s: the load generator or the pod's HTTP fell behind (a busy machine?)")
    opened = [label for label, steps in runs if label.startswith("open") and len(steps) > 1]
    through = opened if open_loop_fit and len(opened) >= MIN_THROUGH else []
    cal = replace(fit_step_cycles(runs, fit, through=through, prefill_scale=prefill_scale), way_in_s=ways)
    if len(cpu_runs) >= 2:
        per_request, per_step = fit_pod_cpu(cpu_runs)
        cal = replace(cal, request_cpu_s=per_request, step_cpu_s=per_step)
        if per_request > 0 and cal.arrival_s > MAX_ARRIVAL_OVER_CPU * per_request:
            late.append(f"the fitted time per arrival ({cal.arrival_s * 1e3:.2f} ms) is over {MAX_ARRIVAL_OVER_CPU:g} x "
                        f"the pod's CPU per request off the engine ({per_request * 1e3:.2f} ms): the fit gives the "
                        "arrivals what something else costs (a busy machine?)")
    cal = replace(cal, warnings=(*cal.warnings, *late))
    frame = pd.concat([cycles(s, fit).assign(run=label) for label, s in runs if len(s) > 1], ignore_index=True)
    return cal, frame, splits

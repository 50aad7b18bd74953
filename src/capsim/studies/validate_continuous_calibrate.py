"""The continuous validation's calibration: the real pod's step cycle under load, fitted over its step trace.

The step model (``StepTimeFit``) times the engine alone, on an idle core. In the pod, the same core also
parses each arriving request's HTTP and reads its session, answers and stores each finished one, and
hands every emitted token to its request; the engine's thread and the event loop share the GIL. Between
two tokens of a running request lies exactly one *cycle*: from the end of one engine step to the end of
the next (the loop's work in between, then the step). The pod's step trace (``GET /debug/batches`` in
continuous mode, ``capsim.core.continuous.StepRecord``) gives every step's composition, its arrivals,
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
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from capsim.model.step_model import StepTimeFit
from capsim.studies.pods import pinned

TERMS: tuple[str, ...] = ("model_s", "one", "arrivals", "emitted")  # the cycle's regressors, in this order
# what the calibration fits by default: through the runs' means, the tokens a step emits move with its
# decodes, which the model already times (c3), so a per-token term only trades against the scale; the
# ablation shows what adding it buys
FIT_TERMS: tuple[str, ...] = ("model_s", "one", "arrivals")
MAX_REL_RESIDUAL = 0.10  # rms over the runs of (mean cycle - mean fit) / mean cycle past which the fit warns
MIN_STEPS = 50
MIN_RUNS = 5  # the fit's four terms and one more
# the measured static profile the step model is added to (its kernels are not used; its metadata is kept)
BASE_PROFILE = Path(__file__).resolve().parents[3] / "data" / "profiles" / "cpu-tiny-float32.csv"


@dataclass(frozen=True)
class StepCalibration:
    """The pod's step cycle under load: ``time_scale x model(step) + extra_s + arrivals x arrival_s +
    emitted x token_s``. ``points``: one per calibration run (label, mean requests running, mean model
    step s, mean cycle s, mean fitted cycle s, arrivals and tokens per step); ``residuals_s``: each
    run's mean cycle minus its mean fit; ``warnings``: terms on their bound 0, a poor fit."""

    time_scale: float
    extra_s: float
    points: tuple[tuple[Any, ...], ...]
    residuals_s: tuple[float, ...] = ()
    warnings: tuple[str, ...] = ()
    arrival_s: float = 0.0
    token_s: float = 0.0
    steps: int = 0
    median_abs_rel_residual: float = float("nan")  # over single steps (their spread, not the fit's bias)
    # each term's share of the mean cycle over all the calibration's steps (what explains the cycle)
    shares: dict[str, float] = field(default_factory=dict)
    # the pod process's CPU off the engine (HTTP, the store, answering, the loop), per request and per step,
    # fitted through the runs (``fit_pod_cpu``; NaN: not measured)
    request_cpu_s: float = float("nan")
    step_cpu_s: float = float("nan")

    @property
    def rel_rms_residual(self) -> float:
        """The rms over the runs of (mean cycle - mean fit) / mean cycle: how well each load's mean is met."""
        rel = [r / p[3] for r, p in zip(self.residuals_s, self.points, strict=True)]
        return float(np.sqrt(np.mean(np.square(rel)))) if rel else float("nan")

    def step_s(self, model_s: float, arrivals: float = 0.0, emitted: float = 0.0) -> float:
        return self.time_scale * model_s + self.extra_s + arrivals * self.arrival_s + emitted * self.token_s

    def describe(self) -> str:
        text = (f"pod step cycle = {self.time_scale:.3f} x model + {self.extra_s * 1e3:.3f} ms "
                f"+ {self.arrival_s * 1e3:.3f} ms per arrival + {self.token_s * 1e3:.3f} ms per token, over "
                f"{self.steps} steps of {len(self.points)} runs; runs' mean cycles met to "
                f"{self.rel_rms_residual:.1%} rms, single steps' median |residual| "
                f"{self.median_abs_rel_residual:.1%}")
        if np.isfinite(self.request_cpu_s):
            text += (f"; the pod's CPU off the engine {self.request_cpu_s * 1e3:.2f} ms per request "
                     f"+ {self.step_cpu_s * 1e3:.3f} ms per step")
        return text


# ---- the trace ----------------------------------------------------------------------------------------------
def fetch_steps(url: str, since: float = float("-inf"), until: float = float("inf")) -> Any:
    """The pod's step trace as a frame (``StepRecord``'s fields), steps that ended in ``(since, until]`` on
    ``time.perf_counter`` (the pod's clock too: both read ``CLOCK_MONOTONIC``)."""
    import httpx
    import pandas as pd

    body = httpx.get(f"{url}/debug/batches", timeout=10).json()
    frame = pd.DataFrame(body["batches"], columns=body["fields"] or None)
    if frame.empty:
        return frame
    return frame[(frame.end > since) & (frame.end <= until)].reset_index(drop=True)


def cycles(steps: Any, fit: StepTimeFit) -> Any:
    """Each step's cycle (previous end to its end), the loop's gap before it, and the model's time for it;
    steps after the loop went idle, and the first of the frame, have no cycle and are dropped."""
    df = steps.copy()
    df["cycle_s"] = df.end - df.end.shift(1)
    df["gap_s"] = df.start - df.end.shift(1)
    df["model_s"] = [fit.predict(p, pc, d, dc) for p, pc, d, dc in
                     zip(df.prefill_tokens, df.prefill_context, df.decodes, df.decode_context, strict=True)]
    df["one"] = 1.0
    keep = df.cycle_s.notna() & ~df.after_idle.astype(bool)
    return df[keep].reset_index(drop=True)


def fit_cycle_terms(frame: Any, terms: Sequence[str] = TERMS, target: str = "cycle_s", *,
                    relative: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Bounded least squares of ``target`` on ``terms`` (each coefficient >= 0; ``model_s``'s > 0), plain or,
    with ``relative``, each row weighted by ``1 / target``; the coefficients and the residuals (target -
    fit, seconds)."""
    from scipy.optimize import lsq_linear

    a = frame[list(terms)].to_numpy(dtype=float)
    y = frame[target].to_numpy(dtype=float)
    w = 1.0 / y if relative else np.ones_like(y)
    lower = [1e-9 if t == "model_s" else 0.0 for t in terms]
    res = lsq_linear(a * w[:, None], y * w, bounds=(lower, [np.inf] * len(terms)), method="bvls")
    coef = np.where(res.x <= 1e-12, 0.0, res.x)
    return coef, y - a @ coef


def run_means(frame: Any) -> Any:
    """Per run (``frame.run``, in order): the mean of each step's cycle, model time, arrivals, tokens and
    answers, and the number of steps."""
    cols = ["cycle_s", *TERMS, "finished", "decodes", "prefill_tokens"]
    means = frame.groupby("run", sort=False)[cols].mean()
    means["steps"] = frame.groupby("run", sort=False).size()
    return means


def arrival_within_runs(frame: Any) -> float:
    """The time an arrival adds to the cycle it arrives in, from the steps' variation within each run: each
    step's cycle, model time and arrivals less its run's means, fitted (cycle ~ scale x model + time x
    arrivals, both >= 0) with a Huber loss, so single long cycles (the core taken by another process)
    weigh as much as a few ordinary ones. Within the runs, the load and the requests running are the same
    for all steps and cannot pass for arrivals; across runs they move together (more clients, more
    running, more arrivals a step), and a fit through the runs' means gave arrivals 7 ms on the shared
    machine where this gives 1.1 to 1.2 ms."""
    from scipy.optimize import least_squares

    cols = ["cycle_s", "model_s", "arrivals"]
    d = frame[cols] - frame.groupby("run", sort=False)[cols].transform("mean")
    x, y = d[["model_s", "arrivals"]].to_numpy(dtype=float), d.cycle_s.to_numpy(dtype=float)
    if not np.any(x[:, 1]):
        return 0.0  # no run's arrivals vary: nothing to fit
    f_scale = max(float(np.median(np.abs(y))) * 1.5, 1e-6)
    res = least_squares(lambda b: (x @ b - y) / f_scale, x0=[1.0, 1e-3], bounds=([0.0, 0.0], [np.inf, np.inf]),
                        loss="huber")
    return float(res.x[1]) if res.x[1] > 1e-9 else 0.0


def fit_step_cycles(runs: Sequence[tuple[str, Any]], fit: StepTimeFit,
                    terms: Sequence[str] = FIT_TERMS) -> StepCalibration:
    """Fit the cycle through the runs' means (``(label, step frame)`` each; see the module docstring), each
    run weighted by ``1 / its mean cycle``: every load's mean cycle is met as closely as the others, and a
    run's single long cycles (the core taken by another process) count once, in its mean, instead of
    pulling a step-by-step fit for every run. The time per arrival comes first, from within the runs
    (``arrival_within_runs``), and is held while the rest is fitted."""
    import pandas as pd

    parts = [cycles(steps, fit).assign(run=label) for label, steps in runs if len(steps) > 1]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(frame) < MIN_STEPS:
        raise ValueError(f"the step calibration needs at least {MIN_STEPS} steps with a cycle, got {len(frame)}: "
                         "run the calibration longer")
    means = run_means(frame)
    if len(means) < MIN_RUNS:
        raise ValueError(f"the step calibration needs at least {MIN_RUNS} runs with steps, got {len(means)}")
    if terms[0] != "model_s" or not set(terms) <= set(TERMS):
        raise ValueError(f"the cycle's terms are model_s first, then any of {TERMS[1:]}; got {tuple(terms)}")
    rest = [t for t in terms if t != "arrivals"]
    if "arrivals" in terms:  # within the runs first, then the rest through the means with it fixed
        arrival_s = arrival_within_runs(frame)
        coef_rest, resid = fit_cycle_terms(means.assign(cycle_s=means.cycle_s - arrival_s * means.arrivals), rest,
                                           relative=True)
        by_term = {**dict(zip(rest, coef_rest, strict=True)), "arrivals": arrival_s}
        coef = np.array([by_term[t] for t in terms])
        # residuals against the real means (the weights used the means less the arrivals' part)
        resid = means.cycle_s.to_numpy() - means[list(terms)].to_numpy(dtype=float) @ coef
    else:
        coef, resid = fit_cycle_terms(means, terms, relative=True)
    got = dict(zip(terms, (float(c) for c in coef), strict=True))
    scale, extra, arrival, token = (got.get(t, 0.0) for t in TERMS)
    problems = [f"degenerate fit: the {name} sits at its bound 0" for name, t in
                (("extra time per step", "one"), ("time per arrival", "arrivals"), ("time per token", "emitted"))
                if t in got and got[t] == 0]
    per_step = frame[list(terms)].to_numpy(dtype=float) @ coef
    med = float(np.median(np.abs(1.0 - per_step / frame.cycle_s.to_numpy())))
    means["fitted_s"] = means.cycle_s - resid
    points = tuple((str(label), float(m.decodes + min(m.prefill_tokens, 1.0)), float(m.model_s), float(m.cycle_s),
                    float(m.fitted_s), float(m.arrivals), float(m.emitted)) for label, m in means.iterrows())
    total = float(means.cycle_s @ means.steps)
    shares = {t: float(c * (means[t] @ means.steps) / total) for t, c in zip(terms, coef, strict=True)}
    shares["unexplained"] = 1.0 - sum(shares.values())
    cal = StepCalibration(scale, extra, points, tuple(float(r) for r in resid), (), arrival, token, len(frame), med,
                          shares)
    if cal.rel_rms_residual > MAX_REL_RESIDUAL:
        problems.append(f"poor fit: the runs' mean cycles are met to {cal.rel_rms_residual:.1%} rms "
                        f"(over {MAX_REL_RESIDUAL:.0%})")
    return replace(cal, warnings=tuple(problems))


def cycle_parts(frame: Any) -> list[dict[str, Any]]:
    """Where each run's mean cycle goes (ms): the engine's CPU (against the model's time for the same
    steps), its wait while running (its wall less its CPU: the GIL held by the event loop, the core taken),
    the hand-off around it (the loop's dispatch to the worker thread and back, the token hooks), and the
    loop's gap between a step's end and the next one's start; with the requests running and the arrivals
    per step."""
    f = frame.assign(wait_s=frame.engine_s - frame.engine_cpu_s, handoff_s=frame.end - frame.start - frame.engine_s,
                     running=frame.decodes + (frame.prefill_tokens > 0))
    out = []
    for label, g in f.groupby("run", sort=False):
        ms = {c: float(g[c].mean() * 1e3) for c in ("cycle_s", "model_s", "engine_cpu_s", "wait_s", "handoff_s",
                                                    "gap_s")}
        out.append({"run": str(label), **ms, "running": float(g.running.mean()), "arrivals": float(g.arrivals.mean())})
    return out


ABLATION: tuple[tuple[str, ...], ...] = (("model_s",), ("model_s", "one"), ("model_s", "arrivals"), FIT_TERMS,
                                          ("model_s", "one", "emitted"), TERMS, (*TERMS, "finished"))


def term_ablation(frame: Any) -> list[dict[str, Any]]:
    """The runs' mean cycles (``frame``: every step's cycle with its run) fitted as the calibration fits them,
    with each set of terms in ``ABLATION``: each term's coefficient and how well the runs' means are met
    (rms and worst of (mean - fit) / mean). A term that explains the gap lowers them; one that does not
    leaves them where they were."""
    means = run_means(frame)
    out = []
    for terms in ABLATION:
        coef, resid = fit_cycle_terms(means, terms, relative=True)
        rel = resid / means.cycle_s.to_numpy()
        out.append({"terms": "+".join(terms), **{t: float(c) for t, c in zip(terms, coef, strict=True)},
                    "runs_rms_rel": float(np.sqrt(np.mean(rel**2))), "runs_worst_rel": float(np.abs(rel).max())})
    return out


def calibrated_fit(fit: StepTimeFit, cal: StepCalibration) -> StepTimeFit:
    """The step model with the pod's extra per step in ``c0`` and its time per token in ``c3`` (per decode),
    both divided by ``time_scale``, which the simulator multiplies back in."""
    c = list(fit.coefficients)
    c[0] += cal.extra_s / cal.time_scale
    c[3] += cal.token_s / cal.time_scale
    return replace(fit, coefficients=(c[0], c[1], c[2], c[3], c[4]))


def closed_loop_step_s(fit: StepTimeFit, running: float, prompt: int, output: int) -> float:
    """The model's mean step with ``running`` requests always running: each step decodes all of them but
    the ``running / output`` whose prompt is prefilled in it, at a mean context of ``prompt + output / 2``."""
    prefills = running / output
    decodes = running - prefills
    return fit.predict(prefills * prompt, 0.0, decodes, decodes * (prompt + output / 2))


def capacity_per_s(fit: StepTimeFit, cal: StepCalibration, max_num_seqs: int, prompt: int, output: int) -> float:
    """Requests per second with ``max_num_seqs`` always running: that many per ``output`` steps, each step
    emitting a token for each and carrying ``rate x step`` arrivals; ``rate = s / (output x base + s x
    arrival_s)`` solves ``rate = s / (output x (base + rate x step x arrival_s / step))``."""
    s = max_num_seqs
    base = cal.step_s(closed_loop_step_s(fit, s, prompt, output), 0.0, s)
    return s / (output * base + s * cal.arrival_s)


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
    """One turn; (client round trip, the answer's queue_s, ttft_s, model_s, total_s), seconds."""
    sent = time.perf_counter()
    r = await client.post(f"{url}/v1/sessions/{session}/turns",
                          json={"prompt_tokens": prompt, "max_new_tokens": output})
    r.raise_for_status()
    t = r.json()["timings"]
    return time.perf_counter() - sent, t["queue_s"], t["ttft_s"], t["model_s"], t["total_s"]


def request_split(rows: Sequence[tuple[float, ...]], output: int) -> dict[str, float]:
    """Where requests' time went, medians over ``rows`` of ``_post``: the way in and out (the client's round
    trip less the pod's ``total_s``: HTTP before the pod's clock starts, the answer's transfer), the pod's
    answer path after the last token (the store write), and the ITL two ways: the pod's own token span
    and the span to the client's receipt that a frame of client times gives (``validate_continuous.itl_frame``)."""
    a = np.asarray(rows, dtype=float)
    if a.size == 0:
        return {}
    client, queue, ttft, model, total = a.T
    first = ttft - queue
    n = max(output - 1, 1)
    pod_itl, receipt_itl = (model - first) / n, (client - ttft) / n
    return {"requests": float(len(a)), "way_in_and_out_s": float(np.median(client - total)),
            "answer_path_s": float(np.median(total - queue - model)), "pod_itl_s": float(np.median(pod_itl)),
            "receipt_itl_s": float(np.median(receipt_itl)),
            "receipt_over_pod_itl": float(np.median(receipt_itl) / np.median(pod_itl) - 1)}


def drive_closed(url: str, clients: int, seconds: float, prompt: int, output: int) -> tuple[float, float]:
    """``clients`` closed-loop clients for ``seconds``; the run's start and end (``perf_counter``)."""
    import httpx

    async def main() -> None:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=4 * clients)) as c:
            stop = time.perf_counter() + seconds

            async def one(k: int) -> None:
                i = 0
                while time.perf_counter() < stop:
                    await _post(c, url, f"cal-{clients}-{k}-{i}-{time.time_ns()}", prompt, output)
                    i += 1

            await asyncio.gather(*[one(k) for k in range(clients)])

    t0 = time.perf_counter()
    asyncio.run(main())
    return t0, time.perf_counter()


def drive_open(url: str, rate: float, seconds: float, prompt: int, output: int,
               seed: int = 0) -> tuple[float, float, list[tuple[float, ...]]]:
    """Poisson arrivals at ``rate`` per second for ``seconds`` (each request its own session), waiting for
    the answers; the run's start and end (``perf_counter``) and each answer's times (``_post``)."""
    import httpx

    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=max(1, int(rate * seconds * 1.5) + 10))
    at = np.cumsum(gaps)
    at = at[at < seconds]

    async def main() -> None:
        limits = httpx.Limits(max_connections=max(16, int(rate * 2)))
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            t0 = time.perf_counter()
            tag = time.time_ns()
            tasks: list[asyncio.Task[tuple[float, ...]]] = []
            for k, t in enumerate(at):
                delay = t0 + t - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_post(c, url, f"open-{tag}-{k}", prompt, output)))
            rows.extend(await asyncio.gather(*tasks))

    rows: list[tuple[float, ...]] = []
    t0 = time.perf_counter()
    asyncio.run(main())
    return t0, time.perf_counter(), rows


def process_cpu_s(pid: int) -> float:
    """A process's CPU seconds so far, all its threads (user + system, ``/proc/PID/stat``; Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fit_pod_cpu(runs: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """``off_engine_cpu = per_request x requests + per_step x steps`` through (requests, steps, the pod's
    CPU less its engine thread's) per run, bounded least squares (both >= 0), each run weighted by 1 / its
    CPU; (per request s, per step s)."""
    from scipy.optimize import lsq_linear

    a = np.array([[r, n] for r, n, _ in runs], dtype=float)
    y = np.array([c for _, _, c in runs], dtype=float)
    w = 1.0 / np.maximum(y, 1e-6)
    res = lsq_linear(a * w[:, None], y * w, bounds=([0.0, 0.0], [np.inf, np.inf]), method="bvls")
    return float(res.x[0]), float(res.x[1])


MAX_ARRIVAL_OVER_CPU = 2.0  # a fitted time per arrival past this many times the pod's CPU per request is doubtful


def reached_rate(steps: Any, t0: float, seconds: float) -> float:
    """Requests per second that reached the pod's engine (``submit``) in the ``seconds`` after ``t0``,
    counted from its steps' arrivals (a step's arrivals came in since the previous step ended)."""
    if len(steps) == 0:
        return 0.0
    inside = steps[(steps.end > t0) & (steps.end <= t0 + seconds)]
    return float(inside.arrivals.sum() / seconds)


def calibrate_steps(url: str, fit: StepTimeFit, *, clients: Sequence[int], levels: Sequence[float], seconds: float,
                    max_num_seqs: int, prompt: int, output: int, pid: int | None = None,
                    echo: Any = None) -> tuple[StepCalibration, Any, dict[str, dict[str, float]]]:
    """Closed-loop runs with each of ``clients``, fitted; then open-loop runs at each of ``levels`` of the
    capacity that fit gives, ``seconds`` each; all fitted together over the pod's step trace. The
    calibration, every step's cycle frame (with its run's label), and each open-loop run's
    ``request_split``. With the pod's ``pid``, each run's CPU of the pod process off its engine thread is
    fitted per request and per step (``StepCalibration.request_cpu_s``, ``step_cpu_s``)."""
    import pandas as pd

    runs = []
    splits: dict[str, dict[str, float]] = {}
    cpu_runs: list[tuple[float, float, float]] = []

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
        runs.append((f"open {level:.0%}", steps))
        splits[f"open {level:.0%}"] = request_split(rows, output)
        got, scheduled = reached_rate(steps, t0, seconds), len(rows) / seconds  # the schedule, not rate x s
        if got < 0.9 * scheduled:
            late.append(f"the open-loop run at {level:.0%} ({scheduled:.1f} requests/s scheduled) reached the "
                        f"engine at {got:.1f}/s: the load generator or the pod's HTTP fell behind (a busy machine?)")
    cal = fit_step_cycles(runs, fit)
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

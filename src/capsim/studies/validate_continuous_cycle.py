"""The pod's step cycle under load, fitted over its step trace: pure fitting (no pod, no HTTP), for
``capsim.studies.validate_continuous_calibrate``, whose docstring says what is measured and why.

``fit_step_cycles`` fits ``cycle = time_scale x model(step) + extra_s + arrivals x arrival_s`` (and
optionally ``emitted x token_s``) through the calibration runs' means, the time per arrival first from the
steps within each run (``arrival_within_runs``); with ``prefill_scale`` the model's prefill terms are scaled
first so that the steps running a prefill chunk are met as the others (``StepCalibration.prefill_scale``);
``term_ablation`` and ``cycle_parts`` say which term explains the cycle and where its time goes; ``calibrated_fit`` and ``capacity_per_s`` turn the result into
the simulator's inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from capsim.model.step_model import StepTimeFit
from capsim.studies.validate_report import replay_speed

TERMS: tuple[str, ...] = ("model_s", "one", "arrivals", "emitted")  # the cycle's regressors, in this order
# what the calibration fits by default: through the runs' means, the tokens a step emits move with its
# decodes, which the model already times (c3), so a per-token term only trades against the scale; the
# ablation shows what adding it buys
FIT_TERMS: tuple[str, ...] = ("model_s", "one", "arrivals")
MAX_REL_RESIDUAL = 0.10  # rms over the runs of (mean cycle - mean fit) / mean cycle past which the fit warns
MIN_STEPS = 50
MIN_RUNS = 5  # the fit's four terms and one more
MIN_THROUGH = 3  # runs a fit through chosen runs needs: the scale and the extra, with the arrivals held, and one more
NOISE_STEPS = 4000  # single steps' cycle over the fit kept for the simulator, in order (contiguous per run)
# steps the simulator walks the kept sequence in a row: the pod's slow spells last tens of steps (the
# log ratio's autocorrelation is about 0.5 at lag 1, 0.2 to 0.35 at lag 10, 0.15 to 0.35 at lag 30 and
# about 0 at lag 100 on the idle machine, 2026-11-30), which drawing each step at random loses
NOISE_BLOCK_STEPS = 64

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
    # each step's cycle over its fit, in order (a contiguous stretch of each run), scaled to mean 1: what
    # the simulator walks (``service.cycle_noise``); empty: none measured
    cycle_noise: tuple[float, ...] = ()
    # each open-loop run's requests' way to the engine (the send to the pod's receipt, and since stop 32 plus
    # the pod's history read before its engine sees the request, seconds, in send order; NaN dropped), by run
    # label (``"open 30%"``): what the simulated requests take from their send to the engine
    # (``service.ingress_ms`` and ``ingress_noise``, :meth:`ingress`); empty: not measured
    way_in_s: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # the runs the fit went through (empty: all of them; ``fit_step_cycles(through=...)``); the others are
    # still in ``points`` and ``residuals_s``, so a closed loop's distance from an open-loop fit shows
    fitted_runs: tuple[str, ...] = ()
    # the step model's prefill terms (c1, c2) times this, the rest as measured, before time_scale: on the pod
    # a step's prefill chunk costs less against its decodes than the lone profiling process measured (stop 40,
    # six calibrations: 0.58 to 0.68; with 1, the open-loop runs' steps running a prefill took 0.79 to 0.90 of
    # their fit and the decode steps 1.01 to 1.09, both rising with the load); 1.0: as measured
    # (``fit_step_cycles(prefill_scale=False)``)
    prefill_scale: float = 1.0
    # the steps with a prefill chunk over their fit (time-weighted) in the fitted runs, before the scale
    prefill_ratio_before: float = float("nan")

    def model(self, fit: StepTimeFit) -> StepTimeFit:
        """The step model the calibration's terms apply to: ``fit`` with its prefill terms times
        ``prefill_scale``."""
        if self.prefill_scale == 1.0:
            return fit
        c = fit.coefficients
        return replace(fit, coefficients=(c[0], c[1] * self.prefill_scale, c[2] * self.prefill_scale, c[3], c[4]))

    def run_ratio(self, label: str) -> float:
        """The calibration run ``label``'s mean cycle over the fit (1.0 when there is no such run)."""
        for p in self.points:
            if p[0] == label and p[4] > 0:
                return float(p[3] / p[4])
        return 1.0

    def ingress(self, label: str | None = None) -> tuple[float, tuple[float, ...]]:
        """The simulated way in (:func:`ingress_from`) of the open-loop run ``label``, or of all of them
        pooled when it is absent or not given."""
        runs = [self.way_in_s[label]] if label in self.way_in_s else list(self.way_in_s.values())
        return ingress_from(np.concatenate([np.asarray(r, dtype=float) for r in runs]) if runs else ())

    @property
    def rel_rms_residual(self) -> float:
        """The rms over the runs of (mean cycle - mean fit) / mean cycle: how well each load's mean is met."""
        rel = [r / p[3] for r, p in zip(self.residuals_s, self.points, strict=True)]
        return float(np.sqrt(np.mean(np.square(rel)))) if rel else float("nan")

    def step_s(self, model_s: Any, arrivals: Any = 0.0, emitted: Any = 0.0) -> Any:
        """The fitted cycle of steps (floats, or arrays of one value a step)."""
        return self.time_scale * model_s + self.extra_s + arrivals * self.arrival_s + emitted * self.token_s

    def describe(self) -> str:
        text = (f"pod step cycle = {self.time_scale:.3f} x model + {self.extra_s * 1e3:.3f} ms "
                f"+ {self.arrival_s * 1e3:.3f} ms per arrival + {self.token_s * 1e3:.3f} ms per token, over "
                f"{self.steps} steps of {len(self.points)} runs"
                + (f", fitted through {', '.join(self.fitted_runs)}" if self.fitted_runs else "")
                + "; runs' mean cycles met to "
                f"{self.rel_rms_residual:.1%} rms, single steps' median |residual| "
                f"{self.median_abs_rel_residual:.1%}")
        if np.isfinite(self.request_cpu_s):
            text += (f"; the pod's CPU off the engine {self.request_cpu_s * 1e3:.2f} ms per request "
                     f"+ {self.step_cpu_s * 1e3:.3f} ms per step")
        if self.prefill_scale != 1.0:
            text += (f"; the model's prefill terms x {self.prefill_scale:.3f} (the steps with a prefill ran at "
                     f"{self.prefill_ratio_before:.3f} of the fit without it)")
        return text


def open_run_label(level: float) -> str:
    """The label of the calibration's open-loop run at ``level`` of its capacity (``"open 50%"``): its steps,
    its way in (:meth:`StepCalibration.ingress`) and its request split are filed under it."""
    return f"open {level:.0%}"


def model_times(steps: Any, fit: StepTimeFit) -> list[float]:
    """The step model's time for each step of a trace frame, from its composition."""
    return [fit.predict(p, pc, d, dc) for p, pc, d, dc in
            zip(steps.prefill_tokens, steps.prefill_context, steps.decodes, steps.decode_context, strict=True)]


def cycles(steps: Any, fit: StepTimeFit) -> Any:
    """Each step's cycle (previous end to its end), the loop's gap before it, and the model's time for it;
    steps after the loop went idle, and the first of the frame, have no cycle and are dropped."""
    df = steps.copy()
    df["cycle_s"] = df.end - df.end.shift(1)
    df["gap_s"] = df.start - df.end.shift(1)
    df["model_s"] = model_times(df, fit)
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
                    terms: Sequence[str] = FIT_TERMS, through: Sequence[str] = (),
                    prefill_scale: bool = False) -> StepCalibration:
    """Fit the cycle through the runs' means (``(label, step frame)`` each; see the module docstring), each
    run weighted by ``1 / its mean cycle``: every load's mean cycle is met as closely as the others, and a
    run's single long cycles (the core taken by another process) count once, in its mean, instead of
    pulling a step-by-step fit for every run. The time per arrival comes first, from within the runs
    (``arrival_within_runs``), and is held while the rest is fitted.

    ``through``: the labels of the runs to fit (and to take the steps' spread from); the others are only
    weighed against it (``points``, ``residuals_s``). Empty: all runs. The continuous validation fits
    through its open-loop runs (``ContinuousSpec.open_loop_fit``): its levels are open loops, whose arrivals
    cost more than a closed loop's (stop 39: 0.40 to 0.42 ms within the open runs, 0.29 to 0.31 within the
    closed ones), and a fit through all runs left the open runs at 60 to 85% 2 to 5% slower than it.

    ``prefill_scale``: first find the factor on the model's prefill terms (c1, c2) with which the fitted runs'
    steps that run a prefill chunk take, summed, what their fit gives (:func:`fit_prefill_scale`); the
    calibration is then fitted on that model (``StepCalibration.prefill_scale``, :meth:`StepCalibration.model`)."""
    if prefill_scale:
        return fit_prefill_scale(runs, fit, terms, through)
    import pandas as pd

    parts = [cycles(steps, fit).assign(run=label) for label, steps in runs if len(steps) > 1]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    every = None  # with ``through``: every run's means, weighed against the fit after it
    if through:
        missing = sorted(set(through) - {label for label, _ in runs})
        if missing:
            raise ValueError(f"fit_step_cycles: no run labelled {', '.join(missing)} to fit through")
        every = run_means(frame) if len(frame) else None
        frame = frame[frame.run.isin(list(through))].reset_index(drop=True)
    if len(frame) < MIN_STEPS:
        raise ValueError(f"the step calibration needs at least {MIN_STEPS} steps with a cycle, got {len(frame)}: "
                         "run the calibration longer")
    means = run_means(frame)
    least = MIN_THROUGH if through else MIN_RUNS
    if len(means) < least:
        raise ValueError(f"the step calibration needs at least {least} runs with steps"
                         + (" to fit through" if through else "") + f", got {len(means)}")
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
    per_step = frame[list(terms)].to_numpy(dtype=float) @ coef  # the fitted runs' steps
    noise = step_noise(frame.cycle_s.to_numpy(), per_step, frame.run.to_numpy())
    if every is not None:  # weigh every run against the fit, the fitted ones and the others
        means = every
        resid = means.cycle_s.to_numpy() - means[list(terms)].to_numpy(dtype=float) @ coef
    got = dict(zip(terms, (float(c) for c in coef), strict=True))
    scale, extra, arrival, token = (got.get(t, 0.0) for t in TERMS)
    problems = [f"degenerate fit: the {name} sits at its bound 0" for name, t in
                (("extra time per step", "one"), ("time per arrival", "arrivals"), ("time per token", "emitted"))
                if t in got and got[t] == 0]
    med = float(np.median(np.abs(1.0 - per_step / frame.cycle_s.to_numpy())))
    means["fitted_s"] = means.cycle_s - resid
    points = tuple((str(label), float(m.decodes + min(m.prefill_tokens, 1.0)), float(m.model_s), float(m.cycle_s),
                    float(m.fitted_s), float(m.arrivals), float(m.emitted)) for label, m in means.iterrows())
    total = float(means.cycle_s @ means.steps)
    shares = {t: float(c * (means[t] @ means.steps) / total) for t, c in zip(terms, coef, strict=True)}
    shares["unexplained"] = 1.0 - sum(shares.values())
    cal = StepCalibration(scale, extra, points, tuple(float(r) for r in resid), (), arrival, token, len(frame), med,
                          shares, cycle_noise=noise, fitted_runs=tuple(through))
    if cal.rel_rms_residual > MAX_REL_RESIDUAL:
        problems.append(f"poor fit: the runs' mean cycles are met to {cal.rel_rms_residual:.1%} rms "
                        f"(over {MAX_REL_RESIDUAL:.0%})")
    return replace(cal, warnings=tuple(problems))


#: rounds of the prefill scale's fixed point at most (each refits the cycle); it settles within 0.5% in a few
PREFILL_SCALE_ITERATIONS = 8
PREFILL_SCALE_BOUNDS = (0.25, 4.0)


def fit_prefill_scale(runs: Sequence[tuple[str, Any]], fit: StepTimeFit, terms: Sequence[str] = FIT_TERMS,
                      through: Sequence[str] = ()) -> StepCalibration:
    """:func:`fit_step_cycles` on the model with its prefill terms scaled by ``k``, ``k`` found by a fixed point:
    each round fits the cycle, then sets ``k`` so that the fitted runs' steps with a prefill chunk, summed,
    take what they took (their cycles less the fit's other parts, over the fit's prefill part), until it moves
    less than 0.5%. With no prefill step, or a model without prefill terms, ``k`` stays 1."""
    k = 1.0
    before = float("nan")
    cal = fit_step_cycles(runs, fit, terms, through)
    for _ in range(PREFILL_SCALE_ITERATIONS):
        model = replace(cal, prefill_scale=k).model(fit)
        pre_cycle = pre_fit = pre_part = 0.0
        for label, steps in runs:
            if (through and label not in through) or len(steps) < 2:
                continue
            c = cycles(steps, model)
            pre = (c.prefill_tokens > 0).to_numpy()
            if not pre.any():
                continue
            fitted = cal.step_s(c.model_s.to_numpy(), c.arrivals.to_numpy(), c.emitted.to_numpy())
            part = cal.time_scale * (model.coefficients[1] * c.prefill_tokens.to_numpy()
                                     + model.coefficients[2] * c.prefill_context.to_numpy())
            pre_cycle += float(c.cycle_s.to_numpy()[pre].sum())
            pre_fit += float(fitted[pre].sum())
            pre_part += float(part[pre].sum())
        if pre_part <= 0:
            return cal
        if math.isnan(before):  # the first round: the ratio with the model as measured
            before = pre_cycle / pre_fit
        lo, hi = PREFILL_SCALE_BOUNDS
        new = min(max(k * (pre_cycle - (pre_fit - pre_part)) / pre_part, lo), hi)
        done = abs(new / k - 1.0) < 0.005
        k = new
        cal = replace(fit_step_cycles(runs, replace(cal, prefill_scale=k).model(fit), terms, through),
                      prefill_scale=k, prefill_ratio_before=before)
        if done:
            break
    if k in PREFILL_SCALE_BOUNDS:
        cal = replace(cal, warnings=(*cal.warnings, f"the prefill scale sits at its bound {k:g}: the steps with a "
                                     "prefill are not met (a step model whose prefill terms are far off?)"))
    return cal


def step_noise(cycle_s: Any, fitted_s: Any, runs: Any = None, n: int = NOISE_STEPS) -> tuple[float, ...]:
    """Each step's cycle over its fitted cycle, in the order the steps ran, scaled to mean 1: the single
    steps' spread around the fit (long cycles when the core is taken, short ones) and how it lasts, which
    the simulator walks (``service.cycle_noise`` with ``cycle_noise_block_steps``). At most ``n`` values:
    from each run (``runs`` labels the steps) a contiguous stretch from its middle, its share of ``n``.
    Steps without a positive fit are left out. Rounded to 4 digits (it goes into the provenance)."""
    cycle_s, fitted_s = np.asarray(cycle_s, dtype=float), np.asarray(fitted_s, dtype=float)
    labels = np.zeros(len(cycle_s)) if runs is None else np.asarray(runs)
    ok = (fitted_s > 0) & np.isfinite(cycle_s) & (cycle_s > 0)
    if not ok.any():
        return ()
    ratio, labels = cycle_s[ok] / fitted_s[ok], labels[ok]
    _, first = np.unique(labels, return_index=True)
    groups = [ratio[labels == labels[i]] for i in sorted(first)]
    share = max(n // len(groups), 1)
    parts = [g[max((len(g) - share) // 2, 0):][:share] for g in groups]
    seq = np.concatenate(parts)
    return tuple(float(v) for v in np.round(seq / seq.mean(), 4))


#: the most steps of a run's own trace the replay keeps (``service.cycle_noise``'s bound, CYCLE_NOISE_MAX): all
#: of a default run's (until stop 54, 10,000: a third of a 20-s run of 0.6-ms steps, after which the walk
#: began the sequence again, out of step with the run)
REPLAY_STEPS = 100_000
#: steps a replayed speed holds: a spell's speed is its window's summed cycle over its summed fit
REPLAY_WINDOW = 32


def replay_noise(steps: Any, fit: StepTimeFit, cal: StepCalibration, n: int = REPLAY_STEPS,
                 window: int = REPLAY_WINDOW) -> tuple[float, ...]:
    """A run's own speed through the run, in the order its steps ran (``capsim.studies.validate_report.
    replay_speed`` of each step's cycle over the calibrated model's time for it, ``window`` steps at a time),
    which the simulator walks from its first step (``cycle_noise_block_steps`` = the sequence's length) to
    replay the run's slow and fast spells, not only its mean speed. Windows, because a single long cycle is
    mostly a pause of its own length: the calibration steps' p99 ratio fell from 2.8 on 1-ms steps to 1.7 on
    17-ms steps (a quick run, 2026-11-30), and each step's own ratio, replayed, came out 2 to 3 times heavy
    in the tail. Unlike :func:`cycles`, a step after the loop went idle keeps its own time (start to end), so
    the sequence has a factor for each step the pod ran and the simulated pod, running the same arrivals
    through the same scheduler, stays about in step with it. At most the first ``n``; empty when no step has a
    positive fit."""
    if len(steps) < 2:
        return ()
    end = steps.end.to_numpy(dtype=float)
    start = steps.start.to_numpy(dtype=float)
    prev = np.concatenate([[start[0]], end[:-1]])  # the first step: from its own start
    cycle = end - np.where(steps.after_idle.astype(bool).to_numpy(), start, prev)
    fitted = cal.step_s(np.asarray(model_times(steps, cal.model(fit))), steps.arrivals.to_numpy(dtype=float))
    return replay_speed(cycle, fitted, window, n)


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
    both divided by ``time_scale``, which the simulator multiplies back in, and its prefill terms times the
    calibration's ``prefill_scale``."""
    c = list(cal.model(fit).coefficients)
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
    base = cal.step_s(closed_loop_step_s(cal.model(fit), s, prompt, output), 0.0, s)
    return float(s / (output * base + s * cal.arrival_s))


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


def reached_rate(steps: Any, t0: float, seconds: float) -> float:
    """Requests per second that reached the pod's engine (``submit``) in the ``seconds`` after ``t0``,
    counted from its steps' arrivals (a step's arrivals came in since the previous step ended)."""
    if len(steps) == 0:
        return 0.0
    inside = steps[(steps.end > t0) & (steps.end <= t0 + seconds)]
    return float(inside.arrivals.sum() / seconds)


#: the most factors kept for ``service.ingress_noise`` (which holds at most 10,000)
REACH_FACTORS_MAX = 10_000


def _reach(way_in_s: Any, load_s: Any, send_s: Any) -> Any:
    """Each request's way in plus its history read (none without ``load_s``), in the order of the sends
    ``send_s`` (as given without them), the unmeasured (NaN, negative) left out; ``None`` when the way in was
    not measured request by request (the lengths differ)."""
    way_in = np.asarray(way_in_s, dtype=float)
    load = np.zeros_like(way_in) if load_s is None else np.asarray(load_s, dtype=float)
    if len(way_in) != len(load) or (send_s is not None and len(send_s) != len(load)):
        return None
    reach = way_in + load
    if send_s is not None:
        reach = reach[np.argsort(np.asarray(send_s, dtype=float), kind="stable")]
    return reach[np.isfinite(reach) & (reach >= 0)]


def _factors(reach: Any) -> tuple[float, ...]:
    """``reach`` over its mean, thinned evenly to ``REACH_FACTORS_MAX``, rounded to 4 digits; empty when
    there is none or its mean is not positive."""
    if reach is None or not len(reach) or not reach.mean() > 0:
        return ()
    if len(reach) > REACH_FACTORS_MAX:
        reach = reach[np.linspace(0, len(reach) - 1, REACH_FACTORS_MAX).round().astype(int)]
    return tuple(np.round(reach / reach.mean(), 4).tolist())


def reach_factors(way_in_s: Any, load_s: Any = None, send_s: Any = None) -> tuple[float, ...]:
    """Each answered request's time from its send to its engine (its way in plus its history read, none
    without ``load_s``) over their mean, for ``service.ingress_noise``: in the order of the sends ``send_s``
    (as given without them), so a walk of the sequence (``service.ingress_noise_block``) meets the slow
    spells as they came; rounded to 4 digits, and thinned evenly to ``REACH_FACTORS_MAX``. Empty when the
    way in was not measured request by request (``way_in_s`` not one per request) or no request has both."""
    return _factors(_reach(way_in_s, load_s, send_s))


def ingress_from(way_in_s: Any, send_s: Any = None, load_s: Any = None) -> tuple[float, tuple[float, ...]]:
    """The simulated way to the engine, ``(service.ingress_ms, service.ingress_noise)``, from requests'
    measured way in (send to the pod's receipt, seconds; NaN where not measured) plus, with ``load_s``, the
    pod's receipt to its engine (the history read): their mean in ms and each one's over it, in the order of
    ``send_s`` (:func:`reach_factors`); ``(0.0, ())`` when none was measured."""
    reach = _reach(way_in_s, load_s, send_s)
    factors = _factors(reach)
    return (float(reach.mean()) * 1e3, factors) if factors else (0.0, ())

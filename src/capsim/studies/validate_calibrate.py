"""The validation's calibration: the pod's batch cycle under load, fitted by least squares over its batches.

A profile times the model's kernels on an idle core; in the pod the same core also parses HTTP, reads and
writes the session store and answers, and the engine's thread shares the GIL with the event loop.
Closed-loop runs at several client counts keep the pod busy at several batch sizes; the pod's batch trace
(``GET /debug/batches``) gives every batch's size, wall time and the requests that arrived while it ran.
``fit_trace`` fits ``wall = time_scale x profile(b) + b x overhead_s + arrivals x arrival_overhead_s`` over
single batches (bounded least squares), and keeps the spread of single batches around the fit
(``cycle_noise``) for the simulator to draw from. A fit on fewer than ``MIN_SIZES`` sizes is refused; a
degenerate or poorly fitting one is kept but carries a ``CalibrationWarning``. ``fit_cycle`` is the
two-term fit over (size, profile, mean cycle) points.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from capsim.errors import CapsimError
from capsim.model.profile import ServiceTimeProfile
from capsim.studies.validate_report import in_order, queue_times

MIN_SIZES = 4
MIN_BATCHES_PER_SIZE = 5
MAX_REL_RESIDUAL = 0.05  # rms residual over the mean cycle: past this the linear model does not fit
NOISE_QUANTILES = 400  # quantiles of the single-batch spread kept for the simulator
# closed-loop clients of the calibration runs: up to 16 (max_batch_size) each batch takes every client and
# the answers come back while the pod idles; past it, batches alternate (20: 16 and 4, 24: 16 and 8) and a
# batch runs while the other's answers go out and their next turns come in, so its size and the arrivals
# during it vary apart (with 32 both are 16)
CLIENTS: tuple[int, ...] = (1, 3, 6, 12, 20, 24, 32)
ROUNDS = 3  # each client count runs this many times, the counts shuffled in each round (``calibration_order``)
#: the engine steps (continuous) or batches (static) the validations' pods keep for ``GET /debug/batches``
#: (``CAPSIM_TRACE_STEPS``; about 32 MB of steps): a run of 20 s at this machine's 0.6-ms steps is 33,000 steps,
#: twice the continuous pod's default (stop 54, 2026-12-05: the 16,384 it kept held the last 16 to 19 s of the
#: 20-s runs at 30%, 60% and on the small cache)
VALIDATION_TRACE_STEPS = 65536


class CalibrationError(CapsimError, ValueError):
    """The calibration cannot be fitted (too few batch sizes, or a singular design)."""


class CalibrationWarning(UserWarning):
    """The fit exists but should not be trusted as is (degenerate or poorly fitting)."""


@dataclass(frozen=True)
class Calibration:
    """The pod's batch cycle under load, ``W(b, a) = time_scale x T_profile(b) + b x overhead_s +
    a x arrival_overhead_s`` for a batch of ``b`` with ``a`` arrivals while it runs, each batch's time
    spread by ``cycle_noise``, and the delay (``ingress_s``) before a request sent meanwhile is queued."""

    time_scale: float
    overhead_s: float
    points: tuple[tuple[float, float, float], ...]  # (batch size, profile batch s, pod cycle s)
    residuals_s: tuple[float, ...] = ()  # cycle - fit, per point
    warnings: tuple[str, ...] = ()
    # the spread of single batches around the fit: quantiles of wall / fit, mean 1 (empty: not measured)
    cycle_noise: tuple[float, ...] = ()
    # per request, when it arrives, on the batch running then (``fit_trace``; 0: charged per batch member)
    arrival_overhead_s: float = 0.0
    # median delay from sending to the batcher's queue of requests sent while a batch ran (``ingress_s``)
    ingress_s: float = 0.0
    # the answers' way out: a batch of b reaches its clients answer_s + b x answer_per_request_s after it
    # ends; and its first token first_token_scale times as far into it as the fit's split (``probe_answers``)
    answer_s: float = 0.0
    answer_per_request_s: float = 0.0
    first_token_scale: float = 1.0
    # the open-loop probe's mean batch over the closed loop's fit, by which time_scale and both overheads
    # were multiplied (``run_validation``, since stop 38; 1.0: not applied)
    open_loop_speed: float = 1.0

    @property
    def rel_rms_residual(self) -> float:
        if not self.residuals_s:
            return float("nan")
        mean_cycle = float(np.mean([w for _, _, w in self.points]))
        return float(np.sqrt(np.mean(np.square(self.residuals_s))) / mean_cycle)

    def cycle_s(self, size: float, profile_s: float, arrivals: float = 0.0) -> float:
        return self.time_scale * profile_s + size * self.overhead_s + arrivals * self.arrival_overhead_s

    def describe(self) -> str:
        text = (f"pod batch cycle = {self.time_scale:.3f} x profile + {self.overhead_s * 1000:.2f} ms per request "
                f"+ {self.arrival_overhead_s * 1000:.2f} ms per arrival during the batch, "
                f"over {len(self.points)} batch sizes, rms residual {self.rel_rms_residual:.1%}")
        if self.cycle_noise:
            f = np.asarray(self.cycle_noise)
            text += (f"; single batches: cv {f.std() / f.mean():.1%}, "
                     f"p99 {np.percentile(f, 99):.3f} x the fit")
        return text


def _checked(cal: Calibration, problems: list[str], warn: bool) -> list[str]:
    """``problems`` plus a poor fit of ``cal``, if any; with ``warn``, each one as a ``CalibrationWarning``
    attributed to the caller of the fitting function."""
    problems = [*problems]
    if cal.rel_rms_residual > MAX_REL_RESIDUAL:
        problems.append(f"poor fit: rms residual {cal.rel_rms_residual:.1%} of the mean cycle "
                        f"(over {MAX_REL_RESIDUAL:.0%}); the cycle is not linear in the profile and the size")
    if warn:
        for p in problems:
            warnings.warn(p, CalibrationWarning, stacklevel=3)
    return problems


def fit_cycle(points: Sequence[tuple[float, float, float]], *, warn: bool = True) -> Calibration:
    """Least squares ``cycle = scale x profile + size x overhead`` through (size, profile s, cycle s) points,
    with ``scale > 0`` and ``overhead >= 0``.

    Refuses (``CalibrationError``) fewer than ``MIN_SIZES`` distinct sizes; warns (``CalibrationWarning``,
    also kept in ``Calibration.warnings``) when the overhead lands on its bound 0 or the rms residual is
    over ``MAX_REL_RESIDUAL`` of the mean cycle.
    """
    from scipy.optimize import lsq_linear

    sizes = {round(b, 6) for b, _, _ in points}
    if len(sizes) < MIN_SIZES:
        raise CalibrationError(f"the cycle fit needs at least {MIN_SIZES} batch sizes, got {len(sizes)}: "
                               f"{sorted(sizes)}; run the calibration longer or with more client counts")
    a = np.array([[t, b] for b, t, _ in points], dtype=float)
    y = np.array([w for _, _, w in points], dtype=float)
    if np.linalg.matrix_rank(a) < 2:
        raise CalibrationError("the cycle fit's points are collinear (profile time proportional to size): "
                               "scale and per-request overhead cannot be told apart")
    res = lsq_linear(a, y, bounds=([1e-9, 0.0], [np.inf, np.inf]), method="bvls")
    scale, overhead = (float(v) for v in res.x)
    if overhead <= 1e-12:  # on the bound, up to the solver's rounding
        overhead = 0.0
    residuals = tuple(float(r) for r in y - a @ np.array([scale, overhead]))
    problems = []
    if overhead == 0.0:
        problems.append("degenerate fit: the per-request overhead sits at its bound 0 (the pod's cycle grows "
                        "no faster with batch size than the profile's); the simulator charges no HTTP work per request")
    cal = Calibration(scale, overhead, tuple((float(b), float(t), float(w)) for b, t, w in points), residuals)
    problems = _checked(cal, problems, warn)
    return Calibration(cal.time_scale, cal.overhead_s, cal.points, residuals, tuple(problems))


def trace_rows(trace: Sequence[Sequence[Any]], profile_s: Any) -> np.ndarray:
    """One row per batch of the pod's trace (``start, end, size, enqueued, ...``): size, the profile's
    batch time, the wall time, and the requests that entered the queue while it ran."""
    if not trace:
        return np.empty((0, 4))
    start = np.array([r[0] for r in trace], dtype=float)
    end = np.array([r[1] for r in trace], dtype=float)
    size = np.array([r[2] for r in trace], dtype=float)
    enq = np.sort(np.concatenate([np.asarray(r[3], dtype=float) for r in trace]))
    during = np.searchsorted(enq, end) - np.searchsorted(enq, start)
    prof = np.array([profile_s(int(b)) for b in size])
    return np.column_stack([size, prof, end - start, during])


def cycle_points(trace: Sequence[Sequence[Any]], profile_s: Any,
                 min_batches: int = MIN_BATCHES_PER_SIZE) -> list[tuple[float, float, float]]:
    """(size, profile s, mean wall s) per batch size with at least ``min_batches`` batches, from the pod's
    batch records (``start, end, size, ...``); ``profile_s(size)`` is the profile's batch time."""
    sizes = np.array([r[2] for r in trace], dtype=int)
    walls = np.array([r[1] - r[0] for r in trace], dtype=float)
    out = []
    for b in np.unique(sizes):
        w = walls[sizes == b]
        if len(w) >= min_batches:
            out.append((float(b), float(profile_s(int(b))), float(np.mean(w))))
    return out


def fit_trace(rows: np.ndarray, *, warn: bool = True, min_batches: int = MIN_BATCHES_PER_SIZE) -> Calibration:
    """Least squares over single batches (``trace_rows``): ``wall = scale x profile + size x overhead +
    arrivals x arrival_overhead``, all three >= 0, on the sizes with at least ``min_batches`` batches.

    The arrival term is the pod's HTTP work for requests that arrive while a batch runs (it shares the
    core), so a batch grows with the arrivals during it. ``points`` and ``residuals_s`` are per size (mean
    wall, mean residual); refusal and warnings as ``fit_cycle``, plus the spread of single batches.
    """
    from scipy.optimize import lsq_linear

    rows = np.asarray(rows, dtype=float)
    sizes, counts = np.unique(rows[:, 0], return_counts=True) if len(rows) else (np.empty(0), np.empty(0))
    kept = sizes[counts >= min_batches]
    if len(kept) < MIN_SIZES:
        raise CalibrationError(f"the cycle fit needs at least {MIN_SIZES} batch sizes with {min_batches}+ batches "
                               f"each, got {len(kept)}: {kept.tolist()}; run the calibration longer")
    rows = rows[np.isin(rows[:, 0], kept)]
    a = rows[:, [1, 0, 3]]
    y = rows[:, 2]
    if np.linalg.matrix_rank(a) < 3:
        raise CalibrationError("the cycle fit's batches cannot tell the profile, the size and the arrivals "
                               "apart (collinear columns)")
    res = lsq_linear(a, y, bounds=([1e-9, 0.0, 0.0], [np.inf, np.inf, np.inf]), method="bvls")
    scale, overhead, per_arrival = (float(v) if v > 1e-12 else 0.0 for v in res.x)
    resid = y - a @ np.array([scale, overhead, per_arrival])
    points = tuple((float(b), float(rows[rows[:, 0] == b, 1][0]), float(y[rows[:, 0] == b].mean())) for b in kept)
    residuals = tuple(float(resid[rows[:, 0] == b].mean()) for b in kept)
    cal = Calibration(scale, overhead, points, residuals, arrival_overhead_s=per_arrival)
    problems = []
    if overhead == 0.0 and per_arrival == 0.0:
        problems.append("degenerate fit: both per-request overheads sit at their bound 0 (the pod's cycle grows "
                        "no faster with batch size or arrivals than the profile's); the simulator charges no "
                        "HTTP work per request")
    problems = _checked(cal, problems, warn)
    ratios = y / (a @ np.array([scale, overhead, per_arrival]))
    return replace(cal, warnings=tuple(problems), cycle_noise=spread(ratios))


def spread(ratios: Any, n: int = NOISE_QUANTILES) -> tuple[float, ...]:
    """``n`` evenly spaced quantiles of single batches' wall over the fit, scaled to mean 1: the spread
    the simulator draws each batch's factor from (``service.cycle_noise``)."""
    q = np.quantile(np.asarray(ratios, dtype=float), (np.arange(n) + 0.5) / n)
    return tuple(float(v) for v in q / q.mean())


def cycle_noise(trace: Sequence[Sequence[float]], cal: Calibration, profile_s: Any,
                n: int = NOISE_QUANTILES) -> tuple[float, ...]:
    """``n`` evenly spaced quantiles of each batch's wall time over the fitted cycle at its size, scaled
    to mean 1: the spread the simulator draws from (``service.cycle_noise``)."""
    if not trace:
        return ()
    return spread([(r[1] - r[0]) / cal.cycle_s(r[2], profile_s(int(r[2]))) for r in trace], n)


def fetch_trace(url: str, since: float = -np.inf) -> list[list[float]]:
    """The pod's batch records that started at or after ``since`` (monotonic clock). Warns (``TraceShortWarning``)
    when the pod's trace had already dropped batches of that window (it keeps its last ``CAPSIM_TRACE_STEPS``,
    8,192 by default, 65,536 in the validation's pod)."""
    import httpx

    body = httpx.get(f"{url}/debug/batches", timeout=30).json()
    if lost_window_start(body, since):
        warnings.warn(TraceShortWarning(f"{url}: the pod's batch trace lacks the window's batches before "
                                        f"{body['oldest_start'] - since:.1f} s into it (it keeps its last "
                                        f"{len(body['batches'])})"), stacklevel=2)
    return [r for r in body["batches"] if r[0] >= since]


def lost_window_start(body: dict[str, Any], since: float) -> bool:
    """Whether a ``GET /debug/batches`` answer lacks the start of a window from ``since``: the pod's trace
    dropped records (``dropped``) and the oldest it still holds began after ``since``."""
    oldest = body.get("oldest_start")
    return bool(body.get("dropped")) and oldest is not None and oldest > since


class TraceShortWarning(UserWarning):
    """A pod's batch or step trace no longer held the start of the window asked for."""


def calibrate(url: str, profile: ServiceTimeProfile, prompt_tokens: int, output_tokens: int,
              duration_s: float, clients: Sequence[int] = CLIENTS, batches_per_run: int = 15,
              rounds: int = ROUNDS, seed: int = 0) -> tuple[Calibration, list[list[float]]]:
    """Closed-loop runs at each client count with the validation's request shape, ``rounds`` times (in the
    shuffled order of :func:`calibration_order`), each until about ``batches_per_run`` x clients / ``rounds``
    answers (at most ``duration_s`` / (``rounds`` x len(clients)) seconds); the pod's batch trace gives
    every batch's size, wall time and arrivals, and ``fit_trace`` fits them and measures the spread. The
    calibration and the trace it was fitted on."""
    since = time.monotonic()
    order = calibration_order(clients, rounds, seed)
    drive_closed_loops(url, order, duration_s / len(order), [-(-batches_per_run * n // rounds) for n in order],
                       prompt_tokens, output_tokens)
    trace = fetch_trace(url, since)

    def profile_s(b: int) -> float:
        return profile.batch_timing(b, prompt_tokens, output_tokens).total_s

    return fit_trace(trace_rows(trace, profile_s)), trace


def drive_closed_loops(url: str, order: Sequence[int], seconds: float, answers: Sequence[int], prompt_tokens: int,
                       output_tokens: int, tag: str | None = None) -> None:
    """One closed-loop run per entry of ``order`` (its client count), each for at most ``seconds`` or until
    its entry of ``answers`` answers. Every request is a new session (``calib-{tag}-{run}-{client}-{turn}``,
    the tag fresh per call unless given): the pod prefills a session's stored history, so a session id used
    again in a later run would send a longer prompt than ``prompt_tokens`` (until stop 34 the ids repeated
    in every round, and a later visit's batches of 16 took 2 to 3 times the first's)."""
    from capsim.core.http_pools import http_clients

    tag = tag if tag is not None else str(time.time_ns())

    async def drive(run: int, n_clients: int, most: int) -> None:
        async with http_clients() as cs:
            stop = time.perf_counter() + seconds
            done = 0

            async def one(k: int) -> None:
                nonlocal done
                i = 0
                while time.perf_counter() < stop and done < most:
                    r = await cs[k % len(cs)].post(
                        f"{url}/v1/sessions/calib-{tag}-{run}-{k}-{i}/turns",
                        json={"prompt_tokens": prompt_tokens, "max_new_tokens": output_tokens})
                    r.raise_for_status()
                    i += 1
                    done += 1

            await asyncio.gather(*[one(k) for k in range(n_clients)])

    for run, (n, most) in enumerate(zip(order, answers, strict=True)):
        # a batch holds up to n requests here (fewer when clients straddle two batches)
        asyncio.run(drive(run, n, most))


def calibration_order(clients: Sequence[int], rounds: int = ROUNDS, seed: int = 0) -> list[int]:
    """The client counts in the order the calibration runs them: ``rounds`` rounds, each a shuffle of
    ``clients`` (seeded). This machine's speed drifts by up to 2x within seconds, in humps as well as
    trends; run in a fixed order, each client count (and so each batch size) meets the speed of its place
    in the order, and the fit reads the drift as the cycle's shape (a synthetic spell in the middle of the
    forward-and-back order this replaced doubled the per-request term, tests/test_validate.py). Spread over
    the whole calibration in random order, the drift is noise common to every size instead. (Stop 33's
    batches of 16 at 188 ms, then 441 ms, in that order's middle, first read as drift, were its repeated
    session ids: ``drive_closed_loops``.)"""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    rng = np.random.default_rng(seed)
    return [int(n) for _ in range(rounds) for n in rng.permutation(np.asarray(clients))]


def open_loop_noise(cal: Calibration, rows: np.ndarray, min_batches: int = 20) -> tuple[Calibration, float]:
    """``cal`` with the single-batch spread taken from open-loop batches (``trace_rows`` of a Poisson
    probe), and the probe's mean wall time over the fit (its speed against the calibration's).

    The fit's terms stay the closed loop's. A probe cannot measure the per-arrival term: in an open loop
    the arrivals during a batch grow with its wall time (at ``rate`` per second), so any slow batch, or a
    probe run a few percent slower than the calibration, reads as a cost per arrival; at half the
    capacity that bias is about ``rate x var(wall) / E[arrivals]``, 2 to 4 ms here, the size of the
    terms the probe used to fit (0 to 3.8 ms, run to run). ``cal`` unchanged (and ratio nan) with fewer
    than ``min_batches`` batches."""
    rows = np.asarray(rows, dtype=float)
    if len(rows) < min_batches:
        return cal, float("nan")
    fit = cal.time_scale * rows[:, 1] + cal.overhead_s * rows[:, 0] + cal.arrival_overhead_s * rows[:, 3]
    ratio = rows[:, 2] / fit
    return replace(cal, cycle_noise=spread(ratio)), float(ratio.mean())


def probe_answers(cal: Calibration, frame: Any, trace: Sequence[Sequence[Any]], prefill_s: Any,
                  min_batches: int = 20) -> Calibration:
    """``cal`` with the way out of the answers and the first token's place in a batch, from an open-loop
    probe: its request ``frame`` with the pod's times on the host's clock (``run_load(pod_clock=True)``:
    ``start_s`` the engine's start, ``first_token_s`` the prefill's end, ``end_s`` the client's receipt,
    from ``attrs['t0_monotonic']``) and the pod's batch ``trace`` over the same seconds; ``prefill_s(b)`` is
    the profile's prefill of a batch of ``b``.

    A request is matched with the batch whose engine started at its ``start_s`` (within 0.2 ms, of its
    size). The way out, each batch's median from its end (the trace's) to its answers at the client, is
    fitted as ``answer_s + size x answer_per_request_s`` (least squares, both >= 0): the pod writes and
    sends a batch's answers together once it ends, so they arrive about together, later the larger the
    batch (stop 38: 4 to 5 ms for one, 15 to 20 for sixteen). ``first_token_scale`` is the batches' time
    from their start to their first token, summed over their requests, over the calibrated model's
    (``time_scale x prefill_s(b) + b x overhead_s / 2``). ``cal`` unchanged with fewer than ``min_batches``
    matched batches, or a frame without the pod's clock."""
    from scipy.optimize import lsq_linear

    t0 = frame.attrs.get("t0_monotonic") if hasattr(frame, "attrs") else None
    if t0 is None or not frame.attrs.get("pod_clock_rows") or len(trace) < min_batches:
        return cal
    rows = np.array([[r[0], r[1], r[2], r[4] if len(r) > 4 else np.nan] for r in trace], dtype=float)
    rows[:, :2] -= t0
    rows[:, 3] -= t0
    order = np.argsort(rows[:, 3])
    rows = rows[order]
    done = frame[frame.outcome == "ok"]
    start = done.start_s.to_numpy(dtype=float)
    k = np.clip(np.searchsorted(rows[:, 3], start + 1e-4) - 1, 0, len(rows) - 1)
    hit = (np.abs(rows[k, 3] - start) < 2e-4) & (done.batch_size.to_numpy() == rows[k, 2])
    if not hit.any():
        return cal
    k = k[hit]
    way = done.end_s.to_numpy(dtype=float)[hit] - rows[k, 1]
    first = done.first_token_s.to_numpy(dtype=float)[hit] - rows[k, 0]
    batches, inverse = np.unique(k, return_inverse=True)
    if len(batches) < min_batches:
        return cal
    size = rows[batches, 2]
    med_way = np.array([np.median(way[inverse == j]) for j in range(len(batches))])
    fit = lsq_linear(np.c_[np.ones_like(size), size], med_way, bounds=([0.0, 0.0], [np.inf, np.inf]), method="bvls")
    answer_s, per_request_s = (float(v) if v > 1e-12 else 0.0 for v in fit.x)
    model = np.array([cal.time_scale * prefill_s(int(b)) + 0.5 * b * cal.overhead_s for b in rows[k, 2]])
    ok = np.isfinite(first) & (model > 0)
    scale = float(first[ok].sum() / model[ok].sum()) if ok.any() else 1.0
    return replace(cal, answer_s=answer_s, answer_per_request_s=per_request_s, first_token_scale=scale)


def ingress_s(trace: Sequence[Sequence[Any]], sends: Sequence[float]) -> float:
    """Median delay from a send (monotonic clock) to the pod's queue, over requests sent while a batch
    ran: the k-th sent is taken as the k-th queued (one client's requests are FIFO; many clients'
    nearly so). 0 without data."""
    if not trace or not sends:
        return 0.0
    sent, enq = in_order(np.sort(np.asarray(sends, dtype=float)), queue_times(trace))
    start = np.array([r[0] for r in trace], dtype=float)
    end = np.array([r[1] for r in trace], dtype=float)
    k = np.searchsorted(start, sent, side="right") - 1
    busy = (k >= 0) & (sent < end[np.maximum(k, 0)])
    return float(np.median(enq[busy] - sent[busy])) if busy.any() else 0.0

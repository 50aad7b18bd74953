"""The validation's comparison: per level and metric, real and simulated values with intervals, the error
with its interval, the targets met or missed, and what the pod's batch trace says about each level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from capsim.studies import validate_stats as vs

METRICS: tuple[str, ...] = (
    "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s",
    "throughput_per_s", "mean_batch_size",
)
TARGETS: dict[str, float] = {"p50": 0.10, "p95": 0.15, "p99": 0.15, "throughput_per_s": 0.03}


def target_of(metric: str) -> float | None:
    """The largest relative error allowed for ``metric`` (None: reported, not judged)."""
    if metric in TARGETS:
        return TARGETS[metric]
    for key in ("p50", "p95", "p99"):
        if metric.endswith(f"_{key}_s"):
            return TARGETS[key]
    return None


def compare_level(level: float, rate: float, real_runs: Sequence[vs.Blocks], sim_runs: Sequence[vs.Blocks],
                  metrics: Sequence[str] = METRICS, seed: int = 0) -> list[dict[str, Any]]:
    """One row per metric: real and sim over the pooled replications with their intervals, the paired
    error with its interval, whether the two intervals overlap, the target and whether it is met."""
    real, sim = vs.pool(real_runs), vs.pool(sim_runs)
    rows = []
    for metric in metrics:
        r = vs.interval(real, metric, seed=seed)
        s = vs.interval(sim, metric, seed=seed)
        e = vs.error_interval(real, sim, metric, seed=seed)
        target = target_of(metric)
        rows.append({
            "level": level, "rate_per_s": rate, "metric": metric,
            "real": r.value, "real_low": r.low, "real_high": r.high,
            "sim": s.value, "sim_low": s.low, "sim_high": s.high,
            "rel_error": e.value, "err_low": e.low, "err_high": e.high,
            "real_rel_half_width": r.rel_half_width, "overlap": r.overlaps(s),
            "target": target if target is not None else float("nan"),
            "met": bool(abs(e.value) <= target) if target is not None else None,
        })
    return rows


def verdicts(results: Any) -> list[tuple[str, bool]]:
    """(what, met) per level for each target: the error targets, and the p99 intervals overlapping."""
    out = []
    for level in sorted(results.level.unique()):
        sub = results[results.level == level]
        for row in sub.itertuples():
            if row.met is not None and not (isinstance(row.met, float) and np.isnan(row.met)):
                out.append((f"{level:.0%} {row.metric} within {row.target:.0%}", bool(row.met)))
        for row in sub[sub.metric.str.endswith("_p99_s")].itertuples():
            out.append((f"{level:.0%} {row.metric} intervals overlap", bool(row.overlap)))
    return out


def format_results(results: Any) -> str:
    """A text table: per level and metric, real and sim with their 95% intervals, the error with its
    interval, and the target met or missed; then the verdicts."""
    lines = [f"{'level':>5} {'metric':>16} {'real [95% CI]':>28} {'sim [95% CI]':>28} "
             f"{'error [95% CI]':>26} {'target':>7}"]
    for r in results.itertuples():
        scale, unit = (1000.0, "ms") if r.metric.endswith("_s") and "throughput" not in r.metric else (1.0, "")
        real = f"{r.real * scale:.1f} [{r.real_low * scale:.1f}, {r.real_high * scale:.1f}]{unit}"
        sim = f"{r.sim * scale:.1f} [{r.sim_low * scale:.1f}, {r.sim_high * scale:.1f}]{unit}"
        err = f"{r.rel_error:+.1%} [{r.err_low:+.1%}, {r.err_high:+.1%}]"
        met = "" if r.met is None or (isinstance(r.met, float) and np.isnan(r.met)) else (
            "PASS" if r.met else "FAIL")
        lines.append(f"{r.level:>5.0%} {r.metric:>16} {real:>28} {sim:>28} {err:>26} {met:>7}")
    checks = verdicts(results) if "overlap" in results.columns else []
    failed = [what for what, ok in checks if not ok]
    lines.append(f"targets: {len(checks) - len(failed)} of {len(checks)} met" + (
        "; missed: " + "; ".join(failed) if failed else ""))
    warnings = results.attrs.get("calibration_warnings") or []
    lines.extend(f"WARNING (CalibrationWarning): {w}" for w in warnings)
    return "\n".join(lines)


def worst_errors(results: Any, metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """The largest absolute relative error of each metric across levels."""
    return {m: float(results[results.metric == m].rel_error.abs().max()) for m in metrics}


def queue_times(trace: Sequence[Sequence[Any]]) -> Any:
    """When each request of the trace's batches reached the pod's queue (its monotonic clock), sorted."""
    queued = [np.asarray(r[3], dtype=float) for r in trace]
    return np.sort(np.concatenate(queued)) if queued else np.empty(0)


def matched_sends(enq: Any, real_df: Any) -> tuple[Any, Any]:
    """The run's send times and queue times (``enq``, sorted, from :func:`queue_times`), both from the run's
    start (``real_df.attrs["t0_monotonic"]``), matched in order: on one connection pool the k-th sent is the
    k-th queued. Queue times before the first send (an earlier run's requests) are left out, and so are
    requests never sent; as many of each as both have, none without the run's clock."""
    t0 = real_df.attrs.get("t0_monotonic")
    sends = np.sort(real_df.arrival_s.to_numpy(dtype=float))
    sends = sends[np.isfinite(sends)]
    if t0 is None or not len(sends):
        return np.empty(0), np.empty(0)
    return in_order(sends, enq - t0)


def in_order(sends: Any, queued: Any) -> tuple[Any, Any]:
    """Sorted send times and sorted queue times on one clock, matched in order (the k-th sent is the k-th
    queued): queue times before the first send (an earlier run's requests) left out, as many of each as
    both have. ``sends`` must not be empty."""
    queued = queued[queued >= sends[0]]
    n = min(len(sends), len(queued))
    return sends[:n], queued[:n]


def batch_fit(trace: Sequence[Sequence[Any]], profile: Any, spec: Any, calibration: Any) -> tuple[Any, Any, Any]:
    """Each batch of the pod's trace (in order): its wall time, the calibrated cycle for its size and the
    arrivals during it (seconds), and those arrivals."""
    start = np.array([r[0] for r in trace], dtype=float)
    end = np.array([r[1] for r in trace], dtype=float)
    size = np.array([r[2] for r in trace], dtype=int)
    enq = queue_times(trace)
    during = np.searchsorted(enq, end) - np.searchsorted(enq, start)
    fit = np.array([calibration.cycle_s(b, profile.batch_timing(int(b), spec.prompt_tokens,
                                                                spec.output_tokens).total_s, a)
                    for b, a in zip(size, during, strict=True)])
    return end - start, fit, during


#: the most batches of a run's trace the replay keeps (``service.cycle_noise``'s bound)
REPLAY_BATCHES = 10_000
#: batches a replayed speed holds (a batch is tens of steps: a spell is a few of them)
REPLAY_WINDOW_BATCHES = 4


def replay_speed(took_s: Any, fit_s: Any, window: int, n: int) -> tuple[float, ...]:
    """The speed of a run through time, for the simulator to replay: for each ``window`` batches (or steps)
    in a row, in order, their summed time over their summed fit, one factor for each of them, scaled to
    mean 1 and rounded to 4 digits. Those without a positive time and fit are left out; at most the first
    ``n``. A window, not each one's own ratio: a single long one is mostly a pause of its own length (the
    core taken, a collection), whose ratio is large on a short batch or step and small on a long one, and
    moved onto a simulated one of another size it would stretch it by the wrong amount."""
    took, fit = np.asarray(took_s, dtype=float), np.asarray(fit_s, dtype=float)
    ok = (fit > 0) & np.isfinite(took) & (took > 0)
    took, fit = took[ok][:n], fit[ok][:n]
    if not len(took):
        return ()
    edges = np.arange(0, len(took), max(int(window), 1))
    speed = np.repeat(np.add.reduceat(took, edges) / np.add.reduceat(fit, edges), np.diff(np.append(edges, len(took))))
    return tuple(float(v) for v in np.round(speed / speed.mean(), 4))


def replay_factors(trace: Sequence[Sequence[Any]], profile: Any, spec: Any, calibration: Any,
                   n: int = REPLAY_BATCHES, window: int = REPLAY_WINDOW_BATCHES,
                   fitted: tuple[Any, Any, Any] | None = None) -> tuple[float, ...]:
    """A run's own batches' speed, in the order they ran (:func:`replay_speed` of each batch's wall time
    over the calibrated cycle, ``window`` batches at a time), which the simulator replays from its first
    batch (``service.cycle_noise`` with ``cycle_noise_block_steps`` = its length) on top of the run's mean
    speed. Empty under two batches. ``fitted``: :func:`batch_fit`'s answer for this trace, if at hand."""
    if len(trace) < 2:
        return ()
    wall, fit, _ = fitted if fitted is not None else batch_fit(trace, profile, spec, calibration)
    return replay_speed(wall, fit, window, n)


def waiting_at_start(start: Any, queued: Sequence[Any]) -> Any:
    """For each batch ``k`` (``start`` in order): the requests of later batches already queued when it
    started (``queued[j]``: batch ``j``'s requests' enqueue times). A request of batch ``j`` queued at
    ``q`` waited through the batches from the first one started after ``q`` up to ``j - 1``: one pass
    over the requests (a difference array), not one per batch."""
    start = np.asarray(start, dtype=float)
    owner = np.repeat(np.arange(len(queued)), [len(q) for q in queued])
    flat = np.concatenate([np.asarray(q, dtype=float) for q in queued]) if len(queued) else np.empty(0)
    first = np.searchsorted(start, flat, side="right")  # the first batch started after the request queued
    keep = first < owner
    diff = np.zeros(len(start) + 1, dtype=np.int64)
    np.add.at(diff, first[keep], 1)
    np.add.at(diff, owner[keep], -1)
    return np.cumsum(diff[:-1])


def trace_diagnostics(trace: Sequence[Sequence[Any]], real_df: Any, sim_requests: Any, profile: Any,
                      spec: Any, calibration: Any, fitted: tuple[Any, Any, Any] | None = None) -> dict[str, float]:
    """What one replication's batch trace and send times say (docs/validation.md, "Why the tail"): the
    pod's batch sizes and wall times against the simulator's, the spread of single batches around the
    calibrated cycle, how a batch's wall time grows with the arrivals during it, the delay from a send
    to the pod's queue, requests that missed a batch they were sent in time for, the load generator's
    lateness and the loop's lag at a batch's end. ``fitted``: :func:`batch_fit`'s answer, if at hand."""
    out: dict[str, float] = {}
    ok = sim_requests[sim_requests.outcome == "ok"]
    sim_b = ok.groupby("start_s").agg(size=("batch_size", "first"), end=("end_s", "max"))
    out["sim_mean_size"] = float(sim_b["size"].mean()) if len(sim_b) else float("nan")
    out["sim_mean_batch_ms"] = float((sim_b.end.to_numpy() - sim_b.index.to_numpy()).mean() * 1e3) if len(
        sim_b) else float("nan")
    # after the first token: decoding, then (real pod only) the answer's way out, which queues behind the
    # batch's other answers on the pod's loop and the generator's
    for who, df in (("real", real_df), ("sim", sim_requests)):
        done = df[df.outcome == "ok"]
        after = (done.end_s - done.first_token_s).to_numpy(dtype=float)
        if len(after):
            out[f"{who}_after_first_p50_ms"] = float(np.percentile(after, 50) * 1e3)
            out[f"{who}_after_first_p99_ms"] = float(np.percentile(after, 99) * 1e3)
    send_error = np.asarray(real_df.attrs.get("send_error_s", []), dtype=float)
    send_error = send_error[np.isfinite(send_error)]
    if len(send_error):
        out["send_error_p50_ms"] = float(np.percentile(send_error, 50) * 1e3)
        out["send_error_p99_ms"] = float(np.percentile(send_error, 99) * 1e3)
    if len(trace) < 2:
        return out
    start = np.array([r[0] for r in trace], dtype=float)
    end = np.array([r[1] for r in trace], dtype=float)
    size = np.array([r[2] for r in trace], dtype=int)
    engine_end = np.array([r[5] for r in trace], dtype=float)
    wall = end - start
    out["real_mean_size"] = float(size.mean())
    out["real_mean_batch_ms"] = float(wall.mean() * 1e3)
    out["end_lag_p99_ms"] = float(np.percentile((end - engine_end)[engine_end > 0], 99) * 1e3) if (
        engine_end > 0).any() else float("nan")
    enq = queue_times(trace)
    if calibration is not None:
        _, fit, during = fitted if fitted is not None else batch_fit(trace, profile, spec, calibration)
        ratio = wall / fit
        out["wall_over_fit_mean"] = float(ratio.mean())
        out["wall_over_fit_cv"] = float(ratio.std() / ratio.mean())
        out["wall_over_fit_p99"] = float(np.percentile(ratio, 99))
        # the residual's growth per arrival during the batch (ms): what the fitted arrival term leaves
        x = during - during.mean()
        out["ms_per_arrival_during"] = float(np.dot(x, wall - fit) / max(np.dot(x, x), 1e-12) * 1e3)
        # and per request left waiting when the batch started (a cost of open connections, if any)
        waiting = waiting_at_start(start, [r[3] for r in trace])
        w = waiting - waiting.mean()
        out["waiting_at_start_p99"] = float(np.percentile(waiting, 99))
        out["ms_per_waiting"] = float(np.dot(w, wall - fit) / max(np.dot(w, w), 1e-12) * 1e3)
    way_in = np.asarray(real_df.attrs.get("way_in_s", []), dtype=float)
    way_in = way_in[np.isfinite(way_in)]
    if len(way_in):  # send to the pod's receipt, per request (the load generator on the pod's clock)
        out["way_in_p50_ms"] = float(np.percentile(way_in, 50) * 1e3)
        out["way_in_p99_ms"] = float(np.percentile(way_in, 99) * 1e3)
    sends, queued = matched_sends(enq, real_df)  # from the run's start
    n = len(sends)
    if n:
        ingress = queued - sends
        out["ingress_p50_ms"] = float(np.percentile(ingress, 50) * 1e3)
        out["ingress_p99_ms"] = float(np.percentile(ingress, 99) * 1e3)
        room = size < spec.batching.max_batch_size
        begun = start - real_df.attrs["t0_monotonic"]
        missed = 0
        for k in np.flatnonzero(room):
            lo, hi = np.searchsorted(sends, [begun[k] - 1.0, begun[k]])
            missed += int(np.sum(queued[lo:hi] > begun[k]))
        out["missed_batch_share"] = missed / n
    return out

"""Figures of simulated (or replayed) runs: load, replicas, queue and p99 TTFT over time; latency CDFs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from capsim.plots.common import COLORS, CRASH, DOWN, OUTAGE, UP, column, figure


def ttft_p99_over_time(requests: Any, bin_s: float = 60.0, horizon_s: float | None = None) -> Any:
    """p99 time to first token (s) of the requests that arrived in each ``bin_s`` bin and succeeded,
    with the bin's end time; failed requests count as ``inf`` (they never saw a first token), so a bin
    that fails more than 1% of its requests shows as off the chart."""
    import pandas as pd

    arrival = column(requests, "arrival_s", "ttft_p99_over_time")
    first = column(requests, "first_token_s", "ttft_p99_over_time")
    outcome = np.asarray(requests["outcome"].astype(str))
    finished = outcome != "nan"
    ttft = np.where(outcome == "ok", first - arrival, np.inf)[finished]
    bins = np.floor(arrival[finished] / bin_s).astype(np.int64)
    frame = pd.DataFrame({"bin": bins, "ttft_s": ttft})
    p99 = frame.groupby("bin").ttft_s.quantile(0.99, interpolation="higher")
    out = pd.DataFrame({"time_s": (p99.index.to_numpy() + 1) * bin_s, "ttft_p99_s": p99.to_numpy()})
    return out if horizon_s is None else out[out.time_s <= horizon_s + bin_s]


def run_timeline(result: Any, *, title: str = "", slo_s: float | None = None, bin_s: float = 60.0) -> Figure:
    """Four panels over time (minutes) from a ``SimResult``: the arrival rate, replicas (desired, ready, and
    with a cluster section the pods its nodes hold, booting nodes included, as they are billed), queue depth,
    and p99 TTFT per ``bin_s`` of arrivals; every scale event and crash is marked."""
    ts = result.timeseries
    t = column(ts, "time_s", "run_timeline") / 60.0
    fig, (load, reps, queue, ttft) = figure(4, 1, height_in=8.5, sharex=True)
    load.plot(t, column(ts, "arrival_rate_per_s", "run_timeline"), color=COLORS[0], lw=1)
    load.set_ylabel("arrivals\n(requests/s)")
    reps.step(t, column(ts, "desired_replicas", "run_timeline"), where="post", color=COLORS[1], label="desired")
    reps.step(t, column(ts, "ready_replicas", "run_timeline"), where="post", color=COLORS[2], label="ready")
    room = _node_room(result, ts)
    if room is not None:  # a cluster section: the pods its nodes hold now (booting nodes included)
        reps.step(t, room, where="post", color=COLORS[5], lw=1, linestyle="--",
                  label="pods the nodes hold (booting ones too)")
    reps.set_ylabel("replicas\n(pods)")
    reps.yaxis.set_major_locator(MaxNLocator(integer=True))
    reps.legend(fontsize=7, loc="upper left")
    queue.plot(t, column(ts, "queue_depth", "run_timeline"), color=COLORS[4], lw=1)
    queue.set_ylabel("queue depth\n(requests)")
    p99 = ttft_p99_over_time(result.requests, bin_s)
    values = p99.ttft_p99_s.to_numpy(dtype=float)
    finite = np.isfinite(values)
    ttft.step(p99.time_s.to_numpy()[finite] / 60.0, values[finite], where="pre", color=COLORS[3],
              label=f"p99 TTFT per {bin_s:g} s of arrivals")
    failed = p99.time_s.to_numpy()[~finite] / 60.0
    if len(failed):  # no finite p99: drawn at the panel's top edge, whatever its scale
        ttft.plot(failed - bin_s / 120.0, np.full(len(failed), 0.97), "x", color=CRASH,
                  transform=ttft.get_xaxis_transform(), clip_on=False, label="over 1% failed (p99 = never)")
    if slo_s is not None:
        ttft.axhline(slo_s, color="k", linestyle="--", lw=1, label=f"SLO {slo_s:g} s")
    ttft.set_yscale("log")
    ttft.set_ylabel("p99 TTFT (s)")
    ttft.set_xlabel("time (min)")
    ttft.legend(fontsize=7, loc="upper left")
    _mark_events(result, (load, reps, queue, ttft))
    for ax in (load, reps, queue, ttft):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(0, t.max() if len(t) else 1)
    for ax in (load, reps, queue):
        ax.set_ylim(bottom=0)
    fig.suptitle(title or "simulated run")
    return fig


def _node_room(result: Any, ts: Any) -> np.ndarray | None:
    """Pods of ``tensor_parallel_size`` GPUs the nodes hold at each row (whole pods a node), or ``None``
    without a cluster section (or a time series from before the column, or a result without provenance)."""
    if "node_gpus" not in getattr(ts, "columns", ()):
        return None
    gpus = np.asarray(ts["node_gpus"], dtype=float)
    if not np.isfinite(gpus).any():
        return None
    from capsim.model.scenario import ClusterSpec

    scenario = (getattr(result, "provenance", None) or {}).get("scenario", {})
    if not scenario.get("cluster"):
        return None
    cluster = ClusterSpec.model_validate(scenario["cluster"])
    tp = int((scenario.get("batching") or {}).get("tensor_parallel_size", 1))
    return np.floor(gpus / cluster.node_gpus) * cluster.pods_per_node(tp)


def _mark_events(result: Any, axes: tuple[Any, ...]) -> None:
    """Vertical lines at each scale-up (green), scale-down (grey) and crash (red), with a legend entry."""
    events = getattr(result, "scale_events", None)
    crashes = getattr(result, "crashes", None)
    marks: list[tuple[float, str]] = []
    if events is not None and len(events):
        ups = events.to_replicas.to_numpy() > events.from_replicas.to_numpy()
        marks += [(x / 60.0, UP if up else DOWN) for x, up in zip(events.time_s.to_numpy(), ups, strict=True)]
    if crashes is not None and len(crashes):
        marks += [(x / 60.0, CRASH) for x in crashes.time_s.to_numpy()]
    faults = (getattr(result, "provenance", None) or {}).get("scenario", {}).get("faults") or {}
    outages = [(o["at_s"] / 60.0, (o["at_s"] + o["duration_s"]) / 60.0) for o in faults.get("redis_outages", ())]
    for ax in axes:
        for x, color in marks:
            ax.axvline(x, color=color, lw=0.8, alpha=0.6, linestyle=":" if color == DOWN else "-")
        for lo, hi in outages:
            ax.axvspan(lo, max(hi, lo + 0.1), color=OUTAGE, alpha=0.25, lw=0)
    labels = {UP: "scale up", DOWN: "scale down", CRASH: "crash"}
    seen = sorted({c for _, c in marks}, key=list(labels).index)
    if seen or outages:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles: list[Any] = [Line2D([], [], color=c, lw=1, linestyle=":" if c == DOWN else "-") for c in seen]
        names = [labels[c] for c in seen]
        if outages:
            handles.append(Patch(color=OUTAGE, alpha=0.25))
            names.append("Redis outage")
        axes[1].figure.legend(handles, names, loc="outside upper right", fontsize=7, ncols=len(names))


def latency_cdfs(runs: Mapping[str, Any], *, slo_s: float | None = None, warmup_s: float = 0.0,
                 points: int = 400) -> Figure:
    """TTFT and end-to-end latency CDFs (log seconds) of several runs' successful requests that arrived
    after ``warmup_s``; failed requests lower a curve's ceiling below 1 (they never finish)."""
    if not runs:
        raise ValueError("latency_cdfs needs at least one run")
    fig, (left, right) = figure(1, 2, height_in=3.8)
    qs = np.linspace(0.0, 1.0, points)
    for k, (name, requests) in enumerate(runs.items()):
        arrival = column(requests, "arrival_s", "latency_cdfs")
        keep = arrival >= warmup_s
        outcome = np.asarray(requests["outcome"].astype(str))[keep]
        finished = outcome != "nan"
        ok = outcome == "ok"
        share = ok.sum() / max(finished.sum(), 1)
        for ax, end in ((left, "first_token_s"), (right, "end_s")):
            lat = (column(requests, end, "latency_cdfs")[keep] - arrival[keep])[ok]
            if len(lat) == 0:
                continue
            ax.plot(np.quantile(lat, qs), qs * share, color=COLORS[k % len(COLORS)], label=name)
    for ax, what in ((left, "time to first token"), (right, "end-to-end latency")):
        if slo_s is not None and ax is left:
            ax.axvline(slo_s, color="k", linestyle="--", lw=1, label=f"SLO {slo_s:g} s")
        ax.axhline(0.99, color="0.5", lw=0.6, linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel(f"{what} (s)")
        ax.set_ylabel("share of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.set_title(what, fontsize=10)
    handles, names = left.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", fontsize=7, ncols=min(len(names), 3))
    return fig

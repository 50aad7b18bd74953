"""Figures of studies: the simulator against the real pod, and cost against p99 TTFT with the Pareto front."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from capsim.plots.common import COLORS, column, figure, pareto_mask

_METRIC_LABELS = {"ttft_p50_s": "TTFT p50", "ttft_p95_s": "TTFT p95", "ttft_p99_s": "TTFT p99",
                  "e2e_p50_s": "e2e p50", "e2e_p95_s": "e2e p95", "e2e_p99_s": "e2e p99",
                  "throughput_per_s": "throughput", "mean_batch_size": "mean batch size"}


def sim_vs_real(results: Any) -> Figure:
    """The validation's results frame (``level, metric, real, sim, rel_error``): TTFT and end-to-end
    percentiles (ms) of the real pod and the simulator against load, and the relative error per metric."""
    for name in ("level", "metric", "real", "sim", "rel_error"):
        if name not in results.columns:
            raise KeyError(f"sim_vs_real needs a {name!r} column; the frame has {list(results.columns)}")
    fig, (ttft, e2e, err) = figure(1, 3, height_in=3.9, width_in=12.0)
    for ax, kind, title in ((ttft, "ttft", "time to first token"), (e2e, "e2e", "end-to-end latency")):
        for k, q in enumerate((50, 95, 99)):
            sub = results[results.metric == f"{kind}_p{q}_s"].sort_values("level")
            color = COLORS[k]
            ax.plot(sub.level * 100, sub.real * 1000, marker="o", color=color, label=f"real p{q}")
            ax.plot(sub.level * 100, sub.sim * 1000, marker="s", color=color, linestyle="--", label=f"sim p{q}")
            if "real_low" in sub.columns:  # the 95% intervals, as bands (validate_stats)
                for who, hatch in (("real", None), ("sim", "//")):
                    ax.fill_between(sub.level * 100, sub[f"{who}_low"] * 1000, sub[f"{who}_high"] * 1000,
                                    color=color, alpha=0.15, hatch=hatch, linewidth=0)
        ax.set_xlabel("load (% of the pod's capacity)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, ncols=2, loc="upper left")
        ax.grid(True, alpha=0.3)
    levels = sorted(results.level.unique())
    metrics = list(dict.fromkeys(results.metric))
    width = 0.8 / max(len(levels), 1)
    y = np.arange(len(metrics))
    for k, level in enumerate(levels):
        sub = results[results.level == level].set_index("metric").reindex(metrics)
        xerr = None
        if "err_low" in sub.columns:  # the error's 95% interval as a whisker
            xerr = np.vstack([(sub.rel_error - sub.err_low).clip(lower=0), (sub.err_high - sub.rel_error).clip(lower=0)]) * 100
        err.barh(y + (k - (len(levels) - 1) / 2) * width, sub.rel_error * 100, height=width,
                 color=COLORS[k % len(COLORS)], label=f"{level:.0%} load", xerr=xerr, error_kw={"lw": 0.8})
    err.set_yticks(y, [_METRIC_LABELS.get(m, m) for m in metrics], fontsize=8)
    err.invert_yaxis()
    err.axvline(0, color="k", lw=0.8)
    err.set_xlabel("sim error vs real (%)")
    err.set_title("relative error", fontsize=10)
    err.legend(fontsize=7)
    err.grid(True, axis="x", alpha=0.3)
    fig.suptitle("the simulator against the real pod on the same workload")
    return fig


def cost_vs_ttft(points: Any, *, cost: str = "cost", ttft: str = "ttft_p99_s", label: str | None = None,
                 slo_s: float | None = None, highlight: Mapping[str, int] | None = None,
                 feasible: str | None = None, title: str = "") -> Figure:
    """Each setting's cost ($ over the run) against its p99 TTFT (s), with the Pareto front (no setting
    cheaper and faster) as a line, the SLO, and ``highlight`` (name -> row position) annotated.

    ``feasible`` names a boolean column (for example ``slo_met``): settings that fail it are drawn hollow.
    """
    x = column(points, ttft, "cost_vs_ttft")
    y = column(points, cost, "cost_vs_ttft")
    fig, (ax,) = figure(1, 1, height_in=4.6, width_in=8.0)
    ok = np.asarray(points[feasible], dtype=bool) if feasible else np.ones(len(x), dtype=bool)
    ax.scatter(x[ok], y[ok], s=22, color=COLORS[0], alpha=0.7,
               label=f"{feasible}: yes ({ok.sum()})" if feasible else f"settings ({ok.sum()})")
    if (~ok).any():
        ax.scatter(x[~ok], y[~ok], s=22, facecolors="none", edgecolors=COLORS[0], alpha=0.6,
                   label=f"{feasible}: no ({(~ok).sum()})")
    front = pareto_mask(x, y)
    order = np.argsort(x[front])
    ax.plot(x[front][order], y[front][order], color=COLORS[1], marker="D", ms=5, drawstyle="steps-post",
            label="Pareto front")
    if label is not None:
        for i in np.flatnonzero(front):
            ax.annotate(str(points[label].iloc[i]), (x[i], y[i]), textcoords="offset points", xytext=(5, 4),
                        fontsize=7)
    for k, (name, row) in enumerate((highlight or {}).items()):
        ax.scatter([x[row]], [y[row]], s=90, marker="*", color=COLORS[(k + 2) % len(COLORS)], zorder=5,
                   label=name)
    if slo_s is not None:
        ax.axvline(slo_s, color="k", linestyle="--", lw=1, label=f"SLO {slo_s:g} s")
    finite = x[np.isfinite(x)]
    if len(finite) and finite.max() / max(finite.min(), 1e-9) > 30:
        ax.set_xscale("log")
    ax.set_xlabel("p99 time to first token (s)")
    ax.set_ylabel("GPU cost of the run ($)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "cost against p99 TTFT", fontsize=11)
    return fig


def front_rows(points: Any, cost: str = "cost", ttft: str = "ttft_p99_s") -> Sequence[int]:
    """Row positions of the Pareto front of ``points`` (cheapest first)."""
    x = column(points, ttft, "front_rows")
    y = column(points, cost, "front_rows")
    rows = np.flatnonzero(pareto_mask(x, y))
    return [int(i) for i in rows[np.argsort(y[rows])]]


def pod_shapes(frame: Any, *, title: str = "") -> Figure:
    """``capsim.studies.pod_shapes.compare_pod_shapes``'s frame: per shape (medians over seeds) the GPUs the
    fleet holds and is billed for (left), and its cost an hour by either billing against its ITL p50
    (right). Shapes whose service times were estimated are marked so."""
    med = frame.groupby("shape", sort=False).median(numeric_only=True)
    est = frame.groupby("shape", sort=False)["estimated"].all()
    names = [f"{s}{' (est.)' if est[s] else ''}" for s in med.index]
    fig, (left, right) = figure(1, 2, height_in=3.8, width_in=10.0)
    x = np.arange(len(med))
    left.bar(x - 0.2, med["gpus_held"], width=0.4, color=COLORS[0], label="GPUs held by the pods")
    left.bar(x + 0.2, med["gpus_billed"], width=0.4, color=COLORS[1], label="GPUs billed (whole nodes)")
    for i, pods in enumerate(med["pods"]):
        left.annotate(f"{pods:g} pods", (x[i], med["gpus_held"].iloc[i]), textcoords="offset points",
                      xytext=(-12, 3), fontsize=7)
    left.set_xticks(x, names, fontsize=8)
    left.set_ylabel("GPUs for the SLO")
    left.set_ylim(0, float(np.nanmax(med[["gpus_held", "gpus_billed"]].to_numpy(dtype=float), initial=1.0)) * 1.3)
    left.legend(fontsize=7, loc="upper left")
    left.grid(True, axis="y", alpha=0.3)
    itl_ms = med["itl_p50_s"] * 1e3
    right.scatter(itl_ms, med["cost_per_hour_pod_billing"], color=COLORS[0], label="billed by the pod")
    right.scatter(itl_ms, med["cost_per_hour_node_billing"], color=COLORS[1], marker="s",
                  label="billed by the node")
    for i, name in enumerate(names):
        right.annotate(name, (itl_ms.iloc[i], med["cost_per_hour_node_billing"].iloc[i]),
                       textcoords="offset points", xytext=(5, 4), fontsize=7)
    right.set_xlabel("ITL p50 (ms)")
    right.set_ylabel("fleet cost ($ an hour)")
    right.legend(fontsize=7)
    right.grid(True, alpha=0.3)
    fig.suptitle(title or "pod shapes: GPUs and cost for the SLO", fontsize=11)
    return fig

"""Figures of session-aware routing: per-router bars (hit rate, TTFT, load imbalance) and TTFT around a crash."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from capsim.plots.common import COLORS, CRASH, column, figure

ROUTER_METRICS = {
    "prefix_hit_rate": "prefix hit rate\n(cached / prompt tokens)",
    "ttft_p50_s": "TTFT p50 (s)",
    "ttft_p99_s": "TTFT p99 (s)",
    "load_max_over_mean": "load imbalance\n(max / mean requests per pod)",
}


def _window(requests: Any, start_s: float | None, end_s: float | None, what: str) -> Any:
    """The ok requests that a pod served and that arrived in ``[start_s, end_s)``."""
    arrival = column(requests, "arrival_s", what)
    keep = (np.asarray(requests["outcome"].astype(str)) == "ok") & (column(requests, "pod", what) >= 0)
    if start_s is not None:
        keep &= arrival >= start_s
    if end_s is not None:
        keep &= arrival < end_s
    return requests[keep]


def pod_load(requests: Any, start_s: float | None = None, end_s: float | None = None) -> Any:
    """Per pod, over the ok requests that arrived in ``[start_s, end_s)``: ``requests`` served and
    ``prefill_tokens`` computed (prompt tokens less those the prefix cache held), indexed by pod id."""
    import pandas as pd

    ok = _window(requests, start_s, end_s, "pod_load")
    cached = column(ok, "cached_tokens", "pod_load") if "cached_tokens" in ok.columns else 0.0
    frame = pd.DataFrame({"pod": column(ok, "pod", "pod_load").astype(np.int64),
                          "prefill_tokens": column(ok, "prompt_tokens", "pod_load") - cached})
    out = frame.groupby("pod").agg(requests=("pod", "size"), prefill_tokens=("prefill_tokens", "sum"))
    return out.astype({"prefill_tokens": np.int64})


def imbalance(loads: Any) -> dict[str, float]:
    """How unevenly ``loads`` (one number per pod) are spread: ``max_over_mean`` (1 = even) and ``cv``,
    the coefficient of variation (population standard deviation / mean; 0 = even)."""
    x = np.asarray(loads, dtype=float)
    if x.size == 0 or x.mean() <= 0:
        return {"max_over_mean": float("nan"), "cv": float("nan")}
    return {"max_over_mean": float(x.max() / x.mean()), "cv": float(x.std() / x.mean())}


def ttft_around(requests: Any, at_s: float, *, before_s: float = 60.0, after_s: float = 120.0,
                bin_s: float = 10.0) -> Any:
    """Per ``bin_s`` of arrivals from ``at_s - before_s`` to ``at_s + after_s``: the mean and p99 TTFT (s)
    of the ok requests, and the history tokens they re-prefilled; ``time_s`` is the bin's start less ``at_s``."""
    import pandas as pd

    ok = _window(requests, at_s - before_s, at_s + after_s, "ttft_around")
    arrival = column(ok, "arrival_s", "ttft_around")
    frame = pd.DataFrame({
        "bin": np.floor((arrival - at_s) / bin_s).astype(np.int64),
        "ttft_s": column(ok, "first_token_s", "ttft_around") - arrival,
        "reprefill_tokens": column(ok, "reprefill_tokens", "ttft_around") if "reprefill_tokens" in ok.columns
        else 0.0,
    })
    g = frame.groupby("bin")
    out = pd.DataFrame({"ttft_mean_s": g.ttft_s.mean(),
                        "ttft_p99_s": g.ttft_s.quantile(0.99, interpolation="higher"),
                        "reprefill_tokens": g.reprefill_tokens.sum().astype(np.int64)})
    out.insert(0, "time_s", out.index.to_numpy() * bin_s)
    return out.reset_index(drop=True)


def router_bars(table: Any, *, metrics: Mapping[str, str] | None = None, router: str = "router",
                state: str = "state", title: str = "") -> Figure:
    """One panel per metric (column -> axis label; default ``ROUTER_METRICS``): a group of bars per router,
    one bar per state store, each bar's height the table's value (a row per router and store)."""
    metrics = dict(ROUTER_METRICS if metrics is None else metrics)
    routers = list(dict.fromkeys(table[router]))
    stores = list(dict.fromkeys(table[state]))
    cols = 2 if len(metrics) > 1 else 1
    rows = -(-len(metrics) // cols)
    fig, axes = figure(rows, cols, height_in=3.0 * rows)
    width = 0.8 / len(stores)
    x = np.arange(len(routers))
    for ax, (name, label) in zip(axes, metrics.items(), strict=False):
        for k, store in enumerate(stores):
            sub = table[table[state] == store].set_index(router)
            values = [float(sub[name].get(r, np.nan)) for r in routers]
            ax.bar(x + (k - (len(stores) - 1) / 2) * width, values, width, color=COLORS[k % len(COLORS)],
                   label=f"state: {store}")
        ax.set_xticks(x, routers, fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def crash_ttft(requests: Mapping[str, Any], at_s: float, *, before_s: float = 60.0, after_s: float = 120.0,
               bin_s: float = 10.0, title: str = "") -> Figure:
    """Two panels around a crash at ``at_s`` (seconds from it), one line per named requests frame: the mean
    TTFT (log s) per ``bin_s`` of arrivals and the history tokens re-prefilled; the crash marked on both."""
    fig, (ttft, tokens) = figure(2, 1, height_in=5.5, sharex=True)
    for k, (name, frame) in enumerate(requests.items()):
        around = ttft_around(frame, at_s, before_s=before_s, after_s=after_s, bin_s=bin_s)
        color = COLORS[k % len(COLORS)]
        t = np.append(around.time_s.to_numpy(dtype=float), float(around.time_s.iloc[-1]) + bin_s)  # last bin's end
        ttft.step(t, np.append(around.ttft_mean_s, around.ttft_mean_s.iloc[-1]), where="post", color=color,
                  label=name)
        tokens.step(t, np.append(around.reprefill_tokens, around.reprefill_tokens.iloc[-1]), where="post",
                    color=color, label=name)
    for ax in (ttft, tokens):
        ax.axvline(0.0, color=CRASH, linestyle=":", lw=1.5, label="crash")
    ttft.set_yscale("log")
    ttft.set_ylabel(f"mean TTFT per {bin_s:g} s\nof arrivals (s)")
    tokens.set_ylabel("re-prefilled history\n(tokens)")
    tokens.set_xlabel(f"seconds from the crash at {at_s:g} s")
    ttft.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title)
    return fig

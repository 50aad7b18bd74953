"""Shared figure helpers: a pyplot-free Figure of a given grid, colours, and the Pareto front of points."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

WIDTH_IN = 10.0  # fits a notebook column at the default 100 dpi, and a README at 110 dpi
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
UP, DOWN, CRASH, OUTAGE = "#2ca02c", "#7f7f7f", "#d62728", "#ff7f0e"


def figure(nrows: int, ncols: int, *, height_in: float, sharex: bool | Literal["none", "all", "row", "col"] = False,
           width_in: float = WIDTH_IN) -> tuple[Figure, list[Axes]]:
    """A new Figure (no pyplot: no global state, safe in threads and on headless machines) and its axes."""
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=sharex, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (folders made as needed) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def log2_axis(ax: Axes) -> None:
    """A base-2 log x axis labelled with plain numbers (1, 2, 4, ...) rather than powers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def pareto_mask(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> np.ndarray:
    """Which points no other point beats on both ``x`` and ``y`` (smaller is better on both; NaN never
    on the front). Ties on both keep every copy."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    mask = np.zeros(len(xs), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok & (xs <= xs[i]) & (ys <= ys[i]) & ((xs < xs[i]) | (ys < ys[i]))
        mask[i] = not others.any()
    return mask


def column(frame: Any, name: str, what: str) -> np.ndarray:
    """A frame's column as a float array; a missing one raises ``KeyError`` naming it and the plot."""
    if name not in frame.columns:
        raise KeyError(f"{what} needs a {name!r} column; the frame has {list(frame.columns)}")
    return np.asarray(frame[name], dtype=float)

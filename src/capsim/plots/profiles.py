"""Figures of measured service-time profiles: latency and throughput against batch size, and batching's speedup."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from capsim.model.profile import Phase, ServiceTimeProfile
from capsim.plots.common import COLORS, column, figure, log2_axis

_PHASE_TITLE = {"prefill": "prefill (one forward pass over the prompts)",
                "decode": "decode (one step of every sequence)"}


def _throughput(phase: str, batch: np.ndarray, tokens: float, ms: np.ndarray) -> np.ndarray:
    """Tokens per second a phase processes: a prefill pass handles batch x prompt tokens, a decode
    step produces one token per sequence."""
    per_pass = batch * tokens if phase == "prefill" else batch
    return np.asarray(per_pass / (ms / 1000.0), dtype=float)


def profile_curves(profile: ServiceTimeProfile, *, title: str | None = None) -> Figure:
    """Per phase: median latency (ms) and throughput (tokens/s) against batch size, one line per length."""
    frame = profile.to_frame()
    fig, axes = figure(2, 2, height_in=6.5, sharex=True)
    for col, phase in enumerate(("prefill", "decode")):
        lat, thr = axes[col], axes[2 + col]
        rows = frame[frame.phase == phase]
        for k, (tokens, sub) in enumerate(rows.groupby("tokens")):
            sub = sub.sort_values("batch_size")
            b = sub.batch_size.to_numpy(dtype=float)
            ms = sub.p50_ms.to_numpy(dtype=float)
            label = f"{tokens} prompt tokens" if phase == "prefill" else f"{tokens} context tokens"
            color = COLORS[k % len(COLORS)]
            lat.plot(b, ms, marker="o", ms=3, color=color, label=label)
            thr.plot(b, _throughput(phase, b, float(tokens), ms), marker="o", ms=3, color=color, label=label)
        lat.set_title(_PHASE_TITLE[phase], fontsize=10)
        lat.set_ylabel("median latency (ms)")
        thr.set_ylabel("throughput (tokens/s)")
        thr.set_xlabel("batch size (sequences)")
        for ax in (lat, thr):
            log2_axis(ax)
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
        lat.legend(fontsize=7, loc="upper left")
    fig.suptitle(title or _describe(profile))
    return fig


def compare_profiles(profiles: Mapping[str, ServiceTimeProfile], *, prompt_tokens: int = 256,
                     context_tokens: int = 256) -> Figure:
    """Several profiles side by side at one prompt and one context length: per phase, median latency
    (ms) and throughput (tokens/s) against batch size (interpolated where a length was not measured).
    An estimated profile (``capsim estimate-profile``) is drawn dashed and labelled so."""
    from capsim.model.roofline import is_estimate

    if not profiles:
        raise ValueError("compare_profiles needs at least one profile")
    fig, axes = figure(2, 2, height_in=6.5, sharex=True)
    phases: tuple[tuple[Phase, int], ...] = (("prefill", prompt_tokens), ("decode", context_tokens))
    for k, (name, prof) in enumerate(profiles.items()):
        color = COLORS[k % len(COLORS)]
        ls, label = ("--", f"{name} (estimated)") if is_estimate(prof) else ("-", name)
        for col, (phase, tokens) in enumerate(phases):
            b = np.array([float(x) for x in prof.batch_sizes(phase)])
            ms = np.array([prof.phase_ms(phase, x, tokens, extrapolate=True)[0] for x in b])
            axes[col].plot(b, ms, marker="o", ms=3, color=color, ls=ls, label=label)
            axes[2 + col].plot(b, _throughput(phase, b, float(tokens), ms), marker="o", ms=3, color=color, ls=ls,
                               label=label)
    for col, (phase, tokens) in enumerate(phases):
        what = "prompt" if phase == "prefill" else "context"
        axes[col].set_title(f"{phase}, {tokens} {what} tokens", fontsize=10)
        axes[col].set_ylabel("mean latency (ms)")
        axes[2 + col].set_ylabel("throughput (tokens/s)")
        axes[2 + col].set_xlabel("batch size (sequences)")
    for ax in axes:
        log2_axis(ax)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("profiles compared" + (" (dashed: estimated, not measured)"
                                         if any(is_estimate(p) for p in profiles.values()) else ""))
    return fig


def batching_speedup(measured: Any, profile: ServiceTimeProfile | None = None, *, prompt_tokens: int = 16,
                     output_tokens: int = 32) -> Figure:
    """What batching buys on the real engine: requests/s and median latency against ``max_batch_size``.

    ``measured`` has the columns ``max_batch_size``, ``requests_per_s`` and ``p50_latency_s``. With a
    profile, the speedup the profile predicts for a full batch of that size (``b x T(1) / T(b)``) is drawn
    beside the measured one.
    """
    b = column(measured, "max_batch_size", "batching_speedup")
    rps = column(measured, "requests_per_s", "batching_speedup")
    p50 = column(measured, "p50_latency_s", "batching_speedup")
    base = rps[np.argmin(b)]
    fig, (left, right) = figure(1, 2, height_in=3.6)
    left.plot(b, rps / base, marker="o", label="measured (dynamic batcher)")
    if profile is not None:
        one = profile.batch_timing(1, prompt_tokens, output_tokens, extrapolate=True).total_s
        pred = [x * one / profile.batch_timing(int(x), prompt_tokens, output_tokens, extrapolate=True).total_s
                for x in b]
        left.plot(b, pred, marker="s", linestyle="--", label="profile: full batches")
    left.plot(b, b, color="0.6", linestyle=":", label="ideal (linear)")
    log2_axis(left)
    left.set_xlabel("max_batch_size (requests)")
    left.set_ylabel(f"throughput / throughput at {int(b.min())}  (x)")
    left.set_title("batching speedup", fontsize=10)
    left.legend(fontsize=7)
    for k, (x, y, r) in enumerate(zip(b, rps / base, rps, strict=True)):
        last = k == len(b) - 1  # the last label goes left of its point, inside the axes
        left.annotate(f"{r:.0f}/s", (x, y), textcoords="offset points", xytext=(-5 if last else 5, -11),
                      ha="right" if last else "left", fontsize=7)
    right.plot(b, p50 * 1000, marker="o")
    log2_axis(right)
    right.set_xlabel("max_batch_size (requests)")
    right.set_ylabel("median latency (ms)")
    right.set_title("latency of one request under the same load", fontsize=10)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.suptitle(f"dynamic batching on the real engine ({prompt_tokens}-token prompts, {output_tokens} new tokens)")
    return fig


def _describe(profile: ServiceTimeProfile) -> str:
    meta = profile.metadata
    model = meta.get("model", {})
    name = model.get("name", "?") if isinstance(model, Mapping) else str(model)
    return f"{name} on {meta.get('device_name', '?')} ({meta.get('device', '?')}, {meta.get('dtype', '?')})"

"""Measured service times of one device + model + dtype, and the batch service time they imply.

A profile is the contract between the real core and the simulator: the profiler writes it from
real kernel timings, the simulated pod reads it. Stored as CSV under ``data/profiles/`` with one
``# capsim-profile: {json}`` metadata line on top and one row per (phase, batch size, tokens):

    phase,batch_size,tokens,count,mean_ms,p50_ms,p90_ms,p99_ms,std_ms

``prefill`` rows time the forward pass over a padded batch of prompts of ``tokens`` tokens;
``decode`` rows time one KV-cache decode step of a batch whose context holds ``tokens`` tokens.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from capsim.errors import CapsimError
from capsim.paths import read_input_text

SCHEMA_VERSION = 1
PHASES: tuple[str, ...] = ("prefill", "decode")
COLUMNS: tuple[str, ...] = (
    "phase",
    "batch_size",
    "tokens",
    "count",
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "std_ms",
)
_META_PREFIX = "# capsim-profile:"
_REQUIRED_META = ("device", "device_name", "model", "dtype", "torch_version", "created", "schema_version")

Phase = Literal["prefill", "decode"]


class ProfileError(CapsimError, ValueError):
    """A profile file or table is unusable; the message names the file, line or column."""


class ProfileRangeError(ProfileError):
    """A batch asks for a batch size or length outside what the profile measured."""


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    """Timing statistics of one measured point, in milliseconds."""

    phase: Phase
    batch_size: int
    tokens: int
    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    std_ms: float


@dataclass(frozen=True, slots=True)
class BatchTiming:
    """Service time of one static batch, in seconds from the batch's start."""

    prefill_s: float
    total_s: float


@dataclass(frozen=True)
class _Grid:
    """A full (batch size x tokens) grid of mean and std, for bilinear interpolation."""

    batch_sizes: tuple[int, ...]
    tokens: tuple[int, ...]
    mean_ms: np.ndarray  # shape (len(batch_sizes), len(tokens))
    std_ms: np.ndarray


def _interp_index(axis: Sequence[int], x: float, extrapolate: bool, what: str) -> tuple[int, float]:
    """Return (i, w) such that value = (1-w)*v[i] + w*v[i+1]; w outside [0, 1] extrapolates."""
    if len(axis) == 1:
        if x != axis[0] and not extrapolate:
            raise ProfileRangeError(f"{what}={x:g} is outside the measured value {axis[0]}")
        return 0, 0.0
    lo, hi = axis[0], axis[-1]
    if (x < lo or x > hi) and not extrapolate:
        raise ProfileRangeError(
            f"{what}={x:g} is outside the measured range [{lo}, {hi}]; "
            "measure a wider profile or pass extrapolate=True"
        )
    i = bisect.bisect_right(axis, x) - 1
    i = min(max(i, 0), len(axis) - 2)
    w = (x - axis[i]) / (axis[i + 1] - axis[i])
    return i, w


@dataclass(frozen=True)
class ServiceTimeProfile:
    """Measured prefill and decode latencies plus metadata (device, torch version, dtype, model)."""

    points: tuple[ProfilePoint, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        grids = {phase: self._build_grid(phase) for phase in PHASES}
        object.__setattr__(self, "_grids", grids)

    # ---- construction and I/O -------------------------------------------------------------
    def _build_grid(self, phase: str) -> _Grid:
        rows = [p for p in self.points if p.phase == phase]
        if not rows:
            raise ProfileError(f"{self.source}: no {phase!r} rows")
        batch_sizes = tuple(sorted({p.batch_size for p in rows}))
        tokens = tuple(sorted({p.tokens for p in rows}))
        mean = np.full((len(batch_sizes), len(tokens)), np.nan)
        std = np.full_like(mean, np.nan)
        bi = {b: i for i, b in enumerate(batch_sizes)}
        ti = {t: i for i, t in enumerate(tokens)}
        for p in rows:
            if not math.isnan(mean[bi[p.batch_size], ti[p.tokens]]):
                raise ProfileError(
                    f"{self.source}: duplicate {phase} row for batch_size={p.batch_size}, tokens={p.tokens}"
                )
            mean[bi[p.batch_size], ti[p.tokens]] = p.mean_ms
            std[bi[p.batch_size], ti[p.tokens]] = p.std_ms
        missing = np.argwhere(np.isnan(mean))
        if len(missing):
            b, t = missing[0]
            raise ProfileError(
                f"{self.source}: {phase} grid is incomplete: no row for batch_size={batch_sizes[b]}, "
                f"tokens={tokens[t]}"
            )
        return _Grid(batch_sizes, tokens, mean, std)

    @classmethod
    def from_csv(cls, path: str | Path) -> ServiceTimeProfile:
        """Load a profile file; a missing file, column or bad row raises ``ProfileError`` naming it."""
        path = Path(path)
        text = read_input_text(path, "profile", "a CSV file", ProfileError)
        return cls.from_text(text, source=str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "<text>") -> ServiceTimeProfile:
        """Parse the CSV text of a profile (see the module docstring for the format)."""
        lines = text.splitlines()
        if not lines or not lines[0].startswith(_META_PREFIX):
            raise ProfileError(f"{source}: line 1 must be the '{_META_PREFIX} {{...}}' metadata line")
        try:
            metadata = json.loads(lines[0][len(_META_PREFIX) :])
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{source}: line 1: metadata is not valid JSON ({exc.msg})") from None
        if not isinstance(metadata, dict):
            raise ProfileError(f"{source}: line 1: metadata must be a JSON object")
        version = metadata.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ProfileError(
                f"{source}: unknown schema_version {version!r} (this capsim reads {SCHEMA_VERSION})"
            )
        for key in _REQUIRED_META:
            if key not in metadata:
                raise ProfileError(f"{source}: metadata lacks {key!r}")
        reader = csv.DictReader(io.StringIO("\n".join(lines[1:])))
        header = reader.fieldnames or []
        for col in COLUMNS:
            if col not in header:
                raise ProfileError(f"{source}: missing column {col!r} (header: {','.join(header)})")
        points = []
        for lineno, row in enumerate(reader, start=3):
            points.append(_parse_row(row, source, lineno))
        if not points:
            raise ProfileError(f"{source}: no rows")
        return cls(tuple(points), metadata, source)

    def to_csv(self, path: str | Path) -> Path:
        """Write the profile (metadata line, then rows) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_text(), encoding="utf-8")
        return path

    def to_text(self) -> str:
        """The CSV text of this profile."""
        buf = io.StringIO()
        buf.write(f"{_META_PREFIX} {json.dumps(dict(self.metadata), sort_keys=True)}\n")
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        for p in self.points:
            writer.writerow(
                [p.phase, p.batch_size, p.tokens, p.count]
                + [f"{v:.6g}" for v in (p.mean_ms, p.p50_ms, p.p90_ms, p.p99_ms, p.std_ms)]
            )
        return buf.getvalue()

    def to_frame(self) -> Any:
        """The rows as a pandas DataFrame (for notebooks)."""
        import pandas as pd

        return pd.DataFrame([_point_dict(p) for p in self.points], columns=list(COLUMNS))

    # ---- queries -----------------------------------------------------------------------------
    def batch_sizes(self, phase: Phase = "decode") -> tuple[int, ...]:
        """The measured batch sizes of a phase."""
        return self._grid(phase).batch_sizes

    def token_range(self, phase: Phase) -> tuple[int, int]:
        """The smallest and largest measured token count of a phase."""
        t = self._grid(phase).tokens
        return t[0], t[-1]

    def coverage_gaps(self, *, max_batch_size: int, prompt_tokens: tuple[int, int], max_output_tokens: int) -> list[str]:
        """What a static-batching workload can ask that this profile did not measure (empty if nothing).

        Batches hold 1 to ``max_batch_size`` requests; a batch's prefill is its longest prompt (within
        ``prompt_tokens``, the workload's shortest and longest), its decode context runs from that prompt
        to prompt + longest output - 2. ``batch_timing`` without ``extrapolate`` refuses anything outside.
        """
        gaps = []
        for phase in PHASES:
            sizes = self._grid(phase).batch_sizes
            if sizes[0] > 1 or max_batch_size > sizes[-1]:
                gaps.append(f"{phase} batch sizes 1..{max_batch_size} (measured {sizes[0]}..{sizes[-1]})")
        lo, hi = self.token_range("prefill")
        if prompt_tokens[0] < lo or prompt_tokens[1] > hi:
            gaps.append(f"prompts of {prompt_tokens[0]}..{prompt_tokens[1]} tokens (measured {lo}..{hi})")
        if max_output_tokens > 1:
            lo, hi = self.token_range("decode")
            last = prompt_tokens[1] + max_output_tokens - 2
            if prompt_tokens[0] < lo or last > hi:
                gaps.append(f"decode contexts of {prompt_tokens[0]}..{last} tokens (measured {lo}..{hi})")
        return gaps

    def _grid(self, phase: str) -> _Grid:
        grids: dict[str, _Grid] = self._grids  # type: ignore[attr-defined]
        try:
            return grids[phase]
        except KeyError:
            raise ProfileError(f"unknown phase {phase!r}; expected one of {PHASES}") from None

    def phase_ms(
        self, phase: Phase, batch_size: float, tokens: float, *, extrapolate: bool = False
    ) -> tuple[float, float]:
        """Mean and std (ms) of one phase at a batch size and token count, bilinearly interpolated."""
        g = self._grid(phase)
        i, wi = _interp_index(g.batch_sizes, batch_size, extrapolate, f"{phase} batch_size")
        j, wj = _interp_index(g.tokens, tokens, extrapolate, f"{phase} tokens")
        mean = _bilinear(g.mean_ms, i, wi, j, wj)
        std = _bilinear(g.std_ms, i, wi, j, wj)
        return max(mean, 0.0), max(std, 0.0)

    def batch_timing(
        self,
        batch_size: int,
        prompt_tokens: int,
        output_tokens: int,
        *,
        rng: np.random.Generator | None = None,
        extrapolate: bool = False,
    ) -> BatchTiming:
        """Service time (s) of a static batch: prefill of the longest prompt, then one decode step
        per further token of the longest output.

        ``prompt_tokens`` and ``output_tokens`` are the batch's longest. The prefill produces the first
        token, so a batch generating ``n`` tokens runs ``n - 1`` decode steps, whose context (tokens
        already cached) grows from ``prompt_tokens`` to ``prompt_tokens + n - 2``; interpolation is linear in context between
        measured points, so the steps are summed exactly by the step at the mean context. With ``rng``,
        each phase's time is drawn from a gamma distribution with the measured mean and spread (the
        decode steps as a sum of independent steps); without it, the means are returned.
        """
        if batch_size < 1 or prompt_tokens < 1 or output_tokens < 1:
            raise ValueError(
                "batch_size, prompt_tokens and output_tokens must be >= 1, "
                f"got {batch_size}, {prompt_tokens}, {output_tokens}"
            )
        pre_mean, pre_std = self.phase_ms("prefill", batch_size, prompt_tokens, extrapolate=extrapolate)
        steps = output_tokens - 1
        dec_mean = dec_std = 0.0
        if steps:
            last = prompt_tokens + steps - 1
            mid = (prompt_tokens + last) / 2.0
            lo, hi = self.token_range("decode")
            if not extrapolate and (prompt_tokens < lo or last > hi):
                raise ProfileRangeError(
                    f"decode context {prompt_tokens}..{last} tokens is outside the "
                    f"measured range [{lo}, {hi}]; measure a wider profile or pass extrapolate=True"
                )
            step_mean, step_std = self.phase_ms("decode", batch_size, mid, extrapolate=True)
            dec_mean = steps * step_mean
            dec_std = math.sqrt(steps) * step_std
        if rng is not None:
            pre_mean = _gamma(rng, pre_mean, pre_std)
            dec_mean = _gamma(rng, dec_mean, dec_std)
        prefill_s = pre_mean / 1000.0
        return BatchTiming(prefill_s, prefill_s + dec_mean / 1000.0)


def _bilinear(v: np.ndarray, i: int, wi: float, j: int, wj: float) -> float:
    rows, cols = v.shape
    i1 = min(i + 1, rows - 1)
    j1 = min(j + 1, cols - 1)
    top = v[i, j] * (1 - wj) + v[i, j1] * wj
    bottom = v[i1, j] * (1 - wj) + v[i1, j1] * wj
    return float(top * (1 - wi) + bottom * wi)


def _gamma(rng: np.random.Generator, mean: float, std: float) -> float:
    """A positive draw with the given mean and standard deviation (the mean itself if std is 0)."""
    if mean <= 0.0 or std <= 0.0:
        return mean
    shape = (mean / std) ** 2
    return float(rng.gamma(shape, mean / shape))


def _point_dict(p: ProfilePoint) -> dict[str, Any]:
    return {name: getattr(p, name) for name in COLUMNS}


def _parse_row(row: Mapping[str, str | None], source: str, lineno: int) -> ProfilePoint:
    phase = row.get("phase")
    if phase not in PHASES:
        raise ProfileError(f"{source}: line {lineno}: column 'phase' must be one of {PHASES}, got {phase!r}")
    values: dict[str, Any] = {"phase": phase}
    for col in ("batch_size", "tokens", "count"):
        raw = row.get(col)
        try:
            values[col] = int(raw or "")
        except ValueError:
            raise ProfileError(f"{source}: line {lineno}: column {col!r} must be an integer, got {raw!r}") from None
        if values[col] < 1:
            raise ProfileError(f"{source}: line {lineno}: column {col!r} must be >= 1, got {raw!r}")
    for col in COLUMNS[4:]:
        raw = row.get(col)
        try:
            val = float(raw or "")
        except ValueError:
            raise ProfileError(f"{source}: line {lineno}: column {col!r} must be a number, got {raw!r}") from None
        if not math.isfinite(val) or val < 0:
            raise ProfileError(f"{source}: line {lineno}: column {col!r} must be finite and >= 0, got {raw!r}")
        values[col] = val
    return ProfilePoint(**values)


def powers_of_two(maximum: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``maximum`` (included when it is itself a power of two): a profile's batch sizes."""
    if maximum < 1:
        raise ValueError(f"max batch size must be >= 1, got {maximum}")
    out, b = [], 1
    while b <= maximum:
        out.append(b)
        b *= 2
    return tuple(out)


def make_profile(points: Iterable[ProfilePoint], metadata: Mapping[str, Any]) -> ServiceTimeProfile:
    """Build a profile from measured points, filling the schema version if absent."""
    meta = {"schema_version": SCHEMA_VERSION, **metadata}
    return ServiceTimeProfile(tuple(points), meta)

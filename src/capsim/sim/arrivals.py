"""The workload of a run, drawn up front: when each session starts and the token counts of every request.

Everything here is vectorized and depends only on the workload section, the horizon and the seed's
``arrivals`` and ``lengths`` streams, so settings elsewhere (pods, autoscaler, faults) never change it.
Request ``r`` is turn ``r % turns`` of session ``r // turns``; later turns are sent by the client when the
previous turn is answered (or on a schedule, ``sessions.mode: open``), so only first turns have an arrival
time here. A growing session's later prompts are set by the client too (``capsim.sim.sessions``).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import numpy as np

from capsim.model.scenario import (
    ConstantTokens,
    PiecewiseArrivals,
    PoissonArrivals,
    Scenario,
    Tokens,
    TraceArrivals,
)
from capsim.model.settings import SettingsError
from capsim.paths import open_input
from capsim.sim.prefix import NoPrefix, PrefixSource
from capsim.sim.sessions import SessionPrefix
from capsim.sim.streams import Streams


class TraceError(SettingsError):
    """A trace file is missing or malformed; the message names the file and the line."""


@dataclass(frozen=True)
class Workload:
    """Session start times (s, sorted) and per-request token counts (``n_sessions * turns`` each).

    Growing sessions (``message_tokens`` set): ``prompt_tokens`` starts as each turn's new message, and the
    client sets a later turn's prompt (history plus message) when it sends it (``capsim.sim.sessions``).
    ``prefix`` gives each request's KV-block hashes to a continuous pod's prefix cache.
    """

    session_start_s: np.ndarray  # float64, one per session, sorted
    turns: int
    think_time_s: float  # the mean think time
    prompt_tokens: np.ndarray  # int32, one per request
    output_tokens: np.ndarray  # int32, one per request
    message_tokens: np.ndarray | None = None  # int32, one per request: growing sessions only
    prefix: PrefixSource = field(default_factory=NoPrefix)

    @property
    def n_sessions(self) -> int:
        return len(self.session_start_s)

    @property
    def n_requests(self) -> int:
        return len(self.prompt_tokens)


def make_workload(scenario: Scenario, streams: Streams) -> Workload:
    """Draw the workload of ``scenario`` over its horizon from ``streams``."""
    wl = scenario.workload
    arrivals = wl.arrivals
    turns = wl.sessions.turns
    if isinstance(arrivals, TraceArrivals):
        path = scenario.resolve(arrivals.path)
        if arrivals.format == "mooncake":  # its block hashes feed the prefix cache (capsim.sim.trace_mooncake)
            from capsim.sim.trace_mooncake import read_mooncake

            mc = read_mooncake(path)
            times = mc.times_s / (arrivals.speedup * wl.load_scale)
            keep = times < scenario.horizon_s
            return Workload(times[keep], 1, 0.0, mc.prompt[keep], mc.output[keep], prefix=mc.prefix(keep))
        times, prompt, output = read_trace(path)
        times = times / (arrivals.speedup * wl.load_scale)
        keep = times < scenario.horizon_s
        return Workload(times[keep], 1, 0.0, prompt[keep], output[keep])
    starts = session_starts(arrivals, scenario.horizon_s, streams["arrivals"], wl.load_scale)
    n = len(starts) * turns
    gen = streams["lengths"]
    # prompts are drawn before outputs, each as one block, so one setting never shifts the other
    prompt = draw_tokens(wl.prompt_tokens, n, gen)
    output = draw_tokens(wl.output_tokens, n, gen)
    think = wl.sessions.think_mean_s
    if wl.sessions.new_tokens is None:
        return Workload(starts, turns, think, prompt, output)
    # a growing session's later turns carry a new message; drawn after the rest, so it shifts nothing
    new = draw_tokens(wl.sessions.new_tokens, n, gen)
    message = np.where(np.arange(n) % turns == 0, prompt, new).astype(np.int32)
    prefix = SessionPrefix(turns, n)
    return Workload(starts, turns, think, message.copy(), output, message, prefix)


def session_starts(arrivals: PoissonArrivals | PiecewiseArrivals, horizon_s: float,
                   gen: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Start times (s) in [0, horizon) of a (piecewise-constant rate) Poisson process, its rates times ``scale``
    (``workload.load_scale``).

    Drawn by time change: the points of a unit-rate process, mapped through the inverse of the
    cumulative rate. A constant rate of 40/s and a step function that starts at 40/s therefore share
    their early arrivals under one seed.
    """
    if isinstance(arrivals, PoissonArrivals):
        steps = np.array([[0.0, arrivals.rate_per_s]])
    else:
        steps = np.array(arrivals.rate_per_s, dtype=float)
    if scale != 1.0:
        steps = steps.copy()
        steps[:, 1] *= scale
    knots_t = np.append(steps[:, 0], horizon_s)
    knots_t = knots_t[knots_t <= horizon_s]
    rates = steps[: len(knots_t) - 1, 1]
    cum = np.concatenate([[0.0], np.cumsum(rates * np.diff(knots_t))])  # Lambda at each knot
    total = cum[-1]
    # unit-rate points, drawn in blocks until they pass Lambda(horizon)
    chunks = []
    last = 0.0
    block = max(1024, int(total * 1.02) + 64)
    while last < total:
        e = gen.standard_exponential(block)
        pts = last + np.cumsum(e)
        chunks.append(pts)
        last = float(pts[-1])
        block = max(1024, int((total - last) * 1.05) + 64)
    unit = np.concatenate(chunks) if chunks else np.empty(0)
    unit = unit[unit < total]
    # invert the piecewise-linear Lambda; flat pieces (rate 0) never receive points
    seg = np.searchsorted(cum, unit, side="right") - 1
    seg = np.minimum(seg, len(rates) - 1)
    starts: np.ndarray = knots_t[seg] + (unit - cum[seg]) / rates[seg]
    return starts


def draw_tokens(spec: Tokens, n: int, gen: np.random.Generator) -> np.ndarray:
    """``n`` token counts (int32, >= 1) from a constant or lognormal spec."""
    if isinstance(spec, ConstantTokens):
        return np.full(n, spec.value, dtype=np.int32)
    mu = np.log(spec.mean) - spec.sigma**2 / 2.0  # so that the distribution's mean is spec.mean
    x = np.rint(gen.lognormal(mu, spec.sigma, n))
    hi = spec.max if spec.max is not None else np.iinfo(np.int32).max
    return np.clip(x, 1, hi).astype(np.int32)


def read_trace(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read an Azure LLM inference trace: arrival times (s, from the first row), prompt and output tokens.

    Columns ``TIMESTAMP,ContextTokens,GeneratedTokens``; a timestamp is ISO date and time with up to
    7 fractional digits. Rows must be in time order. A bad row raises ``TraceError`` naming file and line.
    """
    f = open_input(path, "trace", "a CSV file", TraceError)
    with f:
        try:
            return _read_rows(csv.reader(_text_lines(f, path)), path)
        except csv.Error as exc:
            raise TraceError(f"{path}: not a valid CSV file: {exc}") from None


_INT32_MAX = int(np.iinfo(np.int32).max)


def _text_lines(f: BinaryIO, path: Path) -> Iterator[str]:
    """The file's lines as text; a line that is not UTF-8 raises ``TraceError`` naming it."""
    for lineno, raw in enumerate(f, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TraceError(f"{path}: line {lineno}: not UTF-8 text (byte {exc.start + 1} of the line); "
                             "is it a CSV file?") from None


def _read_rows(reader: Iterator[list[str]], path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    times: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    header = next(reader, None)
    want = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
    if header is None or [h.strip() for h in header[:3]] != want:
        raise TraceError(f"{path}: line 1: header must be {','.join(want)}, got {header!r}")
    first: datetime | None = None
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) < 3:
            raise TraceError(f"{path}: line {lineno}: expected 3 columns, got {len(row)}: {row!r}")
        try:
            ts = _parse_timestamp(row[0])
        except ValueError:
            raise TraceError(f"{path}: line {lineno}: TIMESTAMP is not a date and time: {row[0]!r}") from None
        try:
            p, o = int(row[1]), int(row[2])
        except ValueError:
            raise TraceError(f"{path}: line {lineno}: token counts must be integers, got {row[1:3]!r}") from None
        if p < 1 or o < 1:
            raise TraceError(f"{path}: line {lineno}: token counts must be >= 1, got {row[1:3]!r}")
        if p > _INT32_MAX or o > _INT32_MAX:
            raise TraceError(f"{path}: line {lineno}: token counts must be <= {_INT32_MAX}, got {row[1:3]!r}")
        if first is None:
            first = ts
        elif (ts.tzinfo is None) != (first.tzinfo is None):
            raise TraceError(
                f"{path}: line {lineno}: TIMESTAMP {row[0].strip()!r} "
                f"{'has no' if ts.tzinfo is None else 'has a'} time zone and the first row's "
                f"{'has one' if ts.tzinfo is None else 'has none'}; give every row the same form"
            )
        t = (ts - first).total_seconds()
        if times and t < times[-1]:
            raise TraceError(f"{path}: line {lineno}: TIMESTAMP goes back in time ({row[0]!r})")
        times.append(t)
        prompt.append(p)
        output.append(o)
    if not times:
        raise TraceError(f"{path}: no rows")
    return np.array(times), np.array(prompt, dtype=np.int32), np.array(output, dtype=np.int32)


def _parse_timestamp(text: str) -> datetime:
    text = text.strip()
    if "." in text:  # Python reads at most 6 fractional digits; the trace has 7
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(text)

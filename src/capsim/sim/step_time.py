"""How long one continuous-batching engine step takes in the simulator, from the step's composition.

A step computes prefill chunks (``prefills`` requests, ``prefill_tokens`` tokens, the longest chunk
``prefill_max_tokens``) and ``decodes`` single-token decodes whose contexts sum to ``decode_context``.
Until the profiler fits a step-time model (issue 13, section 4), :class:`ProfileStepTime` derives the
step time from the static profile's two kernels, and says so in its name: the prefill kernel for a padded
batch of ``prefills`` prompts of the longest chunk's length, plus one decode kernel for ``decodes``
requests at their mean context. It ignores a chunk's earlier context (the static profile never measured
it), and it charges the measured per-call overhead once per kernel. Batch sizes and lengths outside the
measured grid are extrapolated linearly.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from capsim.model.profile import Phase, ServiceTimeProfile
from capsim.model.roofline import Roofline, is_estimate
from capsim.model.scenario import Scenario
from capsim.model.step_model import StepTimeFit
from capsim.policy.scheduling import Step
from capsim.sim.streams import BufferedDraws, FactorWalk, Streams


class StepTimeModel(Protocol):
    """Seconds one engine step takes, and a run of plain decode steps (``Scheduler.decode_run_length``)."""

    def step_s(self, step: Step) -> float: ...

    def decode_run_s(self, decodes: int, context: int, steps: int) -> float:
        """Seconds of ``steps`` decode steps of ``decodes`` requests whose contexts sum to ``context`` at
        the first step and grow by ``decodes`` each step: the sum of what ``step_s`` says for each.

        A model whose step times are not drawn also has ``decode_step_s(decodes, context)``: what
        ``step_s`` says, bit for bit, for one such step, and ``decode_step_ends(start, decodes, context,
        steps)``: the run's step ends, those times added to ``start`` one by one (:func:`step_ends`), as one
        event per step adds them, so both give the same times to the last bit."""
        ...


def step_ends(step_s: Callable[[int, int], float], start: float, decodes: int, context: int,
              steps: int) -> list[float]:
    """The ends of ``steps`` decode steps started at ``start``: ``start + t0``, ``start + t0 + t1``, ...
    added one by one, ``t_j = step_s(decodes, context + j * decodes)`` (a model's ``decode_step_s``; its
    own ``decode_step_ends`` gives the same floats faster)."""
    out = []
    t = start
    for j in range(steps):
        t += step_s(decodes, context + j * decodes)
        out.append(t)
    return out


class ConstantStepTime:
    """Every step takes ``mean_s`` (``service.kind: deterministic``)."""

    def __init__(self, mean_s: float) -> None:
        self.mean_s = mean_s

    def step_s(self, step: Step) -> float:
        return self.mean_s

    def decode_run_s(self, decodes: int, context: int, steps: int) -> float:
        return self.mean_s * steps

    def decode_step_s(self, decodes: int, context: int) -> float:
        return self.mean_s

    def decode_step_ends(self, start: float, decodes: int, context: int, steps: int) -> list[float]:
        m = self.mean_s
        out = []
        t = start
        for _ in range(steps):
            t += m
            out.append(t)
        return out


class ExponentialStepTime:
    """Exponentially distributed step times of mean ``mean_s`` (``service.kind: exponential``)."""

    def __init__(self, mean_s: float, gen: np.random.Generator) -> None:
        self.mean_s = mean_s
        self._draws = BufferedDraws(gen, "exponential")

    def step_s(self, step: Step) -> float:
        return self._draws.next() * self.mean_s

    def decode_run_s(self, decodes: int, context: int, steps: int) -> float:
        return sum(self._draws.next() for _ in range(steps)) * self.mean_s


class LinearStepTime:
    """``t = c0 + c1 x prefill_tokens + c2 x prefill_tokens x context + c3 x decodes + c4 x decode_context``
    (seconds; DistServe's simulator uses this family). ``c0`` is the per-step overhead."""

    def __init__(self, c0: float, c1: float, c2: float, c3: float, c4: float) -> None:
        self.c = (c0, c1, c2, c3, c4)

    def step_s(self, step: Step) -> float:
        c0, c1, c2, c3, c4 = self.c
        return (c0 + c1 * step.prefill_tokens + c2 * step.prefill_context + c3 * step.decodes
                + c4 * step.decode_context)

    def decode_run_s(self, decodes: int, context: int, steps: int) -> float:
        c0, _, _, c3, c4 = self.c
        return steps * (c0 + c3 * decodes + c4 * context) + c4 * decodes * steps * (steps - 1) / 2

    def decode_step_s(self, decodes: int, context: int) -> float:
        c0, c1, c2, c3, c4 = self.c
        return c0 + c1 * 0 + c2 * 0 + c3 * decodes + c4 * context  # step_s's sum, term by term

    def decode_step_ends(self, start: float, decodes: int, context: int, steps: int) -> list[float]:
        c0, c1, c2, c3, c4 = self.c
        head = c0 + c1 * 0 + c2 * 0 + c3 * decodes  # decode_step_s's sum up to its last term
        out = []
        t = start
        for j in range(steps):
            t += head + c4 * (context + j * decodes)
            out.append(t)
        return out


class RooflineStepTime:
    """A roofline estimate's step times (``capsim.model.roofline``, ``capsim estimate-profile``), from the
    step's sums, times ``scale`` (``service.time_scale``). Not linear in the composition: a small decode
    step is bound by the weights' read and grows with the batch only past the GPU's ridge point, which a
    linear fit to the roofline misses by 15% at the small steps low load runs.

    A plain decode step's attention reads and computes over the same ``context + decodes`` tokens, so for
    a given number of decodes its time is affine in the context: ``head(decodes) + per_token x (context +
    decodes)``, the head kept per batch size; runs of decode steps follow it as ``LinearStepTime`` does."""

    def __init__(self, roofline: Roofline, scale: float = 1.0) -> None:
        self.roofline = roofline
        self.scale = scale
        self._f = roofline.aggregate_s
        self._heads: dict[int, float] = {}
        self._per_token = scale * roofline.decode_attention_s_per_token

    def _head(self, decodes: int) -> float:
        head = self._heads.get(decodes)
        if head is None:
            head = self._heads[decodes] = self.scale * self.roofline.decode_head_s(decodes)
        return head

    def step_s(self, step: Step) -> float:
        if not step.prefill_tokens:
            return self.decode_step_s(step.decodes, step.decode_context)
        return self.scale * self._f(step.prefills, step.prefill_tokens, step.prefill_max_tokens, step.prefill_context,
                                    step.decodes, step.decode_context)

    def decode_step_s(self, decodes: int, context: int) -> float:
        return self._head(decodes) + self._per_token * (context + decodes)

    def decode_run_s(self, decodes: int, context: int, steps: int) -> float:
        return steps * (self._head(decodes) + self._per_token * (context + decodes)) + \
            self._per_token * decodes * steps * (steps - 1) / 2

    def decode_step_ends(self, start: float, decodes: int, context: int, steps: int) -> list[float]:
        head, k = self._head(decodes), self._per_token  # decode_step_s's terms
        out = []
        t = start
        for j in range(steps):
            t += head + k * (context + j * decodes + decodes)
            out.append(t)
        return out


class ProfileStepTime:
    """The adapter from a static ``ServiceTimeProfile`` to step times (see the module docstring).

    For speed, each batch size's kernel means over the measured token grid are computed once
    (``ServiceTimeProfile.phase_ms``, extrapolating in batch size) and then interpolated linearly in
    tokens, extrapolating past both ends as ``phase_ms`` does; ``scale`` multiplies the result
    (``service.time_scale``).
    """

    def __init__(self, profile: ServiceTimeProfile, scale: float = 1.0) -> None:
        self.profile = profile
        self.scale = scale / 1000.0  # ms -> s
        grid = profile.to_frame()
        self._tokens = {ph: [float(t) for t in sorted(set(grid.loc[grid["phase"] == ph, "tokens"]))]
                        for ph in ("prefill", "decode")}
        self._rows: dict[tuple[str, int], list[float]] = {}
        self._prefill: dict[int, list[float]] = {}  # the same rows by batch size, per phase
        self._decode: dict[int, list[float]] = {}
        self._dts = self._tokens["decode"]
        self._pts = self._tokens["prefill"]
        self._dlast = len(self._dts) - 2  # the last interval's index; -1: one measured length

    def _row(self, phase: Phase, batch_size: int) -> list[float]:
        """The kernel means (ms) of ``batch_size`` requests at each measured length of ``phase``."""
        row = self._rows.get((phase, batch_size))
        if row is None:
            row = self._rows[(phase, batch_size)] = [
                self.profile.phase_ms(phase, batch_size, t, extrapolate=True)[0] for t in self._tokens[phase]]
            (self._prefill if phase == "prefill" else self._decode)[batch_size] = row
        return row

    def kernel_ms(self, phase: Phase, batch_size: int, tokens: float) -> float:
        """Mean kernel time (ms) of ``phase`` for ``batch_size`` requests at ``tokens``; never negative."""
        ts = self._tokens[phase]
        row = self._row(phase, batch_size)
        if len(ts) == 1:
            return row[0]
        j = min(max(bisect.bisect_right(ts, tokens) - 1, 0), len(ts) - 2)
        w = (tokens - ts[j]) / (ts[j + 1] - ts[j])
        return max(row[j] + (row[j + 1] - row[j]) * w, 0.0)

    # step_s and decode_run_s are the simulator's inner loop: they compute what kernel_ms would, the same
    # operations in the same order (bit for bit), without a call and two lookups per kernel
    def step_s(self, step: Step) -> float:
        ms = 0.0
        p = step.prefills
        if p:
            pts = self._pts
            if len(pts) == 1:
                ms += self.kernel_ms("prefill", p, step.prefill_max_tokens)
            else:
                row = self._prefill.get(p) or self._row("prefill", p)
                n = step.prefill_max_tokens
                j = min(max(bisect.bisect_right(pts, n) - 1, 0), len(pts) - 2)
                v = row[j] + (row[j + 1] - row[j]) * ((n - pts[j]) / (pts[j + 1] - pts[j]))
                ms += v if v > 0.0 else 0.0
        d = step.decodes
        if d:
            ts = self._dts
            if self._dlast < 0:
                return (ms + self.kernel_ms("decode", d, step.decode_context / d)) * self.scale
            row = self._decode.get(d) or self._row("decode", d)
            x = step.decode_context / d
            j = min(max(bisect.bisect_right(ts, x) - 1, 0), self._dlast)
            v = row[j] + (row[j + 1] - row[j]) * ((x - ts[j]) / (ts[j + 1] - ts[j]))
            ms += v if v > 0.0 else 0.0
        return ms * self.scale

    def decode_step_s(self, decodes: int, context: int) -> float:
        if self._dlast < 0:
            return (0.0 + self.kernel_ms("decode", decodes, context / decodes)) * self.scale
        ts = self._dts
        row = self._decode.get(decodes) or self._row("decode", decodes)
        x = context / decodes
        j = min(max(bisect.bisect_right(ts, x) - 1, 0), self._dlast)
        v = row[j] + (row[j + 1] - row[j]) * ((x - ts[j]) / (ts[j + 1] - ts[j]))
        return (0.0 + (v if v > 0.0 else 0.0)) * self.scale

    def decode_step_ends(self, start: float, decodes: int, context: int, steps: int) -> list[float]:
        # decode_step_s for each step, inline: the row looked up once, the interval followed as the mean
        # context grows (bisect's answer, as it only moves right)
        last = self._dlast
        if last < 0:
            return step_ends(self.decode_step_s, start, decodes, context, steps)
        ts = self._dts
        scale = self.scale
        row = self._decode.get(decodes) or self._row("decode", decodes)
        j = min(max(bisect.bisect_right(ts, context / decodes) - 1, 0), last)
        out = []
        t = start
        for m in range(steps):
            x = (context + m * decodes) / decodes
            while j < last and ts[j + 1] <= x:
                j += 1
            v = row[j] + (row[j + 1] - row[j]) * ((x - ts[j]) / (ts[j + 1] - ts[j]))
            t += (0.0 + (v if v > 0.0 else 0.0)) * scale
            out.append(t)
        return out

    def decode_run_s(self, decodes: int, context: int, steps: int) -> float:
        # the mean context runs x0, x0 + 1, ...: the kernel is linear in it on each measured interval,
        # so each interval's steps sum to their count times the kernel at their middle
        x0 = context / decodes
        ts = self._dts
        last = self._dlast
        if last < 0:
            return sum(self.kernel_ms("decode", decodes, x0 + j) for j in range(steps)) * self.scale
        row = self._decode.get(decodes) or self._row("decode", decodes)
        right = bisect.bisect_right
        ms = 0.0
        if steps <= 4:
            j = min(max(right(ts, x0) - 1, 0), last)
            if j == min(max(right(ts, x0 + (steps - 1)) - 1, 0), last):  # one interval for all (nearly always)
                a, b, t0, w = row[j], row[j + 1] - row[j], ts[j], ts[j + 1] - ts[j]
                for k in range(steps):
                    v = a + b * ((x0 + k - t0) / w)
                    ms += v if v > 0.0 else 0.0
                return ms * self.scale
            for k in range(steps):
                x = x0 + k
                j = min(max(right(ts, x) - 1, 0), last)
                v = row[j] + (row[j + 1] - row[j]) * ((x - ts[j]) / (ts[j + 1] - ts[j]))
                ms += v if v > 0.0 else 0.0
            return ms * self.scale
        ceil = math.ceil
        # only the intervals the contexts x0 .. x0 + steps - 1 touch have steps (one more on each side
        # against rounding: an interval without steps adds nothing)
        first = max(right(ts, x0) - 2, 0)
        stop = min(right(ts, x0 + (steps - 1)), last) + 1
        for seg in range(first, stop):
            lo = 0 if seg == 0 else max(0, ceil(ts[seg] - x0))
            hi = steps - 1 if seg == last else min(steps - 1, ceil(ts[seg + 1] - x0) - 1)
            if hi >= lo:
                x = x0 + (lo + hi) / 2
                j = min(max(right(ts, x) - 1, 0), last)
                v = row[j] + (row[j + 1] - row[j]) * ((x - ts[j]) / (ts[j + 1] - ts[j]))
                ms += (hi - lo + 1) * (v if v > 0.0 else 0.0)
        return ms * self.scale


class NoisyStepTime:
    """Each step's time from ``inner`` multiplied by a factor of ``factors`` (mean 1): the spread of a
    pod's step cycle under load (``service.cycle_noise``; ``capsim validate --mode continuous`` measures
    it from the pod's step trace), as the static pod's ``CycleNoiseService`` does for batches. With
    ``block`` 1 each step draws a factor at random; with more, ``factors`` is a measured sequence walked
    ``block`` steps at a time from random starts (``capsim.sim.streams.FactorWalk``), so slow spells last.

    Each step draws its own factor, also inside a run of decode steps: :meth:`decode_run_ends` gives the
    run's step ends, which the pod keeps, so a run cut at an arrival ends where its step in progress does.
    Having no ``decode_step_s``, the pod never re-derives a step's time. Each pod walks the factors on its
    own (:meth:`for_pod`): a slow spell is one pod's, not every pod's turn by turn."""

    def __init__(self, inner: StepTimeModel, factors: Sequence[float] | np.ndarray, gen: np.random.Generator, block: int = 1,
                 draws: BufferedDraws | None = None) -> None:
        self.inner = inner
        self.factors = np.asarray(factors, dtype=float)
        if self.factors.ndim != 1 or not len(self.factors) or np.any(self.factors <= 0):
            raise ValueError("cycle_noise: the factors must be a non-empty list of positive numbers")
        self._gen = gen
        self._draws = draws if draws is not None else BufferedDraws(gen, "random")
        self._walk = FactorWalk(self.factors, block, self._draws)
        self._one = getattr(inner, "decode_step_s", None)

    def for_pod(self) -> NoisyStepTime:
        """The same model with a walk of its own (the draws' stream is shared)."""
        return NoisyStepTime(self.inner, self.factors, self._gen, self._walk.block, self._draws)

    def step_s(self, step: Step) -> float:
        return self.inner.step_s(step) * self._walk.next()

    def decode_run_ends(self, decodes: int, context: int, steps: int) -> np.ndarray:
        """The ends of ``steps`` decode steps (seconds from the run's start, increasing), each its model
        time times a factor of its own."""
        draws = self._walk.take(steps)
        one = self._one
        if one is not None:
            base = np.fromiter((one(decodes, context + j * decodes) for j in range(steps)), float, steps)
        else:
            base = np.fromiter((self.inner.decode_run_s(decodes, context + j * decodes, 1) for j in range(steps)),
                               float, steps)
        return np.cumsum(base * draws)

    def decode_run_s(self, decodes: int, context: int, steps: int) -> float:
        return float(self.decode_run_ends(decodes, context, steps)[-1])


def make_step_time(scenario: Scenario, streams: Streams, profile: ServiceTimeProfile | None = None) -> StepTimeModel:
    """The step-time model a continuous-mode scenario's ``service`` section asks for: with a profile, the
    roofline when it is an estimate (``RooflineStepTime``), its fitted ``step_model`` (``LinearStepTime``)
    when it has one, else the ``ProfileStepTime`` adapter;
    wrapped in ``NoisyStepTime`` when ``service.cycle_noise`` is set."""
    model = _make_step_time(scenario, streams, profile)
    noise = scenario.service.cycle_noise
    if not noise:
        return model
    return NoisyStepTime(model, list(noise), streams["service"], scenario.service.cycle_noise_block_steps)


def _make_step_time(scenario: Scenario, streams: Streams, profile: ServiceTimeProfile | None) -> StepTimeModel:
    svc = scenario.service
    if svc.kind == "exponential":
        assert svc.mean_s is not None
        return ExponentialStepTime(svc.mean_s * svc.time_scale, streams["service"])
    if svc.kind == "deterministic":
        assert svc.mean_s is not None
        return ConstantStepTime(svc.mean_s * svc.time_scale)
    if profile is None:
        assert svc.profile is not None
        profile = ServiceTimeProfile.from_csv(scenario.resolve(svc.profile))
    if is_estimate(profile):  # a roofline estimate: the roofline itself, not a fit to it
        return RooflineStepTime(Roofline.from_profile(profile), svc.time_scale)
    fitted = profile.metadata.get("step_model")
    if fitted:  # measured steps of mixed composition (capsim.core.step_profile): the model itself
        c = StepTimeFit.from_dict(fitted).coefficients
        return LinearStepTime(*(svc.time_scale * x for x in c))
    return ProfileStepTime(profile, svc.time_scale)

"""How long a simulated batch takes on the model: from a measured profile, or exponential or constant.

This is the one place the simulator is allowed to differ from the real core (DESIGN.md: the same
policies, a modelled service time). Each model answers ``(prefill_s, total_s)`` for a batch given its
size and its longest prompt and output; the first token of every request in the batch appears at
``prefill_s`` after the batch starts, the last at ``total_s``.
"""

from __future__ import annotations

import bisect
import math
from typing import Protocol

import numpy as np

from capsim.model.profile import Phase, ServiceTimeProfile
from capsim.model.scenario import Scenario, Service
from capsim.sim.streams import BufferedDraws, FactorWalk, Streams


class ServiceModel(Protocol):
    """Batch service time in seconds: ``(prefill_s, total_s)``."""

    def batch_time(self, size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float]: ...


class ExponentialService:
    """Exponentially distributed batch time of mean ``mean_s``, whatever the batch (M/M/1 when size is 1).

    The whole answer arrives at the end: the first token counts as produced when the batch finishes.
    """

    def __init__(self, mean_s: float, gen: np.random.Generator) -> None:
        self.mean_s = mean_s
        self._draws = BufferedDraws(gen, "exponential")

    def batch_time(self, size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
        t = self._draws.next() * self.mean_s
        return t, t


class DeterministicService:
    """A constant batch time ``mean_s`` (M/D/1 when size is 1); the first token arrives at the end."""

    def __init__(self, mean_s: float) -> None:
        self.mean_s = mean_s

    def batch_time(self, size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
        return self.mean_s, self.mean_s


class ProfileService:
    """Batch times from a measured ``ServiceTimeProfile``, with its noise if asked.

    ``ServiceTimeProfile.batch_timing`` is the definition; a batch costs ~12 us there, more than the
    rest of the batch's simulation, so inside the measured grid this class evaluates the same formula
    from tables compiled per integer batch size (bilinear interpolation = linear in batch size, done once,
    then linear in tokens) and draws the same gamma noise from the same generator. Outside the grid (and
    for extrapolation) it calls ``batch_timing`` itself. ``tests/test_sim_service.py`` pins the two to
    agree to 1e-9.
    """

    def __init__(self, profile: ServiceTimeProfile, gen: np.random.Generator | None,
                 extrapolate: bool = False) -> None:
        self.profile = profile
        self._gen = gen
        self._extrapolate = extrapolate
        self._pre = _compile(profile, "prefill")
        self._dec = _compile(profile, "decode")

    def _slow(self, size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
        bt = self.profile.batch_timing(size, prompt_tokens, output_tokens, rng=self._gen,
                                       extrapolate=self._extrapolate)
        return bt.prefill_s, bt.total_s

    def batch_time(self, size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
        pre, dec = self._pre, self._dec
        steps = output_tokens - 1
        if (pre is None or dec is None or size >= len(pre.mean) or size >= len(dec.mean)
                or prompt_tokens < pre.lo or prompt_tokens > pre.hi
                or (steps and (prompt_tokens < dec.lo or prompt_tokens + steps - 1 > dec.hi))):
            return self._slow(size, prompt_tokens, output_tokens)
        t = pre.tokens
        x: float = prompt_tokens
        j = min(max(bisect.bisect_right(t, x) - 1, 0), len(t) - 2)
        w = (x - t[j]) / (t[j + 1] - t[j])
        m = pre.mean[size]
        sd = pre.std[size]
        pre_mean = max(m[j] * (1 - w) + m[j + 1] * w, 0.0)
        pre_std = max(sd[j] * (1 - w) + sd[j + 1] * w, 0.0)
        dec_mean = dec_std = 0.0
        if steps:
            # the steps' contexts run from the prompt to prompt + steps - 1; linear, so the mean step
            t = dec.tokens
            x = (2 * prompt_tokens + steps - 1) / 2.0
            j = min(max(bisect.bisect_right(t, x) - 1, 0), len(t) - 2)
            w = (x - t[j]) / (t[j + 1] - t[j])
            m = dec.mean[size]
            sd = dec.std[size]
            dec_mean = steps * max(m[j] * (1 - w) + m[j + 1] * w, 0.0)
            dec_std = math.sqrt(steps) * max(sd[j] * (1 - w) + sd[j + 1] * w, 0.0)
        gen = self._gen
        if gen is not None:  # as capsim.model.profile._gamma: a gamma with the mean and spread
            if pre_mean > 0.0 and pre_std > 0.0:
                shape = (pre_mean / pre_std) ** 2
                pre_mean = float(gen.gamma(shape, pre_mean / shape))
            if dec_mean > 0.0 and dec_std > 0.0:
                shape = (dec_mean / dec_std) ** 2
                dec_mean = float(gen.gamma(shape, dec_mean / shape))
        prefill_s = pre_mean / 1000.0
        return prefill_s, prefill_s + dec_mean / 1000.0


class _PhaseTable:
    """One phase's mean and std (ms) per integer batch size, as piecewise-linear functions of tokens."""

    __slots__ = ("hi", "lo", "mean", "std", "tokens")

    def __init__(self, tokens: list[float], mean: list[list[float]], std: list[list[float]]) -> None:
        self.tokens = tokens
        self.lo = tokens[0]
        self.hi = tokens[-1]
        self.mean = mean  # mean[b][j], b = 0 unused
        self.std = std

    def at(self, size: int, x: float) -> tuple[float, float]:
        t = self.tokens
        j = min(max(bisect.bisect_right(t, x) - 1, 0), len(t) - 2)
        w = (x - t[j]) / (t[j + 1] - t[j])
        m = self.mean[size]
        s = self.std[size]
        return max(m[j] * (1 - w) + m[j + 1] * w, 0.0), max(s[j] * (1 - w) + s[j + 1] * w, 0.0)


def _compile(profile: ServiceTimeProfile, phase: Phase) -> _PhaseTable | None:
    """Tables for batch sizes 1..largest measured; ``None`` when the grid is too small to interpolate."""
    sizes = profile.batch_sizes(phase)
    grid = profile.to_frame()
    grid = grid[grid["phase"] == phase]
    tokens = sorted(set(grid["tokens"].tolist()))
    if len(sizes) < 2 or len(tokens) < 2:
        return None
    mean = np.full((len(sizes), len(tokens)), np.nan)
    std = np.full_like(mean, np.nan)
    bi = {b: k for k, b in enumerate(sizes)}
    ti = {t: k for k, t in enumerate(tokens)}
    for row in grid.itertuples(index=False):
        mean[bi[row.batch_size], ti[row.tokens]] = row.mean_ms
        std[bi[row.batch_size], ti[row.tokens]] = row.std_ms
    rows_m: list[list[float]] = [[]]
    rows_s: list[list[float]] = [[]]
    for b in range(1, sizes[-1] + 1):
        if b < sizes[0]:  # below the smallest measured size: leave it to batch_timing
            return None
        i = min(max(bisect.bisect_right(sizes, b) - 1, 0), len(sizes) - 2)
        w = (b - sizes[i]) / (sizes[i + 1] - sizes[i])
        rows_m.append(list(mean[i] * (1 - w) + mean[i + 1] * w))
        rows_s.append(list(std[i] * (1 - w) + std[i + 1] * w))
    return _PhaseTable([float(t) for t in tokens], rows_m, rows_s)


class OverheadService:
    """A service model calibrated to a pod under load: times scaled by ``scale``, plus the pod's
    per-request CPU work outside the model (HTTP, session store).

    On a CPU pod that work runs on the same core as the model, so a batch of ``size`` requests keeps the
    pod busy ``size x overhead_s`` longer. Half of it lands before the first token: the previous batch's
    answers (store writes, responses) and this batch's arrivals (parsing, store reads) are handled while
    the prefill runs; the other half during decoding. ``capsim validate`` fits both numbers.
    """

    def __init__(self, inner: ServiceModel, overhead_s: float, scale: float = 1.0) -> None:
        self.inner = inner
        self.overhead_s = overhead_s
        self.scale = scale

    def batch_time(self, size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
        pre, total = self.inner.batch_time(size, prompt_tokens, output_tokens)
        extra = size * self.overhead_s
        return self.scale * pre + 0.5 * extra, self.scale * total + extra


class FirstTokenService:
    """A batch's first token ``scale`` times as far into it (``service.first_token_scale``), at most at its
    end; the batch's time unchanged. On a CPU pod the previous batch's answers (store writes, responses) run
    on the model's core while the next batch's prefill does, so the first token comes later in a batch
    than an idle core's profile puts it (stop 38: 1.2 to 2.1 times the profile's prefill, by load)."""

    def __init__(self, inner: ServiceModel, scale: float) -> None:
        self.inner = inner
        self.scale = scale

    def batch_time(self, size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
        pre, total = self.inner.batch_time(size, prompt_tokens, output_tokens)
        return min(pre * self.scale, total), total


class CycleNoiseService:
    """A batch's time (prefill and total) multiplied by one of ``factors``: the measured spread of a pod's
    batch cycle under load (``service.cycle_noise``), in place of the profile's gamma noise of an idle core.
    With ``block`` 1 each batch draws its factor at random; with more, ``factors`` is a measured sequence
    walked ``block`` batches at a time from random starts (``capsim.sim.streams.FactorWalk``), so slow
    spells last; with ``block`` = the sequence's length it is replayed from its first batch."""

    def __init__(self, inner: ServiceModel, factors: list[float], gen: np.random.Generator, block: int = 1) -> None:
        self.inner = inner
        self.factors = np.asarray(factors, dtype=float)
        self._walk = FactorWalk(self.factors, block, BufferedDraws(gen, "random"))

    def batch_time(self, size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
        pre, total = self.inner.batch_time(size, prompt_tokens, output_tokens)
        f = self._walk.next()
        return pre * f, total * f


def calibrated(model: ServiceModel, service: Service) -> ServiceModel:
    """``model`` as a calibrated pod runs it (``service.time_scale``, ``request_overhead_ms``,
    ``first_token_scale``, with its ``slowdown``): the simulator's service and ``capsim check``'s mean batch times."""
    service = service.effective()
    overhead_s = service.request_overhead_ms / 1000.0
    if overhead_s > 0 or service.time_scale != 1.0:
        model = OverheadService(model, overhead_s, service.time_scale)
    if service.first_token_scale != 1.0:
        model = FirstTokenService(model, service.first_token_scale)
    return model


def make_service(scenario: Scenario, streams: Streams, profile: ServiceTimeProfile | None = None) -> ServiceModel:
    """The service model a scenario asks for; ``profile`` overrides loading ``service.profile``."""
    model = calibrated(_make_service(scenario, streams, profile), scenario.service)
    noise = scenario.service.cycle_noise
    if not noise:
        return model
    return CycleNoiseService(model, noise, streams["service"], scenario.service.cycle_noise_block_steps)


def _make_service(scenario: Scenario, streams: Streams, profile: ServiceTimeProfile | None) -> ServiceModel:
    svc = scenario.service
    if svc.kind == "exponential":
        assert svc.mean_s is not None
        return ExponentialService(svc.mean_s, streams["service"])
    if svc.kind == "deterministic":
        assert svc.mean_s is not None
        return DeterministicService(svc.mean_s)
    if profile is None:
        assert svc.profile is not None
        profile = ServiceTimeProfile.from_csv(scenario.resolve(svc.profile))
    gamma = svc.noise and not svc.cycle_noise  # measured cycle noise replaces the profile's own
    return ProfileService(profile, streams["service"] if gamma else None, svc.extrapolate)

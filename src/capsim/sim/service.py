"""How long a simulated batch takes on the model: from a measured profile, or exponential or constant.

This is the one place the simulator is allowed to differ from the real core (DESIGN.md: the same
policies, a modelled service time). Each model answers ``(prefill_s, total_s)`` for a batch given its
size and its longest prompt and output; the first token of every request in the batch appears at
``prefill_s`` after the batch starts, the last at ``total_s``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

import numpy as np

from capsim.model.profile import ServiceTimeProfile
from capsim.model.scenario import Scenario
from capsim.sim.streams import BufferedDraws, Streams


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
    """Batch times from a measured ``ServiceTimeProfile`` (``batch_timing``), with its noise if asked."""

    def __init__(self, profile: ServiceTimeProfile, gen: np.random.Generator | None,
                 extrapolate: bool = False) -> None:
        self.profile = profile
        self._gen = gen
        self._extrapolate = extrapolate
        # without noise a batch's time depends on three integers only: cache it
        self._mean = lru_cache(maxsize=65536)(self._mean_uncached)

    def _mean_uncached(self, size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
        bt = self.profile.batch_timing(size, prompt_tokens, output_tokens, extrapolate=self._extrapolate)
        return bt.prefill_s, bt.total_s

    def batch_time(self, size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
        if self._gen is None:
            return self._mean(size, prompt_tokens, output_tokens)  # type: ignore[no-any-return]
        bt = self.profile.batch_timing(size, prompt_tokens, output_tokens, rng=self._gen,
                                       extrapolate=self._extrapolate)
        return bt.prefill_s, bt.total_s


def make_service(scenario: Scenario, streams: Streams, profile: ServiceTimeProfile | None = None) -> ServiceModel:
    """The service model a scenario asks for; ``profile`` overrides loading ``service.profile``."""
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
    return ProfileService(profile, streams["service"] if svc.noise else None, svc.extrapolate)

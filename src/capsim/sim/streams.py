"""Named, independent random streams for one simulation run, all derived from one seed.

``SeedSequence(seed).spawn(len(STREAM_NAMES))`` gives one child per name, in the fixed order of
``STREAM_NAMES``. Names are only ever appended, never reordered, so a stream's draws depend on the seed
and its own name alone: changing the autoscaler cannot shift the arrival stream (common random numbers),
and the same seed gives the same run serially or in parallel. No global generator is ever seeded.
"""

from __future__ import annotations

from typing import Final

import numpy as np

#: Stream names in spawn order. Append new names at the end; never reorder or remove one.
STREAM_NAMES: Final[tuple[str, ...]] = (
    "arrivals",  # inter-arrival times of sessions
    "lengths",  # prompt and output token counts
    "service",  # batch service-time noise
    "crashes",  # random crash times and which pods crash
    "routing",  # random router picks
    "startup",  # cold-start durations
    "retries",  # reserved for retry jitter
    "sessions",  # reserved for per-session draws (think times)
    "image_pull",  # image pull durations (once per node)
    "scrape_offsets",  # each pod's scrape offset within the scrape interval (Prometheus), by pod id
    "hpa_phase",  # the HPA controller's sync phase within its sync period
    "pod_uids",  # each pod's UID (a ReplicaSet's tie-break among scale-down victims), by pod id
    "probe_phases",  # the readiness-probe phase of each pod already running at time 0, by pod id
    "ingress",  # each request's ingress factor (service.ingress_noise)
    "node_failures",  # random node failure times (faults.node_mtbf_s) and which node an unnamed failure takes
    "spot",  # random spot interruption times (cluster.spot.mtbf_s) and which node an unnamed one takes
    "keda_phase",  # the phase of KEDA's polling loop within its polling interval (autoscaler.keda)
    "slow_pods",  # which ready pods an unnamed faults.slow_pods entry slows
    "slow_spells",  # faults.random_slowdowns: each pod's times between slow spells and the spells' lengths
    "dcgm_phase",  # each pod's dcgm-exporter collection phase and exporter scrape offset, by pod id (DCGM metrics)
    "analysis_scrape",  # the canary analysis's scrape offsets: each pod's, by pod id, and the gateway's first
    "ejection_jitter",  # each outlier ejection's jitter (router.outlier_ejection.max_ejection_time_jitter_s)
    "prometheus_sd",  # the phases of Prometheus's discovery send ticker and scrape-manager reload ticker
)


class Streams:
    """One ``numpy.random.Generator`` per name in ``STREAM_NAMES``, spawned from ``seed``."""

    def __init__(self, seed: int) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = seed
        children = np.random.SeedSequence(seed).spawn(len(STREAM_NAMES))
        self._gens = {name: np.random.Generator(np.random.PCG64(child))
                      for name, child in zip(STREAM_NAMES, children, strict=True)}

    def __getitem__(self, name: str) -> np.random.Generator:
        try:
            return self._gens[name]
        except KeyError:
            raise KeyError(f"unknown stream {name!r}; known: {', '.join(STREAM_NAMES)}") from None


class BufferedDraws:
    """Draws one value at a time from a generator, fetched in vectorized blocks (a scalar draw costs ~1 us).

    ``kind`` is ``"random"`` (uniform on [0, 1)) or ``"exponential"`` (mean 1). The values are the same
    as one long vectorized draw, so the block size does not change results.
    """

    __slots__ = ("_block", "_buf", "_gen", "_kind", "_pos")

    def __init__(self, gen: np.random.Generator, kind: str = "random", block: int = 8192) -> None:
        if kind not in ("random", "exponential"):
            raise ValueError(f"kind must be 'random' or 'exponential', got {kind!r}")
        self._gen = gen
        self._kind = kind
        self._block = block
        self._buf: list[float] = []
        self._pos = 0

    def next(self) -> float:
        """The next draw."""
        if self._pos >= len(self._buf):
            draw = self._gen.random if self._kind == "random" else self._gen.standard_exponential
            self._buf = draw(self._block).tolist()
            self._pos = 0
        v = self._buf[self._pos]
        self._pos += 1
        return v


class FactorWalk:
    """Factors drawn from a list (``service.cycle_noise``): with ``block`` 1, each draw is one of them at
    random; with ``block`` > 1, the list is a measured sequence and the draws walk it in order, ``block``
    at a time from a random start, so its slow spells (a run of long cycles) come as spells. With
    ``block`` 1 the draws are those of ``factors[int(u * len(factors))]`` for uniform ``u``."""

    __slots__ = ("_draws", "_left", "_pos", "block", "factors")

    def __init__(self, factors: np.ndarray, block: int, draws: BufferedDraws) -> None:
        self.factors = factors
        self.block = max(1, min(int(block), len(factors)))
        self._draws = draws
        self._pos = 0
        self._left = 0

    def _start(self) -> None:
        """A new block: a random start, ``block`` draws to walk from it."""
        self._pos = int(self._draws.next() * (len(self.factors) - self.block + 1))
        self._left = self.block

    def next(self) -> float:
        if not self._left:
            self._start()
        v = self.factors[self._pos]
        self._pos += 1
        self._left -= 1
        return float(v)

    def take(self, k: int) -> np.ndarray:
        """The next ``k`` draws."""
        if self.block == 1:
            f = self.factors
            return f[(np.asarray([self._draws.next() for _ in range(k)]) * len(f)).astype(np.int64)]
        out = np.empty(k)
        j = 0
        while j < k:
            if not self._left:
                self._start()
            n = min(self._left, k - j)
            out[j:j + n] = self.factors[self._pos:self._pos + n]
            self._pos += n
            self._left -= n
            j += n
        return out

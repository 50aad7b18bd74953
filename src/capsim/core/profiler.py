"""Measure the reference engine's prefill and decode kernels into a ``ServiceTimeProfile``.

Each point (phase, batch size, tokens) is warmed up, then timed repeatedly (CUDA events on a GPU,
``perf_counter`` on the CPU) until the running median settles or a repetition cap is reached.
"""

from __future__ import annotations

import datetime as dt
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import capsim
from capsim.core.engine import KVCache, ReferenceEngine
from capsim.model.profile import ProfileError, ProfilePoint, ServiceTimeProfile, make_profile, powers_of_two


@dataclass(frozen=True)
class ProfileSpec:
    """What to sweep and how hard to measure each point."""

    batch_sizes: tuple[int, ...] = powers_of_two(32)
    prompt_tokens: tuple[int, ...] = (16, 64, 256, 1024)
    context_tokens: tuple[int, ...] = (16, 64, 256, 1024, 2048, 4000)
    warmup: int = 3
    min_reps: int = 10
    max_reps: int = 100
    rel_tol: float = 0.02
    max_point_s: float = 5.0
    # time the points in shuffled rounds, a short visit to each a round, all held at once (``measure_rounds``),
    # instead of each to the end before the next: a machine whose speed moves in spells spreads them over
    # every point instead of bending the profile's shape; every point's KV cache is in memory together
    interleave: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "prompt_tokens", "context_tokens"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"ProfileSpec.{name} must be a non-empty list of values >= 1, got {values}")
        if self.min_reps < 3 or self.max_reps < self.min_reps:
            raise ValueError(
                f"ProfileSpec needs 3 <= min_reps <= max_reps, got {self.min_reps} and {self.max_reps}"
            )

    @classmethod
    def quick(cls, max_batch_size: int = 32) -> ProfileSpec:
        """A sweep that takes well under 30 s on two CPU cores with the tiny model."""
        return cls(
            batch_sizes=powers_of_two(max_batch_size),
            prompt_tokens=(16, 128, 512),
            context_tokens=(16, 256, 1024),
            warmup=2,
            min_reps=5,
            max_reps=15,
            rel_tol=0.05,
            max_point_s=0.8,
        )


@dataclass
class _Timer:
    """Times one call, with CUDA events on a GPU and perf_counter on the CPU (milliseconds)."""

    engine: ReferenceEngine

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.engine.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0


def _holds(median: float, previous: float | None, rel_tol: float) -> bool:
    """Has a point's median held within ``rel_tol`` of its previous check's?"""
    return previous is not None and abs(median - previous) <= rel_tol * previous


def measure(fn: Callable[[], object], timer: _Timer, spec: ProfileSpec) -> list[float]:
    """Warm up, then time ``fn`` until the median is stable within ``rel_tol`` or a cap is hit."""
    for _ in range(spec.warmup):
        timer(fn)
    samples: list[float] = []
    started = time.perf_counter()
    previous = None
    while len(samples) < spec.max_reps:
        samples.append(timer(fn))
        if len(samples) >= spec.min_reps and len(samples) % spec.min_reps == 0:
            med = statistics.median(samples)
            if _holds(med, previous, spec.rel_tol):
                break
            previous = med
            if time.perf_counter() - started > spec.max_point_s:
                break
    return samples


def measure_rounds(fns: Sequence[Callable[[], object]], timer: _Timer, spec: ProfileSpec,
                   seed: int = 0) -> list[list[float]]:
    """Time ``fns`` in rounds: each round visits every one once, in a shuffled order (seeded), and a visit
    is one untimed call (the caches warm to this point's shapes, as back-to-back decode steps keep them in a
    pod) then ``min_reps`` timed ones. Rounds go on until every median is stable within ``rel_tol`` from one
    round to the next (after two), ``max_reps`` samples each, or ``max_point_s`` per function in all; each
    one's samples. ``warmup`` untimed calls of each come first."""
    import random

    if not fns:
        return []
    for fn in fns:
        for _ in range(spec.warmup):
            timer(fn)
    samples: list[list[float]] = [[] for _ in fns]
    previous: list[float | None] = [None] * len(fns)
    order = list(range(len(fns)))
    rng = random.Random(seed)
    started = time.perf_counter()
    while len(samples[0]) < spec.max_reps:
        rng.shuffle(order)
        for i in order:
            timer(fns[i])
            samples[i] += [timer(fns[i]) for _ in range(min(spec.min_reps, spec.max_reps - len(samples[i])))]
        settled = True
        for i, got in enumerate(samples):
            med = statistics.median(got)
            settled &= _holds(med, previous[i], spec.rel_tol)
            previous[i] = med
        if settled or time.perf_counter() - started > spec.max_point_s * len(fns):
            break
    return samples


OUTLIER_FACTOR = 5.0
"""A sample over this many times the point's median is interference (the thread was descheduled, another
process held the core), not the kernel: it is left out of the statistics."""


def _point(phase: str, batch: int, tokens: int, samples: Sequence[float]) -> ProfilePoint:
    arr = np.asarray(samples)
    arr = arr[arr <= OUTLIER_FACTOR * np.median(arr)]
    return ProfilePoint(
        phase=phase,  # type: ignore[arg-type]
        batch_size=batch,
        tokens=tokens,
        count=len(arr),
        mean_ms=float(arr.mean()),
        p50_ms=float(np.percentile(arr, 50)),
        p90_ms=float(np.percentile(arr, 90)),
        p99_ms=float(np.percentile(arr, 99)),
        std_ms=float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
    )


def _prefill_call(engine: ReferenceEngine, batch: int, tokens: int, gen: torch.Generator) -> Callable[[], object]:
    """A call that prefills ``batch`` prompts of ``tokens`` tokens into a fresh cache."""
    cfg, dev = engine.config, engine.device
    ids = torch.randint(cfg.vocab_size, (batch, tokens), generator=gen).to(dev)
    valid = torch.ones(batch, tokens, dtype=torch.bool, device=dev)
    cache = KVCache.empty(cfg, batch, tokens, dev, engine.dtype)
    return lambda: engine.prefill(ids, valid, cache)


def _decode_call(engine: ReferenceEngine, batch: int, context: int, gen: torch.Generator) -> Callable[[], object]:
    """A call that runs one decode step for ``batch`` sequences with ``context`` tokens cached."""
    cfg, dev = engine.config, engine.device
    token = torch.randint(cfg.vocab_size, (batch,), generator=gen).to(dev)
    position = torch.full((batch,), context, dtype=torch.long, device=dev)
    valid = torch.ones(batch, context + 1, dtype=torch.bool, device=dev)
    cache = KVCache.empty(cfg, batch, context + 1, dev, engine.dtype)
    return lambda: engine.decode(token, position, context, valid, cache)


def profile_engine(
    engine: ReferenceEngine, spec: ProfileSpec | None = None, *, progress: bool = True, quick: bool = False
) -> ServiceTimeProfile:
    """Sweep the spec's batch sizes and lengths on ``engine`` and return the measured profile."""
    from tqdm.auto import tqdm

    spec = spec or ProfileSpec()
    cfg = engine.config
    too_long = [t for t in (*spec.prompt_tokens, *spec.context_tokens) if t + 1 > cfg.max_seq_len]
    if too_long:
        raise ValueError(f"token counts {too_long} exceed model {cfg.name}'s max_seq_len {cfg.max_seq_len}")
    timer = _Timer(engine)
    dev = engine.device
    gen = torch.Generator().manual_seed(1234)
    jobs = [("prefill", b, t) for b in spec.batch_sizes for t in spec.prompt_tokens]
    jobs += [("decode", b, c) for b in spec.batch_sizes for c in spec.context_tokens]
    points = []
    started = time.perf_counter()

    def call(phase: str, b: int, t: int) -> Callable[[], object]:
        return _prefill_call(engine, b, t, gen) if phase == "prefill" else _decode_call(engine, b, t, gen)

    if spec.interleave:
        runs = [call(*job) for job in jobs]
        measured = measure_rounds(runs, timer, spec)
        points = [_point(phase, b, t, got) for (phase, b, t), got in zip(jobs, measured, strict=True)]
        del runs
    else:
        for phase, b, t in tqdm(jobs, desc=f"profiling {cfg.name} on {dev.type}", disable=not progress):
            run = call(phase, b, t)
            points.append(_point(phase, b, t, measure(run, timer, spec)))
            del run  # frees the point's KV cache before the next one is allocated
    metadata = {
        "device": dev.type,
        "device_name": engine.device_name,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "dtype": engine.dtype_name,
        "model": cfg.as_dict(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "capsim_version": capsim.__version__,
        "torch_threads": torch.get_num_threads(),
        "timer": "cuda_events" if dev.type == "cuda" else "perf_counter",
        "sweep": asdict(spec),
        "quick": quick,
        "sweep_wall_s": round(time.perf_counter() - started, 2),
    }
    return make_profile(points, metadata)


def profile_filename(profile: ServiceTimeProfile) -> str:
    """``<device>-<model>-<dtype>[-quick].csv``, the device a slug of the GPU's name on CUDA."""
    meta = profile.metadata
    return _filename(str(meta["device"]), str(meta["device_name"]), str(meta["model"]["name"]),
                     str(meta["dtype"]), bool(meta.get("quick")))


def _filename(device_type: str, device_name: str, model: str, dtype: str, quick: bool) -> str:
    device = "cpu" if device_type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name.lower())
    suffix = "-quick" if quick else ""
    return f"{device.strip('-')}-{model}-{dtype}{suffix}.csv"


def check_device(device: str) -> None:
    """Refuse, with a ``ProfileError`` naming it, a device torch does not know or this machine does not have."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ProfileError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ProfileError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
                               "use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ProfileError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ProfileError(f"--device {device}: MPS is not available here; use cpu or auto")
    elif dev.type != "cpu":
        raise ProfileError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


def parse_lengths(text: str | None, option: str) -> tuple[int, ...] | None:
    """Token lengths from a comma-separated option (``"16,64,256"``); None when not given.

    An option given but holding no value (``","``), a value that is not an integer, or one below 1 raises
    ``ProfileError`` naming the option: it would otherwise be dropped and the default sweep run instead.
    """
    if text is None:
        return None
    parts = [v.strip() for v in text.split(",")]
    values = []
    for part in parts:
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise ProfileError(f"{option} takes comma-separated integers, got {part!r} in {text!r}") from None
        if value < 1:
            raise ProfileError(f"{option} values must be >= 1, got {value} in {text!r}")
        values.append(value)
    if not values:
        raise ProfileError(f"{option} holds no lengths, got {text!r}; give e.g. 16,64,256 or leave it out")
    return tuple(sorted(set(values)))


def run_profile(
    model: str = "tiny",
    *,
    device: str = "auto",
    dtype: str = "float32",
    quick: bool = False,
    max_batch_size: int = 32,
    prompt_tokens: Sequence[int] | None = None,
    context_tokens: Sequence[int] | None = None,
    out_dir: str | Path = "data/profiles",
    progress: bool = True,
    threads: int | None = None,
    overwrite: bool = True,
    interleave: bool = False,
) -> Path:
    """Build the engine, profile it and write ``out_dir/<device>-<model>-<dtype>[-quick].csv``.

    ``prompt_tokens`` and ``context_tokens`` override the sweep's lengths (quick or full); ``interleave``
    times the points in shuffled rounds (``ProfileSpec.interleave``). Without
    ``overwrite``, an existing file at that path raises ``ProfileError`` before anything is measured."""
    check_device(device)
    engine = ReferenceEngine(model, device=device, dtype=dtype, threads=threads)
    target = Path(out_dir) / _filename(engine.device.type, engine.device_name, engine.config.name,
                                       engine.dtype_name, quick)
    if target.exists() and not overwrite:
        raise ProfileError(f"{target} exists; pass --force to measure it again, or --out-dir to write elsewhere")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ProfileError(f"out_dir {out_dir} is a file, not a folder")
    spec = ProfileSpec.quick(max_batch_size) if quick else ProfileSpec(batch_sizes=powers_of_two(max_batch_size))
    overrides: dict[str, Any] = {}
    if prompt_tokens:
        overrides["prompt_tokens"] = tuple(prompt_tokens)
    if context_tokens:
        overrides["context_tokens"] = tuple(context_tokens)
    if interleave:
        overrides["interleave"] = True
    if overrides:
        spec = replace(spec, **overrides)
    profile = profile_engine(engine, spec, progress=progress, quick=quick)
    return profile.to_csv(target)

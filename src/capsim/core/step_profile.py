"""Measure continuous-batching engine steps of mixed composition and fit the step-time model to them.

Random workloads (prompt and output lengths, arrival bursts, token budgets and chunk thresholds vary) run
through ``ContinuousEngine``; every step's composition -- prefill tokens and their context, decodes and
their context -- and its measured time become one row, and ``capsim.model.step_model.fit_step_time``
fits ``t = c0 + c1 prefill_tokens + c2 prefill_context + c3 decodes + c4 decode_context`` with its
per-step overhead ``c0`` fitted, not assumed. The first steps of each workload warm up and are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from capsim.core.continuous import ContinuousEngine
from capsim.core.engine import ReferenceEngine
from capsim.model.profile import ServiceTimeProfile
from capsim.model.step_model import StepTimeFit, fit_step_time
from capsim.policy.scheduling import SchedulerLimits, Step


@dataclass(frozen=True)
class StepSample:
    """One measured step: its composition and seconds."""

    prefill_tokens: int
    prefill_context: int
    decodes: int
    decode_context: int
    seconds: float


def measure_steps(engine: ReferenceEngine, *, workloads: int = 6, requests: int = 12, max_prompt: int = 256,
                  max_output: int = 24, seed: int = 0, warmup_steps: int = 2, repeats: int = 3) -> list[StepSample]:
    """Run ``workloads`` random workloads of ``requests`` requests each and time every step.

    Each workload runs ``repeats`` times; the scheduler is deterministic, so the i-th step has the same
    composition every time, and its fastest time is kept: interference from other processes only ever
    adds time. On the CPU with torch on one thread, steps are timed by the thread's CPU time, which a
    busy machine does not inflate; on a GPU, by the wall clock after synchronizing.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rng = np.random.default_rng(seed)
    samples: list[StepSample] = []
    for w in range(workloads):
        budget = int(rng.choice([32, 64, 128, 256, 512]))
        limits = SchedulerLimits(max_num_seqs=int(rng.integers(4, 33)), max_num_batched_tokens=budget,
                                 block_size=16, num_blocks=4096, max_model_len=max_prompt + max_output + 1,
                                 long_prefill_token_threshold=int(rng.choice([0, 0, 64])))
        pending = [(int(rng.integers(1, max_prompt + 1)), int(rng.integers(1, max_output + 1)))
                   for _ in range(requests)]
        bursts = rng.integers(0, 3, size=100 * requests).tolist()  # arrivals before each step
        runs = [_run_workload(engine, limits, pending, bursts, salt=1000 * w) for _ in range(repeats)]
        for i, (plan, _) in enumerate(runs[0]):
            if i < warmup_steps:
                continue
            seconds = min(run[i][1] for run in runs)
            samples.append(StepSample(plan.prefill_tokens, plan.prefill_context, plan.decodes, plan.decode_context,
                                      seconds))
    return samples


def _run_workload(engine: ReferenceEngine, limits: SchedulerLimits, pending: list[tuple[int, int]],
                  bursts: list[int], salt: int) -> list[tuple[Step, float]]:
    """One workload through a fresh engine: each step's plan and seconds."""
    cpu = engine.device.type == "cpu" and torch.get_num_threads() == 1
    ce = ContinuousEngine(engine, limits, cpu_clock=cpu)
    out: list[tuple[Step, float]] = []
    k = b = 0
    while k < len(pending) or ce.has_work:
        # arrivals in bursts, so steps mix prefill chunks with running decodes
        for _ in range(bursts[b % len(bursts)]):
            if k < len(pending):
                p, o = pending[k]
                ce.add(k, engine.request(p, o, salt=salt + k))
                k += 1
        b += 1
        if ce.has_work:
            report = ce.step()
            out.append((report.plan, report.seconds))
    return out


def fit_steps(samples: list[StepSample]) -> StepTimeFit:
    """The step-time model fitted to measured steps."""
    x = np.array([[s.prefill_tokens, s.prefill_context, s.decodes, s.decode_context] for s in samples], float)
    y = np.array([s.seconds for s in samples], float)
    return fit_step_time(x, y)


def with_step_model(profile: ServiceTimeProfile, fit: StepTimeFit) -> ServiceTimeProfile:
    """The profile with the fitted step-time model in its metadata (``step_model``), which the simulator's
    continuous pods then use instead of deriving step times from the static kernels."""
    return ServiceTimeProfile(profile.points, {**profile.metadata, "step_model": fit.to_dict()}, profile.source)


def run_step_profile(profile_path: Path, out_path: Path, *, model: str = "tiny", device: str = "auto",
                     dtype: str = "float32", threads: int | None = None, workloads: int = 6, seed: int = 0,
                     ) -> tuple[Path, StepTimeFit]:
    """Measure steps of ``model`` in continuous mode, fit the step-time model, and write ``profile_path``'s
    profile with it (``step_model`` in its metadata) to ``out_path``."""
    base = ServiceTimeProfile.from_csv(profile_path)
    engine = ReferenceEngine(model, device=device, dtype=dtype, threads=threads)
    fit = fit_steps(measure_steps(engine, workloads=workloads, seed=seed))
    return with_step_model(base, fit).to_csv(out_path), fit

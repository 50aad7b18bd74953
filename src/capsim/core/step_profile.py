"""Measure continuous-batching engine steps of mixed composition and fit the step-time model to them.

Random workloads (prompt and output lengths, arrival bursts, token budgets and chunk thresholds vary) run
through ``ContinuousEngine``; every step's composition -- prefill tokens and their context, decodes and
their context -- and its measured time become one row, and ``capsim.model.step_model.fit_step_time``
fits ``t = c0 + c1 prefill_tokens + c2 prefill_context + c3 decodes + c4 decode_context`` with its
per-step overhead ``c0`` fitted, not assumed. The first steps of each workload warm up and are dropped.

Probe steps (``probe_steps``) pin the overhead: decode-only steps of 1, 2, 4, ... requests and single
prefills, the steps with the fewest tokens. Without them the random workloads' steps, almost all with many
requests, leave ``c0`` to be extrapolated from far away -- and ``ContinuousEngine`` pads a step's rows to its
longest chunk, so a mixed step (one prompt chunk joining ``d`` decodes) costs about ``d x chunk`` padded
tokens, which no sum-of-tokens model fits; least squares then pays for the mixed steps with a negative
decode term and a negative intercept, which non-negative least squares clamps to 0. That was why the
first CPU profile's ``c0`` came out 0 (docs/continuous.md, "Step time").
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


def probe_steps(engine: ReferenceEngine, *, max_decodes: int = 32, contexts: tuple[int, ...] = (8, 128),
                prompts: tuple[int, ...] = (1, 16, 64, 256), repeats: int = 5) -> list[StepSample]:
    """The steps with the fewest tokens, which fix the per-step overhead: decode-only steps of 1, 2, 4, ...
    ``max_decodes`` requests at each prompt length in ``contexts``, and a single prompt's prefill of each
    length in ``prompts``; each timed ``repeats`` times, the fastest kept (as ``measure_steps``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    longest = max(max(contexts), max(prompts)) + 8
    # a budget that prefills every prompt in one step, so that the timed step decodes all of them
    limits = SchedulerLimits(max_num_seqs=max(max_decodes, 1), max_num_batched_tokens=longest * max(max_decodes, 1),
                             block_size=16, num_blocks=16384, max_model_len=longest + 17)
    cpu = engine.device.type == "cpu" and torch.get_num_threads() == 1
    samples: list[StepSample] = []
    sizes = [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256) if d <= max_decodes]
    for ctx in contexts:
        for d in sizes:
            best: tuple[Step, float] | None = None
            for r in range(repeats):
                ce = ContinuousEngine(engine, limits, cpu_clock=cpu)
                for i in range(d):
                    ce.add(i, engine.request(ctx, 8, salt=7919 * r + i))
                while ce.step().plan.prefill_tokens:  # the prompts' prefill, then one decode step to warm up
                    pass
                report = ce.step()
                if best is None or report.seconds < best[1]:
                    best = (report.plan, report.seconds)
            assert best is not None and best[0].decodes == d and best[0].prefill_tokens == 0
            samples.append(_sample(*best))
    for p in prompts:
        times = []
        for r in range(repeats):
            ce = ContinuousEngine(engine, limits, cpu_clock=cpu)
            ce.add(0, engine.request(p, 2, salt=r))
            report = ce.step()
            times.append((report.plan, report.seconds))
        samples.append(_sample(*min(times, key=lambda t: t[1])))
    return samples


def _sample(plan: Step, seconds: float) -> StepSample:
    return StepSample(plan.prefill_tokens, plan.prefill_context, plan.decodes, plan.decode_context, seconds)


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
    """Measure steps of ``model`` in continuous mode (random workloads and the probe steps), fit the
    step-time model, and write ``profile_path``'s
    profile with it (``step_model`` in its metadata) to ``out_path``."""
    base = ServiceTimeProfile.from_csv(profile_path)
    engine = ReferenceEngine(model, device=device, dtype=dtype, threads=threads)
    samples = measure_steps(engine, workloads=workloads, seed=seed) + probe_steps(engine)
    fit = fit_steps(samples)
    return with_step_model(base, fit).to_csv(out_path), fit

"""The step model of ``capsim validate --mode sessions``: measured and calibrated as the continuous
validation does it (its functions, not a copy), over the sessions' prompt lengths.

The measurement runs in a fresh process pinned to the first pod's core, over prompts up to a session's
last prompt (a fit over short prompts extrapolates its prefill-times-context term wildly: 32-token
prompts put a 300-token prefill at 1 s). The calibration runs on a pod of its own with prefix caching
off: its closed loop sends one synthetic prompt over and over, which a caching pod would serve from its
cache. The calibrated model goes to ``profile.csv``; the simulator takes its ``time_scale`` and, where the
calibration has one, its per-arrival time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capsim.model.step_model import StepTimeFit
    from capsim.studies.validate_continuous_cycle import StepCalibration
    from capsim.studies.validate_sessions import SessionsSpec

CALIBRATION_CLIENTS = (2, 4, 8, 16, 64)  # closed-loop clients, a few running to max_num_seqs (the fit needs 5 runs)
CALIBRATION_OUTPUT = 32  # the calibration's answers: a few decodes a request, so steps mix both kinds


@dataclass(frozen=True)
class Calibrated:
    """The calibrated step model (``profile_path``), what the scenario takes from it, and the capacity."""

    profile_path: Path
    time_scale: float
    arrival_overhead_ms: float
    per_pod_turns_per_s: float  # a pod's turns per second at the mean prompt with no prefix hit
    provenance: dict[str, Any] = field(default_factory=dict)
    cycle_noise: tuple[float, ...] = ()  # the single steps' spread around the fit (service.cycle_noise)
    answer_ms: float = 0.0  # from the last token to the answer at the client (service.answer_ms)
    fit: StepTimeFit | None = None  # the measured step model, for the fleet probe's speed
    cal: StepCalibration | None = None  # the calibration, idem
    cached_token_us: float = 0.0  # a prefix hit's KV copy per cached token (service.cached_token_us)
    # the calibration's open-loop requests' way in (send to the pod's receipt): its mean, ms, and each one's
    # over it (service.ingress_ms and ingress_noise; since stop 30, before which the calibration's simulated
    # TTFT had no way in and its answer_ms held it)
    ingress_ms: float = 0.0
    ingress_noise: tuple[float, ...] = ()


def measure_hit_copy_us(model: str, threads: int, limits: dict[str, int], prompt: int, core: int | None,
                        repeats: int = 15) -> float:
    """Microseconds per cached token that the real engine spends copying a prefix hit's KV into the request's
    own cache (``StepReport.hit_copy_s``), which the step model (measured without prefix caching) does
    not have: the same ``prompt``-token prompt generated again hits its cached blocks, and each hit's copy is
    timed; the median over ``repeats`` hits. In this process, pinned to ``core`` (the pods' core) with
    ``threads`` torch threads, both restored after."""
    import statistics

    import numpy as np
    import torch

    from capsim.core.continuous import ContinuousEngine
    from capsim.core.engine import GenerationRequest, ReferenceEngine
    from capsim.policy.sched_types import SchedulerLimits

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    torch_threads = torch.get_num_threads()
    try:
        if core is not None and affinity is not None:
            os.sched_setaffinity(0, {core})
        ref = ReferenceEngine(model, device="cpu", threads=threads)
        eng = ContinuousEngine(ref, SchedulerLimits(limits["max_num_seqs"], limits["max_num_batched_tokens"],
                                                    limits["block_size"], limits["num_blocks"], limits["max_model_len"],
                                                    enable_prefix_caching=True))
        per_token: list[float] = []
        ids = np.random.default_rng(0).integers(0, ref.config.vocab_size, prompt).tolist()
        for k in range(repeats + 1):  # the first run fills the cache; each later one hits it
            if eng.add(k, GenerationRequest(tuple(ids), 1)) is not None:
                raise ValueError(f"a {prompt}-token prompt does not fit the engine's limits {limits}")
            while eng.has_work:
                rep = eng.step()
                hit = sum(rep.plan.cached.values())
                if hit:
                    per_token.append(rep.hit_copy_s / hit)
            eng.results.pop(k, None)
            eng.cached_tokens.pop(k, None)
    finally:
        torch.set_num_threads(torch_threads)
        if core is not None and affinity is not None:
            os.sched_setaffinity(0, affinity)
    return statistics.median(per_token) * 1e6 if per_token else 0.0


def calibrate(spec: SessionsSpec, work: Path, out: Path, cores: Sequence[int], pod_core: int | None,
              echo: Callable[[str], None]) -> Calibrated:
    """Measure the step model, calibrate it on a pod without prefix caching, write ``out / profile.csv``."""
    from capsim.model.profile import ServiceTimeProfile
    from capsim.model.step_model import StepTimeFit
    from capsim.studies import validate_continuous_calibrate as vcc
    from capsim.studies.pods import PodProcess
    from capsim.studies.validate_continuous import START_S, answer_ms

    prompt, output = spec.long_prompt_tokens, CALIBRATION_OUTPUT
    echo(f"measuring {spec.model}'s continuous steps on core {pod_core} (prompts up to {prompt} tokens) ...")
    measured = ServiceTimeProfile.from_csv(vcc.measure_step_fit(
        work / "steps.csv", pod_core, model=spec.model, threads=spec.threads, workloads=spec.step_workloads,
        max_num_seqs=spec.max_num_seqs, prompt=prompt, output=output, seed=spec.seed))
    fit = StepTimeFit.from_dict(measured.metadata["step_model"])
    limits = {**spec.limits(), "max_model_len": max(spec.max_model_len, prompt + output + 1)}
    pod = PodProcess(work, "calibration", core=pod_core, torch_threads=spec.threads, model=spec.model,
                     batch_mode="continuous", queue_capacity=4096, max_prompt_tokens=prompt,
                     trace_steps=vcc.VALIDATION_TRACE_STEPS, **limits)
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[1]})  # the calibration's clients off the pod's core, as in continuous
    try:
        pod.start(wait_ready=False).wait_ready(timeout_s=START_S)
        levels = tuple(sorted({*spec.calibration_levels, spec.level}))
        cal, steps, splits = vcc.calibrate_steps(pod.url, fit, clients=CALIBRATION_CLIENTS, levels=levels,
                                                 seconds=spec.calibration_s, max_num_seqs=spec.max_num_seqs,
                                                 prompt=prompt, output=output, echo=echo,
                                                 open_loop_fit=spec.open_loop_fit, prefill_scale=spec.prefill_scale)
    finally:
        pod.stop()
        if len(cores) > 1:
            os.sched_setaffinity(0, set(cores))
    steps.to_csv(out / "calibration_steps.csv", index=False)
    echo(f"calibration: {cal.describe()}")
    for warning in cal.warnings:
        echo(f"WARNING: step calibration: {warning}")
    profile_path = out / "profile.csv"
    ServiceTimeProfile(measured.points, {**measured.metadata, "step_model": vcc.calibrated_fit(fit, cal).to_dict()},
                       measured.source).to_csv(profile_path)
    per_pod = vcc.capacity_per_s(fit, cal, spec.max_num_seqs, round(spec.mean_prompt_tokens), spec.output_tokens)
    copy_us = measure_hit_copy_us(spec.model, spec.threads, spec.limits(), prompt, pod_core)
    echo(f"a prefix hit's KV copy: {copy_us:.2f} us per cached token (StepReport.hit_copy_s, on core {pod_core})")
    return Calibrated(profile_path, cal.time_scale, cal.arrival_s * 1e3, per_pod,
                      {"step_fit": fit.to_dict(), "calibration": asdict(cal),
                       "calibration_lengths": {"prompt": prompt, "output": output,
                                               "clients": list(CALIBRATION_CLIENTS)}},
                      cal.cycle_noise, answer_ms(splits), fit, cal, copy_us, *cal.ingress(vcc.open_run_label(spec.level)))

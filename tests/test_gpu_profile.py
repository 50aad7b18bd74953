"""The GPU profile measured on a lent H200 (stop 47, docs/profiles.md): what it is, and that both of the
simulator's modes read it as the measurement it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from capsim.model.profile import ServiceTimeProfile
from capsim.model.roofline import is_estimate
from capsim.model.scenario import Scenario
from capsim.model.step_model import StepTimeFit
from capsim.sim.simulate import simulate

PROFILES = Path(__file__).resolve().parent.parent / "data" / "profiles"
H200 = PROFILES / "nvidia-h200-gpt2-small-bfloat16.csv"
H200_STEPS = PROFILES / "nvidia-h200-gpt2-small-bfloat16-steps.csv"
H200_ROOFLINE = PROFILES / "roofline-h200-gpt2-small-bfloat16.csv"


def test_the_h200_profile_is_a_measurement_of_gpt2_small_on_the_gpu() -> None:
    p = ServiceTimeProfile.from_csv(H200)
    meta = p.metadata
    assert not is_estimate(p)
    assert (meta["device"], meta["device_name"], meta["dtype"], meta["timer"]) == \
        ("cuda", "NVIDIA H200", "bfloat16", "cuda_events")
    assert meta["model"]["name"] == "gpt2-small" and meta["quick"] is False
    assert p.batch_sizes("decode") == p.batch_sizes("prefill") == (1, 2, 4, 8, 16, 32, 64)
    # its steps' twin holds the same points, with the continuous engine's step model added
    steps = ServiceTimeProfile.from_csv(H200_STEPS)
    assert steps.points == p.points and "step_model" not in meta
    fit = StepTimeFit.from_dict(steps.metadata["step_model"])
    assert all(c >= 0 for c in fit.coefficients) and fit.coefficients[0] > 2 * fit.c0_stderr_s


def test_its_steps_are_launch_bound_and_slower_than_the_default_roofline_everywhere() -> None:
    p, est = ServiceTimeProfile.from_csv(H200), ServiceTimeProfile.from_csv(H200_ROOFLINE)
    assert is_estimate(est)
    small = [pt.mean_ms for pt in p.points if pt.phase == "decode" or pt.batch_size * pt.tokens <= 8192]
    assert min(small) > 3.0 and max(small) < 10.0  # the launches, whatever the batch or context (docs/profiles.md)
    assert p.phase_ms("prefill", 64, 1024)[0] > 4 * p.phase_ms("prefill", 8, 1024)[0]  # only big prefills grow
    ratios = np.array([pt.mean_ms / est.phase_ms(pt.phase, pt.batch_size, pt.tokens)[0] for pt in p.points])
    assert ratios.min() > 1.0 and np.median(ratios) > 3.0


def _lone_requests(profile: Path, mode: str) -> Scenario:
    batching = ({"mode": "continuous", "num_blocks": 1000, "max_num_seqs": 16, "max_num_batched_tokens": 512}
                if mode == "continuous" else {"max_batch_size": 16, "max_wait_ms": 0})
    return Scenario.model_validate({
        "horizon_s": 2000,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 0.01},
                     "prompt_tokens": {"kind": "constant", "value": 100},
                     "output_tokens": {"kind": "constant", "value": 10}},
        "service": {"kind": "profile", "profile": str(profile), "noise": False},
        "batching": batching,
        "pods": {"replicas": 1},
        "client": {"timeout_s": 30, "max_retries": 0},
    })


def test_continuous_pods_step_at_the_h200_fit() -> None:
    fit = StepTimeFit.from_dict(ServiceTimeProfile.from_csv(H200_STEPS).metadata["step_model"])
    r = simulate(_lone_requests(H200_STEPS, "continuous"), 3)
    lone = r.requests[r.requests["outcome"] == "ok"]
    assert len(lone) > 5
    # alone on the pod, each decode step is one decode at a context of 100 to 109 tokens
    expected = [fit.predict(0, 0, 1, c) for c in (100, 109)]
    assert min(expected) - 1e-9 <= r.summary.itl_p50_s <= max(expected) + 1e-9
    assert r.summary.itl_p50_s > 0.004  # the H200's launches, not the tiny CPU model's 0.4 ms steps


def test_static_pods_take_the_h200_kernels() -> None:
    p = ServiceTimeProfile.from_csv(H200)
    r = simulate(_lone_requests(H200, "static"), 3)
    lone = r.requests[r.requests["outcome"] == "ok"]
    assert len(lone) > 5
    prefill_s = p.phase_ms("prefill", 1, 100)[0] / 1e3
    ttft = (lone["first_token_s"] - lone["arrival_s"]).to_numpy()
    assert ttft.min() >= prefill_s - 1e-9 and np.median(ttft) == pytest.approx(prefill_s, rel=0.25)

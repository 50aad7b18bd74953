"""Sim-versus-real validation in continuous-batching mode: the real pod (``CAPSIM_BATCH_MODE=continuous``)
against the simulator's continuous pods, with the static validation's method (docs/validation.md).

The step-time model is measured first (``capsim.core.step_profile``: the validation's own lengths and the
probe steps, in a fresh process pinned like the pod), then calibrated under load over the pod's step trace
(``capsim.studies.validate_continuous_calibrate``: closed-loop runs from 2 to ``max_num_seqs`` running,
open-loop runs at the levels' rates; ``cycle = time_scale x model + extra + arrivals x arrival_s +
tokens x token_s``, the extra into ``c0``, the per-token time into ``c3``, the per-arrival time into
``service.arrival_overhead_ms``). Each
load level (a share of the calibrated capacity) runs ``replications`` times with different seeds; the same
Poisson schedule goes to the real pod and to the simulator. One more level runs on a pod whose KV cache is
too small for ``max_num_seqs`` requests, so that requests are preempted; preemptions are counted in both
(the pod's ``vllm:num_preemptions_total``, the simulator's summary). Errors carry the block-bootstrap
intervals of ``capsim.studies.validate_stats``; the inter-token latency is a request's
``(end - first token) / (tokens - 1)``, computed the same way from both frames.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import capsim
from capsim.model.profile import ServiceTimeProfile
from capsim.model.scenario import Scenario
from capsim.model.step_model import StepTimeFit
from capsim.studies import validate_stats as vs
from capsim.studies.pods import PodProcess, metric_totals, scratch_dir
from capsim.studies.validate import summarize_frame
from capsim.studies.validate_continuous_calibrate import (
    BASE_PROFILE,
    VALIDATION_TRACE_STEPS,
    StepCalibration,
    calibrate_steps,
    calibrated_fit,
    closed_loop_step_s,
    cycle_parts,
    measure_step_fit,
    term_ablation,
)
from capsim.studies.validate_continuous_calibrate import capacity_per_s as _capacity
from capsim.studies.validate_continuous_cycle import NOISE_BLOCK_STEPS, open_run_label
from capsim.studies.validate_runs import (
    TTFT_FROM_RECEIPT,
    TTFT_FROM_SEND,
    note_observed_speed,
    observed_speed,
    run_caveats,
    write_service_fragment,
)

__all__ = ["BASE_PROFILE", "ContinuousSpec", "StepCalibration", "calibrated_fit", "capacity_per_s",
           "closed_loop_step_s", "continuous_service", "format_results", "itl_frame", "level_batching",
           "level_scenario", "own_ingress", "run_continuous_validation", "sim_token_span",
           "write_continuous_service"]

METRICS: tuple[str, ...] = ("ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s",
                            "throughput_per_s", "itl_p50_s", "itl_p99_s")
TARGETS: dict[str, float] = {"p50": 0.10, "p95": 0.15, "p99": 0.15, "throughput_per_s": 0.03}
#: the metrics with a target (the issue: TTFT and end to end p50/p95/p99, throughput, ITL p50): 8 a level
TARGET_METRICS: tuple[str, ...] = tuple(m for m in METRICS if m != "itl_p99_s")
START_S = 180.0  # a pod's start on a busy machine (torch's import alone can take tens of seconds)


@dataclass(frozen=True)
class ContinuousSpec:
    """The workload, the engine limits, the levels and the run lengths (defaults: about 6 minutes)."""

    levels: tuple[float, ...] = (0.3, 0.6, 0.85)
    # of the full-cache capacity, on the pod whose cache holds half of max_num_seqs requests: about 90% of
    # what that pod serves, so that more than the cache holds often run and are preempted
    preemption_level: float = 0.5
    replications: int = 3
    seconds_per_run: float = 20.0
    prompt_tokens: int = 32
    output_tokens: int = 32
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_blocks: int = 1024
    small_cache_share: float = 0.5  # the small cache holds this share of max_num_seqs full requests
    warmup_fraction: float = 0.1
    seed: int = 0
    model: str = "tiny"
    threads: int = 1
    calibration_s: float = 3.0  # per calibration run
    # closed-loop clients: a client waits a round trip between requests, and the pod's HTTP work shares
    # its core, so 16 clients kept only about 5 requests running; 64 keep max_num_seqs running
    calibration_clients: tuple[int, ...] = (2, 4, 8, 16, 24, 64)
    step_workloads: int = 3
    # the simulated steps drawn around the fit with the calibration's measured spread (service.cycle_noise);
    # False: every simulated step takes the fitted time (the validation before stop 20)
    cycle_noise: bool = True
    # the calibration scales the step model's prefill terms so that the steps with a prefill chunk are met as
    # the decode steps are (StepCalibration.prefill_scale); False: the model as the lone process measured it
    prefill_scale: bool = True
    # steps in a row the simulator walks the measured sequence (service.cycle_noise_block_steps); 1: each
    # step's factor at random
    noise_block_steps: int = NOISE_BLOCK_STEPS
    # each run simulated a second time at the pod's own speed in that run (the calibrated model times the
    # run's measured cycle over it): the simulator's queueing checked apart from the machine's drift
    run_speed: bool = True
    # seconds of two probes just before each run, whose steps give the pod's speed then (their cycle over the
    # calibrated model): a closed loop of ``calibration_clients``' most (``probe speed``) and Poisson arrivals
    # at the level's rate with a seed of their own (``level probe speed``); each run is also simulated at
    # each, a prediction that follows the machine's drift from run to run without using the run itself;
    # 0: no probes
    probe_s: float = 2.0
    # each run simulated a third time replaying the pod's speed step by step in that run (its own steps'
    # cycle over the calibrated model, in order, walked from the first step): the run's slow spells too
    run_replay: bool = True
    # the simulated requests' answers reach the client service.answer_ms after their last token, measured in
    # the calibration's open-loop runs; False: at the last token (the validation before stop 20)
    answer_time: bool = True
    # the real TTFT counts from the send (the load generator on the pod's clock, ``run_load(pod_clock=True)``)
    # and the simulated requests reach the engine the measured way in after their send (``service.ingress_ms``
    # and ``ingress_noise``: the level's open-loop calibration run for the prediction, the run's own requests
    # at the run's speed), as a client counts it; False: both from the pod's receipt (before stop 30)
    ttft_from_send: bool = True
    # the simulated requests' way to the engine includes the pod's history read after its receipt (the
    # answers' ``history.load_s``; since stop 32: at 60 requests/s a mean of 0.65 ms, p90 1.6 ms, which the
    # simulated TTFT lacked); False: the way in alone (before stop 32)
    history_read: bool = True
    # each run's real requests, the pod's step trace and every simulation's requests go to ``runs/`` under
    # the out-dir as compressed CSV (``{cache}-{level}-seed{seed}-{what}.csv.gz``), so a miss can be followed
    # to the requests and steps that made it; False: not written
    keep_runs: bool = True
    # the calibration's cycle fitted through its open-loop runs alone (since stop 39; the closed loops are
    # weighed against it in the provenance), as the levels are open loops: their arrivals cost more (0.40 to
    # 0.42 ms within the open runs against 0.29 to 0.31 within the closed ones in stop 39's three runs) and
    # a fit through all runs left the levels 3 to 7% slower than it at 60 and 85%; False: all runs (before)
    open_loop_fit: bool = True

    @classmethod
    def quick(cls) -> ContinuousSpec:
        return cls(levels=(0.3, 0.85), replications=2, seconds_per_run=6.0, calibration_s=1.5, step_workloads=1)

    @property
    def calibration_levels(self) -> tuple[float, ...]:
        """The open-loop calibration runs' shares of the capacity: the levels and half of it (as the static
        validation's open-loop probe), so the arrivals per step span what the levels see."""
        return tuple(sorted({*self.levels, 0.5}))

    @property
    def small_cache_blocks(self) -> int:
        per_request = -(-(self.prompt_tokens + self.output_tokens) // self.block_size)
        return max(int(self.max_num_seqs * per_request * self.small_cache_share), per_request)

    def limits(self, num_blocks: int) -> dict[str, int]:
        return {"max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                "block_size": self.block_size, "num_blocks": num_blocks,
                "max_model_len": self.prompt_tokens + self.output_tokens + 1}


def capacity_per_s(fit: StepTimeFit, cal: StepCalibration, spec: ContinuousSpec) -> float:
    """Requests per second with ``max_num_seqs`` always running on the calibrated pod."""
    return _capacity(fit, cal, spec.max_num_seqs, spec.prompt_tokens, spec.output_tokens)


def _pod_counters(url: str) -> dict[str, float]:
    """The vLLM counters this validation reads from the pod's /metrics (summed over labels)."""
    return metric_totals(url, ("vllm:num_preemptions_total",))


#: a run's mean way in past this many times the calibration's (and 1 ms) is warned: the way in queued (stop
#: 30: 25 ms to 11 s at 60% and 85% of the calibrated capacity, against 3 to 10 ms; stop 31 found that queue
#: in the load generator, whose one connection pool had saturated its core: loadgen.ConnectionPools)
FRONT_END_QUEUE = 5.0

#: seconds the load generator waits for answers after a run's last send, and the simulator runs on after
#: its horizon (``Scenario.drain_s``): both count the requests sent before the horizon that finish by then
DRAIN_S = 30.0


def continuous_service(profile_path: Path, time_scale: float, arrival_overhead_ms: float = 0.0,
                       cycle_noise: tuple[float, ...] = (), answer_ms: float = 0.0, noise_block_steps: int = 1,
                       ingress_ms: float = 0.0, ingress_noise: tuple[float, ...] = (),
                       cached_token_us: float = 0.0) -> dict[str, Any]:
    """A scenario's ``service`` section for a calibrated continuous pod: its step profile and every term the
    calibration measured (the levels', the sessions validation's and ``service.yaml``'s)."""
    return {"kind": "profile", "profile": str(profile_path), "time_scale": time_scale,
            "arrival_overhead_ms": arrival_overhead_ms, "cycle_noise": list(cycle_noise) or None,
            "cycle_noise_block_steps": noise_block_steps, "answer_ms": answer_ms, "ingress_ms": ingress_ms,
            "ingress_noise": list(ingress_noise) or None, "cached_token_us": cached_token_us}


def level_batching(spec: ContinuousSpec, num_blocks: int) -> dict[str, Any]:
    """The ``batching`` section of the validation's pod (the engine limits it runs with)."""
    return {"mode": "continuous", "queue_capacity": 4096, **spec.limits(num_blocks)}


def level_scenario(spec: ContinuousSpec, profile_path: Path, rate: float, time_scale: float,
                   num_blocks: int, arrival_overhead_ms: float = 0.0,
                   cycle_noise: tuple[float, ...] = (), answer_ms: float = 0.0,
                   noise_block_steps: int = 1, ingress_ms: float = 0.0,
                   ingress_noise: tuple[float, ...] = ()) -> Scenario:
    """The simulator's view of one run: one always-ready continuous pod, the same engine limits, the pod's
    time per arrival on the step in progress, each step's spread around the fit (``cycle_noise``), the time
    from a request's send to the engine (``ingress_ms``, each request's drawn from ``ingress_noise``), and
    from its last token to its answer at the client (``answer_ms``)."""
    horizon = spec.seconds_per_run
    return Scenario.model_validate({
        "horizon_s": horizon,
        "warmup_s": horizon * spec.warmup_fraction,
        "drain_s": DRAIN_S,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": rate},
                     "prompt_tokens": {"kind": "constant", "value": spec.prompt_tokens},
                     "output_tokens": {"kind": "constant", "value": spec.output_tokens}},
        "service": continuous_service(profile_path, time_scale, arrival_overhead_ms, cycle_noise, answer_ms,
                                      noise_block_steps, ingress_ms, ingress_noise),
        "batching": level_batching(spec, num_blocks),
        "pods": {"replicas": 1, "startup_s": 0},
        "router": {"kind": "random"},
        "client": {"timeout_s": 600, "max_retries": 0},
    })


def write_continuous_service(out: Path, spec: ContinuousSpec, profile_path: Path, cal: StepCalibration,
                             answer: float) -> Path:
    """``out/service.yaml``: the calibrated continuous pod as a scenario fragment, its step spread and its
    way to the engine pooled over all the calibration's open-loop runs (the levels each take their own
    rate's run), and the engine limits of the full-cache pod (:func:`~capsim.studies.validate_runs.fragment_batching`)."""
    noise = cal.cycle_noise if spec.cycle_noise else ()
    ingress = cal.ingress() if spec.ttft_from_send else (0.0, ())
    return write_service_fragment(
        out, f"continuous, {spec.model} model, {spec.threads} torch thread(s), prompt {spec.prompt_tokens}, "
        f"output {spec.output_tokens} tokens",
        continuous_service(profile_path, cal.time_scale, cal.arrival_s * 1e3, noise, answer, spec.noise_block_steps,
                           *ingress), level_batching(spec, spec.num_blocks))


def itl_frame(df: Any, token_span_s: Any = None) -> Any:
    """The frame with each request's inter-token latency in place of its TTFT (``first_token_s`` moved to
    ``arrival_s + itl``), so that ``validate_stats`` cuts and resamples it as it does TTFT.

    The ITL is ``(first to last token) / (tokens - 1)``; the span is ``end - first token`` unless
    ``token_span_s`` (one per row) gives it. A real pod's frame needs it: its ``first_token_s`` is the pod's
    own (sent + the answer's ``ttft_s``), its ``end_s`` the client's receipt of the answer, so ``end -
    first token`` also holds the answer's way out (the store write, the response) and the request's way in
    (HTTP before the pod's clock starts): about 11 ms a request on the shared machine (10-20 requests/s,
    load 6.5), +25 to +40% on every ITL, none of which a simulated step has. The pod's own span (the
    answer's ``model_s`` less its first token) is the engine's token gaps, which the simulator's steps are.
    """
    out = df.copy()
    span = df.end_s - df.first_token_s if token_span_s is None else np.asarray(token_span_s, dtype=float)
    out["first_token_s"] = out.arrival_s + span / np.maximum(df.output_tokens - 1, 1)
    return out


def pod_token_span(real_df: Any) -> Any:
    """The pod's own first-to-last-token span per request, when the load generator kept it
    (``frame.attrs["token_span_s"]``); else ``None`` (the ITL then spans to the answer's receipt)."""
    span = real_df.attrs.get("token_span_s")
    return None if span is None or len(span) != len(real_df) else np.asarray(span, dtype=float)


def sim_token_span(requests: Any, answer_ms: float) -> Any:
    """The simulated requests' first-to-last-token span: their ``end_s`` is the answer at the client,
    ``service.answer_ms`` past the last token (the way out and the pod's answer path, which no step holds).
    Until stop 36 the validation took ``end - first token`` and so gave every simulated ITL
    ``answer_ms / (tokens - 1)`` too: +0.077 ms on a 0.83 ms ITL at 30% (2.38 ms over 31 gaps), most of the
    +9 to +12% its ITL p50 missed by at 30% in every run of 2026-12-02."""
    return (requests.end_s - requests.first_token_s).to_numpy(dtype=float) - answer_ms / 1e3


@dataclass
class _Pool:
    real: list[vs.Blocks]
    sim: list[vs.Blocks]
    real_itl: list[vs.Blocks]
    sim_itl: list[vs.Blocks]
    preemptions: list[tuple[float, float]]
    requests: int = 0
    # end to end on the pod's clock (to its last token, not the client's receipt); empty: not measured
    real_pod_e2e: list[vs.Blocks] = field(default_factory=list)
    sim_pod_e2e: list[vs.Blocks] = field(default_factory=list)
    # the pod's own steps during the runs against the calibrated model: (summed cycle s, summed fit s, steps)
    cycles: list[tuple[float, float, int]] = field(default_factory=list)
    # runs whose real TTFT counts from the pod's receipt though the spec wanted the send (loadgen.off_pod_clock)
    off_clock: list[str] = field(default_factory=list)
    # per run, the real requests' mean way to the engine (the way in, and the history read with
    # ``history_read``) and the one simulated (s); empty: not measured
    way_in: list[tuple[float, float]] = field(default_factory=list)
    # runs whose mean way in was FRONT_END_QUEUE times the calibration's or more: the way in queued
    front_end: list[str] = field(default_factory=list)
    # runs whose load generator was short of CPU (loadgen.generator_saturated)
    generator: list[str] = field(default_factory=list)
    # runs whose step trace lacked its first steps (fetch_steps' ``truncated``): not replayed
    trace_short: list[str] = field(default_factory=list)


#: end to end to the last token on the pod, like the simulator's: the E2E less the answer's way out
POD_E2E_METRICS: tuple[str, ...] = ("pod_e2e_p50_s", "pod_e2e_p99_s")


def pod_e2e_frame(df: Any, token_span_s: Any) -> Any:
    """The real frame with ``end_s`` at the pod's last token (its first token plus the pod's own span):
    the end to end the simulator's frame has, without the answer's way out to the client."""
    out = df.copy()
    out["end_s"] = df.first_token_s + np.asarray(token_span_s, dtype=float)
    return out


def level_cycles(steps: Any, fit: StepTimeFit, cal: StepCalibration) -> tuple[float, float, int]:
    """The pod's steps during a level's run against what the calibrated model gives each of them (its
    composition and arrivals): the summed cycle, the summed fit, the steps. The simulator's step model is
    only as good as this ratio is near 1 *during the runs*, not only during the calibration."""
    from capsim.studies.validate_continuous_calibrate import cycles

    if len(steps) < 2:
        return 0.0, 0.0, 0
    frame = cycles(steps, cal.model(fit))
    fitted = cal.step_s(frame.model_s, frame.arrivals)
    return float(frame.cycle_s.sum()), float(fitted.sum()), len(frame)


def answer_ms(splits: dict[str, dict[str, float]], way_in_apart: bool = True) -> float:
    """From a request's last token to its answer at the client, ms: the median over the open-loop
    calibration runs of each run's median way out plus the pod's answer path (``request_split``). The
    client's round trip less the pod's own time is the way in and out; where the way in was measured apart
    (``way_out_s``) and ``way_in_apart`` (the simulator gives the way in as ``service.ingress_ms``, the real
    TTFT counts from the send) only the way out lands here; else all of it (the real TTFT then counts from
    the pod's receipt, and the way in lands on the end to end alone)."""
    parts = [(sp["way_out_s"] if way_in_apart and "way_out_s" in sp else sp["way_in_and_out_s"])
             + sp["answer_path_s"] for sp in splits.values() if sp]
    return float(np.median(parts)) * 1e3 if parts else 0.0


def own_ingress(real_df: Any, history_read: bool = True) -> tuple[float, tuple[float, ...]]:
    """A real run's own way to the engine, as :meth:`StepCalibration.ingress` gives the calibration's
    (``ingress_from``): its requests' send to the pod's receipt (``frame.attrs["way_in_s"]`` of
    ``run_load(pod_clock=True)``) plus, with ``history_read`` and where the frame has it, the pod's history
    read (``["load_s"]``), in send order; ``(0.0, ())`` when not measured one per row."""
    from capsim.studies.validate_continuous_cycle import ingress_from

    way_in = real_df.attrs.get("way_in_s", [])
    if len(way_in) != len(real_df):
        return 0.0, ()
    load = real_df.attrs.get("load_s", []) if history_read else []
    return ingress_from(way_in, real_df.arrival_s.to_numpy(dtype=float),
                        load if len(load) == len(real_df) else None)


def _simulate_into(pool: _Pool, scenario: Scenario, seed: int, real_pre: float, n_requests: int, answer: float,
                   pod_e2e: bool) -> Any:
    """Simulate one run of the level and add its cut frames to ``pool``'s simulated side; the result."""
    from capsim.sim.simulate import simulate

    sim = simulate(scenario, seed=seed)
    w, end = scenario.warmup_s, scenario.horizon_s
    pool.sim.append(vs.cut_blocks(sim.requests, w, end))
    pool.sim_itl.append(vs.cut_blocks(itl_frame(sim.requests, sim_token_span(sim.requests, answer)), w, end))
    if pod_e2e:
        pool.sim_pod_e2e.append(vs.cut_blocks(sim.requests.assign(end_s=sim.requests.end_s - answer / 1e3), w, end))
    pool.preemptions.append((real_pre, float(sim.summary.preemptions)))
    pool.requests += n_requests
    return sim


#: the simulations of each run beside the calibration's prediction (``sim_at``): at the pod's speed in two
#: short probes just before the run (predictions too: a closed loop at full load, and the level's own rate),
#: at the pod's mean speed in that run, and replaying its speed spell by spell (the run's own steps' cycle
#: over the model in windows, walked from its first step)
PROBE_SPEED, LEVEL_PROBE_SPEED = "probe speed", "level probe speed"
RUN_SPEED, RUN_REPLAY = "run speed", "run replay"


def probe_speed(url: str, spec: ContinuousSpec, fit: StepTimeFit, cal: StepCalibration,
                rate: float | None = None, seed: int = 0) -> float | None:
    """The pod's speed now: its steps' cycle over the calibrated model in ``spec.probe_s`` seconds of the
    calibration's largest closed loop, over that closed loop's own in the calibration (since stop 39: a
    closed loop need not sit on a fit through the open-loop runs, so the probe measures how far the pod has
    drifted since), or with ``rate`` of Poisson arrivals at that rate (``seed``); ``None`` without steps."""
    from capsim.studies.validate_continuous_calibrate import drive_closed, drive_open, fetch_steps

    base = 1.0
    if rate is None:
        clients = max(spec.calibration_clients)
        t0, t1 = drive_closed(url, clients, spec.probe_s, spec.prompt_tokens, spec.output_tokens)
        base = cal.run_ratio(f"closed {clients}")
    else:
        t0, t1, _ = drive_open(url, rate, spec.probe_s, spec.prompt_tokens, spec.output_tokens, seed=seed)
    cyc, fitted, _ = level_cycles(fetch_steps(url, t0, t1), fit, cal)
    return cyc / fitted / base if fitted > 0 else None


def _run_level(pod: PodProcess, spec: ContinuousSpec, profile_path: Path, rate: float, cal: StepCalibration,
               num_blocks: int, echo: Callable[[str], None], fit: StepTimeFit | None = None,
               answer: float = 0.0, ingress: tuple[float, tuple[float, ...]] = (0.0, ()),
               keep: Callable[[int, str, Any], None] | None = None) -> tuple[_Pool, dict[str, _Pool]]:
    """The level's runs, real and simulated at the calibration's speed; with the step fit, also each run
    simulated at the pod's speed in two probes just before it (``spec.probe_s``), at its measured mean speed in
    that run (``spec.run_speed``) and replaying that run's step-by-step speed (``spec.run_replay``), each in
    a pool of its own sharing the real frames. ``ingress``: the simulated way in, ``(ms, factors)``, of the
    prediction and the probes' simulations; those at the run's speed take the run's own (``own_ingress``).
    ``keep(seed, what, frame)``, if given, receives each run's real requests (``real``), the pod's steps
    (``steps``) and each simulation's requests (``sim-calibration``, ``sim-run-speed``, ...)."""
    from capsim.core.loadgen import ClientPolicy, run_load
    from capsim.sim.arrivals import make_workload
    from capsim.sim.streams import Streams
    from capsim.studies.validate_continuous_calibrate import fetch_steps
    from capsim.studies.validate_continuous_cycle import replay_noise

    pool = _Pool([], [], [], [], [])
    wanted = [name for name, on in ((PROBE_SPEED, spec.probe_s > 0), (LEVEL_PROBE_SPEED, spec.probe_s > 0),
                                    (RUN_SPEED, spec.run_speed), (RUN_REPLAY, spec.run_replay)) if on]
    extra = {name: _Pool(pool.real, [], pool.real_itl, [], [], real_pod_e2e=pool.real_pod_e2e)
             for name in (wanted if fit is not None else [])}
    noise = cal.cycle_noise if spec.cycle_noise else ()
    for rep in range(spec.replications):
        seed = spec.seed + rep
        scenario = level_scenario(spec, profile_path, rate, cal.time_scale, num_blocks, cal.arrival_s * 1e3,
                                  noise, answer, spec.noise_block_steps, *ingress)
        workload = make_workload(scenario, Streams(seed))
        probed = probe_speed(pod.url, spec, fit, cal) if fit is not None and PROBE_SPEED in extra else None
        # the level's rate, a seed no run uses (the runs' are spec.seed + replication)
        level_probed = probe_speed(pod.url, spec, fit, cal, rate, seed=spec.seed + 1000 + rep) \
            if fit is not None and LEVEL_PROBE_SPEED in extra else None
        before = _pod_counters(pod.url)
        t0 = time.perf_counter()
        real_df = asyncio.run(run_load([pod.url], workload, client=ClientPolicy(timeout_s=60, max_retries=0),
                                       max_duration_s=scenario.horizon_s + DRAIN_S, seed=seed,
                                       pod_clock=spec.ttft_from_send))
        t1 = time.perf_counter()
        off, busy = run_caveats(real_df, f"{rate:.1f} requests/s, seed {seed}", echo, pod_clock=spec.ttft_from_send)
        if off is not None:
            pool.off_clock.append(off)
        if busy is not None:
            pool.generator.append(busy)
        own = own_ingress(real_df, spec.history_read) if spec.ttft_from_send else (0.0, ())
        if own[1]:
            pool.way_in.append((own[0] / 1e3, ingress[0] / 1e3))
            if own[0] > FRONT_END_QUEUE * max(ingress[0], 1.0):
                pool.front_end.append(f"{rate:.1f} requests/s, seed {seed}: the requests' mean way to the engine was "
                                      f"{own[0]:.0f} ms against the calibration's {ingress[0]:.1f} ms")
                echo(f"  WARNING: {pool.front_end[-1]}: the way in queued, in the load generator (when it was "
                     "short of CPU, warned above) or the pod's front end (its HTTP loop shares the engine's core); "
                     "the simulator has no such queue, docs/continuous.md)")
        real_pre = _pod_counters(pod.url)["vllm:num_preemptions_total"] - before["vllm:num_preemptions_total"]
        steps = fetch_steps(pod.url, t0, t1) if fit is not None else None
        short = steps is not None and bool(steps.attrs.get("truncated"))
        if short and steps is not None:
            pool.trace_short.append(f"{rate:.1f} requests/s, seed {seed}")
            echo(f"  WARNING: the pod's step trace lacks this run's first steps (more than its CAPSIM_TRACE_STEPS "
                 f"ran): its speed is that of the {len(steps)} steps it kept, and the run is not replayed")
        if fit is not None:
            pool.cycles.append(level_cycles(steps, fit, cal))
        w, end = scenario.warmup_s, scenario.horizon_s
        pool.real.append(vs.cut_blocks(real_df, w, end))
        span = pod_token_span(real_df)
        pool.real_itl.append(vs.cut_blocks(itl_frame(real_df, span), w, end))
        if span is not None:
            pool.real_pod_e2e.append(vs.cut_blocks(pod_e2e_frame(real_df, span), w, end))
        sim = _simulate_into(pool, scenario, seed, real_pre, workload.n_requests, answer, span is not None)
        if keep is not None:
            # with each request's way in and history read (the load generator's attrs), as own_ingress reads them
            keep(seed, "real", real_df.assign(**{k: real_df.attrs[k] for k in ("way_in_s", "load_s")
                                                 if len(real_df.attrs.get(k, ())) == len(real_df)}))
            if steps is not None:
                keep(seed, "steps", steps)
            keep(seed, "sim-calibration", sim.requests)
        ratio = cycle_speed(pool.cycles[-1]) if pool.cycles else None
        replay = replay_noise(steps, fit, cal) if fit is not None and RUN_REPLAY in extra and not short else ()
        # each variant: the speed it simulates at, the step factors it walks (how many steps at a time), its way in
        how = {PROBE_SPEED: (probed, noise, spec.noise_block_steps, ingress),
               LEVEL_PROBE_SPEED: (level_probed, noise, spec.noise_block_steps, ingress),
               RUN_SPEED: (ratio, noise, spec.noise_block_steps, own),
               RUN_REPLAY: (ratio if replay else None, replay, len(replay), own)}
        for name, other in extra.items():
            speed, factors, block, way_in = how[name]
            if speed is None:
                continue
            at = level_scenario(spec, profile_path, rate, cal.time_scale * speed, num_blocks,
                                cal.arrival_s * 1e3 * speed, factors, answer, block, *way_in)
            other_sim = _simulate_into(other, at, seed, real_pre, workload.n_requests, answer, span is not None)
            if keep is not None:
                keep(seed, "sim-" + name.replace(" ", "-"), other_sim.requests)
            if own[1]:
                other.way_in.append((own[0] / 1e3, way_in[0] / 1e3))
        r, s = summarize_frame(real_df, w, end), summarize_frame(sim.requests, w, end)
        echo(f"  run {rep + 1}/{spec.replications} (seed {seed}): {workload.n_requests} requests, TTFT p50 real "
             f"{r['ttft_p50_s'] * 1e3:.1f} ms sim {s['ttft_p50_s'] * 1e3:.1f} ms; preemptions real {real_pre:.0f} "
             f"sim {sim.summary.preemptions}"
             + (f"; the pod's mean cycle {pool.cycles[-1][0] / pool.cycles[-1][2] * 1e3:.2f} ms, "
                f"{pool.cycles[-1][0] / pool.cycles[-1][1]:.2f} x the calibrated model's for the same steps"
                if pool.cycles and pool.cycles[-1][2] else "")
             + (f" (the probes before it: {probed:.2f} x closed loop, {level_probed:.2f} x at the level's rate)"
                if probed is not None and level_probed is not None else "")
             + (f"; way to the engine {own[0]:.2f} ms mean, p99 {np.percentile(own[1], 99) * own[0]:.1f} ms (simulated: "
                f"{ingress[0]:.2f} ms)" if own[1] else ""))
    return pool, {name: other for name, other in extra.items() if len(other.sim) == len(pool.sim)}


def cycle_speed(cycle: tuple[float, float, int]) -> float | None:
    """A run's speed from its ``_Pool.cycles`` entry: its steps' summed cycle over the calibrated cycle of the same
    steps (what the simulation at "run speed" takes); None without a calibrated cycle."""
    return cycle[0] / cycle[1] if cycle[1] > 0 else None


def run_speeds(pool: _Pool) -> list[float]:
    """Each of ``pool``'s runs' speed (:func:`cycle_speed`), those that have one."""
    return [s for s in map(cycle_speed, pool.cycles) if s is not None]


def _rows(level: float, cache: str, rate: float, pool: _Pool, sim_at: str = "calibration") -> list[dict[str, Any]]:
    """The level's rows; ``sim_at`` says which simulation they compare: at the calibration's speed (the
    prediction), at the pod's speed in a probe just before each run (``probe speed``: a closed loop; ``level
    probe speed``: the level's rate; predictions too), at each run's own measured mean speed (``run speed``),
    or replaying each run's speed in windows of steps (``run replay``)."""
    real, sim = vs.pool(pool.real), vs.pool(pool.sim)
    real_itl, sim_itl = vs.pool(pool.real_itl), vs.pool(pool.sim_itl)
    pod_e2e = (vs.pool(pool.real_pod_e2e), vs.pool(pool.sim_pod_e2e)) if pool.real_pod_e2e else None
    rows = []
    for metric in METRICS + (POD_E2E_METRICS if pod_e2e is not None else ()):
        if metric.startswith("itl_"):
            r_b, s_b, m = real_itl, sim_itl, metric.replace("itl_", "ttft_")
        elif metric.startswith("pod_e2e_"):
            assert pod_e2e is not None
            (r_b, s_b), m = pod_e2e, metric.replace("pod_", "")
        else:
            r_b, s_b, m = real, sim, metric
        ri, si, ei = vs.interval(r_b, m), vs.interval(s_b, m), vs.error_interval(r_b, s_b, m)
        rows.append({"level": level, "cache": cache, "rate_per_s": rate, "metric": metric,
                     "real": ri.value, "real_low": ri.low, "real_high": ri.high,
                     "sim": si.value, "sim_low": si.low, "sim_high": si.high,
                     "rel_error": ei.value, "error_low": ei.low, "error_high": ei.high,
                     "intervals_overlap": ri.overlaps(si), "requests": pool.requests,
                     "measured_ok": float(r_b.ok.sum())})
    rp, sp = (float(sum(p[i] for p in pool.preemptions)) for i in (0, 1))
    rows.append({"level": level, "cache": cache, "rate_per_s": rate, "metric": "preemptions", "real": rp,
                 "sim": sp, "rel_error": (sp - rp) / rp if rp else float("nan"), "requests": pool.requests})
    if pool.way_in:  # the mean way to the engine, real and simulated: a front end that queued shows here
        real_w, sim_w = (float(np.mean([w[i] for w in pool.way_in])) for i in (0, 1))
        rows.append({"level": level, "cache": cache, "rate_per_s": rate, "metric": "reach_mean_s", "real": real_w,
                     "sim": sim_w, "rel_error": sim_w / real_w - 1 if real_w > 0 else float("nan"),
                     "requests": pool.requests})
    n = sum(c[2] for c in pool.cycles)
    if n:  # the pod's mean step cycle during the runs, and the calibrated model's for the same steps
        real_c, fit_c = sum(c[0] for c in pool.cycles) / n, sum(c[1] for c in pool.cycles) / n
        rows.append({"level": level, "cache": cache, "rate_per_s": rate, "metric": "pod_cycle_mean_s",
                     "real": real_c, "sim": fit_c, "rel_error": fit_c / real_c - 1, "requests": pool.requests})
    for row in rows:
        row["sim_at"] = sim_at
    return rows


def run_continuous_validation(spec: ContinuousSpec | None = None, *,
                              out_dir: str | Path = "data/validation/continuous",
                              echo: Callable[[str], None] = print) -> Any:
    """Run it; write ``results.csv``, ``profile.csv`` (with the calibrated step model) and
    ``provenance.json`` under ``out_dir``; return the results frame."""
    import pandas as pd

    spec = spec or ContinuousSpec()
    started = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pod_core = cores[0] if len(cores) > 1 else None
    gen_core = cores[1] if len(cores) > 1 else None
    work = scratch_dir("capsim-validate-continuous-")  # removed at exit, also after Ctrl-C or SIGTERM (studies.pods)
    echo(f"measuring {spec.model}'s continuous steps on core {pod_core} ...")
    measured = ServiceTimeProfile.from_csv(measure_step_fit(
        work / "steps.csv", pod_core, model=spec.model, threads=spec.threads, workloads=spec.step_workloads,
        max_num_seqs=spec.max_num_seqs, prompt=spec.prompt_tokens, output=spec.output_tokens, seed=spec.seed))
    fit = StepTimeFit.from_dict(measured.metadata["step_model"])
    echo(f"step fit: c0 {fit.overhead_s * 1e3:.3f} ms +- {fit.c0_stderr_s * 1e3:.3f}, "
         f"{fit.coefficients[3] * 1e6:.1f} us/decode, {fit.coefficients[1] * 1e6:.2f} us/prefill token, "
         f"residuals by kind {dict(fit.residuals_by_kind)}")
    if gen_core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {gen_core})
    rows: list[dict[str, Any]] = []
    off_clock: list[str] = []
    front_end: list[str] = []  # runs whose way in queued (_Pool.front_end)
    generator: list[str] = []  # runs whose load generator was short of CPU (_Pool.generator)
    trace_short: list[str] = []  # runs whose pod's step trace lacked their first steps (_Pool.trace_short)
    speeds: list[float] = []  # each run's mean cycle over the calibrated one (run_speeds)
    common: dict[str, object] = {"torch_threads": spec.threads, "model": spec.model, "batch_mode": "continuous",
              "queue_capacity": 4096, "trace_steps": VALIDATION_TRACE_STEPS}
    pod = PodProcess(work, "validate-continuous", core=pod_core, **common, **spec.limits(spec.num_blocks))
    profile_path = out / "profile.csv"
    try:
        pod.start(wait_ready=False).wait_ready(timeout_s=START_S)
        cal, steps, splits = calibrate_steps(
            pod.url, fit, clients=spec.calibration_clients, levels=spec.calibration_levels,
            seconds=spec.calibration_s, max_num_seqs=spec.max_num_seqs, prompt=spec.prompt_tokens,
            output=spec.output_tokens, pid=pod.pid, echo=echo, history_read=spec.history_read,
            open_loop_fit=spec.open_loop_fit, prefill_scale=spec.prefill_scale)
        steps.to_csv(out / "calibration_steps.csv", index=False)
        ablation, parts = term_ablation(steps), cycle_parts(steps)
        echo(f"calibration: {cal.describe()}")
        echo("  run, running, model ms, pod cycle ms, fit ms, arrivals and tokens per step: " + "; ".join(
            f"{p[0]} {p[1]:.1f} {p[2] * 1e3:.2f} {p[3] * 1e3:.2f} {p[4] * 1e3:.2f} {p[5]:.3f} {p[6]:.1f}"
            for p in cal.points))
        echo("  share of the pod's cycle: " + ", ".join(f"{k} {v:.1%}" for k, v in cal.shares.items()))
        if cal.cycle_noise:
            q = np.asarray(cal.cycle_noise)
            echo(f"  single steps' cycle over the fit (mean 1): p10 {np.quantile(q, 0.1):.2f}, p50 "
                 f"{np.quantile(q, 0.5):.2f}, p90 {np.quantile(q, 0.9):.2f}, p99 {np.quantile(q, 0.99):.2f}, top "
                 f"{q.max():.2f}; the simulator walks them {spec.noise_block_steps} steps at a time"
                 + ("" if spec.cycle_noise else " (off: cycle_noise=False)"))
        echo("  each run's mean cycle, ms: cycle = engine CPU (model) + wait + hand-off + gap; running, arrivals "
             "per step: " + "; ".join(f"{c['run']} {c['cycle_s']:.2f} = {c['engine_cpu_s']:.2f} ({c['model_s']:.2f}) "
                                      f"+ {c['wait_s']:.2f} + {c['handoff_s']:.2f} + {c['gap_s']:.2f}; "
                                      f"{c['running']:.1f}, {c['arrivals']:.3f}" for c in parts))
        for a in ablation:
            echo(f"  terms {a['terms']}: runs' mean cycles met to {a['runs_rms_rel']:.1%} rms, worst "
                 f"{a['runs_worst_rel']:.1%}")
        for label, sp in splits.items():
            if sp:
                echo(f"  {label}: way in and out {sp['way_in_and_out_s'] * 1e3:.2f} ms"
                     + (f" (in {sp['way_in_s'] * 1e3:.2f}, out {sp['way_out_s'] * 1e3:.2f})" if "way_in_s" in sp else "")
                     + f", answer path "
                     f"{sp['answer_path_s'] * 1e3:.2f} ms; ITL pod {sp['pod_itl_s'] * 1e3:.3f} ms, to the receipt "
                     f"{sp['receipt_itl_s'] * 1e3:.3f} ms ({sp['receipt_over_pod_itl']:+.1%})")
        for warning in cal.warnings:
            echo(f"WARNING: step calibration: {warning}")
        ServiceTimeProfile(measured.points, {**measured.metadata, "step_model": calibrated_fit(fit, cal).to_dict()},
                           measured.source).to_csv(profile_path)
        cap = capacity_per_s(fit, cal, spec)
        answer = answer_ms(splits, spec.ttft_from_send) if spec.answer_time else 0.0
        apart = spec.ttft_from_send and bool(cal.way_in_s)
        echo(f"answer time: {answer:.2f} ms from a request's last token to its answer at the client (the way "
             + ("out" if apart else "in and out") + " and the pod's answer path, median of the open-loop runs)"
             + ("" if spec.answer_time else " (off: answer_time=False)"))
        if spec.ttft_from_send:
            echo("way to the engine (send to the pod's receipt" + (" and its history read" if spec.history_read else "")
                 + ", simulated as service.ingress_ms and ingress_noise), mean and p99 ms by open-loop run: " + ", ".join(
                     f"{label} {w[0]:.2f} {np.percentile(w[1], 99) * w[0]:.1f}"
                     for label, w in ((label, cal.ingress(label)) for label in cal.way_in_s) if w[1])
                 + ("" if apart else " none measured: the simulated TTFT lacks it (WARNING)"))

        echo(f"the calibrated pod as a scenario fragment: {write_continuous_service(out, spec, profile_path, cal, answer)}")

        def keeper(cache: str, level: float) -> Callable[[int, str, Any], None] | None:
            if not spec.keep_runs:
                return None
            (out / "runs").mkdir(exist_ok=True)
            return lambda seed, what, frame: frame.to_csv(
                out / "runs" / f"{cache}-{level * 100:.0f}-seed{seed}-{what}.csv.gz", index=False)

        def way_in(level: float) -> tuple[float, tuple[float, ...]]:
            return cal.ingress(open_run_label(level)) if spec.ttft_from_send else (0.0, ())

        echo(f"capacity: {cap:.1f} requests/s (prompt {spec.prompt_tokens}, output {spec.output_tokens}, "
             f"{spec.max_num_seqs} seqs)")
        for level in spec.levels:
            echo(f"level {level:.0%}: {level * cap:.1f} requests/s, {spec.replications} runs ...")
            pool, others = _run_level(pod, spec, profile_path, level * cap, cal, spec.num_blocks, echo, fit, answer,
                                      way_in(level), keeper("full", level))
            off_clock += pool.off_clock
            front_end += pool.front_end
            generator += pool.generator
            trace_short += pool.trace_short
            speeds += run_speeds(pool)
            rows += _rows(level, "full", level * cap, pool)
            for name, other in others.items():
                rows += _rows(level, "full", level * cap, other, name)
        pod.stop()
        small = spec.small_cache_blocks
        pod = PodProcess(work, "validate-continuous-small", core=pod_core, **common, **spec.limits(small))
        pod.start(wait_ready=False).wait_ready(timeout_s=START_S)
        rate = spec.preemption_level * cap
        echo(f"level {spec.preemption_level:.0%} on a {small}-block cache: {rate:.1f} requests/s ...")
        pool, others = _run_level(pod, spec, profile_path, rate, cal, small, echo, fit, answer,
                                  way_in(spec.preemption_level), keeper("small", spec.preemption_level))
        off_clock += pool.off_clock
        front_end += pool.front_end
        generator += pool.generator
        trace_short += pool.trace_short
        speeds += run_speeds(pool)
        rows += _rows(spec.preemption_level, f"small ({small} blocks)", rate, pool)
        for name, other in others.items():
            rows += _rows(spec.preemption_level, f"small ({small} blocks)", rate, other, name)
    finally:
        pod.stop()
    results = pd.DataFrame(rows)
    results.to_csv(out / "results.csv", index=False)
    observed = observed_speed(speeds)  # the margin a plan on this pod needs (service.yaml says it)
    import torch

    provenance = {
        "capsim_version": capsim.__version__, "torch": torch.__version__, "spec": asdict(spec),
        "step_fit": fit.to_dict(), "calibration": asdict(cal), "capacity_per_s": cap, "answer_ms": answer,
        "term_ablation": ablation, "request_split": splits, "cycle_parts": parts,
        # what the real TTFT counts from (validate_runs.ttft_from's names), and the runs that were not on the clock
        "real_ttft_from": TTFT_FROM_SEND if spec.ttft_from_send and not off_clock else TTFT_FROM_RECEIPT,
        "off_pod_clock": off_clock, "front_end_queued": front_end, "generator_saturated": generator,
        "trace_short": trace_short, "observed_speed": observed,
        "cores": {"pod": pod_core, "loadgen": gen_core}, "created_unix": time.time(),
        "wall_s": time.time() - started, "load_average": os.getloadavg(), "targets": TARGETS,
        "method": "docs/continuous.md#validation",
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
    echo(format_results(results))
    margin = note_observed_speed(out, observed, "the pod")
    if margin is not None:
        echo(f"after the calibration, {margin}")
    echo(f"wall time {time.time() - started:.0f} s; results in {out}")
    return results


def target_for(metric: str) -> float | None:
    if metric == "throughput_per_s":
        return TARGETS["throughput_per_s"]
    for q in ("p50", "p95", "p99"):
        if metric.endswith(f"_{q}_s"):
            return TARGETS[q]
    return None


def format_results(results: Any) -> str:
    """A text table: level, cache, which simulation (``sim_at``), metric, real and sim, the error with its 95%
    interval, whether the error meets its target, and whether the real and simulated 95% intervals overlap;
    then the targets met per simulation."""
    at = "sim_at" in results.columns
    lines = [f"{'level':>6} {'cache':>18} {'sim at':>11} {'metric':>17} {'real':>10} {'sim':>10} {'error':>8} "
             f"{'95% interval':>19} {'target':>7} {'CIs':>8}"]
    met: dict[str, list[int]] = {}
    for r in results.itertuples():
        t = target_for(r.metric)
        ci = "" if not np.isfinite(getattr(r, "error_low", np.nan)) else f"[{r.error_low:+.1%}, {r.error_high:+.1%}]"
        ok = "" if t is None or not np.isfinite(r.rel_error) else ("ok" if abs(r.rel_error) <= t else "MISS")
        overlap = getattr(r, "intervals_overlap", None)
        both = "" if not isinstance(overlap, bool | np.bool_) else ("overlap" if overlap else "apart")
        which = r.sim_at if at else "calibration"
        if r.metric in TARGET_METRICS:
            counts = met.setdefault(which, [0, 0])
            counts[0] += ok == "ok"
            counts[1] += 1
        lines.append(f"{r.level:>6.0%} {r.cache:>18} {which:>11} {r.metric:>17} {r.real:>10.4g} {r.sim:>10.4g} "
                     f"{r.rel_error:>+8.1%} {ci:>19} {ok:>7} {both:>8}")
    for which, (n_ok, n) in met.items():
        lines.append(f"targets met, simulated at {which}: {n_ok} of {n}")
    return "\n".join(lines)

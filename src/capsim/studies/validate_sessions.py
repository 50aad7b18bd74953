"""Sim-versus-real validation of growing sessions (issue 14 §6): two real continuous pods with prefix
caching behind the real router, against the simulator's two pods, once per router policy.

The workload is the simulator's own (``make_workload`` of :func:`sessions_scenario`): sessions arriving as
a Poisson process for ``arrival_s`` seconds, ``turns`` turns each, closed loop (a turn is sent when the
previous answer arrives plus an exponential think time, drawn in answer order from the ``sessions``
stream in both halves, as the simulated client does), each later turn a new message of distinct tokens
and a short answer, so every turn prefills its history from the store. The step model is measured and
calibrated as ``capsim validate --mode continuous`` does (``capsim.studies.validate_sessions_calibrate``);
the session rate is ``level`` times the fleet's capacity without prefix hits: the two pods' as the lone
calibration pod gives it, divided by the speed a first fleet probe measures (:func:`fleet_rate`). Per policy: the prefix
hit rate (prompt tokens served from the cache, from the pods' and the simulator's counters), TTFT
p50/p99 and turns per second, with the block-bootstrap intervals of ``capsim.studies.validate_stats``
over the requests that arrive in ``[warmup_s, arrival_s)``. Method and targets: docs/sessions.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import capsim
from capsim.model.scenario import Scenario
from capsim.studies import validate_stats as vs
from capsim.studies.pods import scratch_dir
from capsim.studies.validate_continuous import continuous_service
from capsim.studies.validate_continuous_cycle import NOISE_BLOCK_STEPS, StepCalibration, reach_factors
from capsim.studies.validate_runs import (
    TTFT_FROM_RECEIPT,
    TTFT_FROM_SEND,
    note_observed_speed,
    observed_speed,
    run_caveats,
    write_service_fragment,
)
from capsim.studies.validate_sessions_calibrate import Calibrated, calibrate

#: Target for the hit rate's difference, in points (0.05 = 5 points). With 16-token blocks a turn's hit is
#: its cached history rounded down to a block, so an answer that ends a block early or late moves a
#: ~300-token turn by 16 tokens (5%); a router that places a few turns differently moves the rate a little
#: more. A turn that misses its history loses tens of points on its own, so 5 points still tells a routing
#: or caching difference from block rounding.
HIT_TARGET_POINTS = 0.05

METRICS: tuple[str, ...] = ("ttft_p50_s", "ttft_p99_s", "throughput_per_s")
TARGETS: dict[str, float] = {"ttft_p50_s": 0.10, "ttft_p99_s": 0.15, "throughput_per_s": 0.03,
                             "hit_rate": HIT_TARGET_POINTS}


@dataclass(frozen=True)
class SessionsSpec:
    """The workload, the engine limits, the policies and the run lengths (defaults: about 5 minutes)."""

    policies: tuple[str, ...] = ("session_affinity", "round_robin")
    replications: int = 3
    # turns per second, as a share of the fleet's capacity without prefix hits: the two pods' capacity from the
    # calibration, over the first fleet probe's speed when it is slower (``fleet_rate``; without a probe: the
    # calibration's alone)
    level: float = 0.5
    arrival_s: float = 20.0  # sessions arrive during this long; the comparison window ends here
    drain_s: float = 12.0  # the simulation runs this much longer, for the sessions' later turns
    warmup_s: float = 4.0
    turns: int = 6
    first_tokens: float = 192.0  # the first prompt: lognormal with this mean
    first_sigma: float = 0.3
    first_max: int = 384
    new_tokens: float = 32.0  # each later turn's new message: lognormal with this mean
    new_sigma: float = 0.5
    new_max: int = 96
    output_tokens: int = 8  # every answer
    think_mean_s: float = 0.5  # exponential
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_blocks: int = 1024
    max_model_len: int = 1024
    seed: int = 0
    model: str = "tiny"
    threads: int = 1
    calibration_s: float = 3.0
    # the calibration's open-loop runs, as shares of its closed-loop capacity (``level`` is added when it is not
    # one of them): three, so that its fit goes through them (``open_loop_fit``), as the continuous
    # validation's does, and the simulated way in is the run's at ``level`` (before stop 40: one run at 0.5,
    # the fit through every run, closed loops included)
    calibration_levels: tuple[float, ...] = (0.3, 0.5, 0.7)
    open_loop_fit: bool = True
    # the step model's prefill terms scaled to the pod's (``StepCalibration.prefill_scale``, docs/continuous.md)
    prefill_scale: bool = True
    step_workloads: int = 3
    # seconds of session arrivals through each policy's fresh fleet before its replications (seed + 1000):
    # the fleet's own speed, answer time and history load under the workload, which the lone calibration pod
    # cannot see (the router, the store and the load generator share the pods' cores); its speed sizes the
    # session rate (``fleet_rate``); when that moved the rate, a second probe at the new rate (seed + 2000)
    # measures them again; every replication is also simulated with them (``sim_at`` "fleet probe"). 0: no
    # probe, the rate from the calibration alone
    probe_s: float = 6.0
    # a last run per policy (seed + CRASH_SEED, after its replications) in which the second pod is killed this many
    # seconds in (SIGKILL, not restarted; the simulator crashes its pod 1 then, for good): what a crash costs, the
    # turns it fails and the histories its sessions prefill again on the other pod, real against simulated
    # (``crash.csv``); 0: no crash run
    crash_at_s: float = 10.0
    # the killed pod's teardown, simulated (``pods.crash_teardown_s``): a SIGKILLed pod's kernel accepts the
    # turns sent in the first 20 to 45 ms after the kill and resets them (data/validation/sessions/
    # teardown-2026-12-05, killtest.py); the router's 502 for those. None: the crash run's own, from the SIGKILL
    # until the process was reaped (TEARDOWN_S when not measured); 0: the crash is instant (before stop 54)
    crash_teardown_s: float | None = None

    @classmethod
    def quick(cls) -> SessionsSpec:
        return cls(replications=2, arrival_s=8.0, drain_s=10.0, warmup_s=2.0, turns=4, calibration_s=1.5,
                   step_workloads=1, probe_s=3.0, crash_at_s=4.0)

    @property
    def mean_prompt_tokens(self) -> float:
        """A turn's mean prompt (history plus message) without truncation."""
        return self.first_tokens + (self.turns - 1) / 2 * (self.output_tokens + self.new_tokens)

    def limits(self) -> dict[str, int]:
        return {"max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                "block_size": self.block_size, "num_blocks": self.num_blocks, "max_model_len": self.max_model_len}

    @property
    def long_prompt_tokens(self) -> int:
        """A session's last prompt at the means: the step model is measured up to this prompt length (a
        fit over short prompts only extrapolates its prefill-times-context term wildly)."""
        return round(self.first_tokens + (self.turns - 1) * (self.output_tokens + self.new_tokens))


def sessions_batching(spec: SessionsSpec) -> dict[str, Any]:
    """The ``batching`` section of the validation's pods: continuous, prefix caching on, its engine limits."""
    return {"mode": "continuous", "queue_capacity": 4096, "enable_prefix_caching": True, **spec.limits()}


def write_sessions_service(out: Path, spec: SessionsSpec, cal: Calibrated) -> Path:
    """``out/service.yaml``: the pod the calibration measured (its step model, time per arrival, steps'
    spread, answer time, way in and a prefix hit's copy per cached token), as the simulations at
    ``calibration`` take it, with the pods' engine limits (:func:`~capsim.studies.validate_runs.fragment_batching`);
    a plan adds its router (the validation's policies: ``router.kind``)."""
    return write_service_fragment(
        out, f"continuous with prefix caching, {spec.model} model, {spec.threads} torch thread(s), sessions of "
        f"{spec.turns} turns", continuous_service(cal.profile_path, cal.time_scale, cal.arrival_overhead_ms,
                                                  cal.cycle_noise, cal.answer_ms, NOISE_BLOCK_STEPS, cal.ingress_ms,
                                                  cal.ingress_noise, cal.cached_token_us),
        sessions_batching(spec))


def sessions_scenario(spec: SessionsSpec, policy: str, profile_path: Path, rate: float, time_scale: float,
                      arrival_overhead_ms: float = 0.0, cycle_noise: tuple[float, ...] = (),
                      answer_ms: float = 0.0, noise_block_steps: int = 1, ingress_ms: float = 0.0,
                      cached_token_us: float = 0.0, ingress_noise: tuple[float, ...] = ()) -> Scenario:
    """The simulator's view of one run: two always-ready continuous pods with prefix caching behind
    ``policy``, sessions arriving at ``rate`` per second until ``arrival_s``."""
    return Scenario.model_validate({
        "horizon_s": spec.arrival_s + spec.drain_s,
        "warmup_s": spec.warmup_s,
        "workload": {
            "arrivals": {"kind": "piecewise", "rate_per_s": [[0.0, rate], [spec.arrival_s, 0.0]]},
            "prompt_tokens": {"kind": "lognormal", "mean": spec.first_tokens, "sigma": spec.first_sigma,
                              "max": spec.first_max},
            "output_tokens": {"kind": "constant", "value": spec.output_tokens},
            "sessions": {"turns": spec.turns, "mode": "closed",
                         "think_time_s": {"kind": "exponential", "mean_s": spec.think_mean_s},
                         "new_tokens": {"kind": "lognormal", "mean": spec.new_tokens, "sigma": spec.new_sigma,
                                        "max": spec.new_max}},
        },
        "service": continuous_service(profile_path, time_scale, arrival_overhead_ms, cycle_noise, answer_ms,
                                      noise_block_steps, ingress_ms, ingress_noise, cached_token_us),
        "batching": sessions_batching(spec),
        "pods": {"replicas": 2, "startup_s": 0},
        # the real router's prefix_aware scorer has no KV-cache term (it cannot see the pods' caches)
        "router": {"kind": policy, "kv_cache_weight": 0.0},
        "client": {"timeout_s": 600, "max_retries": 0},
    })


#: a crash run's own seed, after the replications' and the probes'
CRASH_SEED = 3000
#: a killed pod's teardown when the crash run did not measure its own (a lone pod: killtest.py)
TEARDOWN_S = 0.04
#: the crashed pod's start when the kubelet restarts it (s): past any run, as the real pod is not restarted
NEVER_S = 1e6


def crash_scenario(scenario: Scenario, at_s: float, pod: int = 1, teardown_s: float = 0.0) -> Scenario:
    """``scenario`` with pod ``pod`` crashing at ``at_s`` for good, as the real crash run kills its pod: the
    kubelet's restart never gets ready (``startup_s`` past the run, no faster ``restart_startup_s``); for
    ``teardown_s`` the dying pod still accepts what the router sends it and fails it all when its teardown ends
    (``pods.crash_teardown_s``: the real router's 502s for turns reset after they were sent), and then it leaves
    the endpoints (no PLEG relist, no propagation), as the real router stops sending it turns at its first refused
    connection and places them on the other pod (a turn the crash caught fails; none is retried)."""
    return scenario.override({"faults": {"crashes": [{"at_s": at_s, "pod": pod}]}, "pods.startup_s": NEVER_S,
                              "pods.restart_startup_s": None,
                              "pods.crash_detection_s": teardown_s, "pods.endpoints_propagation_s": 0.0,
                              "pods.crash_teardown_s": teardown_s})


def moved_turns(frame: Any, served_by: Any, crashed: Any, crashed_at_s: float, message_tokens: Any,
                turns: int) -> tuple[int, int]:
    """The answered later turns sent from ``crashed_at_s`` on whose session's last answered turn was served by
    the pod ``crashed`` (so another pod served them: ``served_by``, per row of ``frame``, who served it), and
    the history tokens they prefilled there (a turn's prompt, history plus message, less its message: the
    history the crashed pod held). The same count on a real frame (the router's ``X-Capsim-Pod``) and a
    simulated one (its ``pod``), where it is the simulator's own ``reprefill_tokens``."""
    import numpy as np

    served = np.asarray(served_by, dtype=object)
    ok = (frame["outcome"] == "ok").to_numpy()
    rid = frame["request_id"].to_numpy()
    prompt = frame["prompt_tokens"].to_numpy()
    after = (frame["arrival_s"] >= crashed_at_s).to_numpy()
    order = np.lexsort((rid % turns, rid // turns))
    moved = history = 0
    last: dict[int, Any] = {}  # session -> the pod that served its last answered turn
    for k in order[ok[order]]:
        s, pod = int(rid[k]) // turns, served[k]
        if after[k] and last.get(s) == crashed and pod != crashed:
            moved += 1
            history += int(prompt[k]) - int(message_tokens[int(rid[k])])
        last[s] = pod
    return moved, history


def held_turns(frame: Any, served_by: Any, pod: Any, t0: float, t1: float) -> float:
    """The mean number of turns ``pod`` held over ``[t0, t1)``: each answered turn it served (``served_by``, per
    row of ``frame``) from its send to its answer at the client, the way in and out included, as a crash fails
    it. What a crash at a random moment of that window would fail: a steadier count than the one crash's."""
    import numpy as np

    if t1 <= t0:
        return float("nan")
    mine = (np.asarray(served_by, dtype=object) == pod) & (frame["outcome"] == "ok").to_numpy()
    start = np.maximum(frame["arrival_s"].to_numpy(dtype=float)[mine], t0)
    end = np.minimum(frame["end_s"].to_numpy(dtype=float)[mine], t1)
    return float(np.clip(end - start, 0.0, None).sum() / (t1 - t0))


#: the crash run's ``held_turns`` are taken over this many seconds before the crash
HELD_WINDOW_S = 5.0
#: the simulated crash is also put at this many moments spread over the ``HELD_WINDOW_S`` before it
#: (``crash_moments``): what a crash then fails, as a range beside the one real crash's count
CRASH_MOMENTS = 12


def crash_moments(scenario: Scenario, at_s: float, seed: int, n: int = CRASH_MOMENTS,
                  window_s: float = HELD_WINDOW_S, pod: int = 1, teardown_s: float = 0.0) -> list[int]:
    """The turns a simulated crash of ``pod`` fails (``crash_scenario``) when it falls at each of ``n`` moments
    spread evenly over the ``window_s`` before ``at_s`` (the midpoints of ``n`` equal slices), the same
    sessions and seed: one crash's failures are a handful drawn from what its moment caught, so the real
    crash's count is weighed against this range rather than one simulated count."""
    from capsim.sim.simulate import simulate

    start = max(at_s - window_s, 0.0)
    moments = [start + (at_s - start) * (k + 0.5) / n for k in range(n)]
    return [int((simulate(crash_scenario(scenario, t, pod, teardown_s), seed=seed).requests.outcome != "ok").sum())
            for t in moments]

#: each replication is simulated up to three times (``sim_at``): with the calibration alone (the lone pod's step model,
#: per-arrival time and answer time), and with what a probe of the policy's fleet measured just before its
#: replications (:class:`FleetProbe`; a prediction too: its sessions are not the measured ones)
CALIBRATION, FLEET_PROBE = "calibration", "fleet probe"
#: ... and a third time with what the fleet's step traces and the turns of that replication itself measured
#: (:func:`measure_fleet`): not a prediction, a diagnosis: what is left at the fleet's own speed is the model's
RUN_SPEED = "run speed"


@dataclass(frozen=True)
class FleetProbe:
    """What ``probe_s`` seconds of the workload (its own seed) through a policy's fresh fleet measured.

    What the simulation at ``sim_at`` "fleet probe" takes from it, on top of the calibration: ``speed``, the
    pods' summed step cycle over what the calibration charges those same steps, their prefix hits' copy included
    (:func:`fleet_speed`; the router, the store and the load generator share the pods' cores, which the
    calibration's lone pod had to itself), multiplying the calibrated step model and time per arrival (as the
    continuous validation's probes do) and a hit's copy; ``answer_ms``,
    the mean time from a turn's last token to its answer at the client (the store write, the answer, the
    router's way back; the calibration's lone pod measures only its own); ``ingress_ms``, the mean time a pod
    took to read a turn's history from the store before its engine saw the turn (the pods' ``load_s``); and
    ``way_in_ms``, the mean time from a turn's send to the pod's receipt (through the router; the load
    generator on the pods' clock, ``run_load(pod_clock=True)``, since stop 28). A turn reaches the simulated
    engine ``way_in_ms + ingress_ms`` after its send (``service.ingress_ms``) on average, as the real turn's
    TTFT, counted from the send, includes both; ``reach_noise`` (since stop 29) is each measured turn's
    way in plus history read over their mean (``service.ingress_noise``), so the simulated turns reach
    their engines with the measured spread, whose tail (a turn sent while the host is busy) is the way in's,
    not the mean's."""

    speed: float
    answer_ms: float
    ingress_ms: float
    turns: int
    sessions_per_s: float = float("nan")  # the rate it ran at
    way_in_ms: float = 0.0
    reach_noise: tuple[float, ...] = ()

    @property
    def reach_ms(self) -> float:
        """From a turn's send to its engine (``service.ingress_ms``): the way in, then the history read."""
        return self.way_in_ms + self.ingress_ms

    def describe(self) -> str:
        return (f"fleet probe at {self.sessions_per_s:.2f} sessions/s: {self.turns} turns; steps {self.speed:.2f} "
                f"x the calibrated model, answer "
                f"{self.answer_ms:.1f} ms after the last token, way in {self.way_in_ms:.1f} ms, history read "
                f"{self.ingress_ms:.1f} ms" + (f" (send to engine p99 {self.reach_p99_ms:.1f} ms)"
                                                 if self.reach_noise else ""))

    @property
    def reach_p99_ms(self) -> float:
        """The measured turns' send-to-engine time at p99 (``reach_noise`` on ``reach_ms``)."""
        import numpy as np

        return float(np.percentile(self.reach_noise, 99)) * self.reach_ms if self.reach_noise else self.reach_ms


@dataclass
class _Pool:
    real: list[vs.Blocks]
    sim: list[vs.Blocks]
    counters: list[tuple[float, float, float, float]]  # real hits, real queries, sim hits, sim queries
    preemptions: list[tuple[float, float]]
    turns: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)  # one row per replication (replications.csv)
    probe: FleetProbe | None = None  # what this pool's simulations took from the fleet probe (None: calibration)

    def add(self, real: vs.Blocks, sim_blocks: vs.Blocks, real_counters: dict[str, float], sim: Any,
            turns: int) -> None:
        """One run: its real and simulated blocks, the pods' counters over it against the simulator's, and its
        turns."""
        ts = sim.timeseries
        self.real.append(real)
        self.sim.append(sim_blocks)
        self.counters.append((real_counters["vllm:prefix_cache_hits_total"],
                              real_counters["vllm:prefix_cache_queries_total"],
                              float(ts["prefix_cache_hits"].iloc[-1]), float(ts["prefix_cache_queries"].iloc[-1])))
        self.preemptions.append((real_counters["vllm:num_preemptions_total"], float(sim.summary.preemptions)))
        self.turns += turns


def sim_scenario(spec: SessionsSpec, policy: str, cal: Calibrated, rate: float,
                 probe: FleetProbe | None = None) -> Scenario:
    """A replication's simulation at ``sim_at`` "calibration" (no ``probe``: the lone pod's step model, time per
    arrival, answer time and way in) or at a probe's (its speed multiplying the step model, the time per
    arrival and a prefix hit's copy, its answer time, its way in plus history read and their spread)."""
    if probe is None:
        return sessions_scenario(spec, policy, cal.profile_path, rate, cal.time_scale, cal.arrival_overhead_ms,
                                 cal.cycle_noise, cal.answer_ms, NOISE_BLOCK_STEPS, cal.ingress_ms,
                                 cal.cached_token_us, cal.ingress_noise)
    return sessions_scenario(spec, policy, cal.profile_path, rate, cal.time_scale * probe.speed,
                             cal.arrival_overhead_ms * probe.speed, cal.cycle_noise, probe.answer_ms,
                             NOISE_BLOCK_STEPS, probe.reach_ms, cal.cached_token_us * probe.speed, probe.reach_noise)


def fleet_rate(rate: float, probe: FleetProbe | None) -> float:
    """The session rate at ``level`` of the fleet's capacity, from ``rate`` (the same level of the lone
    calibration pod's capacity, two pods' worth) and the first fleet probe: a fleet whose steps run
    ``speed`` times the calibrated model's has ``1 / speed`` of the capacity (the speed multiplies the step
    model and the per-arrival time alike). A probe that measured a fleet faster than the lone pod on its
    own core (``speed`` < 1, noise) leaves the rate as it is: the calibration's capacity is the ceiling."""
    if probe is None or not probe.speed > 1.0:
        return rate
    return rate / probe.speed


#: fleet probes' seeds, after the replications' own: the first (it sizes the rate), the second (at that rate)
PROBE_SEED, SECOND_PROBE_SEED = 1000, 2000


def fleet_probe(fleet: Any, spec: SessionsSpec, policy: str, cal: Calibrated, rate: float,
                vocab: int, seed_offset: int = PROBE_SEED) -> FleetProbe | None:
    """Run ``spec.probe_s`` seconds of sessions at ``rate`` (seed ``spec.seed + seed_offset``) through ``fleet``
    and measure :class:`FleetProbe`; ``None`` when it gave nothing to measure (no answered turn, no step)."""
    from dataclasses import replace

    scenario = sessions_scenario(replace(spec, arrival_s=spec.probe_s, warmup_s=0.0), policy, cal.profile_path,
                                 rate, cal.time_scale)
    sent = send_sessions(fleet, scenario, spec.seed + seed_offset, spec.turns, vocab)
    return measure_fleet(fleet, sent.real, sent.t0, sent.t1, cal, rate)


@dataclass
class _Sent:
    """The simulator's workload of a scenario and seed, and what the real fleet made of it between ``t0`` and
    ``t1`` (``perf_counter``): its turns (``real``) and the pods' counters after it."""

    workload: Any
    real: Any
    counters: dict[str, float]
    t0: float
    t1: float
    crashed_at_s: float | None = None  # with a crash: when it fell, on the run's clock
    crashed_url: str | None = None
    teardown_s: float | None = None  # with a crash: the SIGKILL to the process reaped (RealRun.teardown_s)


def send_sessions(fleet: Any, scenario: Scenario, seed: int, turns: int, vocab: int, crash: Any = None) -> _Sent:
    """Send ``scenario``'s sessions (seed ``seed``) through the real ``fleet``: each message as the token ids of
    its session and turn, each think time from the simulator's ``sessions`` stream in answer order; with
    ``crash`` (``validate_sessions_real.Crash``), one pod killed during it."""
    from capsim.sim.arrivals import make_workload
    from capsim.sim.sessions import ThinkTimes
    from capsim.sim.streams import Streams
    from capsim.studies.validate_sessions_real import message_ids, run_real

    workload = make_workload(scenario, Streams(seed))
    msg = workload.message_tokens
    assert msg is not None

    def messages(r: int) -> list[int]:
        return message_ids(seed, r // turns, r % turns, int(msg[r]), vocab)

    think = ThinkTimes(scenario.workload.sessions, Streams(seed)["sessions"])
    t0 = time.perf_counter()
    run = run_real(fleet, workload, messages, think.next, scenario.horizon_s + 60, seed, crash)
    return _Sent(workload, run.frame, run.counters, t0, time.perf_counter(), run.crashed_at_s, run.crashed_url,
                 run.teardown_s)


def measure_fleet(fleet: Any, real: Any, t0: float, t1: float, cal: Calibrated, rate: float,
                  pods: Any = None) -> FleetProbe | None:
    """What the fleet's step traces between ``t0`` and ``t1`` (``perf_counter``) and the turns ``real`` that ran
    then say (:class:`FleetProbe`); ``None`` when there is nothing to measure (no answered turn, no step).
    ``pods``: the pods whose traces are read (default all; a crash run reads the one that lived)."""
    import numpy as np
    import pandas as pd

    from capsim.studies.validate_continuous import pod_token_span
    from capsim.studies.validate_continuous_calibrate import cycles, fetch_steps

    if cal.fit is None or cal.cal is None:
        return None
    steps = [cycles(fetch_steps(pod.url, t0, t1), cal.cal.model(cal.fit)) for pod in (pods or fleet.pods)]
    frame = pd.concat([s for s in steps if len(s)], ignore_index=True) if any(len(s) for s in steps) else None
    span = pod_token_span(real)
    ok = (real.outcome == "ok").to_numpy()
    if frame is None or not ok.any() or span is None or "load_s" not in real:
        return None
    # on the pods' clock the first token is the pod's: what follows it is the way out, not the way in too
    answer = (real.end_s - real.first_token_s).to_numpy() - span
    way_in = np.asarray(real.attrs.get("way_in_s", []), dtype=float)
    way_in = way_in[ok] if len(way_in) == len(real) else np.empty(0)
    way_in_ms = float(np.mean(way_in[np.isfinite(way_in)])) * 1e3 if np.isfinite(way_in).any() else 0.0
    load = real.load_s.to_numpy(dtype=float)[ok]
    return FleetProbe(fleet_speed(frame, cal.cal, cal.cached_token_us), float(np.nanmean(answer[ok])) * 1e3,
                      float(np.nanmean(load)) * 1e3, int(ok.sum()), rate, way_in_ms,
                      reach_factors(way_in, load, real.arrival_s.to_numpy(dtype=float)[ok]))


def fleet_speed(frame: Any, cal: StepCalibration, cached_token_us: float = 0.0) -> float:
    """The fleet's speed over the steps of ``frame`` (``cycles`` of the pods' step traces): their summed cycle over
    what the simulated pod charges the same steps at the calibration, the calibrated cycle (``cal.step_s`` of their
    model time and arrivals) plus the copy of their prefix hits' cached KV (``cached_token_us`` per cached token,
    ``service.cached_token_us``). Since stop 55 the copy is in the denominator: the cycles hold it, and a speed
    over the calibrated cycle alone counted it twice at the fleet's speed (once in the speed, once charged)."""
    import numpy as np

    fitted = cal.step_s(frame.model_s.to_numpy(dtype=float), frame.arrivals.to_numpy(dtype=float))
    if cached_token_us and "cached_tokens" in frame:
        fitted = fitted + cached_token_us * 1e-6 * frame.cached_tokens.to_numpy(dtype=float)
    return float(frame.cycle_s.sum() / np.sum(fitted))


@dataclass
class _Policy:
    """One policy's replications: a pool per ``sim_at`` (the same real half in each), the session rate they
    ran at, and the first probe when a second one replaced it (it sized the rate)."""

    pools: dict[str, _Pool]
    rate: float
    sizing: FleetProbe | None = None
    run_speeds: list[float] = field(default_factory=list)  # the fleet's speed in each replication
    ttft_from: str = TTFT_FROM_SEND  # what the real turns' TTFT counts from (validate_runs.ttft_from)
    generator: list[str] = field(default_factory=list)  # runs whose load generator was short of CPU
    crash: list[dict[str, Any]] = field(default_factory=list)  # the crash run's rows (crash.csv)


def _run_policy(policy: str, spec: SessionsSpec, work: Path, cal: Calibrated, rate: float,
                cores: list[int | None], echo: Callable[[str], None]) -> _Policy:
    """The policy's replications on a fresh fleet, each simulated per ``sim_at``. With ``spec.probe_s`` the
    fleet is probed first at ``rate`` (the calibration's), the rate sized to the fleet by :func:`fleet_rate`,
    and, when that moved it by more than 5%, probed again at the new rate (what the simulation at "fleet
    probe" takes)."""
    from capsim.sim.simulate import simulate
    from capsim.studies.validate_continuous_calibrate import VALIDATION_TRACE_STEPS
    from capsim.studies.validate_sessions_real import start_fleet

    settings: dict[str, object] = {"torch_threads": spec.threads, "model": spec.model, "batch_mode": "continuous",
                                   "queue_capacity": 4096, "enable_prefix_caching": "true", "warmup": "false",
                                   "trace_steps": VALIDATION_TRACE_STEPS,
                                   "max_prompt_tokens": spec.max_model_len, **spec.limits()}
    from capsim.core.engine import PRESETS

    vocab = PRESETS[spec.model].vocab_size
    pools: dict[str, _Pool] = {CALIBRATION: _Pool([], [], [], [])}
    fleet = start_fleet(work, policy, settings, cores)
    sizing = None
    own_speeds: list[float] = []
    ttft_from = TTFT_FROM_SEND
    generator: list[str] = []
    try:
        probe = fleet_probe(fleet, spec, policy, cal, rate, vocab) if spec.probe_s > 0 else None
        sized = fleet_rate(rate, probe)
        if sized < 0.95 * rate:
            assert probe is not None
            echo(f"  {policy} first {probe.describe()}; the fleet's capacity is {1 / probe.speed:.0%} of the "
                 f"calibration's: {sized:.2f} sessions/s, probed again")
            sizing, rate = probe, sized
            probe = fleet_probe(fleet, spec, policy, cal, rate, vocab, SECOND_PROBE_SEED)
        if probe is not None:
            echo(f"  {policy} {probe.describe()}")
            pools[FLEET_PROBE] = _Pool([], [], [], [], probe=probe)
        elif spec.probe_s > 0:
            echo(f"  {policy}: the fleet probe measured nothing (no answered turn or no step); no probe row")
        for rep in range(spec.replications):
            seed = spec.seed + rep
            scenario = sim_scenario(spec, policy, cal, rate)
            sent = send_sessions(fleet, scenario, seed, spec.turns, vocab)
            workload, real_df, real_c = sent.workload, sent.real, sent.counters
            own = measure_fleet(fleet, real_df, sent.t0, sent.t1, cal, rate)
            off, busy = run_caveats(real_df, f"{policy}, seed {seed}", echo)
            if off is not None:
                ttft_from = TTFT_FROM_RECEIPT
            if busy is not None:
                generator.append(busy)
            if own is not None:
                pools.setdefault(RUN_SPEED, _Pool([], [], [], []))
                own_speeds.append(own.speed)
            w, end = spec.warmup_s, spec.arrival_s
            real_blocks = vs.cut_blocks(real_df, w, end)
            for sim_at, pool in pools.items():
                probe = own if sim_at == RUN_SPEED else pool.probe
                if sim_at == RUN_SPEED and own is None:
                    continue  # nothing measured in this replication: the pool has the others'
                sc = scenario if probe is None else sim_scenario(spec, policy, cal, rate, probe)
                sim = simulate(sc, seed=seed)
                pool.add(real_blocks, vs.cut_blocks(sim.requests, w, end), real_c, sim, workload.n_requests)
                pool.runs.append({**_run_row(policy, seed, workload.n_sessions, real_df, sim.requests, pool, spec),
                                  "sim_at": sim_at, "sessions_per_s": rate})
            first = pools[CALIBRATION]
            bad = real_df[real_df.outcome != "ok"]
            echo(f"  {policy} run {rep + 1}/{spec.replications} (seed {seed}): {workload.n_sessions} sessions, "
                 f"{len(real_df)} turns sent ({len(bad)} not ok{_reasons(real_df)}), hit rate real "
                 f"{real_c['vllm:prefix_cache_hits_total'] / max(real_c['vllm:prefix_cache_queries_total'], 1):.3f} "
                 f"sim {first.counters[-1][2] / max(first.counters[-1][3], 1):.3f}"
                 + (f"; the fleet's steps {own.speed:.2f} x the calibrated model, answer {own.answer_ms:.1f} ms"
                    if own is not None else ""))
        crash = (_crash_run(fleet, spec, policy, cal, rate, vocab, pools.get(FLEET_PROBE), echo)
                 if spec.crash_at_s > 0 else [])
    finally:
        fleet.stop()
    return _Policy(pools, rate, sizing, own_speeds, ttft_from, generator, crash)


def _crash_run(fleet: Any, spec: SessionsSpec, policy: str, cal: Calibrated, rate: float, vocab: int,
               probed: _Pool | None, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """The policy's crash run (its fleet's last: the second pod does not come back) and its rows, simulated at
    the calibration, at the fleet probe and at the run's own speed (the surviving pod's steps): TTFT and
    throughput over the turns sent from the crash to the end of arrivals, the hit rate over the run, and the
    counts of what the crash cost (turns failed, turns moved off the crashed pod and the history they prefilled
    again), and what the simulated crash fails at ``CRASH_MOMENTS`` moments of the seconds before it
    (``failed_at_moments``: their median, and their range as the error's interval)."""
    import numpy as np

    from capsim.sim.simulate import simulate
    from capsim.studies.validate_sessions_real import Crash

    seed = spec.seed + CRASH_SEED
    sent = send_sessions(fleet, sim_scenario(spec, policy, cal, rate), seed, spec.turns, vocab,
                         Crash(spec.crash_at_s))
    at, real = sent.crashed_at_s, sent.real
    teardown = spec.crash_teardown_s if spec.crash_teardown_s is not None else \
        sent.teardown_s if sent.teardown_s is not None else TEARDOWN_S
    if at is None or sent.crashed_url is None:
        echo(f"  {policy} crash run: the pod was not killed (the run ended first); no crash rows")
        return []
    if at >= spec.arrival_s:
        echo(f"  {policy} crash run: the crash fell at {at:.1f} s, after the arrivals; no crash rows")
        return []
    msg = sent.workload.message_tokens
    real_moved = moved_turns(real, real.attrs["served_by"], sent.crashed_url, at, msg, spec.turns)
    real_failed = int((real.outcome != "ok").sum())
    # a turn sent after the crash that still failed found the dead pod on its way (the router's pooled connection
    # to it, say), not in its queue: a failure the held turns do not count
    real_late = int(((real.outcome != "ok") & (real.arrival_s >= at)).sum())
    held_from = max(at - HELD_WINDOW_S, 0.0)
    real_held = held_turns(real, real.attrs["served_by"], sent.crashed_url, held_from, at)
    rows: list[dict[str, Any]] = []
    # at its own speed too (a diagnosis, as the replications' "run speed"): the surviving pod's steps over the run
    survivors = [p for p in fleet.pods if p.url != sent.crashed_url]
    own = measure_fleet(fleet, real, sent.t0, sent.t1, cal, rate, survivors)
    for sim_at, probe in ((CALIBRATION, None), (FLEET_PROBE, probed.probe if probed is not None else None),
                          (RUN_SPEED, own)):
        if sim_at != CALIBRATION and probe is None:
            continue
        scenario = sim_scenario(spec, policy, cal, rate, probe)
        sim = simulate(crash_scenario(scenario, at, 1, teardown), seed=seed)
        req = sim.requests
        lost = (req.outcome != "ok").to_numpy()
        pool = _Pool([], [], [], [])
        pool.add(vs.cut_blocks(real, at, spec.arrival_s), vs.cut_blocks(req, at, spec.arrival_s), sent.counters, sim,
                 sent.workload.n_requests)
        pool.runs.append(_run_row(policy, seed, sent.workload.n_sessions, real, req, pool, spec))
        sim_moved = moved_turns(req, req["pod"].to_numpy(), 1, at, msg, spec.turns)
        base = {"policy": policy, "sim_at": sim_at, "sessions_per_s": rate, "turns": pool.turns, "crashed_at_s": at,
                "teardown_s": teardown}
        counts = {"failed_turns": (real_failed, int(lost.sum())),
                  "failed_sent_after": (real_late, int((lost & (req.arrival_s >= at).to_numpy()).sum())),
                  "held_turns": (real_held, held_turns(req, req["pod"].to_numpy(), 1, held_from, at)),
                  "moved_turns": (real_moved[0], sim_moved[0]), "reprefill_tokens": (real_moved[1], sim_moved[1])}
        rows += [{**r, "crashed_at_s": at, "teardown_s": teardown} for r in _rows(policy, rate, pool, sim_at)]
        rows += [{**base, "metric": m, "real": float(a), "sim": float(b), "error": float(b - a), "error_kind": "count"}
                 for m, (a, b) in counts.items()]
        # the same crash at CRASH_MOMENTS moments of the seconds before it: the median and the range it failed
        caught = crash_moments(scenario, at, seed, teardown_s=teardown)
        mid = float(np.median(caught))
        rows.append({**base, "metric": "failed_at_moments", "real": float(real_failed), "sim": mid,
                     "error": mid - real_failed, "error_low": float(min(caught) - real_failed),
                     "error_high": float(max(caught) - real_failed), "error_kind": "count",
                     "moments": " ".join(map(str, caught))})
    c = {r["metric"]: r for r in rows if r["sim_at"] == CALIBRATION}
    echo(f"  {policy} crash run (seed {seed}): the second pod killed at {at:.2f} s, torn down in {teardown * 1e3:.0f} ms; "
         f"real / simulated at the "
         f"calibration: {real_failed} / {c['failed_turns']['sim']:.0f} turns failed ({real_late} / "
         f"{c['failed_sent_after']['sim']:.0f} sent after it{_reasons(real)}; {c['failed_at_moments']['moments']} "
         f"at {CRASH_MOMENTS} moments of the {HELD_WINDOW_S:.0f} s before it; held in the "
         f"{at - held_from:.0f} s before: {real_held:.2f} / {c['held_turns']['sim']:.2f}), {real_moved[0]} / "
         f"{c['moved_turns']['sim']:.0f} moved with {real_moved[1]} / {c['reprefill_tokens']['sim']:.0f} history "
         f"tokens; TTFT p99 after it {c['ttft_p99_s']['real'] * 1e3:.1f} / {c['ttft_p99_s']['sim'] * 1e3:.1f} ms")
    return rows


def _reasons(frame: Any) -> str:
    """The load generator's failed attempts by reason, for the progress line (empty when none failed)."""
    failures = frame.attrs.get("failures") or {}
    return (": " + ", ".join(f"{why} {n}" for why, n in failures.items())) if failures else ""


def cached_agreement(real: Any, sim: Any, t0: float, t1: float) -> tuple[int, int, float]:
    """Turn by turn, the prompt tokens the prefix cache served on the pods (the answers' ``cached_tokens``) and
    in the simulator, matched by request id (the same session's same turn), over the turns answered in both
    that the real run sent in ``[t0, t1)``: how many, how many served the same count, and the mean absolute
    difference in tokens (NaN when none). A turn's count is its history found on the pod it went to, rounded
    down to a block: the router's choice and the cache's evictions, one turn at a time."""
    import numpy as np

    r = real[(real["outcome"] == "ok") & (real["arrival_s"] >= t0) & (real["arrival_s"] < t1)]
    s = sim[sim["outcome"] == "ok"]
    m = r[["request_id", "cached_tokens"]].merge(s[["request_id", "cached_tokens"]], on="request_id",
                                                  suffixes=("_real", "_sim")).dropna()
    if m.empty:
        return 0, 0, float("nan")
    d = np.abs(m["cached_tokens_real"].to_numpy(float) - m["cached_tokens_sim"].to_numpy(float))
    return len(m), int((d == 0).sum()), float(d.mean())


def _run_row(policy: str, seed: int, sessions: int, real: Any, sim: Any, pool: _Pool,
             spec: SessionsSpec) -> dict[str, Any]:
    """One replication's numbers, real and simulated, for ``replications.csv``."""
    from capsim.studies.validate import summarize_frame

    r, s = (summarize_frame(df, spec.warmup_s, spec.arrival_s) for df in (real, sim))
    rh, rq, sh, sq = pool.counters[-1]
    matched, same, diff = cached_agreement(real, sim, spec.warmup_s, spec.arrival_s)
    out: dict[str, Any] = {"policy": policy, "seed": seed, "sessions": sessions, "real_turns": len(real),
                           "sim_turns": len(sim), "real_hit_rate": rh / rq if rq else float("nan"),
                           "sim_hit_rate": sh / sq if sq else float("nan"), "real_prefix_queries": rq,
                           "sim_prefix_queries": sq, "real_failures": _reasons(real).removeprefix(": "),
                           "cached_turns": matched, "cached_same_turns": same, "cached_abs_diff_tokens": diff}
    for metric in METRICS:
        out[f"real_{metric}"], out[f"sim_{metric}"] = r[metric], s[metric]
    return out


def _rows(policy: str, rate: float, pool: _Pool, sim_at: str = CALIBRATION) -> list[dict[str, Any]]:
    real, sim = vs.pool(pool.real), vs.pool(pool.sim)
    base = {"policy": policy, "sim_at": sim_at, "sessions_per_s": rate, "turns": pool.turns}
    rows = []
    for metric in METRICS:
        ri, si, ei = vs.interval(real, metric), vs.interval(sim, metric), vs.error_interval(real, sim, metric)
        rows.append({**base, "metric": metric, "real": ri.value, "real_low": ri.low, "real_high": ri.high,
                     "sim": si.value, "sim_low": si.low, "sim_high": si.high, "error": ei.value,
                     "error_low": ei.low, "error_high": ei.high, "error_kind": "relative",
                     "intervals_overlap": ri.overlaps(si), "target": TARGETS[metric],
                     "met": abs(ei.value) <= TARGETS[metric], "measured_ok": float(real.ok.sum())})
    rows.append({**base, **hit_rate_row(pool.counters)})
    rows.append({**base, **cached_turns_row(pool.runs)})
    rp, sp = (float(sum(p[i] for p in pool.preemptions)) for i in (0, 1))
    rows.append({**base, "metric": "preemptions", "real": rp, "sim": sp, "error": sp - rp, "error_kind": "count"})
    return rows


def hit_rate_row(counters: list[tuple[float, float, float, float]]) -> dict[str, Any]:
    """The prefix hit rate over every run (prompt tokens served from the cache over those looked up: the
    pods' ``vllm:prefix_cache_hits`` / ``queries`` and the simulator's), and ``sim - real`` in points
    with the t interval over the replications' differences (the counters cover whole runs, so there are
    no blocks to resample)."""
    rh, rq, sh, sq = (sum(c[i] for c in counters) for i in range(4))
    real = [c[0] / c[1] if c[1] else float("nan") for c in counters]
    sim = [c[2] / c[3] if c[3] else float("nan") for c in counters]
    r, s = rh / rq if rq else float("nan"), sh / sq if sq else float("nan")
    ri, si = vs.t_interval(real), vs.t_interval(sim)
    ei = vs.t_interval([b - a for a, b in zip(real, sim, strict=True)])
    return {"metric": "hit_rate", "real": r, "real_low": ri.low, "real_high": ri.high, "sim": s,
            "sim_low": si.low, "sim_high": si.high, "error": s - r, "error_low": ei.low, "error_high": ei.high,
            "error_kind": "points", "intervals_overlap": ri.overlaps(si), "target": HIT_TARGET_POINTS,
            "met": abs(s - r) <= HIT_TARGET_POINTS}


def cached_turns_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The share of turns whose cached prompt tokens were the same on the pods and in the simulator, over the
    replications (:func:`cached_agreement`; ``real`` 1, ``sim`` the share, ``error`` the share that differ,
    and the mean absolute difference in tokens beside it). No target: a diagnosis of the hit rate, per turn."""
    n = sum(int(r["cached_turns"]) for r in runs)
    same = sum(int(r["cached_same_turns"]) for r in runs)
    diff = sum(float(r["cached_abs_diff_tokens"]) * int(r["cached_turns"]) for r in runs if r["cached_turns"])
    share = same / n if n else float("nan")
    return {"metric": "cached_turns_same", "real": 1.0, "sim": share, "error": share - 1.0,
            "error_kind": "points", "turns_compared": n, "cached_abs_diff_tokens": diff / n if n else float("nan")}


def run_sessions_validation(spec: SessionsSpec | None = None, *, out_dir: str | Path = "data/validation/sessions",
                            echo: Callable[[str], None] = print) -> Any:
    """Run it; write ``results.csv``, ``profile.csv`` (the calibrated step model) and ``provenance.json``
    under ``out_dir``; return the results frame."""
    import pandas as pd

    spec = spec or SessionsSpec()
    started = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pod_cores: list[int | None] = [cores[0], cores[1]] if len(cores) > 1 else [None, None]
    work = scratch_dir("capsim-validate-sessions-")  # removed at exit, also after Ctrl-C or SIGTERM (studies.pods)
    cal = calibrate(spec, work, out, cores, pod_cores[0], echo)
    echo(f"the calibrated pod as a scenario fragment: {write_sessions_service(out, spec, cal)}")
    per_pod = cal.per_pod_turns_per_s
    rate = spec.level * 2 * per_pod / spec.turns
    echo(f"capacity without prefix hits: {per_pod:.1f} turns/s a pod; {rate:.2f} sessions/s of {spec.turns} "
         f"turns ({spec.level:.0%})" + (", until a fleet probe sizes it" if spec.probe_s > 0 else ""))
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    crash_rows: list[dict[str, Any]] = []
    probes: dict[str, dict[str, Any]] = {}
    sizing: dict[str, dict[str, Any]] = {}
    rates: dict[str, float] = {}
    run_speeds: dict[str, list[float]] = {}
    ttft_from_all = TTFT_FROM_SEND
    generator: list[str] = []  # runs whose load generator was short of CPU (loadgen.generator_saturated)
    for policy in spec.policies:
        echo(f"{policy}: fresh redis-server, pods and router; {spec.replications} runs ...")
        done = _run_policy(policy, spec, work, cal, rate, pod_cores, echo)
        rates[policy] = done.rate
        run_speeds[policy] = done.run_speeds
        generator += done.generator
        if done.ttft_from != TTFT_FROM_SEND:
            ttft_from_all = done.ttft_from
        if done.sizing is not None:
            sizing[policy] = asdict(done.sizing)
        crash_rows += done.crash
        for sim_at, pool in done.pools.items():
            rows += _rows(policy, done.rate, pool, sim_at)
            runs += pool.runs
            if pool.probe is not None:
                probes[policy] = asdict(pool.probe)
    results = pd.DataFrame(rows)
    results.to_csv(out / "results.csv", index=False)
    pd.DataFrame(runs).to_csv(out / "replications.csv", index=False)
    crashes = pd.DataFrame(crash_rows)
    if spec.crash_at_s > 0:
        crashes.to_csv(out / "crash.csv", index=False)
    # the fleet's speed in each replication: the margin a plan on the calibrated pod needs (service.yaml says it)
    observed = observed_speed(v for speeds in run_speeds.values() for v in speeds)
    import torch

    provenance = {
        "capsim_version": capsim.__version__, "torch": torch.__version__, "spec": asdict(spec),
        **cal.provenance, "time_scale": cal.time_scale, "arrival_overhead_ms": cal.arrival_overhead_ms,
        "answer_ms": cal.answer_ms, "cached_token_us": cal.cached_token_us, "fleet_probes": probes,
        "ingress_ms": cal.ingress_ms,  # the calibration's simulated way in (its spread: calibration.way_in_s)
        "sizing_probes": sizing, "run_speeds": run_speeds, "capacity_per_pod_turns_per_s": per_pod,
        "observed_speed": observed,
        "sessions_per_s": rate, "sessions_per_s_by_policy": rates, "real_ttft_from": ttft_from_all,
        "generator_saturated": generator, "cores": {"pods": pod_cores}, "created_unix": time.time(),
        "wall_s": time.time() - started, "load_average": os.getloadavg(), "targets": TARGETS,
        "method": "docs/sessions.md#validated-against-real-pods",
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
    echo(format_results(results))
    if len(crashes):
        echo("a pod killed mid-run (crash.csv; TTFT and throughput over the turns sent after it):")
        echo(format_results(crashes))
    margin = note_observed_speed(out, observed, "the fleet's pods (sharing their cores with the "
                                 "router, the store and the load generator)")
    if margin is not None:
        echo(f"after the calibration, {margin}")
    echo(f"wall time {time.time() - started:.0f} s; results in {out}")
    return results


def format_results(results: Any) -> str:
    """A text table: policy, metric, real and sim, the error (relative, or points for the hit rate) with its
    95% interval, and whether it meets its target."""
    import numpy as np

    lines = [f"{'policy':>17} {'sim at':>12} {'metric':>17} {'real':>10} {'sim':>10} {'error':>9} {'95% interval':>19} "
             f"{'target':>7}"]
    for r in results.itertuples():
        pts = r.error_kind == "points"

        def fmt(v: float, pts: bool = pts) -> str:
            return f"{100 * v:+.1f}pt" if pts else f"{v:+.1%}"
        count = r.error_kind == "count"
        err = f"{r.error:+.0f}" if count else fmt(r.error)
        low, high = getattr(r, "error_low", np.nan), getattr(r, "error_high", np.nan)
        ci = "" if not np.isfinite(low) else f"[{low:+.0f}, {high:+.0f}]" if count else f"[{fmt(low)}, {fmt(high)}]"
        met = getattr(r, "met", None)
        ok = "" if not isinstance(met, bool | np.bool_) else ("ok" if met else "MISS")
        sim_at = getattr(r, "sim_at", CALIBRATION)
        lines.append(f"{r.policy:>17} {sim_at:>12} {r.metric:>17} {r.real:>10.4g} {r.sim:>10.4g} {err:>9} {ci:>19} "
                     f"{ok:>7}")
    return "\n".join(lines)

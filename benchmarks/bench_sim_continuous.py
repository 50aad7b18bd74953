"""Simulator speed in continuous-batching mode: simulated requests and engine steps per wall second.

The reference rush of ``bench_sim.py`` (one simulated hour, 200 -> 500 -> 200 requests/s, about 1.1M
requests, an HPA on requests in flight, random crashes) with continuous-batching pods: vLLM-style
scheduling under a 2048-token budget, up to 128 running requests and 2048 KV blocks of 16 tokens per pod,
step times from the same GPU-shaped profile. Reported: requests and engine steps simulated per wall
second, the SimPy events the step loops used (a run of plain decode steps is one), and the same run with
one event per step (``max_run_steps = 1``) on a shorter horizon, for comparison.

Issue 13's target is 50,000 simulated requests per CPU second on one core; CPU seconds (``process_time``)
are what the table reports, as the machine is shared (wall seconds are in the JSON). ``--repeat N`` runs
each case N times and reports the median.

The roofline's step times (``capsim estimate-profile``, docs/profiles.md) are not linear in a step's
composition (a plain decode step's is affine in its context for a given batch, kept per batch size): the H100 scenario (``data/scenarios/h100_llama3_8b_rush.yaml`` at a
steady 12 sessions a second) with its roofline against the same with the linear fit to it, CPU seconds
of each and their ratio, and what the fit changes in the answer (ITL p50, TTFT p99).

Issue 14's speed target: the rush as 4-turn sessions (a quarter of the session rate, ~2 s think time),
growing (each turn re-sends the history plus ~64 new tokens) with prefix caching on, against the same
sessions not growing with caching off; CPU seconds of each, the ratio to stay under 1.5.

    python benchmarks/bench_sim_continuous.py            # the full hour
    python benchmarks/bench_sim_continuous.py --quick    # ten simulated minutes
    python benchmarks/bench_sim_continuous.py --quick --repeat 3   # medians of 3
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, print_table, write_result
from bench_sim import gpu_like_profile, reference_scenario
from capsim.model.profile import ServiceTimeProfile
from capsim.model.scenario import Scenario
from capsim.sim import Simulation

CONTINUOUS = {"batching.mode": "continuous", "batching.max_num_seqs": 128, "batching.max_num_batched_tokens": 2048,
              "batching.block_size": 16, "batching.num_blocks": 2048, "batching.max_model_len": 8192}


def continuous_reference(horizon_s: float) -> Scenario:
    """The reference rush with continuous-batching pods."""
    return reference_scenario(horizon_s).override(CONTINUOUS)


def session_scenarios(horizon_s: float) -> dict[str, Scenario]:
    """The rush as 4-turn sessions: plain (no growth, caching off) and growing with prefix caching."""
    base = continuous_reference(horizon_s)
    rate = base.workload.arrivals.rate_per_s  # type: ignore[union-attr]
    assert isinstance(rate, tuple | list)  # the rush is piecewise
    sess = {"workload.sessions": {"turns": 4, "think_time_s": {"kind": "exponential", "mean_s": 2.0}},
            "workload.arrivals.rate_per_s": [[t, r / 4] for t, r in rate]}
    plain = base.override(sess).override({"batching.enable_prefix_caching": False})
    grow = base.override(sess).override(
        {"workload.sessions.new_tokens": {"kind": "lognormal", "mean": 64, "sigma": 0.5, "max": 1024}})
    return {"sessions, caching off": plain, "growing sessions, prefix caching": grow}


def interleaved(cases: dict[str, tuple[Scenario, ServiceTimeProfile]], repeat: int,
                describe: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """Each case (scenario, profile) ``repeat`` times, the runs interleaved (so a load change hits every
    case), seed 0: per case its requests, steps and ``describe(result)`` of its first run, and the median
    CPU time (``cpu_runs`` lists them all)."""
    out: dict[str, dict[str, Any]] = {}
    for _ in range(repeat):
        for name, (sc, prof) in cases.items():
            sim = Simulation(sc, seed=0, profile=prof)
            c0 = time.process_time()
            result = sim.run()
            cpu = time.process_time() - c0
            row = out.setdefault(name, {"case": name, "requests": result.summary.arrived,
                                        "steps": result.summary.steps, "cpu_runs": [], **describe(result)})
            row["cpu_runs"].append(cpu)
    for row in out.values():
        row["cpu_s"] = median(row["cpu_runs"])
        row["requests_per_cpu_s"] = row["requests"] / row["cpu_s"]
    return list(out.values())


def run_sessions(horizon_s: float, repeat: int = 1) -> list[dict[str, Any]]:
    """Each session case ``repeat`` times, interleaved; the median CPU time of each."""
    def hit_rate(result: Any) -> dict[str, Any]:
        req = result.requests
        return {"prefix_hit_rate": float(req["cached_tokens"].sum() / req["prompt_tokens"].sum())}

    profile = gpu_like_profile()
    return interleaved({name: (sc, profile) for name, sc in session_scenarios(horizon_s).items()}, repeat, hit_rate)


def run_roofline(horizon_s: float, repeat: int = 1) -> list[dict[str, Any]]:
    """The H100 scenario with its roofline and with the linear fit to it, interleaved ``repeat`` times;
    the median CPU time of each."""
    root = Path(__file__).resolve().parent.parent
    sc = Scenario.from_yaml(root / "data" / "scenarios" / "h100_llama3_8b_rush.yaml").override(
        {"horizon_s": horizon_s, "warmup_s": 30, "workload.arrivals.rate_per_s": [[0, 12]]})
    roof = ServiceTimeProfile.from_csv(root / "data" / "profiles" / "roofline-h100-llama-3-8b-bfloat16.csv")
    meta = {k: v for k, v in roof.metadata.items() if k != "estimate"}
    linear = ServiceTimeProfile(roof.points, {**meta, "step_model": roof.metadata["estimate"]["linear_fit"]})
    return interleaved({"roofline": (sc, roof), "linear fit to it": (sc, linear)}, repeat,
                       lambda r: {"itl_p50_s": r.summary.itl_p50_s, "ttft_p99_s": r.summary.ttft_p99_s})


def run(horizon_s: float, max_run_steps: int | None = None) -> dict[str, Any]:
    sim = Simulation(continuous_reference(horizon_s), seed=0, profile=gpu_like_profile())
    assert sim.continuous is not None
    if max_run_steps is not None:
        sim.continuous.max_run_steps = max_run_steps
    t0 = time.perf_counter()
    c0 = time.process_time()
    result = sim.run()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    s = result.summary
    return {"horizon_s": horizon_s, "requests": s.arrived, "wall_s": wall, "cpu_s": cpu,
            "requests_per_s": s.arrived / wall, "requests_per_cpu_s": s.arrived / cpu,
            "steps": s.steps, "steps_per_s": s.steps / wall, "steps_per_cpu_s": s.steps / cpu,
            "events": sim.continuous.events,
            "preemptions": s.preemptions, "kv_cache_usage_mean": s.kv_cache_usage_mean,
            "itl_p50_s": s.itl_p50_s, "ttft_p99_s": s.ttft_p99_s, "max_replicas": s.max_replicas,
            "error_rate": s.error_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="ten simulated minutes instead of an hour")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each case; the median is reported")
    ap.add_argument("--sessions-only", action="store_true", help="only the sessions + prefix caching comparison")
    args = ap.parse_args()
    horizon = 600.0 if args.quick else 3600.0
    sess_h = min(horizon, 600.0)
    sess = run_sessions(sess_h, args.repeat)
    ratio = sess[1]["cpu_s"] / sess[0]["cpu_s"]
    print_table(f"sessions, {sess_h:.0f} simulated s (issue 14: growing + prefix caching within 1.5x)",
                ["case", "requests", "steps", "CPU s", "requests/CPU s", "prefix hit rate"],
                [[r["case"], r["requests"], r["steps"], r["cpu_s"], r["requests_per_cpu_s"], r["prefix_hit_rate"]]
                 for r in sess])
    print(f"\nCPU time ratio, growing + prefix caching / plain: {ratio:.2f} (target <= 1.5)")
    if args.sessions_only:
        write_result("sim_continuous_sessions", {"sessions": sess, "ratio": ratio})
        return
    roof = run_roofline(min(horizon, 300.0), args.repeat)
    roof_ratio = roof[0]["cpu_s"] / roof[1]["cpu_s"]
    print_table(f"H100 scenario, {min(horizon, 300.0):.0f} simulated s: the roofline's step times against the "
                "linear fit to them", ["step time", "requests", "steps", "CPU s", "requests/CPU s", "ITL p50 ms",
                                       "TTFT p99 s"],
                [[r["case"], r["requests"], r["steps"], r["cpu_s"], r["requests_per_cpu_s"], r["itl_p50_s"] * 1e3,
                  r["ttft_p99_s"]] for r in roof])
    print(f"\nCPU time ratio, roofline / linear fit: {roof_ratio:.2f}")
    runs = sorted((run(horizon) for _ in range(args.repeat)), key=lambda r: r["cpu_s"])
    ref = runs[(len(runs) - 1) // 2]  # the median (the lower one of an even count)
    ref["cpu_runs"] = [r["cpu_s"] for r in runs]
    per_step = run(min(horizon, 300.0), max_run_steps=1)
    rows = [[f"decode runs as one event ({horizon:.0f} s)", ref["requests"], ref["steps"], ref["events"],
             ref["cpu_s"], ref["requests_per_cpu_s"], ref["steps_per_cpu_s"]],
            [f"one event per step ({per_step['horizon_s']:.0f} s)", per_step["requests"], per_step["steps"],
             per_step["events"], per_step["cpu_s"], per_step["requests_per_cpu_s"], per_step["steps_per_cpu_s"]]]
    print_table(f"continuous-batching reference rush (median of {len(runs)}; CPU s of each: "
                + ", ".join(f"{c:.2f}" for c in ref["cpu_runs"]) + "; issue 13: >= 50,000 requests/CPU s)",
                ["run", "requests", "steps", "events", "CPU s", "requests/CPU s", "steps/CPU s"], rows)
    print(f"\npreemptions {ref['preemptions']}, mean KV-cache use {ref['kv_cache_usage_mean']:.2f}, "
          f"ITL p50 {ref['itl_p50_s'] * 1000:.2f} ms, TTFT p99 {ref['ttft_p99_s']:.3f} s, "
          f"max replicas {ref['max_replicas']}, error rate {ref['error_rate']:.4f}")
    write_result("sim_continuous" + ("_quick" if args.quick else ""),
                 {"reference": ref, "one_event_per_step": per_step, "settings": CONTINUOUS,
                  "sessions": sess, "sessions_cpu_ratio": ratio, "roofline": roof,
                  "roofline_cpu_ratio": roof_ratio})


if __name__ == "__main__":
    main()

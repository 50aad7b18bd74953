"""The continuous pod at fixed Poisson rates, driven by the load generator with one connection pool (the
layout before stop 31) or the default layout; per run the requests' way in, TTFT, the pod's steps and, per
half second, the CPU share of the generator's process and of the pod's.

    .venv/bin/python data/validation/loadgen-2026-12-02/ab.py one|default RATES REPS OUTDIR [freeze|nofreeze]
    e.g. ab.py one 46,60,65 3 /tmp/ab   (the pod pinned to core 0, the generator to core 1; 20 s a run; the
    pod's start-up heap frozen unless nofreeze, PodConfig.gc_freeze)
"""

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from capsim.core.http_pools import ONE_POOL, ConnectionPools
from capsim.core.loadgen import ClientPolicy, run_load
from capsim.sim.arrivals import Workload
from capsim.studies.pods import PodProcess, scratch_dir
from capsim.studies.validate_continuous_calibrate import fetch_steps, process_cpu_s


def plan(rate: float, seconds: float, seed: int) -> Workload:
    t = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, int(rate * seconds * 1.5) + 10))
    t = t[t < seconds]
    return Workload(t, 1, 0.0, np.full(len(t), 32), np.full(len(t), 32))


def main() -> None:
    layout_name, rates, reps, out = sys.argv[1], [float(x) for x in sys.argv[2].split(",")], int(sys.argv[3]), \
        Path(sys.argv[4])
    layout = {"one": ONE_POOL, "default": ConnectionPools()}[layout_name]
    freeze = (sys.argv[5] if len(sys.argv) > 5 else "freeze") == "freeze"
    out.mkdir(parents=True, exist_ok=True)
    seconds = 20.0
    # the continuous validation's pod (ContinuousSpec's defaults)
    pod = PodProcess(scratch_dir("ab-"), "ab", core=0, torch_threads=1, model="tiny", batch_mode="continuous",
                     queue_capacity=4096, max_num_seqs=16, max_num_batched_tokens=512, block_size=16,
                     num_blocks=1024, max_model_len=65, gc_freeze=str(freeze).lower())
    os.sched_setaffinity(0, {1})
    pod.start(wait_ready=False).wait_ready(timeout_s=180)
    samples: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), process_cpu_s(os.getpid()), process_cpu_s(pod.pid)))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    try:
        asyncio.run(run_load([pod.url], plan(20, 3, 99), client=ClientPolicy(60, 0), max_duration_s=30,
                             pools=layout))  # warm-up
        for rate in rates:
            for rep in range(reps):
                t0 = time.perf_counter()
                df = asyncio.run(run_load([pod.url], plan(rate, seconds, rep), client=ClientPolicy(60, 0),
                                          max_duration_s=seconds + 60, seed=rep, pod_clock=True, pools=layout))
                t1 = time.perf_counter()
                steps = fetch_steps(pod.url, t0, t1)
                sm = np.array([s for s in samples if t0 <= s[0] <= t1])
                share = np.diff(sm[:, 1:], axis=0) / np.diff(sm[:, :1], axis=0) if len(sm) > 2 else np.zeros((0, 2))
                way = np.asarray(df.attrs["way_in_s"])
                ok = df[df.outcome == "ok"]
                ttft = (ok.first_token_s - ok.arrival_s).to_numpy()
                row = {"layout": layout_name, "gc_freeze": freeze, "rate": rate, "rep": rep, "requests": len(df),
                       "way_in_mean_ms": float(np.nanmean(way)) * 1e3,
                       "way_in_p99_ms": float(np.nanpercentile(way, 99)) * 1e3,
                       "ttft_p50_ms": float(np.median(ttft)) * 1e3, "ttft_p99_ms": float(np.percentile(ttft, 99)) * 1e3,
                       "send_late_p99_ms": float(np.percentile(df.attrs["send_error_s"], 99)) * 1e3,
                       "generator_cpu_ms_per_request": df.attrs["generator_cpu_s"] / max(len(df), 1) * 1e3,
                       "generator_busy_max": float(max(df.attrs["generator_busy"])),
                       "pod_busy_min": float(share[:, 1].min()) if len(share) else float("nan"),
                       "steps": len(steps), "running_mean": float(steps.decodes.mean()),
                       "step_cycle_mean_ms": float(np.diff(steps.start).mean()) * 1e3,
                       "step_cycle_p999_ms": float(np.quantile(np.diff(steps.start), 0.999)) * 1e3,
                       "cpu_share_gen_pod": [[round(a, 2), round(b, 2)] for a, b in share]}
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()
                                  if k != "cpu_share_gen_pod"}), flush=True)
                with open(out / "ab.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        stop.set()
        pod.stop()


if __name__ == "__main__":
    main()

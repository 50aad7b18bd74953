"""Does the pod slow down within a 20-s open-loop run (the levels) against 3-s ones (the calibration)?"""
import asyncio, os, sys, time
import numpy as np
from pathlib import Path
from capsim.model.profile import ServiceTimeProfile
from capsim.model.step_model import StepTimeFit
from capsim.studies.pods import PodProcess, scratch_dir
from capsim.studies.validate_continuous import ContinuousSpec, level_scenario, capacity_per_s
from capsim.studies.validate_continuous_calibrate import calibrate_steps, measure_step_fit, fetch_steps, cycles
from capsim.core.loadgen import ClientPolicy, run_load
from capsim.sim.arrivals import make_workload
from capsim.sim.streams import Streams

spec = ContinuousSpec()
work = scratch_dir("drift-")
measured = ServiceTimeProfile.from_csv(measure_step_fit(work / "steps.csv", 0, model="tiny", threads=1, workloads=3,
    max_num_seqs=16, prompt=32, output=32, seed=0))
fit = StepTimeFit.from_dict(measured.metadata["step_model"])
os.sched_setaffinity(0, {1})
pod = PodProcess(work, "drift", core=0, torch_threads=1, model="tiny", batch_mode="continuous", queue_capacity=4096,
                 **spec.limits(spec.num_blocks))
pod.start(wait_ready=False).wait_ready(timeout_s=180)
try:
    cal, steps, _ = calibrate_steps(pod.url, fit, clients=spec.calibration_clients, levels=spec.calibration_levels,
                                    seconds=3.0, max_num_seqs=16, prompt=32, output=32, pid=pod.pid)
    cap = capacity_per_s(fit, cal, spec)
    print("calibration", cal.describe()[:160], "capacity", round(cap, 1))
    for seconds, level, seed in ((20, 0.85, 0), (3, 0.85, 1), (20, 0.85, 2), (3, 0.85, 3), (20, 0.3, 4), (20, 0.85, 5)):
        sc = level_scenario(spec, work / "steps.csv", level * cap, 1.0, spec.num_blocks).override(
            {"horizon_s": seconds, "warmup_s": 0.0})
        wl = make_workload(sc, Streams(seed))
        t0 = time.perf_counter()
        asyncio.run(run_load([pod.url], wl, client=ClientPolicy(timeout_s=60, max_retries=0), max_duration_s=seconds + 30,
                             seed=seed, pod_clock=True))
        t1 = time.perf_counter()
        fr = cycles(fetch_steps(pod.url, t0, t1), fit)
        fitted = cal.step_s(fr.model_s, fr.arrivals)
        end = fr.end.to_numpy()
        w = np.floor((end - t0) / 2).astype(int)
        per = [round(float(fr.cycle_s.to_numpy()[w == k].sum() / np.asarray(fitted)[w == k].sum()), 3) for k in sorted(set(w)) if (w == k).sum() > 50]
        print(f"{seconds}s at {level:.0%}: whole {fr.cycle_s.sum() / fitted.sum():.3f}; 2-s windows {per}", flush=True)
finally:
    pod.stop()

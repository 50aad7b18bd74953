"""A/B on one validation's kept runs: the run replay as the validation did it before stop 54 (the trace's
last 16,384 steps, the first 10,000 of them replayed) against the whole run's steps; same ingress for both
(the calibration's), so only the replay differs."""
import sys, json, dataclasses
import numpy as np, pandas as pd
from pathlib import Path
from capsim.model.step_model import StepTimeFit
from capsim.sim.simulate import simulate
from capsim.studies import validate_stats as vs
from capsim.studies.validate_continuous import ContinuousSpec, level_scenario, level_cycles, TARGET_METRICS, target_for
from capsim.studies.validate_continuous_cycle import StepCalibration, replay_noise, open_run_label

d = Path(sys.argv[1])
prov = json.loads((d / "provenance.json").read_text())
fit = StepTimeFit.from_dict(prov["step_fit"])
c = prov["calibration"]
cal = StepCalibration(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in c.items()})
cal = dataclasses.replace(cal, way_in_s={k: tuple(v) for k, v in c["way_in_s"].items()})
spec = ContinuousSpec()
res = pd.read_csv(d / "results.csv")
metrics = ["ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s"]
for (level, cache), g in res[res.sim_at == "run replay"].groupby(["level", "cache"], sort=False):
    rate = float(g.rate_per_s.iloc[0])
    small = not cache.startswith("full")
    blocks = spec.small_cache_blocks if small else spec.num_blocks
    tag = f"{'small' if small else 'full'}-{level * 100:.0f}"
    ms, noise = cal.ingress(open_run_label(level))
    out = {}
    for variant in ("before (last 16,384, first 10,000)", "whole run"):
        sims = []
        for seed in range(spec.replications):
            steps = pd.read_csv(d / "runs" / f"{tag}-seed{seed}-steps.csv.gz")
            if variant.startswith("before"):
                steps = steps.iloc[-16384:].reset_index(drop=True)
                rep = replay_noise(steps, fit, cal, n=10_000)
            else:
                rep = replay_noise(steps, fit, cal)
            cyc, fitted, _ = level_cycles(steps, fit, cal)
            ratio = cyc / fitted
            sc = level_scenario(spec, d / "profile.csv", rate, cal.time_scale * ratio, blocks, cal.arrival_s * 1e3 * ratio,
                                rep, prov["answer_ms"], len(rep), ms, noise)
            r = simulate(sc, seed=spec.seed + seed).requests
            sims.append(vs.cut_blocks(r, sc.warmup_s, sc.horizon_s))
        pooled = vs.pool(sims)
        out[variant] = {m: vs.interval(pooled, m).value / float(g[g.metric == m].real.iloc[0]) - 1 for m in metrics}
    for variant, errs in out.items():
        print(f"{tag:9s} {variant:36s} " + "  ".join(f"{m[:-2]} {e:+6.1%}{'*' if abs(e) > target_for(m) else ' '}" for m, e in errs.items()), flush=True)

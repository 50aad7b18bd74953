"""Simulate a continuous validation's levels again at the rates its real runs had (3 seeds each, as the
validation does), with the calibration fitted through the open-loop runs without and with the prefill scale
(stop 40); print the targets met at the calibration and the TTFT and E2E errors. Needs each run's whole
out-dir (its calibration_steps.csv).

    .venv/bin/python resim_prefill.py DIR...
"""
import sys, json, dataclasses, tempfile
import numpy as np, pandas as pd
from pathlib import Path
import capsim.studies.validate_continuous_cycle as vcc
from capsim.model.profile import ServiceTimeProfile
from capsim.model.step_model import StepTimeFit
from capsim.sim.simulate import simulate
from capsim.studies import validate_stats as vs
from capsim.studies.validate_continuous import ContinuousSpec, level_scenario, itl_frame, sim_token_span, TARGET_METRICS, target_for
from capsim.studies.validate_continuous_cycle import fit_step_cycles, calibrated_fit
# the kept steps already hold their cycles; the model's time is computed again (the prefill scale changes it)
vcc.cycles = lambda steps, fit: steps.assign(model_s=vcc.model_times(steps, fit))
tmp = Path(tempfile.mkdtemp())
tot = {}
for d in map(Path, sys.argv[1:]):
    prov = json.loads((d / "provenance.json").read_text())
    fit = StepTimeFit.from_dict(prov["step_fit"])
    base = ServiceTimeProfile.from_csv(d / "profile.csv")
    f = pd.read_csv(d / "calibration_steps.csv")
    runs = [(l, g.drop(columns="run").reset_index(drop=True)) for l, g in f.groupby("run", sort=False)]
    ways = {k: tuple(v) for k, v in prov["calibration"]["way_in_s"].items()}
    res = pd.read_csv(d / "results.csv"); res = res[res.sim_at == "calibration"]
    spec = ContinuousSpec()
    through = [l for l, _ in runs if l.startswith("open")]
    for name, scaled in (("without the prefill scale", False), ("with it", True)):
        cal = dataclasses.replace(fit_step_cycles(runs, fit, through=through, prefill_scale=scaled), way_in_s=ways)
        prof = tmp / f"{d.name}-{scaled}.csv"
        ServiceTimeProfile(base.points, {**base.metadata, "step_model": calibrated_fit(fit, cal).to_dict()},
                           base.source).to_csv(prof)
        met = 0; errs = []
        for (level, cache), g in res.groupby(["level", "cache"], sort=False):
            rate = float(g.rate_per_s.iloc[0])
            blocks = spec.num_blocks if cache == "full" else spec.small_cache_blocks
            ms, noise = cal.ingress(f"open {level:.0%}")
            sims, itls = [], []
            for seed in range(spec.replications):
                sc = level_scenario(spec, prof, rate, cal.time_scale, blocks, cal.arrival_s * 1e3, cal.cycle_noise,
                                    prov["answer_ms"], spec.noise_block_steps, ms, noise)
                r = simulate(sc, seed=spec.seed + seed).requests
                sims.append(vs.cut_blocks(r, sc.warmup_s, sc.horizon_s))
                itls.append(vs.cut_blocks(itl_frame(r, sim_token_span(r, prov["answer_ms"])), sc.warmup_s, sc.horizon_s))
            s_b, i_b = vs.pool(sims), vs.pool(itls)
            for m in TARGET_METRICS:
                sim = vs.interval(i_b, m.replace("itl_", "ttft_")).value if m.startswith("itl_") else vs.interval(s_b, m).value
                e = sim / float(g[g.metric == m].real.iloc[0]) - 1
                met += abs(e) <= target_for(m)
                errs.append(f"{level:.0%}{cache[0]} {m[:-2]} {e:+.1%}")
        print(f"{d.name} {name}: prefill scale {cal.prefill_scale:.3f}, targets met {met} of 32", flush=True)
        print("   ", "; ".join(x for x in errs if "ttft" in x or "e2e_p50" in x), flush=True)
        tot.setdefault(name, []).append(met)
print(tot)

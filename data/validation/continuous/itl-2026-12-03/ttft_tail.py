"""Offline: the 30% level of a continuous validation simulated with variants of the step spread."""
import json, sys
from pathlib import Path
import numpy as np, pandas as pd
from capsim.studies.validate_continuous import ContinuousSpec, level_scenario
from capsim.studies.validate_continuous_cycle import ingress_from
from capsim.sim.simulate import simulate
from capsim.studies.validate_report import replay_speed

out = Path(sys.argv[1]); level = float(sys.argv[2]) if len(sys.argv) > 2 else 0.3
prov = json.loads((out / "provenance.json").read_text())
spec_d = prov["spec"]; spec_d = {k: tuple(v) if isinstance(v, list) else v for k, v in spec_d.items()}
spec = ContinuousSpec(**spec_d)
cal = prov["calibration"]; cap = prov["capacity_per_s"]; answer = prov["answer_ms"]
noise = np.asarray(cal["cycle_noise"])
ing = ingress_from(np.asarray(cal["way_in_s"][f"open {level:.0%}"]))
res = pd.read_csv(out / "results.csv")
real = res[(res.level == level) & (res.cache == "full") & (res.sim_at == "calibration")].set_index("metric")
print("real", {m: round(real.loc[m, "real"] * 1e3, 3) for m in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")})
print("as validated", {m: round(real.loc[m, "sim"] * 1e3, 3) for m in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")})
def smooth(f, w):
    n = len(f) // w * w
    return tuple(np.repeat(f[:n].reshape(-1, w).mean(axis=1), w))
variants = {"noise 64": (tuple(noise), 64), "none": ((), 1), "window 32": (smooth(noise, 32), 64),
            "window 8": (smooth(noise, 8), 64), "clip 2": (tuple(np.minimum(noise, 2) / np.minimum(noise, 2).mean()), 64)}
for name, (f, block) in variants.items():
    rows = []
    for seed in range(3):
        sc = level_scenario(spec, out / "profile.csv", level * cap, cal["time_scale"], spec.num_blocks,
                            cal["arrival_s"] * 1e3, f, answer, block, *ing)
        r = simulate(sc, seed=seed).requests
        r = r[(r.outcome == "ok") & (r.arrival_s >= sc.warmup_s) & (r.arrival_s < sc.horizon_s)]
        rows.append(r.assign(ttft=r.first_token_s - r.arrival_s))
    r = pd.concat(rows)
    print(f"{name:>10}: TTFT p50 {np.percentile(r.ttft, 50)*1e3:.3f} p99 {np.percentile(r.ttft, 99)*1e3:.3f}; "
          f"ITL p50 {np.nanpercentile(r.itl_s, 50)*1e3:.3f} p99 {np.nanpercentile(r.itl_s, 99)*1e3:.3f}")

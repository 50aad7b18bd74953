"""Offline: the step spread from the level's own open-loop calibration run, factor or pause, against the pooled one."""
import json, sys
from pathlib import Path
import numpy as np, pandas as pd
from capsim.studies.validate_continuous import ContinuousSpec, level_scenario
from capsim.studies.validate_continuous_cycle import ingress_from, step_noise
import capsim.sim.step_time as st
from capsim.sim.simulate import simulate

out = Path(sys.argv[1]); window = 32
prov = json.loads((out / "provenance.json").read_text())
spec = ContinuousSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in prov["spec"].items()})
cal = prov["calibration"]; cap = prov["capacity_per_s"]; answer = prov["answer_ms"]
steps = pd.read_csv(out / "calibration_steps.csv")
steps["fit"] = cal["time_scale"] * steps.model_s + cal["extra_s"] + steps.arrivals * cal["arrival_s"]
res = pd.read_csv(out / "results.csv")
M = ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")
orig = st.NoisyStepTime.step_s, st.NoisyStepTime.decode_run_ends
SP = {}
def step_s(self, step):
    i = int(self._walk.next()) - 1
    return max(self.inner.step_s(step) * SP["s"][i] + SP["p"][i], 0.05e-3)
def decode_run_ends(self, decodes, context, steps):
    ii = self._walk.take(steps).astype(int) - 1
    base = np.fromiter((self._one(decodes, context + j * decodes) for j in range(steps)), float, steps)
    return np.cumsum(np.maximum(base * SP["s"][ii] + SP["p"][ii], 0.05e-3))
def run(level, noise, ing):
    rows = []
    for seed in range(3):
        sc = level_scenario(spec, out / "profile.csv", level * cap, cal["time_scale"], spec.num_blocks,
                            cal["arrival_s"] * 1e3, noise, answer, 64, *ing)
        r = simulate(sc, seed=seed).requests
        r = r[(r.outcome == "ok") & (r.arrival_s >= sc.warmup_s) & (r.arrival_s < sc.horizon_s)]
        rows.append(r.assign(ttft=r.first_token_s - r.arrival_s))
    r = pd.concat(rows)
    return [np.percentile(r.ttft, 50), np.percentile(r.ttft, 99), np.nanpercentile(r.itl_s, 50), np.nanpercentile(r.itl_s, 99)]
for level in spec.levels:
    real = res[(res.level == level) & (res.cache == "full") & (res.sim_at == "calibration")].set_index("metric")
    rv = [real.loc[m, "real"] for m in M]
    ing = ingress_from(np.asarray(cal["way_in_s"][f"open {level:.0%}"]))
    g = steps[steps.run == f"open {level:.0%}"]
    own = step_noise(g.cycle_s, g.fit)
    c, f = g.cycle_s.to_numpy(), g.fit.to_numpy()
    edges = np.arange(0, len(c), window)
    sp = np.repeat(np.add.reduceat(c, edges) / np.add.reduceat(f, edges), np.diff(np.append(edges, len(c))))
    print(f"level {level:.0%}: real " + " ".join(f"{v*1e3:.3f}" for v in rv) + f"  (own steps {len(g)}, own p99 factor {np.percentile(own, 99):.2f}, pooled {np.percentile(cal['cycle_noise'], 99):.2f})")
    st.NoisyStepTime.step_s, st.NoisyStepTime.decode_run_ends = orig
    for name, noise in (("pooled factor", tuple(cal["cycle_noise"])), ("own factor", own)):
        v = run(level, noise, ing)
        print(f"  {name:>14}: " + " ".join(f"{x*1e3:.3f} ({x/r-1:+.0%})" for x, r in zip(v, rv)))
    SP["s"], SP["p"] = sp / sp.mean(), c - f * sp
    st.NoisyStepTime.step_s, st.NoisyStepTime.decode_run_ends = step_s, decode_run_ends
    v = run(level, tuple(float(i + 1) for i in range(len(c))), ing)
    print(f"  {'own pause':>14}: " + " ".join(f"{x*1e3:.3f} ({x/r-1:+.0%})" for x, r in zip(v, rv)))

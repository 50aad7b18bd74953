"""A/B on the same real turns: each fleet-probe and run-speed simulation of `capsim validate --mode sessions`
run with the measured ingress spread drawn at random (block 1, as committed; "random"), walked in blocks of
10 and of 50 turns ("block10", "block50": service.ingress_noise_block), and with its mean alone ("mean").

    python ab.py DIR [VARIANTS]      # VARIANTS: comma-separated, default all four; runs 4 to 6 took random,mean

Writes the validation's own files, ab.csv (the TTFT per policy, sim_at and variant) and frames.pkl (the
real turns and the simulated scenarios, to replay offline)."""
import importlib
import os
import pickle
import sys
from pathlib import Path

import pandas as pd

import capsim.studies.validate_sessions as vsn
from capsim.studies import validate_stats as vs

simmod = importlib.import_module("capsim.sim.simulate")  # the module: capsim.sim exports a function of that name

VARIANTS = {"random": {}, "block10": {"service.ingress_noise_block": 10},
            "block50": {"service.ingress_noise_block": 50}, "mean": {"service.ingress_noise": None}}
if len(sys.argv) > 2:
    VARIANTS = {v: VARIANTS[v] for v in sys.argv[2].split(",")}
calls = []  # (policy, seed, scenario, {variant: frame})
reals = {}
orig_sim = simmod.simulate
orig_send = vsn.send_sessions

def sim(sc, seed=0, **kw):
    r = orig_sim(sc, seed=seed, **kw)
    if sc.service.ingress_noise is not None:
        frames = {v: (r.requests if not o else orig_sim(sc.override(o), seed=seed, **kw).requests)
                  for v, o in VARIANTS.items()}
        calls.append((sc.router.kind, seed, sc, frames))
    return r

def send(fleet, scenario, seed, turns, vocab):
    out = orig_send(fleet, scenario, seed, turns, vocab)
    reals[(scenario.router.kind, seed)] = out.real
    return out

simmod.simulate = sim
vsn.send_sessions = send
out = Path(sys.argv[1])
spec = vsn.SessionsSpec.quick() if os.environ.get("ABQ") else vsn.SessionsSpec()
vsn.run_sessions_validation(spec, out_dir=out)
with open(out / "frames.pkl", "wb") as fh:
    pickle.dump({"reals": reals, "calls": [(p, s, sc.model_dump(mode="json")) for p, s, sc, _ in calls],
                 "spec": spec}, fh)
rows = []
for policy in ("session_affinity", "round_robin"):
    mine = [c for c in calls if c[0] == policy]
    for k, label in ((0, "fleet probe"), (1, "run speed")):
        sel = mine[k::2]
        real = vs.pool([vs.cut_blocks(reals[(policy, c[1])], spec.warmup_s, spec.arrival_s) for c in sel])
        for variant in VARIANTS:
            sim_ = vs.pool([vs.cut_blocks(c[3][variant], spec.warmup_s, spec.arrival_s) for c in sel])
            for m in ("ttft_p50_s", "ttft_p99_s"):
                rows.append({"policy": policy, "sim_at": label, "ingress": variant, "metric": m,
                             "real_ms": vs.interval(real, m).value * 1e3, "sim_ms": vs.interval(sim_, m).value * 1e3,
                             "error": vs.error_interval(real, sim_, m).value})
df = pd.DataFrame(rows)
df.to_csv(out / "ab.csv", index=False)
print(df.pivot_table(index=["policy", "sim_at", "metric"], columns="ingress", values="error").round(3).to_string())

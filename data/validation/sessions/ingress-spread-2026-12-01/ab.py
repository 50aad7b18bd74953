"""A/B on the same real turns: each fleet-probe and run-speed simulation of `capsim validate --mode sessions`
run twice, with the measured ingress spread (service.ingress_noise, as committed) and with its mean alone."""
import sys, json
from pathlib import Path
import importlib, os
simmod = importlib.import_module("capsim.sim.simulate")
import capsim.studies.validate_sessions as vsn
from capsim.studies import validate_stats as vs

calls = []  # (policy, seed, noisy frame, mean frame)
reals = {}
orig_sim = simmod.simulate
orig_send = vsn.send_sessions

def sim(sc, seed=0, **kw):
    r = orig_sim(sc, seed=seed, **kw)
    if sc.service.ingress_noise is not None:
        plain = sc.override({"service.ingress_noise": None})
        calls.append((sc.router.kind, seed, r.requests, orig_sim(plain, seed=seed, **kw).requests))
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
rows = []
for policy in ("session_affinity", "round_robin"):
    mine = [c for c in calls if c[0] == policy]
    # per replication: the fleet-probe simulation first, then the run-speed one
    for k, label in ((0, "fleet probe"), (1, "run speed")):
        sel = mine[k::2]
        real = vs.pool([vs.cut_blocks(reals[(policy, c[1])], spec.warmup_s, spec.arrival_s) for c in sel])
        for variant, j in (("spread", 2), ("mean", 3)):
            sim = vs.pool([vs.cut_blocks(c[j], spec.warmup_s, spec.arrival_s) for c in sel])
            for m in ("ttft_p50_s", "ttft_p99_s"):
                rows.append({"policy": policy, "sim_at": label, "ingress": variant, "metric": m,
                             "real_ms": vs.interval(real, m).value * 1e3, "sim_ms": vs.interval(sim, m).value * 1e3,
                             "error": vs.error_interval(real, sim, m).value})
import pandas as pd
df = pd.DataFrame(rows)
df.to_csv(out / "ab.csv", index=False)
print(df.to_string())

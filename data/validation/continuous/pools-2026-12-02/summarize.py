"""Summarize N continuous-validation runs: targets met per sim_at and each metric's error per run."""
import sys
from pathlib import Path
import numpy as np
import pandas as pd
sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "src"))
from capsim.studies.validate_continuous import TARGET_METRICS, target_for

dirs = [Path(d) for d in sys.argv[1:]]
frames = [pd.read_csv(d / "results.csv") for d in dirs]
ats = list(dict.fromkeys(frames[0].sim_at))
print("| simulated at | " + " | ".join(f"run {i+1}" for i in range(len(dirs))) + " | median |")
print("|---|" + "---|" * (len(dirs) + 1))
for at in ats:
    counts = []
    for f in frames:
        g = f[(f.sim_at == at) & f.metric.isin(TARGET_METRICS)]
        counts.append(int(sum(abs(r.rel_error) <= target_for(r.metric) for r in g.itertuples() if np.isfinite(r.rel_error))))
    print(f"| {at} | " + " | ".join(map(str, counts)) + f" | {np.median(counts):g} |")
for at in ats:
    print(f"\n**Simulated at {at}**\n")
    print("| level | metric | target | " + " | ".join(f"run {i+1}" for i in range(len(dirs))) + " | median | spread |")
    print("|---|---|---|" + "---|" * (len(dirs) + 2))
    keys = frames[0][frames[0].sim_at == at][["level", "cache", "metric"]].drop_duplicates()
    for k in keys.itertuples():
        vals, cells = [], []
        for f in frames:
            r = f[(f.sim_at == at) & (f.level == k.level) & (f.cache == k.cache) & (f.metric == k.metric)]
            if not len(r):
                cells.append("-"); continue
            r = r.iloc[0]
            if k.metric == "preemptions":
                cells.append(f"{r.real:.0f}/{r.sim:.0f}"); continue
            t = target_for(k.metric) if k.metric in TARGET_METRICS else None
            mark = "" if t is None else (" ✓" if abs(r.rel_error) <= t else " ✗")
            vals.append(r.rel_error); cells.append(f"{r.rel_error:+.1%}{mark}")
        cache = "full" if k.cache == "full" else "small"
        med = f"{np.median(vals):+.1%}" if vals else ""
        spread = f"{(max(vals) - min(vals)) * 100:.1f} pts" if vals else ""
        t = target_for(k.metric) if k.metric in TARGET_METRICS else None
        print(f"| {k.level:.0%} {cache} | {k.metric} | {'' if t is None else f'{t:.0%}'} | " + " | ".join(cells) + f" | {med} | {spread} |")

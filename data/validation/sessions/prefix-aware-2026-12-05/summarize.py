# Tables of data/validation/sessions/prefix-aware-2026-12-05/README.md: python summarize.py run1 run2 (from this folder)
import sys

import pandas as pd

runs = sys.argv[1:]
for fname in ("results.csv", "crash.csv"):
    frames = {r: pd.read_csv(f"{r}/{fname}") for r in runs}
    print(f"\n### {fname}\n")
    print("| policy | sim at | metric | " + " | ".join(f"run {i+1} real / sim (error)" for i in range(len(runs))) + " |")
    print("|---|---|---|" + "---|" * len(runs))
    base = frames[runs[0]]
    for _, row in base.iterrows():
        if row.metric not in ("ttft_p50_s", "ttft_p99_s", "throughput_per_s", "hit_rate", "failed_turns", "held_turns"):
            continue
        cells = []
        for r in runs:
            f = frames[r]
            x = f[(f.policy == row.policy) & (f.sim_at == row.sim_at) & (f.metric == row.metric)].iloc[0]
            if row.metric.startswith("ttft"):
                c = f"{x.real*1000:.1f} / {x.sim*1000:.1f} ms ({x.error:+.1%}){' ✓' if x.met else ' ✗' if not x.met else ''}"
            elif row.metric == "throughput_per_s":
                c = f"{x.real:.1f} / {x.sim:.1f} ({x.error:+.1%}){' ✓' if x.met else ' ✗' if not x.met else ''}"
            elif row.metric == "hit_rate":
                c = f"{x.real:.4f} / {x.sim:.4f}{' ✓' if x.met else ' ✗' if not x.met else ''}"
            else:
                c = f"{x.real:g} / {x.sim:g}"
            cells.append(c)
        print(f"| `{row.policy}` | {row.sim_at} | {row.metric} | " + " | ".join(cells) + " |")
    print()
    for r in runs:
        f = frames[r]
        t = f[f.target.notna()]
        print(r, fname, "targets met by sim_at:", {k: f"{int(g.met.sum())}/{len(g)}" for k, g in t.groupby("sim_at", sort=False)},
              "by policy@calibration:", {k: f"{int(g.met.sum())}/{len(g)}" for k, g in t[t.sim_at=='calibration'].groupby('policy', sort=False)})

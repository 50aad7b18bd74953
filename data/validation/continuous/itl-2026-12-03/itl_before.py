import json, sys
import numpy as np, pandas as pd
for d in sys.argv[1:]:
    r = pd.read_csv(f"{d}/results.csv"); a = json.load(open(f"{d}/provenance.json"))["answer_ms"]
    g = r[r.metric == "itl_p50_s"]
    out = []
    for at in ("calibration", "run speed", "run replay"):
        h = g[g.sim_at == at]
        new = h.sim / h.real - 1; old = (h.sim + a / 1e3 / 31) / h.real - 1
        out.append(f"{at}: " + ", ".join(f"{l:.0%}{c[0]} {o:+.1%}->{n:+.1%}" for l, c, o, n in zip(h.level, h.cache, old, new)))
    print(d, f"answer {a:.2f} ms;", " | ".join(out))

"""Profile stability: the validation's quick CPU profile, one pass against shuffled rounds, alternating.

    .venv/bin/python data/validation/stop33/profile_stability.py [PAIRS] [OUT_DIR]   # about 12 s a pair here
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from capsim.model.profile import ServiceTimeProfile

pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 4
out = Path(sys.argv[2] if len(sys.argv) > 2 else "profile-stability-out")
out.mkdir(exist_ok=True)
PROMPT, OUTPUT = 64, 128  # the validation's request shape
SIZES = np.arange(1, 17)
res: dict[str, list[dict]] = {"one pass": [], "rounds": []}
for k in range(pairs):
    for mode in (("one pass", "rounds") if k % 2 == 0 else ("rounds", "one pass")):
        d = out / f"{k}-{mode.replace(' ', '')}"
        cmd = [sys.executable, "-m", "capsim.cli", "profile", "--quick", "--model", "tiny", "--device", "cpu",
               "--max-batch-size", "16", "--threads", "1", "--prompt-tokens", "32,64,128",
               "--context-tokens", "32,64,192,384", "--out-dir", str(d)]
        if mode == "rounds":
            cmd.append("--interleave")
        t0 = time.perf_counter()
        subprocess.run(["taskset", "-c", "0", *cmd], check=True, capture_output=True)
        wall = time.perf_counter() - t0
        prof = ServiceTimeProfile.from_csv(d / "cpu-tiny-float32-quick.csv")
        t = np.array([prof.batch_timing(int(b), PROMPT, OUTPUT).total_s for b in SIZES]) * 1e3
        line = np.polyval(np.polyfit(SIZES, t, 1), SIZES)
        rms = float(np.sqrt(np.mean((line - t) ** 2)) / t.mean())
        drops = int(np.sum(np.diff(t) < 0))
        res[mode].append({"wall_s": wall, "t1": t[0], "t16": t[15], "rms": rms, "drops": drops, "t": t.tolist()})
        print(f"{k} {mode:8s} wall {wall:5.1f} s  batch 1 {t[0]:6.1f} ms  16 {t[15]:6.1f} ms  16/1 {t[15] / t[0]:.2f}  "
              f"linear-fit rms {rms:.1%}  decreasing steps {drops}", flush=True)
(out / "results.json").write_text(json.dumps(res))
for mode, rs in res.items():
    ratio = np.array([x["t16"] / x["t1"] for x in rs])
    rms = np.array([x["rms"] for x in rs])
    print(f"{mode:8s} 16/1 median {np.median(ratio):.2f} (range {ratio.min():.2f}-{ratio.max():.2f}); linear rms "
          f"median {np.median(rms):.1%} (range {rms.min():.1%}-{rms.max():.1%}); decreasing steps "
          f"{[x['drops'] for x in rs]}")

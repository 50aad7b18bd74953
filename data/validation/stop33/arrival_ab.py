"""Run 1's kept real runs simulated twice, with the probe's arrival term (as the run had it) and with the
closed loop's (0.00 ms), nothing else changed: the same-runs comparison in README.md.

    .venv/bin/python data/validation/stop33/arrival_ab.py OUT      # about 80 s; writes OUT/probe, OUT/closed
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from capsim.studies.validate_report import verdicts

src = Path(__file__).parent / "run1"
out = Path(sys.argv[1] if len(sys.argv) > 1 else "arrival-ab-out")
for name, arrival_s in (("probe", None), ("closed", 0.0)):
    kept = out / f"{name}-kept"
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(src, kept)
    prov = json.loads((kept / "provenance.json").read_text())
    if arrival_s is not None:
        prov["calibration"]["arrival_overhead_s"] = arrival_s
        (kept / "provenance.json").write_text(json.dumps(prov))
    subprocess.run([sys.executable, "-m", "capsim.cli", "validate", "--from-runs", str(kept), "--out-dir",
                    str(out / name)], check=True, stdout=subprocess.DEVNULL)
    results = pd.read_csv(out / name / "results.csv")
    checks = verdicts(results)
    ttft = results[results.metric == "ttft_p50_s"].set_index("level").rel_error
    print(f"{name:6s} arrival term {prov['calibration']['arrival_overhead_s'] * 1e3:.2f} ms: targets met "
          f"{sum(ok for _, ok in checks)} of {len(checks)}; TTFT p50 error "
          + ", ".join(f"{level:.0%} {err:+.1%}" for level, err in ttft.items()), flush=True)

"""Stop 38: a static validation's kept runs simulated again with the answers' way out and the first token's
place (``probe_answers``), and optionally also at the open-loop probe's mean speed (stop 37's idea).

    .venv/bin/python data/validation/stop38/answers_exp.py VALDIR OUTDIR [answers|none|speed]

``answers`` (the default) as described; ``none`` without them (the model before stop 38, on the same runs);
``speed`` with them and at the probe's speed (``capsim validate`` since stop 38). A calibration kept at the
probe's speed (``open_loop_speed``) is taken back to the closed loop's fit first.

VALDIR is a ``capsim validate --mode static --out-dir VALDIR`` folder (it keeps ``runs/``). A folder made
before stop 38 kept no probe requests: the 60% level's first replication stands in for the probe (an
in-sample stand-in, said in docs/validation.md); a later one's calibration has them already."""
import json, shutil, sys
from pathlib import Path
from dataclasses import asdict
from capsim.studies.validate import resimulate, _at_speed, ValidationSpec
from capsim.studies.validate_runs import load_traces, read_provenance, calibration_fields, spec_fields, load_runs
from capsim.studies.validate_calibrate import Calibration, trace_rows, open_loop_noise, probe_answers
from capsim.model.profile import ServiceTimeProfile

from dataclasses import replace
src = Path(sys.argv[1]); dst = Path(sys.argv[2]); mode = sys.argv[3] if len(sys.argv) > 3 else "answers"
speed = mode == "speed"
prov = read_provenance(src)
cal = Calibration(**calibration_fields(prov["calibration"]))
spec = ValidationSpec(**spec_fields(prov["spec"]))
profile = ServiceTimeProfile.from_csv(src / "profile.csv")
timing = lambda b: profile.batch_timing(b, spec.prompt_tokens, spec.output_tokens)
from capsim.studies.validate_runs import probe_frame
kept = load_traces(src)
if cal.open_loop_speed != 1.0:  # kept at the probe's speed (since stop 38): back to the closed loop's fit
    cal = replace(_at_speed(cal, 1.0 / cal.open_loop_speed), open_loop_speed=1.0)
if speed:  # the calibration at the probe's speed, and the first token measured against that
    _, ratio = open_loop_noise(cal, trace_rows(kept["probe"], lambda b: timing(b).total_s))
    print("probe speed", ratio)
    cal = replace(_at_speed(cal, ratio), open_loop_speed=ratio)
if "probe_requests" in kept:
    print("the kept probe")
    frame, trace = probe_frame(kept["probe_requests"]), kept["probe"]
else:
    stand = [r for r in load_runs(src) if abs(r.level - 0.6) < 1e-9 and r.replication == 0][0]
    frame, trace = stand.requests, stand.trace
new = probe_answers(cal, frame, trace, lambda b: timing(b).prefill_s)
print(src, "answers", new.answer_s * 1e3, new.answer_per_request_s * 1e3, "first token scale", new.first_token_scale)
if mode == "none":
    new = replace(new, answer_s=0.0, answer_per_request_s=0.0, first_token_scale=1.0)
tmp = dst.with_name(dst.name + "-src")
if tmp.exists(): shutil.rmtree(tmp)
shutil.copytree(src, tmp)
p = json.loads((tmp / "provenance.json").read_text())
p["calibration"] = json.loads(json.dumps(asdict(new), default=str))
(tmp / "provenance.json").write_text(json.dumps(p, indent=2, default=str))
resimulate(tmp, dst, echo=lambda s: None)
out = json.loads((dst / "provenance.json").read_text())
import pandas as pd
r = pd.read_csv(dst / "results.csv")
from capsim.studies.validate_report import verdicts
checks = verdicts(r)
print("targets met", sum(ok for _, ok in checks), "of", len(checks), "| by entry",
      {k: v["met"] for k, v in out["targets_by_entry"].items()})
print(r[r.metric.str.contains("p50")][["level", "metric", "rel_error"]].to_string())

"""One sessions validation: "after" (this code: three open-loop calibration runs, the fit through them, the
prefill scale) or "before" (one open-loop run at 0.5, the fit through every run, no prefill scale).

    .venv/bin/python run.py after|before OUT_DIR
"""
import sys
from dataclasses import replace
from capsim.studies.validate_sessions import SessionsSpec, run_sessions_validation
kind, out = sys.argv[1], sys.argv[2]
spec = SessionsSpec()
if kind == "before":
    spec = replace(spec, calibration_levels=(0.5,), open_loop_fit=False, prefill_scale=False)
run_sessions_validation(spec, out_dir=out)

"""The calibration of each run DIR fitted again from its calibration_steps.csv: through all runs (as before stop 39)
and through the open-loop runs (open_loop_fit); each run's mean cycle over the fit."""
import sys, json, pandas as pd
from capsim.model.step_model import StepTimeFit
from capsim.model.profile import ServiceTimeProfile
import capsim.studies.validate_continuous_cycle as vcc
from capsim.studies.validate_continuous_cycle import fit_step_cycles
vcc.cycles = lambda steps, fit: steps  # the kept frame is already cycles()
for d in sys.argv[1:]:
    prov = json.load(open(f"{d}/provenance.json"))
    fit = StepTimeFit.from_dict(prov["step_fit"])
    f = pd.read_csv(f"{d}/calibration_steps.csv")
    cols = [c for c in f.columns if c != "run"]
    runs = [(label, g[cols].reset_index(drop=True)) for label, g in f.groupby("run", sort=False)]
    for through in ([], [l for l, _ in runs if l.startswith("open")]):
        cal = fit_step_cycles(runs, fit, through=through)
        print(d, cal.describe()[:200])
        print("   ", ", ".join(f"{p[0]} {p[3]/p[4]:.3f}" for p in cal.points), "noise", len(cal.cycle_noise))

"""Does the continuous calibration's time per arrival carry the reverse-causality bias of stop 33?

``validate_continuous_cycle.arrival_within_runs`` fits each step's cycle on its arrivals within each run.
In an open-loop run the arrivals a step counts fall in the window its own cycle spans, so a cycle the
machine made long counts more arrivals whatever an arrival costs. In a closed loop the arrivals are the
previous step's answers coming back, set before the cycle starts. This draws steps of the sizes stop 32's
calibration measured (its run 1's mean cycles and arrivals per step at 30%, 60% and 85% and at 8 and 16
clients), with a multiplicative noise of coefficient of variation ``CV`` and a share ``SPIKES`` of steps
1.5 to 3 times as long, and fits them with and without a true cost per arrival.

    .venv/bin/python data/validation/stop34/arrival_bias_mc.py [SEEDS] [CV] [SPIKES]

It leaves out the closed loop's spill (an answer whose way back is longer than the next cycle arrives in
the one after), which would give the closed runs a bias of their own.
"""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from capsim.studies.validate_continuous_cycle import arrival_within_runs

OPEN = {"open 30%": (0.00074, 65.0), "open 60%": (0.00128, 138.0), "open 85%": (0.00166, 165.0)}  # cycle s, rate/s
CLOSED = {"closed 8": (0.0013, 0.2), "closed 16": (0.0021, 0.4)}  # cycle s, arrivals a step


def steps(rng: np.random.Generator, label: str, mean_cycle: float, cost: float, cv: float, spikes: float,
          rate: float | None = None, per_step: float | None = None, n: int = 2000) -> pd.DataFrame:
    model = mean_cycle / 1.3 * rng.lognormal(0.0, 0.05, n)  # the steps' model time varies a little
    base = (1.2 * model + 0.0002) * rng.lognormal(-cv ** 2 / 2, cv, n)
    base = np.where(rng.random(n) < spikes, base * rng.uniform(1.5, 3.0, n), base)
    if rate is not None:  # open loop: Poisson arrivals over the window, and over the time they add
        first = rng.poisson(rate * base)
        arrivals = first + rng.poisson(rate * cost * first)
    else:
        arrivals = rng.poisson(per_step, n)
    return pd.DataFrame({"cycle_s": base + cost * arrivals, "model_s": model, "arrivals": arrivals, "run": label})


def main(seeds: int = 5, cv: float = 0.25, spikes: float = 0.02) -> None:
    print(f"CV {cv}, spikes {spikes:.0%}; fitted time per arrival, ms (median of {seeds} seeds, min-max)")
    print("| true ms | open runs | closed runs | all runs (as the calibration fits) |\n|---|---|---|---|")
    for cost in (0.0, 0.0003):
        got: dict[str, list[float]] = {"open": [], "closed": [], "all": []}
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            opened = pd.concat([steps(rng, k, c, cost, cv, spikes, rate=r) for k, (c, r) in OPEN.items()])
            closed = pd.concat([steps(rng, k, c, cost, cv, spikes, per_step=a) for k, (c, a) in CLOSED.items()])
            for name, frame in (("open", opened), ("closed", closed), ("all", pd.concat([opened, closed]))):
                got[name].append(arrival_within_runs(frame) * 1e3)
        cells = [f"{np.median(v):.3f} ({min(v):.3f}-{max(v):.3f})" for v in got.values()]
        print(f"| {cost * 1e3:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]) if args else 5, float(args[1]) if len(args) > 1 else 0.25,
         float(args[2]) if len(args) > 2 else 0.02)

"""What ``capsim sweep``, ``capsim capacity`` and ``capsim tune`` do, behind the thin typer shells.

Each function takes plain values and an ``echo`` for its report, writes its files and raises
``SettingsError`` (or ``ValueError``) for bad input, which the command line turns into a usage error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError

Echo = Callable[[str], Any]


def run_sweep(scenario: Path, grid: Path, seeds: int, out: Path, executor: str | None, cache: bool,
              echo: Echo) -> None:
    """Sweep, then write runs.csv (one row per setting and seed), settings.csv (aggregated) and provenance."""
    from capsim.studies.sweep import aggregate, load_grid, sweep

    frame = sweep(scenario, load_grid(grid), seeds, executor=executor, progress=True, cache=cache)
    agg = aggregate(frame)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "runs.csv", index=False)
    agg.to_csv(out / "settings.csv", index=False)
    (out / "provenance.json").write_text(json.dumps({**frame.attrs["provenance"], "runs": frame.attrs["runs"]},
                                                    indent=2, default=str))
    labels = list(frame.columns[frame.columns.get_loc("setting"):frame.columns.get_loc("seed")])
    cols = [*labels, "n", "errors", "slo_met_all", "ttft_p99_s_mean", "ttft_p99_s_ci_high", "cost_mean"]
    echo(agg[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    r = frame.attrs["runs"]
    echo(f"{len(frame)} runs: {r['computed']} computed, {r['cached']} from the cache, {r['failed']} failed")
    echo(f"wrote {out}/runs.csv, settings.csv, provenance.json")


def run_capacity(scenario: Path, replicas: int | None, seeds: int, horizon_s: float | None, rel_tol: float,
                 cache: bool, echo: Echo, grid: Path | None = None) -> None:
    """Bisect, then print the rate with the runs that prove it (with a grid: one rate per setting)."""
    from capsim.studies.capacity import capacity, capacity_per_setting
    from capsim.studies.sweep import load_grid

    sc = Scenario.from_yaml(scenario)
    if horizon_s is not None:
        sc = sc.override({"horizon_s": horizon_s, "warmup_s": min(sc.warmup_s, horizon_s / 10)})
    if grid is not None:
        table = capacity_per_setting(sc, load_grid(grid), replicas=replicas, seeds=seeds, rel_tol=rel_tol,
                                     cache=cache)
        echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        return
    result = capacity(sc, replicas=replicas, seeds=seeds, rel_tol=rel_tol, cache=cache)
    for p in result.probes:
        verdict = "meets the SLO" if p.passed else ("fails: " + (p.error or "misses the SLO"))
        echo(f"  {p.rate_per_s:10.3f} sessions/s  worst p99 TTFT {p.ttft_p99_s:8.4f} s  "
             f"error rate {p.error_rate:.3%}  {verdict}")
    turns = sc.workload.sessions.turns
    echo(f"capacity of {result.replicas} pod(s): {result.rate_per_s:.3f} sessions/s = "
         f"{result.requests_per_s:.3f} requests/s ({turns} turn(s) a session), SLO p99 TTFT "
         f"{sc.slo.ttft_p99_s:g} s, error rate <= {sc.slo.max_error_rate:.3%}")
    for seed, s in zip(result.provenance["seeds"], result.proof, strict=False):
        echo(f"  proof, seed {seed}: {s['arrived']} requests, p99 TTFT {s['ttft_p99_s']:.4f} s, "
             f"error rate {s['error_rate']:.3%}, mean batch {s['mean_batch_size']:.2f}")


def run_tune(scenario: Path | None, space: Path, out: Path, *, seeds: int | None, budget: int | None,
             objective: str | None, stresses: Sequence[str], executor: str | None, sampler_seed: int,
             cache: bool, echo: Echo) -> None:
    """Tune, write best.yaml, trials.csv, front.csv, front.png and provenance.json, print the choice."""
    from capsim.studies.space import load_space
    from capsim.studies.tune import tune

    sp = load_space(space)
    path = scenario or sp.scenario
    if path is None:
        raise SettingsError(f"{space} names no scenario: pass SCENARIO")
    result = tune(path, sp, seeds=seeds, stresses=list(stresses), objective=objective, budget=budget,
                  executor=executor, sampler_seed=sampler_seed, cache=cache, progress=True)
    files = result.write(out)
    p = result.provenance
    echo(f"{p['budget']} settings: {p['accepted']} met the SLO in every stress and seed, {p['rejected']} "
         f"rejected, {p['dominated']} stopped as dominated; {p['runs']} runs")
    if result.best is None:
        echo("no setting met the SLO under every stress: widen the space (more replicas, lower targets)")
        reasons = result.trials.drop_duplicates("trial")["reason"].value_counts().head(5)
        for reason, n in reasons.items():
            echo(f"  {n} x {reason}")
    else:
        echo("best: " + ", ".join(f"{k}={v}" for k, v in result.best_params.items()))
        echo(result.front.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    echo("wrote " + ", ".join(str(f) for f in files))

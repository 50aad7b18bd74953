"""What ``capsim sweep``, ``capsim capacity``, ``capsim tune`` and ``capsim simulate --seeds`` do, behind the
thin typer shells; ``--set`` overrides (:func:`parse_sets`, :func:`load_scenario`).

Each function takes plain values and an ``echo`` for its report, writes its files and raises
``SettingsError`` (or ``ValueError``) for bad input, which the command line turns into a usage error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError

Echo = Callable[[str], Any]


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
    """``--set PATH=VALUE`` options -> dotted overrides; each value is read as YAML (``4`` an int, ``true`` a
    bool, ``[1, 2]`` a list, ``{kind: constant, value: 8}`` a section, ``null`` none: a section left out). A path that names no setting is a
    ``SettingsError`` naming the option and the closest known setting; a later ``--set`` of the same path
    wins, as a later ``include`` does."""
    import yaml

    from capsim.studies.sweep import check_paths

    out: dict[str, Any] = {}
    for item in sets:
        path, eq, text = item.partition("=")
        path = path.strip()
        if not eq or not path:
            raise SettingsError(f"--set {item!r}: expected PATH=VALUE, e.g. --set pods.replicas=4")
        if not text.strip():
            raise SettingsError(f"--set {path}: no value after '=' (null clears a setting that may be none)")
        try:
            value = yaml.safe_load(text)  # null: none, for a section or setting that may be left out
        except yaml.YAMLError as exc:
            why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise SettingsError(f"--set {path}: the value {text!r} is not YAML ({why})") from None
        check_paths([path], f"--set {path}")
        out[path] = value
    return out


def load_scenario(path: Path, sets: Sequence[str] = ()) -> Scenario:
    """The scenario file with ``--set`` overrides applied; a value that does not validate names its path."""
    sc = Scenario.from_yaml(path)
    changes = parse_sets(sets)
    if not changes:
        return sc
    try:
        return sc.override(changes)
    except SettingsError as exc:
        raise SettingsError(f"{path}: with --set {', '.join(f'{k}={v!r}' for k, v in changes.items())}: {exc}") \
            from None


def run_seeds(sc: Scenario, seeds: Sequence[int], out: Path | None, echo: Echo) -> None:
    """Simulate ``sc`` under each seed (in parallel, no cache; a progress bar on a terminal); print each summary
    field's median and range over the seeds (booleans: how many seeds met); with ``out``, write runs.csv (a
    row per seed) and summary.json. A seed whose run raises is an error naming it, after the others have run;
    an error every seed shares is the scenario's, told once."""
    import numpy as np
    import pandas as pd

    from capsim.studies.sweep import sweep

    frame = sweep(sc, {}, list(seeds), progress=sys.stderr.isatty(), cache=False)
    provenance = frame.attrs.get("provenance", {})
    bad = frame[frame["error"].notna()]
    if len(bad) == len(frame) and bad["error"].nunique() == 1:  # the scenario's, not a seed's: say it once
        raise SettingsError(str(bad["error"].iloc[0]))
    if len(bad):
        raise SettingsError("; ".join(f"seed {r.seed}: {r.error}" for r in bad.itertuples()))
    frame = frame.drop(columns=["setting", "error", "key"])
    fields = [c for c in frame.columns if c != "seed"]
    stats: dict[str, dict[str, Any]] = {}
    lines = []
    width = max(len(f) for f in fields)
    n = len(frame)
    lines.append(f"{'':<{width}}  {'median':>10}  {'min':>10}  {'max':>10}   ({n} seeds: {', '.join(map(str, seeds))})")
    for f in fields:
        col = frame[f]
        if col.dtype == bool or col.map(lambda v: isinstance(v, bool | np.bool_)).all():
            met = int(col.astype(bool).sum())
            stats[f] = {"true": met, "of": n}
            lines.append(f"{f:<{width}}  {f'{met}/{n}':>10}")
            continue
        v = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
        med, lo, hi = (float(np.nanmedian(v)), float(np.nanmin(v)), float(np.nanmax(v))) \
            if not np.isnan(v).all() else (float("nan"),) * 3
        stats[f] = {"median": med, "min": lo, "max": hi}
        lines.append(f"{f:<{width}}  {med:>10.4g}  {lo:>10.4g}  {hi:>10.4g}")
    for line in lines:
        echo(line)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out / "runs.csv", index=False)
        (out / "summary.json").write_text(json.dumps(
            {"seeds": list(seeds), "summary": stats, "provenance": provenance},
            indent=2, default=str))
        echo(f"wrote {out}/runs.csv, summary.json")


def run_sweep(scenario: Path | Scenario, grid: Path, seeds: int, out: Path, executor: str | None, cache: bool,
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


def run_capacity(scenario: Path | Scenario, replicas: int | None, seeds: int, horizon_s: float | None, rel_tol: float,
                 cache: bool, echo: Echo, grid: Path | None = None) -> None:
    """Bisect, then print the rate with the runs that prove it (with a grid: one rate per setting)."""
    from capsim.studies.capacity import capacity, capacity_per_setting
    from capsim.studies.sweep import load_grid

    sc = scenario if isinstance(scenario, Scenario) else Scenario.from_yaml(scenario)
    if horizon_s is not None:
        sc = sc.override({"horizon_s": horizon_s, "warmup_s": min(sc.warmup_s, horizon_s / 10)})
    if grid is not None:
        table = capacity_per_setting(sc, load_grid(grid), replicas=replicas, seeds=seeds, rel_tol=rel_tol,
                                     cache=cache)
        echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        return
    result = capacity(sc, replicas=replicas, seeds=seeds, rel_tol=rel_tol, cache=cache)
    for p in result.probes:
        verdict = "meets the SLO" if p.passed else ("misses the SLO: " + (p.error or "?"))
        echo(f"  {p.rate_per_s:10.3f} sessions/s  worst p99 TTFT {p.ttft_p99_s:8.4f} s  "
             f"error rate {p.error_rate:.3%}  {verdict}")
    turns = sc.workload.sessions.turns
    echo(f"capacity of {result.replicas} pod(s): {result.rate_per_s:.3f} sessions/s = "
         f"{result.requests_per_s:.3f} requests/s ({turns} turn(s) a session), SLO p99 TTFT "
         f"{sc.slo.ttft_p99_s:g} s, error rate <= {sc.slo.max_error_rate:.3%}")
    for seed, s in zip(result.provenance["seeds"], result.proof, strict=False):
        echo(f"  proof, seed {seed}: {s['arrived']} requests, p99 TTFT {s['ttft_p99_s']:.4f} s, "
             f"error rate {s['error_rate']:.3%}, mean batch {s['mean_batch_size']:.2f}")


def run_headroom(scenario: Scenario, seeds: int, rel_tol: float, cache: bool, echo: Echo) -> None:
    """Bisect on the traffic's multiple, then print it with the runs that prove it."""
    from capsim.studies.capacity import headroom

    result = headroom(scenario, seeds=seeds, rel_tol=rel_tol, cache=cache, executor=None)  # seeds in parallel
    for p in result.probes:
        verdict = "meets the SLO" if p.passed else ("misses the SLO: " + (p.error or "?"))
        echo(f"  {p.scale:8.3f}x  worst p99 TTFT {p.ttft_p99_s:8.4f} s  error rate {p.error_rate:.3%}  {verdict}")
    today = next((p for p in result.probes if p.scale == 1.0), None)
    if result.scale >= 1.0:
        head = f"{result.scale:.3g} times its traffic ({result.scale - 1:+.0%})"
    elif result.scale > 0:
        head = f"only {result.scale:.3g} times its traffic: today's misses the SLO"
    else:
        head = "no multiple of its traffic tried: even the smallest misses the SLO"
    echo(f"headroom: the plan carries {head} within its SLO (p99 TTFT {scenario.slo.ttft_p99_s:g} s, error rate "
         f"<= {scenario.slo.max_error_rate:.3%}) under seeds {', '.join(map(str, result.provenance['seeds']))}"
         + ("" if today is None or not today.passed else
            f"; today's worst p99 TTFT {today.ttft_p99_s:.4g} s"))
    for seed, s in zip(result.provenance["seeds"], result.proof, strict=False):
        echo(f"  proof, seed {seed}: {s['arrived']} requests, p99 TTFT {s['ttft_p99_s']:.4f} s, error rate "
             f"{s['error_rate']:.3%}, most pods {s['max_replicas']}, cost {s['cost']:.2f}")
    checks = result.provenance.get("check_below") or []
    if result.scale > 0 and checks:
        at = ", ".join(f"{f:g}" for f in checks)
        below = result.failing_below
        if not below:
            echo(f"checked below it: {at} x the headroom met the SLO too")
        else:
            fails = ", ".join(f"{p.scale:.3g} ({p.error or '?'})" for p in below)
            echo(f"WARNING: passing is not monotone in the traffic here: the plan misses its SLO at {fails} times its "
                 f"traffic, below the {result.scale:.3g} the search found (an autoscaler's step, a retry storm); "
                 f"every multiple tried up to {result.safe_scale:.3g} met it: plan on that")


def run_tune(scenario: Path | None, space: Path, out: Path, *, seeds: int | None, budget: int | None,
             objective: str | None, stresses: Sequence[str], executor: str | None, sampler_seed: int,
             cache: bool, echo: Echo, sets: Sequence[str] = ()) -> None:
    """Tune, write best.yaml, trials.csv, front.csv, front.png and provenance.json, print the choice; ``sets``
    (``--set``) change the base scenario before the search."""
    from capsim.studies.space import load_space
    from capsim.studies.tune import tune

    sp = load_space(space)
    path = scenario or sp.scenario
    if path is None:
        raise SettingsError(f"{space} names no scenario: pass SCENARIO")
    result = tune(load_scenario(Path(path), sets), sp, seeds=seeds, stresses=list(stresses), objective=objective, budget=budget,
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

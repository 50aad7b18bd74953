"""Tuning: the cheapest batch and HPA settings that keep the SLO under every stress and every seed.

``tune(scenario, space)`` searches with Optuna's TPE sampler on two objectives -- cost (mean over every
stress and seed) and the worst p99 TTFT -- with a constraint: the setting passes the pre-deploy checks
and, in every run, meets the TTFT SLO and the error budget and loses no session. Each candidate is
evaluated as successive halving at its harshest: its runs go seed by seed through every stress, and the
first run that misses rejects it (naming the run and the reason), so a bad setting costs one run and
only the survivors pay for all of them. Candidates go to the executor in rounds as wide as it is; a
round's results are told to the sampler in trial order, so a given sampler seed and round width give
the same search on any executor. Every run goes through the sweep's content-addressed cache.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import capsim
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.studies.executors import ExecutorSpec, open_executor, workers_of
from capsim.studies.runs import DEFAULT_CACHE, portable, provenance, run_key, run_one, slo_miss
from capsim.studies.space import OBJECTIVES, Param, Space, as_quantity, load_space, parse_space, value_at
from capsim.studies.sweep import is_bundle, seed_list

#: the per-run numbers a trial keeps (the rest of the Summary is in the run cache); with ``slo.max_wake_s``
#: ``ttft_p99_s`` is the p99 that SLO judges (of the requests that found a pod) and ``longest_wake_s`` the wake
RUN_COLUMNS = ("ttft_p99_s", "error_rate", "lost_sessions", "abandoned_sessions", "cost", "gpu_hours",
               "max_replicas", "mean_batch_size", "arrived", "slo_met", "longest_wake_s")


@dataclass
class TuneResult:
    """``best`` (a full Scenario, None when nothing passed), ``trials`` (one row per run, and one per
    candidate rejected before running), ``front`` (the feasible Pareto front of cost against worst p99
    TTFT), and the search's provenance."""

    best: Scenario | None
    best_params: dict[str, Any]
    trials: Any
    front: Any
    stresses: dict[str, dict[str, Any]]
    provenance: dict[str, Any] = field(default_factory=dict)

    def write(self, out: str | Path) -> list[Path]:
        """Write best.yaml (runs as is with ``capsim simulate``), trials.csv, front.csv, front.png and
        provenance.json into ``out``; return the paths."""
        from capsim.studies.report import write_tune_result

        return write_tune_result(self, Path(out))


def tune(scenario: Scenario | str | Path, space: Space | Mapping[str, Any] | str | Path, *,
         seeds: int | Sequence[int] | None = None, stresses: Mapping[str, Mapping[str, Any]] | Sequence[str] = (),
         objective: str | None = None, budget: int | None = None, executor: ExecutorSpec = None,
         sampler_seed: int = 0, cache: bool | str | Path = True, progress: bool = True) -> TuneResult:
    """Search ``space`` on ``scenario``; see the module docstring. Defaults come from the space file
    (seeds 3, objective ``cost``, budget: the space's size capped at 50). ``stresses`` is a mapping of
    name -> dotted overrides, or names picked from the space file's; none at all means the base alone."""
    import optuna

    base = scenario if isinstance(scenario, Scenario) else Scenario.from_yaml(scenario)
    base = portable(base)
    sp = space if isinstance(space, Space) else (
        load_space(space) if isinstance(space, str | Path) else parse_space(space))
    seeds_ = seed_list(seeds if seeds is not None else (sp.seeds or 3))
    objective = objective or sp.objective or "cost"
    if objective not in OBJECTIVES:
        raise SettingsError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    stress_map = _stresses(stresses, sp)
    for name, changes in stress_map.items():  # a stress that does not apply to the base is a user error
        try:
            base.override(changes)
        except SettingsError as exc:
            raise SettingsError(f"stress {name!r}: {exc}") from None
    n_trials = budget or sp.budget or int(min(sp.size(), 50))
    cache_root = None if cache is False else str(DEFAULT_CACHE if cache is True else Path(cache))
    dumped = base.model_dump(mode="json", by_alias=True)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the sampler reads the feasibility constraint each trial sets (Trial.set_constraint, Optuna >= 5)
    sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=min(10, max(2, n_trials // 5)))
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    evaluated: dict[str, dict[str, Any]] = {}  # identical candidates are evaluated once
    records: list[dict[str, Any]] = []
    bar = _bar(n_trials, progress)
    with open_executor(executor, tasks=n_trials) as ex:
        width = max(1, workers_of(ex))
        done = 0
        while done < n_trials:
            front = [(r["cost"], r["ttft_p99_s"]) for r in records if r["status"] == "accepted"]
            round_ = [study.ask() for _ in range(min(width, n_trials - done))]
            jobs: list[tuple[Any, dict[str, Any], str, Future[dict[str, Any]] | None]] = []
            for trial in round_:
                params = {p.path: _suggest(trial, p) for p in sp.params}
                changes = _changes(sp.params, params, dumped)
                ident = json.dumps(changes, sort_keys=True, default=str)
                if ident in evaluated:
                    jobs.append((trial, params, ident, None))
                else:
                    fut = ex.submit(evaluate, base, changes, stress_map, seeds_, cache_root, front)
                    evaluated[ident] = {}  # placeholder: a twin in the same round waits for this one
                    jobs.append((trial, params, ident, fut))
            for _, _, ident, pending in jobs:
                if pending is not None:
                    evaluated[ident] = pending.result()
            for trial, params, ident, _ in jobs:
                out = evaluated[ident]
                trial.set_constraint("slo", out["constraint"])
                study.tell(trial, [out["cost"], out["ttft_p99_s"]])
                records.append({"trial": trial.number, "params": params, "changes": json.loads(ident), **out})
                done += 1
                bar.update(1)
    bar.close()
    return _result(base, sp, records, stress_map, seeds_, objective, sampler_seed, n_trials)


def evaluate(base: Scenario, changes: dict[str, Any], stresses: dict[str, dict[str, Any]], seeds: list[int],
             cache_root: str | None, front: Sequence[tuple[float, float]] = ()) -> dict[str, Any]:
    """One candidate: checks, then runs seed by seed through every stress until one misses (the worker's
    task). Returns status, reason, the runs, the mean cost and the worst p99 TTFT of the runs made.

    ``front`` holds (cost, worst p99 TTFT) of candidates already accepted: a candidate that passed its
    first seed but is already beaten on both by one of them stops there (status ``dominated``). Its worst
    TTFT can only grow with more seeds and its cost hardly moves (the fleet, not the noise, sets it), so
    it could be neither the cheapest nor on the front; the runs it skips are most of a late search."""
    from capsim.studies.checks import failed, run_checks

    try:
        cand = base.override(changes)
        variants = {name: cand.override(ch) for name, ch in stresses.items()}
    except SettingsError as exc:
        return _verdict([], "rejected", f"invalid setting: {exc}", 2.0)
    findings = run_checks(cand)
    if failed(findings):
        bad = [f for f in findings if f.level == "fail"]
        return _verdict([], "rejected", "check: " + "; ".join(f"{f.path}: {f.message}" for f in bad),
                        1.0 + len(bad))
    runs: list[dict[str, Any]] = []
    slo = cand.slo
    for seed in seeds:
        for name, sc in variants.items():
            out = run_one(sc, seed, run_key(sc, seed), cache_root)
            s = out["summary"]
            if s is None:
                runs.append({"stress": name, "seed": seed, **dict.fromkeys(RUN_COLUMNS, math.nan)})
                return _verdict(runs, "rejected", f"stress {name!r} seed {seed}: run failed: {out['error']}", 2.0)
            row = {k: s.get(k, math.nan) for k in RUN_COLUMNS}
            if slo.max_wake_s is not None:  # the front and the ranking read the p99 the SLO judges
                row["ttft_p99_s"] = s.get("ttft_p99_warm_s", math.nan)
            runs.append({"stress": name, "seed": seed, **row})
            why, violation = slo_miss(s, slo.ttft_p99_s, slo.max_error_rate, slo.max_wake_s)
            if why:
                return _verdict(runs, "rejected", f"stress {name!r} seed {seed}: {why}", violation)
        if seed != seeds[-1] and front:
            so_far = _verdict(runs, "", "", 0.0)
            c, t = so_far["cost"], so_far["ttft_p99_s"]
            beaten = [(fc, ft) for fc, ft in front if fc <= c and ft <= t and (fc < c or ft < t)]
            if beaten:
                fc, ft = min(beaten)
                return _verdict(runs, "dominated", f"after seed {seed}: cost {c:.4g} and p99 TTFT {t:.3g} s, "
                                f"beaten by an accepted setting (cost {fc:.4g}, p99 TTFT {ft:.3g} s)", 0.0)
    return _verdict(runs, "accepted", "", 0.0)


def _verdict(runs: list[dict[str, Any]], status: str, reason: str, violation: float) -> dict[str, Any]:
    costs = [r["cost"] for r in runs if not math.isnan(r["cost"])]
    ttfts = [r["ttft_p99_s"] for r in runs if not math.isnan(r["ttft_p99_s"])]
    return {"status": status, "reason": reason, "constraint": float(violation), "runs": runs,
            "cost": float(sum(costs) / len(costs)) if costs else 1e12,
            "ttft_p99_s": float(max(ttfts)) if ttfts else 1e12}


def _suggest(trial: Any, p: Param) -> Any:
    if p.choices is not None:
        label = trial.suggest_categorical(p.path, p.labels())
        return p.choices[p.labels().index(label)]
    assert p.low is not None and p.high is not None
    if p.is_int:
        return trial.suggest_int(p.path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.path, float(p.low), float(p.high), step=p.step, log=p.log)


def _changes(params: Sequence[Param], values: Mapping[str, Any], dumped: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted overrides for chosen values: bundles expand; numbers for quantity strings become strings."""
    changes: dict[str, Any] = {}
    for p in params:
        v = values[p.path]
        if is_bundle(v):
            changes.update(v["set"])
        elif isinstance(value_at(dumped, p.path), str) and isinstance(v, int | float) and not isinstance(v, bool):
            changes[p.path] = as_quantity(v)
        else:
            changes[p.path] = v
    return changes


def _stresses(stresses: Mapping[str, Mapping[str, Any]] | Sequence[str], sp: Space) -> dict[str, dict[str, Any]]:
    if isinstance(stresses, Mapping):
        chosen = {str(k): dict(v) for k, v in stresses.items()}
    elif stresses:
        missing = [s for s in stresses if s not in sp.stresses]
        if missing:
            raise SettingsError(f"stresses {missing} are not in the space file (it has {sorted(sp.stresses)})")
        chosen = {s: sp.stresses[s] for s in stresses}
    else:
        chosen = dict(sp.stresses)
    return chosen or {"base": {}}


def _bar(total: int, on: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="tune", unit="setting", disable=not on)


def pareto(frame: Any, x: str = "cost", y: str = "ttft_p99_s") -> Any:
    """The rows of ``frame`` no other row beats on both ``x`` and ``y`` (lower is better), sorted by x."""
    rows = frame.sort_values([x, y]).reset_index(drop=True)
    keep, best_y = [], math.inf
    for i, v in enumerate(rows[y].to_numpy()):
        if v < best_y:
            keep.append(i)
            best_y = v
    return rows.iloc[keep].reset_index(drop=True)


def _result(base: Scenario, sp: Space, records: list[dict[str, Any]], stresses: dict[str, dict[str, Any]],
            seeds: list[int], objective: str, sampler_seed: int, n_trials: int) -> TuneResult:
    import pandas as pd

    labels = [p.path for p in sp.params]
    rows, per_trial = [], []
    for r in records:
        shown = {k: (v["name"] if is_bundle(v) else v) for k, v in r["params"].items()}
        head = {"trial": r["trial"], **shown, "status": r["status"], "reason": r["reason"]}
        per_trial.append({**head, "cost": r["cost"], "ttft_p99_s": r["ttft_p99_s"], "runs": len(r["runs"]),
                          "changes": r["changes"]})
        if not r["runs"]:
            rows.append({**head, "stress": None, "seed": None, **dict.fromkeys(RUN_COLUMNS, math.nan)})
        rows.extend({**head, **run} for run in r["runs"])
    trials = pd.DataFrame(rows)
    table = pd.DataFrame(per_trial)
    ok = table[table["status"] == "accepted"]
    best, best_params, front = None, {}, table.iloc[0:0][["trial", *labels, "cost", "ttft_p99_s"]]
    if len(ok):
        key = [OBJECTIVES[objective], "ttft_p99_s" if objective == "cost" else "cost", "trial"]
        pick = ok.sort_values(key).iloc[0]
        best = base.override(pick["changes"])
        best_params = {p: _scalar(pick[p]) for p in labels}
        front = pareto(ok.drop_duplicates(subset=["cost", "ttft_p99_s"])[["trial", *labels, "cost", "ttft_p99_s"]])
    prov = {**provenance(base), "space": {p.path: (list(map(_plain, p.choices)) if p.choices is not None else
                                                   {"low": p.low, "high": p.high, "step": p.step, "log": p.log})
                                          for p in sp.params},
            "stresses": stresses, "seeds": seeds, "objective": objective, "budget": n_trials,
            "sampler": f"optuna {_optuna_version()} TPESampler(seed={sampler_seed}), two objectives "
                       "(cost, worst p99 TTFT) with a feasibility constraint",
            "capsim_version": capsim.__version__,
            "accepted": len(ok), "dominated": int((table["status"] == "dominated").sum()),
            "rejected": int((table["status"] == "rejected").sum()),
            "runs": sum(len(r["runs"]) for r in records)}
    return TuneResult(best, best_params, trials, front, stresses, prov)


def _scalar(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _plain(v: Any) -> Any:
    return v if not is_bundle(v) else {"name": v["name"], "set": dict(v["set"])}


def _optuna_version() -> str:
    import optuna

    return str(optuna.__version__)

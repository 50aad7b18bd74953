"""Sweeps: every setting of a grid times every seed, one tidy row per run, on any executor.

``sweep(scenario, grid, seeds)`` applies each setting with ``Scenario.override`` and simulates it once per
seed. A grid maps dotted paths to lists of values; an axis whose values are named bundles
(``{"name": "tight", "set": {path: value, ...}}``) sets several paths at once and its column holds the
bundle's name. The same seed gives every setting the same arrivals and token counts (the simulator's
named streams: common random numbers), so differences between settings are not sampling noise.
Rows come back in (setting, seed) order whatever executor ran them, so serial, process-pool and Dask
sweeps give identical frames. ``aggregate`` turns replications into a mean, a standard deviation and a
Student-t 95% confidence interval per setting.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import capsim
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError, unknown_path
from capsim.studies.executors import ExecutorSpec, open_executor
from capsim.studies.runs import (
    DEFAULT_CACHE,
    SUMMARY_FIELDS,
    empty_summary,
    portable,
    provenance,
    run_key,
    run_one,
)

Grid = Mapping[str, Sequence[Any]]


@dataclass(frozen=True)
class Setting:
    """One point of a grid: its column values (bundles by name) and the dotted changes it makes."""

    index: int
    values: dict[str, Any]
    changes: dict[str, Any] = field(default_factory=dict)


def is_bundle(value: Any) -> bool:
    """A named bundle of overrides: ``{"name": str, "set": {dotted path: value}}``."""
    return (isinstance(value, Mapping) and set(value) == {"name", "set"} and isinstance(value["name"], str)
            and isinstance(value["set"], Mapping))


def check_paths(changes: Iterable[str], where: str) -> None:
    """Refuse a dotted override path that names no scenario setting (a typo would fail every run of a study,
    found only at its end), naming ``where`` and the closest known setting."""
    for path in changes:
        why = unknown_path(Scenario, str(path))
        if why:
            raise SettingsError(f"{where}: {why}")


def check_axis(path: str, values: Sequence[Any], where: str) -> None:
    """:func:`check_paths` for one axis of a grid or space: each named bundle's paths, and the axis's own
    path unless every value is a bundle (then the path is only the column's name)."""
    for v in values:
        if is_bundle(v):
            check_paths(v["set"], f"{where}: bundle {v['name']!r}")
    if not all(is_bundle(v) for v in values):
        check_paths([path], where)


def expand_grid(grid: Grid) -> list[Setting]:
    """The cartesian product of the grid's axes, first axis slowest. An axis or a bundle's path that names no
    setting is a ``SettingsError`` before anything runs; a value that does not validate is the run's error."""
    if not grid:
        return [Setting(0, {}, {})]
    axes = []
    for path, values in grid.items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise SettingsError(f"grid.{path} must be a non-empty list of values, got {values!r}")
        check_axis(path, values, f"grid.{path}")
        axes.append([(path, v) for v in values])
    settings = []
    for k, combo in enumerate(itertools.product(*axes)):
        shown: dict[str, Any] = {}
        changes: dict[str, Any] = {}
        for path, v in combo:
            if is_bundle(v):
                shown[path] = v["name"]
                changes.update(v["set"])
            else:
                shown[path] = v
                changes[path] = v
        settings.append(Setting(k, shown, changes))
    return settings


def load_grid(path: str | Path) -> dict[str, list[Any]]:
    """Read a grid YAML: a mapping of dotted paths to lists (optionally under a top-level ``grid:``)."""
    from capsim.model.yaml_load import load_yaml_file

    p = Path(path)
    data = load_yaml_file(p, "grid file")  # a SettingsError naming the file and line; duplicate keys refused
    if isinstance(data, Mapping) and set(data) == {"grid"}:
        data = data["grid"]
    if not isinstance(data, Mapping):
        raise SettingsError(f"{p}: a grid is a mapping of dotted paths to lists, got {type(data).__name__}")
    for key, values in data.items():
        if not isinstance(values, list) or not values:
            raise SettingsError(f"{p}: grid.{key} must be a non-empty list, got {values!r}")
    return {str(k): list(v) for k, v in data.items()}


def seed_list(seeds: int | Iterable[int]) -> list[int]:
    """``3`` means seeds 0, 1, 2; a sequence is taken as is."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise SettingsError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise SettingsError("seeds must not be empty")
    return out


def sweep(scenario: Scenario | str | Path, grid: Grid, seeds: int | Iterable[int] = 1, *,
          executor: ExecutorSpec = None, progress: bool = True, cache: bool | str | Path = True) -> Any:
    """Simulate every setting of ``grid`` under every seed; a DataFrame with one row per (setting, seed).

    Columns: ``setting`` (its index), one column per grid axis, ``seed``, every ``Summary`` field, ``error``
    (None, or why the run failed: a setting that does not validate or a run that raised) and ``key`` (the
    run's content address). ``frame.attrs["provenance"]`` holds the base scenario, the grid, the seeds and
    the capsim version; ``frame.attrs["runs"]`` how many runs were computed and how many read from the
    cache (``cache=True`` means ``.capsim/cache/``; a path picks another folder; ``False`` turns it off).
    """
    import pandas as pd

    base = scenario if isinstance(scenario, Scenario) else Scenario.from_yaml(scenario)
    base = portable(base)
    seeds_ = seed_list(seeds)
    settings = expand_grid(grid)
    cache_root = None if cache is False else str(DEFAULT_CACHE if cache is True else Path(cache))

    rows: dict[tuple[int, int], dict[str, Any]] = {}
    tasks: list[tuple[int, int, Scenario, str]] = []
    counts = {"computed": 0, "cached": 0, "failed": 0}  # failed: runs that raised or settings that do not validate
    for s in settings:
        try:
            sc = base.override(s.changes)
        except SettingsError as exc:
            for seed in seeds_:
                rows[(s.index, seed)] = _row(s, seed, None, f"SettingsError: {exc}", "")
            counts["failed"] += len(seeds_)
            continue
        for seed in seeds_:
            tasks.append((s.index, seed, sc, run_key(sc, seed)))

    with open_executor(executor, tasks=len(tasks)) as ex:
        futures: dict[Future[dict[str, Any]], tuple[int, int, str]] = {
            ex.submit(run_one, sc, seed, key, cache_root): (k, seed, key) for k, seed, sc, key in tasks
        }
        for fut in _progress(as_completed(futures), len(futures), progress, "sweep"):
            k, seed, key = futures[fut]
            out = fut.result()
            counts["cached" if out["cached"] else "computed"] += 1
            counts["failed"] += out["error"] is not None
            rows[(k, seed)] = _row(settings[k], seed, out["summary"], out["error"], key)

    frame = pd.DataFrame([rows[(s.index, seed)] for s in settings for seed in seeds_])
    frame.attrs["provenance"] = {
        **provenance(base), "grid": {k: list(v) for k, v in grid.items()}, "seeds": seeds_,
        "capsim_version": capsim.__version__,
    }
    frame.attrs["runs"] = counts
    return frame


def _row(s: Setting, seed: int, summary: dict[str, Any] | None, error: str | None, key: str) -> dict[str, Any]:
    return {"setting": s.index, **s.values, "seed": seed, **(summary or empty_summary()), "error": error,
            "key": key}


def _progress(it: Iterable[Any], total: int, on: bool, desc: str) -> Iterable[Any]:
    if not on:
        return it
    from tqdm.auto import tqdm

    bar: Iterable[Any] = tqdm(it, total=total, desc=desc, unit="run")
    return bar


#: Summary fields that are labels or counts of the run rather than measurements to average.
_NOT_METRICS = frozenset({"setting", "seed", "error", "key"})


def aggregate(frame: Any, metrics: Sequence[str] | None = None, confidence: float = 0.95) -> Any:
    """Replications -> one row per setting: ``<metric>_mean``, ``_std``, ``_ci_low``, ``_ci_high``.

    The interval is the Student t interval over the seeds (``mean +- t_{n-1} * std / sqrt(n)``; NaN with
    one seed). ``n`` counts the seeds that ran, ``errors`` those that failed, and ``slo_met_all`` says
    whether every seed met the SLO. Grid columns are the ones between ``setting`` and ``seed``.
    """
    import numpy as np
    import pandas as pd
    from scipy import stats

    cols = list(frame.columns)
    labels = cols[cols.index("setting"):cols.index("seed")] if "setting" in cols and "seed" in cols else []
    if metrics is None:
        metrics = [c for c in SUMMARY_FIELDS if c in cols and c != "slo_met"]
    out = []
    for _, g in frame.groupby("setting", sort=True):
        ok = g[g["error"].isna()] if "error" in g else g
        row: dict[str, Any] = {c: g[c].iloc[0] for c in labels}
        n = len(ok)
        row["n"] = n
        row["errors"] = len(g) - n
        row["slo_met_all"] = bool(n == len(g) and n > 0 and ok["slo_met"].astype(bool).all())
        for m in metrics:
            v = pd.to_numeric(ok[m], errors="coerce").to_numpy(dtype=float)
            v = v[~np.isnan(v)]
            mean = float(v.mean()) if len(v) else math.nan
            std = float(v.std(ddof=1)) if len(v) > 1 else math.nan
            half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * std / math.sqrt(len(v))) if len(v) > 1 \
                else math.nan
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = mean - half, mean + half
        out.append(row)
    return pd.DataFrame(out)

"""Study results on disk: a scenario YAML that runs as is, CSV tables, a front figure and provenance."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsim.model.scenario import Scenario

if TYPE_CHECKING:
    from capsim.studies.tune import TuneResult


def scenario_yaml(scenario: Scenario, folder: Path, header: str = "") -> str:
    """The scenario as YAML for a file in ``folder``: the files it names are written relative to that
    folder (``Scenario.resolve`` finds them from the file's folder), so the file runs from anywhere."""
    import yaml

    data = scenario.model_dump(mode="json", by_alias=True)
    if scenario.service.profile is not None:
        data["service"]["profile"] = _relative(scenario.resolve(scenario.service.profile), folder)
    if data["workload"]["arrivals"]["kind"] == "trace":
        data["workload"]["arrivals"]["path"] = _relative(scenario.resolve(Path(data["workload"]["arrivals"]["path"])),
                                                         folder)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return lines + text


def _relative(path: Path, folder: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), folder.resolve())
    except ValueError:  # another drive
        return str(path.resolve())


def write_tune_result(result: TuneResult, out: Path) -> list[Path]:
    """best.yaml, trials.csv, front.csv, front.png, provenance.json in ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    prov = result.provenance
    if result.best is not None:
        header = (f"capsim tune: the cheapest setting that met the SLO in every stress and seed\n"
                  f"chosen: {json.dumps(result.best_params, default=str)}\n"
                  f"stresses: {', '.join(result.stresses)}; seeds: {prov.get('seeds')}; "
                  f"capsim {prov.get('capsim_version')}; profile sha256 {prov.get('profile_sha256', '-')}")
        path = out / "best.yaml"
        path.write_text(scenario_yaml(result.best, out, header), encoding="utf-8")
        written.append(path)
    else:  # no setting passed: leave no best.yaml from an earlier run behind
        (out / "best.yaml").unlink(missing_ok=True)
    for name, frame in (("trials.csv", result.trials), ("front.csv", result.front)):
        frame.to_csv(out / name, index=False)
        written.append(out / name)
    written.append(front_figure(result, out / "front.png"))
    (out / "provenance.json").write_text(json.dumps(prov, indent=2, default=str), encoding="utf-8")
    written.append(out / "provenance.json")
    return written


def front_figure(result: TuneResult, path: Path) -> Path:
    """Cost against worst p99 TTFT: every trial that ran, the feasible ones, the front and the SLO line."""
    # a Figure of its own, not pyplot: writing a tune result must not switch a notebook's backend
    from matplotlib.figure import Figure

    t = result.trials
    per = t.groupby("trial").agg(cost=("cost", "mean"), ttft=("ttft_p99_s", "max"), status=("status", "first"))
    per = per.dropna()
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    rej = per[per["status"] == "rejected"]
    dom = per[per["status"] == "dominated"]
    acc = per[per["status"] == "accepted"]
    ax.scatter(rej["cost"], rej["ttft"], s=14, c="0.7", label="rejected (runs until the first miss)")
    if len(dom):
        ax.scatter(dom["cost"], dom["ttft"], s=14, c="C9", marker="x", label="dominated after one seed")
    ax.scatter(acc["cost"], acc["ttft"], s=18, c="C0", label="met the SLO in every run")
    if len(result.front):
        f = result.front
        ax.step(f["cost"], f["ttft_p99_s"], where="post", c="C3", lw=1.5, label="Pareto front")
        ax.scatter(f["cost"], f["ttft_p99_s"], s=30, c="C3", zorder=3)
    slo = _slo(result)
    if slo is not None:
        ax.axhline(slo, ls="--", c="k", lw=1, label=f"SLO p99 TTFT {slo:g} s")
    ax.set_xlabel("cost per run (mean over stresses and seeds)")
    ax.set_ylabel("worst p99 TTFT (s)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("capsim tune: cost against p99 TTFT")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _slo(result: TuneResult) -> float | None:
    sc: Any = result.provenance.get("scenario")
    try:
        return float(sc["slo"]["ttft_p99_s"])
    except (TypeError, KeyError):
        return None


def median_range(values: Any, digits: int, scale: float = 1.0) -> str:
    """Runs' values over the seeds as the study tables in docs/ quote them: ``median (min to max)``, each times
    ``scale`` to ``digits`` decimals; ``-`` when none is a number."""
    x = values * scale
    if x.isna().all():
        return "-"
    return f"{x.median():.{digits}f} ({x.min():.{digits}f} to {x.max():.{digits}f})"


def worst_minute_p99(requests: Any, bin_s: float = 60.0) -> float:
    """The highest p99 time to first token (s) of any ``bin_s`` bin of arrivals (bins counted from time 0, not from
    the first request's) among ``requests``, the frame of a study's window: the studies' "worst minute". Only
    requests that saw a first token count (a failed one has none), so a study quotes the window's failed share beside
    it; NaN when none did. (``capsim.plots.ttft_p99_over_time`` draws failures as ``inf`` instead, so a failing
    minute leaves the chart.)"""
    ttft = requests.first_token_s - requests.arrival_s
    return float(ttft.groupby((requests.arrival_s // bin_s).astype(int)).quantile(0.99).max())

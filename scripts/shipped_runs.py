"""Every shipped scenario under seeds 0 to 4: each run's summary, to JSON; or which runs two such files differ in.

A change that should leave the shipped plans alone is checked by running this before and after it::

    .venv/bin/python scripts/shipped_runs.py /tmp/before.json          # about 2.5 minutes on 2 cores
    .venv/bin/python scripts/shipped_runs.py /tmp/after.json
    .venv/bin/python scripts/shipped_runs.py --compare /tmp/before.json /tmp/after.json

``--set PATH=VALUE`` (YAML values, as ``capsim simulate --set``) overrides a setting in every scenario.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml

SEEDS = range(5)


def _run(args: tuple[str, int, dict[str, Any]]) -> tuple[str, int, dict[str, Any]]:
    from capsim.model.scenario import Scenario
    from capsim.sim import simulate

    path, seed, changes = args
    scenario = Scenario.from_yaml(path)
    if changes:
        scenario = scenario.override(changes)
    summary = dataclasses.asdict(simulate(scenario, seed=seed).summary)
    return path, seed, {k: v for k, v in summary.items() if isinstance(v, int | float | bool | str)}


def run_all(out: Path, changes: dict[str, Any]) -> None:
    root = Path(__file__).resolve().parents[1]
    jobs = [(str(p.relative_to(root)), s, changes) for p in sorted((root / "data" / "scenarios").glob("*.yaml"))
            for s in SEEDS]
    runs: dict[str, dict[str, Any]] = {}
    with ProcessPoolExecutor() as pool:
        for path, seed, summary in pool.map(_run, jobs):
            runs.setdefault(path, {})[str(seed)] = summary
    out.write_text(json.dumps(runs, indent=0))
    print(f"wrote {out}: {len(jobs)} runs")


def compare(a: Path, b: Path) -> int:
    before, after = json.loads(a.read_text()), json.loads(b.read_text())
    changed = 0
    for path, seeds in before.items():
        for seed, x in seeds.items():
            y = after.get(path, {}).get(seed)
            if x != y:
                changed += 1
                diff = {k: (x[k], None if y is None else y.get(k)) for k in x if y is None or x[k] != y.get(k)}
                print(f"{Path(path).name} seed {seed}: " + ", ".join(f"{k} {u} -> {v}" for k, (u, v) in diff.items()))
    total = sum(len(s) for s in before.values())
    print(f"{changed} of {total} runs changed")
    return 1 if changed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help="where to write the runs' summaries (JSON)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("give the output file, or --compare BEFORE AFTER")
    changes = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    run_all(args.out, changes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

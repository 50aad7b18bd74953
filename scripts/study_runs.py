"""Every documented study sweep (each ``capsim sweep`` command in a ``data/studies/*.yaml`` header) into a folder; or
which of their runs two such folders differ in.

docs/studies.md quotes these sweeps' runs. A change meant to leave them alone is checked by running this before
and after it (the commit before in a ``git worktree``, put first on ``PYTHONPATH``), and one that moves them
lists the settings and seeds whose cells need their numbers again::

    git worktree add /tmp/before HEAD~1
    PYTHONPATH=/tmp/before/src .venv/bin/python scripts/study_runs.py /tmp/runs-before   # 35 min on 2 cores
    .venv/bin/python scripts/study_runs.py /tmp/runs-after
    .venv/bin/python scripts/study_runs.py --compare /tmp/runs-before /tmp/runs-after

``--only TEXT`` runs the sweeps whose name (``GRID--SCENARIO``) holds ``TEXT``. Each sweep runs with
``--no-cache``, its output in ``OUT/GRID--SCENARIO/`` (``runs.csv``, ``settings.csv``, ``provenance.json``).
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweeps() -> dict[str, list[str]]:
    """Each header's ``capsim sweep`` command, its arguments after ``sweep`` less ``--out``, by name
    ``GRID--SCENARIO``. A command runs on over lines ending in a backslash, and over a quote left open; one whose
    scenario is no file (a grid for any scenario) is left out."""
    out: dict[str, list[str]] = {}
    for path in sorted((ROOT / "data" / "studies").glob("*.yaml")):
        pending = ""
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            text = line.lstrip("#").strip()
            if not pending and "capsim sweep " not in text:
                continue
            pending = f"{pending} {text.removesuffix(chr(92)).strip()}" if pending else text.removesuffix(chr(92))
            if text.endswith(chr(92)):
                continue
            try:
                words = shlex.split(pending[pending.index("capsim sweep "):])
            except ValueError:  # a quote still open: the command goes on
                continue
            pending = ""
            args = words[2:]
            if not (ROOT / args[0]).is_file():  # a grid for any scenario (``capsim sweep SCENARIO ...``)
                continue
            if "--out" in args:
                k = args.index("--out")
                del args[k:k + 2]
            scenario = Path(args[0]).stem
            out[f"{path.stem}--{scenario}"] = args
    return out


def run_all(out: Path, only: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    chosen = {name: args for name, args in sweeps().items() if only is None or only in name}
    for name, args in chosen.items():
        began = time.monotonic()
        cmd = [sys.executable, "-m", "capsim.cli", "sweep", *args, "--out", str(out / name)]
        if "--no-cache" not in args:
            cmd.append("--no-cache")
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
        (out / f"{name}.log").write_text(done.stdout + done.stderr)
        status = "ok" if done.returncode == 0 else f"failed ({done.returncode}; {name}.log)"
        print(f"{name}: {status}, {time.monotonic() - began:.0f} s", flush=True)
    print(f"wrote {out}: {len(chosen)} sweeps")


def _rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open() as f:
        return {(r["setting"], r["seed"]): {k: v for k, v in r.items() if k != "key"} for r in csv.DictReader(f)}


def compare(a: Path, b: Path) -> int:
    changed = total = 0
    for before in sorted(a.glob("*/runs.csv")):
        name = before.parent.name
        after = b / name / "runs.csv"
        if not after.exists():
            print(f"{name}: not in {b}")
            continue
        x, y = _rows(before), _rows(after)
        total += len(x)
        for key, row in x.items():
            new = y.get(key)
            if new != row:
                changed += 1
                diff = [f"{k} {v} -> {None if new is None else new.get(k)}" for k, v in row.items()
                        if new is None or new.get(k) != v]
                print(f"{name} setting {key[0]} seed {key[1]}: " + ", ".join(diff))
    print(f"{changed} of {total} runs changed")
    return 1 if changed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help="the folder for the sweeps' outputs")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--only", metavar="TEXT", help="only the sweeps whose name holds TEXT")
    parser.add_argument("--list", action="store_true", help="print the sweeps and their arguments")
    args = parser.parse_args()
    if args.list:
        for name, words in sweeps().items():
            print(f"{name}: {shlex.join(words)}")
        return 0
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("give the output folder, or --compare BEFORE AFTER")
    run_all(args.out, args.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

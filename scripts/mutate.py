"""Mutation testing of the modules that carry capsim's promises, one module at a time, with mutmut.

``make mutate`` runs every target below; ``make mutate MUTATE='batcher policy-batching'`` runs some.
Each target runs in its own work directory (``.mutmut/<target>/``, a copy of src/, tests/, data/ and
pyproject.toml with a ``[tool.mutmut]`` section naming that module and only the fast test files that
exercise it), so targets keep separate caches and a rerun only re-tests mutants whose code changed.
A wall-clock budget per target stops a run that would take too long; what finished is still reported.
The scores go to ``.mutmut/<target>/summary.json`` and stdout. Not part of CI: it takes minutes to
hours on two cores (see docs/testing.md for what was run and the score).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutmut"


@dataclass(frozen=True)
class Target:
    """One module (or package) to mutate and the test files that should kill its mutants."""

    mutate: tuple[str, ...]  # globs relative to the repository root
    tests: tuple[str, ...]


TARGETS: dict[str, Target] = {
    "batcher": Target(("src/capsim/core/batcher.py",), ("tests/test_batcher.py", "tests/test_metrics.py")),
    "policy-batching": Target(
        ("src/capsim/policy/batching.py",), ("tests/test_batching_policy.py", "tests/test_batcher.py")
    ),
    "policy-hpa": Target(
        ("src/capsim/policy/autoscaling.py", "src/capsim/policy/hpa_*.py"),
        (
            "tests/test_autoscaling.py",
            "tests/test_autoscaling_behavior.py",
            "tests/test_autoscaling_properties.py",
            "tests/test_autoscaling_replicas.py",
        ),
    ),
    "state-redis": Target(
        ("src/capsim/core/state_redis.py",), ("tests/test_state.py", "tests/test_state_faults.py")
    ),
    "service": Target(("src/capsim/core/service.py",), ("tests/test_service.py",)),
    "sim-client-pod": Target(
        ("src/capsim/sim/client.py", "src/capsim/sim/pod.py"),
        (
            "tests/test_sim_invariants.py",
            "tests/test_sim_properties.py",
            "tests/test_sim_faults.py",
            "tests/test_sim_hpa.py",
        ),
    ),
}

# mutmut 3 result lines: "    capsim.core.batcher.xǁDynamicBatcherǁaclose__mutmut_3: survived"
_RESULT = re.compile(r"^\s*(\S+__mutmut_\d+):\s*(.+?)\s*$")
# a mutant whose tests failed, or ran past mutmut's timeout (the tests noticed a hang), is detected
_DETECTED = {"killed", "timeout", "caught by type check"}
# a mutant no selected test even runs ("no tests") is as undetected as one that survives them
_UNDETECTED = {"survived", "no tests"}


def _mutmut_section(target: Target) -> str:
    def toml_list(items: tuple[str, ...] | list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {toml_list(target.mutate)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(list(target.tests))}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]\n'
        'also_copy = ["data"]\n'
        "use_git_change_detection = false\n"
        # the tests bound their own waits (a lost request fails in 5 s), so a mutant that hangs need
        # not be given 15x the clean run: 3x plus 5 s tells a hang from a slow pass
        "timeout_multiplier = 3.0\n"
        "timeout_constant = 5.0\n"
    )


def prepare(name: str, target: Target) -> Path:
    """Refresh the target's work directory from the repository (keeping mutmut's cache in mutants/)."""
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", "*.egg-info")
    for folder in ("src", "tests", "data"):
        dest = work / folder
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ROOT / folder, dest, ignore=skip)
    pyproject = (ROOT / "pyproject.toml").read_text()
    if "[tool.mutmut]" in pyproject:
        raise SystemExit("pyproject.toml has its own [tool.mutmut]; scripts/mutate.py writes one per target")
    (work / "pyproject.toml").write_text(pyproject + _mutmut_section(target))
    return work


def run(
    name: str, target: Target, budget_s: float, max_children: int, only: list[str] | None = None
) -> dict[str, object]:
    """Run mutmut on one target within ``budget_s`` seconds and return its tally (over every mutant
    mutmut has a result for, from this run or an earlier one; ``only``: globs of mutants to retest)."""
    work = prepare(name, target)
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    started = time.monotonic()
    # a session of its own, so the budget can stop mutmut and every worker it forked, and only those
    proc = subprocess.Popen(
        [mutmut, "run", "--max-children", str(max_children), *(only or [])],
        cwd=work,
        start_new_session=True,
        env={**os.environ, "PYTHONHASHSEED": "0", "CAPSIM_HYPOTHESIS_PROFILE": "mutation"},
    )
    finished = True
    try:
        proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        finished = False
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall_s = time.monotonic() - started
    text = subprocess.run(
        [mutmut, "results", "--all", "true"], cwd=work, capture_output=True, text=True
    ).stdout
    status: dict[str, str] = {}
    for line in text.splitlines():
        m = _RESULT.match(line)
        if m:
            status[m.group(1)] = m.group(2)
    tally = Counter(status.values())
    detected = sum(n for s, n in tally.items() if s in _DETECTED)
    undetected = sum(n for s, n in tally.items() if s in _UNDETECTED)
    summary: dict[str, object] = {
        "target": name,
        "mutated": list(target.mutate),
        "tests": list(target.tests),
        "finished": finished,
        "wall_s": round(wall_s, 1),
        "max_children": max_children,
        "tally": dict(sorted(tally.items())),
        "score": round(detected / (detected + undetected), 4) if detected + undetected else None,
        "survivors": sorted(k for k, v in status.items() if v in _UNDETECTED),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=f"default: all of {', '.join(TARGETS)}")
    parser.add_argument("--budget-s", type=float, default=1200.0, help="wall-clock cap per target (s)")
    parser.add_argument("--max-children", type=int, default=1, help="parallel mutant workers")
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="GLOB",
        help="(re)test only the mutants matching these globs, e.g. 'capsim.core.batcher.*_run_batch*'",
    )
    args = parser.parse_args(argv)
    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    for name in names:
        s = run(name, TARGETS[name], args.budget_s, args.max_children, args.only)
        done = "" if s["finished"] else f" (stopped at the {args.budget_s:g} s budget)"
        print(f"== {name}: score {s['score']} {s['tally']} in {s['wall_s']} s{done}")
        for survivor in s["survivors"]:  # type: ignore[attr-defined]
            print(f"   survived: {survivor}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

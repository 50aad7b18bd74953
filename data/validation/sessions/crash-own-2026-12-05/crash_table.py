"""The crash runs of several sessions validations, one row per run and policy, from each run's output.txt.

    .venv/bin/python data/validation/sessions/crash-own-2026-12-05/crash_table.py run1 run2 run3

Turns failed real / simulated at the calibration, those sent after the kill, the simulated crash at its 12
moments of the 5 s before it (min to max), whether the real count lies in that range, and the teardown.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

LINE = re.compile(r"^\s+(\w+) crash run .*?torn down in (\d+) ms; real / simulated at the calibration: "
                  r"(\d+) / (\d+) turns failed \((\d+) / (\d+) sent after it.*?; ([\d ]+) at 12 moments")


def rows(run: Path) -> list[tuple]:
    out = []
    for line in (run / "output.txt").read_text().splitlines():
        m = LINE.match(line)
        if m:
            policy, teardown, real, sim, real_after, sim_after, moments = m.groups()
            ms = [int(x) for x in moments.split()]
            out.append((run.name, policy, int(teardown), int(real), int(sim), int(real_after), int(sim_after),
                        min(ms), max(ms), min(ms) <= int(real) <= max(ms)))
    return out


def main(runs: list[str]) -> None:
    table = [r for run in runs for r in rows(Path(run))]
    print("| run | policy | teardown ms | failed real / sim | sent after the kill real / sim | 12 moments | real in range |")
    print("|---|---|---|---|---|---|---|")
    for run, policy, td, real, sim, ra, sa, lo, hi, inside in table:
        print(f"| {run} | {policy} | {td} | {real} / {sim} | {ra} / {sa} | {lo} to {hi} | {'yes' if inside else 'no'} |")
    for policy in sorted({r[1] for r in table}):
        sel = [r for r in table if r[1] == policy]
        print(f"{policy}: {len(sel)} crashes; failed real {sum(r[3] for r in sel)}, simulated {sum(r[4] for r in sel)}"
              f" (medians {statistics.median(r[3] for r in sel)} / {statistics.median(r[4] for r in sel)}); real within"
              f" the simulated range {sum(r[9] for r in sel)} of {len(sel)}; teardown median "
              f"{statistics.median(r[2] for r in sel)} ms ({min(r[2] for r in sel)} to {max(r[2] for r in sel)})")
    print(f"all: failed real {sum(r[3] for r in table)}, simulated {sum(r[4] for r in table)}; real within the "
          f"simulated range {sum(r[9] for r in table)} of {len(table)}")


if __name__ == "__main__":
    main(sys.argv[1:])

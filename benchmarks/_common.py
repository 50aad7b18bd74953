"""Shared helpers for the benchmarks: a printed table and a JSON result file with provenance."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def provenance() -> dict[str, Any]:
    """Where and with what a result was measured."""
    import capsim
    import capsim.native

    info: dict[str, Any] = {
        "capsim_version": capsim.__version__,
        "capsim_native": str(capsim.native.status()),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "time_unix": time.time(),
    }
    try:
        import os

        info["cpus"] = os.cpu_count()
    except Exception:  # pragma: no cover
        pass
    return info


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print an aligned text table (the title says which build of the compiled modules ran: capsim.native)."""
    import capsim.native

    title = f"{title} [capsim.native: {capsim.native.status()}]"
    cells = [[_fmt(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write benchmarks/results/<name>.json with provenance and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "provenance": provenance(), **result}, indent=2))
    print(f"\nwrote {path.relative_to(RESULTS.parent.parent)}")
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e6:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
        return f"{v:.3g}"
    return str(v)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a size of 0 would run nothing, or be read as unset)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def sized_option(ap: argparse.ArgumentParser, flag: str, full: int, quick: int,
                 what: str) -> Callable[[argparse.Namespace], int]:
    """Add ``flag`` (a count: ``what``) whose default is ``full``, or ``quick`` under ``--quick``; returns
    the function that reads its value from the parsed arguments."""
    dest = flag.lstrip("-").replace("-", "_")
    ap.add_argument(flag, type=positive_int, default=None, help=f"{what} (default {full}; --quick: {quick})")

    def value(args: argparse.Namespace) -> int:
        given = getattr(args, dest)
        return int(given) if given is not None else (quick if args.quick else full)

    return value

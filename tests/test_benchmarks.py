"""Every benchmark takes ``--quick``: ``make bench BENCH_ARGS=--quick`` passes it to each ``bench_*.py`` in
turn and stops at the first that refuses it (docs/benchmarks.md)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("bench_*.py"))


def test_the_benchmarks_are_found() -> None:
    assert len(BENCHMARKS) >= 10


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_a_benchmark_accepts_quick(path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    # its own argument parser, run as `make bench` runs it: --help prints the options and exits 0
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # a benchmark puts its folder first; given back after
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(path), run_name="__main__")
    assert done.value.code == 0
    assert "--quick" in capsys.readouterr().out

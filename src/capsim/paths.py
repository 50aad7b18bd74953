"""Where the data shipped with capsim lives: ``data/`` next to the package's source tree, found from the package.

Scenarios, profiles and traces under ``data/`` are named relative to the repository root
(``data/profiles/cpu-tiny-float32.csv``); resolving them against this root rather than the working
directory makes ``capsim demo`` and the shipped scenarios work from any directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from capsim.errors import did_you_mean as suggest

#: The repository root of this capsim (the folder that holds ``src/capsim`` and ``data/``).
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def shipped(relative: str | Path) -> Path:
    """The shipped file ``relative`` (``"data/scenarios/friday_rush.yaml"``), as an absolute path."""
    return PROJECT_ROOT / relative


def find_near(name: Path, start: Path | None) -> Path | None:
    """Where the relative path ``name`` exists: under ``start`` or one of its parents, then the shipped data
    (:data:`PROJECT_ROOT`), then the working directory; with no ``start`` (a scenario built in memory) the
    working directory first, then the shipped data. ``None`` when it is nowhere."""
    bases = (start, *start.parents, PROJECT_ROOT, Path.cwd()) if start is not None else (Path.cwd(), PROJECT_ROOT)
    for base in bases:
        if (base / name).exists():
            return base / name
    return None


def open_input(path: Path, what: str, kind: str, error: type[Exception]) -> BinaryIO:
    """Open the input file ``path`` for reading bytes; a missing, directory or unreadable path raises
    ``error`` naming ``what`` (``"trace"``) and the path, and ``kind`` (``"a CSV file"``) for a directory."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}{shipped_hint(path)}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not {kind}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def shipped_hint(path: Path, absolute: bool = False) -> str:
    """A hint for a missing input file: a shipped data file of its name (a scenario naming
    ``cpu-tiny-float32.csv`` meant ``data/profiles/cpu-tiny-float32.csv``: a relative path inside a scenario is
    looked up under its folder and parents, then the repository root, not in ``data/``'s subfolders), else one
    whose name is close (``friday_rsh.yaml``); empty when neither. ``absolute``: name it by its absolute path
    (a path given on the command line resolves against the working directory alone)."""
    data = PROJECT_ROOT / "data"
    if not path.name or not data.is_dir():
        return ""

    def shown(f: Path) -> str:
        return str(f) if absolute else str(f.relative_to(PROJECT_ROOT))

    found = [f for f in sorted(data.rglob(path.name)) if f.is_file()]
    if found:
        return f" (capsim ships {', '.join(shown(f) for f in found[:3])}: name it by that path)"
    import difflib

    pattern = f"*{path.suffix}" if path.suffix else "*"
    by_name = {f.name: f for f in sorted(data.rglob(pattern)) if f.is_file()}
    close = difflib.get_close_matches(path.name, list(by_name), n=1, cutoff=0.8)
    return suggest(shown(by_name[close[0]]) if close else None)


def read_input_text(path: Path, what: str, kind: str, error: type[Exception]) -> str:
    """The UTF-8 text of the input file ``path``; errors as :func:`open_input`, and a file that is not
    UTF-8 raises ``error`` with the offending byte's offset."""
    with open_input(path, what, kind, error) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start}); is it {kind}?") from None

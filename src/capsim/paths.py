"""Where the data shipped with capsim lives: ``data/`` next to the package's source tree, found from the package.

Scenarios, profiles and traces under ``data/`` are named relative to the repository root
(``data/profiles/cpu-tiny-float32.csv``); resolving them against this root rather than the working
directory makes ``capsim demo`` and the shipped scenarios work from any directory.
"""

from __future__ import annotations

from pathlib import Path

#: The repository root of this capsim (the folder that holds ``src/capsim`` and ``data/``).
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def shipped(relative: str | Path) -> Path:
    """The shipped file ``relative`` (``"data/scenarios/friday_rush.yaml"``), as an absolute path."""
    return PROJECT_ROOT / relative

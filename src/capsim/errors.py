"""The root of capsim's own error hierarchy: every error capsim raises on purpose derives from ``CapsimError``.

The command line maps any ``CapsimError`` to one line on stderr and exit code 2 (``capsim.cli``), so a new
error class only has to derive from this one (usually together with ``ValueError`` or ``RuntimeError``,
which existing callers catch) to be reported properly at every entry point.
"""

from __future__ import annotations


class CapsimError(Exception):
    """Base of every error capsim raises on purpose; the message names the file, field or line at fault."""


class SimulationBudgetError(CapsimError, RuntimeError):
    """A simulation ran past its event budget: a setting makes far more events than the horizon needs."""


def did_you_mean(hint: str | None) -> str:
    """The suffix an error message gives the closest known name: `` (did you mean X?)``, or nothing."""
    return f" (did you mean {hint}?)" if hint else ""

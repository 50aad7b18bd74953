"""Kubernetes quantity arithmetic the HPA relies on: milli-unit quantization and quantity parsing.

The HPA controller never compares metric values as floats: every value and target becomes an int64
count of milli-units (``resource.Quantity.MilliValue()``, which rounds a fraction of a milli-unit up)
before any ratio is taken. Reproducing that step is what makes 0.57 read as 570m, not 569m.
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from fractions import Fraction

MAX_INT32 = 2**31 - 1

# A float that lies within this relative distance of a whole number of milli-units is taken to *be* that
# number: 0.57 * 1000 evaluates to 569.9999999999999 in binary floating point, but the value the user
# meant is exactly 570m. Real sub-milli fractions (0.0005 -> 0.5m) are far larger than this.
_FLOAT_SLACK = 1e-9

_DECIMAL_SUFFIXES: dict[str, int] = {
    "n": -9,
    "u": -6,
    "m": -3,
    "": 0,
    "k": 3,
    "M": 6,
    "G": 9,
    "T": 12,
    "P": 15,
    "E": 18,
}
_BINARY_SUFFIXES: dict[str, int] = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}


def milli_value(value: float, label: str = "value") -> int:
    """Return ``value`` (units) as an integer count of milli-units, as ``Quantity.MilliValue()`` does.

    A fraction of a milli-unit rounds up (towards +inf); binary float error is absorbed first, so
    0.57 is 570 and 8.9 is 8900. Integers convert exactly.
    """
    if isinstance(value, bool):
        raise ValueError(f"{label} must be a number, got {value!r}")
    if isinstance(value, int):
        return value * 1000
    if isinstance(value, (Decimal, Fraction)):
        return math.ceil(Fraction(value) * 1000)
    if not isinstance(value, float):
        raise ValueError(f"{label} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{label} must be finite, got {value!r}")
    scaled = value * 1000.0
    nearest = round(scaled)
    if abs(scaled - nearest) <= _FLOAT_SLACK * max(1.0, abs(scaled)):
        return int(nearest)
    return math.ceil(scaled)


def div_trunc(numerator: int, denominator: int) -> int:
    """Integer division truncating towards zero, as Go's ``/`` on int64 does (Python's ``//`` floors)."""
    quotient = abs(numerator) // abs(denominator)
    return quotient if (numerator >= 0) == (denominator > 0) else -quotient


def clamp_int32(value: float) -> int:
    """``ceil`` of a replica count, capped at MaxInt32 as upstream caps runaway proposals, and at 0 below.

    The floor only matters for negative metric values, where upstream would propose a negative count.
    """
    if value > MAX_INT32:
        return MAX_INT32
    return max(0, math.ceil(value))


def parse_quantity(raw: object, label: str = "quantity") -> float:
    """Parse a Kubernetes quantity (``"500m"``, ``"1.5"``, ``"2Ki"``, ``"1e3"``, or a YAML number) to units.

    Errors name ``label`` (a field path) and the bad value.
    """
    if isinstance(raw, bool):
        raise ValueError(f"{label} must be a quantity, got {raw!r}")
    if isinstance(raw, (int, float)):
        if not math.isfinite(raw):
            raise ValueError(f"{label} must be finite, got {raw!r}")
        return float(raw)
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"{label} must be a quantity such as '500m' or '2', got {raw!r}")
    text = raw.strip()
    for suffix, power in _BINARY_SUFFIXES.items():
        if text.endswith(suffix):
            return float(_parse_decimal(text[: -len(suffix)], raw, label) * (2**power))
    # "1e3" ends in a digit (an exponent); "1E" is the suffix E (exa) on 1.
    suffix = text[-1] if text[-1] in "numkMGTPE" else ""
    number = text[: -len(suffix)] if suffix else text
    return float(_parse_decimal(number, raw, label) * (Decimal(10) ** _DECIMAL_SUFFIXES[suffix]))


def _parse_decimal(number: str, raw: object, label: str) -> Decimal:
    try:
        parsed = Decimal(number)
    except InvalidOperation:
        raise ValueError(f"{label} must be a quantity such as '500m' or '2', got {raw!r}") from None
    if not parsed.is_finite():
        raise ValueError(f"{label} must be finite, got {raw!r}")
    return parsed

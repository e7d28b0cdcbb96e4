"""Checks for configuration values: one behaviour per kind of value, everywhere.

Every constructor and option parser of the package checks its numbers with
these, so that the same mistake gets the same error wherever it is made:

- a value of the wrong type (``True`` included: a bool is not a count) raises
  ``TypeError`` naming the parameter and the type it got;
- a value of the right type out of range raises ``ValueError`` naming the
  parameter, the range and the value.

The command line turns option text into a number first, then applies the same
check, so ``--max-batch 0`` and ``DeliveryExecutor(max_batch=0)`` agree.
"""

from __future__ import annotations

import math
from datetime import timedelta

__all__ = ["count", "seconds"]


def count(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; TypeError or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value!r}")
    return value


def seconds(name: str, value: object, *, positive: bool = False, infinite: bool = False) -> float:
    """``value`` (int, float or timedelta) as seconds ``>= 0`` (``> 0`` with ``positive``).

    NaN is always refused; infinity only with ``infinite`` (for "no limit").
    """
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = type(value).__name__
        raise TypeError(f"{name} must be seconds (int, float or timedelta), not {kind}")
    ok = value > 0 if positive else value >= 0
    if not ok or math.isnan(value) or (math.isinf(value) and not infinite):
        bound = "> 0" if positive else ">= 0"
        finite = "" if infinite else "a finite number of "
        raise ValueError(f"{name} must be {finite}seconds {bound}, not {value!r}")
    return float(value)

"""The shared configuration checks: one behaviour per kind of value."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest

from delivery_executor.validate import count, seconds


@pytest.mark.parametrize("value", [True, False, 1.0, "3", None])
def test_count_refuses_non_ints_bools_included(value: object) -> None:
    """A bool, float, str or None is a TypeError that names the parameter and the type."""
    with pytest.raises(TypeError, match=rf"max_batch must be an int, not {type(value).__name__}"):
        count("max_batch", value)


def test_count_bounds_are_inclusive() -> None:
    """The minimum itself passes, one below it is a ValueError naming the value."""
    assert count("n", 1) == 1
    assert count("n", 0, minimum=0) == 0
    with pytest.raises(ValueError, match=r"n must be >= 1, not 0"):
        count("n", 0)
    with pytest.raises(ValueError, match=r"n must be >= 0, not -1"):
        count("n", -1, minimum=0)


def test_seconds_takes_numbers_and_timedeltas() -> None:
    """ints, floats and timedeltas become float seconds; zero passes unless positive."""
    assert seconds("t", 2) == 2.0
    assert seconds("t", 0.5) == 0.5
    assert seconds("t", timedelta(milliseconds=250)) == 0.25
    assert seconds("t", 0) == 0.0
    with pytest.raises(ValueError, match=r"t must be a finite number of seconds > 0, not 0"):
        seconds("t", 0, positive=True)


@pytest.mark.parametrize("value", [True, "1", None])
def test_seconds_refuses_non_numbers_bools_included(value: object) -> None:
    """A bool, str or None is a TypeError naming the parameter."""
    with pytest.raises(TypeError, match="max_wait must be seconds"):
        seconds("max_wait", value)


@pytest.mark.parametrize("value", [-1, -0.001, math.nan, math.inf, timedelta(seconds=-1)])
def test_seconds_refuses_negative_nan_and_infinity(value: object) -> None:
    """Negative, NaN and (by default) infinite seconds are ValueErrors."""
    with pytest.raises(ValueError, match="max_wait must be a finite number of seconds"):
        seconds("max_wait", value)


def test_seconds_allows_infinity_only_when_asked() -> None:
    """infinite=True admits math.inf (no limit) but still refuses NaN."""
    assert seconds("t", math.inf, infinite=True) == math.inf
    with pytest.raises(ValueError, match=r"t must be seconds >= 0, not nan"):
        seconds("t", math.nan, infinite=True)


def test_sieve_limits_check_as_validate_does() -> None:
    """Sieve Limits: a bool is a TypeError, a count < 1 or 0 s a ValueError; a timedelta: s."""
    from delivery_executor.sieve.limits import Limits

    with pytest.raises(TypeError, match=r"Limits\.max_steps must be an int, not bool"):
        Limits(max_steps=True)
    with pytest.raises(ValueError, match=r"Limits\.max_steps must be >= 1, not 0"):
        Limits(max_steps=0)
    with pytest.raises(TypeError, match=r"Limits\.max_cpu_seconds must be seconds"):
        Limits(max_cpu_seconds=True)
    with pytest.raises(ValueError, match=r"Limits\.max_cpu_seconds must be seconds > 0, not 0"):
        Limits(max_cpu_seconds=0)
    two = timedelta(seconds=2)
    assert Limits(max_cpu_seconds=two).max_cpu_seconds == 2.0  # type: ignore[arg-type]

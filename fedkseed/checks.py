"""Argument checks every layer shares: what "a finite real", "an int in a range", "a bool" and
"a rounding mode" mean, and the one-line error each raises. A bool is never taken for a number
(``True`` is an ``int`` to Python, never to these checks).

Each check returns the value it accepted (a real as ``float``), so a caller writes
``self.lr = check_real("lr", lr)``. ``error`` lets a layer raise its own class (the CLI's
UsageError) with the same message.
"""

from __future__ import annotations

import math
from typing import Any

ROUNDINGS = ("nearest", "stochastic")
_U64_MAX = (1 << 64) - 1


def check_real(
    name: str,
    value: Any,
    *,
    positive: bool = False,
    below: float | None = None,
    allow_none: bool = False,
    error: type[Exception] = ValueError,
) -> float | None:
    """``value`` as a float: finite, >= 0 (> 0 with ``positive``) and < ``below`` when given;
    None passes with ``allow_none``."""
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (value <= 0 if positive else value < 0)
        or (below is not None and value >= below)
    ):
        low = "(0" if positive else "[0"
        bound = f" in {low}, {below:g})" if below is not None else " > 0" if positive else " >= 0"
        raise error(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_int(
    name: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    *,
    error: type[Exception] = ValueError,
) -> int:
    """``value``, a Python int (not a bool) in [low, high] (either bound may be open)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        raise error(f"{name} must be an int{_interval(low, high)}, got {value!r}")
    return value


def check_u64(name: str, value: Any, *, error: type[Exception] = ValueError) -> int:
    """``value``, a Python int in [0, 2^64) (a seed)."""
    return check_int(name, value, 0, _U64_MAX, error=error)


def check_bool(name: str, value: Any, *, error: type[Exception] = TypeError) -> bool:
    """``value``, a bool (0 and 1 are refused: a flag is never a count)."""
    if not isinstance(value, bool):
        raise error(f"{name} must be a bool, got {value!r}")
    return value


def check_rounding(rounding: Any) -> str:
    """``rounding``, one of :data:`ROUNDINGS` (how an update is rounded to the parameters' dtype)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def _interval(low: int | None, high: int | None) -> str:
    if high is None:
        return "" if low is None else f" >= {low}"
    top = "2^64)" if high == _U64_MAX else f"{high}]"
    return f" <= {high}" if low is None else f" in [{low}, {top}"

"""Checks for arguments, flags and config values, each raising one message that names the value.

One place for "a positive integer", "a real bool" and "a finite number", so every entry point (the
library, ``params.json`` / ``config.json``, the command-line programs) refuses the same things with
the same words. Each check returns the value in its canonical type. Never ``assert``: these guard
user input. The error is :class:`~llama3.errors.InvalidArgumentError` (a ``ValueError``).
"""

from __future__ import annotations

import math
import operator
from typing import Any

from .errors import InvalidArgumentError

__all__ = ["positive_int", "non_negative_int", "strict_bool", "finite_float", "optional"]


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but True is never meant as "1 layer".
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1 (any integer type, e.g. numpy's), else InvalidArgumentError."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    return number


def non_negative_int(value: Any, name: str) -> int:
    """``value`` as an int >= 0, else InvalidArgumentError."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be an integer >= 0, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be an integer >= 0, got {value!r}") from None
    if number < 0:
        raise InvalidArgumentError(f"{name} must be an integer >= 0, got {value!r}")
    return number


def strict_bool(value: Any, name: str) -> bool:
    """``value`` if it is a real bool. Strings ("false", "no"), numbers and None are refused: each
    would otherwise be read by truthiness, and ``"false"`` is true."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False (a boolean), got {value!r} "
                                   f"({type(value).__name__})")
    return value


def finite_float(value: Any, name: str, *, positive: bool = False, minimum: float | None = None,
                 maximum: float | None = None) -> float:
    """``value`` as a finite float (NaN and ±inf refused); ``positive``: > 0; ``minimum`` /
    ``maximum``: inclusive bounds."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        try:  # numpy and torch scalars
            value = float(value) if hasattr(value, "__float__") and not isinstance(value, str) else value
        except (TypeError, ValueError):
            pass
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        wanted = "a finite number > 0" if positive else "a finite number"
        raise InvalidArgumentError(f"{name} must be {wanted}, got {value!r}")
    if positive and value <= 0:
        raise InvalidArgumentError(f"{name} must be a finite number > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise InvalidArgumentError(f"{name} must be <= {maximum}, got {value!r}")
    return float(value)


def optional(check, value: Any, name: str, **kwargs: Any) -> Any:
    """``None`` stays ``None``; anything else goes through ``check``."""
    return None if value is None else check(value, name, **kwargs)

"""Argument checks, written once: each raises a `ValueError` that names the argument, shows the value and says
what is accepted.

``True`` is an `int` in Python; none of these accept a `bool` where a number is asked for.

Example:

```python
>>> from tl_plugin.checks import check_bool, check_int, check_number
>>> check_int("unfreeze_every", 2, minimum=1)
2
>>> check_number("lr_decay", 0.8, low=0, high=1, include_low=False)
0.8
>>> check_int("unfreeze_every", 0, minimum=1)
Traceback (most recent call last):
...
ValueError: `unfreeze_every` must be an integer >= 1, got 0.
>>> check_bool("train_batchnorm", "yes")
Traceback (most recent call last):
...
ValueError: `train_batchnorm` must be True or False, got 'yes'.

```
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_bool", "check_choice", "check_int", "check_number", "check_str_list"]


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def _bounds_text(low: float | None, high: float | None, include_low: bool, include_high: bool) -> str:
    if low is not None and high is not None:
        return f"in {'[' if include_low else '('}{low:g}, {high:g}{']' if include_high else ')'}"
    if low is not None:
        return f"{'>=' if include_low else '>'} {low:g}"
    if high is not None:
        return f"{'<=' if include_high else '<'} {high:g}"
    return ""


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` if it is an integer (not a bool) within ``[minimum, maximum]`` (either bound may be `None`)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return int(value)
    bounds = _bounds_text(minimum, maximum, True, True)
    raise ValueError(f"`{name}` must be an integer{' ' + bounds if bounds else ''}, got {value!r}.")


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    include_low: bool = True,
    include_high: bool = True,
    hint: str = "",
) -> float:
    """`value` as a `float` if it is a finite number (not a bool) within the bounds; `hint` is added to the error
    (e.g. ``"1 or None: no decay"``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        above = low is None or (value >= low if include_low else value > low)
        below = high is None or (value <= high if include_high else value < high)
        if above and below:
            return float(value)
    bounds = _bounds_text(low, high, include_low, include_high)
    extra = f" ({hint})" if hint else ""
    raise ValueError(f"`{name}` must be a finite number{' ' + bounds if bounds else ''}{extra}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """`value` if it is one of `choices`."""
    options = list(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        raise ValueError(f"`{name}` must be one of {listed}; got {value!r}.")
    return value


def check_str_list(name: str, value: Any) -> list[str]:
    """`value` if it is a list of non-empty strings."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"`{name}` must be a list of non-empty strings, got {value!r}.")
    return value

"""The options of an activation cache, checked before anything is built.

`check_cache_options` is called by `tl_plugin.prefix.ActivationCache` and, at construction, by
`tl_plugin.prefix.ActivationCacheCallback` (whose cache is only built when training starts), so that a wrong
option fails at once with the option, its value and the valid values.

Example:

```python
>>> from tl_plugin.prefix.options import check_cache_options
>>> check_cache_options(storage="memory", dtype="bfloat16")
>>> check_cache_options(dtype="int8")
Traceback (most recent call last):
...
ValueError: `dtype` must be one of 'float32', 'float16', 'bfloat16', got 'int8'.

```
"""

from __future__ import annotations

from typing import Any

from .last_block import LAST_BLOCK_CHOICES
from .store import DTYPE_CHOICES, ON_TOO_LARGE_CHOICES, STORAGE_CHOICES
from .verify import check_prefix_dropout

__all__ = ["CACHE_OPTIONS", "check_cache_options"]


#: The options of a new `ActivationCache` that `ActivationCacheCallback` accepts.
CACHE_OPTIONS = (
    "data_collator",
    "cache_dir",
    "storage",
    "max_bytes",
    "on_too_large",
    "prefix_dropout",
    "dtype",
    "batch_size",
    "lock_timeout",
    "last_block",
    "by_content",
)


def check_cache_options(**options: Any) -> None:
    """Raise a `ValueError` naming the option, its value and the valid ones, for any invalid option given."""
    unknown = sorted(set(options) - set(CACHE_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown activation cache option(s) {unknown}; valid: {', '.join(CACHE_OPTIONS)}.")
    if "prefix_dropout" in options:
        check_prefix_dropout(options["prefix_dropout"], ("off", "forbid"))
    choices = {
        "storage": STORAGE_CHOICES,
        "on_too_large": ON_TOO_LARGE_CHOICES,
        "dtype": DTYPE_CHOICES,
        "last_block": LAST_BLOCK_CHOICES,
    }
    for name, allowed in choices.items():
        if name in options and options[name] not in allowed:
            raise ValueError(
                f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {options[name]!r}."
            )
    for name in ("max_bytes", "batch_size"):
        number = options.get(name, 1)
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {number!r}.")
    timeout = options.get("lock_timeout", 1.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"`lock_timeout` must be a positive number of seconds, got {timeout!r}.")
    if not isinstance(options.get("by_content", False), bool):
        raise ValueError(f"`by_content` must be True or False, got {options['by_content']!r}.")

"""The activation cache, where it was imported from before: it now lives in `tl_plugin.prefix`.

`ActivationCache` and `ActivationCacheCallback` are in `tl_plugin.prefix.cache`; `prepare_cached_training` and
`CachedTraining` are in `tl_plugin.prefix.trainer`; the store, its errors and
`default_cache_dir` / `clear_activation_cache` are in `tl_plugin.prefix.store`. New code imports them from
`tl_plugin.prefix`.
"""

from .prefix.cache import ActivationCache, ActivationCacheCallback
from .prefix.layout import UnsupportedPrefixError
from .prefix.rows import CACHE_ID_COLUMN, CacheIdCollator
from .prefix.store import (
    DEFAULT_MAX_BYTES,
    ActivationCacheError,
    CacheTooLargeError,
    clear_activation_cache,
    default_cache_dir,
)
from .prefix.trainer import CachedTraining, prepare_cached_training

__all__ = [
    "CACHE_ID_COLUMN",
    "DEFAULT_MAX_BYTES",
    "ActivationCache",
    "ActivationCacheCallback",
    "ActivationCacheError",
    "CacheIdCollator",
    "CacheTooLargeError",
    "CachedTraining",
    "UnsupportedPrefixError",
    "clear_activation_cache",
    "default_cache_dir",
    "prepare_cached_training",
]

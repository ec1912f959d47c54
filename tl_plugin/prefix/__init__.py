"""The frozen-prefix engine: run the frozen bottom of a model without autograd, cache it, prune the last block.

One hook mechanism (`hooks`) wraps every ``forward`` the package changes; the model's prefix layout is derived
once (`layout`) and passed to each tool:

- `FrozenPrefixNoGrad` (`no_grad`): the frozen prefix runs under `torch.no_grad()`, in eval mode;
- `ActivationCache` (`cache`): the frozen prefix computed once per example and stored (`store`, `keys`, `rows`),
  batches without ids found by content (`memo`), with its checks (`verify`, `options`);
- `ActivationCacheCallback` (`cache`): the cache in an existing Trainer script, one callback;
  `prepare_cached_training` (`trainer`) registers the datasets up front;
- `FirstTokenLastBlock` (`last_block`): the last block of a first-token classifier at the first position only.
"""

from .cache import ActivationCache, ActivationCacheCallback
from .last_block import (
    FIRST_TOKEN_CLASSIFIERS,
    LAST_BLOCK_CHOICES,
    FirstTokenLastBlock,
    UnsupportedLastBlockError,
    first_token_support,
    resolve_last_block,
)
from .layout import FrozenPrefix, PrefixLayout, UnsupportedPrefixError, find_frozen_prefix
from .no_grad import FrozenPrefixNoGrad
from .rows import CACHE_ID_COLUMN, CacheIdCollator
from .store import (
    DEFAULT_MAX_BYTES,
    ActivationCacheError,
    CacheTooLargeError,
    clear_activation_cache,
    default_cache_dir,
)
from .trainer import CachedTraining, prepare_cached_training
from .verify import PREFIX_DROPOUT_CHOICES

__all__ = [
    "CACHE_ID_COLUMN",
    "DEFAULT_MAX_BYTES",
    "FIRST_TOKEN_CLASSIFIERS",
    "LAST_BLOCK_CHOICES",
    "PREFIX_DROPOUT_CHOICES",
    "ActivationCache",
    "ActivationCacheCallback",
    "ActivationCacheError",
    "CacheIdCollator",
    "CacheTooLargeError",
    "CachedTraining",
    "FirstTokenLastBlock",
    "FrozenPrefix",
    "FrozenPrefixNoGrad",
    "PrefixLayout",
    "UnsupportedLastBlockError",
    "UnsupportedPrefixError",
    "clear_activation_cache",
    "default_cache_dir",
    "find_frozen_prefix",
    "first_token_support",
    "prepare_cached_training",
    "resolve_last_block",
]

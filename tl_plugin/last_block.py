"""The first-token last block, where it was imported from before: it now lives in `tl_plugin.prefix.last_block`.

New code imports `FirstTokenLastBlock` and `first_token_support` from `tl_plugin.prefix`.
"""

from .prefix.last_block import (
    FIRST_TOKEN_CLASSIFIERS,
    LAST_BLOCK_CHOICES,
    FirstTokenLastBlock,
    UnsupportedLastBlockError,
    first_token_support,
    resolve_last_block,
)

__all__ = [
    "FIRST_TOKEN_CLASSIFIERS",
    "LAST_BLOCK_CHOICES",
    "FirstTokenLastBlock",
    "UnsupportedLastBlockError",
    "first_token_support",
    "resolve_last_block",
]

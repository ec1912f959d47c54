"""The no-grad frozen prefix, where it was imported from before: it now lives in `tl_plugin.prefix`.

`FrozenPrefixNoGrad` is `tl_plugin.prefix.no_grad.FrozenPrefixNoGrad`; `find_frozen_prefix`, `FrozenPrefix` and
`UnsupportedPrefixError` are in `tl_plugin.prefix.layout`. The FLOP model (`EncoderFlops`) and the optimizer-state
meter (`optimizer_state_bytes`) are benchmark instruments: `benchmarks/instruments.py`.
"""

from .prefix.layout import FrozenPrefix, UnsupportedPrefixError, find_frozen_prefix
from .prefix.no_grad import FrozenPrefixNoGrad
from .prefix.verify import PREFIX_DROPOUT_CHOICES

__all__ = [
    "PREFIX_DROPOUT_CHOICES",
    "FrozenPrefix",
    "FrozenPrefixNoGrad",
    "UnsupportedPrefixError",
    "find_frozen_prefix",
]

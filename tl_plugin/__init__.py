"""tl_plugin: transfer learning for Hugging Face transformers.

Layer discovery, freezing utilities, transfer strategies (full / partial / layers) and `transformers.Trainer`
callbacks. Importing the package is light: heavy optional dependencies (Ray, matplotlib) load only when used.
"""

from .config import CONFIG_VERSION, STRATEGIES, TransferConfig
from .discovery import LayerDiscoveryError, LayerGroup, LayerGroups, discover_layer_groups
from .freezing import (
    NoTrainableParametersError,
    TrainableReport,
    freeze,
    freeze_all_but,
    freeze_bottom_blocks,
    freeze_to,
    requires_grad_map,
    select_parameters,
    trainable_report,
    unfreeze,
)
from .transfer import apply_transfer, reinitialize

__version__ = "0.1.0"

# Names whose modules import `transformers.Trainer` (seconds): loaded on first use, not at `import tl_plugin`.
_LAZY = {
    "TransferTrainer": "tl_plugin.trainer",
    "attach": "tl_plugin.trainer",
    "create_optimizer": "tl_plugin.optim",
    "layerwise_param_groups": "tl_plugin.optim",
    "WeightedCrossEntropyLoss": "tl_plugin.losses",
    "class_weights_from_labels": "tl_plugin.losses",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tl_plugin' has no attribute {name!r}")

__all__ = [
    "CONFIG_VERSION",
    "STRATEGIES",
    "LayerDiscoveryError",
    "LayerGroup",
    "LayerGroups",
    "NoTrainableParametersError",
    "TrainableReport",
    "TransferConfig",
    "TransferTrainer",
    "WeightedCrossEntropyLoss",
    "apply_transfer",
    "attach",
    "class_weights_from_labels",
    "create_optimizer",
    "discover_layer_groups",
    "freeze",
    "freeze_all_but",
    "freeze_bottom_blocks",
    "freeze_to",
    "layerwise_param_groups",
    "reinitialize",
    "requires_grad_map",
    "select_parameters",
    "trainable_report",
    "unfreeze",
]

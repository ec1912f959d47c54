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

__all__ = [
    "CONFIG_VERSION",
    "STRATEGIES",
    "LayerDiscoveryError",
    "LayerGroup",
    "LayerGroups",
    "NoTrainableParametersError",
    "TrainableReport",
    "TransferConfig",
    "apply_transfer",
    "discover_layer_groups",
    "freeze",
    "freeze_all_but",
    "freeze_bottom_blocks",
    "freeze_to",
    "reinitialize",
    "requires_grad_map",
    "select_parameters",
    "trainable_report",
    "unfreeze",
]

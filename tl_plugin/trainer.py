"""The one owner of the `Trainer`: `TransferTrainer`, and `attach` for a plain `transformers.Trainer`.

A tl_plugin callback is given its trainer here, explicitly, and nowhere else: `TransferTrainer` binds every
tl_plugin callback it holds in its constructor (and builds the layer-wise optimizer itself); :func:`attach` adds
callbacks to a `Trainer` you built and binds them (see `tl_plugin.callbacks.base` for what binding gives, and what
a callback that is never bound does instead).

This module sits above `tl_plugin.callbacks` and `tl_plugin.optim` and imports both; neither imports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn
from transformers import Trainer

from .callbacks.base import attach, bind_all, follow_trainer_logging
from .discovery import LayerGroups, discover_layer_groups
from .distributed import check_ddp_will_wrap
from .optim import _check_lr_decay, create_optimizer, unwrap_model

__all__ = ["TransferTrainer", "attach", "bind_all"]


def _callback_setting(callbacks: Iterable[Any], attribute: str) -> Any:
    for callback in callbacks:
        value = getattr(callback, attribute, None)
        if value is not None:
            return value
    return None


class TransferTrainer(Trainer):
    """A `transformers.Trainer` whose optimizer holds every parameter in layer-wise param groups (see
    `tl_plugin.optim`), and which binds the tl_plugin callbacks it holds (:func:`bind_all`: their events go through
    `Trainer.log`; two callbacks that conflict raise a `ValueError`).

    The optimizer is built in `create_optimizer` from the model the Trainer gives it, which under FSDP (with
    ``use_orig_params=True``) is the wrapped model: wrapper segments are removed from the parameter names to find
    their layer groups (discovered once, at construction, on the unwrapped model). Your own ``optimizers=`` or
    ``optimizer_cls_and_kwargs=`` take precedence (the layer-wise optimizer is then not built).

    A run launched on several processes that the Trainer would not wrap in DistributedDataParallel (e.g.
    ``torchrun`` on CPUs without ``use_cpu=True``) raises `tl_plugin.distributed.DistributedSetupError` in the
    constructor (see :func:`tl_plugin.distributed.check_ddp_will_wrap`).

    Every `Trainer` argument is accepted, plus:

    Args:
        lr_decay (`float`, *optional*): layer-wise LR decay in (0, 1]. Defaults to the ``lr_decay`` of a
            `LayerwiseLRDecayCallback` (or of a `TransferCallback`'s config) among the callbacks; `None`: no decay.
        layer_groups (`LayerGroups`, *optional*): the model's groups; discovered when absent (with the ``blocks`` /
            ``head`` overrides of a tl_plugin callback's config, if one has them).

    Example:

    ```python
    >>> import tempfile
    >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
    >>> from tl_plugin.trainer import TransferTrainer
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> args = TrainingArguments(tempfile.mkdtemp(), learning_rate=1e-3, use_cpu=True, report_to=[])
    >>> trainer = TransferTrainer(model=model, args=args, lr_decay=0.5)
    >>> {g["group_name"]: g["lr"] for g in trainer.create_optimizer().param_groups}["blocks.0"]
    0.00025

    ```
    """

    def __init__(
        self,
        *args: Any,
        lr_decay: float | None = None,
        layer_groups: LayerGroups | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        follow_trainer_logging(self.args)
        check_ddp_will_wrap(self.args, type(self).__name__)
        callbacks = self.callback_handler.callbacks
        if lr_decay is None:
            lr_decay = _callback_setting(callbacks, "lr_decay")
        self.tl_lr_decay = _check_lr_decay(lr_decay)
        if self.tl_lr_decay is not None and self.optimizer is not None:
            raise ValueError(
                f"`lr_decay`={self.tl_lr_decay} needs the optimizer TransferTrainer builds, but `optimizers=` was "
                f"given: drop `optimizers=`, or build yours with `tl_plugin.optim.create_optimizer`."
            )
        if layer_groups is None:
            overrides = _callback_setting(callbacks, "layer_group_overrides") or {}
            layer_groups = discover_layer_groups(unwrap_model(cast(nn.Module, self.model)), **overrides)
        self.tl_layer_groups = layer_groups
        bind_all(self)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the layer-wise optimizer (unless an optimizer or `optimizer_cls_and_kwargs` was given)."""
        if self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            return super().create_optimizer(model)
        opt_model = cast(nn.Module, self.model if model is None else model)
        self.optimizer = create_optimizer(
            opt_model, self.args, lr_decay=self.tl_lr_decay, groups=self.tl_layer_groups
        )
        return self.optimizer

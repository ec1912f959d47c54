"""Freeze BatchNorm layers of vision backbones: fixed running statistics, eval-mode normalisation.

Freezing a BatchNorm layer's *parameters* (``requires_grad=False``) does not freeze the layer: in training mode it
still normalises with the statistics of the current batch and keeps updating ``running_mean`` / ``running_var`` /
``num_batches_tracked``. With small fine-tuning batches that drifts the pretrained statistics away from the ones
the frozen layers around them were trained with. A *frozen* BatchNorm layer here is one kept in eval mode: it
normalises with its running statistics and never updates them.

Why a forward pre-hook. In transformers 5.x, `Trainer.training_step` calls ``model.train()`` at the start of every
micro-batch, *after* the ``on_step_begin`` callback event (which also fires only once per optimizer step, on the
first micro-batch of a gradient-accumulation cycle) and with no callback event between it and the forward pass. So
a callback that sets BatchNorm layers to eval in ``on_step_begin`` is undone before the forward. A forward
pre-hook on each frozen BatchNorm module runs immediately before that module's own forward, whoever called
``model.train()`` and whenever: it holds for every micro-batch, with gradient accumulation, gradient checkpointing
(recomputation runs the hook again), DDP (the hooks sit on the wrapped model's modules) and custom training loops.
Removing the hooks (:meth:`FrozenBatchNorm.remove`) gives the layers back to ``model.train()`` / ``model.eval()``.

Trainable BatchNorm inside frozen groups (fastai's and Lightning's ``train_bn``) is a freezing option, not a callback:
``freeze(..., train_batchnorm=True)`` (also `freeze_all_but`, `freeze_to`, `freeze_bottom_blocks`), or the
``"batchnorm"`` selector (``unfreeze(model, "batchnorm")``, ``train_groups=[..., "batchnorm"]``), keeps the affine
``weight`` / ``bias`` of those layers trainable. In its default mode `FreezeBatchNormCallback` freezes only layers
whose parameters are all frozen, so such layers then also normalise with batch statistics and update their running
statistics (as in fastai and Lightning); with ``all_batchnorm=True`` (or `selectors`) their statistics stay fixed
while their affine parameters train.

Names: one order, *freeze* before *BatchNorm* (`freeze_batchnorm`, `FreezeBatchNormCallback`, `FreezeBatchNormConfig`,
and the handle `FrozenBatchNorm`); ``BatchNormFreezeConfig``, the one name in the other order, is a deprecated alias
of `FreezeBatchNormConfig`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle
from transformers import TrainerControl, TrainerState, TrainingArguments

from ..discovery import LayerGroups
from ..freezing import NoTrainableParametersError, select_parameters
from .base import TLCallback

logger = logging.getLogger("tl_plugin")

__all__ = [
    "FreezeBatchNormCallback",
    "FreezeBatchNormConfig",
    "FrozenBatchNorm",
    "batchnorm_modules",
    "freeze_batchnorm",
]


@dataclass(frozen=True)
class FreezeBatchNormConfig:
    """Which BatchNorm layers to freeze.

    Args:
        selectors (`tuple[str, ...]`, *optional*):
            group selectors (``"embeddings"``, ``"blocks[:2]"``, a glob, ...; see `tl_plugin.freezing`): freeze the
            BatchNorm layers whose parameters they match. `None` (the default) freezes the BatchNorm layers of the
            *frozen* parts of the model: those whose parameters all have ``requires_grad=False``, checked again
            before every forward, so a layer unfrozen later (e.g. by a gradual-unfreezing schedule) trains again.
        all_batchnorm (`bool`, *optional*, defaults to `False`): freeze every BatchNorm layer of the model.
        freeze_affine (`bool`, *optional*, defaults to `False`):
            with `selectors` or `all_batchnorm`, also set ``requires_grad=False`` on the frozen layers' affine
            ``weight`` / ``bias``. (In the default mode they are frozen already.)
    """

    selectors: tuple[str, ...] | None = None
    all_batchnorm: bool = False
    freeze_affine: bool = False

    def __post_init__(self) -> None:
        if self.selectors is not None:
            if isinstance(self.selectors, str):
                object.__setattr__(self, "selectors", (self.selectors,))
            else:
                object.__setattr__(self, "selectors", tuple(self.selectors))
            if not self.selectors or not all(isinstance(s, str) and s for s in self.selectors):
                raise ValueError(
                    f"`selectors` must be None or a non-empty list of non-empty selector strings (e.g. "
                    f"['embeddings', 'blocks[:2]']), got {self.selectors!r}."
                )
        for name in ("all_batchnorm", "freeze_affine"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be True or False, got {value!r}.")
        if self.selectors is not None and self.all_batchnorm:
            raise ValueError(
                f"Pass either `selectors` ({list(self.selectors)!r}) or `all_batchnorm=True`, not both."
            )

    @property
    def mode(self) -> str:
        """``"frozen-groups"`` (the default), ``"selectors"`` or ``"all"``."""
        if self.all_batchnorm:
            return "all"
        return "selectors" if self.selectors is not None else "frozen-groups"


def __getattr__(name: str) -> object:
    if name == "BatchNormFreezeConfig":
        warnings.warn(
            "`BatchNormFreezeConfig` is deprecated: use `FreezeBatchNormConfig` (the same class; one name order, "
            "verb first, for the BatchNorm API).",
            DeprecationWarning,
            stacklevel=2,
        )
        return FreezeBatchNormConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def batchnorm_modules(model: nn.Module) -> dict[str, _BatchNorm]:
    """``{module name: module}`` of every BatchNorm layer of `model` (every `_BatchNorm` subclass: BatchNorm1d/2d/3d,
    SyncBatchNorm, the lazy variants), in registration order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, _BatchNorm)}


def _owner_parameters(model: nn.Module, name: str, module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that decide whether BatchNorm layer `name` is frozen: its own affine parameters, or, for a
    layer without any (``affine=False``), those of its nearest ancestor module that has parameters."""
    own = {f"{name}.{p_name}": p for p_name, p in module.named_parameters()}
    if own:
        return own
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        ancestor = model.get_submodule(prefix) if prefix else model
        found = {(f"{prefix}.{p_name}" if prefix else p_name): p for p_name, p in ancestor.named_parameters()}
        if found:
            return found
    return {}


class FrozenBatchNorm:
    """The handle :func:`freeze_batchnorm` returns: which BatchNorm layers are frozen, and :meth:`remove`.

    Attributes:
        config (`FreezeBatchNormConfig`): what was asked for.
        module_names (`tuple[str, ...]`): the BatchNorm layers under control (in the default mode, those that are
            frozen while their parameters stay frozen; see :meth:`frozen_module_names`).
        total (`int`): the number of BatchNorm layers in the model.
    """

    def __init__(
        self,
        config: FreezeBatchNormConfig,
        modules: dict[str, _BatchNorm],
        predicates: dict[str, Callable[[], bool]],
        total: int,
    ) -> None:
        self.config = config
        self._modules = modules
        self._predicates = predicates
        self.total = total
        self._handles: list[RemovableHandle] = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
            if predicates[name]():
                module.train(False)

    def _make_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        predicate = self._predicates[name]

        def hold_in_eval_mode(module: nn.Module, args: Any) -> None:
            if module.training and predicate():
                module.train(False)

        return hold_in_eval_mode

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(self._modules)

    @property
    def active(self) -> bool:
        """Whether the hooks are installed (not yet removed)."""
        return bool(self._handles)

    def frozen_module_names(self) -> list[str]:
        """The BatchNorm layers frozen *now* (in the default mode this follows ``requires_grad``)."""
        if not self.active:
            return []
        return [name for name in self._modules if self._predicates[name]()]

    def remove(self) -> None:
        """Remove the hooks: the layers follow ``model.train()`` / ``model.eval()`` again from the next call."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        return (
            f"FrozenBatchNorm(mode={self.config.mode!r}, frozen={len(self.frozen_module_names())}, "
            f"controlled={len(self._modules)}, total={self.total}, active={self.active})"
        )


def freeze_batchnorm(
    model: nn.Module,
    selectors: str | Sequence[str] | None = None,
    *,
    all_batchnorm: bool = False,
    freeze_affine: bool = False,
    groups: LayerGroups | None = None,
) -> FrozenBatchNorm:
    """Keep BatchNorm layers in eval mode (fixed running statistics) even while the model trains.

    A forward pre-hook on each chosen layer sets it to eval mode right before its forward, so ``model.train()`` (the
    Trainer calls it before every micro-batch) cannot put it back in training mode. Frozen layers normalise with
    their running statistics and leave ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched.

    Args:
        model (`torch.nn.Module`): the model.
        selectors (`str` or `list[str]`, *optional*):
            group selectors (see `tl_plugin.freezing`): freeze the BatchNorm layers whose parameters they match (a
            layer without affine parameters goes with its parent module's parameters). By default (`None`), freeze
            the BatchNorm layers whose parameters all have ``requires_grad=False``, re-checked before every
            forward: freeze a group first, then call this.
        all_batchnorm (`bool`, *optional*, defaults to `False`): freeze every BatchNorm layer.
        freeze_affine (`bool`, *optional*, defaults to `False`):
            with `selectors` or `all_batchnorm`, also freeze the chosen layers' affine ``weight`` / ``bias``.
        groups (`LayerGroups`, *optional*): the model's groups, for `selectors`; discovered when not given.

    Returns:
        `FrozenBatchNorm`: a handle with the frozen layers' names and `remove()`.

    Raises:
        `ValueError`: for invalid arguments, or when `selectors` / `all_batchnorm` select no BatchNorm layer.

    Example:

    ```python
    >>> import torch
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> from tl_plugin import freeze
    >>> from tl_plugin.callbacks.batchnorm import freeze_batchnorm
    >>> model = ResNetForImageClassification(
    ...     ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    ... )
    >>> _ = freeze(model, "embeddings")
    >>> handle = freeze_batchnorm(model)
    >>> handle.frozen_module_names()
    ['resnet.embedder.embedder.normalization']
    >>> stem_bn = model.get_submodule("resnet.embedder.embedder.normalization")
    >>> before = stem_bn.running_mean.clone()
    >>> _ = model.train()(pixel_values=torch.randn(2, 3, 32, 32))
    >>> torch.equal(stem_bn.running_mean, before), stem_bn.training
    (True, False)
    >>> handle.remove()

    ```
    """
    config = FreezeBatchNormConfig(
        selectors=tuple([selectors] if isinstance(selectors, str) else selectors)
        if selectors is not None
        else None,
        all_batchnorm=all_batchnorm,
        freeze_affine=freeze_affine,
    )
    all_bn = batchnorm_modules(model)
    owners = {name: _owner_parameters(model, name, module) for name, module in all_bn.items()}

    chosen: dict[str, _BatchNorm]
    predicates: dict[str, Callable[[], bool]] = {}
    if config.mode == "frozen-groups":
        chosen = dict(all_bn)
        for name in chosen:
            params = tuple(owners[name].values())
            predicates[name] = _all_frozen(params)
    else:
        if not all_bn:
            raise ValueError(
                f"This model ({type(model).__name__}) has no BatchNorm layer; `freeze_batchnorm` with "
                f"{'all_batchnorm=True' if config.all_batchnorm else f'selectors={list(config.selectors or ())!r}'}"
                f" has nothing to freeze."
            )
        if config.all_batchnorm:
            chosen = dict(all_bn)
        else:
            selected = set(select_parameters(model, list(config.selectors or ()), groups))
            chosen = {}
            for name, module in all_bn.items():
                own = {f"{name}.{p}" for p, _ in module.named_parameters()}
                owner_names = set(owners[name])
                if (own and own & selected) or (not own and owner_names and owner_names <= selected):
                    chosen[name] = module
            if not chosen:
                raise ValueError(
                    f"`selectors={list(config.selectors or ())!r}` match no BatchNorm layer of this model; its "
                    f"BatchNorm layers are: {', '.join(all_bn) or 'none'}."
                )
        for name in chosen:
            predicates[name] = _always
        if config.freeze_affine:
            _freeze_affine(model, chosen)
    return FrozenBatchNorm(config, chosen, predicates, total=len(all_bn))


def _always() -> bool:
    return True


def _all_frozen(params: tuple[nn.Parameter, ...]) -> Callable[[], bool]:
    def all_frozen() -> bool:
        return bool(params) and not any(p.requires_grad for p in params)

    return all_frozen


def _freeze_affine(model: nn.Module, chosen: dict[str, _BatchNorm]) -> None:
    params = [p for module in chosen.values() for p in module.parameters(recurse=False)]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)
        raise NoTrainableParametersError(
            "`freeze_affine=True` would leave the model with no trainable parameters; unfreeze something (e.g. "
            "'head') or pass `freeze_affine=False`."
        )


class FreezeBatchNormCallback(TLCallback):
    """Freeze BatchNorm layers for the whole `Trainer` run (see :func:`freeze_batchnorm`).

    At train begin (after your freezing, and after `TransferCallback` when it comes first in the callback list) the
    callback installs the hooks; at train end it removes them, so the trained model behaves normally afterwards.
    The number of frozen layers is logged as ``tl/frozen_batchnorm`` at the start and whenever it changes (in the
    default mode, when a schedule unfreezes a group).

    Args:
        selectors (`str` or `list[str]`, *optional*):
            group selectors whose BatchNorm layers to freeze; by default those of the frozen groups
            (``requires_grad=False``), followed step by step.
        all_batchnorm (`bool`, *optional*, defaults to `False`): freeze every BatchNorm layer.
        freeze_affine (`bool`, *optional*, defaults to `False`):
            with `selectors` or `all_batchnorm`, also freeze the chosen layers' affine parameters.

    To keep the affine parameters of BatchNorm layers in frozen groups *trainable* (fastai's / Lightning's
    ``train_bn``), freeze with ``train_batchnorm=True`` or add the ``"batchnorm"`` selector to what trains (see
    `tl_plugin.freezing`); the default mode then leaves those layers in training mode (batch statistics), and
    ``all_batchnorm=True`` keeps their statistics fixed while their affine parameters train.

    Example:

    ```python
    >>> from tl_plugin.callbacks.batchnorm import FreezeBatchNormCallback
    >>> callback = FreezeBatchNormCallback(all_batchnorm=True)
    >>> callback.config.mode
    'all'
    >>> FreezeBatchNormCallback(selectors=["embeddings", "blocks[:1]"], freeze_affine=True).config.selectors
    ('embeddings', 'blocks[:1]')

    ```
    """

    def __init__(
        self,
        selectors: str | Sequence[str] | None = None,
        *,
        all_batchnorm: bool = False,
        freeze_affine: bool = False,
    ) -> None:
        super().__init__()
        self.config = FreezeBatchNormConfig(
            selectors=(
                tuple([selectors] if isinstance(selectors, str) else selectors)
                if selectors is not None
                else None
            ),
            all_batchnorm=all_batchnorm,
            freeze_affine=freeze_affine,
        )
        self.handle: FrozenBatchNorm | None = None
        self._last_count: int | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("FreezeBatchNormCallback needs the model (the Trainer passes it as `model`).")
        if self.handle is not None:
            self.handle.remove()
        self.handle = freeze_batchnorm(
            model,
            self.config.selectors,
            all_batchnorm=self.config.all_batchnorm,
            freeze_affine=self.config.freeze_affine,
        )
        if self.handle.total == 0:
            logger.warning("FreezeBatchNormCallback: the model has no BatchNorm layer; nothing to freeze.")
        self._report(state, control, force=True)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._report(state, control, force=False)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.handle is not None:
            self.handle.remove()

    def _report(self, state: TrainerState, control: TrainerControl, force: bool) -> None:
        if self.handle is None or self.handle.total == 0:
            return
        count = len(self.handle.frozen_module_names())
        if not force and count == self._last_count:
            return
        self._last_count = count
        # `Trainer.log` resets `should_log` on the main process only: restore it to keep the ranks in step
        should_log = control.should_log
        self.log_event(
            state,
            f"BatchNorm layers frozen (eval mode, fixed running stats): {count} of {self.handle.total} "
            f"({self.config.mode})",
            {"tl/frozen_batchnorm": float(count)},
        )
        control.should_log = should_log

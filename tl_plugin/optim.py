"""Layer-wise optimizers: one param group per layer group, holding *every* parameter, frozen ones included.

Why every parameter. `transformers.Trainer.create_optimizer` keeps only the parameters that have
``requires_grad=True`` when it runs (at the start of `Trainer.train`), and adding a param group later breaks the LR
scheduler (a `LambdaLR` holds one lr function and one base lr per group, fixed at construction). A layer frozen when
the optimizer is built and unfrozen later would therefore never be updated. The optimizers built here hold every
parameter from the start, in named groups (``group_name``: ``"head"``, ``"blocks.3"``, ...); freezing is applied
afterwards with ``requires_grad``. This is correct because PyTorch optimizers skip a parameter whose ``.grad`` is
`None` (the Trainer's ``model.zero_grad()`` sets gradients to `None`): a frozen parameter gets no update, no weight
decay and no optimizer state, and can be unfrozen at any time without touching the optimizer or the scheduler.

Layer-wise LR decay (discriminative learning rates). The lr of a group is ``base_lr * lr_decay ** depth``, where the
depth counts from the top: ``head`` and ``other`` have depth 0, block ``i`` of ``N`` has depth ``N - i`` and the
``embeddings`` ``N + 1``. PEFT adapters form their own groups at the base lr. Every HF LR scheduler (linear, cosine,
constant, with warmup, ...) multiplies each group's own initial lr by the schedule factor, so the decay holds at
every step.

Three ways to use it with a `Trainer`:

- `optimizer_cls_and_kwargs` for ``Trainer(optimizer_cls_and_kwargs=...)`` (a plain Trainer: one added argument);
- `create_optimizer` for ``Trainer(optimizers=(optimizer, None))`` (not with ``model_init``, nor FSDP);
- `tl_plugin.trainer.TransferTrainer`, a `Trainer` subclass that builds the layer-wise optimizer from the model it
  is given, wrapped or not (FSDP with ``use_orig_params=True`` creates the optimizer after wrapping), and binds the
  tl_plugin callbacks (this module imports nothing above it).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from typing import Any, cast

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .checks import check_number
from .discovery import LayerGroup, LayerGroups, discover_layer_groups

logger = logging.getLogger("tl_plugin")

__all__ = [
    "canonical_parameter_name",
    "create_optimizer",
    "default_no_decay_names",
    "group_depths",
    "layerwise_param_groups",
    "optimizer_cls_and_kwargs",
]

#: Module-path segments that wrappers insert into parameter names (FSDP, activation checkpointing, torch.compile).
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

#: Parameter-name patterns (lower case) that get no weight decay, as in `Trainer.get_decay_parameter_names`.
_NO_DECAY_PATTERNS = tuple(
    re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
)


def canonical_parameter_name(name: str) -> str:
    """`name` without the segments wrappers add: DDP's leading ``module.``, FSDP's ``_fsdp_wrapped_module.``,
    activation checkpointing's ``_checkpoint_wrapped_module.`` and torch.compile's ``_orig_mod.``.

    Example:

    ```python
    >>> from tl_plugin.optim import canonical_parameter_name
    >>> canonical_parameter_name("module._fsdp_wrapped_module.bert.encoder.layer.0._fsdp_wrapped_module.x.weight")
    'bert.encoder.layer.0.x.weight'

    ```
    """
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def named_parameters_by_canonical_name(
    model: nn.Module, known: Collection[str] | None = None
) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of `model`, with wrapper segments removed from names that `known` does not hold."""
    out: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        key = name if known is not None and name in known else canonical_parameter_name(name)
        out[key] = param
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers (FSDP wraps in place and is left as is)."""
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        break
    return model


def _check_lr_decay(lr_decay: Any) -> float | None:
    if lr_decay is None:
        return None
    return check_number(
        "lr_decay", lr_decay, low=0, high=1, include_low=False, hint="e.g. 0.8; 1 or None: no decay"
    )


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> float:
    return check_number(name, value, low=0, include_low=allow_zero)


def group_depths(groups: LayerGroups) -> dict[str, int]:
    """Depth from the top of every group: ``head``/``other``/``adapters`` 0, ``blocks.i`` ``N - i``, ``embeddings``
    ``N + 1`` (``N`` blocks).

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin import discover_layer_groups
    >>> from tl_plugin.optim import group_depths
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> group_depths(discover_layer_groups(model))
    {'embeddings': 4, 'blocks.0': 3, 'blocks.1': 2, 'blocks.2': 1, 'other': 0, 'head': 0}

    ```
    """
    n = groups.num_blocks
    depths: dict[str, int] = {}
    for group in groups:
        if group.kind == "block":
            depths[group.name] = n - (group.index or 0)
        elif group.kind == "embeddings":
            depths[group.name] = n + 1
        else:
            depths[group.name] = 0
    return depths


def default_no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay: biases and normalisation weights.

    A parameter is exempt when its (lower-case) name matches the patterns `Trainer.get_decay_parameter_names` uses
    (``bias``, ``layernorm``, ``rmsnorm``, ``norm``) or when it belongs to a normalisation module (a class whose name
    ends in ``Norm``, e.g. `LayerNorm`, `BatchNorm2d`, `LlamaRMSNorm`, `GroupNorm`). Names are canonical (wrapper
    segments removed).
    """
    names: set[str] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or type(
            module
        ).__name__.lower().endswith("norm")
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if is_norm or any(p.search(full.lower()) for p in _NO_DECAY_PATTERNS):
                names.add(canonical_parameter_name(full))
    return names


def _ordered_for_groups(groups: LayerGroups) -> list[LayerGroup]:
    # Top-down: the first param group is the head's, so the `learning_rate` the Trainer logs (that of param group
    # 0) is the base lr times the schedule factor.
    top_down = list(reversed(groups.ordered()))
    return top_down + [g for g in groups if g.kind == "adapters"]


def layerwise_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float = 0.0,
    lr_decay: float | None = None,
    groups: LayerGroups | None = None,
    no_decay: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Param groups holding every parameter of `model`, one per (layer group x decay / no-decay), top group first.

    Args:
        model (`torch.nn.Module`): the model, possibly wrapped (DDP, FSDP with ``use_orig_params=True``,
            torch.compile): wrapper segments are removed from parameter names before matching them to `groups`.
        base_lr (`float`): the lr of the top groups (``head``, ``other``) and of PEFT adapters.
        weight_decay (`float`, *optional*, defaults to 0): the weight decay of the decay groups.
        lr_decay (`float`, *optional*): factor in (0, 1]; group lr = ``base_lr * lr_decay ** depth`` (see
            `group_depths`). `None` (or 1): every group at `base_lr`.
        groups (`LayerGroups`, *optional*): the model's groups (with unwrapped names); discovered when absent.
        no_decay (collection of `str`, *optional*): names of the parameters without weight decay; defaults to
            `default_no_decay_names` (biases and normalisation weights).

    Returns:
        `list[dict]`: param groups with keys ``params``, ``lr`` (absolute), ``weight_decay``, ``group_name`` (e.g.
        ``"blocks.3"``) and ``lr_scale`` (``lr_decay ** depth``). Empty groups are left out.

    Raises:
        `ValueError`: for an `lr_decay` outside (0, 1], a negative weight decay or base lr, or a parameter of the
        model that is in no group (e.g. FSDP without ``use_orig_params=True``: flattened parameters).

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin.optim import layerwise_param_groups
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> param_groups = layerwise_param_groups(model, base_lr=1e-3, weight_decay=0.01, lr_decay=0.5)
    >>> [(g["group_name"], g["lr"], g["weight_decay"]) for g in param_groups][:3]
    [('head', 0.001, 0.01), ('head', 0.001, 0.0), ('other', 0.001, 0.01)]
    >>> {g["group_name"]: g["lr_scale"] for g in param_groups}
    {'head': 1.0, 'other': 1.0, 'blocks.1': 0.5, 'blocks.0': 0.25, 'embeddings': 0.125}
    >>> sum(len(g["params"]) for g in param_groups) == len(list(model.parameters()))
    True

    ```
    """
    decay = _check_lr_decay(lr_decay)
    base_lr = _check_positive("base_lr", base_lr)
    weight_decay = _check_positive("weight_decay", weight_decay, allow_zero=True)
    if groups is None:
        groups = discover_layer_groups(unwrap_model(model))
    known = set(groups.group_of())
    params = named_parameters_by_canonical_name(model, known)
    unmapped = [name for name in params if name not in known]
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} parameter(s) of the model are in no layer group, e.g. {unmapped[:3]}. Were the groups "
            f"discovered on another model? Under FSDP, set `use_orig_params=True` (flattened parameters cannot be "
            f"grouped by layer)."
        )
    exempt = set(no_decay) if no_decay is not None else default_no_decay_names(unwrap_model(model))
    exempt = {canonical_parameter_name(n) for n in exempt}
    depths = group_depths(groups)
    param_groups: list[dict[str, Any]] = []
    for group in _ordered_for_groups(groups):
        scale = 1.0 if decay is None or group.kind == "adapters" else decay ** depths[group.name]
        members = [n for n in group.param_names if n in params]
        for wd, names in (
            (weight_decay, [n for n in members if n not in exempt]),
            (0.0, [n for n in members if n in exempt]),
        ):
            if names:
                param_groups.append(
                    {
                        "params": [params[n] for n in names],
                        "lr": base_lr * scale,
                        "weight_decay": wd,
                        "group_name": group.name,
                        "lr_scale": scale,
                    }
                )
    return param_groups


_UNSUPPORTED_KWARGS = ("params", "model", "optimizer_dict")


def _optimizer_class_and_defaults(args: TrainingArguments, model: nn.Module) -> tuple[type, dict[str, Any]]:
    """The torch optimizer class and keyword arguments `args.optim` selects (AdamW by default)."""
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, cast(Any, model))
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) or any(
        k in kwargs for k in _UNSUPPORTED_KWARGS
    ):
        raise ValueError(
            f"`TrainingArguments.optim`={str(getattr(args.optim, 'value', args.optim))!r} builds its own parameter "
            f"groups, which a layer-wise optimizer cannot use; choose a plain optimizer such as 'adamw_torch', "
            f"'adamw_torch_fused', 'sgd' or 'adagrad'."
        )
    return optimizer_cls, dict(kwargs)


def create_optimizer(
    model: nn.Module,
    args: TrainingArguments,
    lr_decay: float | None = None,
    groups: LayerGroups | None = None,
    no_decay: Collection[str] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer of ``args.optim`` (AdamW by default, with the args' lr, betas, eps and weight decay) over
    `layerwise_param_groups` of every parameter of `model`.

    Pass it as ``Trainer(optimizers=(optimizer, None))``: the Trainer then builds its LR scheduler on top of it.
    With ``model_init`` (which refuses ``optimizers=``) or FSDP, use `optimizer_cls_and_kwargs` or `TransferTrainer`.

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
    >>> from tl_plugin.optim import create_optimizer
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> args = TrainingArguments("unused", learning_rate=1e-3, weight_decay=0.01, use_cpu=True, report_to=[])
    >>> optimizer = create_optimizer(model, args, lr_decay=0.5)
    >>> type(optimizer).__name__, optimizer.param_groups[-1]["group_name"], optimizer.param_groups[-1]["lr"]
    ('AdamW', 'embeddings', 0.000125)

    ```
    """
    optimizer_cls, kwargs = _optimizer_class_and_defaults(args, model)
    param_groups = layerwise_param_groups(
        model,
        base_lr=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_decay=lr_decay,
        groups=groups,
        no_decay=no_decay,
    )
    kwargs.pop("weight_decay", None)  # set per group
    return optimizer_cls(param_groups, **kwargs)


class LayerwiseOptimizerFactory:
    """Builds the layer-wise optimizer when the `Trainer` creates its optimizer, from the model it is given then.

    transformers (5.x) treats an `optimizer_cls_and_kwargs` whose first item is not an `Optimizer` subclass as a
    factory and calls ``factory()(model, **kwargs)`` with the (possibly FSDP-wrapped) model. Used by
    `optimizer_cls_and_kwargs`; not meant to be called directly.
    """

    def __call__(
        self,
        model: nn.Module,
        *,
        args: TrainingArguments,
        lr_decay: float | None = None,
        groups: LayerGroups | None = None,
        no_decay: Collection[str] | None = None,
    ) -> torch.optim.Optimizer:
        return create_optimizer(model, args, lr_decay=lr_decay, groups=groups, no_decay=no_decay)


def _trainer_accepts_factories() -> bool:
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:
        return False
    return bool(is_optimizer_factory(LayerwiseOptimizerFactory))


def optimizer_cls_and_kwargs(
    model: nn.Module,
    args: TrainingArguments,
    lr_decay: float | None = None,
    groups: LayerGroups | None = None,
    no_decay: Collection[str] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The value for ``Trainer(optimizer_cls_and_kwargs=...)`` that makes a plain `Trainer` build a layer-wise
    optimizer over every parameter (see the module docstring).

    With transformers versions that accept optimizer factories (5.x), the optimizer is built by
    `LayerwiseOptimizerFactory` from the model the Trainer holds when it creates the optimizer (so it works with
    ``model_init`` and repeated ``train()`` calls). With older versions, the param groups are built now and passed
    as ``kwargs["params"]``, which the Trainer uses instead of its own groups (once: it pops them).

    Args:
        model (`torch.nn.Module`): the model given to the Trainer (its groups are discovered now, so a model the
            discovery cannot handle fails here, before training).
        args (`TrainingArguments`): the training arguments (optimizer type, lr, betas, eps, weight decay).
        lr_decay (`float`, *optional*): layer-wise LR decay factor in (0, 1]; `None`: no decay.
        groups (`LayerGroups`, *optional*): the model's layer groups; discovered when absent.
        no_decay (collection of `str`, *optional*): parameter names without weight decay (default: biases, norms).

    Example:

    ```python
    >>> import tempfile
    >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    >>> from tl_plugin.optim import optimizer_cls_and_kwargs
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> args = TrainingArguments(tempfile.mkdtemp(), learning_rate=1e-3, use_cpu=True, report_to=[])
    >>> trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, args, 0.5))
    >>> optimizer = trainer.create_optimizer()
    >>> [g["group_name"] for g in optimizer.param_groups][::2]
    ['head', 'other', 'blocks.1', 'blocks.0', 'embeddings']

    ```
    """
    decay = _check_lr_decay(lr_decay)
    if groups is None:
        groups = discover_layer_groups(unwrap_model(model))
    _optimizer_class_and_defaults(args, model)  # fail now on an unsupported `args.optim`
    if _trainer_accepts_factories():
        return LayerwiseOptimizerFactory, {
            "args": args,
            "lr_decay": decay,
            "groups": groups,
            "no_decay": no_decay,
        }
    optimizer_cls, kwargs = _optimizer_class_and_defaults(args, model)
    kwargs.pop("weight_decay", None)
    kwargs["params"] = layerwise_param_groups(
        model, args.learning_rate, args.weight_decay, decay, groups=groups, no_decay=no_decay
    )
    return optimizer_cls, kwargs

"""`LayerwiseLRDecayCallback`: layer-wise LR decay (discriminative learning rates) from a Trainer's callbacks.

A callback cannot restructure the Trainer's optimizer before it exists: ``on_train_begin`` runs after the optimizer
and the LR scheduler are built, and on resume the Trainer loads the saved optimizer state into a freshly built
optimizer *before* any callback event, which fails if the param groups differ. Hence three routes, all giving the
same optimizer (`tl_plugin.optim`'s layer-wise groups over every parameter):

- bound (`tl_plugin.trainer.TransferTrainer` builds it itself; :func:`tl_plugin.callbacks.attach` binds the
  callback, which then installs the factory as the trainer's ``optimizer_cls_and_kwargs`` when the trainer has no
  optimizer of its own): the optimizer is layer-wise from the start, on every run and every resume;
- unbound (``Trainer(callbacks=[LayerwiseLRDecayCallback(0.8)])``): at ``on_train_begin`` the callback rebuilds,
  in place, the param groups of the optimizer the Trainer built by default (no ``optimizers=``, no
  ``optimizer_cls_and_kwargs=``) and the base lrs of its LR scheduler (:func:`rebuild_layerwise_in_place`), before
  the first step. Such a run's checkpoints hold the layer-wise optimizer state, which the Trainer's own optimizer
  cannot load in a new process: resuming them needs one of the bound routes (a warning says so);
- at ``on_train_begin`` the callback checks that the optimizer has one param group per layer group with
  ``lr = base_lr * lr_decay ** depth`` and raises, naming the fix, when it does not (e.g. your own optimizer).
"""

from __future__ import annotations

import logging
import math
from typing import Any, cast

import torch
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from ..discovery import LayerGroups, discover_layer_groups
from ..optim import _check_lr_decay, layerwise_param_groups, optimizer_cls_and_kwargs, unwrap_model
from .base import TLCallback, unwrap_scheduler

logger = logging.getLogger("tl_plugin")

__all__ = [
    "LayerwiseLRDecayCallback",
    "ensure_layerwise_optimizer",
    "install_layerwise_optimizer",
    "rebuild_layerwise_in_place",
    "verify_layerwise_optimizer",
]


def _fix_hint(lr_decay: float | None) -> str:
    value = "None" if lr_decay is None else f"{lr_decay:g}"
    return (
        "Let the Trainer build it: drop your `optimizers=` / `optimizer_cls_and_kwargs=` (the callback then makes "
        "tl_plugin's layer-wise optimizer of it), or pass `optimizer_cls_and_kwargs=tl_plugin.optim."
        f"optimizer_cls_and_kwargs(model, training_args, lr_decay={value})`, or use "
        f"`tl_plugin.TransferTrainer(..., lr_decay={value})`."
    )


def install_layerwise_optimizer(
    trainer: Any, lr_decay: float | None, overrides: dict[str, Any] | None = None
) -> bool:
    """Make a plain `Trainer` without its own optimizer build the layer-wise optimizer (returns whether it did).

    Leaves a `TransferTrainer` (it builds one itself), and a trainer given ``optimizers=`` or
    ``optimizer_cls_and_kwargs=``, unchanged: their optimizer is checked at ``on_train_begin``.
    """
    if getattr(trainer, "tl_layer_groups", None) is not None:
        return False
    if getattr(trainer, "optimizer", None) is not None or getattr(trainer, "optimizer_cls_and_kwargs", None):
        return False
    model = getattr(trainer, "model", None)
    if model is None:
        return False
    groups = discover_layer_groups(unwrap_model(model), **(overrides or {}))
    trainer.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(model, trainer.args, lr_decay, groups=groups)
    return True


def _depth_of(name: str, num_blocks: int) -> int:
    if name.startswith("blocks."):
        return num_blocks - int(name.split(".", 1)[1])
    if name == "embeddings":
        return num_blocks + 1
    return 0


def verify_layerwise_optimizer(optimizer: Any, lr_decay: float | None, who: str) -> None:
    """Raise a `ValueError` unless `optimizer` has layer-wise param groups with ``lr_scale = lr_decay ** depth`` and
    one common base lr (``initial_lr / lr_scale``)."""
    param_groups = optimizer.param_groups
    unnamed = [i for i, g in enumerate(param_groups) if "group_name" not in g or "lr_scale" not in g]
    if unnamed:
        raise ValueError(
            f"{who} needs an optimizer with one param group per layer group (built by tl_plugin), but the Trainer's "
            f"optimizer has {len(unnamed)} of {len(param_groups)} param group(s) without a `group_name` (the "
            f"default Trainer optimizer, or one you built). {_fix_hint(lr_decay)}"
        )
    names = {g["group_name"] for g in param_groups}
    num_blocks = 1 + max((int(n.split(".", 1)[1]) for n in names if n.startswith("blocks.")), default=-1)
    decay = 1.0 if lr_decay is None else lr_decay
    for group in param_groups:
        expected = (
            decay ** _depth_of(group["group_name"], num_blocks) if group["group_name"] != "adapters" else 1.0
        )
        if not math.isclose(group["lr_scale"], expected, rel_tol=1e-9):
            raise ValueError(
                f"{who}: param group {group['group_name']!r} has lr_scale {group['lr_scale']:g}, expected "
                f"{expected:g} for lr_decay={decay:g}: the optimizer was built with another `lr_decay`. "
                f"{_fix_hint(lr_decay)}"
            )
    bases = [g.get("initial_lr", g["lr"]) / g["lr_scale"] for g in param_groups]
    if any(not math.isclose(b, bases[0], rel_tol=1e-6) for b in bases):
        raise ValueError(
            f"{who}: the param groups' initial lrs are not one base lr times their lr_scale ({sorted(set(bases))})."
        )


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` (or the optimizer itself)."""
    inner = getattr(optimizer, "optimizer", None)
    return cast(torch.optim.Optimizer, inner if isinstance(inner, torch.optim.Optimizer) else optimizer)


def is_trainer_default_optimizer(optimizer: Any, model: Any, args: TrainingArguments) -> bool:
    """Whether `optimizer` is the one `Trainer.create_optimizer` builds by default: the class ``args.optim``
    selects, a decay and a no-decay param group (no ``group_name``; their lr may already be a schedule's), and no
    state yet."""
    inner = _inner_optimizer(optimizer)
    groups = inner.param_groups
    if len(groups) != 2 or any("group_name" in g for g in groups) or inner.state:
        return False
    optimizer_cls, _ = Trainer.get_optimizer_cls_and_kwargs(args, cast(Any, unwrap_model(model)))
    if type(inner) is not optimizer_cls:
        return False
    return [g.get("weight_decay") for g in groups] == [args.weight_decay, 0.0]


def rebuild_layerwise_in_place(
    optimizer: Any,
    scheduler: Any,
    model: Any,
    args: TrainingArguments,
    lr_decay: float | None,
    groups: LayerGroups,
) -> None:
    """Replace the param groups of `optimizer` (before its first step) by `tl_plugin.optim`'s layer-wise groups
    over every parameter of `model`, and the base lrs and lr functions of the Trainer's `LambdaLR` `scheduler` to
    match: the optimizer and scheduler then are what the layer-wise factory would have built."""
    inner = _inner_optimizer(optimizer)
    sched = unwrap_scheduler(scheduler)
    if (
        not isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
        or len({id(fn) for fn in sched.lr_lambdas}) != 1
    ):
        raise ValueError(
            f"The layer-wise optimizer can be built at train start only under the Trainer's function-of-the-step "
            f"LR scheduler (every `lr_scheduler_type` but 'reduce_lr_on_plateau' and 'greedy'), got "
            f"{type(sched).__name__}: {_fix_hint(lr_decay)}"
        )
    new_groups = layerwise_param_groups(model, args.learning_rate, args.weight_decay, lr_decay, groups=groups)
    inner.param_groups.clear()
    for group in new_groups:
        inner.add_param_group(group)
    fn = sched.lr_lambdas[0]
    sched.lr_lambdas = [fn] * len(inner.param_groups)
    sched.base_lrs = [float(g["lr"]) for g in inner.param_groups]
    for group, base in zip(inner.param_groups, sched.base_lrs, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in inner.param_groups]


def ensure_layerwise_optimizer(
    callback: TLCallback,
    optimizer: Any,
    scheduler: Any,
    model: Any,
    args: TrainingArguments,
    lr_decay: float | None,
    overrides: dict[str, Any] | None,
    who: str,
) -> None:
    """At ``on_train_begin``: make sure `optimizer` is layer-wise with `lr_decay`, rebuilding the Trainer's default
    optimizer in place when `callback` is not bound (see the module docstring); raise naming the fix otherwise."""
    if (
        callback.trainer is None
        and model is not None
        and not any("group_name" in g for g in optimizer.param_groups)
        and is_trainer_default_optimizer(optimizer, model, args)
    ):
        groups = discover_layer_groups(unwrap_model(model), **(overrides or {}))
        rebuild_layerwise_in_place(optimizer, scheduler, model, args, lr_decay, groups)
        logger.warning(
            "%s: built the layer-wise optimizer in place at train start (the callback is not attached to its "
            "Trainer); to resume this run's checkpoints in a new process, use `tl_plugin.attach(trainer, ...)` or "
            "`tl_plugin.TransferTrainer`.",
            who,
        )
    verify_layerwise_optimizer(optimizer, lr_decay, who)


class LayerwiseLRDecayCallback(TLCallback):
    """Layer-wise LR decay: the lr of layer group ``g`` is ``learning_rate * lr_decay ** depth(g)``, with the depth
    counted from the top (``head``: 0, block ``i`` of ``N``: ``N - i``, ``embeddings``: ``N + 1``), at every step
    of every HF LR schedule (each param group's schedule multiplies its own initial lr).

    Add it to ``Trainer(callbacks=[...])`` (or with `tl_plugin.attach`): the Trainer then trains with
    `tl_plugin.optim`'s layer-wise optimizer (see the module docstring for how, and for resuming), checked at
    ``on_train_begin``; the callback logs the lr scale of each group (``tl/lr_scale/<group>``). `TransferTrainer`
    takes `lr_decay` from it.

    Args:
        lr_decay (`float`): the decay factor, in (0, 1].
        blocks (`str` or `list[str]`, *optional*): block-stack override for layer discovery.
        head (`list[str]`, *optional*): head override for layer discovery.

    Example:

    ```python
    >>> import tempfile, torch
    >>> from transformers import (
    ...     BertConfig, BertForSequenceClassification, PrinterCallback, Trainer, TrainingArguments
    ... )
    >>> from tl_plugin.callbacks import LayerwiseLRDecayCallback
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    ... )
    >>> data = [{"input_ids": torch.randint(5, 99, (8,)), "labels": i % 2} for i in range(16)]
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=2, learning_rate=1e-3, per_device_train_batch_size=8,
    ...                          use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[LayerwiseLRDecayCallback(0.5)])
    >>> trainer.remove_callback(PrinterCallback)  # no log lines in this example
    >>> _ = trainer.train()
    >>> {g["group_name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    {'head': 0.001, 'other': 0.001, 'blocks.1': 0.0005, 'blocks.0': 0.00025, 'embeddings': 0.000125}
    >>> LayerwiseLRDecayCallback(1.5)
    Traceback (most recent call last):
    ...
    ValueError: `lr_decay` must be a finite number in (0, 1] (e.g. 0.8; 1 or None: no decay), got 1.5.

    ```
    """

    conflict_key = "layer-wise learning rates"

    def __init__(
        self, lr_decay: float, *, blocks: str | list[str] | None = None, head: list[str] | None = None
    ) -> None:
        super().__init__()
        decay = _check_lr_decay(lr_decay)
        if decay is None:
            raise ValueError("`lr_decay` must be a finite number in (0, 1] (e.g. 0.8; 1: no decay), got None.")
        self.lr_decay: float = decay
        self.blocks = blocks
        self.head = head

    @property
    def layer_group_overrides(self) -> dict[str, Any] | None:
        if self.blocks is None and self.head is None:
            return None
        return {"blocks": self.blocks, "head": self.head}

    def bind(self, trainer: Any) -> None:
        super().bind(trainer)
        install_layerwise_optimizer(trainer, self.lr_decay, self.layer_group_overrides)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            return
        who = f"LayerwiseLRDecayCallback(lr_decay={self.lr_decay:g})"
        ensure_layerwise_optimizer(
            self,
            optimizer,
            kwargs.get("lr_scheduler"),
            kwargs.get("model"),
            args,
            self.lr_decay,
            self.layer_group_overrides,
            who,
        )
        scales = {g["group_name"]: float(g["lr_scale"]) for g in optimizer.param_groups}
        table = ", ".join(f"{name}: {scale:.4g}" for name, scale in scales.items())
        self.log_event(
            state,
            f"{who}: lr scale per layer group: {table}",
            {f"tl/lr_scale/{n}": s for n, s in scales.items()},
        )

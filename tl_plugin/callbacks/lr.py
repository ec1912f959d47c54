"""`LayerwiseLRDecayCallback`: layer-wise LR decay (discriminative learning rates) from a Trainer's callbacks.

A callback cannot restructure the Trainer's optimizer by itself: ``on_train_begin`` runs after the optimizer and the
LR scheduler exist (a `LambdaLR` holds one base lr per param group, fixed at construction, and
``optimizer.add_param_group`` afterwards breaks it), and on resume the Trainer loads the saved optimizer state into a
freshly built optimizer *before* any callback event, which fails if the param groups differ. So the param groups
must come from the optimizer factory of `tl_plugin.optim` in every process, and the callback makes sure they do:

- in ``on_init_end`` (the end of ``Trainer(...)``, before the optimizer exists) the callback binds itself to its
  `Trainer` and, when the trainer has no optimizer of its own (no ``optimizers=``, no
  ``optimizer_cls_and_kwargs=``), installs the factory as the trainer's ``optimizer_cls_and_kwargs``. A plain
  ``Trainer(..., callbacks=[LayerwiseLRDecayCallback(0.8)])`` therefore builds the layer-wise optimizer, on every
  run and every resume; `TransferTrainer` builds it itself;
- at ``on_train_begin`` it checks that the optimizer has one param group per layer group with
  ``lr = base_lr * lr_decay ** depth`` and raises, naming the fix, when it does not (e.g. your own optimizer).
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerControl, TrainerState, TrainingArguments

from ..discovery import discover_layer_groups
from ..optim import _check_lr_decay, optimizer_cls_and_kwargs, unwrap_model
from .base import TLCallback, claim_exclusive

__all__ = ["LayerwiseLRDecayCallback", "install_layerwise_optimizer", "verify_layerwise_optimizer"]


def _fix_hint(lr_decay: float | None) -> str:
    value = "None" if lr_decay is None else f"{lr_decay:g}"
    return (
        "Let the Trainer build it: drop your `optimizers=` / `optimizer_cls_and_kwargs=` (the callback then installs "
        "tl_plugin's layer-wise optimizer), or pass `optimizer_cls_and_kwargs=tl_plugin.optim."
        f"optimizer_cls_and_kwargs(model, training_args, lr_decay={value})`, or use "
        f"`tl_plugin.optim.TransferTrainer(..., lr_decay={value})`."
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


class LayerwiseLRDecayCallback(TLCallback):
    """Layer-wise LR decay: the lr of layer group ``g`` is ``learning_rate * lr_decay ** depth(g)``, with the depth
    counted from the top (``head``: 0, block ``i`` of ``N``: ``N - i``, ``embeddings``: ``N + 1``), at every step
    of every HF LR schedule (each param group's schedule multiplies its own initial lr).

    Add it to ``Trainer(callbacks=[...])``: it makes the Trainer build `tl_plugin.optim`'s layer-wise optimizer
    (see the module docstring), checks it at ``on_train_begin`` and logs the lr scale of each group
    (``tl/lr_scale/<group>``). `TransferTrainer` takes `lr_decay` from it.

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
    ValueError: `lr_decay` must be a number in (0, 1] (e.g. 0.8; 1 or None: no decay), got 1.5.

    ```
    """

    conflict_key = "layer-wise learning rates"

    def __init__(
        self, lr_decay: float, *, blocks: str | list[str] | None = None, head: list[str] | None = None
    ) -> None:
        super().__init__()
        decay = _check_lr_decay(lr_decay)
        if decay is None:
            raise ValueError("`lr_decay` must be a number in (0, 1] (e.g. 0.8; 1: no decay), got None.")
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

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.bind_from_caller()  # binding installs the layer-wise optimizer factory

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.bind_from_caller()
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            return
        claim_exclusive(self, optimizer)
        who = f"LayerwiseLRDecayCallback(lr_decay={self.lr_decay:g})"
        verify_layerwise_optimizer(optimizer, self.lr_decay, who)
        scales = {g["group_name"]: float(g["lr_scale"]) for g in optimizer.param_groups}
        table = ", ".join(f"{name}: {scale:.4g}" for name, scale in scales.items())
        self.log_event(
            state,
            f"{who}: lr scale per layer group: {table}",
            {f"tl/lr_scale/{n}": s for n, s in scales.items()},
        )

"""Shared machinery of the tl_plugin callbacks: logging through `Trainer.log`, main-process-only side effects.

A `TrainerCallback` never sees the `Trainer` itself, only the model, optimizer and scheduler. To log events (freeze
phases, penalties) so that TensorBoard, W&B and MLflow users see them, a tl_plugin callback must be *bound* to its
trainer: `TransferTrainer` binds them automatically, and :func:`attach` does it for a plain `Trainer`. An unbound
callback still works; its events then go to the Python logger (``tl_plugin``) on the main process only, and are
kept in :attr:`TLCallback.events`.

Every tl_plugin callback also refuses, before the first training step, a run launched on several processes that the
Trainer would not wrap in DistributedDataParallel (:func:`tl_plugin.distributed.check_ddp_will_wrap`): the check
runs at ``on_init_end`` and ``on_train_begin``, also in subclasses that override those events.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..distributed import check_ddp_will_wrap, is_distributed

logger = logging.getLogger("tl_plugin")


class TLCallback(TrainerCallback):
    """Base class of the tl_plugin callbacks.

    Subclasses call :meth:`log_event` for things a person wants to see in their dashboards. The event's numbers go
    through `Trainer.log` (main process only) when the callback is bound to its trainer; its text goes to the
    ``tl_plugin`` logger.

    At ``on_init_end`` and ``on_train_begin`` (its own or a subclass's override, wrapped by `__init_subclass__`) the
    callback first calls :func:`tl_plugin.distributed.check_ddp_will_wrap`: several launched processes that the
    Trainer would not wrap in DDP raise `tl_plugin.distributed.DistributedSetupError` before the first step.
    """

    #: Callbacks of the same `conflict_key` decide which parameters are trainable: two in one Trainer conflict.
    conflict_key: str | None = None

    #: The events at which the DDP check runs (before the first step: ``Trainer(...)`` and the start of ``train``).
    _DDP_CHECK_EVENTS = ("on_init_end", "on_train_begin")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for event in cls._DDP_CHECK_EVENTS:
            method = cls.__dict__.get(event)
            if method is not None and not getattr(method, "_tl_checks_ddp", False):
                setattr(cls, event, _checking_ddp(method))

    def __init__(self) -> None:
        self._trainer_ref: weakref.ReferenceType[Any] | None = None
        self.events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ binding
    def bind(self, trainer: Any) -> None:
        """Give the callback a (weak) reference to its trainer, so that events go through `trainer.log`."""
        self._trainer_ref = weakref.ref(trainer)

    @property
    def trainer(self) -> Any | None:
        return self._trainer_ref() if self._trainer_ref is not None else None

    def bind_from_caller(self) -> None:
        """Bind to the `Trainer` firing the current event, if the callback is not bound yet.

        A callback passed as ``Trainer(callbacks=[...])`` is never given its trainer. Called from an event handler,
        this finds the `Trainer` whose method fired the event further up the call stack (its ``__init__`` for
        ``on_init_end``, ``train`` for ``on_train_begin``) and, if this callback is one of its callbacks, binds every
        tl_plugin callback of that trainer (:func:`bind_all`, which also checks for conflicts). When no trainer is
        found, the callback stays unbound and logs to the Python logger only.
        """
        if self.trainer is not None:
            return
        trainer = find_calling_trainer()
        if trainer is not None and any(cb is self for cb in trainer.callback_handler.callbacks):
            bind_all(trainer)

    # ------------------------------------------------------------------ logging
    def log_event(self, state: TrainerState, message: str, metrics: dict[str, float] | None = None) -> None:
        """Record an event; on the main process, log `message` and send `metrics` through `Trainer.log`."""
        event = {"step": state.global_step, "epoch": state.epoch, "message": message, **(metrics or {})}
        self.events.append(event)
        if not state.is_world_process_zero:
            return
        logger.info("[step %s] %s", state.global_step, message)
        trainer = self.trainer
        if trainer is not None and metrics:
            # `Trainer.log` runs `on_log`, which resets `control.should_log`. Called from a step or epoch event that
            # would drop the Trainer's own loss log for that step on this process only, and under DDP the ranks
            # would then disagree on the loss all-gather: keep the flag as it was.
            control = getattr(trainer, "control", None)
            should_log = getattr(control, "should_log", None)
            trainer.log(dict(metrics))
            if control is not None and should_log is not None:
                control.should_log = should_log

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        check_ddp_will_wrap(args, type(self).__name__)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        check_ddp_will_wrap(args, type(self).__name__)


def _checking_ddp(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` (a callback event handler), preceded by :func:`tl_plugin.distributed.check_ddp_will_wrap`."""

    @functools.wraps(method)
    def handler(self: TLCallback, args: TrainingArguments, *rest: Any, **kwargs: Any) -> Any:
        check_ddp_will_wrap(args, type(self).__name__)
        return method(self, args, *rest, **kwargs)

    handler._tl_checks_ddp = True  # type: ignore[attr-defined]
    return handler


def find_calling_trainer(max_depth: int = 16) -> Any | None:
    """The `transformers.Trainer` whose method is running up to `max_depth` frames up the call stack, or `None`."""
    from transformers import Trainer

    frame = sys._getframe(1)
    try:
        for _ in range(max_depth):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back  # type: ignore[assignment]
        return None
    finally:
        del frame


def check_no_conflicts(callbacks: Iterable[Any]) -> None:
    """Raise a `ValueError` when two callbacks that both decide trainability are attached to one Trainer."""
    owners: dict[str, str] = {}
    for callback in callbacks:
        key = getattr(callback, "conflict_key", None)
        if key is None:
            continue
        name = type(callback).__name__
        if key in owners:
            raise ValueError(_conflict_message(owners[key], name, key))
        owners[key] = name


def attach(trainer: Any, *callbacks: TrainerCallback) -> Any:
    """Add `callbacks` to a plain `transformers.Trainer` and bind every tl_plugin callback to it.

    Binding lets the callbacks log through `trainer.log`, so TensorBoard / W&B / MLflow see freeze events. Returns
    the trainer.
    """
    for callback in callbacks:
        trainer.add_callback(callback)
    bind_all(trainer)
    return trainer


def bind_all(trainer: Any) -> None:
    """Bind every `TLCallback` of `trainer` to it and check that no two of them conflict."""
    handler_callbacks = trainer.callback_handler.callbacks
    check_no_conflicts(handler_callbacks)
    for callback in handler_callbacks:
        if isinstance(callback, TLCallback):
            callback.bind(trainer)


# ---------------------------------------------------------------------------------------------- shared helpers
#: Per-object claims of conflict keys: {anchor (a model or an optimizer): {conflict_key: (scope ref, callback ref)}}.
_CLAIMS: weakref.WeakKeyDictionary[Any, dict[str, tuple[Any, weakref.ReferenceType[Any]]]] = (
    weakref.WeakKeyDictionary()
)


def _conflict_message(first: str, second: str, key: str) -> str:
    return (
        f"Conflicting callbacks: {first} and {second} both control {key}. Use one of them (a "
        f"FreezeScheduleCallback can express several phases)."
    )


def claim_exclusive(callback: Any, anchor: Any, scope: Any = None) -> None:
    """Claim `callback.conflict_key` on `anchor` (the model at ``on_init_end``, the optimizer at ``on_train_begin``).

    Callbacks passed as ``Trainer(callbacks=[...])`` never see each other: a second live callback of the same
    `conflict_key` claiming the same anchor within the same `scope` (e.g. the `TrainerState` of one ``Trainer(...)``
    call) raises the same `ValueError` as :func:`check_no_conflicts`, before training starts.
    """
    key = getattr(callback, "conflict_key", None)
    if key is None:
        return
    owners = _CLAIMS.setdefault(anchor, {})
    previous = owners.get(key)
    scope_ref = weakref.ref(scope) if scope is not None else None
    if previous is not None:
        previous_scope = previous[0]() if previous[0] is not None else None
        other = previous[1]()
        same_scope = previous_scope is scope if scope is not None else previous[0] is None
        if same_scope and other is not None and other is not callback:
            raise ValueError(_conflict_message(type(other).__name__, type(callback).__name__, key))
    owners[key] = (scope_ref, weakref.ref(callback))


def require_find_unused_parameters(args: TrainingArguments, who: str) -> None:
    """Raise unless ``ddp_find_unused_parameters=True`` in a distributed run where `who` freezes parameters that
    the DDP reducer registered (they then produce no gradient in some steps).

    :func:`tl_plugin.distributed.is_distributed` says whether the Trainer wraps the model in DDP; a multi-process
    run it would not wrap is refused first (`tl_plugin.distributed.DistributedSetupError`), so that this check
    cannot pass merely because DDP is missing.
    """
    check_ddp_will_wrap(args, who)
    if is_distributed(args) and args.ddp_find_unused_parameters is not True:
        raise ValueError(
            f"{who} freezes, during training, parameters that DistributedDataParallel registered as trainable; DDP "
            f"then needs `TrainingArguments.ddp_find_unused_parameters=True` (got "
            f"{args.ddp_find_unused_parameters!r})."
        )


def checkpoint_folder(args: TrainingArguments, state: TrainerState) -> str:
    """The folder the Trainer writes the checkpoint of the current step to (``<output_dir>/checkpoint-<step>``)."""
    return os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def optimizer_parameter_ids(optimizer: Any) -> set[int]:
    """The ids of every parameter held by `optimizer`'s param groups (works through accelerate's wrapper)."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def unwrap_scheduler(scheduler: Any) -> Any:
    """The torch LR scheduler inside accelerate's `AcceleratedScheduler` (or the scheduler itself)."""
    inner = getattr(scheduler, "scheduler", None)
    return inner if inner is not None and hasattr(inner, "base_lrs") else scheduler

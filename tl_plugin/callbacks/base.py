"""Shared machinery of the tl_plugin callbacks: logging through `Trainer.log`, main-process-only side effects.

A `TrainerCallback` never sees the `Trainer` itself, only the model, optimizer and scheduler. To log events (freeze
phases, penalties) so that TensorBoard, W&B and MLflow users see them, a tl_plugin callback must be *bound* to its
trainer: `TransferTrainer` binds them automatically, and :func:`attach` does it for a plain `Trainer`. An unbound
callback still works; its events then go to the Python logger (``tl_plugin``) on the main process only, and are
kept in :attr:`TLCallback.events`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger("tl_plugin")


class TLCallback(TrainerCallback):
    """Base class of the tl_plugin callbacks.

    Subclasses call :meth:`log_event` for things a person wants to see in their dashboards. The event's numbers go
    through `Trainer.log` (main process only) when the callback is bound to its trainer; its text goes to the
    ``tl_plugin`` logger.
    """

    #: Callbacks of the same `conflict_key` decide which parameters are trainable: two in one Trainer conflict.
    conflict_key: str | None = None

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
            trainer.log(dict(metrics))

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        return None


def check_no_conflicts(callbacks: Iterable[Any]) -> None:
    """Raise a `ValueError` when two callbacks that both decide trainability are attached to one Trainer."""
    owners: dict[str, str] = {}
    for callback in callbacks:
        key = getattr(callback, "conflict_key", None)
        if key is None:
            continue
        name = type(callback).__name__
        if key in owners:
            raise ValueError(
                f"Conflicting callbacks: {owners[key]} and {name} both control {key}. Use one of them (a "
                f"FreezeScheduleCallback can express several phases)."
            )
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

"""Shared machinery of the tl_plugin callbacks: binding to a `Trainer`, logging, conflict checks, and the checks
every callback runs before the first training step.

A `TrainerCallback` never sees the `Trainer` itself, only the model, optimizer and scheduler. A tl_plugin callback
is given its trainer explicitly, by :meth:`TLCallback.bind`: `tl_plugin.trainer.TransferTrainer` binds its
callbacks in its constructor, and :func:`attach` binds them for a plain `Trainer`. Nothing looks for the trainer
anywhere else (no call-stack inspection, no module-global registry).

A bound callback sends the numbers of its events through `Trainer.log`, so TensorBoard, W&B and MLflow see them.
An unbound one (passed as ``Trainer(callbacks=[...])`` and never attached) writes the same entry into
``state.log_history`` (what `Trainer.log` records there, so ``trainer_state.json`` and the history plots have it)
and the ``tl_plugin`` logger, on the main process; it cannot reach the Trainer's reporting integrations, so when
``TrainingArguments.report_to`` names one, it stops at ``on_train_begin`` with one line naming the fix
(:func:`attach` or `TransferTrainer`) instead of leaving the dashboards silently without its numbers.

Two callbacks that both decide one thing (e.g. which parameters are trainable: their `conflict_key`) raise a
`ValueError` before training: :func:`bind_all` checks the trainer's callbacks, and an unbound callback checks the
callbacks the Trainer lists in ``state.stateful_callbacks`` (every `ExportableState` callback exports its
`conflict_key` there) at ``on_init_end`` and at the start of a fresh ``train()``.

Every tl_plugin callback also refuses, before the first training step, a run launched on several processes that the
Trainer would not wrap in DistributedDataParallel (:func:`tl_plugin.distributed.check_ddp_will_wrap`): the check
runs at ``on_init_end`` and ``on_train_begin``, also in subclasses that override those events.

The callbacks' events logger (``tl_plugin.events``) follows the Trainer's logging (:func:`follow_trainer_logging`,
at the same two events): a script that configures no logging still shows the trainable-parameter table and the
freeze events, and ``TrainingArguments(log_level="error")`` silences them.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..distributed import check_ddp_will_wrap, is_distributed

logger = logging.getLogger("tl_plugin")

#: The logger of the callbacks' events (phase changes with the trainable-parameter table, restores, plateaus): a
#: child of ``tl_plugin`` whose level follows the Trainer's logging (`follow_trainer_logging`). Warnings go to
#: ``tl_plugin`` itself and are left to Python's logging.
EVENTS_LOGGER = "tl_plugin.events"
event_logger = logging.getLogger(EVENTS_LOGGER)

# What `follow_trainer_logging` last did to the events logger: the level it set (a level set by anyone else, on it
# or on ``tl_plugin``, is left alone) and the handler it added (when nothing else would print its records).
_followed: dict[str, Any] = {"level": None, "handler": None}

#: The attribute, in an `ExportableState` callback's exported state, that names its `conflict_key`.
CONFLICT_KEY_ATTRIBUTE = "conflict_key"


class TLCallback(TrainerCallback):
    """Base class of the tl_plugin callbacks.

    Subclasses call :meth:`log_event` for things a person wants to see in their dashboards. The event's numbers go
    through `Trainer.log` (main process only) when the callback is bound to its trainer (:meth:`bind`), else into
    ``state.log_history``; its text goes to the ``tl_plugin`` logger.

    At ``on_init_end`` and ``on_train_begin`` (its own or a subclass's override, wrapped by `__init_subclass__`) the
    callback first runs the checks before the first step: :func:`tl_plugin.distributed.check_ddp_will_wrap`
    (several launched processes that the Trainer would not wrap in DDP raise
    `tl_plugin.distributed.DistributedSetupError`), and, at ``on_train_begin``, that an unbound callback which
    reports numbers is not in a run whose ``report_to`` names reporting integrations it cannot reach.
    """

    #: Callbacks of the same `conflict_key` decide which parameters are trainable: two in one Trainer conflict.
    conflict_key: str | None = None

    #: Whether the callback logs numbers (``tl/...``) that a run's reporting integrations should receive.
    reports_metrics: bool = True

    #: The events at which the checks before the first step run (``Trainer(...)`` and the start of ``train``).
    _CHECKED_EVENTS = ("on_init_end", "on_train_begin")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for event in cls._CHECKED_EVENTS:
            method = cls.__dict__.get(event)
            if method is not None and not getattr(method, "_tl_checks_ddp", False):
                setattr(cls, event, _checking(event, method))

    def __init__(self) -> None:
        self._trainer_ref: weakref.ReferenceType[Any] | None = None
        self.events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ binding
    def bind(self, trainer: Any) -> None:
        """Give the callback a (weak) reference to its trainer, so that events go through `trainer.log`.

        Called by `TransferTrainer` and :func:`attach` (through :func:`bind_all`); subclasses extend it to prepare
        what needs the trainer (e.g. the optimizer it will build).
        """
        self._trainer_ref = weakref.ref(trainer)

    @property
    def trainer(self) -> Any | None:
        """The trainer the callback is bound to, or `None`."""
        return self._trainer_ref() if self._trainer_ref is not None else None

    # ------------------------------------------------------------------ logging
    def log_event(self, state: TrainerState, message: str, metrics: dict[str, float] | None = None) -> None:
        """Record an event; on the main process, log `message` and send `metrics` through `Trainer.log` (bound) or
        into ``state.log_history`` (unbound)."""
        event = {"step": state.global_step, "epoch": state.epoch, "message": message, **(metrics or {})}
        self.events.append(event)
        if not state.is_world_process_zero:
            return
        event_logger.info("[step %s] %s", state.global_step, message)
        if not metrics:
            return
        trainer = self.trainer
        if trainer is None:
            # what `Trainer.log` writes into the history (it also passes it to the reporting integrations, which
            # an unbound callback cannot reach: see `_check_reporting`)
            entry: dict[str, Any] = dict(metrics)
            if state.epoch is not None:
                entry["epoch"] = state.epoch
            state.log_history.append({**entry, "step": state.global_step})
            return
        # `Trainer.log` runs `on_log`, which resets `control.should_log`. Called from a step or epoch event that
        # would drop the Trainer's own loss log for that step on this process only, and under DDP the ranks would
        # then disagree on the loss all-gather: keep the flag as it was.
        control = getattr(trainer, "control", None)
        should_log = getattr(control, "should_log", None)
        trainer.log(dict(metrics))
        if control is not None and should_log is not None:
            control.should_log = should_log

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _check_before_first_step(self, "on_init_end", args)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _check_before_first_step(self, "on_train_begin", args)


def _reporting_integrations(args: TrainingArguments) -> list[str]:
    report_to = getattr(args, "report_to", None)
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [str(n) for n in names if str(n) != "none"]


def _check_reporting(callback: TLCallback, args: TrainingArguments) -> None:
    """Raise when an unbound callback that reports numbers runs with reporting integrations it cannot reach."""
    if callback.trainer is not None or not callback.reports_metrics:
        return
    integrations = _reporting_integrations(args)
    if integrations:
        name = type(callback).__name__
        raise ValueError(
            f"{name} cannot send its numbers to `report_to`={integrations} from `Trainer(callbacks=[...])`: add it "
            f"with `tl_plugin.attach(trainer, {name}(...))` or build the Trainer with `tl_plugin.TransferTrainer`."
        )


def tl_log_level(args: TrainingArguments) -> int:
    """The level of the callbacks' events logger (``tl_plugin.events``) in a run of `args`, on this process.

    ``args.get_process_log_level()`` (``log_level`` on the main process, ``log_level_replica`` on the others; the
    ``transformers.logging`` verbosity where that is ``"passive"``), except that on the main process a run which
    asks for nothing (``log_level="passive"`` and transformers' default verbosity, warning) gets ``INFO``: the
    trainable-parameter table and the freeze events are what the callbacks are there to show.

    Example:

    ```python
    >>> import logging
    >>> from transformers import TrainingArguments
    >>> from tl_plugin.callbacks.base import tl_log_level
    >>> logging.getLevelName(tl_log_level(TrainingArguments("out", report_to="none", log_level="info")))
    'INFO'
    >>> logging.getLevelName(tl_log_level(TrainingArguments("out", report_to="none", log_level="error")))
    'ERROR'

    ```
    """
    level = int(args.get_process_log_level())
    if args.should_log and args.log_level == "passive" and level == logging.WARNING:
        return logging.INFO
    return level


def follow_trainer_logging(args: TrainingArguments) -> None:
    """Make the callbacks' events logger (``tl_plugin.events``: the trainable-parameter table, the phase changes)
    follow the Trainer's logging for a run of `args`.

    Sets its level to :func:`tl_log_level` (unless you set a level on it or on the ``tl_plugin`` logger yourself:
    that is left alone), and, when no handler would print its records (a script that configures no logging: Python
    would only print warnings), gives it one that writes to stderr, like ``transformers.logging``'s own. Called by
    every tl_plugin callback at ``on_init_end`` and ``on_train_begin``, and by `TransferTrainer`.
    """
    if not callable(getattr(args, "get_process_log_level", None)):
        return  # not a `TrainingArguments` (a stand-in holding only what a check reads): nothing to follow
    ours = event_logger.level in (logging.NOTSET, _followed["level"])
    if ours and logging.getLogger("tl_plugin").level == logging.NOTSET:
        level = tl_log_level(args)
        event_logger.setLevel(level)
        _followed["level"] = level
    if _followed["handler"] is None and not event_logger.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[tl_plugin] %(message)s"))
        event_logger.addHandler(handler)
        _followed["handler"] = handler


def _check_before_first_step(callback: TLCallback, event: str, args: TrainingArguments) -> None:
    follow_trainer_logging(args)
    check_ddp_will_wrap(args, type(callback).__name__)
    if event == "on_train_begin":
        _check_reporting(callback, args)


def _checking(event: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` (a callback event handler), preceded by the checks before the first step."""

    @functools.wraps(method)
    def handler(self: TLCallback, args: TrainingArguments, *rest: Any, **kwargs: Any) -> Any:
        _check_before_first_step(self, event, args)
        return method(self, args, *rest, **kwargs)

    handler._tl_checks_ddp = True  # type: ignore[attr-defined]
    return handler


# ---------------------------------------------------------------------------------------------- conflicts
def _conflict_message(first: str, second: str, key: str) -> str:
    return (
        f"Conflicting callbacks: {first} and {second} both control {key}. Use one of them (a "
        f"FreezeScheduleCallback can express several phases)."
    )


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


def check_no_conflicts_in_state(state: TrainerState) -> None:
    """:func:`check_no_conflicts` over the callbacks a Trainer lists in ``state.stateful_callbacks``.

    The Trainer exports there every `ExportableState` callback it holds (in ``Trainer(...)``, and again at the
    start of a fresh ``train()``); the tl_plugin ones export their `conflict_key` as the attribute
    :data:`CONFLICT_KEY_ATTRIBUTE`. This is how callbacks passed as ``Trainer(callbacks=[...])``, which never see
    each other, find a conflict before training.
    """
    exported: Any = state.stateful_callbacks
    if not isinstance(exported, Mapping):
        return
    owners: dict[str, str] = {}
    for name, entries in exported.items():
        for entry in entries if isinstance(entries, list) else [entries]:
            attributes = entry.get("attributes") if isinstance(entry, Mapping) else None
            key = attributes.get(CONFLICT_KEY_ATTRIBUTE) if isinstance(attributes, Mapping) else None
            if not isinstance(key, str):
                continue
            if key in owners:
                raise ValueError(_conflict_message(owners[key], str(name), key))
            owners[key] = str(name)


# ---------------------------------------------------------------------------------------------- binding
def bind_all(trainer: Any) -> None:
    """Check that no two callbacks of `trainer` conflict, then bind every `TLCallback` of `trainer` to it."""
    handler_callbacks = trainer.callback_handler.callbacks
    check_no_conflicts(handler_callbacks)
    for callback in handler_callbacks:
        if isinstance(callback, TLCallback):
            callback.bind(trainer)


def attach(trainer: Any, *callbacks: TrainerCallback) -> Any:
    """Add `callbacks` to a plain `transformers.Trainer` and bind every tl_plugin callback of it to it.

    The route for a `Trainer` you build yourself (`tl_plugin.trainer.TransferTrainer` binds its callbacks itself).
    Binding gives each callback its trainer: events go through `trainer.log` (so TensorBoard / W&B / MLflow see
    them), a layer-wise LR decay makes the trainer build its layer-wise optimizer, and a freeze schedule prepares
    the model before the optimizer is built. Callbacks passed as ``Trainer(callbacks=[...])`` are bound too. Raises
    a `ValueError` when two of the trainer's callbacks conflict. Returns the trainer.

    Example:

    ```python
    >>> import tempfile
    >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    >>> from tl_plugin.callbacks import LayerwiseLRDecayCallback, attach
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> args = TrainingArguments(tempfile.mkdtemp(), learning_rate=1e-3, use_cpu=True, report_to=[])
    >>> trainer = attach(Trainer(model=model, args=args), LayerwiseLRDecayCallback(0.5))
    >>> [g["group_name"] for g in trainer.create_optimizer().param_groups][::2]
    ['head', 'other', 'blocks.1', 'blocks.0', 'embeddings']

    ```
    """
    for callback in callbacks:
        trainer.add_callback(callback)
    bind_all(trainer)
    return trainer


# ---------------------------------------------------------------------------------------------- shared helpers
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

"""Freeze schedules: gradual unfreezing (ULMFiT), linear probe then fine-tune (LP-FT) and multi-phase YAML schedules.

All three are one thing: *which layer groups are trainable in phase k, and when phase k ends* (at a global step, at
an epoch, or when an evaluation metric stops improving). They share one phase engine, `_PhasedCallback`:

- **Every parameter a schedule will ever train is in the optimizer.** `Trainer.create_optimizer` keeps only the
  parameters that have ``requires_grad=True`` when it runs, at the start of `Trainer.train`. In ``on_init_end``
  (the end of ``Trainer(...)``, before the optimizer exists and before a DDP wrap) the callback marks every
  parameter it will ever train as trainable and every other one as frozen; phase 0 is applied in
  ``on_train_begin``, after the optimizer and the scheduler exist. A parameter frozen by a phase has no gradient
  (the Trainer sets gradients to `None`), so the optimizer skips it: no update, no weight decay, no state. At
  ``on_train_begin`` the callback checks that every parameter it will ever train is in the optimizer and raises
  otherwise (e.g. your own optimizer built over the trainable parameters only). With `TransferTrainer` or
  `optimizer_cls_and_kwargs` the optimizer holds every parameter anyway.
- **The phase is a function of the training progress.** It is recomputed from ``state.global_step`` /
  ``state.epoch`` before every optimizer step (``on_step_begin``, once per optimizer step, also with gradient
  accumulation), so a resumed run is in the same phase as an uninterrupted one. Only plateau-ended phases need
  memory: the step at which each such phase ended is saved in the checkpoint, in ``trainer_state.json`` (the
  callbacks are `ExportableState`s; they read their entry themselves, so this works whatever
  ``restore_callback_states_from_checkpoint`` says) and in ``tl_plugin_schedule.json`` (names of the trainable
  parameters, the phase), written in ``on_save`` on the main process.
- **Per-phase learning rates and warm restarts** rescale the base lrs of the Trainer's `LambdaLR` scheduler and
  wrap its lr functions (``lr = base_lr x phase_lr / learning_rate x factor(step)``; after a restart at step ``s``,
  the factor is that of a fresh schedule of the same type over the remaining steps, evaluated at ``step - s``).
  Nothing is added to the optimizer, so the scheduler and checkpoints stay consistent.
- **PEFT adapters are never touched**: their ``requires_grad`` stays what PEFT set.

Only the ``phases`` / ``train`` selectors are checked against the model (in ``Trainer(...)``, at ``on_init_end``);
boundaries are checked against the training length at ``on_train_begin``, before the first step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..config import TransferConfig
from ..discovery import LayerGroup, LayerGroups, discover_layer_groups
from ..freezing import GroupReportRow, TrainableReport, select_parameters
from ..optim import canonical_parameter_name, named_parameters_by_canonical_name, unwrap_model
from ..transfer import groups_to_reinitialize, plan_trainable, reinitialize
from .base import (
    CONFLICT_KEY_ATTRIBUTE,
    TLCallback,
    check_no_conflicts_in_state,
    checkpoint_folder,
    optimizer_parameter_ids,
    require_find_unused_parameters,
    unwrap_scheduler,
)
from .lr import ensure_layerwise_optimizer, install_layerwise_optimizer

logger = logging.getLogger("tl_plugin")

__all__ = [
    "SCHEDULE_STATE_FILE",
    "FreezeSchedule",
    "FreezeScheduleCallback",
    "GradualUnfreezingCallback",
    "LinearProbeThenFineTuneCallback",
    "Phase",
    "Plateau",
]

#: The file, in each checkpoint folder, holding the schedule state (phase, trainable parameter names).
SCHEDULE_STATE_FILE = "tl_plugin_schedule.json"
_STATE_VERSION = 1
#: Selector standing for every layer group (not the PEFT adapters).
ALL_GROUPS = "all"
_EPOCH_EPS = 1e-9


# ================================================================================================ configuration
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unknown_keys(kind: str, data: Mapping[str, Any], valid: Sequence[str]) -> None:
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"Unknown {kind} key(s) {unknown}; valid keys are: {', '.join(valid)}.")


@dataclass
class Plateau:
    """End a phase when an evaluation metric stops improving.

    Args:
        metric (`str`, *optional*, defaults to ``"eval_loss"``): the metric, as the Trainer reports it (the
            ``eval_`` prefix is added when missing).
        mode (`str`, *optional*, defaults to ``"min"``): ``"min"`` (lower is better) or ``"max"``.
        patience (`int`, *optional*, defaults to 1): evaluations without improvement that end the phase.
        min_delta (`float`, *optional*, defaults to 0): the smallest change that counts as an improvement.
    """

    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    patience: int = 1
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"`metric` must be a metric name such as 'eval_loss', got {self.metric!r}.")
        if self.mode not in ("min", "max"):
            raise ValueError(f"`mode` must be one of 'min', 'max', got {self.mode!r}.")
        if not _is_int(self.patience) or self.patience < 1:
            raise ValueError(f"`patience` must be an integer >= 1, got {self.patience!r}.")
        if not _is_number(self.min_delta) or self.min_delta < 0:
            raise ValueError(f"`min_delta` must be a number >= 0, got {self.min_delta!r}.")

    @property
    def metric_key(self) -> str:
        """The key of the metric in the Trainer's evaluation metrics."""
        return self.metric if self.metric.startswith("eval_") else f"eval_{self.metric}"

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "patience": self.patience,
            "min_delta": self.min_delta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plateau:
        if not isinstance(data, Mapping):
            raise ValueError(
                f"A plateau must be a mapping (metric, mode, patience, min_delta), got {data!r}."
            )
        _unknown_keys("plateau", data, ("metric", "mode", "patience", "min_delta"))
        return cls(**dict(data))


_PHASE_KEYS = (
    "train",
    "until_step",
    "until_epoch",
    "until_plateau",
    "lr",
    "warm_restart",
    "restart_warmup_steps",
    "name",
)


@dataclass
class Phase:
    """One phase of a freeze schedule: what is trained, until when, at which learning rate.

    Args:
        train (`list[str]`): selectors of the layer groups trained in this phase (``"head"``, ``"blocks[-2:]"``,
            ``"blocks.3"``, globs ...; see `tl_plugin.freezing`), or ``"all"`` for every group. Everything else
            (except PEFT adapters) is frozen.
        until_step (`int`, *optional*): the phase ends when this many optimizer steps (global step, counted from
            the start of training) are done.
        until_epoch (`float`, *optional*): the phase ends when this many epochs (from the start) are done.
        until_plateau (`Plateau` or `dict`, *optional*): the phase ends when the metric stops improving (at the
            latest at `until_step` / `until_epoch` when one is also given).
        lr (`float`, *optional*): the base learning rate in this phase (layer-wise decayed groups keep their
            ratios, the LR schedule keeps running); default: ``TrainingArguments.learning_rate``.
        warm_restart (`bool`, *optional*, defaults to `False`): restart the LR schedule (warmup, then decay over the
            remaining steps) when this phase starts.
        restart_warmup_steps (`int`, *optional*): warmup steps of the restarted schedule; default: the
            ``TrainingArguments`` warmup (``warmup_steps``, a ratio being applied to the remaining steps).
        name (`str`, *optional*): a name for the logs.

    Every phase but the last needs an ``until_*``; the last lasts until the end of training.
    """

    train: list[str]
    until_step: int | None = None
    until_epoch: float | None = None
    until_plateau: Plateau | None = None
    lr: float | None = None
    warm_restart: bool = False
    restart_warmup_steps: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = [self.train]
        if (
            not isinstance(self.train, list)
            or not self.train
            or not all(isinstance(s, str) and s for s in self.train)
        ):
            raise ValueError(
                f"`train` must be a non-empty list of selectors (e.g. ['head', 'blocks[-2:]'] or ['all']), got "
                f"{self.train!r}."
            )
        if "adapters" in self.train:
            raise ValueError(
                "`train` may not name 'adapters': freeze schedules leave PEFT adapter weights as PEFT set them "
                f"(got {self.train!r})."
            )
        if self.until_step is not None and (not _is_int(self.until_step) or self.until_step < 1):
            raise ValueError(f"`until_step` must be an integer >= 1, got {self.until_step!r}.")
        if self.until_epoch is not None and (not _is_number(self.until_epoch) or self.until_epoch <= 0):
            raise ValueError(f"`until_epoch` must be a number > 0, got {self.until_epoch!r}.")
        if self.until_step is not None and self.until_epoch is not None:
            raise ValueError(
                f"A phase ends at `until_step` or at `until_epoch`, not both (got until_step={self.until_step}, "
                f"until_epoch={self.until_epoch})."
            )
        if isinstance(self.until_plateau, Mapping):
            self.until_plateau = Plateau.from_dict(self.until_plateau)
        if self.until_plateau is not None and not isinstance(self.until_plateau, Plateau):
            raise ValueError(f"`until_plateau` must be a Plateau or a mapping, got {self.until_plateau!r}.")
        if self.lr is not None and (not _is_number(self.lr) or self.lr <= 0):
            raise ValueError(f"`lr` must be a number > 0, got {self.lr!r}.")
        if not isinstance(self.warm_restart, bool):
            raise ValueError(f"`warm_restart` must be true or false, got {self.warm_restart!r}.")
        if self.restart_warmup_steps is not None and (
            not _is_int(self.restart_warmup_steps) or self.restart_warmup_steps < 0
        ):
            raise ValueError(
                f"`restart_warmup_steps` must be an integer >= 0, got {self.restart_warmup_steps!r}."
            )
        if self.name is not None and not isinstance(self.name, str):
            raise ValueError(f"`name` must be a string, got {self.name!r}.")

    @property
    def has_end(self) -> bool:
        return self.until_step is not None or self.until_epoch is not None or self.until_plateau is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"train": list(self.train)}
        for key in _PHASE_KEYS[1:]:
            value = getattr(self, key)
            if key == "until_plateau" and value is not None:
                value = value.to_dict()
            if value is not None and not (key == "warm_restart" and value is False):
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Phase:
        if not isinstance(data, Mapping):
            raise ValueError(f"A phase must be a mapping with at least `train`, got {data!r}.")
        _unknown_keys("phase", data, _PHASE_KEYS)
        if "train" not in data:
            raise ValueError(f"A phase needs `train` (the groups to train), got keys {sorted(data)}.")
        return cls(**dict(data))


@dataclass
class FreezeSchedule:
    """An explicit multi-phase freeze schedule, as used by `FreezeScheduleCallback` (and saved as YAML).

    Args:
        phases (`list[Phase]`): the phases, in order; every phase but the last needs an ``until_*``.
        blocks (`str` or `list[str]`, *optional*): override of the block stack (see `discover_layer_groups`).
        head (`list[str]`, *optional*): override of the head modules (see `discover_layer_groups`).

    The YAML format (``FreezeSchedule.load("schedule.yaml")``)::

        phases:
          - name: probe
            train: [head]
            until_epoch: 1
            lr: 1.0e-3
          - train: [head, other, "blocks[-2:]"]
            until_plateau: {metric: eval_loss, patience: 2}
            until_epoch: 4          # at the latest
          - train: [all]
            warm_restart: true

    Example:

    ```python
    >>> from tl_plugin.callbacks import FreezeSchedule
    >>> schedule = FreezeSchedule.from_yaml('''
    ... phases:
    ...   - {train: [head], until_step: 10}
    ...   - {train: [all], warm_restart: true}
    ... ''')
    >>> schedule.phases[1].warm_restart, FreezeSchedule.from_dict(schedule.to_dict()) == schedule
    (True, True)
    >>> FreezeSchedule.from_dict({"phases": [{"train": ["head"], "until_step": 0}, {"train": ["all"]}]})
    Traceback (most recent call last):
    ...
    ValueError: `phases[0]`: `until_step` must be an integer >= 1, got 0.

    ```
    """

    phases: list[Phase]
    blocks: str | list[str] | None = None
    head: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.phases, list) or not self.phases:
            raise ValueError(f"`phases` must be a non-empty list of phases, got {self.phases!r}.")
        phases: list[Phase] = []
        for i, phase in enumerate(self.phases):
            try:
                phases.append(Phase.from_dict(phase) if isinstance(phase, Mapping) else phase)
            except (TypeError, ValueError) as err:
                raise ValueError(f"`phases[{i}]`: {err}") from err
            if not isinstance(phases[-1], Phase):
                raise ValueError(f"`phases[{i}]` must be a Phase or a mapping, got {phase!r}.")
        self.phases = phases
        for i, phase in enumerate(phases[:-1]):
            if not phase.has_end:
                raise ValueError(
                    f"`phases[{i}]` needs an end: `until_step`, `until_epoch` or `until_plateau` (only the last phase "
                    f"lasts until the end of training)."
                )
        if phases[-1].has_end:
            raise ValueError(
                f"The last phase (`phases[{len(phases) - 1}]`) lasts until the end of training and takes no "
                f"`until_*`; add a phase after it."
            )
        if phases[0].warm_restart:
            raise ValueError("`phases[0].warm_restart` is meaningless: the LR schedule starts with phase 0.")
        for unit in ("until_step", "until_epoch"):
            last: tuple[int, float] | None = None
            for i, phase in enumerate(phases):
                value = getattr(phase, unit)
                if value is None:
                    continue
                if last is not None and value <= last[1]:
                    raise ValueError(
                        f"`phases[{i}].{unit}`={value} must be greater than `phases[{last[0]}].{unit}`={last[1]}: "
                        f"boundaries count from the start of training."
                    )
                last = (i, value)
        if self.blocks is not None and not (
            isinstance(self.blocks, str)
            or (isinstance(self.blocks, list) and all(isinstance(b, str) for b in self.blocks))
        ):
            raise ValueError(
                f"`blocks` must be a module path / regex or a list of them, got {self.blocks!r}."
            )
        if self.head is not None and not (
            isinstance(self.head, list) and all(isinstance(h, str) for h in self.head)
        ):
            raise ValueError(f"`head` must be a list of module paths, got {self.head!r}.")

    @property
    def controls_lr(self) -> bool:
        """Whether a phase sets its own lr or restarts the LR schedule."""
        return any(p.lr is not None or p.warm_restart for p in self.phases)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phases": [p.to_dict() for p in self.phases]}
        if self.blocks is not None:
            out["blocks"] = self.blocks
        if self.head is not None:
            out["head"] = list(self.head)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FreezeSchedule:
        if not isinstance(data, Mapping):
            raise ValueError(f"A freeze schedule must be a mapping with `phases`, got {type(data).__name__}.")
        _unknown_keys("freeze-schedule", data, ("phases", "blocks", "head"))
        if "phases" not in data:
            raise ValueError("A freeze schedule needs `phases` (a list of phases).")
        return cls(phases=data["phases"], blocks=data.get("blocks"), head=data.get("head"))

    @classmethod
    def from_yaml(cls, text: str) -> FreezeSchedule:
        """Parse a YAML document (with `yaml.safe_load`)."""
        return cls.from_dict(yaml.safe_load(text) or {})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FreezeSchedule:
        """Read a schedule from a YAML (or JSON) file.

        Raises:
            `FileNotFoundError`: when `path` is not a file.
            `ConfigFileError` (a `ValueError`): when the file is not valid YAML, naming the file, the line and the
                column of the problem.
            `ValueError`: when the content is not a valid schedule.
        """
        from ..config import read_config_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Freeze schedule file {str(path)!r} does not exist.")
        return cls.from_dict(read_config_file(path, "Freeze schedule", json_suffix=False) or {})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the schedule as YAML; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


# ================================================================================================ phase engine
@dataclass(frozen=True)
class _Compiled:
    """A schedule resolved against a model: parameter names (canonical) per phase."""

    groups: LayerGroups
    phases: tuple[Phase, ...]
    trainable: tuple[frozenset[str], ...]
    managed: frozenset[str]
    ever: frozenset[str]

    @property
    def needs_unused_parameters(self) -> bool:
        """Whether a parameter trained in some phase is frozen in another (DDP then sees unused parameters)."""
        return any(self.ever - names for names in self.trainable)

    def trainable_groups(self, k: int) -> list[str]:
        names = self.trainable[k]
        return [g.name for g in self.groups.ordered() if any(n in names for n in g.param_names)]


def _payload_from_state(state: TrainerState, name: str) -> dict[str, Any] | None:
    callbacks: Any = state.stateful_callbacks
    entry = callbacks.get(name) if isinstance(callbacks, Mapping) else None
    if isinstance(entry, list):
        entry = entry[-1] if entry else None
    if not isinstance(entry, Mapping):
        return None
    payload = entry.get("attributes", {}).get("_tl_resume")
    return payload if isinstance(payload, dict) else None


def _fresh_lr_lambda(args: TrainingArguments, num_training_steps: int, warmup: int) -> Callable[[int], float]:
    """The lr function of a fresh scheduler of ``args.lr_scheduler_type`` over `num_training_steps` steps."""
    from transformers import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=dummy,
        num_warmup_steps=warmup,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs
        if isinstance(args.lr_scheduler_kwargs, dict)
        else {},
    )
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(
            f"A warm restart needs an lr schedule given by a function of the step; `lr_scheduler_type`="
            f"{args.lr_scheduler_type!r} is not one (use linear, cosine, constant_with_warmup, polynomial, ...)."
        )
    return scheduler.lr_lambdas[0]


def _piecewise(
    original: Callable[[int], float], restarts: list[tuple[int, Callable[[int], float]]]
) -> Callable[[int], float]:
    if not restarts:
        return original

    def lr_lambda(step: int) -> float:
        for start, fresh in reversed(restarts):
            if step >= start:
                return fresh(step - start)
        return original(step)

    return lr_lambda


class _PhasedCallback(TLCallback, ExportableState):
    """The phase engine shared by the freeze-schedule callbacks (see the module docstring)."""

    conflict_key = "trainability"

    def __init__(self) -> None:
        super().__init__()
        self._compiled: _Compiled | None = None
        self._prepared_ref: weakref.ReferenceType[nn.Module] | None = None
        self._reinitialized_ref: weakref.ReferenceType[nn.Module] | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._active = False
        self._phase = -1
        self._ended_at: dict[int, int] = {}
        self._started_at: dict[int, int] = {}
        self._base_lrs: list[float] | None = None
        self._lambdas_of: tuple[int, list[Callable[[int], float]]] | None = None
        self._restart_fns: dict[int, Callable[[int], float]] = {}
        self._installed_lambdas: list[Callable[[int], float]] | None = None
        self._best: float | None = None
        self._bad = 0
        self._next_step = math.inf
        self._next_epoch = math.inf
        self._max_steps = 0
        self._tl_resume: dict[str, Any] | None = None
        self._saved_phase = -1

    # ------------------------------------------------------------------ to implement
    def phases_for(self, groups: LayerGroups) -> list[Phase]:
        """The phases of this callback on a model with `groups`."""
        raise NotImplementedError

    def _constructor_args(self) -> dict[str, Any]:
        raise NotImplementedError

    def _reinit_groups(self, groups: LayerGroups) -> list[LayerGroup]:
        return []

    def _reinit_seed(self) -> int | None:
        return None

    def _train_label(self, i: int) -> str:
        return f"phases[{i}].train"

    def _until_label(self, i: int, key: str) -> str:
        return f"phases[{i}].{key}"

    #: Whether a boundary beyond the end of training is an error (False for rule-based schedules).
    _strict_length = True

    @property
    def layer_group_overrides(self) -> dict[str, Any] | None:
        """``blocks`` / ``head`` overrides for layer discovery, or `None`."""
        return None

    # ------------------------------------------------------------------ public state
    @property
    def phase(self) -> int:
        """The current phase (``-1`` before training)."""
        return self._phase

    @property
    def phases(self) -> list[Phase]:
        """The phases, once resolved against the model (empty before)."""
        return list(self._compiled.phases) if self._compiled is not None else []

    def trainable_groups(self, phase: int | None = None) -> list[str]:
        """The layer groups trained in `phase` (default: the current one)."""
        if self._compiled is None:
            return []
        return self._compiled.trainable_groups(self._phase if phase is None else phase)

    # ------------------------------------------------------------------ preparation
    def _compile(self, model: nn.Module) -> _Compiled:
        base = unwrap_model(model)
        wrapped = [n for n, _ in base.named_parameters() if canonical_parameter_name(n) != n]
        if wrapped:
            raise ValueError(
                f"{type(self).__name__} first saw the model already wrapped (e.g. {wrapped[0]!r}): pass it as "
                f"`Trainer(callbacks=[...])`, so that it resolves its schedule before the model is wrapped."
            )
        groups = discover_layer_groups(base, **(self.layer_group_overrides or {}))
        phases = self.phases_for(groups)
        all_groups = [g.name for g in groups.ordered()]
        trainable = []
        for i, phase in enumerate(phases):
            selectors = [s for sel in phase.train for s in (all_groups if sel == ALL_GROUPS else [sel])]
            try:
                names = select_parameters(base, selectors, groups)
            except ValueError as err:
                raise ValueError(
                    f"{type(self).__name__}: `{self._train_label(i)}`={phase.train!r} does not fit this model: {err}"
                ) from err
            trainable.append(frozenset(names))
        adapters = set(groups.get("adapters").param_names) if "adapters" in groups.names else set()
        managed = frozenset(n for n, _ in base.named_parameters() if n not in adapters)
        return _Compiled(groups, tuple(phases), tuple(trainable), managed, frozenset().union(*trainable))

    def _is_prepared(self, model: nn.Module) -> bool:
        return self._prepared_ref is not None and self._prepared_ref() is model

    def _prepare(
        self, model: nn.Module, args: TrainingArguments, *, stage: str, resuming: bool = False
    ) -> None:
        """Resolve the schedule on `model`, mark every parameter it will ever train as trainable (the others as
        frozen), and re-initialise what the config says (not when resuming: the checkpoint has the weights)."""
        if self._compiled is None or not self._compiled.managed <= set(
            named_parameters_by_canonical_name(model, self._compiled.managed)
        ):
            self._compiled = self._compile(model)
        compiled = self._compiled
        self._params = {
            n: p
            for n, p in named_parameters_by_canonical_name(model, compiled.managed).items()
            if n in compiled.managed
        }
        for name, param in self._params.items():
            param.requires_grad_(name in compiled.ever)
        if compiled.needs_unused_parameters:
            require_find_unused_parameters(args, type(self).__name__)
        self._maybe_reinitialize(model, args, stage=stage, resuming=resuming)
        self._prepared_ref = weakref.ref(model)

    def _maybe_reinitialize(
        self, model: nn.Module, args: TrainingArguments, *, stage: str, resuming: bool
    ) -> None:
        assert self._compiled is not None
        to_reinit = self._reinit_groups(self._compiled.groups)
        already = self._reinitialized_ref is not None and self._reinitialized_ref() is model
        if not to_reinit or already or resuming:
            return
        if unwrap_model(model) is not model or any(
            n not in dict(model.named_parameters()) for g in to_reinit for n in g.param_names
        ):
            if self._reinitialized_ref is not None:
                return  # re-initialised before the model was wrapped (FSDP wraps after `on_init_end`)
            raise ValueError(
                f"{type(self).__name__} re-initialises {[g.name for g in to_reinit]}, which it must do before the "
                f"model is wrapped: pass it as `Trainer(callbacks=[...])`."
            )
        seed = self._reinit_seed()
        if seed is None and stage == "train_begin":
            seed = args.seed  # the same on every process
        changed = reinitialize(model, to_reinit, seed=seed)
        self._reinitialized_ref = weakref.ref(model)
        logger.info("Re-initialised %d parameters in %s", len(changed), [g.name for g in to_reinit])

    # ------------------------------------------------------------------ checks at train begin
    def _steps_per_epoch(self, args: TrainingArguments, dataloader: Any) -> int | None:
        try:
            length = len(dataloader)
        except TypeError:
            return None
        accumulation = args.gradient_accumulation_steps
        return max(length // accumulation + int(length % accumulation > 0), 1)

    def _check_run_length(self, args: TrainingArguments, state: TrainerState, dataloader: Any) -> None:
        assert self._compiled is not None
        phases = self._compiled.phases
        max_steps = int(state.max_steps)
        per_epoch = self._steps_per_epoch(args, dataloader)
        total_epochs = max_steps / per_epoch if per_epoch else None
        who = type(self).__name__
        if (
            any(p.until_plateau is not None for p in phases)
            and str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no"
        ):
            raise ValueError(
                f"{who} ends a phase when an evaluation metric plateaus, but `TrainingArguments.eval_strategy` is "
                f"'no': set it to 'steps' or 'epoch' (and pass an `eval_dataset`)."
            )
        if not self._strict_length:
            return
        for i, phase in enumerate(phases[:-1]):
            if phase.until_step is not None and phase.until_step >= max_steps:
                raise ValueError(
                    f"{who}: `{self._until_label(i, 'until_step')}`={phase.until_step} is not before the end of "
                    f"training (max_steps={max_steps}), so phase {i + 1} would never start; valid: 1 to "
                    f"{max_steps - 1}."
                )
            if (
                phase.until_epoch is not None
                and total_epochs is not None
                and phase.until_epoch >= total_epochs - _EPOCH_EPS
            ):
                raise ValueError(
                    f"{who}: `{self._until_label(i, 'until_epoch')}`={phase.until_epoch:g} is not before the end of "
                    f"training ({total_epochs:g} epochs), so phase {i + 1} would never start; valid: a number in "
                    f"(0, {total_epochs:g})."
                )

    def _check_optimizer_holds(self, optimizer: Any) -> None:
        assert self._compiled is not None
        held = optimizer_parameter_ids(optimizer)
        missing = [n for n in sorted(self._compiled.ever) if id(self._params[n]) not in held]
        if not missing:
            return
        group_of = self._compiled.groups.group_of()
        groups = sorted({group_of.get(n, "?") for n in missing})
        raise ValueError(
            f"{type(self).__name__} trains {len(missing)} parameter(s) that the optimizer does not hold (groups "
            f"{groups}, e.g. {missing[:3]}): they were frozen when the optimizer was built, so they would silently "
            f"never be updated. Pass the callback as `Trainer(callbacks=[...])` (it then marks them trainable before "
            f"the optimizer is built), or use `tl_plugin.optim.TransferTrainer` / `Trainer(optimizer_cls_and_kwargs="
            f"tl_plugin.optim.optimizer_cls_and_kwargs(model, args))`, whose optimizer holds every parameter; an "
            f"optimizer you build yourself must hold every parameter (`tl_plugin.optim.create_optimizer`)."
        )

    # ------------------------------------------------------------------ resume
    def _payload(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "callback": type(self).__name__,
            "phase": self._phase,
            "ended_at": {str(k): v for k, v in self._ended_at.items()},
            "started_at": {str(k): v for k, v in self._started_at.items()},
            "base_lrs": self._base_lrs,
            "best": self._best,
            "bad": self._bad,
        }

    def state(self) -> dict[str, Any]:
        """`ExportableState`: constructor arguments and the schedule state, saved in ``trainer_state.json``."""
        return {
            "args": self._constructor_args(),
            "attributes": {"_tl_resume": self._payload(), CONFLICT_KEY_ATTRIBUTE: self.conflict_key},
        }

    def _register_state(self, state: TrainerState) -> None:
        # A resumed `TrainerState` only lists the callbacks of the run that saved it, and `Trainer._save_checkpoint`
        # fails (KeyError) on an `ExportableState` callback it does not list: add ours.
        callbacks: Any = state.stateful_callbacks
        if isinstance(callbacks, dict) and type(self).__name__ not in callbacks:
            callbacks[type(self).__name__] = self.state()

    def _find_payload(self, args: TrainingArguments, state: TrainerState) -> dict[str, Any] | None:
        name = type(self).__name__
        candidates = [self._tl_resume, _payload_from_state(state, name)]
        path = os.path.join(checkpoint_folder(args, state), SCHEDULE_STATE_FILE)
        if os.path.isfile(path):
            try:
                candidates.append(json.loads(Path(path).read_text()))
            except (OSError, ValueError):
                logger.warning("Could not read %s; deriving the schedule phase from the global step.", path)
        for payload in candidates:
            if (
                isinstance(payload, dict)
                and payload.get("callback") == name
                and payload.get("version") == _STATE_VERSION
            ):
                return payload
        return None

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        payload = self._find_payload(args, state)
        self._tl_resume = None
        if payload is None:
            phases = self._compiled.phases if self._compiled is not None else ()
            if any(p.until_plateau is not None or p.warm_restart for p in phases):
                logger.warning(
                    "%s: no saved schedule state in the checkpoint; plateau-ended phases are taken as not ended "
                    "and LR warm restarts of past phases as starting now.",
                    type(self).__name__,
                )
            return
        self._ended_at = {int(k): int(v) for k, v in payload.get("ended_at", {}).items()}
        self._started_at = {int(k): int(v) for k, v in payload.get("started_at", {}).items()}
        base_lrs = payload.get("base_lrs")
        self._base_lrs = [float(b) for b in base_lrs] if base_lrs else None
        self._best = payload.get("best")
        self._bad = int(payload.get("bad", 0))
        self._saved_phase = int(payload.get("phase", -1))

    # ------------------------------------------------------------------ phases
    def _resolve(self, state: TrainerState) -> int:
        assert self._compiled is not None
        step, epoch = state.global_step, state.epoch or 0.0
        phases = self._compiled.phases
        k = 0
        while k < len(phases) - 1:
            phase = phases[k]
            if (
                (phase.until_step is not None and step >= phase.until_step)
                or (phase.until_epoch is not None and epoch >= phase.until_epoch - _EPOCH_EPS)
                or (k in self._ended_at and step >= self._ended_at[k])
            ):
                k += 1
            else:
                break
        return k

    def _set_next_boundary(self) -> None:
        assert self._compiled is not None
        phases = self._compiled.phases
        if self._phase >= len(phases) - 1:
            self._next_step = self._next_epoch = math.inf
            return
        phase = phases[self._phase]
        self._next_step = phase.until_step if phase.until_step is not None else math.inf
        self._next_step = min(self._next_step, self._ended_at.get(self._phase, math.inf))
        self._next_epoch = phase.until_epoch - _EPOCH_EPS if phase.until_epoch is not None else math.inf

    def _enter(
        self, k: int, args: TrainingArguments, state: TrainerState, scheduler: Any, *, resumed: bool = False
    ) -> None:
        assert self._compiled is not None
        for j in range(max(self._phase + 1, 1), k + 1):
            self._started_at.setdefault(j, state.global_step)
        trainable = self._compiled.trainable[k]
        for name, param in self._params.items():
            param.requires_grad_(name in trainable)
        if k != self._phase:
            self._best, self._bad = (self._best, self._bad) if resumed else (None, 0)
        self._phase = k
        if self._controls_lr():
            self._apply_lr(args, scheduler)
        self._set_next_boundary()
        self._log_phase(state, resumed)

    def _report(self) -> TrainableReport:
        assert self._compiled is not None
        rows = []
        for group in self._compiled.groups:
            params = [self._params[n] for n in group.param_names if n in self._params]
            if group.kind == "adapters":
                continue
            rows.append(
                GroupReportRow(
                    group.name,
                    sum(p.numel() for p in params if p.requires_grad),
                    sum(p.numel() for p in params),
                )
            )
        return TrainableReport(tuple(rows))

    def _log_phase(self, state: TrainerState, resumed: bool) -> None:
        assert self._compiled is not None
        phase = self._compiled.phases[self._phase]
        report = self._report()
        label = f"phase {self._phase}" + (f" ({phase.name})" if phase.name else "")
        how = "resumed in" if resumed else "entered"
        message = (
            f"{type(self).__name__}: {how} {label} at step {state.global_step}, training "
            f"{', '.join(self._compiled.trainable_groups(self._phase))}\n{report.to_table()}"
        )
        metrics = {
            "tl/phase": float(self._phase),
            "tl/trainable_params": float(report.trainable),
            "tl/trainable_percent": round(report.percent, 4),
        }
        metrics.update({f"tl/trainable_params/{row.group}": float(row.trainable) for row in report.rows})
        self.log_event(state, message, metrics)

    # ------------------------------------------------------------------ learning rates
    def _controls_lr(self) -> bool:
        return self._compiled is not None and any(
            p.lr is not None or p.warm_restart for p in self._compiled.phases
        )

    def _check_scheduler(self, scheduler: Any, optimizer: Any) -> None:
        inner = unwrap_scheduler(scheduler)
        if not isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(
                f"{type(self).__name__} sets per-phase learning rates / warm restarts, which need the Trainer's "
                f"function-of-the-step LR scheduler (every `lr_scheduler_type` but 'reduce_lr_on_plateau' and "
                f"'greedy'), got {type(inner).__name__}."
            )
        if len(inner.base_lrs) != len(optimizer.param_groups):
            raise ValueError(
                f"The LR scheduler has {len(inner.base_lrs)} base lrs for {len(optimizer.param_groups)} param groups."
            )

    def _apply_lr(self, args: TrainingArguments, scheduler: Any) -> None:
        assert self._compiled is not None
        inner = unwrap_scheduler(scheduler)
        if self._lambdas_of is None or self._lambdas_of[0] != id(inner) or self._lr_replaced(scheduler):
            self._lambdas_of = (id(inner), list(inner.lr_lambdas))
        originals = self._lambdas_of[1]
        groups = inner.optimizer.param_groups
        if self._base_lrs is None or len(self._base_lrs) != len(groups):
            self._base_lrs = [float(args.learning_rate) * float(g.get("lr_scale", 1.0)) for g in groups]
        phase = self._compiled.phases[self._phase]
        factor = phase.lr / args.learning_rate if phase.lr is not None else 1.0
        restarts = []
        for j in sorted(self._started_at):
            if j <= self._phase and self._compiled.phases[j].warm_restart:
                restarts.append((self._started_at[j], self._restart_fn(args, j, self._started_at[j])))
        restarts.sort(key=lambda item: item[0])
        inner.base_lrs = [b * factor for b in self._base_lrs]
        inner.lr_lambdas = [_piecewise(fn, restarts) for fn in originals]
        for group, base, fn in zip(groups, inner.base_lrs, inner.lr_lambdas, strict=True):
            group["initial_lr"] = base
            group["lr"] = base * fn(inner.last_epoch)
        inner._last_lr = [g["lr"] for g in groups]
        self._installed_lambdas = inner.lr_lambdas

    def _lr_replaced(self, scheduler: Any) -> bool:
        """Whether the scheduler's lr functions are no longer those this callback installed (e.g. a
        `LayerwiseLRDecayCallback` after it in the list rebuilt the param groups at train start)."""
        if self._installed_lambdas is None or scheduler is None:
            return False
        return unwrap_scheduler(scheduler).lr_lambdas is not self._installed_lambdas

    def _restart_fn(self, args: TrainingArguments, j: int, start: int) -> Callable[[int], float]:
        if start not in self._restart_fns:
            assert self._compiled is not None
            remaining = max(self._max_steps - start, 1)
            phase = self._compiled.phases[j]
            warmup = (
                phase.restart_warmup_steps
                if phase.restart_warmup_steps is not None
                else args.get_warmup_steps(remaining)
            )
            self._restart_fns[start] = _fresh_lr_lambda(args, remaining, warmup)
        return self._restart_fns[start]

    # ------------------------------------------------------------------ Trainer events
    @property
    def lr_decay(self) -> float | None:
        """Layer-wise LR decay this callback needs (from a transfer config), or `None`."""
        return None

    def bind(self, trainer: Any) -> None:
        super().bind(trainer)
        model = getattr(trainer, "model", None)
        if model is not None and getattr(trainer, "optimizer", None) is None and not self._is_prepared(model):
            self._prepare(model, trainer.args, stage="bind")
        if self.lr_decay is not None:
            install_layerwise_optimizer(trainer, self.lr_decay, self.layer_group_overrides)

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        check_no_conflicts_in_state(state)
        model = kwargs.get("model")
        if model is None:
            return
        if not self._is_prepared(model):
            self._prepare(model, args, stage="init")

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model, optimizer, scheduler = kwargs["model"], kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        resuming = state.global_step > 0
        if not resuming:
            check_no_conflicts_in_state(state)
        if not self._is_prepared(model):
            self._prepare(model, args, stage="train_begin", resuming=resuming)
        assert self._compiled is not None
        self._check_run_length(args, state, kwargs.get("train_dataloader"))
        if self._compiled.needs_unused_parameters:
            require_find_unused_parameters(args, type(self).__name__)
        if optimizer is not None:
            if self.lr_decay is not None:
                ensure_layerwise_optimizer(
                    self,
                    optimizer,
                    scheduler,
                    model,
                    args,
                    self.lr_decay,
                    self.layer_group_overrides,
                    f"{type(self).__name__} (lr_decay={self.lr_decay:g})",
                )
            self._check_optimizer_holds(optimizer)
        if self._controls_lr():
            self._check_scheduler(scheduler, optimizer)
        self._max_steps = int(state.max_steps)
        self._phase, self._ended_at, self._started_at, self._base_lrs = -1, {}, {}, None
        self._best, self._bad, self._restart_fns, self._lambdas_of = None, 0, {}, None
        self._installed_lambdas = None
        self._saved_phase = -1
        if resuming:
            self._restore(args, state)
        elif self._controls_lr():
            self._base_lrs = [float(b) for b in unwrap_scheduler(scheduler).base_lrs]  # before any phase lr
        self._register_state(state)
        self._active = True
        phase = self._resolve(state)
        if (
            resuming and self._saved_phase > phase
        ):  # (a boundary at the checkpoint's step gives a later phase)
            logger.warning(
                "%s: the checkpoint was saved in phase %d, the schedule gives the earlier phase %d at step %d (was "
                "the schedule changed?); using phase %d.",
                type(self).__name__, self._saved_phase, phase, state.global_step, phase,
            )  # fmt: skip
        self._enter(phase, args, state, scheduler, resumed=resuming)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self._active:
            return
        if self._installed_lambdas is not None and self._lr_replaced(kwargs.get("lr_scheduler")):
            self._apply_lr(args, kwargs.get("lr_scheduler"))  # another callback rebuilt the param groups
        if state.global_step < self._next_step and (state.epoch or 0.0) < self._next_epoch:
            return
        k = self._resolve(state)
        if k != self._phase:
            self._enter(k, args, state, kwargs.get("lr_scheduler"))

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self._active or self._compiled is None or self._phase >= len(self._compiled.phases) - 1:
            return
        plateau = self._compiled.phases[self._phase].until_plateau
        if plateau is None or self._phase in self._ended_at:
            return
        metrics = kwargs.get("metrics") or {}
        if plateau.metric_key not in metrics:
            raise ValueError(
                f"{type(self).__name__}: the plateau metric {plateau.metric!r} is not among the evaluation metrics "
                f"({', '.join(sorted(metrics))})."
            )
        value = float(metrics[plateau.metric_key])
        if plateau.improved(value, self._best):
            self._best, self._bad = value, 0
            return
        self._bad += 1
        if self._bad >= plateau.patience:
            self._ended_at[self._phase] = state.global_step
            self._set_next_boundary()
            self.log_event(
                state,
                f"{type(self).__name__}: {plateau.metric_key} plateaued at {self._best:.6g} "
                f"({self._bad} evaluation(s) without improvement): phase {self._phase} ends at step "
                f"{state.global_step}",
            )

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or self._compiled is None:
            return
        folder = checkpoint_folder(args, state)
        if not os.path.isdir(folder):
            return
        payload = self._payload()
        payload["global_step"] = state.global_step
        payload["trainable_groups"] = self._compiled.trainable_groups(self._phase) if self._phase >= 0 else []
        payload["requires_grad"] = {n: bool(p.requires_grad) for n, p in sorted(self._params.items())}
        path = Path(folder) / SCHEDULE_STATE_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(path)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._active = False


def _overrides(blocks: str | list[str] | None, head: list[str] | None) -> dict[str, Any] | None:
    if blocks is None and head is None:
        return None
    return {"blocks": blocks, "head": head}


# ================================================================================================ the callbacks
class FreezeScheduleCallback(_PhasedCallback):
    """Train an explicit multi-phase freeze schedule: in each phase, only the given layer groups are trained, until
    a step, an epoch, or a plateau of an evaluation metric, optionally at their own lr or with an LR warm restart.

    Like the finetuning-scheduler package for Lightning, but for the HF `Trainer`; see `FreezeSchedule` for the
    YAML format and the module docstring for how it stays correct with the optimizer, the scheduler and resume.

    Args:
        schedule (`FreezeSchedule`, `dict`, or a path to a YAML file): the schedule.

    Example:

    ```python
    >>> import tempfile, torch
    >>> from transformers import (
    ...     BertConfig, BertForSequenceClassification, PrinterCallback, Trainer, TrainingArguments
    ... )
    >>> from tl_plugin.callbacks import FreezeScheduleCallback
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    ... )
    >>> data = [{"input_ids": torch.randint(5, 99, (8,)), "labels": i % 2} for i in range(16)]
    >>> callback = FreezeScheduleCallback({"phases": [
    ...     {"train": ["head"], "until_step": 2},
    ...     {"train": ["head", "other", "blocks.1"], "until_step": 4},
    ...     {"train": ["all"]},
    ... ]})
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=6, per_device_train_batch_size=8, use_cpu=True,
    ...                          report_to=[], save_strategy="no", disable_tqdm=True)
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    >>> trainer.remove_callback(PrinterCallback)  # no log lines in this example
    >>> _ = trainer.train()
    >>> [(e["step"], e["tl/phase"]) for e in callback.events if "tl/phase" in e]
    [(0, 0.0), (2, 1.0), (4, 2.0)]
    >>> callback.trainable_groups(1)
    ['blocks.1', 'other', 'head']

    ```
    """

    def __init__(self, schedule: FreezeSchedule | Mapping[str, Any] | str | os.PathLike[str]) -> None:
        super().__init__()
        if isinstance(schedule, (str, os.PathLike)):
            schedule = FreezeSchedule.load(schedule)
        elif isinstance(schedule, Mapping):
            schedule = FreezeSchedule.from_dict(schedule)
        if not isinstance(schedule, FreezeSchedule):
            raise ValueError(
                f"`schedule` must be a FreezeSchedule, a mapping or a YAML file path, got {type(schedule).__name__}."
            )
        self.schedule = schedule

    @property
    def layer_group_overrides(self) -> dict[str, Any] | None:
        return _overrides(self.schedule.blocks, self.schedule.head)

    def phases_for(self, groups: LayerGroups) -> list[Phase]:
        return list(self.schedule.phases)

    def _constructor_args(self) -> dict[str, Any]:
        return {"schedule": self.schedule.to_dict()}


class GradualUnfreezingCallback(_PhasedCallback):
    """Gradual unfreezing (ULMFiT): train the head first, then unfreeze the next group(s) down every n epochs (or
    steps), until everything (or `max_groups` groups) is trained.

    The groups are unfrozen top-down, from the head: ``head``, ``other``, ``blocks.N-1``, ..., ``blocks.0``,
    ``embeddings`` (PEFT adapters are left as they are). The schedule is a rule (`every_n_epochs` /
    `every_n_steps`) or a list of boundaries (`epochs` / `steps`); give one of the four (default: every epoch).

    Args:
        every_n_epochs (`float`, *optional*): unfreeze the next groups every this many epochs (boundaries past the
            end of training are simply not reached).
        every_n_steps (`int`, *optional*): unfreeze the next groups every this many optimizer steps.
        epochs (`list[float]`, *optional*): explicit boundaries, in epochs from the start of training: the ``i``-th
            entry is when phase ``i + 1`` starts (e.g. ``[1, 2, 4]``). Each must be before the end of training.
        steps (`list[int]`, *optional*): explicit boundaries in optimizer steps.
        groups_per_phase (`int`, *optional*, defaults to 1): groups unfrozen at a time (and trained at the start).
        max_groups (`int`, *optional*): unfreeze at most this many groups in all (e.g. keep the embeddings frozen).
        blocks (`str` or `list[str]`, *optional*): block-stack override for layer discovery.
        head (`list[str]`, *optional*): head override for layer discovery.

    Example:

    ```python
    >>> import tempfile, torch
    >>> from transformers import (
    ...     BertConfig, BertForSequenceClassification, PrinterCallback, Trainer, TrainingArguments
    ... )
    >>> from tl_plugin.callbacks import GradualUnfreezingCallback
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    ... )
    >>> data = [{"input_ids": torch.randint(5, 99, (8,)), "labels": i % 2} for i in range(16)]
    >>> callback = GradualUnfreezingCallback(every_n_epochs=1)  # 2 steps per epoch here
    >>> args = TrainingArguments(tempfile.mkdtemp(), num_train_epochs=3, per_device_train_batch_size=8,
    ...                          use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    >>> trainer.remove_callback(PrinterCallback)  # no log lines in this example
    >>> _ = trainer.train()
    >>> [(e["step"], callback.trainable_groups(int(e["tl/phase"]))) for e in callback.events if "tl/phase" in e]
    [(0, ['head']), (2, ['other', 'head']), (4, ['blocks.1', 'other', 'head'])]
    >>> model.bert.encoder.layer[0].attention.self.query.weight.requires_grad  # not reached in 3 epochs
    False

    ```
    """

    def __init__(
        self,
        every_n_epochs: float | None = None,
        every_n_steps: int | None = None,
        *,
        epochs: Sequence[float] | None = None,
        steps: Sequence[int] | None = None,
        groups_per_phase: int = 1,
        max_groups: int | None = None,
        blocks: str | list[str] | None = None,
        head: list[str] | None = None,
    ) -> None:
        super().__init__()
        given = {
            k: v
            for k, v in {
                "every_n_epochs": every_n_epochs,
                "every_n_steps": every_n_steps,
                "epochs": epochs,
                "steps": steps,
            }.items()
            if v is not None
        }
        if len(given) > 1:
            raise ValueError(
                f"Give one of `every_n_epochs`, `every_n_steps` (a rule), `epochs`, `steps` (explicit boundaries), "
                f"got {given}."
            )
        if not given:
            every_n_epochs = 1
        if every_n_epochs is not None and (not _is_number(every_n_epochs) or every_n_epochs <= 0):
            raise ValueError(f"`every_n_epochs` must be a number > 0, got {every_n_epochs!r}.")
        if every_n_steps is not None and (not _is_int(every_n_steps) or every_n_steps < 1):
            raise ValueError(f"`every_n_steps` must be an integer >= 1, got {every_n_steps!r}.")
        for key, values, integral in (("epochs", epochs, False), ("steps", steps, True)):
            if values is None:
                continue
            values = list(values)
            valid = all(_is_number(b) and b > 0 and (not integral or _is_int(b)) for b in values)
            if not values or not valid or any(b >= c for b, c in zip(values, values[1:], strict=False)):
                kind = "integers" if integral else "numbers"
                raise ValueError(
                    f"`{key}` must be a non-empty, strictly increasing list of {kind} > 0 (counted from the start of "
                    f"training), got {values!r}."
                )
        if not _is_int(groups_per_phase) or groups_per_phase < 1:
            raise ValueError(f"`groups_per_phase` must be an integer >= 1, got {groups_per_phase!r}.")
        if max_groups is not None and (not _is_int(max_groups) or max_groups < 1):
            raise ValueError(f"`max_groups` must be an integer >= 1, got {max_groups!r}.")
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.epochs = list(epochs) if epochs is not None else None
        self.steps = list(steps) if steps is not None else None
        self.groups_per_phase = groups_per_phase
        self.max_groups = max_groups
        self.blocks = blocks
        self.head = head
        self._strict_length = epochs is not None or steps is not None

    @property
    def unit(self) -> str:
        """``"step"`` or ``"epoch"``: the unit of the boundaries."""
        return "step" if self.every_n_steps is not None or self.steps is not None else "epoch"

    @property
    def layer_group_overrides(self) -> dict[str, Any] | None:
        return _overrides(self.blocks, self.head)

    def _boundaries(self, count: int) -> list[float]:
        explicit = self.steps if self.steps is not None else self.epochs
        if explicit is not None:
            return [float(b) for b in explicit]
        every = self.every_n_steps if self.every_n_steps is not None else self.every_n_epochs
        assert every is not None
        return [float(every * j) for j in range(1, count)]

    def phases_for(self, groups: LayerGroups) -> list[Phase]:
        order = [g.name for g in reversed(groups.ordered())]
        if self.max_groups is not None:
            if self.max_groups > len(order):
                raise ValueError(
                    f"`max_groups`={self.max_groups} exceeds the number of layer groups of this model "
                    f"({len(order)}: {', '.join(reversed(order))}); valid: 1 to {len(order)}."
                )
            order = order[: self.max_groups]
        k = self.groups_per_phase
        chunks = [order[i : i + k] for i in range(0, len(order), k)]
        boundaries = self._boundaries(len(chunks))
        if len(boundaries) > len(chunks) - 1:
            key = "steps" if self.steps is not None else "epochs"
            raise ValueError(
                f"`{key}` has {len(boundaries)} boundaries, but after the first phase only {len(chunks) - 1} "
                f"unfreezing step(s) remain for this model's groups ({', '.join(order)}; {k} at a time): give at "
                f"most {len(chunks) - 1}."
            )
        key = "until_step" if self.unit == "step" else "until_epoch"
        phases = []
        for j in range(len(boundaries) + 1):
            train = [name for chunk in chunks[: j + 1] for name in chunk]
            until: dict[str, Any] = {}
            if j < len(boundaries):
                until[key] = int(boundaries[j]) if self.unit == "step" else boundaries[j]
            phases.append(Phase(train=train, name=f"unfreeze {', '.join(chunks[j])}", **until))
        return phases

    def _until_label(self, i: int, key: str) -> str:
        return f"{'steps' if self.steps is not None else 'epochs'}[{i}]"

    def _train_label(self, i: int) -> str:
        return f"phase {i} groups"

    def _constructor_args(self) -> dict[str, Any]:
        return {
            "every_n_epochs": self.every_n_epochs,
            "every_n_steps": self.every_n_steps,
            "epochs": self.epochs,
            "steps": self.steps,
            "groups_per_phase": self.groups_per_phase,
            "max_groups": self.max_groups,
            "blocks": self.blocks,
            "head": self.head,
        }


class LinearProbeThenFineTuneCallback(_PhasedCallback):
    """Linear probe, then fine-tune (LP-FT): train only the head for the first `probe_steps` / `probe_epochs` (or
    until an evaluation metric plateaus), then train what `then` says, optionally with an LR warm restart.

    Args:
        probe_steps (`int`, *optional*): length of the probe, in optimizer steps.
        probe_epochs (`float`, *optional*): length of the probe, in epochs (exclusive with `probe_steps`).
        plateau (`Plateau` or `dict`, *optional*): end the probe when this metric stops improving (at the latest
            after `probe_steps` / `probe_epochs` when given). One of the three is required.
        then (`TransferConfig`, `dict` or `list[str]`, *optional*): what to train after the probe: a transfer config
            (its trainable groups; a ``partial`` config re-initialises its blocks before training starts), or
            selectors; default: everything.
        probe (`list[str]`, *optional*, defaults to ``["head"]``): what the probe trains.
        probe_lr (`float`, *optional*): the base lr during the probe (default: ``learning_rate``).
        warm_restart (`bool`, *optional*, defaults to `False`): restart the LR schedule (warmup and decay over the
            remaining steps) at the switch.
        restart_warmup_steps (`int`, *optional*): warmup of the restarted schedule (default: the args' warmup).
        blocks (`str` or `list[str]`, *optional*): block-stack override for layer discovery.
        head (`list[str]`, *optional*): head override for layer discovery.

    Example:

    ```python
    >>> import tempfile, torch
    >>> from transformers import (
    ...     BertConfig, BertForSequenceClassification, PrinterCallback, Trainer, TrainingArguments
    ... )
    >>> from tl_plugin.callbacks import LinearProbeThenFineTuneCallback
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    ... )
    >>> data = [{"input_ids": torch.randint(5, 99, (8,)), "labels": i % 2} for i in range(16)]
    >>> callback = LinearProbeThenFineTuneCallback(probe_steps=3, warm_restart=True, restart_warmup_steps=2)
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=8, learning_rate=1e-3, per_device_train_batch_size=8,
    ...                          logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    >>> trainer.remove_callback(PrinterCallback)  # no log lines in this example
    >>> _ = trainer.train()
    >>> callback.trainable_groups(0), callback.trainable_groups(1)
    (['head'], ['embeddings', 'blocks.0', 'blocks.1', 'other', 'head'])
    >>> # linear decay over 8 steps; at step 3 a restart: 2 warmup steps, then linear decay over the 5 left
    >>> [round(e["learning_rate"] * 1e4, 2) for e in trainer.state.log_history if "learning_rate" in e]
    [10.0, 8.75, 7.5, 0.0, 5.0, 10.0, 6.67, 3.33]

    ```
    """

    def __init__(
        self,
        probe_steps: int | None = None,
        probe_epochs: float | None = None,
        plateau: Plateau | Mapping[str, Any] | None = None,
        then: TransferConfig | Mapping[str, Any] | Sequence[str] | None = None,
        probe: Sequence[str] = ("head",),
        probe_lr: float | None = None,
        warm_restart: bool = False,
        restart_warmup_steps: int | None = None,
        blocks: str | list[str] | None = None,
        head: list[str] | None = None,
    ) -> None:
        super().__init__()
        if probe_steps is None and probe_epochs is None and plateau is None:
            raise ValueError(
                "LinearProbeThenFineTuneCallback needs the length of the probe: `probe_steps`, `probe_epochs` or "
                "`plateau` (e.g. {'metric': 'eval_loss', 'patience': 2})."
            )
        if isinstance(then, Mapping):
            then = TransferConfig.from_dict(dict(then))
        elif then is not None and not isinstance(then, TransferConfig):
            if isinstance(then, str) or not all(isinstance(s, str) for s in then):
                raise ValueError(
                    f"`then` must be a TransferConfig, a mapping or a list of selectors, got {then!r}."
                )
            then = list(then)
        self.then: TransferConfig | list[str] | None = then
        probe_phase = Phase(
            train=list(probe),
            until_step=probe_steps,
            until_epoch=probe_epochs,
            until_plateau=Plateau.from_dict(plateau) if isinstance(plateau, Mapping) else plateau,
            lr=probe_lr,
            name="linear probe",
        )
        self._probe_phase = probe_phase
        self._finetune_phase = Phase(
            train=[ALL_GROUPS],  # replaced by `then` in `phases_for`
            warm_restart=warm_restart,
            restart_warmup_steps=restart_warmup_steps,
            name="fine-tune",
        )
        self.blocks = blocks
        self.head = head

    @property
    def layer_group_overrides(self) -> dict[str, Any] | None:
        if isinstance(self.then, TransferConfig) and (
            self.then.blocks is not None or self.then.head is not None
        ):
            return _overrides(self.then.blocks, self.then.head)
        return _overrides(self.blocks, self.head)

    @property
    def lr_decay(self) -> float | None:
        """The ``lr_decay`` of a `then` transfer config (used by `TransferTrainer`)."""
        return self.then.lr_decay if isinstance(self.then, TransferConfig) else None

    def phases_for(self, groups: LayerGroups) -> list[Phase]:
        if isinstance(self.then, TransferConfig):
            then = plan_trainable(self.then, groups)
        else:
            then = self.then if self.then is not None else [ALL_GROUPS]
        if not then:
            raise ValueError(
                f"`then`={self.then!r} trains nothing on this model (groups: {groups.summary()})."
            )
        finetune = Phase(
            train=list(then),
            warm_restart=self._finetune_phase.warm_restart,
            restart_warmup_steps=self._finetune_phase.restart_warmup_steps,
            name="fine-tune",
        )
        return [self._probe_phase, finetune]

    def _reinit_groups(self, groups: LayerGroups) -> list[LayerGroup]:
        return groups_to_reinitialize(self.then, groups) if isinstance(self.then, TransferConfig) else []

    def _reinit_seed(self) -> int | None:
        return self.then.reinit_seed if isinstance(self.then, TransferConfig) else None

    def _train_label(self, i: int) -> str:
        return "probe" if i == 0 else "then"

    def _until_label(self, i: int, key: str) -> str:
        return {"until_step": "probe_steps", "until_epoch": "probe_epochs"}.get(key, key)

    def _constructor_args(self) -> dict[str, Any]:
        probe = self._probe_phase
        then: Any = self.then.to_dict() if isinstance(self.then, TransferConfig) else self.then
        return {
            "probe_steps": probe.until_step,
            "probe_epochs": probe.until_epoch,
            "plateau": probe.until_plateau.to_dict() if probe.until_plateau is not None else None,
            "then": then,
            "probe": list(probe.train),
            "probe_lr": probe.lr,
            "warm_restart": self._finetune_phase.warm_restart,
            "restart_warmup_steps": self._finetune_phase.restart_warmup_steps,
            "blocks": self.blocks,
            "head": self.head,
        }

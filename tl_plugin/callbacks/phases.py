"""The phase engine: `PhasedCallback` runs the phases a schedule builder (`tl_plugin.schedule.builders`) gives it.

Gradual unfreezing (ULMFiT), linear probe then fine-tune (LP-FT), multi-phase YAML schedules and a static transfer
are one thing: *which layer groups are trainable in phase k, and when phase k ends* (at a global step, at an epoch,
or when an evaluation metric stops improving). Each is a builder of phases; this one engine runs any of them (the
front-end callbacks of `tl_plugin.callbacks.schedules` and `tl_plugin.callbacks.transfer` only build the builder):

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..checks import check_choice
from ..discovery import LayerGroups, discover_layer_groups
from ..freezing import GroupReportRow, TrainableReport, select_parameters
from ..optim import canonical_parameter_name, named_parameters_by_canonical_name, unwrap_model
from ..schedule import ALL_GROUPS, FreezeSchedule, Phase, ScheduleBuilder
from ..schedule.builders import EPOCH_EPS as _EPOCH_EPS
from ..transfer import reinitialize
from .base import (
    CONFLICT_KEY_ATTRIBUTE,
    TLCallback,
    check_no_conflicts_in_state,
    checkpoint_folder,
    event_logger,
    optimizer_parameter_ids,
    require_find_unused_parameters,
    unwrap_scheduler,
)
from .best_of_phase import BEST_OF_PHASE_FILE, BestOfPhase
from .lr import ensure_layerwise_optimizer, install_layerwise_optimizer
from .warm_restarts import fresh_lr_lambda, stitched_lr_lambda

logger = logging.getLogger("tl_plugin")

__all__ = ["BEST_OF_PHASE_FILE", "SCHEDULE_STATE_FILE", "PhasedCallback"]

#: The file, in each checkpoint folder, holding the schedule state (phase, trainable parameter names).
SCHEDULE_STATE_FILE = "tl_plugin_schedule.json"
_STATE_VERSION = 1


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


class PhasedCallback(TLCallback, ExportableState):
    """The phase engine shared by the freeze-schedule callbacks (see the module docstring).

    Args:
        builder (`tl_plugin.schedule.ScheduleBuilder`): what produces the phases for the model's groups.
        restore_best (`str`, *optional*): when a phase ends, reload the weights of that phase's best evaluation by
            this metric (the ``eval_`` prefix is added when missing) before the next phase starts. Needs an
            evaluation in every phase that ends. The weights of the parameters trained in the phase and the
            model's buffers are kept in CPU memory and in each checkpoint (``tl_best_of_phase.safetensors``);
            the optimizer and LR schedule carry on.
        restore_best_mode (`str`, *optional*, defaults to ``"min"``): ``"min"`` (lower is better) or ``"max"``.
    """

    conflict_key = "trainability"

    def __init__(
        self, builder: ScheduleBuilder, *, restore_best: str | None = None, restore_best_mode: str = "min"
    ) -> None:
        super().__init__()
        if not isinstance(builder, ScheduleBuilder):
            raise ValueError(
                f"`builder` must be a tl_plugin.schedule.ScheduleBuilder, got {type(builder).__name__}."
            )
        self.restore_best = restore_best
        self.restore_best_mode = check_choice("restore_best_mode", restore_best_mode, ("min", "max"))
        # restore_best: the best evaluation of the current phase so far (its phase, value, step, and weights)
        self._best_of_phase = (
            None if restore_best is None else BestOfPhase(type(self).__name__, restore_best, restore_best_mode)
        )
        self._model_ref: weakref.ReferenceType[nn.Module] | None = None
        self.builder = builder
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

    @property
    def layer_group_overrides(self) -> dict[str, Any] | None:
        """``blocks`` / ``head`` overrides for layer discovery, or `None` (the builder's)."""
        return self.builder.layer_group_overrides

    @property
    def lr_decay(self) -> float | None:
        """Layer-wise LR decay this schedule needs (from a transfer config), or `None` (used by
        `TransferTrainer`)."""
        return self.builder.lr_decay

    def export_schedule(
        self,
        model: nn.Module,
        path: str | os.PathLike[str] | None = None,
        *,
        num_train_epochs: float | None = None,
        max_steps: int | None = None,
    ) -> FreezeSchedule:
        """The phases this callback runs on `model`, as the `FreezeSchedule` that `FreezeScheduleCallback` reads
        (written as YAML to `path` when given); see `tl_plugin.schedule.ScheduleBuilder.export`."""
        return self.builder.export(model, path, num_train_epochs=num_train_epochs, max_steps=max_steps)

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
        phases = self.builder.phases_for(groups)
        all_groups = [g.name for g in groups.ordered()]
        trainable = []
        for i, phase in enumerate(phases):
            selectors = [s for sel in phase.train for s in (all_groups if sel == ALL_GROUPS else [sel])]
            try:
                names = select_parameters(base, selectors, groups)
            except ValueError as err:
                raise ValueError(
                    f"{type(self).__name__}: `{self.builder.train_label(i)}`={phase.train!r} does not fit this model: {err}"
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
        to_reinit = self.builder.reinit_groups(self._compiled.groups)
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
        seed = self.builder.reinit_seed
        if seed is None and stage == "train_begin":
            seed = args.seed  # the same on every process
        changed = reinitialize(model, to_reinit, seed=seed)
        self._reinitialized_ref = weakref.ref(model)
        event_logger.info("Re-initialised %d parameters in %s", len(changed), [g.name for g in to_reinit])

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
        if not self.builder.strict_length:
            return
        for i, phase in enumerate(phases[:-1]):
            if phase.until_step is not None and phase.until_step >= max_steps:
                raise ValueError(
                    f"{who}: `{self.builder.until_label(i, 'until_step')}`={phase.until_step} is not before the end of "
                    f"training (max_steps={max_steps}), so phase {i + 1} would never start; valid: 1 to "
                    f"{max_steps - 1}."
                )
            if (
                phase.until_epoch is not None
                and total_epochs is not None
                and phase.until_epoch >= total_epochs - _EPOCH_EPS
            ):
                raise ValueError(
                    f"{who}: `{self.builder.until_label(i, 'until_epoch')}`={phase.until_epoch:g} is not before the end of "
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
            f"the optimizer is built), or use `tl_plugin.trainer.TransferTrainer` / `Trainer(optimizer_cls_and_kwargs="
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
            "best_of_phase": self._best_of_phase.payload() if self._best_of_phase is not None else None,
        }

    def state(self) -> dict[str, Any]:
        """`ExportableState`: constructor arguments and the schedule state, saved in ``trainer_state.json``."""
        args = self.builder.to_args()
        if self.restore_best is not None:
            args.update(restore_best=self.restore_best, restore_best_mode=self.restore_best_mode)
        return {
            "args": args,
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
        best_of_phase = payload.get("best_of_phase")
        if self._best_of_phase is not None and isinstance(best_of_phase, dict):
            self._best_of_phase.load(best_of_phase, checkpoint_folder(args, state))

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
        ended = self._saved_phase if resumed else self._phase
        if self._best_of_phase is not None and 0 <= ended < k:
            self._restore_best_of_phase(ended, k, state)
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

    # ------------------------------------------------------------------ best of phase (restore_best)
    def _model(self) -> nn.Module:
        model = self._model_ref() if self._model_ref is not None else None
        if model is None:
            raise RuntimeError(f"{type(self).__name__}: the model of the run is gone.")
        return model

    def _restore_best_of_phase(self, ended: int, k: int, state: TrainerState) -> None:
        assert self._best_of_phase is not None
        step, value = self._best_of_phase.restore(self._model(), ended, state.global_step)
        self.log_event(
            state,
            f"{type(self).__name__}: restored the best weights of phase {ended} "
            f"({self._best_of_phase.key}={value:.6g} at step {step}) before phase {k}",
            {"tl/restored_best_step": float(step or 0), "tl/restored_best_value": float(value or 0.0)},
        )

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
        inner.lr_lambdas = [stitched_lr_lambda(fn, restarts) for fn in originals]
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
            self._restart_fns[start] = fresh_lr_lambda(args, remaining, warmup)
        return self._restart_fns[start]

    # ------------------------------------------------------------------ Trainer events
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
        if self._best_of_phase is not None:
            self._best_of_phase.check_evaluates(args)
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
        self._model_ref = weakref.ref(unwrap_model(model))
        if self._best_of_phase is not None:
            self._best_of_phase.check_evaluates(args)
            self._best_of_phase.clear()
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
        if self._best_of_phase is not None:
            self._best_of_phase.track(self._model(), self._phase, state.global_step, kwargs.get("metrics") or {})
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
        if self._best_of_phase is not None:
            self._best_of_phase.save(folder)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._active = False

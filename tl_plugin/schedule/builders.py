"""Schedule builders: objects that produce the phases of a freeze schedule for a model's layer groups.

The phase engine (`tl_plugin.callbacks.phases.PhasedCallback`) runs whatever a builder gives it; the variants are
builders, not engine subclasses:

- `FixedSchedule`: an explicit `FreezeSchedule` (the YAML file of `FreezeScheduleCallback`);
- `TransferPlan`: one phase from a `TransferConfig` (`TransferCallback`), with its re-initialisation;
- `GradualUnfreezing`: ULMFiT's top-down unfreezing, one (or k) more groups every n epochs / steps;
- `LinearProbeThenFineTune`: the head first, then what a transfer config (or selectors) says.

Every builder can write the phases it would run on a model as a `FreezeSchedule` (:meth:`ScheduleBuilder.export`),
which `FreezeScheduleCallback` runs identically; a user starts from the generated YAML and edits it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..checks import check_int, check_number
from ..config import TransferConfig
from ..discovery import LayerGroup, LayerGroups, discover_layer_groups
from ..transfer import groups_to_reinitialize, plan_trainable
from .format import ALL_GROUPS, FreezeSchedule, Phase, Plateau

__all__ = [
    "FixedSchedule",
    "GradualUnfreezing",
    "LinearProbeThenFineTune",
    "ScheduleBuilder",
    "TransferPlan",
]

#: Epoch boundaries closer than this to the end of training count as at the end.
EPOCH_EPS = 1e-9


def _overrides(blocks: str | list[str] | None, head: list[str] | None) -> dict[str, Any] | None:
    if blocks is None and head is None:
        return None
    return {"blocks": blocks, "head": head}


class ScheduleBuilder:
    """What the phase engine needs from a schedule: the phases on a model's groups, plus what goes with them.

    A builder is data: its constructor checks its arguments, :meth:`to_args` returns them (the engine saves them in
    ``trainer_state.json``), and :meth:`phases_for` resolves them against a model's `LayerGroups`.
    """

    #: Whether a boundary at or beyond the end of training is an error (rules may run past the end).
    strict_length: bool = True
    #: The ``blocks`` / ``head`` overrides for layer discovery, or `None`.
    layer_group_overrides: dict[str, Any] | None = None
    #: Layer-wise LR decay the schedule needs (from a transfer config), or `None`.
    lr_decay: float | None = None
    #: Seed of the re-initialisation (`None`: the Trainer's seed).
    reinit_seed: int | None = None

    def phases_for(self, groups: LayerGroups) -> list[Phase]:
        """The phases on a model with `groups`."""
        raise NotImplementedError

    def reinit_groups(self, groups: LayerGroups) -> list[LayerGroup]:
        """The groups re-initialised before training (none by default)."""
        return []

    def to_args(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable), as the front-end callback takes them."""
        raise NotImplementedError

    def train_label(self, i: int) -> str:
        """How error messages name the ``train`` selectors of phase `i`."""
        return f"phases[{i}].train"

    def until_label(self, i: int, key: str) -> str:
        """How error messages name the ``until_*`` boundary `key` of phase `i`."""
        return f"phases[{i}].{key}"

    # ------------------------------------------------------------------ export
    def export(
        self,
        model: Any,
        path: str | os.PathLike[str] | None = None,
        *,
        num_train_epochs: float | None = None,
        max_steps: int | None = None,
    ) -> FreezeSchedule:
        """The phases this builder runs on `model`, as the `FreezeSchedule` that `FreezeScheduleCallback` reads
        (written as YAML to `path` when given).

        Args:
            model (`torch.nn.Module`): the model; its groups are discovered with the builder's overrides (a model
                whose groups cannot be found raises `tl_plugin.LayerDiscoveryError`).
            path (`str` or `os.PathLike`, *optional*): where to write the YAML.
            num_train_epochs (`float`, *optional*) / max_steps (`int`, *optional*): the length of the run, in the
                unit of the schedule's boundaries: phases that would start at or after the end are left out (a rule
                such as ``every_n_epochs`` has a boundary for every group, which an explicit schedule may not have
                past the end of training).

        Raises:
            `ValueError`: when the schedule needs what a freeze schedule cannot express (a re-initialisation, a
                layer-wise LR decay: add a `LayerwiseLRDecayCallback` beside it), or for a bad length.
        """
        groups = discover_layer_groups(model, **(self.layer_group_overrides or {}))
        who = type(self).__name__
        if self.reinit_groups(groups):
            raise ValueError(
                f"{who} re-initialises {[g.name for g in self.reinit_groups(groups)]} before training, which a freeze "
                f"schedule cannot express: call `tl_plugin.reinitialize` yourself before training, and export a "
                f"builder without it."
            )
        if self.lr_decay is not None:
            raise ValueError(
                f"{who} trains with layer-wise LR decay {self.lr_decay:g}, which a freeze schedule does not hold: "
                f"export without `lr_decay` and add `LayerwiseLRDecayCallback({self.lr_decay:g})` beside the "
                f"FreezeScheduleCallback."
            )
        phases = _truncated(self.phases_for(groups), num_train_epochs, max_steps)
        overrides = self.layer_group_overrides or {}
        schedule = FreezeSchedule(phases=phases, blocks=overrides.get("blocks"), head=overrides.get("head"))
        if path is not None:
            schedule.save(Path(path))
        return schedule


def _is_bound(value: Any, integral: bool) -> bool:
    """Whether `value` is a phase boundary: a finite number > 0 (not a bool), an integer when `integral`."""
    number = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
    return number and (not integral or isinstance(value, int))


def _truncated(phases: list[Phase], num_train_epochs: float | None, max_steps: int | None) -> list[Phase]:
    """`phases` without those that start at or after the end of a run of the given length."""
    if num_train_epochs is not None:
        check_number("num_train_epochs", num_train_epochs, low=0, include_low=False)
    if max_steps is not None:
        check_int("max_steps", max_steps, minimum=1)
    if num_train_epochs is not None and max_steps is not None:
        raise ValueError("Give the run's length as `num_train_epochs` or `max_steps`, not both.")
    kept: list[Phase] = []
    for phase in phases:
        kept.append(phase)
        ends_at_end = (
            max_steps is not None and phase.until_step is not None and phase.until_step >= max_steps
        ) or (
            num_train_epochs is not None
            and phase.until_epoch is not None
            and phase.until_epoch >= num_train_epochs - EPOCH_EPS
        )
        if ends_at_end and phase.until_plateau is None:
            break
    last = kept[-1]
    if last.has_end:
        kept[-1] = Phase(
            train=list(last.train),
            lr=last.lr,
            warm_restart=last.warm_restart,
            restart_warmup_steps=last.restart_warmup_steps,
            name=last.name,
        )
    return [Phase.from_dict(p.to_dict()) for p in kept]


class FixedSchedule(ScheduleBuilder):
    """An explicit `FreezeSchedule`: the same phases on every model (their selectors are checked against it)."""

    def __init__(self, schedule: FreezeSchedule | Mapping[str, Any] | str | os.PathLike[str]) -> None:
        if isinstance(schedule, (str, os.PathLike)):
            schedule = FreezeSchedule.load(schedule)
        elif isinstance(schedule, Mapping):
            schedule = FreezeSchedule.from_dict(schedule)
        if not isinstance(schedule, FreezeSchedule):
            raise ValueError(
                f"`schedule` must be a FreezeSchedule, a mapping or a YAML file path, got {type(schedule).__name__}."
            )
        self.schedule = schedule
        self.layer_group_overrides = _overrides(schedule.blocks, schedule.head)

    def phases_for(self, groups: LayerGroups) -> list[Phase]:
        return list(self.schedule.phases)

    def to_args(self) -> dict[str, Any]:
        return {"schedule": self.schedule.to_dict()}


class TransferPlan(ScheduleBuilder):
    """One phase: what a `TransferConfig` trains, after its re-initialisation."""

    def __init__(self, config: TransferConfig | Mapping[str, Any]) -> None:
        if isinstance(config, Mapping):
            config = TransferConfig.from_dict(dict(config))
        if not isinstance(config, TransferConfig):
            raise ValueError(f"`config` must be a TransferConfig or a mapping, got {type(config).__name__}.")
        self.config = config
        self.lr_decay = config.lr_decay
        self.reinit_seed = config.reinit_seed
        self.layer_group_overrides = _overrides(config.blocks, config.head)

    def phases_for(self, groups: LayerGroups) -> list[Phase]:
        trainable = plan_trainable(self.config, groups)
        if not trainable:
            raise ValueError(
                f"Transfer config {self.config.to_dict()} trains nothing on this model (groups: {groups.summary()})."
            )
        return [Phase(train=trainable, name=f"transfer ({self.config.strategy})")]

    def reinit_groups(self, groups: LayerGroups) -> list[LayerGroup]:
        return groups_to_reinitialize(self.config, groups)

    def train_label(self, i: int) -> str:
        return "config.train_groups" if self.config.train_groups else "config"

    def to_args(self) -> dict[str, Any]:
        return {"config": self.config.to_dict()}


class GradualUnfreezing(ScheduleBuilder):
    """Gradual unfreezing (ULMFiT): the head first, then the next group(s) down every n epochs (or steps).

    The arguments are those of `tl_plugin.callbacks.GradualUnfreezingCallback` (see there).
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
        if every_n_epochs is not None:
            check_number("every_n_epochs", every_n_epochs, low=0, include_low=False)
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, minimum=1)
        for key, values, integral in (("epochs", epochs, False), ("steps", steps, True)):
            if values is None:
                continue
            values = list(values)
            valid = all(_is_bound(b, integral) for b in values)
            if not values or not valid or any(b >= c for b, c in zip(values, values[1:], strict=False)):
                kind = "integers" if integral else "numbers"
                raise ValueError(
                    f"`{key}` must be a non-empty, strictly increasing list of {kind} > 0 (counted from the start of "
                    f"training), got {values!r}."
                )
        check_int("groups_per_phase", groups_per_phase, minimum=1)
        if max_groups is not None:
            check_int("max_groups", max_groups, minimum=1)
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.epochs = list(epochs) if epochs is not None else None
        self.steps = list(steps) if steps is not None else None
        self.groups_per_phase = groups_per_phase
        self.max_groups = max_groups
        self.blocks = blocks
        self.head = head
        self.layer_group_overrides = _overrides(blocks, head)
        self.strict_length = epochs is not None or steps is not None

    @property
    def unit(self) -> str:
        """``"step"`` or ``"epoch"``: the unit of the boundaries."""
        return "step" if self.every_n_steps is not None or self.steps is not None else "epoch"

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

    def until_label(self, i: int, key: str) -> str:
        return f"{'steps' if self.steps is not None else 'epochs'}[{i}]"

    def train_label(self, i: int) -> str:
        return f"phase {i} groups"

    def to_args(self) -> dict[str, Any]:
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


class LinearProbeThenFineTune(ScheduleBuilder):
    """Linear probe, then fine-tune (LP-FT): the probe groups first, then what `then` says.

    The arguments are those of `tl_plugin.callbacks.LinearProbeThenFineTuneCallback` (see there).
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
        self.probe_phase = Phase(
            train=list(probe),
            until_step=probe_steps,
            until_epoch=probe_epochs,
            until_plateau=Plateau.from_dict(plateau) if isinstance(plateau, Mapping) else plateau,
            lr=probe_lr,
            name="linear probe",
        )
        self.finetune_phase = Phase(
            train=[ALL_GROUPS],  # replaced by `then` in `phases_for`
            warm_restart=warm_restart,
            restart_warmup_steps=restart_warmup_steps,
            name="fine-tune",
        )
        self.blocks = blocks
        self.head = head
        if isinstance(then, TransferConfig) and (then.blocks is not None or then.head is not None):
            self.layer_group_overrides = _overrides(then.blocks, then.head)
        else:
            self.layer_group_overrides = _overrides(blocks, head)
        self.lr_decay = then.lr_decay if isinstance(then, TransferConfig) else None
        self.reinit_seed = then.reinit_seed if isinstance(then, TransferConfig) else None

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
            warm_restart=self.finetune_phase.warm_restart,
            restart_warmup_steps=self.finetune_phase.restart_warmup_steps,
            name="fine-tune",
        )
        return [self.probe_phase, finetune]

    def reinit_groups(self, groups: LayerGroups) -> list[LayerGroup]:
        return groups_to_reinitialize(self.then, groups) if isinstance(self.then, TransferConfig) else []

    def train_label(self, i: int) -> str:
        return "probe" if i == 0 else "then"

    def until_label(self, i: int, key: str) -> str:
        return {"until_step": "probe_steps", "until_epoch": "probe_epochs"}.get(key, key)

    def to_args(self) -> dict[str, Any]:
        probe = self.probe_phase
        then: Any = self.then.to_dict() if isinstance(self.then, TransferConfig) else self.then
        return {
            "probe_steps": probe.until_step,
            "probe_epochs": probe.until_epoch,
            "plateau": probe.until_plateau.to_dict() if probe.until_plateau is not None else None,
            "then": then,
            "probe": list(probe.train),
            "probe_lr": probe.lr,
            "warm_restart": self.finetune_phase.warm_restart,
            "restart_warmup_steps": self.finetune_phase.restart_warmup_steps,
            "blocks": self.blocks,
            "head": self.head,
        }

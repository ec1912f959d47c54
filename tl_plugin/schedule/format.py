"""The freeze-schedule file format: `Phase`, `Plateau`, `FreezeSchedule` and their YAML / JSON I/O.

A schedule says *which layer groups are trainable in phase k, and when phase k ends* (at a global step, at an
epoch, or when an evaluation metric stops improving), optionally with a per-phase lr or an LR warm restart. It is
plain data, checked in `__post_init__` and round-tripped through dicts and YAML (`yaml.safe_load`); nothing here
touches a model or a Trainer. `tl_plugin.schedule.builders` produces schedules for a model's groups, and
`tl_plugin.callbacks.phases` runs them in a `Trainer`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ..checks import check_bool, check_int, check_number

__all__ = ["ALL_GROUPS", "FreezeSchedule", "Phase", "Plateau"]

#: Selector standing for every layer group (not the PEFT adapters).
ALL_GROUPS = "all"


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
        check_int("patience", self.patience, minimum=1)
        check_number("min_delta", self.min_delta, low=0)

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
        if self.until_step is not None:
            check_int("until_step", self.until_step, minimum=1)
        if self.until_epoch is not None:
            check_number("until_epoch", self.until_epoch, low=0, include_low=False)
        if self.until_step is not None and self.until_epoch is not None:
            raise ValueError(
                f"A phase ends at `until_step` or at `until_epoch`, not both (got until_step={self.until_step}, "
                f"until_epoch={self.until_epoch})."
            )
        if isinstance(self.until_plateau, Mapping):
            self.until_plateau = Plateau.from_dict(self.until_plateau)
        if self.until_plateau is not None and not isinstance(self.until_plateau, Plateau):
            raise ValueError(f"`until_plateau` must be a Plateau or a mapping, got {self.until_plateau!r}.")
        if self.lr is not None:
            check_number("lr", self.lr, low=0, include_low=False)
        check_bool("warm_restart", self.warm_restart)
        if self.restart_warmup_steps is not None:
            check_int("restart_warmup_steps", self.restart_warmup_steps, minimum=0)
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
    >>> from tl_plugin.schedule import FreezeSchedule
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
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))
        return path

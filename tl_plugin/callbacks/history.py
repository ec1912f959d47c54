"""`TrainingHistoryCallback`: record which layer groups were trainable and each param group's lr, step by step."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerControl, TrainerState, TrainingArguments

from ..checks import check_int
from ..discovery import LayerGroups, discover_layer_groups
from .base import TLCallback

HISTORY_FILE = "tl_plugin_history.json"


@dataclass
class TrainingHistory:
    """What a `TrainingHistoryCallback` recorded: one entry per recorded step (names and numbers only)."""

    groups: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    trainable_fraction: list[dict[str, float]] = field(default_factory=list)
    lrs: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": self.groups,
            "steps": self.steps,
            "trainable_fraction": self.trainable_fraction,
            "lrs": self.lrs,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingHistory:
        return cls(
            groups=list(data["groups"]),
            steps=[int(s) for s in data["steps"]],
            trainable_fraction=[dict(d) for d in data["trainable_fraction"]],
            lrs=[dict(d) for d in data["lrs"]],
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrainingHistory:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _param_group_label(group: dict[str, Any], index: int) -> str:
    # The decay and no-decay param groups of one layer group share their lr: one label per layer group.
    name = group.get("group_name")
    return str(name) if name is not None else f"param_group_{index}"


class TrainingHistoryCallback(TLCallback):
    """Record, every `every_n_steps` optimizer steps, the trainable fraction of each layer group and the lr of each
    optimizer param group. The history is written (atomically) to ``<output_dir>/tl_plugin_history.json`` at each
    checkpoint and at the end of training, on the main process, so a crash loses at most the steps since the last
    save. `tl_plugin.plotting` draws it.

    Args:
        every_n_steps (`int`, *optional*, defaults to 1): recording interval in optimizer steps.
        groups (`LayerGroups`, *optional*): the model's layer groups; discovered at train begin when absent.

    Example:

    ```python
    >>> from tl_plugin.callbacks.history import TrainingHistoryCallback
    >>> callback = TrainingHistoryCallback(every_n_steps=5)
    >>> callback.history.steps
    []

    ```
    """

    #: It writes a file and logs nothing: an unattached one may run with any `report_to`.
    reports_metrics = False

    def __init__(self, every_n_steps: int = 1, groups: LayerGroups | None = None) -> None:
        super().__init__()
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self._groups = groups
        self.history = TrainingHistory()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        if self._groups is None:
            self._groups = discover_layer_groups(model)
        self.history.groups = [g.name for g in self._groups]
        self._record(state.global_step, model, kwargs.get("optimizer"))

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step % self.every_n_steps == 0:
            self._record(state.global_step, kwargs["model"], kwargs.get("optimizer"))

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._write(args, state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._write(args, state)

    def _write(self, args: TrainingArguments, state: TrainerState) -> None:
        if state.is_world_process_zero and args.output_dir:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.history.save(out / HISTORY_FILE)

    def _record(self, step: int, model: Any, optimizer: Any) -> None:
        if self.history.steps and self.history.steps[-1] == step:
            return
        if self._groups is None:
            return
        params = dict(model.named_parameters())
        fractions = {}
        for group in self._groups:
            sizes = [(params[n].numel(), params[n].requires_grad) for n in group.param_names if n in params]
            total = sum(s for s, _ in sizes)
            fractions[group.name] = sum(s for s, t in sizes if t) / total if total else 0.0
        lrs: dict[str, float] = {}
        if optimizer is not None:
            for index, param_group in enumerate(optimizer.param_groups):
                lrs.setdefault(_param_group_label(param_group, index), float(param_group["lr"]))
        self.history.steps.append(step)
        self.history.trainable_fraction.append(fractions)
        self.history.lrs.append(lrs)

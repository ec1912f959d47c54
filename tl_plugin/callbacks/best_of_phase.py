"""``restore_best`` of the phased callbacks: keep the weights of a phase's best evaluation, restore them when the
phase ends, and carry them through checkpoints.

`BestOfPhase` is the state the phase engine (`tl_plugin.callbacks.phases.PhasedCallback`) holds when it is made
with ``restore_best=<metric>``: the phase, value and step of the best evaluation of the current phase so far, and
CPU copies of what that phase can change (the parameters trained in it and every buffer). It knows nothing of
phases beyond their numbers; the engine says when to track and when to restore.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainingArguments

from ..checks import check_choice

__all__ = ["BEST_OF_PHASE_FILE", "BestOfPhase"]

#: The file, in each checkpoint folder, holding the best weights so far of the current phase (``restore_best``).
BEST_OF_PHASE_FILE = "tl_best_of_phase.safetensors"


class BestOfPhase:
    """The best evaluation of the current phase by `metric` (``"min"`` or ``"max"`` is better, `mode`) and its
    weights; `owner` names the callback in error messages."""

    def __init__(self, owner: str, metric: Any, mode: str = "min") -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError(
                f"`restore_best` must be the name of an evaluation metric such as 'eval_loss', or None, got {metric!r}."
            )
        self.owner = owner
        self.metric = metric
        self.mode = check_choice("restore_best_mode", mode, ("min", "max"))
        self.key = metric if metric.startswith("eval_") else f"eval_{metric}"
        self.clear()

    def clear(self) -> None:
        self.weights: dict[str, torch.Tensor] | None = None
        self.phase = -1
        self.value: float | None = None
        self.step: int | None = None

    def check_evaluates(self, args: TrainingArguments) -> None:
        """Refuse a run that never evaluates (there would be nothing to restore)."""
        if str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
            raise ValueError(
                f"{self.owner}(restore_best={self.metric!r}) restores each phase's best evaluation, but the run does "
                f"not evaluate (`TrainingArguments.eval_strategy`='no'): set eval_strategy='steps' (with eval_steps "
                f"no longer than the shortest phase) or 'epoch', and an eval_dataset."
            )

    @staticmethod
    def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
        """CPU copies of the parameters trained now and of every buffer (what a phase can change)."""
        out = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        out.update({n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers()})
        return out

    def track(self, model: nn.Module, phase: int, step: int, metrics: Mapping[str, Any]) -> None:
        """After an evaluation in `phase`: keep the weights when `metrics` is the phase's best so far."""
        if self.key not in metrics:
            raise ValueError(
                f"{self.owner}: restore_best={self.metric!r} names a metric the evaluation does not produce; its "
                f"metrics are: {', '.join(sorted(metrics))}."
            )
        value = float(metrics[self.key])
        best = self.value if self.phase == phase else None
        if best is None or (value < best if self.mode == "min" else value > best):
            self.weights = self._snapshot(model)
            self.phase, self.value, self.step = phase, value, step

    def restore(self, model: nn.Module, ended: int, step: int) -> tuple[int | None, float | None]:
        """Load the best weights of phase `ended` into `model` (the phase ended at `step`); returns the step and
        value of that evaluation, and forgets them."""
        if self.weights is None or self.phase != ended:
            raise ValueError(
                f"{self.owner}(restore_best={self.metric!r}): phase {ended} ended at step {step} without an "
                f"evaluation, so it has no best weights to restore. Evaluate at least once in every phase "
                f"(eval_strategy='steps' with eval_steps no longer than the shortest phase, or 'epoch' with phases "
                f"of whole epochs)."
            )
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        with torch.no_grad():
            for name, saved in self.weights.items():
                target = params[name] if name in params else buffers[name]
                target.copy_(saved.to(device=target.device, dtype=target.dtype))
        found = (self.step, self.value)
        self.clear()
        return found

    # ------------------------------------------------------------------ checkpoints
    def payload(self) -> dict[str, Any] | None:
        """What the schedule state records (the weights go to `BEST_OF_PHASE_FILE`), or `None` with nothing kept."""
        if self.weights is None:
            return None
        return {"phase": self.phase, "value": self.value, "step": self.step}

    def save(self, folder: str | Path) -> None:
        """Write the kept weights into a checkpoint folder (main process), if any."""
        if self.weights is None:
            return
        path = Path(folder) / BEST_OF_PHASE_FILE
        tmp = path.with_suffix(".tmp")
        save_file({n: t.contiguous() for n, t in self.weights.items()}, str(tmp))
        tmp.replace(path)

    def load(self, payload: Mapping[str, Any], folder: str | Path) -> None:
        """Read back what `payload` (from the schedule state) and the checkpoint `folder` hold; every rank reads
        the same file, so every rank has the same weights."""
        path = Path(folder) / BEST_OF_PHASE_FILE
        if not path.is_file():
            raise ValueError(
                f"{self.owner}: the checkpoint's schedule state has a best evaluation of phase {payload.get('phase')} "
                f"(restore_best={self.metric!r}) but no {path}: was the checkpoint copied without it?"
            )
        self.weights = load_file(str(path))
        self.phase = int(payload["phase"])
        self.value = float(payload["value"])
        self.step = int(payload["step"])

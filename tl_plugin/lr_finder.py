"""Learning-rate range test: find a learning rate for the layers that train, through the `transformers.Trainer`.

`lr_find` runs a short training on the Trainer's own model, data, optimizer and callbacks (so a transfer config
applied to the model, or a `TransferCallback` in the Trainer, is in force: frozen parameters stay frozen and the
test measures the lr of the parameters that train). The lr rises exponentially from `start_lr` to `end_lr` over
`num_steps` optimizer steps; the training loss of each step is recorded and smoothed, and the test stops when the
smoothed loss exceeds `diverge_factor` times its minimum (or is not finite). Afterwards the model's weights and
buffers, ``requires_grad`` flags and train/eval modes, the optimizer and scheduler (their state and the Trainer's
references to them), the Trainer's arguments, state and callback list, and the random number generators are put
back as they were: the weights are bit-identical, and a ``trainer.train()`` after the test trains exactly as one
without it (same data order, same dropout), except for the learning rate when the suggestion is applied.

The suggestion rule is *minimum / 10*: one decade below the lr at which the smoothed loss is lowest. The minimum
itself is where the loss is about to blow up (training there is on the edge of divergence); a decade below it lies
in the region where the loss still falls quickly. It is chosen over the two other common rules because it reads off
one point of the smoothed curve: the steepest-descent rule (the most negative slope) differentiates a short, noisy
curve and moves a lot between two runs of the same test, and fastai's "valley" rule is a heuristic on top of a
longest-decreasing-run search whose result is hard to explain on the plot. The steepest-descent lr is still
reported (`LRFinderResult.steepest_lr`) and drawn, for comparison.

Each group of the optimizer keeps its ratio to the Trainer's ``learning_rate`` during the test (groups built with
layer-wise LR decay keep their decay), and the lr that is tested and suggested is the one of ``learning_rate``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = [
    "LRFinderConfig",
    "LRFinderResult",
    "LRRangeTestDivergedError",
    "SUGGESTION_RULE",
    "lr_find",
]

#: How `lr_find` picks its suggestion (see the module docstring for why).
SUGGESTION_RULE = "minimum/10: one decade below the lr of the lowest smoothed loss"


class LRRangeTestDivergedError(ValueError):
    """The range test diverged at once: the loss rose from the first steps. The message suggests a lower start.

    Attributes:
        result (`LRFinderResult`): what was recorded before the test stopped.
    """

    def __init__(self, message: str, result: LRFinderResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class LRFinderConfig:
    """The settings of a learning-rate range test.

    Args:
        start_lr (`float`, *optional*, defaults to 1e-7): the lr of the first step.
        end_lr (`float`, *optional*, defaults to 1.0): the lr of the last step (the test usually diverges before).
        num_steps (`int`, *optional*, defaults to 100): optimizer steps; the lr rises by the same factor each step.
        smoothing (`float`, *optional*, defaults to 0.98):
            weight of the past in the exponential moving average of the loss (debiased), in [0, 1).
        diverge_factor (`float`, *optional*, defaults to 4.0):
            stop when the smoothed loss exceeds this multiple of its minimum so far (> 1).
    """

    start_lr: float = 1e-7
    end_lr: float = 1.0
    num_steps: int = 100
    smoothing: float = 0.98
    diverge_factor: float = 4.0

    def __post_init__(self) -> None:
        for name in ("start_lr", "end_lr", "smoothing", "diverge_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        if self.start_lr <= 0 or self.end_lr <= 0:
            raise ValueError(
                f"The lr range must be positive: `start_lr`={self.start_lr!r}, `end_lr`={self.end_lr!r} "
                f"(e.g. start_lr=1e-7, end_lr=1)."
            )
        if self.start_lr == self.end_lr:
            raise ValueError(
                f"The lr range is empty: `start_lr`={self.start_lr!r} equals `end_lr`={self.end_lr!r}; give "
                f"start_lr < end_lr (e.g. start_lr=1e-7, end_lr=1)."
            )
        if self.start_lr > self.end_lr:
            raise ValueError(
                f"The lr range is inverted: `start_lr`={self.start_lr!r} is above `end_lr`={self.end_lr!r}; the "
                f"test raises the lr, so give start_lr < end_lr (swap them)."
            )
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 5:
            raise ValueError(f"`num_steps` must be an integer >= 5, got {self.num_steps!r}.")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"`smoothing` must be in [0, 1), got {self.smoothing!r}.")
        if self.diverge_factor <= 1:
            raise ValueError(f"`diverge_factor` must be > 1, got {self.diverge_factor!r}.")

    def lr_at(self, step: int) -> float:
        """The lr of optimizer step `step` (0-based): exponential from `start_lr` to `end_lr`."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / (self.num_steps - 1))


@dataclass
class LRFinderResult:
    """What `lr_find` recorded and suggests.

    Attributes:
        lrs (`list[float]`): the lr of each recorded step (the Trainer's ``learning_rate`` equivalent).
        losses (`list[float]`): the training loss of each step.
        smoothed_losses (`list[float]`): the debiased exponential moving average of `losses`.
        suggestion (`float`): the suggested lr (rule: `rule`).
        rule (`str`): how `suggestion` was chosen.
        min_loss_lr (`float`): the lr of the lowest smoothed loss.
        steepest_lr (`float`): the lr of the steepest descent of the smoothed loss (for comparison).
        diverged (`bool`): whether the test stopped because the loss diverged (else it ran all steps).
        config (`LRFinderConfig`): the settings.
        notes (`list[str]`): remarks on the curve (e.g. the loss still falling at `end_lr`).
    """

    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    suggestion: float
    rule: str
    min_loss_lr: float
    steepest_lr: float
    diverged: bool
    config: LRFinderConfig
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the result."""
        out = dataclasses.asdict(self)
        out["config"] = dataclasses.asdict(self.config)
        return out

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Draw loss against lr (log x): the raw and smoothed loss, the suggestion and the minimum marked.

        Needs matplotlib (``pip install 'tl-plugin[plot]'``). Returns the written PNG.
        """
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.plot(self.lrs, self.losses, color="0.75", linewidth=1, label="loss per step")
        ax.plot(self.lrs, self.smoothed_losses, color="tab:blue", linewidth=2, label="smoothed loss")
        finite = [v for v in self.smoothed_losses if math.isfinite(v)]
        if finite:
            low, first = min(finite), finite[0]
            high = max(first, low) + 0.6 * max(abs(first - low), 0.05 * abs(first) or 0.05)
            ax.set_ylim(low - 0.15 * (high - low), high)
        ax.axvline(
            self.min_loss_lr,
            color="0.4",
            linestyle=":",
            label=f"lowest smoothed loss: {self.min_loss_lr:.2e}",
        )
        ax.axvline(self.steepest_lr, color="tab:green", linestyle="--", linewidth=1,
                   label=f"steepest descent (not used): {self.steepest_lr:.2e}")  # fmt: skip
        ax.axvline(
            self.suggestion, color="tab:red", linewidth=2, label=f"suggested lr: {self.suggestion:.2e}"
        )
        ax.plot([self.suggestion], [_interpolate(self.lrs, self.smoothed_losses, self.suggestion)], "o",
                color="tab:red", markersize=8)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss")
        ax.set_title(f"{title or 'Learning-rate range test'}\nsuggestion rule: {self.rule}", fontsize=10)
        ax.legend(loc="upper left", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("Plotting needs matplotlib: pip install 'tl-plugin[plot]'") from err
    return plt


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """`ys` at `x` on a log-x scale (clamped to the ends), for the suggestion's marker."""
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=False), zip(xs[1:], ys[1:], strict=False), strict=False):
        if x0 <= x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 0.0
            return y0 + t * (y1 - y0)
    return ys[-1]


class LRRangeTestCallback(TrainerCallback):
    """Sets the lr of every optimizer group before each step (keeping each group's ratio to the Trainer's
    ``learning_rate``), records the logged loss of each step, and stops the training when the loss diverges.

    Used by `lr_find`, which makes the Trainer log every step; the loss of step k is the one computed with the
    weights that steps 0..k-1 (lrs ``lr_at(0..k-1)``) produced, and is recorded against ``lr_at(k)``, the lr of
    the update it leads to, as fastai and Lightning do.
    """

    def __init__(self, config: LRFinderConfig, base_lr: float) -> None:
        self.config = config
        self.base_lr = base_lr
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.diverged = False
        self._ratios: list[float] | None = None
        self._average = 0.0
        self._best = math.inf

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer: Any = None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        if optimizer is None:
            return
        if self._ratios is None:
            self._ratios = [g.get("initial_lr", g["lr"]) / self.base_lr for g in optimizer.param_groups]
        lr = self.config.lr_at(min(state.global_step, self.config.num_steps - 1))
        for group, ratio in zip(optimizer.param_groups, self._ratios, strict=True):
            group["lr"] = lr * ratio

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Any = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs or state.global_step < 1:
            return
        loss = float(logs["loss"])
        step = len(self.losses)
        self.lrs.append(self.config.lr_at(min(state.global_step - 1, self.config.num_steps - 1)))
        self.losses.append(loss)
        if not math.isfinite(loss):
            self.smoothed.append(math.inf)
            self.diverged = True
            control.should_training_stop = True
            return
        beta = self.config.smoothing
        self._average = beta * self._average + (1 - beta) * loss
        smoothed = self._average / (1 - beta ** (step + 1))
        self.smoothed.append(smoothed)
        self._best = min(self._best, smoothed)
        if smoothed > self.config.diverge_factor * self._best:
            self.diverged = True
            control.should_training_stop = True


def _suggest(callback: LRRangeTestCallback, config: LRFinderConfig) -> LRFinderResult:
    lrs, losses, smoothed = callback.lrs, callback.losses, callback.smoothed
    if not lrs:
        raise RuntimeError("The range test recorded no step: the training loop logged no loss.")
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    skip = min(len(lrs) // 10, 10)  # the first smoothed values rest on few losses
    candidates = [i for i in finite if i >= skip] or finite or [0]
    i_min = min(candidates, key=lambda i: smoothed[i])
    slopes = [
        (smoothed[i + 1] - smoothed[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
        for i in candidates
        if i + 1 < len(lrs) and i + 1 <= i_min and lrs[i + 1] > lrs[i]
    ]
    steepest_index = candidates[slopes.index(min(slopes))] if slopes else i_min
    result = LRFinderResult(
        lrs=lrs, losses=losses, smoothed_losses=smoothed, suggestion=lrs[i_min] / 10, rule=SUGGESTION_RULE,
        min_loss_lr=lrs[i_min], steepest_lr=lrs[steepest_index], diverged=callback.diverged, config=config,
    )  # fmt: skip
    at_once = max(3, config.num_steps // 10)
    if callback.diverged and (i_min < at_once or not finite):
        lower = config.start_lr / 100
        raise LRRangeTestDivergedError(
            f"The range test diverged at once: the smoothed loss was lowest at step {i_min + 1} (lr {lrs[i_min]:.2e}) "
            f"and the test stopped at step {len(lrs)} (lr {lrs[-1]:.2e}, loss {losses[-1]:.4g}). The lr range starts "
            f"too high for this model and data: start lower, e.g. start_lr={lower:.0e} (was {config.start_lr:g}).",
            result,
        )
    if not callback.diverged and i_min >= len(lrs) - 2:
        result.notes.append(
            f"The loss was still falling at end_lr={config.end_lr:g}: the minimum may lie higher; raise end_lr."
        )
    if result.suggestion < config.start_lr:
        result.notes.append(
            f"The suggestion {result.suggestion:.2e} is below start_lr={config.start_lr:g}: the test saw little of "
            f"the falling part of the curve; start lower to check."
        )
    return result


def _rng_state() -> dict[str, Any]:
    import numpy as np

    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap_optimizer(optimizer: Any) -> Any:
    # accelerate wraps the optimizer during `train()` (AcceleratedOptimizer.optimizer is the original)
    return getattr(optimizer, "optimizer", optimizer) if optimizer is not None else None


def _args_copy(args: Any, **changes: Any) -> Any:
    """A shallow copy of `TrainingArguments` with `changes` (the caller's object is left as it is). Not
    `dataclasses.replace`: that re-runs ``__post_init__``, which resets the accelerator state the Trainer holds."""
    out = copy.copy(args)
    for name, value in changes.items():
        setattr(out, name, value)
    return out


def _scale_lrs(trainer: Any, factor: float) -> None:
    """Multiply the lrs of a user-supplied optimizer (and the base lrs of its scheduler) by `factor`."""
    if trainer.optimizer is not None:
        for group in trainer.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
    scheduler = trainer.lr_scheduler
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]


def lr_find(
    trainer: Any,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 1.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    diverge_factor: float = 4.0,
    apply_suggestion: bool = True,
) -> LRFinderResult:
    """Run a learning-rate range test through `trainer` and suggest a learning rate (rule: minimum / 10).

    The test trains `trainer.model` for up to `num_steps` optimizer steps on the Trainer's training data, with its
    optimizer (or the one it would create), its callbacks (a `TransferCallback` or a freeze applied beforehand
    holds: the lr found is the one of the layers that train) and its batch size, logging every step and saving
    nothing. Then everything is restored (see the module docstring): the weights are bit-identical to before.
    Progress and printer callbacks are left out during the test; reporting integrations (``report_to``) see it.

    Args:
        trainer (`transformers.Trainer`): a Trainer with training data; any model it takes.
        start_lr (`float`, *optional*, defaults to 1e-7): the first lr.
        end_lr (`float`, *optional*, defaults to 1.0): the last lr (the test usually stops earlier, diverged).
        num_steps (`int`, *optional*, defaults to 100): steps from `start_lr` to `end_lr` (at least 5).
        smoothing (`float`, *optional*, defaults to 0.98): loss smoothing (exponential moving average, debiased).
        diverge_factor (`float`, *optional*, defaults to 4.0): stop when the smoothed loss exceeds this multiple of
            its minimum.
        apply_suggestion (`bool`, *optional*, defaults to `True`): write the suggestion into the run's config:
            ``trainer.args`` becomes a copy with ``learning_rate`` set to it (the caller's `TrainingArguments`
            object is not changed), and the groups of an optimizer given to the Trainer (and its scheduler's base
            lrs) are scaled by the same factor, keeping their ratios.

    Returns:
        `LRFinderResult`: the curve, the suggestion and the rule; ``result.plot(path)`` draws it.

    Raises:
        `ValueError`: for an empty or inverted lr range (naming both values) or other bad settings.
        `LRRangeTestDivergedError`: when the loss rises from the first steps (the message suggests a lower
            `start_lr`); the model is restored first.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    >>> from tl_plugin import freeze
    >>> from tl_plugin.lr_finder import lr_find
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = BertForSequenceClassification(BertConfig(
    ...     vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
    >>> _ = freeze(model, ["embeddings", "blocks.0"])  # the transfer config: the test finds the lr of the rest
    >>> ids = torch.randint(5, 99, (64, 8))
    >>> data = [{"input_ids": ids[i], "labels": int(ids[i, 0] > 50)} for i in range(64)]
    >>> args = TrainingArguments("out", per_device_train_batch_size=16, learning_rate=1e-4, report_to=[],
    ...                          use_cpu=True, disable_tqdm=True)
    >>> trainer = Trainer(model=model, args=args, train_dataset=data)
    >>> before = {k: v.clone() for k, v in model.state_dict().items()}
    >>> result = lr_find(trainer, start_lr=1e-5, end_lr=10.0, num_steps=30)
    >>> result.rule
    'minimum/10: one decade below the lr of the lowest smoothed loss'
    >>> trainer.args.learning_rate == result.suggestion, args.learning_rate  # the copy changed, not `args`
    (True, 0.0001)
    >>> all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    True

    ```
    """
    config = LRFinderConfig(start_lr, end_lr, num_steps, smoothing, diverge_factor)
    if trainer.train_dataset is None:
        raise ValueError("`lr_find` needs a Trainer with a `train_dataset` (the range test trains on it).")
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    model = trainer.model
    saved_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    saved_modes = {name: m.training for name, m in model.named_modules()}
    optimizer = _unwrap_optimizer(trainer.optimizer)
    scheduler = trainer.lr_scheduler
    saved_optimizer = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    saved_scheduler = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
    names = ("args", "state", "control", "model_wrapped", "_created_lr_scheduler")
    saved = {name: getattr(trainer, name) for name in names if hasattr(trainer, name)}
    saved_callbacks = trainer.callback_handler.callbacks
    saved_rng = _rng_state()
    args = trainer.args
    callback = LRRangeTestCallback(config, base_lr=args.learning_rate)
    trainer.args = _args_copy(
        args, max_steps=config.num_steps, logging_strategy=IntervalStrategy.STEPS, logging_steps=1,
        logging_first_step=False, logging_nan_inf_filter=False, eval_strategy=IntervalStrategy.NO,
        save_strategy=SaveStrategy.NO, load_best_model_at_end=False, disable_tqdm=True, warmup_steps=0,
        push_to_hub=False,
    )  # fmt: skip
    trainer.callback_handler.callbacks = [
        c for c in saved_callbacks if not isinstance(c, (ProgressCallback, PrinterCallback))
    ] + [callback]
    try:
        trainer.train()
    finally:
        trainer.callback_handler.callbacks = saved_callbacks
        for name, value in saved.items():
            setattr(trainer, name, value)
        trainer.optimizer, trainer.lr_scheduler = optimizer, scheduler
        if optimizer is not None and saved_optimizer is not None:
            optimizer.load_state_dict(saved_optimizer)
        if scheduler is not None and saved_scheduler is not None:
            scheduler.load_state_dict(saved_scheduler)
        with torch.no_grad():
            model.load_state_dict(saved_weights)
        for name, param in model.named_parameters():
            param.requires_grad_(saved_requires_grad[name])
        for name, module in model.named_modules():
            module.training = saved_modes.get(name, module.training)
        model.zero_grad(set_to_none=True)
        _set_rng_state(saved_rng)
    result = _suggest(callback, config)
    if apply_suggestion:
        _scale_lrs(trainer, result.suggestion / args.learning_rate)
        trainer.args = _args_copy(args, learning_rate=result.suggestion)
    return result

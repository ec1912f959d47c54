"""L2-SP: regularise fine-tuned weights toward their pretrained values ("starting point") instead of toward 0.

The penalty (Li, Grandvalet & Davoine, 2018) is ``α/2·‖w − w0‖²`` over the pretrained parameters ``w`` (``w0``:
their values when training starts) plus ``β/2·‖w_new‖²`` over the newly initialised ones (the task head, and PEFT
adapter weights), which have no meaningful starting point.

How the penalty enters training. :class:`L2SPCallback` adds the penalty's gradient, ``α(w − w0)`` and ``β·w``, to
``p.grad`` in ``on_pre_optimizer_step``. In transformers 5.x's training loop that event fires once per optimizer
step, after the last micro-batch's backward (so after gradient accumulation, and under DDP after the gradients were
all-reduced), after gradient clipping and the grad-norm measurement (which, with fp16 AMP, also unscaled the
gradients), and right before ``optimizer.step()``. Hence:

- gradient accumulation: the term is added once per optimizer step, as if the penalty were added once to the loss
  of the whole accumulated batch (adding it in ``compute_loss`` would add it once per micro-batch and make it
  depend on how the Trainer scales micro-batch losses);
- DDP: ``w`` and ``w0`` are identical on every rank, so every rank adds the same term to the same averaged gradient;
  no communication is needed and the replicas stay in sync;
- clipping: the penalty gradient is **not** clipped and is not part of the logged ``grad_norm`` (like AdamW's
  decoupled weight decay, the pull toward ``w0`` is not weakened by a large data gradient);
- the optimizer sees ``g + α(w − w0)``: with SGD that is exactly gradient descent on loss + penalty; with Adam(W) the
  sum is normalised by Adam's moments, as it would be had the penalty been added to the loss.

DeepSpeed (partitioned gradients) is not supported and raises; FSDP is untested.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checks import check_number
from ..discovery import LayerDiscoveryError, discover_layer_groups
from ..freezing import select_parameters
from .base import TLCallback

logger = logging.getLogger("tl_plugin")

__all__ = ["L2SP_REFERENCE_FILE", "L2SPCallback", "L2SPConfig"]

#: The file, in each checkpoint folder, holding the reference (pretrained) weights ``w0``.
L2SP_REFERENCE_FILE = "tl_l2sp_reference.safetensors"


def _check_coefficient(name: str, value: Any) -> float:
    return check_number(name, value, low=0)


@dataclass(frozen=True)
class L2SPConfig:
    """The coefficients and parameter split of an :class:`L2SPCallback`.

    Args:
        alpha (`float`, *optional*, defaults to 0.01): weight of ``α/2·‖w − w0‖²`` over the pretrained parameters.
        beta (`float`, *optional*, defaults to 0.0): weight of ``β/2·‖w‖²`` over the new parameters (the head).
        head (`tuple[str, ...]`, *optional*):
            selectors (see `tl_plugin.freezing`) of the *new* parameters, regularised toward 0 with `beta`.
            `None` (default): the discovered ``head`` group plus PEFT ``adapters``; ``()``: none (every parameter
            is pretrained).
    """

    alpha: float = 0.01
    beta: float = 0.0
    head: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _check_coefficient("alpha", self.alpha))
        object.__setattr__(self, "beta", _check_coefficient("beta", self.beta))
        if self.head is not None:
            head = (self.head,) if isinstance(self.head, str) else tuple(self.head)
            if not all(isinstance(s, str) and s for s in head):
                raise ValueError(
                    f"`head` must be None, a selector string or a list of selector strings (e.g. ['head'] or "
                    f"['classifier.*']), got {self.head!r}."
                )
            object.__setattr__(self, "head", head)


class L2SPCallback(TLCallback):
    """Regularise the trainable pretrained weights toward their starting values (L2-SP), the head toward 0.

    Adds ``α(w − w0)`` to the gradient of every trainable pretrained parameter and ``β·w`` to that of every
    trainable new (head) parameter, once per optimizer step, before ``optimizer.step()`` (see the module docstring
    for the order relative to gradient accumulation, clipping and DDP). Parameters frozen at a step are skipped at
    that step; one unfrozen later is pulled toward its value at train start.

    The reference weights ``w0`` are detached clones, on each parameter's device, keyed by parameter *name*,
    taken once, when `train()` first starts with this model (frozen parameters included, so that a later unfreeze
    has a reference; a second `train()` on the same model keeps them). At each checkpoint the main process writes
    them to ``<checkpoint>/tl_l2sp_reference.safetensors``; when training resumes (``global_step > 0`` at train
    begin) they are read back from ``<output_dir>/checkpoint-<global_step>/`` so the reference stays the
    *pretrained* weights, not the checkpoint's. If that file is missing (a checkpoint written without this
    callback, or one outside `output_dir`), train begin raises `FileNotFoundError`; pass `reference` then.

    Logged (every logging step, through `Trainer.log` when bound): ``tl/l2sp_penalty``, the mean over the optimizer
    steps since the last log of ``α/2·‖w − w0‖² + β/2·‖w_head‖²`` (trainable parameters, before the update), and
    ``tl/l2sp_distance``, the mean of ``‖w − w0‖``.

    Args:
        alpha (`float`, *optional*, defaults to 0.01): strength of the pull toward the pretrained weights, >= 0.
        beta (`float`, *optional*, defaults to 0.0): strength of the pull of the head toward 0, >= 0.
        head (`str` or `list[str]`, *optional*):
            selectors of the new parameters; default: the ``head`` group and PEFT ``adapters``.
        reference (`str`, `os.PathLike` or `Mapping[str, torch.Tensor]`, *optional*):
            the reference weights to use instead of the weights at train start: a safetensors file (e.g. the
            ``tl_l2sp_reference.safetensors`` of a checkpoint) or a name → tensor mapping. It must hold every
            pretrained parameter by name.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin.callbacks.regularization import L2SPCallback
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> callback = L2SPCallback(alpha=0.5, beta=0.0)
    >>> callback.setup(model)
    >>> float(callback.penalty())
    0.0
    >>> with torch.no_grad():
    ...     model.bert.pooler.dense.bias += 1.0  # 32 entries moved by 1 from w0
    >>> float(callback.penalty())  # 0.5 / 2 * 32
    8.0

    ```
    """

    def __init__(
        self,
        alpha: float = 0.01,
        beta: float = 0.0,
        *,
        head: str | Sequence[str] | None = None,
        reference: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.config = L2SPConfig(
            alpha=alpha,
            beta=beta,
            head=None if head is None else ((head,) if isinstance(head, str) else tuple(head)),
        )
        if reference is not None and not isinstance(reference, (str, os.PathLike, Mapping)):
            raise ValueError(
                f"`reference` must be a path to a safetensors file or a mapping of parameter names to tensors, got "
                f"{type(reference).__name__}."
            )
        self.reference = reference
        self._model_ref: weakref.ReferenceType[nn.Module] | None = None
        self._pretrained: dict[str, nn.Parameter] = {}
        self._new: dict[str, nn.Parameter] = {}
        self._w0: dict[str, torch.Tensor] = {}
        self._penalty_sum: torch.Tensor | None = None
        self._distance_sum: torch.Tensor | None = None
        self._steps_since_log = 0
        self._device = torch.device("cpu")

    # ------------------------------------------------------------------ setup
    @property
    def alpha(self) -> float:
        return self.config.alpha

    @property
    def beta(self) -> float:
        return self.config.beta

    @property
    def reference_weights(self) -> Mapping[str, torch.Tensor]:
        """The reference weights ``w0`` by parameter name (a new dict over the stored tensors; empty before `setup`)."""
        return dict(self._w0)

    @property
    def pretrained_parameter_names(self) -> list[str]:
        return list(self._pretrained)

    @property
    def head_parameter_names(self) -> list[str]:
        return list(self._new)

    def _split(self, model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
        params = dict(model.named_parameters())
        if self.config.head is None:
            try:
                groups = discover_layer_groups(model)
            except LayerDiscoveryError as err:
                raise ValueError(
                    f"L2SPCallback could not find the head of {type(model).__name__} ({err}). Pass `head=` "
                    f"selectors of the new parameters (e.g. head=['classifier.*']), or head=[] if all are "
                    f"pretrained."
                ) from err
            new_names = {n for g in groups if g.kind in ("head", "adapters") for n in g.param_names}
        elif not self.config.head:
            new_names = set()
        else:
            new_names = set(select_parameters(model, list(self.config.head)))
        pretrained = {n: p for n, p in params.items() if n not in new_names}
        new = {n: p for n, p in params.items() if n in new_names}
        return pretrained, new

    def setup(
        self,
        model: nn.Module,
        reference: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Split `model`'s parameters into pretrained / new and take the reference weights.

        `reference` (or the callback's own `reference`) replaces the current weights as ``w0``. Called by
        `on_train_begin`; call it yourself to use :meth:`penalty` outside a Trainer.
        """
        self._pretrained, self._new = self._split(model)
        reference = reference if reference is not None else self.reference
        if reference is None:
            self._w0 = {n: p.detach().clone() for n, p in self._pretrained.items()}
        else:
            self._w0 = self._load_reference(reference)
        self._model_ref = weakref.ref(model)
        first = next(iter({**self._pretrained, **self._new}.values()), None)
        self._device = first.device if first is not None else torch.device("cpu")
        self._reset_log()

    def _load_reference(
        self, reference: str | os.PathLike[str] | Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if isinstance(reference, Mapping):
            tensors: Mapping[str, torch.Tensor] = reference
            source = "the `reference` mapping"
        else:
            from safetensors.torch import load_file

            path = Path(reference)
            if not path.is_file():
                raise FileNotFoundError(f"L2SP reference file {str(path)!r} does not exist.")
            tensors = load_file(str(path))
            source = repr(str(path))
        missing = [n for n in self._pretrained if n not in tensors]
        if missing:
            raise ValueError(
                f"The L2-SP reference in {source} lacks {len(missing)} pretrained parameter(s) of the model, e.g. "
                f"{missing[:5]}; it must hold every pretrained parameter by name."
            )
        w0: dict[str, torch.Tensor] = {}
        for name, param in self._pretrained.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"The L2-SP reference for {name!r} in {source} has shape {tuple(value.shape)}, the parameter "
                    f"has {tuple(param.shape)}."
                )
            w0[name] = value.detach().to(device=param.device, dtype=param.dtype).clone()
        return w0

    # ------------------------------------------------------------------ the penalty
    def penalty(self) -> torch.Tensor:
        """``α/2·‖w − w0‖² + β/2·‖w_head‖²`` over the parameters trainable now (a detached 0-dim tensor)."""
        penalty, _ = self._penalty_terms(add_gradients=False)
        return penalty

    def _penalty_terms(self, add_gradients: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._w0 and not self._new:
            raise RuntimeError(
                "L2SPCallback.setup(model) has not been called (the Trainer calls it at train begin)."
            )
        alpha, beta = self.config.alpha, self.config.beta
        device = self._device
        squared = torch.zeros((), dtype=torch.float32, device=device)
        head_squared = torch.zeros((), dtype=torch.float32, device=device)
        with torch.no_grad():
            for name, param in self._pretrained.items():
                if not param.requires_grad:
                    continue
                diff = param.detach() - self._w0[name]
                squared += diff.float().square().sum().to(device)
                if add_gradients and alpha:
                    _add_to_grad(param, diff, alpha)
            if beta:
                for param in self._new.values():
                    if not param.requires_grad:
                        continue
                    weight = param.detach()
                    head_squared += weight.float().square().sum().to(device)
                    if add_gradients:
                        _add_to_grad(param, weight, beta)
        penalty = 0.5 * alpha * squared + 0.5 * beta * head_squared
        return penalty, squared.sqrt()

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("L2SPCallback needs the model (the Trainer passes it as `model`).")
        if getattr(args, "deepspeed", None):
            raise ValueError(
                "L2SPCallback does not support DeepSpeed (its gradients are partitioned and not in `p.grad`); "
                "use DDP or a single device."
            )
        if getattr(args, "fsdp", None):
            logger.warning("L2SPCallback has not been tested with FSDP; check the logged penalty.")
        if self.reference is not None:
            self.setup(model)
            origin = "the given reference"
        elif self._model_ref is not None and self._model_ref() is model and self._w0:
            self._reset_log()
            origin = "the weights at the first train start (kept)"
        elif state.global_step > 0:
            path = (
                Path(args.output_dir or ".")
                / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
                / L2SP_REFERENCE_FILE
            )
            if not path.is_file():
                raise FileNotFoundError(
                    f"Resuming at step {state.global_step}, but the L2-SP reference weights {str(path)!r} are "
                    f"missing (the checkpoint was not written with L2SPCallback, or is not in output_dir). Pass "
                    f"`L2SPCallback(reference=...)` (a safetensors file or a state dict of the pretrained model); "
                    f"using the checkpoint's weights would regularise toward them instead."
                )
            self.setup(model, reference=path)
            origin = f"{str(path)!r}"
        else:
            self.setup(model)
            origin = "the weights at train start"
        trainable = sum(p.requires_grad for p in self._pretrained.values())
        self.log_event(
            state,
            f"L2-SP: alpha={self.alpha} over {len(self._pretrained)} pretrained parameter tensors ({trainable} "
            f"trainable now), beta={self.beta} over {len(self._new)} head tensors; reference: {origin}",
        )

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        penalty, distance = self._penalty_terms(add_gradients=True)
        self._penalty_sum = penalty if self._penalty_sum is None else self._penalty_sum + penalty
        self._distance_sum = distance if self._distance_sum is None else self._distance_sum + distance
        self._steps_since_log += 1

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_log:
            self._log(state, control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_log:
            self._log(state, control)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not args.should_save or not self._w0:
            return
        folder = Path(args.output_dir or ".") / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            logger.warning(
                "L2SPCallback: checkpoint folder %s not found; the reference weights were not saved with it.",
                folder,
            )
            return
        self.save_reference(folder / L2SP_REFERENCE_FILE)

    def save_reference(self, path: str | os.PathLike[str]) -> Path:
        """Write the reference weights ``w0`` to a safetensors file (atomically); returns its path."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {n: t.detach().cpu().contiguous() for n, t in self._w0.items()},
            str(tmp),
            metadata={"format": "pt", "producer": "tl_plugin.L2SPCallback"},
        )
        tmp.replace(path)
        return path

    # ------------------------------------------------------------------ logging
    def _reset_log(self) -> None:
        self._penalty_sum = None
        self._distance_sum = None
        self._steps_since_log = 0

    def _log(self, state: TrainerState, control: TrainerControl) -> None:
        if not self._steps_since_log or self._penalty_sum is None or self._distance_sum is None:
            return
        steps = self._steps_since_log
        penalty = float(self._penalty_sum) / steps
        distance = float(self._distance_sum) / steps
        self._reset_log()
        # `Trainer.log` (main process only) resets `control.should_log` through `on_log`: restore it, or the
        # Trainer would skip its own loss log at this step on the main process only, and under DDP the ranks would
        # disagree on the loss all-gather that goes with it.
        should_log = control.should_log
        self.log_event(
            state,
            f"L2-SP penalty {penalty:.6g} (mean over {steps} steps), distance to w0 {distance:.6g}",
            {"tl/l2sp_penalty": penalty, "tl/l2sp_distance": distance},
        )
        control.should_log = should_log


def _add_to_grad(param: nn.Parameter, direction: torch.Tensor, scale: float) -> None:
    """``param.grad += scale * direction`` (creating the gradient when the parameter got none)."""
    if param.grad is None:
        param.grad = direction.to(param.dtype) * scale
    else:
        param.grad.add_(direction.to(param.grad.dtype), alpha=scale)

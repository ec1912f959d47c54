"""Losses for imbalanced classification: class weights from label counts, and a class-weighted cross-entropy to pass
as `Trainer(compute_loss_func=...)`.

Class weights. :func:`class_weights_from_labels` gives rare classes larger weights, either inversely proportional to
their counts (``"inverse"``) or to their *effective number* of samples (``"effective_number"``, Cui et al., 2019:
``E_c = (1 - β^n_c) / (1 - β)``, which saturates for large classes; ``β → 1`` approaches ``"inverse"``, ``β = 0``
gives equal weights). Both are scaled so that their count-weighted mean over the data is 1 (``Σ_c n_c·w_c = N``):
summed over a representative batch the weights add up to about the batch size, so a weighted loss has the scale
of the unweighted one and the learning rate needs no retuning.

Reduction, and gradient accumulation. With ``num_items_in_batch`` (the Trainer passes it, in training and in
evaluation, as the number of labels other than -100 in the whole accumulated batch, summed over devices),
:class:`WeightedCrossEntropyLoss` returns ``Σ_i w_{y_i}·ℓ_i / num_items_in_batch``. The Trainer does *not* divide a
`compute_loss_func` loss by the number of accumulation steps, so the micro-batch losses add up to exactly
``Σ w·ℓ / N`` over the accumulated batch: the update is the same however the batch is split into micro-batches or
devices. That is the sense in which it is "correct". It is not torch's weighted *mean*
(``F.cross_entropy(weight=w)``, ``Σ w_{y_i}·ℓ_i / Σ w_{y_i}``): the denominator ``Σ w_{y_i}`` over the accumulated
batch is not available to a micro-batch, and per-micro-batch weighted means averaged together differ from the mean
over the whole batch (and would be multiplied by the number of accumulation steps, since the Trainer does not
rescale them). With the weights normalised as above the two agree in expectation. Without ``num_items_in_batch``
(outside a Trainer) the loss *is* torch's weighted mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_choice, check_int, check_number

__all__ = ["WEIGHT_SCHEMES", "WeightScheme", "WeightedCrossEntropyLoss", "class_weights_from_labels"]

WeightScheme = Literal["inverse", "effective_number"]
#: The weighting schemes of :func:`class_weights_from_labels`.
WEIGHT_SCHEMES: tuple[str, ...] = ("inverse", "effective_number")


def _flatten(values: Any, out: list[Any]) -> list[Any]:
    if isinstance(values, (torch.Tensor, np.ndarray)):
        out.extend(np.asarray(values).reshape(-1).tolist())
    elif isinstance(values, (str, bytes, Mapping)):
        raise ValueError(f"`labels` must hold integer class ids, found {values!r}.")
    elif isinstance(values, Iterable):
        for item in values:
            _flatten(item, out)
    else:
        out.append(values)
    return out


def _labels_tensor(labels: Any) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        flat = labels.detach().reshape(-1).cpu()
    elif isinstance(labels, np.ndarray) and labels.dtype != object:
        flat = torch.from_numpy(np.ascontiguousarray(labels).reshape(-1))
    else:
        values = _flatten(labels, [])
        bad = next(
            (v for v in values if isinstance(v, bool) or not isinstance(v, (int, float, np.number))), None
        )
        if bad is not None:
            raise ValueError(f"`labels` must hold integer class ids, found {bad!r} ({type(bad).__name__}).")
        flat = torch.tensor(
            values, dtype=torch.float64 if any(isinstance(v, float) for v in values) else torch.long
        )
    if flat.dtype == torch.bool:
        raise ValueError(
            "`labels` must hold integer class ids, got booleans; convert them with `.long()` first."
        )
    if flat.is_floating_point():
        not_integral = (flat != flat.round()) | ~torch.isfinite(flat)
        if bool(not_integral.any()):
            index = int(not_integral.nonzero()[0])
            raise ValueError(
                f"`labels` must hold integer class ids; labels[{index}] (flattened) is {flat[index].item()!r}."
            )
    elif flat.is_complex():
        raise ValueError("`labels` must hold integer class ids, got complex numbers.")
    return flat.long()


def class_weights_from_labels(
    labels: Any,
    num_classes: int | None = None,
    scheme: WeightScheme = "inverse",
    beta: float = 0.999,
    *,
    ignore_index: int | None = -100,
) -> torch.Tensor:
    """Per-class loss weights from the class counts of a training set: rare classes weigh more.

    Args:
        labels (`Sequence[int]`, `numpy.ndarray` or `torch.Tensor`):
            the training labels (class ids, any shape; nested lists are flattened, e.g. token-classification labels).
        num_classes (`int`, *optional*): the number of classes; by default the largest label + 1.
        scheme (`str`, *optional*, defaults to ``"inverse"``):
            ``"inverse"``: ``w_c ∝ 1 / n_c``; ``"effective_number"``: ``w_c ∝ (1 - β) / (1 - β^n_c)``.
        beta (`float`, *optional*, defaults to 0.999): the ``β`` of ``"effective_number"``, in [0, 1).
        ignore_index (`int`, *optional*, defaults to -100): a label value to skip (`None`: skip nothing).

    Returns:
        `torch.Tensor`: float32 weights of shape ``(num_classes,)``, scaled so that ``Σ_c n_c·w_c = N`` (their mean
        over the labels is 1).

    Raises:
        `ValueError`: for a label out of ``[0, num_classes)`` (naming it and its position), a class with no example
            (its weight would be infinite), an unknown `scheme`, or `beta` / `num_classes` out of range.

    Example:

    ```python
    >>> from tl_plugin.losses import class_weights_from_labels
    >>> labels = [0] * 90 + [1] * 10
    >>> class_weights_from_labels(labels).tolist()  # N / (C * n_c), as scikit-learn's "balanced"
    [0.5555555820465088, 5.0]
    >>> w = class_weights_from_labels(labels, scheme="effective_number", beta=0.99)
    >>> [round(x, 3) for x in w.tolist()]
    [0.657, 4.089]
    >>> class_weights_from_labels([0, 1, 3])
    Traceback (most recent call last):
        ...
    ValueError: Class 2 has no example in `labels` (class counts: [1, 1, 0, 1]); its weight would be infinite.
    Check `labels`, or `num_classes` (4).

    ```
    """
    check_choice("scheme", scheme, WEIGHT_SCHEMES)
    check_number("beta", beta, low=0.0, high=1.0, include_high=False)
    if num_classes is not None:
        check_int("num_classes", num_classes, minimum=1)
    flat = _labels_tensor(labels)
    if ignore_index is not None:
        flat = flat[flat != ignore_index]
    if flat.numel() == 0:
        raise ValueError("`labels` is empty (after dropping `ignore_index`); there is nothing to count.")
    limit = num_classes if num_classes is not None else None
    out_of_range = (flat < 0) if limit is None else ((flat < 0) | (flat >= limit))
    if bool(out_of_range.any()):
        index = int(out_of_range.nonzero()[0])
        valid = "a class id >= 0" if limit is None else f"in [0, {limit - 1}]"
        raise ValueError(
            f"labels[{index}] (flattened, after dropping {ignore_index!r}) is {int(flat[index])}; every label must "
            f"be {valid}."
        )
    num_classes = num_classes if num_classes is not None else int(flat.max()) + 1
    counts = torch.bincount(flat, minlength=num_classes).to(torch.float64)
    missing = (counts == 0).nonzero().reshape(-1).tolist()
    if missing:
        names = ", ".join(map(str, missing))
        raise ValueError(
            f"Class{'es' if len(missing) > 1 else ''} {names} ha{'ve' if len(missing) > 1 else 's'} no example in "
            f"`labels` (class counts: {[int(c) for c in counts]}); {'their weights' if len(missing) > 1 else 'its weight'} "
            f"would be infinite. Check `labels`, or `num_classes` ({num_classes})."
        )
    if scheme == "inverse":
        raw = 1.0 / counts
    else:
        raw = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    weights = raw * counts.sum() / (counts * raw).sum()
    return weights.to(torch.float32)


@dataclass(frozen=True)
class _LossOptions:
    ignore_index: int
    label_smoothing: float


class WeightedCrossEntropyLoss:
    """Class-weighted cross-entropy for `transformers.Trainer(compute_loss_func=...)`.

    Called as ``loss(outputs, labels, num_items_in_batch=None)``: `outputs` is the model output (its ``logits``),
    `labels` the batch's labels. Logits of shape ``(..., num_classes)`` (sequence or token classification) are
    flattened with the labels; the loss is computed in float32 on the logits' device (the weights follow it).

    Reduction: with ``num_items_in_batch`` (always given by the Trainer) ``Σ_i w_{y_i}·ℓ_i / num_items_in_batch``,
    which makes gradient accumulation and multi-device training exact; without it, torch's weighted mean
    ``Σ w·ℓ / Σ w`` (= ``F.cross_entropy(logits, labels, weight=weights)``). See the module docstring. Not for causal
    language modelling (it does not shift labels).

    Args:
        weights (`torch.Tensor` or `Sequence[float]`): one non-negative weight per class, e.g. from
            :func:`class_weights_from_labels`.
        ignore_index (`int`, *optional*, defaults to -100): label value that contributes nothing.
        label_smoothing (`float`, *optional*, defaults to 0.0): as in `torch.nn.functional.cross_entropy`.

    Example:

    ```python
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from tl_plugin.losses import WeightedCrossEntropyLoss, class_weights_from_labels
    >>> weights = class_weights_from_labels([0, 0, 0, 1])
    >>> loss_fn = WeightedCrossEntropyLoss(weights)  # Trainer(..., compute_loss_func=loss_fn)
    >>> logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    >>> torch.allclose(loss_fn({"logits": logits}, labels), F.cross_entropy(logits, labels, weight=weights))
    True
    >>> summed = F.cross_entropy(logits, labels, weight=weights, reduction="sum")
    >>> torch.allclose(loss_fn({"logits": logits}, labels, num_items_in_batch=4), summed / 4)
    True

    ```
    """

    def __init__(
        self,
        weights: torch.Tensor | Sequence[float],
        *,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ) -> None:
        try:
            tensor = torch.as_tensor(weights, dtype=torch.float32).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"`weights` must be a 1-D sequence of numbers, got {weights!r}.") from err
        if tensor.dim() != 1 or tensor.numel() == 0:
            raise ValueError(
                f"`weights` must be 1-D with one weight per class, got shape {tuple(tensor.shape)}."
            )
        if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
            raise ValueError(f"`weights` must be finite and >= 0, got {tensor.tolist()}.")
        if not bool((tensor > 0).any()):
            raise ValueError("`weights` are all zero: the loss would be 0/0.")
        check_int("ignore_index", ignore_index)
        check_number("label_smoothing", label_smoothing, low=0.0, high=1.0, include_high=False)
        self.weights = tensor
        self.options = _LossOptions(ignore_index=ignore_index, label_smoothing=float(label_smoothing))
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return int(self.weights.numel())

    def _weights_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:
            self._on_device[device] = self.weights.to(device)
        return self._on_device[device]

    @staticmethod
    def _logits(outputs: Any) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return outputs
        if isinstance(outputs, Mapping):
            if "logits" not in outputs:
                raise ValueError(
                    f"WeightedCrossEntropyLoss needs the model's `logits`; the outputs have: {', '.join(outputs)}."
                )
            return outputs["logits"]
        if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
            return outputs[0]
        raise ValueError(
            f"WeightedCrossEntropyLoss needs model outputs with `logits` (a ModelOutput, dict, tuple or tensor), "
            f"got {type(outputs).__name__}."
        )

    def __call__(
        self,
        outputs: Any,
        labels: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if labels is None:
            raise ValueError(
                "WeightedCrossEntropyLoss got `labels=None`: the batch has no 'labels' column (rename your label "
                "column to 'labels')."
            )
        logits = self._logits(outputs)
        num_classes = logits.size(-1)
        if num_classes != self.num_classes:
            raise ValueError(
                f"WeightedCrossEntropyLoss has {self.num_classes} class weights, the logits have {num_classes} "
                f"classes (shape {tuple(logits.shape)})."
            )
        flat_logits = logits.reshape(-1, num_classes).float()
        flat_labels = labels.reshape(-1).to(device=logits.device, dtype=torch.long)
        if flat_labels.numel() != flat_logits.size(0):
            raise ValueError(
                f"The labels (shape {tuple(labels.shape)}) do not match the logits (shape {tuple(logits.shape)}): "
                f"expected one label per row of logits."
            )
        weight = self._weights_on(logits.device)
        options = self.options
        if num_items_in_batch is None:
            return F.cross_entropy(
                flat_logits,
                flat_labels,
                weight=weight,
                ignore_index=options.ignore_index,
                label_smoothing=options.label_smoothing,
            )
        total = F.cross_entropy(
            flat_logits,
            flat_labels,
            weight=weight,
            ignore_index=options.ignore_index,
            label_smoothing=options.label_smoothing,
            reduction="sum",
        )
        if isinstance(num_items_in_batch, torch.Tensor):
            return total / num_items_in_batch.to(device=total.device, dtype=total.dtype)
        if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
            raise ValueError(
                f"`num_items_in_batch` must be a number or a tensor, got {num_items_in_batch!r}."
            )
        return total / num_items_in_batch

    def __repr__(self) -> str:
        weights = ", ".join(f"{w:.4g}" for w in self.weights.tolist())
        return (
            f"WeightedCrossEntropyLoss(weights=[{weights}], ignore_index={self.options.ignore_index}, "
            f"label_smoothing={self.options.label_smoothing})"
        )

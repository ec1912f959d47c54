"""Checks that a prefix can be run apart from the rest of the model, and the tensor walks they rest on.

- `trainable_leaves`: the trainable parameters an output depends on (a walk of its autograd graph); a prefix that
  depends on one cannot run under `torch.no_grad()` nor be cached without silently stopping its training;
- `active_randomness`: submodules that compute differently in train and eval mode (dropout p>0, batch norm);
- `check_split`: on a few examples, the plain model against the model whose prefix is replaced by its stored
  output (`tl_plugin.prefix.runner.PrefixRunner.run_with_slot`): the same outputs or an `UnsupportedPrefixError`;
- `stored_difference`: stored rows against a fresh computation of the same examples.

Example:

```python
>>> import torch
>>> from tl_plugin.prefix.verify import active_randomness, max_difference
>>> active_randomness(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
['1 (Dropout p=0.1)']
>>> max_difference((torch.zeros(2), None), (torch.ones(2), None))
1.0

```
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .layout import UnsupportedPrefixError

if TYPE_CHECKING:
    from .runner import PrefixRunner

__all__ = [
    "PREFIX_DROPOUT_CHOICES",
    "SplitPlan",
    "active_randomness",
    "check_prefix_dropout",
    "check_split",
    "eval_mode",
    "flat_tensors",
    "max_difference",
    "stored_difference",
    "trainable_leaves",
]

#: The ways to handle dropout in the frozen prefix, see `tl_plugin.prefix.FrozenPrefixNoGrad`.
PREFIX_DROPOUT_CHOICES: tuple[str, ...] = ("off", "forbid", "on")


def check_prefix_dropout(value: Any, allowed: tuple[str, ...] = PREFIX_DROPOUT_CHOICES) -> None:
    """Raise a `ValueError` naming the choices when `value` is not one of `allowed`."""
    if value not in allowed:
        raise ValueError(
            f"`prefix_dropout` must be one of {', '.join(repr(c) for c in allowed)}, got {value!r}."
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module of `model` in eval mode for the block, then back to its own mode."""
    modules = list(model.modules())
    flags = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.training = flag


def flat_tensors(output: Any) -> list[Any]:
    """The tensors of a (nested) module output, in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in flat_tensors(item)]
    if isinstance(output, Mapping):
        return [t for item in output.values() for t in flat_tensors(item)]
    return []


def trainable_leaves(output: Any, names: Mapping[int, str]) -> list[str]:
    """Names of the trainable parameters whose gradient would flow through `output` (autograd graph walk)."""
    tensors = [t for t in flat_tensors(output) if t is not None]
    found: list[str] = []
    seen: set[int] = set()
    stack: list[Any] = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        variable = getattr(fn, "variable", None)
        if variable is not None and id(variable) in names and names[id(variable)] not in found:
            found.append(names[id(variable)])
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def active_randomness(module: nn.Module) -> list[str]:
    """Submodules of `module` that behave differently in train and eval mode (dropout p>0, batch norm)."""
    found = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
            found.append(f"{name or type(module).__name__} ({type(sub).__name__} p={sub.p})")
        elif isinstance(sub, nn.modules.batchnorm._BatchNorm):
            found.append(f"{name or type(module).__name__} ({type(sub).__name__})")
        else:
            for attr, value in vars(sub).items():
                if (
                    "dropout" in attr
                    and isinstance(value, float)
                    and not isinstance(value, bool)
                    and value > 0
                ):
                    found.append(f"{name or type(module).__name__}.{attr}={value}")
    return found


def max_difference(expected: Any, actual: Any) -> float | None:
    """Largest absolute difference between the tensors of two model outputs (None: different structure)."""
    left = [t for t in flat_tensors(expected) if isinstance(t, torch.Tensor)]
    right = [t for t in flat_tensors(actual) if isinstance(t, torch.Tensor)]
    if (
        not left
        or len(left) != len(right)
        or any(a.shape != b.shape for a, b in zip(left, right, strict=True))
    ):
        return None
    return max(
        float((a.detach().float() - b.detach().float()).abs().max()) for a, b in zip(left, right, strict=True)
    )


@dataclass(frozen=True)
class SplitPlan:
    """What `check_split` found about a boundary: what the runner needs to substitute the prefix there."""

    forms: dict[str, Callable[[torch.Tensor], Any] | None]
    interstitial: list[tuple[int, str]]
    #: the forward can stop as soon as the last prefix unit has run (it runs once per forward)
    stop_early: bool


def check_split(
    runner: PrefixRunner,
    batch: Mapping[str, Any],
    units: int,
    *,
    prefix_dropout: str,
    first_position_only: bool,
) -> SplitPlan:
    """Check on `batch` that the model can be split after prefix unit ``units - 1``; set the runner up for it.

    Raises:
        `UnsupportedPrefixError`: the prefix cannot be run apart, depends on a trainable parameter, or replacing it
            by its output changes the model's outputs.
        `ValueError`: ``prefix_dropout="forbid"`` and the prefix has dropout or batch norm.
    """
    model = runner.model
    where = f"{type(model).__name__} after its embeddings and {units - 1} blocks"
    try:
        probe = runner.capture(batch, units, stop=False, grad=True)
    except UnsupportedPrefixError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure means the split is not supported
        raise UnsupportedPrefixError(
            f"Cannot run the prefix of {where}: {type(err).__name__}: {err}"
        ) from err
    leaves = trainable_leaves(probe.boundary, runner.layout.param_names)
    if leaves:
        raise UnsupportedPrefixError(
            f"Cannot cache {where}: the prefix output depends on trainable parameters {leaves[:5]}. "
            "Freeze them, or train without the activation cache."
        )
    last = runner.layout.unit_names[units - 1]
    for name in last:
        if probe.forms.get(name) is None:
            raise UnsupportedPrefixError(
                f"Cannot cache {where}: {name} returns something other than a tensor or a (tensor, None, "
                "...) tuple, so its output cannot be replaced."
            )
    if prefix_dropout == "forbid":
        modules = dict(model.named_modules())
        names = runner.layout.module_names(units) + [n for index, n in probe.interstitial if index < units]
        active = [found for n in names for found in active_randomness(modules[n])]
        if active:
            raise ValueError(
                "prefix_dropout='forbid' but the frozen prefix has modules that act differently in "
                f"training: {active[:5]}. Set their dropout to 0, or use prefix_dropout='off' (the "
                "prefix then runs in eval mode, cached or not)."
            )
    runner.set_forms(probe.forms)
    runner.set_interstitial(probe.interstitial)
    try:
        with torch.no_grad(), eval_mode(model):
            stored = probe.boundary.detach()
            if first_position_only:  # what the cache will store: position 0, zeros after
                stored = torch.cat([stored[:, :1], torch.zeros_like(stored[:, 1:])], dim=1)
            cached = runner.run_with_slot(batch, stored, units)
    except Exception as err:  # noqa: BLE001
        raise UnsupportedPrefixError(
            f"Cannot cache {where}: the model fails when its prefix is replaced by stored hidden states "
            f"({type(err).__name__}: {err})."
        ) from err
    worst = max_difference(probe.outputs, cached)
    if worst is None or worst > 1e-4:
        raise UnsupportedPrefixError(
            f"Cannot cache {where}: replacing the prefix by its stored output changes the model's "
            f"outputs (max difference {worst}); the model uses the prefix in a way the cache cannot "
            "reproduce. Supported: BERT-family encoders (BERT, RoBERTa, DistilBERT, ELECTRA) and models "
            "that pass this check."
        )
    return SplitPlan(
        dict(probe.forms), list(probe.interstitial), all(probe.calls.get(n, 0) == 1 for n in last)
    )


def stored_difference(
    stored: torch.Tensor,
    fresh: torch.Tensor,
    mask: Any,
    *,
    seq_axis: bool,
    first_position_only: bool,
    dtype: str,
) -> float | None:
    """How far stored rows are from a fresh computation of the same examples (`None`: within tolerance).

    Padding positions may legitimately differ (some models compute them from the batch's padded length); the
    layers above never read them, so only the positions under `mask` are compared.
    """
    expected = fresh.to(stored.dtype)
    if seq_axis and first_position_only:
        stored, expected = stored[:, :1], expected[:, :1]  # the only position stored
    elif seq_axis and isinstance(mask, torch.Tensor) and mask.shape == stored.shape[:2]:
        keep = mask.bool()
        stored, expected = stored[keep], expected[keep]
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    if torch.allclose(stored, expected, atol=tolerance, rtol=tolerance * 10):
        return None
    return float((stored - expected).abs().max())

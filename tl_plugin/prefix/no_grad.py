"""Run the frozen bottom of a model without autograd: `FrozenPrefixNoGrad`.

The *frozen prefix* of a model is its ``embeddings`` group followed by the longest run of frozen blocks above
it (``blocks.0`` .. ``blocks.k-1``, see `tl_plugin.discover_layer_groups`). When every parameter of those
modules is frozen, nothing below block ``k`` needs a gradient, so `FrozenPrefixNoGrad` runs the prefix modules
under `torch.no_grad()`: autograd records nothing there and keeps no activation of theirs for the backward pass.
With ``prefix_dropout="off"`` (the default) it also runs them in eval mode, so that dropout in frozen layers is
off: the frozen prefix is then a fixed function of the input, the same one the activation cache
(`tl_plugin.prefix.ActivationCache`) stores.

The boundary is re-read at every forward: when a freeze schedule unfreezes block ``k-1``, that block runs with
gradients again at the next step. Before the first step with gradients at a new boundary, the prefix runs once
with autograd on and its outputs are checked not to depend on any trainable parameter (if they did, running it
under `torch.no_grad()` would silently drop gradients, so that raises an `UnsupportedPrefixError`).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from ..discovery import LayerGroups
from .layout import PrefixLayout
from .runner import PrefixRunner
from .verify import active_randomness, check_prefix_dropout

PrefixDropout = Literal["off", "forbid", "on"]

__all__ = ["FrozenPrefixNoGrad", "PrefixDropout"]


class FrozenPrefixNoGrad:
    """Run the frozen prefix of a model (embeddings + frozen bottom blocks) under `torch.no_grad()`.

    At every forward the frozen prefix is re-read from ``requires_grad`` (so a freeze schedule can move it);
    its modules then run without autograd, and their outputs do not require gradients. Nothing changes for the
    modules above it. Use it as a context manager, or call :meth:`remove` when done.

    Args:
        model (`torch.nn.Module`): the model, frozen by `tl_plugin.freeze` or a transfer config.
        groups (`LayerGroups`, *optional*): its layer groups; discovered when not given.
        prefix_dropout (`str`, *optional*, defaults to ``"off"``): dropout in the frozen prefix:

            - ``"off"``: the prefix modules always run in eval mode (dropout off, batch norm on its running
              statistics): the frozen prefix is a fixed function of the input, as with the activation cache;
            - ``"forbid"``: the prefix must have no dropout with p>0 and no batch norm (else a `ValueError`),
              so train and eval mode compute the same thing;
            - ``"on"``: the prefix follows the model's train/eval mode (dropout stays on in training).
        layout (`PrefixLayout`, *optional*): the model's prefix layout, when already derived.

    Raises:
        `ValueError`: for an unknown `prefix_dropout`, or ``"forbid"`` with dropout in the current prefix.
        `UnsupportedPrefixError`: when the model has no embeddings group, or (at the first training forward at
            a boundary) its prefix turns out to depend on a trainable parameter.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin import freeze_bottom_blocks
    >>> from tl_plugin.prefix import FrozenPrefixNoGrad
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> _ = freeze_bottom_blocks(model, 2)
    >>> with FrozenPrefixNoGrad(model) as no_grad:
    ...     model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([1])).loss.backward()
    ...     no_grad.frozen_blocks
    2
    >>> model.bert.embeddings.word_embeddings.weight.grad is None, model.classifier.weight.grad is not None
    (True, True)

    ```
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        groups: LayerGroups | None = None,
        prefix_dropout: PrefixDropout = "off",
        layout: PrefixLayout | None = None,
    ) -> None:
        check_prefix_dropout(prefix_dropout)
        self.model = model
        self.prefix_dropout = prefix_dropout
        self._groups = groups
        self._layout = layout
        self._runner: PrefixRunner | None = None
        self.install()

    def install(self) -> FrozenPrefixNoGrad:
        """Add the hooks (done by the constructor; again after :meth:`remove`)."""
        if self._runner is None:
            if self._layout is None:
                self._layout = PrefixLayout.of(self.model, self._groups)
            runner = PrefixRunner(self.model, self._layout, self.prefix_dropout)
            if self.prefix_dropout == "forbid":
                frozen = runner.frozen_units()
                active = [
                    found
                    for modules in self._layout.unit_modules[:frozen]
                    for module in modules
                    for found in active_randomness(module)
                ]
                if active:
                    runner.remove()
                    raise ValueError(
                        "prefix_dropout='forbid' but the frozen prefix has modules that act differently in "
                        f"training: {active[:5]}. Set their dropout to 0, or use prefix_dropout='off'."
                    )
            self._runner = runner
        return self

    def remove(self) -> None:
        """Remove the hooks: the model's original forwards again."""
        if self._runner is not None:
            self._runner.remove()
            self._runner = None

    @property
    def frozen_blocks(self) -> int | None:
        """How many blocks the frozen prefix holds right now (`None`: the embeddings are trainable)."""
        if self._runner is None:
            return None
        units = self._runner.frozen_units()
        return units - 1 if units else None

    def __enter__(self) -> FrozenPrefixNoGrad:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

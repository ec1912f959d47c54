"""Benchmark instruments: the FLOP model of a BERT-style encoder and the optimizer-state meter.

They measure what the frozen-prefix engine (`tl_plugin.prefix`) should save; they are not part of the library.
`perf_benchmark.py` imports them from here (``from instruments import EncoderFlops``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["EncoderFlops", "optimizer_state_bytes"]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of an optimizer's state (e.g. AdamW's two moments per parameter).

    Example:

    ```python
    >>> import torch
    >>> from instruments import optimizer_state_bytes
    >>> weight = torch.nn.Parameter(torch.zeros(10))
    >>> optimizer = torch.optim.AdamW([weight])
    >>> weight.grad = torch.ones(10)
    >>> optimizer.step()
    >>> optimizer_state_bytes(optimizer)  # two float32 moments of 10 values, plus the step counter
    84

    ```
    """
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


@dataclass(frozen=True)
class EncoderFlops:
    """FLOP counts of a BERT-style encoder classifier, per example, for ideal speed-up ratios.

    Per token, one encoder layer costs ``8 H^2 + 4 H I + 4 S H`` multiply-add FLOPs in its forward pass (the
    Q, K, V and output projections, the two feed-forward matmuls, and the attention scores and weighted sum
    over ``S`` positions). A backward pass costs twice its forward (gradients for the inputs and for the
    weights); a frozen layer only runs forward, a cached one not at all. The pooler (``2 H^2``) and the
    classifier (``2 H C``) run once per example. Embedding look-ups, layer norms, softmax and the optimizer
    update are not counted. A last block computed at the first position only
    (`tl_plugin.prefix.FirstTokenLastBlock`) costs ``4 S H^2`` (keys and values of every position) plus
    ``4 H^2 + 4 H I + 4 S H`` (the rest, for one position) per example.

    Args:
        hidden_size (`int`): ``H``.
        intermediate_size (`int`): ``I``.
        num_layers (`int`): the number of encoder layers.
        seq_len (`float`): ``S``, the mean padded sequence length of the batches.
        num_labels (`int`, *optional*, defaults to 2): ``C``.

    Example:

    ```python
    >>> from instruments import EncoderFlops
    >>> flops = EncoderFlops(hidden_size=384, intermediate_size=1536, num_layers=6, seq_len=64)
    >>> round(flops.training_flops(3) / flops.training_flops(3, cached=True), 3)  # half frozen: cache's limit
    1.333
    >>> round(flops.training_flops(3) / flops.training_flops(3, cached=True, first_token_last_block=True), 2)
    1.84

    ```
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    seq_len: float
    num_labels: int = 2

    @classmethod
    def from_config(cls, config: Any, seq_len: float) -> EncoderFlops:
        """Read ``H``, ``I`` and the depth of a BERT-family config (BERT, RoBERTa, ELECTRA, DistilBERT)."""
        names = (
            ("hidden_size", "dim"),
            ("intermediate_size", "hidden_dim"),
            ("num_hidden_layers", "n_layers"),
        )
        values = []
        for options in names:
            value = next(
                (getattr(config, n) for n in options if isinstance(getattr(config, n, None), int)), None
            )
            if value is None:
                raise ValueError(
                    f"`config` ({type(config).__name__}) has none of {list(options)}: EncoderFlops reads "
                    "BERT-family encoder configs."
                )
            values.append(value)
        return cls(values[0], values[1], values[2], seq_len, int(getattr(config, "num_labels", 2) or 2))

    @property
    def layer_forward(self) -> float:
        """Forward FLOPs of one layer for one example (``S`` tokens)."""
        h, i, s = self.hidden_size, self.intermediate_size, self.seq_len
        return s * (8 * h * h + 4 * h * i + 4 * s * h)

    @property
    def first_token_layer_forward(self) -> float:
        """Forward FLOPs of a layer computed at the first position only, for one example."""
        h, i, s = self.hidden_size, self.intermediate_size, self.seq_len
        return s * 4 * h * h + (4 * h * h + 4 * h * i + 4 * s * h)

    @property
    def head_forward(self) -> float:
        """Forward FLOPs of the pooler and the classifier for one example."""
        return 2 * self.hidden_size * self.hidden_size + 2 * self.hidden_size * self.num_labels

    def training_flops(
        self,
        frozen_blocks: int | None,
        cached: bool = False,
        train_pooler: bool = True,
        first_token_last_block: bool = False,
    ) -> float:
        """FLOPs of one training step on one example.

        Args:
            frozen_blocks (`int` or `None`): frozen bottom blocks (``num_layers`` for a linear probe;
                `None` or 0: everything trains).
            cached (`bool`): the frozen blocks' outputs come from the activation cache.
            train_pooler (`bool`): the pooler trains (`False` for a linear probe).
            first_token_last_block (`bool`): a trained last block runs at the first position only.
        """
        frozen = frozen_blocks or 0
        if not 0 <= frozen <= self.num_layers:
            raise ValueError(f"`frozen_blocks` must be in [0, {self.num_layers}], got {frozen_blocks!r}.")
        trained = [self.layer_forward] * (self.num_layers - frozen)
        if trained and first_token_last_block:
            trained[-1] = self.first_token_layer_forward
        layers = (0 if cached else frozen) * self.layer_forward + 3 * sum(trained)
        pooler = 2 * self.hidden_size * self.hidden_size * (3 if train_pooler else 1)
        classifier = 3 * 2 * self.hidden_size * self.num_labels
        return layers + pooler + classifier

    def ideal_speedup(
        self, frozen_blocks: int | None, cached: bool = False, first_token_last_block: bool = False
    ) -> float:
        """Full fine-tuning FLOPs / FLOPs of the given setup (a linear probe freezes the pooler too)."""
        probe = (frozen_blocks or 0) == self.num_layers
        return self.training_flops(0) / self.training_flops(
            frozen_blocks, cached, train_pooler=not probe, first_token_last_block=first_token_last_block
        )

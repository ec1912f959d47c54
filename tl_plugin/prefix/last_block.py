"""Compute the last block of a first-token classifier at the first position only.

A BERT-style sequence classifier reads one position of the last block's output: the first token (BERT's pooler
takes ``hidden_states[:, 0]``, RoBERTa's, ELECTRA's and DistilBERT's heads do the same). Every other output
position of the last block is computed, run backward through, and thrown away. Attention is the only place
where positions mix, so the last block can compute its keys and values for every position and everything else
(the query, the attention output, the feed-forward layers, the layer norms) for the first position alone:
the head sees the same numbers (to float rounding), and the last block costs about ``(4 S H^2 + 12 H^2 + 4 S
H) / (12 S H^2 + 4 S^2 H)`` of a full one (18 % for all-MiniLM-L6-v2 at 64 tokens), forward and backward.

`FirstTokenLastBlock` is a hook on the last block (`tl_plugin.prefix.hooks`); `tl_plugin.prefix.ActivationCache` adds it by
default (``last_block="auto"``) for the models listed in `FIRST_TOKEN_CLASSIFIERS`. The pruned forward only
runs while the last block has a trainable parameter: a frozen last block (a linear probe) runs in full, so the
activation cache can still store its output.

Supported block layouts: BERT (``attention.self.query/key/value``, ``attention.output``,
``intermediate``/``output``: BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA) and DistilBERT
(``attention.q_lin/k_lin/v_lin/out_lin``, ``sa_layer_norm``, ``ffn``, ``output_layer_norm``). At install, the
pruned forward is checked against the block's own forward on random hidden states (to 1e-4), so a layout that
looks right but computes something else is refused.

What changes for the caller: nothing but the base model's ``last_hidden_state``, which holds the first
position only. A call that asks for more (``output_hidden_states=True``, ``output_attentions=True``, a key/value
cache, cross-attention inputs, packed-sequence metadata) runs the last block in full, so what it returns is
complete.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..discovery import LayerGroups, discover_layer_groups
from .hooks import ModuleHook, add_hook, dispatcher_of, hooks_of, remove_hook
from .layout import PrefixLayout

logger = logging.getLogger(__name__)

LastBlock = Literal["auto", "first_token", "full"]
#: The values of ``last_block`` (`tl_plugin.prefix.ActivationCache`, `resolve_last_block`).
LAST_BLOCK_CHOICES: tuple[str, ...] = ("auto", "first_token", "full")

#: Classifiers whose head reads only the first position of the last block's output.
FIRST_TOKEN_CLASSIFIERS: frozenset[str] = frozenset(
    {
        "BertForSequenceClassification",
        "CamembertForSequenceClassification",
        "DistilBertForSequenceClassification",
        "ElectraForSequenceClassification",
        "RobertaForSequenceClassification",
        "XLMRobertaForSequenceClassification",
    }
)

_CHECK_TOLERANCE = 1e-4

__all__ = [
    "FIRST_TOKEN_CLASSIFIERS",
    "LAST_BLOCK_CHOICES",
    "FirstTokenLastBlock",
    "UnsupportedLastBlockError",
    "first_token_support",
    "resolve_last_block",
]


class UnsupportedLastBlockError(ValueError):
    """Raised when the last block of a model cannot be computed at the first position only."""


# ------------------------------------------------------------------------------------------ the computation
def _first_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float,
    scaling: float,
) -> torch.Tensor:
    """Attention of one query position (``query``: batch, heads, 1, head size) over every key position."""
    mask: torch.Tensor | None
    if attention_mask is None:
        mask = None
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:  # (batch, keys): 1 = attend
        mask = attention_mask[:, None, None, :].bool()
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:  # (batch, 1, queries, keys)
        mask = attention_mask[:, :, :1, :]
    else:
        raise UnsupportedLastBlockError(
            f"FirstTokenLastBlock cannot use an attention mask of type {type(attention_mask).__name__} "
            f"with shape {getattr(attention_mask, 'shape', None)}; it supports None, (batch, keys) and "
            "(batch, 1, queries, keys) tensors. Use last_block='full' with this attention implementation."
        )
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    batch = query.shape[0]
    return out.transpose(1, 2).reshape(batch, 1, -1)


def _heads(linear: nn.Module, hidden: torch.Tensor, head_size: int) -> torch.Tensor:
    batch, length = hidden.shape[:2]
    return linear(hidden).view(batch, length, -1, head_size).transpose(1, 2)


def _first_query_context(
    attention: Any, projections: tuple[str, str, str], training: bool, hidden_states: torch.Tensor, mask: Any
) -> torch.Tensor:
    """The attention output of position 0 over every position, from `attention`'s query/key/value layers."""
    query, key, value = (getattr(attention, name) for name in projections)
    size = attention.attention_head_size
    return _first_query_attention(
        _heads(query, hidden_states[:, :1], size),
        _heads(key, hidden_states, size),
        _heads(value, hidden_states, size),
        mask,
        attention.dropout.p if training else 0.0,
        attention.scaling,
    )


def _bert_first_token(block: Any, hidden_states: torch.Tensor, attention_mask: Any) -> torch.Tensor:
    """A BERT-layout layer (`BertLayer` and its copies) evaluated at position 0 only."""
    projections = ("query", "key", "value")
    context = _first_query_context(
        block.attention.self, projections, block.training, hidden_states, attention_mask
    )
    attended = block.attention.output(context, hidden_states[:, :1])
    return block.output(block.intermediate(attended), attended)


def _distilbert_first_token(block: Any, hidden_states: torch.Tensor, attention_mask: Any) -> torch.Tensor:
    """A DistilBERT `TransformerBlock` evaluated at position 0 only."""
    projections = ("q_lin", "k_lin", "v_lin")
    context = _first_query_context(
        block.attention, projections, block.training, hidden_states, attention_mask
    )
    attended = block.sa_layer_norm(block.attention.out_lin(context) + hidden_states[:, :1])
    return block.output_layer_norm(block.ffn(attended) + attended)


def _has(module: nn.Module, *paths: str) -> bool:
    for path in paths:
        target: Any = module
        for part in path.split("."):
            target = getattr(target, part, None)
            if target is None:
                return False
    return True


_LAYOUTS: tuple[tuple[str, tuple[str, ...], Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]], ...] = (
    (
        "BERT",
        (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.self.attention_head_size",
            "attention.self.scaling",
            "attention.self.dropout",
            "attention.output",
            "intermediate",
            "output",
        ),
        _bert_first_token,
    ),
    (
        "DistilBERT",
        (
            "attention.q_lin",
            "attention.k_lin",
            "attention.v_lin",
            "attention.out_lin",
            "attention.attention_head_size",
            "attention.scaling",
            "attention.dropout",
            "sa_layer_norm",
            "ffn",
            "output_layer_norm",
        ),
        _distilbert_first_token,
    ),
)


def _layout_of(block: nn.Module) -> Callable[[nn.Module, torch.Tensor, Any], torch.Tensor] | None:
    if getattr(block, "crossattention", None) is not None:
        return None
    for _, paths, compute in _LAYOUTS:
        if _has(block, *paths):
            return compute
    return None


#: Block keyword arguments that do not change what the block computes (the Trainer's loss normaliser, and
#: position ids that BERT-style layers do not read).
_IGNORED_KWARGS = frozenset({"num_items_in_batch", "position_ids"})


def _only_defaults(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the extra arguments of a block call are all unset (``None``/``False``): no cross-attention
    inputs, no key/value cache, no packed-sequence metadata, nothing to record."""
    extra = (*args, *(value for key, value in kwargs.items() if key not in _IGNORED_KWARGS))
    return all(value is None or value is False for value in extra)


# ------------------------------------------------------------------------------------------ support checks
def _last_block(model: nn.Module, groups: LayerGroups) -> nn.Module | None:
    if not groups.blocks or groups.blocks[-1].module_name is None:
        return None
    return model.get_submodule(groups.blocks[-1].module_name)


def first_token_support(model: nn.Module, groups: LayerGroups | None = None) -> str | None:
    """Why `model`'s last block cannot be computed at the first position only, or `None` when it can.

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification
    >>> from tl_plugin.prefix import first_token_support
    >>> config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    >>> first_token_support(BertForSequenceClassification(config)) is None
    True
    >>> print(first_token_support(BertForTokenClassification(config)))  # doctest: +ELLIPSIS
    BertForTokenClassification is not a first-token classifier (its head may read every position); ...

    ```
    """
    found = _supported_last_block(model, groups if groups is not None else discover_layer_groups(model))
    return found if isinstance(found, str) else None


def _supported_last_block(
    model: nn.Module, groups: LayerGroups
) -> str | tuple[nn.Module, Callable[[Any, torch.Tensor, Any], torch.Tensor]]:
    """The last block and its first-position forward, or why there is none."""
    name = type(model).__name__
    if name not in FIRST_TOKEN_CLASSIFIERS:
        return (
            f"{name} is not a first-token classifier (its head may read every position); supported: "
            f"{', '.join(sorted(FIRST_TOKEN_CLASSIFIERS))}."
        )
    block = _last_block(model, groups)
    if block is None:
        return f"{name} has no block stack (layer groups: {groups.summary()})."
    compute = _layout_of(block)
    if compute is None:
        layouts = ", ".join(layout for layout, _, _ in _LAYOUTS)
        return f"the last block of {name} ({type(block).__name__}) has none of the known layouts ({layouts})."
    return block, compute


def resolve_last_block(
    model: nn.Module,
    last_block: str,
    groups: LayerGroups | None = None,
    *,
    layout: PrefixLayout | None = None,
) -> FirstTokenLastBlock | None:
    """Install `FirstTokenLastBlock` on `model` as `last_block` asks, and return it (`None`: full last block).

    Args:
        model (`torch.nn.Module`): the classifier.
        last_block (`str`): ``"auto"`` (first position only when `first_token_support` allows it, else the
            full block), ``"first_token"`` (required: an `UnsupportedLastBlockError` when not supported) or
            ``"full"`` (leave the model alone).
        groups (`LayerGroups`, *optional*): the model's layer groups; discovered when not given.
        layout (`PrefixLayout`, *optional*): the model's prefix layout, when already derived (its groups are used).
    """
    if last_block not in LAST_BLOCK_CHOICES:
        raise ValueError(
            f"`last_block` must be one of {', '.join(map(repr, LAST_BLOCK_CHOICES))}, got {last_block!r}."
        )
    if last_block == "full":
        return None
    groups = layout.groups if layout is not None else groups
    groups = groups if groups is not None else discover_layer_groups(model)
    reason = first_token_support(model, groups)
    if reason is not None:
        if last_block == "first_token":
            raise UnsupportedLastBlockError(f"last_block='first_token' is not possible: {reason}")
        logger.info("Computing the last block in full: %s", reason)
        return None
    return FirstTokenLastBlock(model, groups=groups)


# ------------------------------------------------------------------------------------------ public API
class FirstTokenLastBlock:
    """Compute the last block of a first-token classifier at the first position only (see the module docstring).

    While installed, a forward of the model computes the last block's keys and values for every position and
    the rest of the block for the first position; the classifier's logits, loss and gradients are the same as
    without it (to float rounding). Only while the last block has a trainable parameter: a frozen last block
    runs in full. Use it as a context manager, or call :meth:`remove` when done.

    Args:
        model (`torch.nn.Module`): a first-token classifier (one of `FIRST_TOKEN_CLASSIFIERS`).
        groups (`LayerGroups`, *optional*): its layer groups; discovered when not given.

    Raises:
        `UnsupportedLastBlockError`: when the model is not a first-token classifier, its last block has no
            known layout, or the pruned forward disagrees with the block's own forward on random hidden states.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin.prefix import FirstTokenLastBlock
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    ... ).eval()
    >>> batch = {"input_ids": torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]),
    ...          "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    >>> full = model(**batch).logits
    >>> with FirstTokenLastBlock(model) as pruned:
    ...     fast = model(**batch)
    ...     features = model(**batch, output_hidden_states=True)  # asks for every position: a full block
    >>> bool((fast.logits - full).abs().max() < 1e-5), pruned.calls
    (True, 1)
    >>> tuple(features.hidden_states[-1].shape)
    (2, 4, 32)

    ```
    """

    def __init__(
        self, model: nn.Module, *, groups: LayerGroups | None = None, layout: PrefixLayout | None = None
    ) -> None:
        groups = layout.groups if layout is not None else groups
        groups = groups if groups is not None else discover_layer_groups(model)
        found = _supported_last_block(model, groups)
        if isinstance(found, str):
            raise UnsupportedLastBlockError(f"FirstTokenLastBlock cannot be used: {found}")
        block, compute = found
        self.model = model
        self.block = block
        self.block_name = groups.blocks[-1].module_name
        self._compute = compute
        self._hook: _FirstTokenHook | None = None
        #: Forwards of the last block computed at the first position only.
        self.calls = 0
        self._check_against_full_block()
        self.install()

    @property
    def installed(self) -> bool:
        return self._hook is not None

    @property
    def _patched(self) -> Any:
        """The instance-level forward of the last block while this is installed (its hook dispatcher)."""
        return dispatcher_of(self.block) if self._hook is not None else None

    @property
    def active(self) -> bool:
        """Whether the last block runs at the first position only right now (installed and trainable)."""
        return self.installed and self._trainable()

    def _trainable(self) -> bool:
        return any(p.requires_grad for p in self.block.parameters())

    def install(self) -> FirstTokenLastBlock:
        """Add the hook to the last block (done by the constructor; again after :meth:`remove`)."""
        if self._hook is None:
            self._hook = _FirstTokenHook(self)
            add_hook(self.block, self._hook)
        return self

    def remove(self) -> None:
        """Remove the hook: the last block's own ``forward`` again."""
        if self._hook is None:
            return
        if any(h is self._hook for h in hooks_of(self.block)):
            remove_hook(self.block, self._hook)
        self._hook = None

    def __enter__(self) -> FirstTokenLastBlock:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _check_against_full_block(self) -> None:
        """Compare the pruned forward with the block's own on random hidden states, in eval mode."""
        block: Any = self.block
        reference = next(block.parameters(), None)
        device = reference.device if reference is not None else torch.device("cpu")
        dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
        hidden_size = getattr(getattr(block, "output_layer_norm", None), "normalized_shape", None)
        if hidden_size is None:
            hidden_size = block.output.LayerNorm.normalized_shape
        generator = torch.Generator(device="cpu").manual_seed(0)
        hidden = torch.randn(2, 5, *hidden_size, generator=generator).to(device=device, dtype=dtype)
        mask = torch.ones(2, 5, dtype=torch.long, device=device)
        mask[1, 3:] = 0
        additive = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        was_training = block.training
        block.eval()
        try:
            with torch.no_grad():
                expected = block(hidden, additive)
                expected = expected[0] if isinstance(expected, tuple) else expected
                actual = self._compute(block, hidden, additive)
        except Exception as err:  # noqa: BLE001 - any failure means the layout is not what it looks like
            raise UnsupportedLastBlockError(
                f"FirstTokenLastBlock cannot run the last block of {type(self.model).__name__} "
                f"({type(block).__name__}): {type(err).__name__}: {err}"
            ) from err
        finally:
            block.train(was_training)
        worst = float((expected[:, :1] - actual).abs().max())
        if not worst <= _CHECK_TOLERANCE:
            raise UnsupportedLastBlockError(
                f"FirstTokenLastBlock: the first-position forward of {type(block).__name__} differs from the "
                f"block's own forward by {worst:.3g} (> {_CHECK_TOLERANCE}); use last_block='full'."
            )


class _FirstTokenHook(ModuleHook):
    """The hook of `FirstTokenLastBlock`: the first-position forward when the call asks for nothing more."""

    def __init__(self, owner: FirstTokenLastBlock) -> None:
        self.owner = owner

    def forward(
        self, module: nn.Module, call_next: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        owner = self.owner
        hidden_states = args[0] if args else kwargs.get("hidden_states")
        rest = args[2:] if len(args) > 2 else ()
        if len(args) >= 2:
            attention_mask = args[1]
            extra = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        else:
            attention_mask = kwargs.get("attention_mask")
            extra = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "attention_mask")}
        if (
            not _only_defaults(rest, extra)
            or not isinstance(hidden_states, torch.Tensor)
            or hidden_states.dim() != 3
            or not owner._trainable()
        ):
            return call_next(*args, **kwargs)
        owner.calls += 1
        return owner._compute(module, hidden_states, attention_mask)

"""Freezing utilities: freeze / unfreeze layer groups, blocks by index and parameters by name pattern.

Selectors (strings) understood by :func:`select_parameters`, :func:`freeze` and :func:`unfreeze`:

- a group name: ``"embeddings"``, ``"other"``, ``"head"``, ``"adapters"``, ``"blocks"`` (all blocks);
- one block or an inclusive range: ``"blocks.3"``, ``"blocks.0-3"``; negative indices count from the top:
  ``"blocks.-1"`` is the top block;
- a Python slice over the blocks: ``"blocks[:3]"`` (bottom 3), ``"blocks[-2:]"`` (top 2);
- a glob over parameter names: ``"*.attention.*"``, ``"bert.encoder.layer.1.*"`` (any selector holding ``*``,
  ``?`` or ``[`` that is not a blocks slice);
- a regex over parameter names with the ``re:`` prefix: ``"re:.*\\.(query|key)\\.weight"``;
- ``"batchnorm"``: the affine ``weight`` / ``bias`` of every BatchNorm layer (any ``_BatchNorm`` subclass), wherever
  it sits: ``unfreeze(model, "batchnorm")``, or ``train_groups=[..., "batchnorm"]`` in a `TransferConfig`, keeps
  them trainable inside frozen groups (fastai's and Lightning's ``train_bn``; see ``train_batchnorm=``).

A selector that matches nothing raises a `ValueError` naming the valid groups. PEFT adapter parameters are never
touched unless ``"adapters"`` is named explicitly.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .discovery import LayerGroups, discover_layer_groups

_BLOCK_INDEX = re.compile(r"blocks\.(-?\d+)")
_BLOCK_RANGE = re.compile(r"blocks\.(\d+)-(\d+)")
_BLOCK_SLICE = re.compile(r"blocks\[(-?\d*):(-?\d*)\]")

Selector = str

#: The selector of every BatchNorm layer's affine parameters.
BATCHNORM_SELECTOR = "batchnorm"


class NoTrainableParametersError(ValueError):
    """Raised when an operation would leave a model with no trainable parameter."""


def batchnorm_affine_names(model: nn.Module) -> list[str]:
    """Names of the affine ``weight`` / ``bias`` of every BatchNorm layer of `model` (every `_BatchNorm` subclass:
    BatchNorm1d/2d/3d, SyncBatchNorm, the lazy variants), in the model's parameter order.

    Example:

    ```python
    >>> from torch import nn
    >>> from tl_plugin.freezing import batchnorm_affine_names
    >>> batchnorm_affine_names(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False)))
    ['1.weight', '1.bias']

    ```
    """
    owned = {
        id(param)
        for module in model.modules()
        if isinstance(module, _BatchNorm)
        for param in module.parameters(recurse=False)
    }
    return [name for name, param in model.named_parameters() if id(param) in owned]


def _groups_for(model: nn.Module, groups: LayerGroups | None) -> LayerGroups:
    return groups if groups is not None else discover_layer_groups(model)


def _valid_selectors_hint(groups: LayerGroups) -> str:
    n = groups.num_blocks
    blocks_hint = (
        f"blocks (0-{n - 1}, e.g. 'blocks.0', 'blocks.0-{max(n - 1, 0)}', 'blocks[-2:]')" if n else "none"
    )
    names = [g.name for g in groups.groups if g.kind != "block"]
    return (
        f"valid groups: {', '.join(names) or 'none'}; {blocks_hint}; 'batchnorm' (BatchNorm affine parameters); or a "
        f"parameter-name glob ('*.attention.*') or regex ('re:...')"
    )


def _block_indices(selector: str, groups: LayerGroups) -> list[int] | None:
    n = groups.num_blocks
    if selector == "blocks":
        return list(range(n))
    if match := _BLOCK_RANGE.fullmatch(selector):
        first, last = int(match.group(1)), int(match.group(2))
        if first > last or last >= n:
            raise ValueError(
                f"Block range {selector!r} is out of range: this model has {n} blocks (blocks.0-{n - 1}); "
                f"{_valid_selectors_hint(groups)}."
            )
        return list(range(first, last + 1))
    if match := _BLOCK_INDEX.fullmatch(selector):
        index = int(match.group(1))
        if not -n <= index < n:
            raise ValueError(
                f"Block {selector!r} is out of range: this model has {n} blocks (blocks.0-{n - 1}); "
                f"{_valid_selectors_hint(groups)}."
            )
        return [index % n]
    if match := _BLOCK_SLICE.fullmatch(selector):
        start = int(match.group(1)) if match.group(1) else None
        stop = int(match.group(2)) if match.group(2) else None
        return list(range(n))[slice(start, stop)]
    return None


def select_parameters(
    model: nn.Module, selectors: Selector | Sequence[Selector], groups: LayerGroups | None = None
) -> list[str]:
    """Names of the parameters matched by `selectors` (see the module docstring for the syntax).

    Args:
        model (`torch.nn.Module`): the model.
        selectors (`str` or `list[str]`): one selector or several (their union).
        groups (`LayerGroups`, *optional*): the model's groups; discovered when not given.

    Returns:
        `list[str]`: the matched parameter names, in the model's order, without PEFT adapter parameters unless
        ``"adapters"`` was named, and never the inactive pretrained copy that PEFT keeps of a ``modules_to_save``
        layer (``...original_module...``: it is not used in the forward pass, so it would get no gradient).

    Raises:
        `ValueError`: when a selector matches nothing, naming the valid groups.
    """
    groups = _groups_for(model, groups)
    if isinstance(selectors, str):
        selectors = [selectors]
    all_names = [name for name, _ in model.named_parameters()]
    adapters = set(groups.get("adapters").param_names) if "adapters" in groups.names else set()
    unused = inactive_peft_copies(model)
    chosen: set[str] = set()
    for selector in selectors:
        matched = _match_selector(selector, groups, all_names, model) - unused
        if selector != "adapters":
            matched -= adapters
        if not matched:
            raise ValueError(
                f"Selector {selector!r} matches no parameter of this model; {_valid_selectors_hint(groups)}."
            )
        chosen |= matched
    return [name for name in all_names if name in chosen]


def inactive_peft_copies(model: nn.Module) -> set[str]:
    """Parameter names of the pretrained copies PEFT keeps beside a trained ``modules_to_save`` layer.

    A PEFT ``ModulesToSaveWrapper`` holds ``original_module`` (the pretrained layer, unused while the adapter is
    active) and ``modules_to_save.<adapter>`` (the copy that trains). Selections leave the original out, so that
    unfreezing ``head`` does not mark a parameter trainable that never gets a gradient.
    """
    names: set[str] = set()
    for module_name, module in model.named_modules():
        original = getattr(module, "original_module", None)
        if isinstance(original, nn.Module) and isinstance(getattr(module, "modules_to_save", None), nn.Module):
            prefix = f"{module_name}.original_module." if module_name else "original_module."
            names |= {prefix + name for name, _ in original.named_parameters()}
    return names


def _match_selector(selector: str, groups: LayerGroups, all_names: list[str], model: nn.Module) -> set[str]:
    if not isinstance(selector, str) or not selector:
        raise ValueError(
            f"A selector must be a non-empty string, got {selector!r}; {_valid_selectors_hint(groups)}."
        )
    indices = _block_indices(selector, groups)
    if indices is not None:
        return {p for i in indices for p in groups.blocks[i].param_names}
    if selector in groups.names:
        return set(groups.get(selector).param_names)
    if selector == BATCHNORM_SELECTOR:
        return set(batchnorm_affine_names(model))
    if selector in ("embeddings", "other", "head", "adapters"):
        return set()  # a known kind this model does not have: reported as "matches nothing"
    if selector.startswith("re:"):
        try:
            pattern = re.compile(selector[3:])
        except re.error as err:
            raise ValueError(
                f"Selector {selector!r} is not a valid regex: {err}; {_valid_selectors_hint(groups)}."
            ) from err
        return {name for name in all_names if pattern.fullmatch(name)}
    if any(ch in selector for ch in "*?["):
        return {name for name in all_names if fnmatch.fnmatchcase(name, selector)}
    raise ValueError(f"Unknown selector {selector!r}; {_valid_selectors_hint(groups)}.")


def _set_requires_grad(model: nn.Module, names: Iterable[str], flag: bool) -> None:
    wanted = set(names)
    for name, param in model.named_parameters():
        if name in wanted:
            param.requires_grad_(flag)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def _check_some_trainable(model: nn.Module, allow_no_trainable: bool, action: str) -> None:
    if allow_no_trainable:
        return
    if not any(p.requires_grad for p in model.parameters()):
        raise NoTrainableParametersError(
            f"{action} leaves the model with no trainable parameters. Unfreeze something (e.g. 'head'), or pass "
            f"`allow_no_trainable=True` if this is intended."
        )


def freeze(
    model: nn.Module,
    selectors: Selector | Sequence[Selector],
    *,
    groups: LayerGroups | None = None,
    allow_no_trainable: bool = False,
    train_batchnorm: bool = False,
) -> list[str]:
    """Freeze (``requires_grad=False``) the parameters matched by `selectors`.

    Args:
        model (`torch.nn.Module`): the model.
        selectors (`str` or `list[str]`): what to freeze, e.g. ``"embeddings"``, ``["blocks[:3]", "*.bias"]``.
        groups (`LayerGroups`, *optional*): the model's groups; discovered when not given.
        allow_no_trainable (`bool`, *optional*, defaults to `False`):
            allow freezing the last trainable parameter (otherwise a `NoTrainableParametersError`; the model is
            left unchanged).
        train_batchnorm (`bool`, *optional*, defaults to `False`):
            keep the affine ``weight`` / ``bias`` of the BatchNorm layers inside the selection trainable (they are
            set to ``requires_grad=True``): fastai's and Lightning's ``train_bn``. Off by default: a frozen group is
            then frozen whole (see docs/regularisation-and-imbalance.md for why, and for the measurement).

    Returns:
        `list[str]`: the names of the parameters frozen (the matched ones, less the BatchNorm affine parameters with
        `train_batchnorm`).

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin import freeze, trainable_report
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> _ = freeze(model, ["embeddings", "blocks[:2]"])
    >>> [row.group for row in trainable_report(model).rows if row.trainable == 0]
    ['embeddings', 'blocks.0', 'blocks.1']

    ```
    """
    _check_bool("train_batchnorm", train_batchnorm)
    groups = _groups_for(model, groups)
    names = select_parameters(model, selectors, groups)
    kept = set(batchnorm_affine_names(model)) & set(names) if train_batchnorm else set()
    names = [n for n in names if n not in kept]
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    _set_requires_grad(model, names, False)
    _set_requires_grad(model, kept, True)
    try:
        _check_some_trainable(
            model,
            allow_no_trainable,
            f"Freezing {list(selectors) if not isinstance(selectors, str) else selectors!r}",
        )
    except NoTrainableParametersError:
        for name, param in model.named_parameters():
            param.requires_grad_(before[name])
        raise
    return names


def unfreeze(
    model: nn.Module, selectors: Selector | Sequence[Selector], *, groups: LayerGroups | None = None
) -> list[str]:
    """Unfreeze (``requires_grad=True``) the parameters matched by `selectors`; returns their names."""
    names = select_parameters(model, selectors, _groups_for(model, groups))
    _set_requires_grad(model, names, True)
    return names


def freeze_all_but(
    model: nn.Module,
    trainable: Selector | Sequence[Selector],
    *,
    groups: LayerGroups | None = None,
    train_batchnorm: bool = False,
) -> list[str]:
    """Make exactly the parameters matched by `trainable` trainable (adapters untouched); returns their names.

    With ``train_batchnorm=True`` the affine parameters of every BatchNorm layer train too (as if ``"batchnorm"``
    were one of the selectors; see :func:`freeze`).
    """
    _check_bool("train_batchnorm", train_batchnorm)
    groups = _groups_for(model, groups)
    names = set(select_parameters(model, trainable, groups))
    if train_batchnorm:
        names |= set(batchnorm_affine_names(model))
    adapters = set(groups.get("adapters").param_names) if "adapters" in groups.names else set()
    for name, param in model.named_parameters():
        if name not in adapters:
            param.requires_grad_(name in names)
    return [n for n, _ in model.named_parameters() if n in names]


def freeze_to(
    model: nn.Module, n: int, *, groups: LayerGroups | None = None, train_batchnorm: bool = False
) -> list[str]:
    """fastai-style: freeze the first `n` groups of :meth:`LayerGroups.ordered`, unfreeze the rest.

    ``freeze_to(model, -1)`` trains only the last group (the head), ``freeze_to(model, 0)`` trains everything.

    Args:
        model (`torch.nn.Module`): the model.
        n (`int`): number of groups to freeze from the bottom; negative counts from the top.
        groups (`LayerGroups`, *optional*): the model's groups; discovered when not given.
        train_batchnorm (`bool`, *optional*, defaults to `False`): keep the BatchNorm affine parameters of the
            frozen groups trainable (see :func:`freeze`).

    Returns:
        `list[str]`: the names of the trainable groups.

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin import freeze_to
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> freeze_to(model, -2)
    ['other', 'head']

    ```
    """
    groups = _groups_for(model, groups)
    ordered = groups.ordered()
    count = len(ordered)
    if not isinstance(n, int) or isinstance(n, bool) or not -count < n < count:
        raise ValueError(
            f"`n` must be an integer in [{-count + 1}, {count - 1}] for this model's {count} groups "
            f"({', '.join(g.name for g in ordered)}), got {n!r}."
        )
    _check_bool("train_batchnorm", train_batchnorm)
    trainable = ordered[n:]
    for group in ordered:
        _set_requires_grad(model, group.param_names, group in trainable)
    if train_batchnorm:
        _set_requires_grad(model, batchnorm_affine_names(model), True)
    return [g.name for g in trainable]


def freeze_bottom_blocks(
    model: nn.Module,
    n: int,
    *,
    include_embeddings: bool = True,
    groups: LayerGroups | None = None,
    train_batchnorm: bool = False,
) -> list[str]:
    """Freeze the bottom `n` blocks (and the embeddings, by default); returns the frozen parameter names.
    ``train_batchnorm=True`` keeps their BatchNorm affine parameters trainable (see :func:`freeze`)."""
    groups = _groups_for(model, groups)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= groups.num_blocks:
        raise ValueError(
            f"`n` must be an integer in [0, {groups.num_blocks}] (the number of blocks), got {n!r}."
        )
    selectors = ([f"blocks[:{n}]"] if n else []) + (
        ["embeddings"] if include_embeddings and "embeddings" in groups.names else []
    )
    if not selectors:
        return []
    return freeze(model, selectors, groups=groups, train_batchnorm=train_batchnorm)


@dataclass(frozen=True)
class GroupReportRow:
    """One row of a :class:`TrainableReport`."""

    group: str
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


@dataclass(frozen=True)
class TrainableReport:
    """Trainable / total parameter counts per layer group, as a table (``str(report)``) or a dict (for logging)."""

    rows: tuple[GroupReportRow, ...]

    @property
    def trainable(self) -> int:
        return sum(r.trainable for r in self.rows)

    @property
    def total(self) -> int:
        return sum(r.total for r in self.rows)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def trainable_groups(self) -> list[str]:
        return [r.group for r in self.rows if r.trainable]

    @property
    def frozen_groups(self) -> list[str]:
        return [r.group for r in self.rows if r.total and not r.trainable]

    def to_dict(self, prefix: str = "trainable_params") -> dict[str, float]:
        """Flat numeric dict for `Trainer.log`: ``{"trainable_params/trainable": .., "trainable_params/blocks.0": ..}``.

        ``<prefix>/trainable`` and ``<prefix>/total`` are the trainable and total parameter counts, ``<prefix>/percent``
        their ratio, and ``<prefix>/<group>`` the trainable count of each group.
        """
        out: dict[str, float] = {
            f"{prefix}/trainable": float(self.trainable),
            f"{prefix}/total": float(self.total),
            f"{prefix}/percent": round(self.percent, 4),
        }
        for row in self.rows:
            out[f"{prefix}/{row.group}"] = float(row.trainable)
        return out

    def to_table(self) -> str:
        header = f"{'group':<14}{'trainable':>14}{'total':>14}{'%':>9}"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            lines.append(f"{row.group:<14}{row.trainable:>14,}{row.total:>14,}{row.percent:>8.1f}%")
        lines.append("-" * len(header))
        lines.append(f"{'all':<14}{self.trainable:>14,}{self.total:>14,}{self.percent:>8.1f}%")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


def trainable_report(model: nn.Module, groups: LayerGroups | None = None) -> TrainableReport:
    """Per-group trainable/total parameter counts of `model`.

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin import trainable_report
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> report = trainable_report(model)
    >>> report.percent
    100.0
    >>> print(str(report).splitlines()[0])
    group              trainable         total        %

    ```
    """
    groups = _groups_for(model, groups)
    params = dict(model.named_parameters())
    rows = []
    for group in groups:
        total = sum(params[n].numel() for n in group.param_names)
        trainable = sum(params[n].numel() for n in group.param_names if params[n].requires_grad)
        rows.append(GroupReportRow(group.name, trainable, total))
    return TrainableReport(tuple(rows))


def requires_grad_map(model: nn.Module) -> dict[str, bool]:
    """``{parameter name: requires_grad}`` for every parameter (names only: safe to save)."""
    return {name: param.requires_grad for name, param in model.named_parameters()}


def load_requires_grad_map(model: nn.Module, mapping: dict[str, bool]) -> None:
    """Restore a map saved by :func:`requires_grad_map`; unknown names are an error listing a few of them."""
    params = dict(model.named_parameters())
    unknown = [n for n in mapping if n not in params]
    if unknown:
        raise ValueError(f"The saved requires_grad map names parameters this model lacks: {unknown[:5]}.")
    for name, flag in mapping.items():
        params[name].requires_grad_(bool(flag))

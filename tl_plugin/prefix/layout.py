"""The layout of a model's frozen prefix, derived once from its layer groups and passed to every hook.

The prefix is cut into *units*: unit 0 is the ``embeddings`` group (one or more modules), unit ``j`` is block
``j - 1``. The *frozen prefix* is the longest run of units, from the bottom, whose parameters are all frozen.

Example:

```python
>>> from transformers import BertConfig, BertForSequenceClassification
>>> from tl_plugin import freeze_bottom_blocks
>>> from tl_plugin.prefix.layout import PrefixLayout
>>> model = BertForSequenceClassification(
...     BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37)
... )
>>> layout = PrefixLayout.of(model)
>>> layout.unit_names[:2], layout.last_block_name
([['bert.embeddings'], ['bert.encoder.layer.0']], 'bert.encoder.layer.3')
>>> _ = freeze_bottom_blocks(model, 2)
>>> layout.frozen_units()  # the embeddings and two blocks
3

```
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..discovery import LayerGroups, discover_layer_groups

__all__ = ["FrozenPrefix", "PrefixLayout", "UnsupportedPrefixError", "find_frozen_prefix"]


class UnsupportedPrefixError(ValueError):
    """Raised when the frozen prefix of a model cannot be run (or cached) apart from the rest of the model."""


def _embedding_module_names(model: nn.Module, groups: LayerGroups) -> list[str]:
    """The outermost modules that hold only ``embeddings`` parameters, in registration order."""
    if "embeddings" not in groups.names:
        return []
    embedding = set(groups.get("embeddings").param_names)
    mixed: set[str] = set()  # module paths holding at least one parameter outside the embeddings group
    for name, _ in model.named_parameters():
        if name in embedding:
            continue
        parts = name.split(".")[:-1]
        for i in range(len(parts) + 1):
            mixed.add(".".join(parts[:i]))
    chosen: list[str] = []
    for name in groups.get("embeddings").param_names:
        parts = name.split(".")[:-1]
        top = None
        for i in range(1, len(parts) + 1):
            path = ".".join(parts[:i])
            if path not in mixed:
                top = path
                break
        if top is not None and top not in chosen:
            chosen.append(top)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(chosen, key=lambda n: order.get(n, len(order)))


class PrefixLayout:
    """The units of `model`'s prefix: their module paths, modules and parameters (see the module docstring).

    Each unit lists every parameter it owns (the group's parameters and any parameter inside its modules, such as
    a PEFT adapter): a unit counts as frozen only when all of them are.

    Args:
        model (`torch.nn.Module`): the model.
        groups (`LayerGroups`): its layer groups.

    Raises:
        `UnsupportedPrefixError`: when the model has no ``embeddings`` group.
    """

    def __init__(self, model: nn.Module, groups: LayerGroups) -> None:
        embedding_names = _embedding_module_names(model, groups)
        if not embedding_names:
            raise UnsupportedPrefixError(
                f"{type(model).__name__} has no `embeddings` layer group (groups: {groups.summary()}): the "
                "frozen prefix starts at the embeddings, so there is nothing to run apart."
            )
        self.model = model
        self.groups = groups
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        self.unit_names: list[list[str]] = [embedding_names] + [[b.module_name or ""] for b in groups.blocks]
        owned_names = [groups.get("embeddings").param_names] + [b.param_names for b in groups.blocks]
        self.unit_modules: list[list[nn.Module]] = []
        self.unit_params: list[list[nn.Parameter]] = []
        for names, owned in zip(self.unit_names, owned_names, strict=True):
            mods = [modules[n] for n in names]
            found: dict[int, nn.Parameter] = {}
            for module in mods:
                for p in module.parameters():
                    found.setdefault(id(p), p)
            for n in owned:
                found.setdefault(id(params[n]), params[n])
            self.unit_modules.append(mods)
            self.unit_params.append(list(found.values()))
        #: Parameter names by `id` of the parameter (for messages about what a prefix depends on).
        self.param_names: dict[int, str] = {id(p): n for n, p in model.named_parameters()}

    @classmethod
    def of(cls, model: nn.Module, groups: LayerGroups | None = None) -> PrefixLayout:
        """The layout of `model` (its layer groups discovered when not given)."""
        return cls(model, groups if groups is not None else discover_layer_groups(model))

    @property
    def num_units(self) -> int:
        return len(self.unit_names)

    @property
    def last_block_name(self) -> str | None:
        """The module path of the last block (`None`: no block stack)."""
        blocks = self.groups.blocks
        return blocks[-1].module_name if blocks else None

    @property
    def last_block(self) -> nn.Module | None:
        name = self.last_block_name
        return dict(self.model.named_modules()).get(name) if name is not None else None

    def frozen_units(self) -> int:
        """How many units (embeddings, then blocks) are frozen from the bottom right now."""
        for index, params in enumerate(self.unit_params):
            for p in params:
                if p.requires_grad:
                    return index
        return len(self.unit_params)

    def module_names(self, units: int) -> list[str]:
        """The module paths of the first `units` units."""
        return [name for names in self.unit_names[:units] for name in names]


@dataclass(frozen=True)
class FrozenPrefix:
    """The frozen bottom of a model: the ``embeddings`` modules and the first `num_blocks` blocks, all frozen.

    Args:
        num_blocks (`int`): how many blocks (from the bottom) are frozen above the frozen embeddings.
        total_blocks (`int`): how many blocks the model has.
        module_names (`tuple[str, ...]`): the module paths of the prefix (embeddings modules, then blocks).
    """

    num_blocks: int
    total_blocks: int
    module_names: tuple[str, ...]


def find_frozen_prefix(
    model: nn.Module, groups: LayerGroups | None = None, *, layout: PrefixLayout | None = None
) -> FrozenPrefix | None:
    """The frozen prefix of `model`, or `None` when its embeddings are trainable (or it has no embeddings).

    Args:
        model (`torch.nn.Module`): the model.
        groups (`LayerGroups`, *optional*): its layer groups; discovered when not given.
        layout (`PrefixLayout`, *optional*): its layout, when already derived.

    Returns:
        `FrozenPrefix` or `None`.

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin import freeze_bottom_blocks
    >>> from tl_plugin.prefix import find_frozen_prefix
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> find_frozen_prefix(model) is None
    True
    >>> _ = freeze_bottom_blocks(model, 2)
    >>> find_frozen_prefix(model).module_names
    ('bert.embeddings', 'bert.encoder.layer.0', 'bert.encoder.layer.1')

    ```
    """
    layout = layout if layout is not None else PrefixLayout.of(model, groups)
    frozen = layout.frozen_units()
    if frozen == 0:
        return None
    return FrozenPrefix(
        num_blocks=frozen - 1,
        total_blocks=layout.groups.num_blocks,
        module_names=tuple(layout.module_names(frozen)),
    )

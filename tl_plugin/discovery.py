"""Layer discovery: find a model's ordered layer groups (embeddings → blocks → other → head).

The discovery is generic: it looks for the *block stacks* of a model (the outermost `nn.ModuleList` /
`nn.Sequential` containers whose children are repeated modules of one class, each holding parameters), numbers
their elements in registration order (encoder stack before decoder stack, feature encoder before transformer),
and sorts every parameter outside the blocks into one of:

- ``embeddings``: the input stem — parameters registered before the first block, or whose module path contains
  ``embed`` (token/position/patch embeddings, a Whisper decoder's token embeddings, ...);
- ``head``: the task head — for a `PreTrainedModel`, everything outside its base model (``classifier``,
  ``score``, ``qa_outputs``, an untied ``lm_head``), plus a classifier that lives *inside* the base model and that
  the base model reports through timm's ``get_classifier()`` (``TimmWrapperForImageClassification``: its base
  model ``timm_model`` is the whole timm model, classifier included); otherwise modules named like a head;
- ``other``: everything else (final norms, poolers, projections between stacks);
- ``adapters``: parameters of PEFT adapters (LoRA, IA3, ...), which the freezing utilities never touch.

Every parameter of the model lands in exactly one group. ALBERT shares one set of layer weights across all its
hidden layers: its stack is ``albert_layer_groups`` (``num_hidden_groups`` elements, one by default), so an ALBERT
model has as many blocks as hidden groups, not as hidden layers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

GroupKind = Literal["embeddings", "block", "other", "head", "adapters"]

#: Module names (last path component) treated as a task head when the model has no separate base model.
HEAD_MODULE_NAMES = (
    "classifier",
    "score",
    "lm_head",
    "qa_outputs",
    "head",
    "heads",
    "cls",
    "fc",
    "proj_out",
    "projector",
    "pre_classifier",
)

#: Parameter-name pattern of PEFT adapter weights.
ADAPTER_PARAMETER_PATTERN = re.compile(
    r"(^|\.)(lora_[A-Za-z_]+|ia3_l|vera_lambda_[a-z]|oft_r|boft_R|boft_s|hada_w[12]_[ab]|lokr_w[12](_[ab])?|"
    r"adaption_prompt|adaption_gate|prompt_encoder)(\.|$)"
)


class LayerDiscoveryError(ValueError):
    """Raised when the block stack of a model cannot be found, or an override matches nothing."""


@dataclass(frozen=True)
class LayerGroup:
    """One group of parameters, identified by *names* only (safe to store and to send across processes).

    Args:
        name (`str`): ``"embeddings"``, ``"blocks.<i>"``, ``"other"``, ``"head"`` or ``"adapters"``.
        kind (`str`): the group kind, one of ``embeddings``, ``block``, ``other``, ``head``, ``adapters``.
        param_names (`tuple[str, ...]`): the names (as in `model.named_parameters()`) of the group's parameters.
        index (`int`, *optional*): the block index, for blocks only.
        module_name (`str`, *optional*): the module path of a block (e.g. ``"bert.encoder.layer.3"``).
        stack (`str`, *optional*): the module path of the stack the block belongs to (e.g. ``"bert.encoder.layer"``).
    """

    name: str
    kind: GroupKind
    param_names: tuple[str, ...]
    index: int | None = None
    module_name: str | None = None
    stack: str | None = None


@dataclass(frozen=True)
class LayerGroups:
    """The ordered layer groups of a model: ``embeddings``, ``blocks.0`` … ``blocks.N-1``, ``other``, ``head``.

    Empty groups are left out, so a model without a head has no ``head`` group. ``adapters`` (PEFT weights), when
    present, comes last and is never part of :meth:`ordered` (the depth order used by freezing and LR decay).
    """

    groups: tuple[LayerGroup, ...]
    stacks: tuple[str, ...] = field(default=())

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def names(self) -> list[str]:
        """All group names in order."""
        return [g.name for g in self.groups]

    @property
    def blocks(self) -> list[LayerGroup]:
        """The block groups, bottom (input side) first."""
        return [g for g in self.groups if g.kind == "block"]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def ordered(self) -> list[LayerGroup]:
        """Groups from input to output (``embeddings``, blocks, ``other``, ``head``), without ``adapters``."""
        return [g for g in self.groups if g.kind != "adapters"]

    def get(self, name: str) -> LayerGroup:
        """The group called `name`; a `KeyError` listing the valid names if there is none."""
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(
            f"No layer group named {name!r}; the groups of this model are: {', '.join(self.names)}."
        )

    def group_of(self) -> dict[str, str]:
        """Map every parameter name to the name of its group."""
        return {p: g.name for g in self.groups for p in g.param_names}

    def summary(self) -> str:
        """A short human-readable description, e.g. ``embeddings, blocks.0-5 (bert.encoder.layer), other, head``."""
        parts = []
        for kind in ("embeddings",):
            if any(g.kind == kind for g in self.groups):
                parts.append(kind)
        if self.blocks:
            parts.append(f"blocks.0-{self.num_blocks - 1} ({', '.join(self.stacks)})")
        parts += [g.name for g in self.groups if g.kind in ("other", "head", "adapters")]
        return ", ".join(parts)


@dataclass(frozen=True)
class _Candidate:
    path: str
    container: str
    length: int
    child_class: str
    reason: str | None  # None when accepted

    def describe(self) -> str:
        state = "accepted" if self.reason is None else f"rejected: {self.reason}"
        return f"{self.path} ({self.container} of {self.length} x {self.child_class}; {state})"


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _classify_container(path: str, module: nn.Module) -> _Candidate | None:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        return None
    children = list(module.children())
    if not children:
        return None
    classes = {type(c).__name__ for c in children}
    child_class = "/".join(sorted(classes))
    container = type(module).__name__
    reason = None
    if len(classes) > 1:
        reason = "children of different classes"
    elif isinstance(module, nn.Sequential) and len(children) < 2:
        reason = "a Sequential with a single child"
    elif not all(_has_parameters(c) for c in children):
        reason = "some children hold no parameters"
    elif _is_stem_path(path):
        reason = "an input stem (part of `embeddings`)"
    return _Candidate(path, container, len(children), child_class, reason)


#: Module-path fragments of input stems built as module lists (e.g. Wav2Vec2's convolutional feature encoder):
#: such lists belong to ``embeddings``, never to the block stack.
STEM_PATH_FRAGMENTS = ("embed", "stem", "feature_extractor", "feature_encoder")


def _is_stem_path(path: str) -> bool:
    return any(fragment in path.lower() for fragment in STEM_PATH_FRAGMENTS)


def _inside(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _outermost(paths: Iterable[str]) -> list[str]:
    paths = list(paths)
    return [p for p in paths if not any(q != p and _inside(p, q) for q in paths)]


def _scan_candidates(model: nn.Module) -> list[_Candidate]:
    found = []
    for path, module in model.named_modules():
        candidate = _classify_container(path, module)
        if candidate is not None:
            found.append(candidate)
    return found


def _stacks_from_override(model: nn.Module, blocks: str | Sequence[str]) -> list[list[str]]:
    """Resolve a `blocks` override: attribute paths of containers, or regexes over module names."""
    specs = [blocks] if isinstance(blocks, str) else list(blocks)
    modules = dict(model.named_modules())
    stacks: list[list[str]] = []
    for spec in specs:
        if spec in modules and isinstance(modules[spec], (nn.ModuleList, nn.Sequential)):
            prefix = f"{spec}." if spec else ""
            stacks.append([f"{prefix}{name}" for name, _ in modules[spec].named_children()])
            continue
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise LayerDiscoveryError(
                f"`blocks` override {spec!r} is neither a module path of this model nor a valid regex ({err})."
            ) from err
        matched = _outermost(name for name in modules if name and pattern.fullmatch(name))
        matched = [m for m in matched if _has_parameters(modules[m])]
        if not matched:
            containers = [c.path for c in _scan_candidates(model)]
            raise LayerDiscoveryError(
                f"`blocks` override {spec!r} matches no module holding parameters, as a module path or as a "
                f"regex (full match over module names). Module lists in this model: {containers or 'none'}."
            )
        stacks.append(matched)
    return stacks


def _discover_stacks(model: nn.Module) -> tuple[list[list[str]], list[str]]:
    candidates = _scan_candidates(model)
    accepted = _outermost(c.path for c in candidates if c.reason is None)
    if not accepted:
        seen = "\n  ".join(c.describe() for c in candidates) or "(no nn.ModuleList or nn.Sequential at all)"
        raise LayerDiscoveryError(
            f"Could not find the block stack of {type(model).__name__}: no nn.ModuleList/nn.Sequential of repeated "
            f"modules holding parameters.\nModule lists seen:\n  {seen}\nPass the stack explicitly, e.g. "
            f"`discover_layer_groups(model, blocks='encoder.layers')` (a module path) or "
            f"`blocks=r'encoder\\.layers\\.\\d+'` (a regex over module names); in a TransferConfig, set `blocks`."
        )
    modules = dict(model.named_modules())
    stacks = []
    for path in accepted:
        prefix = f"{path}." if path else ""
        stacks.append([f"{prefix}{name}" for name, _ in modules[path].named_children()])
    return stacks, accepted


def _base_model_prefix(model: nn.Module) -> str | None:
    """The attribute path of the base model of a (possibly PEFT-wrapped) `PreTrainedModel`, if separate."""
    prefix = ""
    current: Any = model
    # Unwrap PEFT (PeftModel.base_model -> LoraModel.model -> the transformers model).
    for _ in range(3):
        if (
            hasattr(current, "peft_config")
            and hasattr(current, "base_model")
            and current.base_model is not current
        ):
            prefix += "base_model."
            current = current.base_model
        elif hasattr(current, "peft_config") and isinstance(getattr(current, "model", None), nn.Module):
            prefix += "model."
            current = current.model
        else:
            break
    base_prefix = getattr(current, "base_model_prefix", None)
    if base_prefix and isinstance(getattr(current, base_prefix, None), nn.Module):
        return prefix + base_prefix
    return None


def _classifiers_inside_base(model: nn.Module, base_prefix: str) -> list[str]:
    """Module paths of the task head(s) that a base model holds itself and reports with timm's ``get_classifier()``.

    transformers' ``TimmWrapperForImageClassification`` has ``base_model_prefix = "timm_model"``, and
    ``timm_model`` is the complete timm model, classifier included (``fc``, ``head``, ``head.fc``,
    ``classifier``, depending on the architecture), so nothing lies outside the base model. timm models name their
    classifier through ``get_classifier()`` (a module, or a tuple of modules for distilled models; an
    ``nn.Identity`` without parameters when the model was built without a classifier, as ``TimmWrapperModel`` is).
    """
    modules = dict(model.named_modules())
    get_classifier = getattr(modules.get(base_prefix), "get_classifier", None)
    if not callable(get_classifier):
        return []
    found = get_classifier()
    classifiers = [c for c in (found if isinstance(found, (tuple, list)) else (found,)) if isinstance(c, nn.Module)]
    return [
        path
        for path, module in modules.items()
        if _inside(path, base_prefix) and any(module is c for c in classifiers) and _has_parameters(module)
    ]


def _is_head_name(param_name: str, head: Sequence[str] | None) -> bool:
    if head is not None:
        return any(re.fullmatch(h, param_name) or _inside(param_name, h) for h in head)
    components = param_name.split(".")[:-1]
    return any(c in HEAD_MODULE_NAMES for c in components)


def discover_layer_groups(
    model: nn.Module,
    blocks: str | Sequence[str] | None = None,
    head: Sequence[str] | None = None,
) -> LayerGroups:
    """Find the ordered layer groups of `model`.

    Args:
        model (`torch.nn.Module`):
            A transformers `PreTrainedModel`, a PEFT-wrapped model or any plain `torch.nn.Module`.
        blocks (`str` or `list[str]`, *optional*):
            Override for the block stack: the module path of an `nn.ModuleList` / `nn.Sequential` (e.g.
            ``"bert.encoder.layer"``), or a regex matched against full module names (e.g. ``r"layers\\.\\d+"``).
            Several entries give several stacks, numbered in the order given.
        head (`list[str]`, *optional*):
            Override for the head: module paths (or regexes over parameter names) whose parameters form the head.

    Returns:
        `LayerGroups`: the groups, each listing its parameter names; every parameter is in exactly one group.

    Raises:
        `LayerDiscoveryError`: when no block stack is found (listing the module lists that were seen) or an
            override matches nothing.

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin import discover_layer_groups
    >>> config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37)
    >>> groups = discover_layer_groups(BertForSequenceClassification(config))
    >>> groups.names
    ['embeddings', 'blocks.0', 'blocks.1', 'blocks.2', 'other', 'head']
    >>> groups.get("head").param_names
    ('classifier.weight', 'classifier.bias')

    ```
    """
    if blocks is not None:
        stacks = _stacks_from_override(model, blocks)
        stack_names = [blocks] if isinstance(blocks, str) else list(blocks)
    else:
        stacks, stack_names = _discover_stacks(model)

    block_of: dict[str, tuple[int, str, str]] = {}
    index = 0
    for stack_name, members in zip(stack_names, stacks, strict=True):
        for member in members:
            block_of[member] = (index, member, stack_name)
            index += 1

    base_prefix = _base_model_prefix(model)
    inner_heads = _classifiers_inside_base(model, base_prefix) if head is None and base_prefix is not None else []
    buckets: dict[str, list[str]] = {"embeddings": [], "other": [], "head": [], "adapters": []}
    block_params: dict[int, list[str]] = {i: [] for i in range(index)}
    seen_block = False
    for name, _ in model.named_parameters():
        owner = next((b for b in block_of if _inside(name, b)), None)
        if ADAPTER_PARAMETER_PATTERN.search(name):
            buckets["adapters"].append(name)
        elif owner is not None:
            block_params[block_of[owner][0]].append(name)
            seen_block = True
        elif _is_head(name, base_prefix, head) or any(_inside(name, h) for h in inner_heads):
            buckets["head"].append(name)
        elif not seen_block or "embed" in name.lower():
            buckets["embeddings"].append(name)
        else:
            buckets["other"].append(name)

    groups: list[LayerGroup] = []
    if buckets["embeddings"]:
        groups.append(LayerGroup("embeddings", "embeddings", tuple(buckets["embeddings"])))
    for i, module_name, stack_name in block_of.values():
        groups.append(LayerGroup(f"blocks.{i}", "block", tuple(block_params[i]), i, module_name, stack_name))
    kinds: tuple[GroupKind, ...] = ("other", "head", "adapters")
    for kind in kinds:
        if buckets[kind]:
            groups.append(LayerGroup(kind, kind, tuple(buckets[kind])))
    return LayerGroups(tuple(groups), tuple(stack_names))


def _is_head(name: str, base_prefix: str | None, head: Sequence[str] | None) -> bool:
    if head is not None:
        return _is_head_name(name, head)
    if base_prefix is not None:
        return not _inside(name, base_prefix)
    return _is_head_name(name, None)


def model_parameter_names(model: nn.Module) -> list[str]:
    """All parameter names of `model`, in registration order (shared parameters listed once)."""
    return [name for name, _ in model.named_parameters()]

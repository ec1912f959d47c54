"""`apply_transfer`: put a model in the state a `TransferConfig` describes (re-initialise, freeze, unfreeze)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from torch import nn

from .config import TransferConfig
from .discovery import LayerGroup, LayerGroups, discover_layer_groups
from .freezing import (
    NoTrainableParametersError,
    TrainableReport,
    freeze_all_but,
    select_parameters,
    trainable_report,
)

logger = logging.getLogger(__name__)


def groups_for_config(model: nn.Module, config: TransferConfig) -> LayerGroups:
    """Discover the layer groups of `model` with the config's `blocks` / `head` overrides."""
    return discover_layer_groups(model, blocks=config.blocks, head=config.head)


def _owner_paths(param_names: Sequence[str]) -> list[str]:
    owners: dict[str, None] = {}
    for name in param_names:
        owners.setdefault(name.rsplit(".", 1)[0] if "." in name else "", None)
    return list(owners)


def _under(name: str, path: str) -> bool:
    return path == "" or name.startswith(path + ".")


def _clear_initialised_flags(module: nn.Module) -> None:
    # transformers >= 5 skips tensors flagged `_is_hf_initialized` (set when weights are loaded), which would
    # silently turn a re-initialisation of pretrained weights into a no-op.
    for sub in module.modules():
        if hasattr(sub, "_is_hf_initialized"):
            setattr(sub, "_is_hf_initialized", False)  # noqa: B010
        for tensor in list(sub.parameters(recurse=False)) + list(sub.buffers(recurse=False)):
            if hasattr(tensor, "_is_hf_initialized"):
                tensor._is_hf_initialized = False


def _init_module_tree(model: nn.Module, module: nn.Module) -> None:
    init_fn = getattr(model, "_init_weights", None)
    _clear_initialised_flags(module)
    if callable(init_fn):
        module.apply(init_fn)
    else:
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()


def _has_initialiser(model: nn.Module, groups: Sequence[LayerGroup]) -> bool:
    if callable(getattr(model, "_init_weights", None)):
        return True
    return any(callable(getattr(m, "reset_parameters", None)) for m in model.modules())


def reinitialize(model: nn.Module, groups: Sequence[LayerGroup], seed: int | None = None) -> list[str]:
    """Re-initialise the parameters of `groups` with the model's own initialisation.

    A transformers model's ``_init_weights`` is applied to every module of each block (and to the modules owning
    the parameters of non-block groups); a plain module's submodules are reset with ``reset_parameters()``.
    Parameters outside `groups` (e.g. PEFT adapter weights inside a block) keep their values.

    Returns:
        `list[str]`: the names of the parameters that changed.

    Raises:
        `RuntimeError`: when nothing changed (the model has neither ``_init_weights`` nor ``reset_parameters``).
    """
    params = dict(model.named_parameters())
    names = [n for g in groups for n in g.param_names]
    before = {n: params[n].detach().clone() for n in names}
    modules = dict(model.named_modules())
    roots = [
        path
        for group in groups
        for path in (
            [group.module_name] if group.module_name is not None else _owner_paths(group.param_names)
        )
    ]
    # The init functions recurse into whole module trees, which can hold parameters of other groups (e.g. PEFT
    # LoRA weights inside a block): those are put back, so that only the requested groups change.
    wanted = set(names)
    protected = {
        n: p.detach().clone()
        for n, p in params.items()
        if n not in wanted and any(_under(n, root) for root in roots)
    }
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    fork = torch.random.fork_rng(devices=devices) if seed is not None else contextlib.nullcontext()
    with fork, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        for root in roots:
            _init_module_tree(model, modules[root])
        for n, saved in protected.items():
            params[n].copy_(saved)
    changed = [n for n in names if not torch.equal(before[n], params[n].detach())]
    if names and not changed and not _has_initialiser(model, groups):
        raise RuntimeError(
            f"Re-initialising groups {[g.name for g in groups]} changed no parameter: {type(model).__name__} has "
            f"no `_init_weights` and its modules no `reset_parameters()`."
        )
    return changed


def _resolve_half(config: TransferConfig, groups: LayerGroups) -> int:
    if config.freeze_bottom_blocks == "half":
        return groups.num_blocks // 2
    return int(config.freeze_bottom_blocks)


def _check_block_count(name: str, value: int, groups: LayerGroups) -> None:
    if value > groups.num_blocks:
        raise ValueError(
            f"`{name}`={value} exceeds the number of blocks of this model ({groups.num_blocks}: "
            f"{groups.summary()})."
        )


def plan_trainable(config: TransferConfig, groups: LayerGroups) -> list[str]:
    """The selectors a config trains on a model with `groups` (without applying anything)."""
    ordered = groups.ordered()
    names = [g.name for g in ordered]
    trainable: list[str]
    if config.strategy == "full":
        trainable = names
    elif config.strategy == "partial":
        kept = _kept_blocks(config, groups)
        if config.freeze_transferred:
            trainable = [
                g.name
                for g in ordered
                if g.kind in ("other", "head") or (g.kind == "block" and g.index not in kept)
            ]
        else:
            trainable = names
    else:
        if config.train_groups:
            trainable = list(config.train_groups)
        else:
            n = _resolve_half(config, groups)
            _check_block_count("freeze_bottom_blocks", n, groups)
            trainable = [
                g.name
                for g in ordered
                if g.kind in ("other", "head") or (g.kind == "block" and (g.index or 0) >= n)
            ]
    if config.freeze_embeddings:
        trainable = [t for t in trainable if t != "embeddings"]
    has_head = "head" in names
    if config.train_head and has_head and "head" not in trainable:
        trainable.append("head")
    if not config.train_head:
        trainable = [t for t in trainable if t != "head"]
    return trainable


def _kept_blocks(config: TransferConfig, groups: LayerGroups) -> set[int]:
    n = groups.num_blocks
    if config.transfer_bottom_n is not None:
        _check_block_count("transfer_bottom_n", config.transfer_bottom_n, groups)
        return set(range(config.transfer_bottom_n))
    _check_block_count("reinit_top_k", config.reinit_top_k, groups)
    return set(range(n - config.reinit_top_k))


def groups_to_reinitialize(config: TransferConfig, groups: LayerGroups) -> list[LayerGroup]:
    """The groups a ``partial`` config re-initialises (top blocks, plus ``other`` with `transfer_bottom_n`)."""
    if config.strategy != "partial":
        return []
    kept = _kept_blocks(config, groups)
    chosen = [g for g in groups.blocks if g.index not in kept]
    if config.transfer_bottom_n is not None:
        chosen += [g for g in groups if g.kind == "other"]
    return chosen


def apply_transfer(
    model: nn.Module, config: TransferConfig, groups: LayerGroups | None = None
) -> TrainableReport:
    """Apply a transfer strategy to `model` in place and return its trainable-parameter report.

    Args:
        model (`torch.nn.Module`): the model, with its pretrained weights loaded.
        config (`TransferConfig`): the strategy.
        groups (`LayerGroups`, *optional*): the model's groups; discovered (with the config's overrides) if absent.

    Returns:
        `TrainableReport`: per-group trainable/total parameter counts after the transfer.

    Raises:
        `ValueError`: when the config does not fit the model (e.g. more blocks than the model has, a selector that
        matches nothing: the message lists the model's groups), or nothing would be trained.

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin import TransferConfig, apply_transfer
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> report = apply_transfer(model, TransferConfig(strategy="layers", freeze_bottom_blocks="half"))
    >>> report.trainable_groups
    ['blocks.2', 'blocks.3', 'other', 'head']

    ```
    """
    groups = groups if groups is not None else groups_for_config(model, config)
    trainable = plan_trainable(config, groups)
    if not trainable:
        raise NoTrainableParametersError(
            f"Transfer config {config.to_dict()} trains nothing on this model (groups: {groups.summary()})."
        )
    # Validate every selector before touching the weights.
    select_parameters(model, trainable, groups)
    to_reinit = groups_to_reinitialize(config, groups)
    if to_reinit:
        changed = reinitialize(model, to_reinit, seed=config.reinit_seed)
        logger.info("Re-initialised %d parameters in %s", len(changed), [g.name for g in to_reinit])
    freeze_all_but(model, trainable, groups=groups)
    report = trainable_report(model, groups)
    if report.trainable == 0:
        raise NoTrainableParametersError(f"Transfer config {config.to_dict()} left no trainable parameter.")
    return report

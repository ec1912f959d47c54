"""The search space: learning rate, strategy, frozen and re-initialised blocks, layer-wise LR decay, and optionally
the gradual-unfreezing pace and the L2-SP strength; block ranges from layer discovery. A sampled point -> its
`TransferConfig`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..config import STRATEGIES, TransferConfig
from .deps import _resolve_model_path, require_ray

#: Layer-wise LR decay factors searched by default (1.0: no decay, saved as ``lr_decay: null``).
DEFAULT_LR_DECAYS: tuple[float, ...] = (1.0, 0.9, 0.8, 0.65)


#: Searched knobs that are Trainer callbacks (not `TransferConfig` fields, not flags of ``tl-plugin train``).
CALLBACK_KEYS: tuple[str, ...] = ("unfreeze_pace", "l2sp_alpha")


def _check_num_blocks(num_blocks: Any) -> int:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"`num_blocks` must be an integer >= 1 (from layer discovery), got {num_blocks!r}.")
    return num_blocks


def build_search_space(
    num_blocks: int,
    *,
    lr_range: tuple[float, float] = (1e-5, 5e-4),
    strategies: Sequence[str] = STRATEGIES,
    lr_decays: Sequence[float] | None = DEFAULT_LR_DECAYS,
    max_reinit: int | None = None,
    unfreeze_paces: Sequence[int] | None = None,
    l2sp_alphas: Sequence[float] | None = None,
    freeze_blocks: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The Ray Tune search space of a transfer-learning search on a model with ``num_blocks`` blocks.

    Every knob is sampled independently (so any Tune search algorithm can use the space);
    `transfer_config_from_trial` then uses only the knobs of the sampled strategy:

    - ``learning_rate``: log-uniform in ``lr_range``;
    - ``strategy``: one of ``strategies``;
    - ``freeze_bottom_blocks``: 1 … ``num_blocks`` (strategy ``layers``: the embeddings and this many bottom blocks
      are frozen; ``num_blocks`` leaves only the pooler/head trainable);
    - ``reinit_top_k``: 1 … ``max_reinit`` (default: half the blocks, at least 1; strategy ``partial``);
    - ``lr_decay``: one of ``lr_decays`` (1.0 means no decay); omitted when ``lr_decays`` is `None`;
    - ``unfreeze_pace`` (only when ``unfreeze_paces`` is given): gradual unfreezing, groups unfrozen per epoch
      from the head down (`GradualUnfreezingCallback`, never beyond what the strategy trains); 0: off;
    - ``l2sp_alpha`` (only when ``l2sp_alphas`` is given): L2-SP strength (`L2SPCallback`), 0 meaning off.

    Args:
        num_blocks (`int`): the model's block count, e.g. ``discover_layer_groups(model).num_blocks``.
        lr_range (`tuple[float, float]`): lowest and highest learning rate.
        strategies (`Sequence[str]`): the transfer strategies to try.
        lr_decays (`Sequence[float]`, *optional*): layer-wise LR decay factors in (0, 1] to try.
        max_reinit (`int`, *optional*): most top blocks re-initialised by ``partial``.
        unfreeze_paces (`Sequence[int]`, *optional*): gradual-unfreezing paces to try (``0``: off).
        l2sp_alphas (`Sequence[float]`, *optional*): L2-SP strengths to try (``0``: off).
        freeze_blocks (`Sequence[int]`, *optional*): the ``freeze_bottom_blocks`` values to try (default: all of
            1 … ``num_blocks``), e.g. the boundaries near a layer scan's recommendation.

    Returns:
        `dict`: ``{name: ray.tune domain}``, ready for ``Tuner(param_space=...)``.
    """
    ray = require_ray()
    tune = ray.tune
    num_blocks = _check_num_blocks(num_blocks)
    low, high = (float(v) for v in lr_range)
    if not 0 < low < high:
        raise ValueError(f"`lr_range` must be (low, high) with 0 < low < high, got {lr_range!r}.")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if not strategies or unknown:
        raise ValueError(
            f"`strategies` must be a non-empty subset of {list(STRATEGIES)}, got {list(strategies)}."
        )
    max_reinit = max(1, num_blocks // 2) if max_reinit is None else max_reinit
    if not 1 <= max_reinit <= num_blocks:
        raise ValueError(f"`max_reinit` must be between 1 and the {num_blocks} blocks, got {max_reinit}.")
    space: dict[str, Any] = {
        "learning_rate": tune.loguniform(low, high),
        "strategy": tune.choice(list(strategies)),
        "freeze_bottom_blocks": tune.randint(1, num_blocks + 1),  # upper bound excluded
        "reinit_top_k": tune.randint(1, max_reinit + 1),
    }
    if freeze_blocks is not None:
        odd = [b for b in freeze_blocks if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= num_blocks]
        if not freeze_blocks or odd:
            raise ValueError(f"`freeze_blocks` must be block counts in [1, {num_blocks}], got {list(freeze_blocks)}.")
        space["freeze_bottom_blocks"] = tune.choice(sorted(set(freeze_blocks)))
    if lr_decays:
        bad = [d for d in lr_decays if not 0 < d <= 1]
        if bad:
            raise ValueError(f"`lr_decays` must be in (0, 1], got {bad}.")
        space["lr_decay"] = tune.choice([float(d) for d in lr_decays])
    if unfreeze_paces:
        bad = [v for v in unfreeze_paces if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if bad:
            raise ValueError(f"`unfreeze_paces` must be integers >= 0, got {bad}.")
        space["unfreeze_pace"] = tune.choice(list(unfreeze_paces))
    if l2sp_alphas:
        space["l2sp_alpha"] = tune.choice([float(a) for a in l2sp_alphas])
    return space


def count_blocks(model_path: str | os.PathLike[str] | None = None) -> int:
    """The block count layer discovery finds in a local model folder (`None`: the bundled all-MiniLM-L6-v2).

    The model is built from its config on the ``meta`` device: no weights are read.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ..discovery import discover_layer_groups

    config = AutoConfig.from_pretrained(_resolve_model_path(None if model_path is None else str(model_path)))
    config.num_labels = 2
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return discover_layer_groups(model).num_blocks


def search_space_for_model(model_or_path: Any = None, **kwargs: Any) -> dict[str, Any]:
    """`build_search_space` for a model, a local model folder or (`None`) the bundled model: the block count
    comes from layer discovery."""
    from ..discovery import discover_layer_groups

    if model_or_path is None or isinstance(model_or_path, (str, os.PathLike)):
        return build_search_space(count_blocks(model_or_path), **kwargs)
    return build_search_space(discover_layer_groups(model_or_path).num_blocks, **kwargs)


def baseline_point(num_blocks: int, learning_rate: float = 1e-4) -> dict[str, Any]:
    """The default of ``tl-plugin train`` (bottom half frozen, lr 1e-4) as a point of the search space."""
    num_blocks = _check_num_blocks(num_blocks)
    return {
        "learning_rate": learning_rate,
        "strategy": "layers",
        "freeze_bottom_blocks": max(1, num_blocks // 2),
        "reinit_top_k": 1,
        "lr_decay": 1.0,
    }


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or float(value) != int(value):
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    return int(value)


def transfer_config_from_trial(config: Mapping[str, Any], seed: int | None = None) -> TransferConfig:
    """The `TransferConfig` a sampled point stands for; knobs of the other strategies are ignored.

    ``lr_decay`` 1.0 (or missing) means no decay. For ``partial``, ``reinit_seed`` is ``seed`` so that the final
    run re-initialises the same weights. Raises `ValueError` for a point that is not a valid config.
    """
    strategy = config.get("strategy", "full")
    decay = config.get("lr_decay")
    lr_decay = None if decay is None or float(decay) == 1.0 else float(decay)
    if strategy == "partial":
        return TransferConfig(
            strategy="partial",
            reinit_top_k=_as_int("reinit_top_k", config.get("reinit_top_k", 1)),
            lr_decay=lr_decay,
            reinit_seed=seed,
        )
    if strategy == "layers":
        frozen = config.get("freeze_bottom_blocks", "half")
        return TransferConfig(
            strategy="layers",
            freeze_bottom_blocks=frozen if frozen == "half" else _as_int("freeze_bottom_blocks", frozen),
            lr_decay=lr_decay,
        )
    return TransferConfig(strategy=strategy, lr_decay=lr_decay)


def _frozen_blocks(config: TransferConfig, num_blocks: int | None) -> int | None:
    if config.strategy != "layers" or config.train_groups:
        return 0
    if config.freeze_bottom_blocks == "half":
        return None if num_blocks is None else num_blocks // 2
    return int(config.freeze_bottom_blocks)

"""The activation cache in a `transformers.Trainer`: set-up in one call.

`prepare_cached_training` attaches an `ActivationCache` to a model and registers the datasets for a plain
`Trainer`; the callback that keeps the cache in step with the freeze boundary is
`tl_plugin.prefix.cache.ActivationCacheCallback`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .cache import ActivationCache

__all__ = ["CachedTraining", "prepare_cached_training"]


@dataclass
class CachedTraining:
    """What `prepare_cached_training` returns: pass :meth:`trainer_kwargs` to `transformers.Trainer`."""

    model: nn.Module
    cache: ActivationCache
    train_dataset: Any
    eval_dataset: Any
    data_collator: Callable[[list[dict[str, Any]]], Any]
    callbacks: list[TrainerCallback] = field(default_factory=list)

    def trainer_kwargs(self) -> dict[str, Any]:
        """``model``, ``train_dataset``, ``eval_dataset``, ``data_collator``, ``callbacks`` for a Trainer."""
        return {
            "model": self.model,
            "train_dataset": self.train_dataset,
            "eval_dataset": self.eval_dataset,
            "data_collator": self.data_collator,
            "callbacks": list(self.callbacks),
        }


def prepare_cached_training(
    model: nn.Module,
    train_dataset: Any,
    eval_dataset: Any = None,
    *,
    data_collator: Callable[[list[dict[str, Any]]], Any] | None = None,
    tokenizer: Any = None,
    **cache_kwargs: Any,
) -> CachedTraining:
    """Attach an `ActivationCache` to `model` and prepare the datasets for a plain `transformers.Trainer`.

    Args:
        model (`torch.nn.Module`): the model, with its frozen layers frozen.
        train_dataset: tokenized training examples (fixed: no random augmentation).
        eval_dataset (*optional*): a dataset or a dict of datasets to evaluate on.
        data_collator (*optional*): the collator; default ``DataCollatorWithPadding(tokenizer)`` when
            `tokenizer` is given, else `transformers.default_data_collator`.
        tokenizer (*optional*): used for the default collator.
        **cache_kwargs: passed to `ActivationCache` (``cache_dir``, ``max_bytes``, ``prefix_dropout``, ...).

    Returns:
        `CachedTraining`: ``Trainer(args=args, **prepared.trainer_kwargs())`` trains with the cache.
    """
    if data_collator is None and tokenizer is not None:
        from transformers import DataCollatorWithPadding

        data_collator = DataCollatorWithPadding(tokenizer)
    cache = ActivationCache(model, data_collator=data_collator, **cache_kwargs)
    train = cache.prepare(train_dataset, name="train")
    evaluation: Any = None
    if isinstance(eval_dataset, Mapping):
        evaluation = {name: cache.prepare(ds, name=f"eval/{name}") for name, ds in eval_dataset.items()}
    elif eval_dataset is not None:
        evaluation = cache.prepare(eval_dataset, name="eval")
    return CachedTraining(model, cache, train, evaluation, cache.data_collator, [cache.callback()])

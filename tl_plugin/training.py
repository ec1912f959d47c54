"""The `transformers.Trainer` of a text-classification transfer run, shared by ``tl-plugin train`` and the Ray
Tune trials (`tl_plugin.tune`), so that a search's trial and the final command train the same way.

`build_classification_run` takes a model with its transfer already applied and returns a `ClassificationRun`:
the `Trainer` (the optimizer from `tl_plugin.optim.create_optimizer`, with layer-wise LR decay when asked;
accuracy and F1 metrics computed locally) and, with ``activation_cache=True``, the `tl_plugin.cache.ActivationCache`
it trains on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .discovery import LayerGroups

__all__ = ["ClassificationRun", "build_classification_run"]


@dataclass
class ClassificationRun:
    """What `build_classification_run` returns.

    Attributes:
        trainer (`transformers.Trainer`): ready to ``train()``.
        cache (`tl_plugin.cache.ActivationCache` or `None`): the activation cache, when asked for.
    """

    trainer: Any
    cache: Any = None

    def evaluation_dataset(self, dataset: Any, name: str) -> Any:
        """`dataset` ready for ``trainer.evaluate``: registered with the cache (its prefix computed once) when
        there is one, else as is."""
        return self.cache.prepare(dataset, name=name) if self.cache is not None else dataset

    def cache_summary(self) -> dict[str, Any] | None:
        """The cache's boundary, last-block mode and counters (builds, loads, cached batches ...), or `None`."""
        if self.cache is None:
            return None
        stats = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.cache.stats.items()}
        return {
            "frozen_blocks": self.cache.frozen_blocks,
            "first_token_last_block": self.cache.last_block is not None,
            **stats,
        }

    def describe_cache(self) -> str:
        """One line for the console about the cache (empty without one)."""
        cache = self.cache
        if cache is None:
            return ""
        if cache.frozen_blocks is None:
            return "Activation cache: nothing is frozen at the bottom, so every batch runs the whole model."
        action = f"built in {cache.stats['build_seconds']:.1f} s" if cache.stats["builds"] else "loaded"
        last = "first position only" if cache.last_block is not None else "in full"
        return (
            f"Activation cache: embeddings + {cache.frozen_blocks} frozen blocks {action} "
            f"({cache.nbytes / 2**20:.0f} MB under {cache.cache_dir}); last block computed {last}."
        )

    def close(self) -> None:
        """Give the model its own forwards back (before saving or reusing it)."""
        if self.cache is not None:
            self.cache.detach()


def build_classification_run(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    eval_dataset: Any,
    training_args: Any,
    *,
    groups: LayerGroups,
    lr_decay: float | None = None,
    callbacks: Sequence[Any] = (),
    activation_cache: bool = False,
    activation_cache_dir: str | os.PathLike[str] | None = None,
    data_collator: Any = None,
    compute_metrics: Any = None,
    compute_loss_func: Any = None,
) -> ClassificationRun:
    """Build the `Trainer` of a transfer run on tokenized text classification data.

    Args:
        model: the classifier, with its transfer config applied (frozen layers frozen).
        tokenizer: its tokenizer (padding collator, saved with the model).
        train_dataset: tokenized training examples (``input_ids``, ``attention_mask``, ``label``).
        eval_dataset: tokenized evaluation examples, the same columns.
        training_args (`transformers.TrainingArguments`): the run's arguments.
        groups (`LayerGroups`): the model's layer groups (for layer-wise LR decay and the cache).
        lr_decay (`float`, *optional*): layer-wise LR decay factor, `None` for none.
        callbacks: more Trainer callbacks (freeze schedules first: the cache's callback is added after them).
        activation_cache (`bool`): train on cached frozen-prefix activations (`tl_plugin.cache`).
        activation_cache_dir (*optional*): where the cache's files go (default:
            `tl_plugin.cache.default_cache_dir`); trials of a search that share it share their caches.
        data_collator (*optional*): the per-batch collator (default: padding with `tokenizer`).
        compute_metrics (*optional*): the Trainer's ``compute_metrics`` (default: accuracy and binary F1).
        compute_loss_func (*optional*): the Trainer's ``compute_loss_func`` (e.g. a class-weighted loss).
    """
    from transformers import Trainer

    from .callbacks.base import bind_all
    from .metrics import build_compute_metrics
    from .optim import create_optimizer

    optimizer = create_optimizer(model, training_args, lr_decay=lr_decay, groups=groups)
    data: dict[str, Any] = {"train_dataset": train_dataset, "eval_dataset": eval_dataset}
    if data_collator is not None:
        data["data_collator"] = data_collator
    all_callbacks = list(callbacks)
    cache = None
    if activation_cache:
        from .cache import prepare_cached_training

        prepared = prepare_cached_training(
            model,
            train_dataset,
            eval_dataset,
            tokenizer=tokenizer,
            data_collator=data_collator,
            groups=groups,
            cache_dir=activation_cache_dir,
        )
        cache = prepared.cache
        data = {
            "train_dataset": prepared.train_dataset,
            "eval_dataset": prepared.eval_dataset,
            "data_collator": prepared.data_collator,
        }
        all_callbacks += prepared.callbacks
    trainer = Trainer(
        model=model,
        args=training_args,
        processing_class=tokenizer,
        compute_metrics=compute_metrics or build_compute_metrics(("accuracy", "f1")),
        compute_loss_func=compute_loss_func,
        optimizers=(optimizer, None),
        callbacks=all_callbacks,
        **data,
    )
    # give the tl_plugin callbacks their trainer: their numbers then reach `report_to` (TensorBoard, ...)
    bind_all(trainer)
    return ClassificationRun(trainer, cache)

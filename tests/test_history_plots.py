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


def _staircase_history() -> TrainingHistory:
    """Gradual unfreezing by hand: the head learns from step 0, one more group every 3 steps; head and other share
    their lr (no decay between them), the blocks below get 0.5 ** depth of it."""
    groups = ["embeddings", "blocks.0", "blocks.1", "other", "head"]
    history = TrainingHistory(groups=groups)
    for step in range(13):
        learning = list(reversed(groups))[: 1 + step // 3]
        history.steps.append(step)
        history.trainable_fraction.append({g: 1.0 if g in learning else 0.0 for g in groups})
        base = 1e-3 * (1 - step / 13)
        history.lrs.append({g: base * 0.5 ** max(0, 3 - i) for i, g in enumerate(groups)})
    return history


def test_lr_plot_draws_no_line_while_a_group_is_frozen(tmp_path, monkeypatch):
    import tl_plugin.plotting as plotting

    drawn = {}
    real_save = plotting._save

    def keep_figure(fig, plt, path):
        drawn["axes"] = fig.axes[0]
        drawn["lines"] = [(line.get_gid(), list(line.get_xdata()), line) for line in fig.axes[0].get_lines()]
        return real_save(fig, plt, path)

    monkeypatch.setattr(plotting, "_save", keep_figure)
    history = _staircase_history()
    plot_lr_per_group(history, tmp_path / "lr.png")
    learning_steps = {
        g: [s for s, row in zip(history.steps, history.trainable_fraction, strict=True) if row[g] > 0]
        for g in history.groups
    }
    for group in history.groups:
        xs = sorted(x for gid, data, _ in drawn["lines"] if gid == group for x in data)
        assert xs == learning_steps[group], group  # every learning step drawn, no frozen step drawn
        assert min(xs) == {"head": 0, "other": 3, "blocks.1": 6, "blocks.0": 9, "embeddings": 12}[group]
    # head and other overlap from step 3 on: they differ in line style and marker
    head = next(line for gid, _, line in drawn["lines"] if gid == "head")
    other = next(line for gid, _, line in drawn["lines"] if gid == "other")
    assert list(head.get_ydata())[3:] == list(other.get_ydata())
    assert (head.get_linestyle(), head.get_marker()) != (other.get_linestyle(), other.get_marker())
    # each group's name is written at its line's end, apart from the others
    names = {t.get_text(): t.get_position()[1] for t in drawn["axes"].texts if t.get_text() in history.groups}
    assert set(names) == set(history.groups)
    assert names["head"] != names["other"]


def test_lr_segments_splits_a_group_refrozen_in_the_middle():
    from tl_plugin.plotting import lr_segments

    history = TrainingHistory(
        groups=["blocks.0", "head"], steps=[0, 1, 2, 3, 4],
        trainable_fraction=[{"blocks.0": f, "head": 1.0} for f in (1.0, 1.0, 0.0, 0.0, 0.5)],
        lrs=[{"blocks.0": 1e-3, "head": 1e-3}] * 5,
    )  # fmt: skip
    segments = lr_segments(history)
    assert [steps for steps, _ in segments["blocks.0"]] == [[0, 1], [4]]
    assert [steps for steps, _ in segments["head"]] == [[0, 1, 2, 3, 4]]


def test_plotting_docstring_examples_run():
    import doctest

    import tl_plugin.plotting

    result = doctest.testmod(tl_plugin.plotting, verbose=False, report=True)
    assert result.attempted > 0
    assert result.failed == 0

"""``tl-plugin search`` draws the majority-class rate of the validation split the trials evaluate on (no Ray here).

`tl_plugin.app.search.validation_majority_rate` is compared with the labels of the split a trial really evaluates
on: ``tl-plugin train``'s `prepare_run` on the trial's own command line (`tl_plugin.tune.trial_command_line`), the
same seed, a tiny BERT; and `_finish` (the end of every search) is checked to print the rate, keep it in the summary
and hand it to `plot_results`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from tl_plugin import tune as tlt
from tl_plugin.app import search as search_module
from tl_plugin.app.search import validation_majority_rate
from tl_plugin.app.train import parse_train_args, prepare_run


@pytest.fixture(scope="module")
def tiny_model_dir():
    folder = tempfile.mkdtemp(prefix="tltiny-", dir="/tmp")
    try:
        yield str(tlt.save_tiny_bert(Path(folder) / "bert", num_hidden_layers=2))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _evaluated_labels(settings: tlt.SearchSettings, tmp_path: Path) -> list[int]:
    """The label ids of the split a trial evaluates on (`build_run` hands ``processed["validation"]`` to the
    Trainer as its eval set), prepared from the trial's command line as `_run_training` does."""
    argv = tlt.trial_command_line({"learning_rate": 1e-4}, settings, str(tmp_path / "trial"))
    prepared = prepare_run(parse_train_args(argv))
    return list(prepared.processed["validation"]["labels"])


def _share_of_most_frequent(labels: list) -> float:
    return max(Counter(labels).values()) / len(labels)


def test_bundled_reviews_rate_is_the_validation_split_a_trial_evaluates_on(tiny_model_dir, tmp_path):
    settings = tlt.SearchSettings(num_blocks=2, model_path=tiny_model_dir, train_size=64)
    rate = validation_majority_rate(settings)
    labels = _evaluated_labels(settings, tmp_path)
    assert len(labels) == 400
    assert rate == _share_of_most_frequent(labels) == 0.65  # 260 of the 400 validation reviews are 'great'


def test_own_csv_rate_is_that_of_the_held_out_part_not_of_the_file(tiny_model_dir, tmp_path):
    # 17 'a' and 13 'b': the file's majority share is 0.567; the seeded, stratified 3-row validation split
    # holds 2 'a' and 1 'b' (0.667)
    rows = ["text,label"] + [
        f"review {i} says {'yes' if i % 3 else 'no'},{'a' if i < 17 else 'b'}" for i in range(30)
    ]
    data = tmp_path / "reviews.csv"
    data.write_text("\n".join(rows) + "\n")
    settings = tlt.SearchSettings(
        num_blocks=2, model_path=tiny_model_dir, train_args=["--train_file", str(data)]
    )
    rate = validation_majority_rate(settings)
    labels = _evaluated_labels(settings, tmp_path)
    assert len(labels) == 3
    assert rate == pytest.approx(_share_of_most_frequent(labels))
    assert rate != pytest.approx(17 / 30)


def test_validation_file_rows_dropped_by_drop_empty_do_not_count(tiny_model_dir, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"text {i},{'a' if i % 2 else 'b'}\n" for i in range(8)))
    # 3 'a', 2 'b' with text, 2 'b' with an empty text: 3/5 with --drop_empty (3/7 if the empty rows counted)
    validation = tmp_path / "validation.csv"
    validation.write_text("text,label\nx,a\ny,a\nz,a\nu,b\nv,b\n,b\n,b\n")
    settings = tlt.SearchSettings(
        num_blocks=2, model_path=tiny_model_dir,
        train_args=["--train_file", str(train), "--validation_file", str(validation), "--drop_empty", "true"],
    )  # fmt: skip
    rate = validation_majority_rate(settings)
    labels = _evaluated_labels(settings, tmp_path)
    assert len(labels) == 5
    assert rate == pytest.approx(_share_of_most_frequent(labels)) == pytest.approx(0.6)


def test_no_rate_for_another_metric():
    assert validation_majority_rate(tlt.SearchSettings(num_blocks=2, metric="eval_loss", mode="min")) is None


def _rows(settings: tlt.SearchSettings) -> list[dict]:
    base = {"strategy": "layers", "lr_decay": 1.0, "reinit_top_k": 1, "freeze_bottom_blocks": 1}
    return [
        tlt._row(name, {**base, "learning_rate": lr}, "TERMINATED",
                 {"training_iteration": 2, "eval_accuracy": acc, "time_total_s": 1.0}, None, settings)
        for name, lr, acc in [("t0", 1e-4, 0.65), ("t1", 2e-4, 0.75), ("t2", 3e-5, 0.65)]
    ]  # fmt: skip


@pytest.mark.parametrize("baseline", [0.65, None])
def test_finish_prints_the_rate_and_draws_it(tmp_path, monkeypatch, capsys, baseline):
    pytest.importorskip("matplotlib")
    settings = tlt.SearchSettings(num_blocks=2, max_epochs=2)
    drawn = {}
    real_plot = tlt.plot_results

    def recording_plot(rows, path, metric, **kwargs):
        drawn.update(kwargs, metric=metric)
        return real_plot(rows, path, metric, **kwargs)

    monkeypatch.setattr(tlt, "plot_results", recording_plot)
    summary = search_module._finish(
        _rows(settings), {"num_samples": 3}, settings, tmp_path, tmp_path / "results.csv", "exp", time.perf_counter(),
        baseline,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert drawn == {"metric": "eval_accuracy", "baseline": baseline}
    assert summary["majority_rate"] == baseline
    assert Path(summary["plot"]).is_file()
    json.dumps(summary["majority_rate"])  # JSON-safe, like the rest of the summary
    if baseline is None:
        assert "Majority-class rate" not in out
    else:
        assert "Majority-class rate of the validation split: 0.65 " in out
        assert "2 of 3 trials ended exactly at it: t0, t2" in out

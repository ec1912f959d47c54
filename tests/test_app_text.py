"""``tl-plugin train`` on your own text data: files, columns, labels, splits, reports, and every bad input.

The data are small CSV / JSONL / Parquet files written by the tests; the model is a tiny random BERT (3 blocks) with
the real all-MiniLM-L6-v2 tokenizer. Each bad input must stop the run with one line (exit code 2) that names the
file / column / row and the fix, before any training step, and must leave no output behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tl_plugin.cli import main  # noqa: E402

WORDS = {
    "sports": ["goal", "match", "team", "league", "coach", "score"],
    "politics": ["vote", "minister", "election", "policy", "senate", "law"],
    "science": ["atom", "cell", "energy", "theory", "planet", "gene"],
}


def articles(n_per_class: int, seed: int = 0, classes: tuple[str, ...] = tuple(WORDS)) -> list[dict]:
    """Short 'articles' whose label is given away by their topic words (a model can learn it in one epoch)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n_per_class):
        for label in classes:
            words = rng.choices(WORDS[label], k=6) + rng.choices(["the", "a", "news", "today"], k=3)
            rng.shuffle(words)
            rows.append({"text": " ".join(words) + f" {i}", "label": label})
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    import csv

    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from tl_plugin.tune import save_tiny_bert

    path = tmp_path_factory.mktemp("tiny") / "bert"
    save_tiny_bert(path)
    return str(path)


FAST = ["--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--disable_tqdm", "true",
        "--save_strategy", "no", "--max_length", "24", "--logging_steps", "1000"]  # fmt: skip


def train(tmp_path: Path, tiny_model: str, *args: str) -> tuple[int, dict | None]:
    out = tmp_path / "run"
    code = main(["train", "--model_name_or_path", tiny_model, "--output_dir", str(out), *FAST, *args])
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else None
    return code, metrics


# ------------------------------------------------------------------------------------------------- your data
def test_csv_with_string_labels_trains_reports_per_class_and_saves_id2label(tmp_path, tiny_model, capsys):
    train_file = write_csv(tmp_path / "train.csv", articles(20))
    test_file = write_csv(tmp_path / "test.csv", articles(5, seed=1))
    code, metrics = train(tmp_path, tiny_model, "--train_file", str(train_file), "--test_file", str(test_file),
                          "--num_train_epochs", "6", "--learning_rate", "3e-3")  # fmt: skip
    assert code == 0
    assert metrics["task"] == "text-classification"
    assert metrics["labels"] == ["politics", "science", "sports"]
    # no validation file: 10% of the 60 training rows held out, stratified (2 per class)
    assert (metrics["train_examples"], metrics["test_examples"]) == (54, 15)
    report = metrics["test_report"]
    assert set(report["per_class"]) == {"politics", "science", "sports"}
    assert all(row["support"] == 5 for row in report["per_class"].values())
    assert report["majority_class_accuracy"] == pytest.approx(1 / 3)
    assert metrics["test_accuracy"] > 0.6  # topic words give the label away
    assert 0 <= report["macro_f1"] <= 1
    assert sum(map(sum, report["confusion_matrix"])) == 15
    out = tmp_path / "run"
    assert (out / "confusion_matrix.png").stat().st_size > 5000
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["id2label"] == {"0": "politics", "1": "science", "2": "sports"}
    printed = capsys.readouterr().out
    assert "test accuracy" in printed
    assert "politics" in printed
    assert "precision" in printed


def test_integer_labels_jsonl_pairs_and_no_test_file_report_on_validation(tmp_path, tiny_model):
    rows = [{"premise": r["text"], "hypothesis": r["text"][::-1], "gold": i % 2} for i, r in enumerate(articles(10))]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, metrics = train(tmp_path, tiny_model, "--train_file", str(train_file), "--text_column", "premise",
                          "--text_pair_column", "hypothesis", "--label_column", "gold")  # fmt: skip
    assert code == 0
    assert metrics["report_split"] == "validation"
    assert metrics["labels"] == ["0", "1"]
    assert "validation_accuracy" in metrics
    assert "validation_f1" in metrics


def test_parquet_and_validation_file(tmp_path, tiny_model):
    import pandas as pd

    pd.DataFrame(articles(8)).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame(articles(2, seed=3)).to_parquet(tmp_path / "valid.parquet")
    code, metrics = train(tmp_path, tiny_model, "--train_file", str(tmp_path / "train.parquet"),
                          "--validation_file", str(tmp_path / "valid.parquet"))  # fmt: skip
    assert code == 0
    assert metrics["train_examples"] == 24  # nothing held out: a validation file was given
    assert metrics["validation_examples"] == 6


def test_saved_dataset_dir_keeps_classlabel_names(tmp_path, tiny_model):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    rows = articles(8, classes=("sports", "science"))
    data = {"sentence": [r["text"] for r in rows], "label": [int(r["label"] == "science") for r in rows]}
    DatasetDict({"train": Dataset.from_dict(data, features=features),
                 "test": Dataset.from_dict(data, features=features)}).save_to_disk(tmp_path / "saved")  # fmt: skip
    code, metrics = train(tmp_path, tiny_model, "--dataset_dir", str(tmp_path / "saved"))
    assert code == 0
    assert metrics["labels"] == ["neg", "pos"]


def test_local_dataset_folder_is_read_by_load_dataset_offline(tmp_path, tiny_model):
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    write_csv(folder / "train.csv", articles(8))
    write_csv(folder / "test.csv", articles(2, seed=5))
    code, metrics = train(tmp_path, tiny_model, "--dataset_name", str(folder))
    assert code == 0
    assert (metrics["report_split"], metrics["test_examples"]) == ("test", 6)
    assert metrics["train_examples"] + metrics["validation_examples"] == 24


def test_missing_local_dataset_name_says_it_reads_local_folders(tmp_path, tiny_model, capsys):
    err = _bad(tmp_path, tiny_model, capsys, "--dataset_name", "imdb")
    assert "--dataset_name: no such local data set 'imdb'" in err


def test_label_order_sets_the_id_order_and_must_name_every_label(tmp_path, tiny_model, capsys):
    train_file = write_csv(tmp_path / "t.csv", articles(6))
    code, metrics = train(tmp_path, tiny_model, "--train_file", str(train_file),
                          "--label_order", "sports,politics,science")  # fmt: skip
    assert code == 0
    assert metrics["labels"] == ["sports", "politics", "science"]
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["id2label"] == {"0": "sports", "1": "politics", "2": "science"}
    err = _bad(tmp_path, tiny_model, capsys, "--train_file", str(train_file), "--label_order", "sports,politics")
    assert "must list every label of the data once" in err
    assert "['politics', 'science', 'sports']" in err


def test_multi_label_lists_train_with_sigmoid_outputs(tmp_path, tiny_model):
    rows = [{"text": r["text"], "labels": [r["label"], "news"] if i % 2 else [r["label"]]}
            for i, r in enumerate(articles(10))]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, metrics = train(tmp_path, tiny_model, "--train_file", str(tmp_path / "train.jsonl"))
    assert code == 0
    assert metrics["labels"] == ["news", "politics", "science", "sports"]
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert {"validation_micro_f1", "validation_macro_f1", "validation_subset_accuracy"} <= set(metrics)


def test_class_weights_auto_uses_the_weighted_loss(tmp_path, tiny_model):
    rows = articles(20, classes=("sports", "science"))
    rows = [r for i, r in enumerate(rows) if r["label"] == "sports" or i % 5 == 0]  # imbalanced
    code, metrics = train(tmp_path, tiny_model, "--train_file", str(write_csv(tmp_path / "t.csv", rows)),
                          "--class_weights", "auto")  # fmt: skip
    assert code == 0
    assert metrics["class_weights"] == "auto"


def test_batches_are_padded_per_batch_not_to_max_length(tmp_path, tiny_model):
    from tl_plugin.app.train import parse_train_args, prepare_run

    train_file = write_csv(tmp_path / "t.csv", articles(4))
    options = parse_train_args(["--train_file", str(train_file), "--model_name_or_path", tiny_model,
                                "--max_length", "64", "--output_dir", str(tmp_path / "o")])  # fmt: skip
    prepared = prepare_run(options)
    collator = prepared.task.data_collator(prepared.processor)
    batch = collator([prepared.processed["train"][i] for i in range(4)])
    assert batch["input_ids"].shape[1] < 64
    assert batch["input_ids"].shape[1] == max(len(prepared.processed["train"][i]["input_ids"]) for i in range(4))


def test_console_script_trains_own_csv_in_a_subprocess(tmp_path, tiny_model):
    train_file = write_csv(tmp_path / "train.csv", articles(6))
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "tl_plugin.cli", "train", "--train_file", str(train_file),
         "--model_name_or_path", tiny_model, "--output_dir", str(out), *FAST],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["task"] == "text-classification"


# ------------------------------------------------------------------------------------------------- bad input
def _bad(tmp_path, tiny_model, capsys, *args: str) -> str:
    out = tmp_path / "bad-run"
    code = main(["train", "--model_name_or_path", tiny_model, "--output_dir", str(out), *FAST, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert not out.exists(), "a failed run left output behind"
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("tl-plugin")]  # after progress bars, if any
    assert line == err.splitlines()[-1]
    return line


def test_missing_file_is_named(tmp_path, tiny_model, capsys):
    err = _bad(tmp_path, tiny_model, capsys, "--train_file", str(tmp_path / "nope.csv"))
    assert "--train_file: no such file" in err
    assert "nope.csv" in err


def test_folder_as_file_and_unknown_extension(tmp_path, tiny_model, capsys):
    assert "is a folder" in _bad(tmp_path, tiny_model, capsys, "--train_file", str(tmp_path))
    (tmp_path / "data.xlsx").write_text("x")
    assert "supported: .csv" in _bad(tmp_path, tiny_model, capsys, "--train_file", str(tmp_path / "data.xlsx"))


def test_unknown_column_lists_the_columns(tmp_path, tiny_model, capsys):
    train_file = write_csv(tmp_path / "t.csv", articles(4))
    err = _bad(tmp_path, tiny_model, capsys, "--train_file", str(train_file), "--text_column", "body")
    assert "--text_column 'body' is not a column" in err
    assert "['text', 'label']" in err


def test_undetectable_columns_ask_for_the_flag(tmp_path, tiny_model, capsys):
    rows = [{"body": r["text"], "topic": r["label"]} for r in articles(4)]
    err = _bad(tmp_path, tiny_model, capsys, "--train_file", str(write_csv(tmp_path / "t.csv", rows)))
    assert "pass --text_column" in err


def test_empty_split(tmp_path, tiny_model, capsys):
    (tmp_path / "t.csv").write_text("text,label\n")
    assert "the train split is empty" in _bad(tmp_path, tiny_model, capsys, "--train_file", str(tmp_path / "t.csv"))


def test_label_in_test_that_train_lacks(tmp_path, tiny_model, capsys):
    train_file = write_csv(tmp_path / "t.csv", articles(4, classes=("sports", "science")))
    test_file = write_csv(tmp_path / "test.csv", articles(1))
    err = _bad(tmp_path, tiny_model, capsys, "--train_file", str(train_file), "--test_file", str(test_file))
    assert "label 'politics'" in err
    assert "test split does not occur in train" in err


def test_single_class_in_train(tmp_path, tiny_model, capsys):
    train_file = write_csv(tmp_path / "t.csv", articles(4, classes=("sports",)))
    assert "single class ('sports'" in _bad(tmp_path, tiny_model, capsys, "--train_file", str(train_file))


def test_empty_texts_are_counted_and_drop_empty_skips_them(tmp_path, tiny_model, capsys):
    rows = articles(6)
    rows[3]["text"] = ""
    rows[7]["text"] = "   "
    train_file = write_csv(tmp_path / "t.csv", rows)
    err = _bad(tmp_path, tiny_model, capsys, "--train_file", str(train_file), "--validation_split", "0.5")
    assert "empty or null values in column 'text'" in err
    assert "--drop_empty" in err
    code, _ = train(tmp_path, tiny_model, "--train_file", str(train_file), "--drop_empty", "true")
    assert code == 0
    assert "--drop_empty: skipped" in capsys.readouterr().out


def test_non_utf8_csv_names_the_encoding_option(tmp_path, tiny_model, capsys):
    rows = [{"text": r["text"] + " café", "label": r["label"]} for r in articles(6)]
    train_file = write_csv(tmp_path / "t.csv", rows, encoding="latin-1")
    err = _bad(tmp_path, tiny_model, capsys, "--train_file", str(train_file))
    assert "is not utf-8 text" in err
    assert "--encoding latin-1" in err
    code, _ = train(tmp_path, tiny_model, "--train_file", str(train_file), "--encoding", "latin-1")
    assert code == 0


def test_missing_model_folder_is_named_before_the_data_is_read(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model_name_or_path", str(tmp_path / "no-model"), "--train_file",
                 str(tmp_path / "missing.csv"), "--output_dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "--model_name_or_path: no such folder" in err  # not the data file, which is checked later
    assert not out.exists()


def test_head_of_another_size_is_reinitialised_with_a_notice(tmp_path, capsys):
    from transformers import AutoConfig

    from tl_plugin.tune import save_tiny_bert

    path = tmp_path / "three-labels"
    save_tiny_bert(path)
    config = AutoConfig.from_pretrained(path)
    config.num_labels = 5
    config.architectures = ["BertForSequenceClassification"]
    config.save_pretrained(path)
    train_file = write_csv(tmp_path / "t.csv", articles(4, classes=("sports", "science")))
    code, _ = train(tmp_path, str(path), "--train_file", str(train_file))
    assert code == 0
    assert "has a 5-label head; it is re-initialised for the 2 labels" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- command line
def test_unknown_flag_suggests_the_nearest(capsys):
    assert main(["train", "--train_fil", "x.csv"]) == 2
    assert "unknown option --train_fil (did you mean --train_file?)" in capsys.readouterr().err


def test_missing_value_and_bad_value_are_one_line(capsys):
    assert main(["train", "--learning_rate"]) == 2
    assert main(["train", "--lr_decay", "0"]) == 2
    assert main(["train", "--strategy", "bogus"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "tl-plugin train: error: argument --learning_rate/--learning-rate: expected one argument",
        "tl-plugin train: error: --lr_decay must be a number in (0, 1], got 0.0.",
        "tl-plugin train: error: argument --strategy: invalid choice: 'bogus' (choose from 'full', 'partial', 'layers')",
    ]


def test_debug_shows_the_traceback(capsys):
    assert main(["train", "--lr_decay", "0", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "search", "groups"])
def test_every_subcommand_has_a_help_that_loads_nothing(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"usage: tl-plugin {command}" in capsys.readouterr().out


def test_transfer_flags_are_generated_from_transfer_config_fields(capsys):
    import dataclasses

    from tl_plugin import TransferConfig

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for spec in dataclasses.fields(TransferConfig):
        if spec.name != "version":
            assert f"--{spec.name}" in out
    assert "TransferConfig's own default is 'full'" in out  # the one default that differs says why

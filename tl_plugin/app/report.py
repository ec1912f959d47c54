"""Final reports of a classification run: per-class precision / recall / F1, macro-F1, the majority-class baseline,
and a confusion-matrix PNG next to ``metrics.json``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["classification_report", "format_per_class", "multi_label_report", "plot_confusion_matrix"]


def classification_report(y_true: Any, y_pred: Any, names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, the majority-class baseline, per-class precision / recall / F1 / support and the
    confusion matrix (rows: true labels, columns: predictions), as plain JSON-safe values.

    Example:

    ```python
    >>> from tl_plugin.app.report import classification_report
    >>> report = classification_report([0, 0, 0, 1], [0, 0, 1, 1], ["no", "yes"])
    >>> report["accuracy"], report["majority_class_accuracy"], report["per_class"]["yes"]["recall"]
    (0.75, 0.75, 1.0)
    >>> report["confusion_matrix"]
    [[2, 1], [0, 1]]

    ```
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    true = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    ids = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=ids, average=None, zero_division=0
    )
    counts = Counter(true.tolist())
    return {
        "accuracy": float((true == pred).mean()) if len(true) else 0.0,
        "macro_f1": float(np.mean(f1)) if len(f1) else 0.0,
        "majority_class_accuracy": max(counts.values()) / len(true) if len(true) else 0.0,
        "per_class": _per_class(names, precision, recall, f1, support),
        "confusion_matrix": confusion_matrix(true, pred, labels=ids).tolist(),
    }


def _per_class(names: Sequence[str], precision: Any, recall: Any, f1: Any, support: Any) -> dict[str, Any]:
    return {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }


def multi_label_report(y_true: np.ndarray, scores: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Multi-label: subset accuracy, micro/macro-F1 at threshold 0 on the logits, per-label P/R/F1, and the
    baseline of always predicting each label's majority value."""
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    true = np.asarray(y_true) > 0.5
    pred = np.asarray(scores) > 0
    precision, recall, f1, support = precision_recall_fscore_support(true, pred, average=None, zero_division=0)
    majority = true.mean(axis=0) >= 0.5
    return {
        "subset_accuracy": float((true == pred).all(axis=1).mean()),
        "micro_f1": float(f1_score(true, pred, average="micro", zero_division=0)),
        "macro_f1": float(np.mean(f1)),
        "majority_subset_accuracy": float((true == majority).all(axis=1).mean()),
        "per_class": _per_class(names, precision, recall, f1, support),
    }


def format_per_class(per_class: dict[str, dict[str, float]]) -> str:
    """The per-class table of a report, for the console."""
    width = max([len("label"), *(len(n) for n in per_class)])
    lines = [f"{'label':<{width}}  precision  recall     f1  support"]
    for name, row in per_class.items():
        lines.append(
            f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}"
        )
    return "\n".join(lines)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], names: Sequence[str], path: Path, title: str) -> Path:
    """Draw `matrix` (rows: true, columns: predicted) with counts in the cells and row-normalised colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, np.maximum(rows, 1))
    size = min(14.0, max(4.5, 0.6 * len(names) + 3))
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=120)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), labels=list(names), rotation=45 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_yticks(range(len(names)), labels=list(names))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title)
    if len(names) <= 30:
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label's examples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

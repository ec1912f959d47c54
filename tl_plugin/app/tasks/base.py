"""What a task is to the command line: columns, labels, model, preprocessing, metrics and the final report.

A `Task` turns raw splits (a `datasets.DatasetDict` with ``train``, ``validation`` and ``test``, as the user's
files gave them) into what a `transformers.Trainer` needs. ``tl-plugin train`` runs every task the same way:

1. `Task.resolve_columns`: which columns hold the inputs and the labels (given by flags or detected);
2. `Task.label_info`: the label names (string or integer labels; lists for multi-label; per-word tags);
3. `Task.load_processor` and `Task.load_model`: a local pretrained model (or the task's bundled one) with a head of
   the right size and ``id2label`` / ``label2id`` set;
4. `Task.preprocess`: the model's inputs and a ``labels`` column for every split, nothing padded yet;
5. `Task.data_collator`, `Task.compute_metrics`: per-batch padding, the metrics of every evaluation;
6. `Task.report`: the final metrics of the test split (per class, macro-F1, majority baseline ...) and files next
   to ``metrics.json`` (a confusion matrix).

Discovery, the transfer strategies and the callbacks then apply to the model whatever the task.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from ..arguments import DataArguments, ModelArguments

__all__ = ["SUMMARY_NAMES", "Columns", "LabelInfo", "Task"]

#: How the report's keys read in the printed summary.
SUMMARY_NAMES: dict[str, str] = {
    "macro_f1": "macro-F1",
    "micro_f1": "micro-F1",
    "subset_accuracy": "subset accuracy",
    "majority_class_accuracy": "majority-class baseline",
    "majority_subset_accuracy": "majority baseline (subset acc.)",
}


@dataclass
class Columns:
    """The columns a task reads.

    Attributes:
        input (`str`): the text, the words (token classification), the image or the audio column.
        label (`str`): the label column (per-word tags for token classification).
        pair (`str`, *optional*): the second text of a text pair.
    """

    input: str
    label: str
    pair: str | None = None

    def used(self) -> list[str]:
        return [c for c in (self.input, self.pair, self.label) if c is not None]


@dataclass
class LabelInfo:
    """The label set of a run, in id order.

    Attributes:
        names (`list[str]`): label names; id ``i`` is ``names[i]``. Saved as the model's ``id2label``.
        multi_label (`bool`): each example has a list of labels (multi-hot targets, sigmoid outputs).
        train_counts (`dict[str, int]`): how often each label occurs in the training split.
    """

    names: list[str]
    multi_label: bool = False
    train_counts: dict[str, int] = field(default_factory=dict)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def model_kwargs(self) -> dict[str, Any]:
        """``num_labels``, ``id2label`` and ``label2id`` for ``from_pretrained`` / a config."""
        return {"num_labels": len(self.names), "id2label": self.id2label, "label2id": self.label2id}


class Task(abc.ABC):
    """One kind of problem ``tl-plugin`` can train on. Subclasses set `name` and implement the abstract methods."""

    #: the ``--task`` value, e.g. ``"text-classification"``.
    name: ClassVar[str]
    #: a short phrase for ``--help`` and errors, e.g. ``"a text column and a label column"``.
    expects: ClassVar[str]

    # ----------------------------------------------------------------------------------------------- data
    @classmethod
    @abc.abstractmethod
    def looks_like(cls, dataset: Dataset) -> bool:
        """Whether `dataset` (the training split, raw) looks like data of this task, for ``--task`` inference:
        e.g. an `datasets.Image` column for image classification. Must be cheap and must not raise."""

    @abc.abstractmethod
    def resolve_columns(self, dataset: Dataset, args: DataArguments) -> Columns:
        """The columns to use: the flags' (``--text_column`` ...) when given, else detected. Raise
        `tl_plugin.app.errors.DataError` naming the flag and listing the columns there are when a column is
        missing or cannot be detected."""

    @abc.abstractmethod
    def label_info(self, data: DatasetDict, columns: Columns) -> LabelInfo:
        """The label names (sorted, or the `datasets.ClassLabel` names when the column has them). Raise
        `DataError` for a single class in train, a label in validation/test that train lacks (name it, the
        split and a row), or null labels."""

    # ----------------------------------------------------------------------------------------------- model
    @abc.abstractmethod
    def default_model_path(self) -> str:
        """The bundled pretrained model of this task (a local folder), used without ``--model_name_or_path``;
        raise `tl_plugin.app.errors.UsageError` when the task has none, saying to pass ``--model_name_or_path``."""

    @abc.abstractmethod
    def load_processor(self, model_path: str, args: ModelArguments) -> Any:
        """The tokenizer / image processor / feature extractor saved with the model."""

    @abc.abstractmethod
    def load_model(self, model_path: str, labels: LabelInfo, args: ModelArguments) -> Any:
        """The model with a head for `labels` (``num_labels``, ``id2label``, ``label2id``); a pretrained head of
        another size is re-initialised (``ignore_mismatched_sizes=True``) with a printed notice. With
        ``args.from_scratch`` the same architecture, randomly initialised."""

    # ----------------------------------------------------------------------------------------------- training
    @abc.abstractmethod
    def preprocess(
        self, data: DatasetDict, processor: Any, columns: Columns, labels: LabelInfo, args: DataArguments
    ) -> DatasetDict:
        """Every split as model inputs plus a ``labels`` column (label ids; -100 where no label applies), the
        raw columns removed. Nothing padded: `data_collator` pads each batch."""

    @abc.abstractmethod
    def data_collator(self, processor: Any) -> Any:
        """The per-batch collator (pads to the longest example of the batch, not to ``max_length``)."""

    @abc.abstractmethod
    def compute_metrics(self, labels: LabelInfo) -> Callable[[Any], dict[str, float]]:
        """``compute_metrics`` for the Trainer: the metrics of every evaluation (``accuracy``, ``macro_f1`` ...;
        the Trainer prefixes them with ``eval_``)."""

    @abc.abstractmethod
    def report(self, prediction: Any, labels: LabelInfo, out_dir: Path | None) -> dict[str, Any]:
        """The final report of a `transformers.trainer_utils.PredictionOutput` on the report split: a flat,
        JSON-safe dict for ``metrics.json`` (``accuracy``, ``macro_f1``, ``per_class`` ...). With `out_dir`
        (main process only), also write its files there (e.g. ``confusion_matrix.png``)."""

    def summary_lines(self, report: Mapping[str, Any]) -> list[str]:
        """Lines of the printed summary for `report` (the headline metrics, each ``name  value``); subclasses may
        extend. The caller puts the split's name in front (``test accuracy  0.8020``)."""
        return [
            f"{SUMMARY_NAMES.get(key, key):<29} {value:.4f}" for key, value in report.items() if isinstance(value, float)
        ]

    # ----------------------------------------------------------------------------------------------- extras
    def supports_activation_cache(self) -> bool:
        """Whether the frozen-prefix activation cache (`tl_plugin.cache`) applies to this task's models."""
        return False

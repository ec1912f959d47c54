"""Local `evaluate` metrics that need no download, and a ``compute_metrics`` builder for `transformers.Trainer`.

``evaluate.load("accuracy")`` fetches the metric script from the Hugging Face Hub, so it fails offline. This
package ships its own metric modules instead (``metrics/accuracy/accuracy.py`` and ``metrics/f1/f1.py``, computed
with scikit-learn) and loads them by local path: `evaluate.load` resolves a folder ``.../accuracy`` to the
script ``.../accuracy/accuracy.py`` inside it, and a path to a ``.py`` file to that file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from evaluate import EvaluationModule
    from transformers import EvalPrediction

__all__ = [
    "AVAILABLE_METRICS",
    "F1_AVERAGES",
    "METRICS_DIR",
    "build_compute_metrics",
    "load_metric",
    "metric_path",
]

AVAILABLE_METRICS: tuple[str, ...] = ("accuracy", "f1")
"""Names of the metric modules shipped in this package."""

F1_AVERAGES: tuple[str, ...] = ("binary", "macro", "micro", "weighted")
"""Values accepted for the ``average`` of the F1 metric."""

METRICS_DIR: Path = Path(__file__).resolve().parent
"""Folder holding one sub-folder per metric module (``accuracy/accuracy.py``, ``f1/f1.py``)."""


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or name not in AVAILABLE_METRICS:
        raise ValueError(f"Unknown metric {name!r}; available metrics are {list(AVAILABLE_METRICS)}")
    return name


def metric_path(name: str) -> str:
    """Local path of a shipped metric module's folder, ready for ``evaluate.load``.

    Args:
        name (`str`):
            One of `AVAILABLE_METRICS`: ``"accuracy"`` or ``"f1"``.

    Returns:
        `str`: The absolute path of the folder that holds ``<name>.py``.

    Raises:
        ValueError: If ``name`` is not an available metric.

    Example:

    >>> from pathlib import Path
    >>> from tl_plugin.metrics import metric_path
    >>> path = Path(metric_path("f1"))
    >>> path.name, (path / "f1.py").is_file()
    ('f1', True)
    """
    name = _check_name(name)
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(
            f"The metric script {path / f'{name}.py'} is missing; reinstall tl_plugin "
            f"(the metrics/*/*.py files are package data)"
        )
    return str(path)


def load_metric(name: str, **kwargs: Any) -> EvaluationModule:
    """Load one of the shipped metrics with `evaluate.load`, from its local path (works offline).

    Args:
        name (`str`):
            One of `AVAILABLE_METRICS`: ``"accuracy"`` or ``"f1"``.
        kwargs (*optional*):
            Passed on to `evaluate.load` (e.g. ``experiment_id``, ``cache_dir``, ``num_process``). Unless
            ``num_process`` is above 1, ``keep_in_memory`` defaults to `True`, so computing writes no cache file.

    Returns:
        `evaluate.EvaluationModule`: The metric; call ``.compute(predictions=..., references=...)``.

    Raises:
        ValueError: If ``name`` is not an available metric.

    Example:

    >>> from tl_plugin.metrics import load_metric
    >>> load_metric("accuracy").compute(predictions=[0, 1, 1, 1], references=[0, 1, 0, 1])
    {'accuracy': 0.75}
    >>> load_metric("f1").compute(predictions=[0, 1, 1, 1], references=[0, 1, 0, 1], average="macro")
    {'f1': 0.7333333333333334}
    >>> load_metric("bleu")
    Traceback (most recent call last):
        ...
    ValueError: Unknown metric 'bleu'; available metrics are ['accuracy', 'f1']
    """
    import evaluate

    path = metric_path(name)
    if kwargs.get("num_process", 1) == 1:
        kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(path, **kwargs)


def _to_class_ids(predictions: Any) -> np.ndarray:
    """Class ids from logits of shape (n, num_labels), a single logit per example (n, 1), or ids of shape (n,)."""
    if isinstance(predictions, (tuple, list)) and predictions and np.ndim(predictions[0]) >= 1:
        # Models that return more than the logits (hidden states, attentions) give a tuple; the logits come first.
        predictions = predictions[0]
    array = np.asarray(predictions)
    if array.ndim == 2 and array.shape[1] == 1:
        return (array[:, 0] > 0).astype(np.int64)
    if array.ndim == 2:
        return array.argmax(axis=-1).astype(np.int64)
    if array.ndim == 1:
        if array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
            raise ValueError(
                "1-D predictions must be class ids (whole numbers); got fractional values. Pass the logits, of "
                "shape (num_examples, num_labels), instead."
            )
        return array.astype(np.int64)
    raise ValueError(
        f"predictions must be logits of shape (num_examples, num_labels) or class ids of shape (num_examples,), "
        f"got shape {array.shape}"
    )


class _ComputeMetrics:
    """The callable returned by `build_compute_metrics` (picklable: the loaded metrics are reloaded on demand)."""

    def __init__(self, metrics: tuple[str, ...], average: str, pos_label: int) -> None:
        self.metric_names = metrics
        self.average = average
        self.pos_label = pos_label
        self._modules: dict[str, Any] | None = None
        self._load()

    def _load(self) -> dict[str, Any]:
        if self._modules is None:
            self._modules = {name: load_metric(name) for name in self.metric_names}
        return self._modules

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_modules"] = None
        return state

    def __repr__(self) -> str:
        return f"compute_metrics(metrics={self.metric_names}, average={self.average!r}, pos_label={self.pos_label})"

    def __call__(self, eval_pred: EvalPrediction | tuple[Any, Any]) -> dict[str, float]:
        given: Any = eval_pred
        if hasattr(given, "predictions") and hasattr(given, "label_ids"):
            predictions, labels = given.predictions, given.label_ids
        elif isinstance(eval_pred, (tuple, list)) and len(eval_pred) == 2:
            predictions, labels = eval_pred
        else:
            raise ValueError(
                f"eval_pred must be a transformers.EvalPrediction or a (logits, labels) tuple, "
                f"got {type(eval_pred).__name__}"
            )
        if labels is None:
            raise ValueError(
                "eval_pred has no labels (label_ids is None): the evaluation dataset needs a 'label' column"
            )
        if isinstance(labels, (tuple, list)) and labels and np.ndim(labels[0]) >= 1:
            labels = labels[0]
        references = np.asarray(labels).astype(np.int64).reshape(-1)
        class_ids = _to_class_ids(predictions)
        if class_ids.shape[0] != references.shape[0]:
            raise ValueError(
                f"got {class_ids.shape[0]} predictions but {references.shape[0]} labels; they must match"
            )
        results: dict[str, float] = {}
        for name, module in self._load().items():
            kwargs: dict[str, Any] = (
                {"average": self.average, "pos_label": self.pos_label} if name == "f1" else {}
            )
            output = module.compute(predictions=class_ids, references=references, **kwargs)
            results.update({key: float(value) for key, value in output.items()})
        return results


def build_compute_metrics(
    metrics: Sequence[str] | str = ("accuracy", "f1"),
    average: str = "binary",
    pos_label: int = 1,
) -> Callable[[EvalPrediction | tuple[Any, Any]], dict[str, float]]:
    """Build a ``compute_metrics`` function for `transformers.Trainer` from the shipped metrics.

    The returned function takes a `transformers.EvalPrediction` (or a ``(logits, labels)`` tuple), turns the
    logits into class ids with an argmax (a single logit per example is thresholded at 0; 1-D predictions are
    taken as class ids already, e.g. from ``preprocess_logits_for_metrics``; when the model returned a tuple of
    outputs, its first element is taken as the logits) and returns a flat dict of plain floats, one key per
    metric (``"accuracy"``, ``"f1"``). The Trainer prefixes the keys (``eval_accuracy``, ``test_f1``).

    Args:
        metrics (`Sequence[str]` or `str`, *optional*, defaults to `("accuracy", "f1")`):
            Names from `AVAILABLE_METRICS`; a single name may be given as a string.
        average (`str`, *optional*, defaults to `"binary"`):
            How the F1 score averages over classes: "binary" (the F1 of class ``pos_label``; two classes only),
            "macro", "micro" or "weighted". Ignored by accuracy.
        pos_label (`int`, *optional*, defaults to 1):
            The positive class of the binary F1 score (1 is ``great`` in the fine-food reviews).

    Returns:
        `Callable[[EvalPrediction], dict[str, float]]`: The ``compute_metrics`` function.

    Raises:
        ValueError: If a metric name is unknown or repeated, ``metrics`` is empty, or ``average`` is not one of
            `F1_AVERAGES`.

    Example:

    >>> import numpy as np
    >>> from transformers import EvalPrediction
    >>> from tl_plugin.metrics import build_compute_metrics
    >>> compute_metrics = build_compute_metrics(("accuracy", "f1"))
    >>> logits = np.array([[0.2, 0.8], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])  # predicts 1, 0, 1, 0
    >>> compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array([1, 0, 1, 1])))
    {'accuracy': 0.75, 'f1': 0.8}
    """
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not names:
        raise ValueError(
            f"metrics must name at least one metric; available metrics are {list(AVAILABLE_METRICS)}"
        )
    for name in names:
        _check_name(name)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"metrics must not repeat a name, got {repeated} more than once in {list(names)}")
    if average not in F1_AVERAGES:
        raise ValueError(f"average must be one of {list(F1_AVERAGES)}, got {average!r}")
    if isinstance(pos_label, bool) or not isinstance(pos_label, (int, np.integer)):
        raise ValueError(f"pos_label must be an int class id, got {pos_label!r}")
    return _ComputeMetrics(names, average, int(pos_label))

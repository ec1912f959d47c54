"""Accuracy as a local `evaluate` metric module (load it by path; it needs no download).

Load it with ``evaluate.load(path)``, where ``path`` is this file or the folder holding it (evaluate resolves a
folder ``.../accuracy`` to ``.../accuracy/accuracy.py``), or with ``tl_plugin.metrics.load_metric("accuracy")``.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
from sklearn.metrics import accuracy_score

# Only ``import evaluate`` above, never ``from evaluate import Metric``: evaluate.load() returns the first
# non-abstract EvaluationModule subclass found in this module's namespace, and an imported ``Metric`` would come
# before the class below.

_DESCRIPTION = """\
Accuracy is the share of predictions that equal their reference label: (number correct) / (number of examples).
With `normalize=False` it is the number of correct predictions instead.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`):
        Predicted class ids.
    references (`list` of `int`):
        True class ids, one per prediction.
    normalize (`bool`, *optional*, defaults to `True`):
        Return the share of correct predictions; `False` returns their count.
    sample_weight (`list` of `float`, *optional*, defaults to `None`):
        Weight of each example.

Returns:
    `dict`: ``{"accuracy": value}``, a float in [0, 1] (or the count of correct predictions).
"""


class Accuracy(evaluate.Metric):
    """Accuracy of class-id predictions, computed with `sklearn.metrics.accuracy_score`.

    Example:

    >>> import evaluate
    >>> from tl_plugin.metrics import metric_path
    >>> accuracy = evaluate.load(metric_path("accuracy"))
    >>> accuracy.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0])
    {'accuracy': 0.5}
    >>> accuracy.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0], normalize=False)
    {'accuracy': 2.0}
    """

    def _info(self) -> Any:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"
            ],
        )

    def _compute(
        self,
        predictions: Any,
        references: Any,
        normalize: bool = True,
        sample_weight: Any = None,
    ) -> dict[str, float]:
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions and references must have the same length, got {len(predictions)} and {len(references)}"
            )
        if len(predictions) == 0:
            raise ValueError("predictions is empty: the accuracy of no examples is undefined")
        score = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
        return {"accuracy": float(score)}

"""F1 score as a local `evaluate` metric module (load it by path; it needs no download).

Load it with ``evaluate.load(path)``, where ``path`` is this file or the folder holding it (evaluate resolves a
folder ``.../f1`` to ``.../f1/f1.py``), or with ``tl_plugin.metrics.load_metric("f1")``.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
from sklearn.metrics import f1_score

# Only ``import evaluate`` above, never ``from evaluate import Metric``: evaluate.load() returns the first
# non-abstract EvaluationModule subclass found in this module's namespace, and an imported ``Metric`` would come
# before the class below.

AVERAGES = ("binary", "macro", "micro", "weighted")

_DESCRIPTION = """\
The F1 score is the harmonic mean of precision and recall: F1 = 2 * precision * recall / (precision + recall).
For more than two classes (or to summarise both classes of a binary task) the per-class scores are averaged:
`macro` (unweighted mean), `weighted` (mean weighted by each class's support) or `micro` (from the global counts
of true positives, false positives and false negatives; equal to accuracy for single-label data).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`):
        Predicted class ids.
    references (`list` of `int`):
        True class ids, one per prediction.
    average (`str`, *optional*, defaults to `"binary"`):
        One of "binary" (the F1 of class `pos_label` only; binary tasks), "macro", "micro" or "weighted".
    pos_label (`int`, *optional*, defaults to 1):
        The positive class when `average="binary"`; ignored otherwise.
    labels (`list` of `int`, *optional*, defaults to `None`):
        Classes to include when averaging; by default every class seen in predictions or references.
    sample_weight (`list` of `float`, *optional*, defaults to `None`):
        Weight of each example.
    zero_division (`float`, *optional*, defaults to 0.0):
        Value returned when precision and recall are both undefined (e.g. no positive predictions and no positive
        references), without scikit-learn's warning.

Returns:
    `dict`: ``{"f1": value}``, a float in [0, 1].
"""


class F1(evaluate.Metric):
    """F1 score of class-id predictions, computed with `sklearn.metrics.f1_score`.

    Example:

    >>> import evaluate
    >>> from tl_plugin.metrics import metric_path
    >>> f1 = evaluate.load(metric_path("f1"))
    >>> predictions, references = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    >>> round(f1.compute(predictions=predictions, references=references)["f1"], 4)  # precision = recall = 2/3
    0.6667
    >>> f1.compute(predictions=predictions, references=references, pos_label=0)  # precision = recall = 1/2
    {'f1': 0.5}
    >>> round(f1.compute(predictions=predictions, references=references, average="macro")["f1"], 4)
    0.5833
    >>> round(f1.compute(predictions=predictions, references=references, average="weighted")["f1"], 4)
    0.6
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
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"
            ],
        )

    def _compute(
        self,
        predictions: Any,
        references: Any,
        average: str = "binary",
        pos_label: int = 1,
        labels: Any = None,
        sample_weight: Any = None,
        zero_division: float = 0.0,
    ) -> dict[str, float]:
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {list(AVERAGES)}, got {average!r}")
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions and references must have the same length, got {len(predictions)} and {len(references)}"
            )
        if len(predictions) == 0:
            raise ValueError("predictions is empty: the F1 score of no examples is undefined")
        score = f1_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        return {"f1": float(score)}

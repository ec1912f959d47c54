"""The tasks ``tl-plugin`` trains: ``--task`` names one, or it is inferred from the data."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import DataError, UsageError
from .base import Columns, LabelInfo, Task

__all__ = ["TASK_CLASSES", "Columns", "LabelInfo", "Task", "get_task", "infer_task"]

#: ``--task`` value → "module:class" (imported when used).
TASK_CLASSES: dict[str, str] = {
    "text-classification": "tl_plugin.app.tasks.text:TextClassification",
    "token-classification": "tl_plugin.app.tasks.token:TokenClassification",
    "image-classification": "tl_plugin.app.tasks.image:ImageClassification",
    "audio-classification": "tl_plugin.app.tasks.audio:AudioClassification",
}

#: Inference order: the most specific data first (an image column beats a text column).
_INFERENCE_ORDER = ("image-classification", "audio-classification", "token-classification", "text-classification")


def _task_class(name: str) -> type[Task]:
    module, _, cls = TASK_CLASSES[name].partition(":")
    task_class: type[Task] = getattr(importlib.import_module(module), cls)
    return task_class


def get_task(name: str) -> Task:
    """The task named `name` (a ``--task`` value)."""
    if name not in TASK_CLASSES:
        raise UsageError(f"--task {name!r} is not a task; choose one of {', '.join(TASK_CLASSES)}")
    return _task_class(name)()


def infer_task(dataset: Any) -> Task:
    """The task whose data `dataset` (the raw training split) looks like; `DataError` when none does."""
    for name in _INFERENCE_ORDER:
        try:
            cls = _task_class(name)
        except ImportError:
            continue
        if cls.looks_like(dataset):
            return cls()
    raise DataError(
        f"cannot infer the task from the columns {dataset.column_names} ({dict(dataset.features)}); pass --task "
        f"({', '.join(TASK_CLASSES)})"
    )

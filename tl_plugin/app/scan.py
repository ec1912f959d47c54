"""``tl-plugin scan``: score every layer's frozen features for your data and recommend what to freeze, before training.

The same model, data and task options as ``tl-plugin train`` (the same functions load and check them). One no-grad
pass over the training split collects each layer's pooled features (`tl_plugin.scan`); every layer gets a held-out
linear-probe accuracy and LogME. With one model: a table, a plot (``scan.png``), ``scan.json`` and a recommended
``transfer_config.yaml`` that ``tl-plugin train --transfer_config`` reads. With several (``--model A --model B``):
the models ranked by the LogME and probe accuracy of their last layer (``ranking.json``).
"""

from __future__ import annotations

import json
import os
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

__all__ = ["ScanArguments", "build_scan_parser", "plot_scan", "rank_models", "run_scan"]

DESCRIPTION = (
    "Score each layer's frozen features on your data (held-out linear probe and LogME) in one forward pass, and "
    "recommend a freeze boundary, a strategy and a learning-rate range as a transfer config for tl-plugin train. "
    "Several --model folders: rank the models by their last layer. Same data options as tl-plugin train."
)

DEFAULT_SCAN_DIR = "outputs/scan"


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

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch_size must be at least 1, got {self.batch_size}")
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
    loader = DataLoader(processed, batch_size=scan_args.batch_size, collate_fn=task.data_collator(processor))
    try:
        return scan_layers(model, loader, groups, config, name=path)
    except ValueError as err:
        message = str(err)
        if message.startswith("Unknown layer"):
            message = f"--layers {scan_args.layers}: {message}"
        elif "pooling" in message:
            message = f"--pooling: {message}"
        raise UsageError(message) from None


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
    paths = paths or [task.default_model_path()]
    several = len(paths) > 1
    layers = tuple(name.strip() for name in scan_args.layers.split(",") if name.strip()) if scan_args.layers else None
    if scan_args.layers is not None and not layers:
        raise UsageError(f"--layers {scan_args.layers!r}: give layer names, e.g. embeddings,blocks.3")
    if several and layers:
        raise UsageError("--layers applies to one model; several models are ranked by their last layer")
    out = Path(scan_args.output_dir)
    options = (model_args, data_args, scan_args)
    base = ScanConfig(pooling=scan_args.pooling, probe_test_size=scan_args.probe_test_size, seed=scan_args.seed)
    train = raw["train"]
    print(f"\nTask: {task.name}; {train.num_rows} training examples, {len(labels.names)} labels {labels.names[:12]}")

    if several:
        scans: dict[str, Any] = {}
        for path in paths:
            scans[path] = _scan_one(path, task, labels, columns, train, options, replace(base, layers=("last",)))
        ranking = rank_models(scans)
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

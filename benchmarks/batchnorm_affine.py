"""Trainable BatchNorm in frozen parts, measured on the Fashion-MNIST vision recipe (docs/regularisation-and-imbalance.md).

Three partial fine-tunes of EfficientNet-Lite0 that differ only in the BatchNorm layers of the frozen blocks
(``embeddings``, ``blocks.0``-``blocks.4``): the recipe's own settings, data, seed and lr (the recipe's
``run_variant``), the top blocks, ``other`` and ``head`` trained in all three.

- ``partial_bn``: the recipe's variant: frozen blocks' BatchNorm affine frozen, every layer's statistics fixed
  (`FreezeBatchNormCallback(all_batchnorm=True)`);
- ``partial_bn_affine``: the same, but the frozen blocks' BatchNorm affine ``weight`` / ``bias`` train
  (``train_groups=[..., "batchnorm"]``); statistics still fixed everywhere;
- ``partial_bn_train``: fastai's / Lightning's ``train_bn``: the frozen blocks' BatchNorm affine trains and, as
  those layers are then not frozen, they run in training mode (batch statistics, running statistics updated).

    python benchmarks/batchnorm_affine.py --output-dir outputs/bn-affine      # recipe defaults: ~6 min on 2 busy cores
    python benchmarks/batchnorm_affine.py --quick --output-dir /tmp/bn-quick  # smoke run (tests/test_lr_finder.py)

Writes ``results.json`` (one row per variant, the recipe's columns) to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def load_recipe() -> Any:
    spec = importlib.util.spec_from_file_location(
        "vision_fashion_mnist", ROOT / "recipes" / "vision_fashion_mnist.py"
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load the vision recipe from {ROOT / 'recipes'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def variants(recipe: Any) -> list[Any]:
    base = recipe.VARIANTS["partial_bn"]
    groups = (*base.train_groups, "batchnorm")
    return [
        base,
        dataclasses.replace(
            base, name="partial_bn_affine", label="partial, BN affine trains, stats fixed",
            description="as partial_bn, plus the frozen blocks' BatchNorm affine trains", train_groups=groups,
        ),
        dataclasses.replace(
            base, name="partial_bn_train", label="partial, train_bn (fastai)",
            description="frozen blocks' BatchNorm affine trains, their statistics update", train_groups=groups,
            freeze_all_batchnorm=False,
        ),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the recipe's --quick sizes")
    parser.add_argument("--output-dir", default="outputs/bn-affine")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    recipe = load_recipe()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe_args = recipe.build_parser().parse_args(["--quick"] if args.quick else [])
    settings = recipe.resolve_settings(recipe_args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = recipe.load_fashion_mnist(
        train_size=settings["train_size"], test_size=settings["test_size"], seed=settings["seed"]
    )
    rows: dict[str, Any] = {}
    started = time.perf_counter()
    for variant in variants(recipe):
        settings["lr"][variant.name] = settings["lr"]["partial_bn"]
        _, row = recipe.run_variant(variant, data, settings, out)
        rows[variant.name] = row
    results = {
        "settings": settings,
        "variants": rows,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, row in rows.items():
        print(
            f"{name:<18} acc {row['test_accuracy']:.4f}  loss {row['test_loss']:.3f}  "
            f"trainable {row['trainable_params']:,}  BN stats changed {row['bn_layers_stats_changed']}/"
            f"{row['bn_layers']}  train {row['train_time_s']:.0f} s"
        )
    return results


if __name__ == "__main__":
    main()

"""The Fashion-MNIST transfer recipe (``recipes/vision_fashion_mnist.py``) in ``--quick`` mode.

Four real `transformers.Trainer` runs of EfficientNet-Lite0 on a tiny Fashion-MNIST subset (32x32, one epoch):
the outputs are written, `FreezeBatchNormCallback` really keeps every BatchNorm running statistic bit-identical in
the ``partial_bn`` variant while the ``full`` fine-tune changes them, a crash loses only the running variant and a
re-run skips the finished ones. About 15-30 s on 2 cores.

Needs Debian's ``dataset-fashion-mnist``; without it the tests skip, unless ``TL_PLUGIN_REQUIRE_FASHION_MNIST=1``
(then they fail).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tl_plugin.callbacks.batchnorm import batchnorm_modules
from tl_plugin.vision import FASHION_MNIST_ROOT, EfficientNetLite0ForImageClassification

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "vision_fashion_mnist.py"
FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _require_fashion_mnist() -> None:
    missing = [name for name in FASHION_FILES if not (Path(FASHION_MNIST_ROOT) / name).is_file()]
    if not missing:
        return
    reason = (
        f"Fashion-MNIST is not installed ({FASHION_MNIST_ROOT} lacks {', '.join(missing)}): "
        f"apt-get install dataset-fashion-mnist"
    )
    if os.environ.get("TL_PLUGIN_REQUIRE_FASHION_MNIST") == "1":
        pytest.fail(f"{reason} (TL_PLUGIN_REQUIRE_FASHION_MNIST=1 makes this a failure)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("vision_fashion_mnist_recipe", RECIPE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _bn_buffers(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {key: buf.detach().clone() for key, buf in module.named_buffers(recurse=False)}
        for name, module in batchnorm_modules(model).items()
    }


def test_runs_are_parsed_in_canonical_order_and_checked(recipe):
    args = recipe.build_parser().parse_args(["--runs", "scratch,probe"])
    assert args.runs == ["probe", "scratch"]
    with pytest.raises(SystemExit):
        recipe.build_parser().parse_args(["--runs", "probe,linear"])
    with pytest.raises(SystemExit):
        recipe.build_parser().parse_args(["--lr", "full"])
    settings = recipe.resolve_settings(recipe.build_parser().parse_args(["--quick", "--lr", "full=5e-4"]))
    assert settings["image_size"] == 32
    assert settings["epochs"] == 1.0
    assert settings["lr"]["full"] == 5e-4
    assert settings["lr"]["probe"] == recipe.VARIANTS["probe"].lr


def test_quick_run_freezes_batchnorm_and_resumes_after_a_crash(recipe, tmp_path):
    _require_fashion_mnist()
    out = tmp_path / "fashion"
    argv = ["--quick", "--output-dir", str(out), "--threads", "1"]
    pretrained = EfficientNetLite0ForImageClassification.from_pretrained_lite0(num_labels=10)
    reference_bn = _bn_buffers(pretrained)
    reference_params = {n: p.detach().clone() for n, p in pretrained.named_parameters()}
    assert len(reference_bn) == 49

    # First run: a crash right after `full` has trained, before its result is saved.
    seen: dict[str, dict[str, object]] = {}

    def crash_in_full(name, model, result):
        seen[name] = {
            "bn": _bn_buffers(model),
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        }
        if name == "full":
            raise RuntimeError("simulated crash in full")

    with pytest.raises(RuntimeError, match="simulated crash"):
        recipe.main(argv, on_variant_end=crash_in_full)
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["variants"]) == ["probe", "partial_bn"]
    assert (out / "results.csv").is_file()

    # partial_bn: every BatchNorm buffer (running_mean, running_var, num_batches_tracked) is bit-identical to the
    # checkpoint, although the top blocks trained ...
    partial_bn = seen["partial_bn"]["bn"]
    for layer, buffers in reference_bn.items():
        for key, tensor in buffers.items():
            assert torch.equal(partial_bn[layer][key], tensor), f"partial_bn changed {layer}.{key}"
    partial_params = seen["partial_bn"]["params"]
    assert not torch.equal(
        partial_params["blocks.6.0.project_conv.weight"], reference_params["blocks.6.0.project_conv.weight"]
    )
    assert not torch.equal(
        partial_params["blocks.5.0.depthwise_bn.weight"], reference_params["blocks.5.0.depthwise_bn.weight"]
    )
    assert torch.equal(
        partial_params["blocks.4.0.project_conv.weight"], reference_params["blocks.4.0.project_conv.weight"]
    )
    # ... while the full fine-tune updated the running statistics of every BatchNorm layer.
    full = seen["full"]["bn"]
    changed = [
        layer
        for layer, buffers in reference_bn.items()
        if not torch.equal(full[layer]["running_mean"], buffers["running_mean"])
        and not torch.equal(full[layer]["running_var"], buffers["running_var"])
    ]
    assert len(changed) == len(reference_bn)
    # The linear probe changes no backbone tensor at all.
    probe = seen["probe"]
    assert all(
        torch.equal(probe["bn"][layer]["running_var"], b["running_var"]) for layer, b in reference_bn.items()
    )
    assert all(
        torch.equal(t, reference_params[n])
        for n, t in probe["params"].items()
        if not n.startswith("classifier")
    )

    # Second run, same output dir: only the variants that were not saved train.
    trained: list[str] = []
    results = recipe.main(argv, on_variant_end=lambda name, model, result: trained.append(name))
    assert trained == ["full", "scratch"]
    assert results["variants"]["probe"] == saved["variants"]["probe"]
    assert results["variants"]["partial_bn"] == saved["variants"]["partial_bn"]
    for name in ("results.json", "results.csv", "results.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "results.csv").open() as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["probe", "partial_bn", "full", "scratch"]
    for row in rows.values():
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
    variants = json.loads((out / "results.json").read_text())["variants"]
    assert variants["probe"]["trainable_params"] == 1280 * 10 + 10
    assert variants["full"]["trainable_params"] == variants["scratch"]["trainable_params"] == 3_383_818
    assert variants["probe"]["bn_layers_stats_changed"] == 0
    assert variants["partial_bn"]["bn_layers_stats_changed"] == 0
    assert variants["partial_bn"]["bn_layers_frozen_by_callback"] == 49
    assert variants["full"]["bn_layers_stats_changed"] == 49
    assert variants["scratch"]["bn_layers_stats_changed"] == 49

    # Third run: everything is done, nothing trains; other settings in the same folder are refused.
    trained.clear()
    recipe.main(argv, on_variant_end=lambda name, model, result: trained.append(name))
    assert trained == []
    with pytest.raises(SystemExit, match="other settings"):
        recipe.main([*argv, "--epochs", "2"])

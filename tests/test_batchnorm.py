"""FreezeBatchNormCallback / freeze_batchnorm: frozen BatchNorm layers keep their running stats through real Trainer
runs (gradient accumulation included) and are in eval mode in every forward, although the Trainer calls
``model.train()`` before every micro-batch."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from tl_plugin import freeze, unfreeze  # noqa: E402
from tl_plugin.callbacks.base import attach  # noqa: E402
from tl_plugin.callbacks.batchnorm import (  # noqa: E402
    FreezeBatchNormCallback,
    batchnorm_modules,
    freeze_batchnorm,
)

STEM_BN = "resnet.embedder.embedder.normalization"


# Tiny models: one intra-op thread is faster, and far faster on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, size: int = 32, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        # shifted and scaled, so that the batch statistics differ clearly from the initial running stats (0, 1)
        self.pixels = 2.0 + 3.0 * torch.randn(n, 3, size, size, generator=generator)
        self.labels = torch.randint(0, 3, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def tiny_resnet() -> ResNetForImageClassification:
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    config.num_labels = 3
    return ResNetForImageClassification(config)


def training_args(tmp_path, **overrides) -> TrainingArguments:
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1,
        seed=0,
    )  # fmt: skip
    values.update(overrides)
    return TrainingArguments(**values)


def bn_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: v.detach().clone() for k, v in module.state_dict().items()}
        for name, module in batchnorm_modules(model).items()
    }


def record_training_flags(model: nn.Module) -> dict[str, list[bool]]:
    """Forward hooks (they run after any pre-hook) recording `module.training` at each forward of every BN."""
    seen: dict[str, list[bool]] = {name: [] for name in batchnorm_modules(model)}
    for name, module in batchnorm_modules(model).items():
        module.register_forward_hook(lambda m, args, out, name=name: seen[name].append(m.training))
    return seen


def test_frozen_groups_batchnorm_fixed_through_a_real_trainer_run(tmp_path):
    model = tiny_resnet()
    freeze(model, ["embeddings", "blocks.0"])
    frozen_bn = [
        n for n in batchnorm_modules(model) if n == STEM_BN or n.startswith("resnet.encoder.stages.0.")
    ]
    trained_bn = [n for n in batchnorm_modules(model) if n.startswith("resnet.encoder.stages.1.")]
    assert len(frozen_bn) == 4
    assert len(trained_bn) == 4
    before = bn_state(model)
    seen = record_training_flags(model)
    callback = FreezeBatchNormCallback()
    trainer = attach(
        Trainer(model=model, args=training_args(tmp_path), train_dataset=RandomImages()), callback
    )
    trainer.train()

    after = bn_state(model)
    for name in frozen_bn:
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(after[name][key], before[name][key]), (name, key)
        # 3 optimizer steps x 2 micro-batches: 6 training forwards, all in eval mode
        assert seen[name] == [False] * 6, name
    for name in trained_bn:
        assert seen[name] == [True] * 6, name
        assert not torch.equal(after[name]["running_mean"], before[name]["running_mean"]), name
        assert not torch.equal(after[name]["running_var"], before[name]["running_var"]), name
        assert int(after[name]["num_batches_tracked"]) == 6, name
    # logged through Trainer.log, and the hooks are gone after training
    assert [e["tl/frozen_batchnorm"] for e in trainer.state.log_history if "tl/frozen_batchnorm" in e] == [
        4.0
    ]
    assert callback.handle is not None
    assert not callback.handle.active
    model.train()
    assert model.get_submodule(STEM_BN).training


def test_on_step_begin_alone_would_not_work(tmp_path):
    """Why a forward pre-hook: the Trainer calls model.train() after on_step_begin, before the forward."""

    class EvalOnStepBegin(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            for module in batchnorm_modules(model).values():
                module.eval()

    model = tiny_resnet()
    seen = record_training_flags(model)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=1, gradient_accumulation_steps=1),
        train_dataset=RandomImages(8),
        callbacks=[EvalOnStepBegin()],
    )
    trainer.train()
    assert seen[STEM_BN] == [True]


def test_all_batchnorm_with_affine_frozen(tmp_path):
    model = tiny_resnet()
    before = bn_state(model)
    seen = record_training_flags(model)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=2, gradient_accumulation_steps=1),
        train_dataset=RandomImages(8),
        callbacks=[FreezeBatchNormCallback(all_batchnorm=True, freeze_affine=True)],
    )
    trainer.train()
    after = bn_state(model)
    for name, module in batchnorm_modules(model).items():
        assert seen[name] == [False, False], name
        for key, value in before[name].items():  # stats and affine parameters
            assert torch.equal(after[name][key], value), (name, key)
        assert not module.weight.requires_grad
        assert not module.bias.requires_grad
    # the convolutions did train
    conv = model.get_submodule("resnet.embedder.embedder.convolution")
    assert conv.weight.requires_grad


def test_selectors_choose_the_layers_and_affine_stays_trainable_by_default():
    model = tiny_resnet()
    handle = freeze_batchnorm(model, ["blocks.1"])
    assert handle.module_names == tuple(n for n in batchnorm_modules(model) if ".stages.1." in n)
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    before = bn_state(model)
    model(pixel_values=torch.randn(2, 3, 32, 32))
    after = bn_state(model)
    for name in batchnorm_modules(model):
        frozen = name in handle.module_names
        assert torch.equal(after[name]["running_mean"], before[name]["running_mean"]) == frozen, name
    handle.remove()
    model.train()
    model(pixel_values=torch.randn(2, 3, 32, 32))
    assert int(model.get_buffer(f"{handle.module_names[0]}.num_batches_tracked")) == 1


def test_default_mode_follows_unfreezing():
    model = tiny_resnet()
    freeze(model, ["embeddings", "blocks"])
    handle = freeze_batchnorm(model)
    assert len(handle.frozen_module_names()) == 8
    unfreeze(model, "blocks.1")
    assert len(handle.frozen_module_names()) == 4
    seen = record_training_flags(model)
    model.train()
    model(pixel_values=torch.randn(2, 3, 32, 32))
    assert seen[STEM_BN] == [False]
    assert seen["resnet.encoder.stages.1.layers.0.layer.0.normalization"] == [True]
    handle.remove()


def test_sync_batchnorm_and_non_affine_layers_are_frozen():
    """SyncBatchNorm is a `_BatchNorm` subclass: it is found and frozen like the others."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False)),
    )
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert all(isinstance(m, nn.SyncBatchNorm) for m in batchnorm_modules(model).values())
    model[2].requires_grad_(False)  # the non-affine BN goes with its parent module
    handle = freeze_batchnorm(model)
    assert handle.frozen_module_names() == ["2.1"]
    handle.remove()
    handle = freeze_batchnorm(model, all_batchnorm=True)
    before = bn_state(model)
    model.train()
    model(torch.randn(2, 3, 8, 8))
    after = bn_state(model)
    assert all(torch.equal(after[n][k], before[n][k]) for n in before for k in before[n])
    handle.remove()


def test_invalid_arguments_are_clear():
    model = tiny_resnet()
    with pytest.raises(ValueError, match="not both"):
        FreezeBatchNormCallback(selectors=["head"], all_batchnorm=True)
    with pytest.raises(ValueError, match="match no BatchNorm layer"):
        freeze_batchnorm(model, "head")
    with pytest.raises(ValueError, match="Unknown selector"):
        freeze_batchnorm(model, "nonsense")
    with pytest.raises(ValueError, match="`freeze_affine` must be True or False"):
        FreezeBatchNormCallback(freeze_affine="yes")  # type: ignore[arg-type]
    bert = BertForSequenceClassification(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    )
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        freeze_batchnorm(bert, all_batchnorm=True)
    assert freeze_batchnorm(bert).module_names == ()


# --------------------------------------------------------------------------------------------- trainable BatchNorm
FROZEN_GROUPS = ["embeddings", "blocks.0"]


def frozen_group_layers(model: nn.Module) -> tuple[list[str], list[str]]:
    """(BatchNorm layers, other parameter names) of the frozen groups: the stem and stage 0."""
    bn = [n for n in batchnorm_modules(model) if n == STEM_BN or n.startswith("resnet.encoder.stages.0.")]
    others = [
        n
        for n, _ in model.named_parameters()
        if (n.startswith("resnet.embedder.") or n.startswith("resnet.encoder.stages.0."))
        and not any(n.startswith(layer + ".") for layer in bn)
    ]
    return bn, others


@pytest.mark.parametrize("statistics", ["fixed", "updated"])
def test_train_batchnorm_trains_the_affine_parameters_of_frozen_groups(tmp_path, statistics):
    model = tiny_resnet()
    freeze(model, FROZEN_GROUPS, train_batchnorm=True)
    bn, others = frozen_group_layers(model)
    assert len(bn) == 4
    assert others
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats_before = bn_state(model)
    # fixed: every layer's statistics held by the callback, affine trains; updated: the default mode leaves layers
    # with trainable parameters alone, so they normalise with batch statistics (fastai's / Lightning's train_bn)
    callback = (
        FreezeBatchNormCallback(all_batchnorm=True) if statistics == "fixed" else FreezeBatchNormCallback()
    )
    trainer = attach(
        Trainer(model=model, args=training_args(tmp_path), train_dataset=RandomImages()), callback
    )
    trainer.train()

    params = dict(model.named_parameters())
    for name in others:  # the convolutions of the frozen groups: bit-identical
        assert torch.equal(params[name], params_before[name]), name
    for layer in bn:  # their BatchNorm affine parameters trained
        for p in ("weight", "bias"):
            assert not torch.equal(params[f"{layer}.{p}"], params_before[f"{layer}.{p}"]), (layer, p)
    after = bn_state(model)
    for layer in bn:
        same = torch.equal(after[layer]["running_mean"], stats_before[layer]["running_mean"])
        assert same == (statistics == "fixed"), layer
    logged = [e["tl/frozen_batchnorm"] for e in trainer.state.log_history if "tl/frozen_batchnorm" in e]
    assert logged == ([8.0] if statistics == "fixed" else [0.0])


def test_without_train_batchnorm_the_frozen_groups_batchnorm_affine_stays(tmp_path):
    model = tiny_resnet()
    freeze(model, FROZEN_GROUPS)
    bn, _ = frozen_group_layers(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=RandomImages())
    trainer.train()
    params = dict(model.named_parameters())
    for layer in bn:
        assert torch.equal(params[f"{layer}.weight"], before[f"{layer}.weight"]), layer


def test_old_config_name_is_a_deprecated_alias():
    from tl_plugin.callbacks import batchnorm

    with pytest.warns(DeprecationWarning, match="use `FreezeBatchNormConfig`"):
        old = batchnorm.BatchNormFreezeConfig
    assert old is batchnorm.FreezeBatchNormConfig
    assert "BatchNormFreezeConfig" not in batchnorm.__all__
    with pytest.raises(AttributeError):
        _ = batchnorm.FreezeBatchNormConfiguration

"""Layer-wise optimizers (`tl_plugin.optim`): every parameter in named groups, lr = base x decay**depth at every
step of real Trainer runs (read from the optimizer during training, compared with schedule factors computed here
independently), frozen parameters untouched by AdamW's weight decay, wrapped-model names, PEFT adapters."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from tiny_models import (
    TINY_BERT_CONFIG,
    TINY_BERT_GROUP_PREFIXES,
    RandomTokens,
    build_lora_bert,
    build_tiny_bert,
)
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from tl_plugin import discover_layer_groups, freeze
from tl_plugin.callbacks import LayerwiseLRDecayCallback, attach
from tl_plugin.optim import (
    canonical_parameter_name,
    create_optimizer,
    layerwise_param_groups,
    optimizer_cls_and_kwargs,
)
from tl_plugin.trainer import TransferTrainer

N_BLOCKS = TINY_BERT_CONFIG["num_hidden_layers"]
#: Depth from the top of each tiny-BERT group, written out by hand (head/other 0, block i: 4 - i, embeddings 5).
DEPTH = {"head": 0, "other": 0, "blocks.3": 1, "blocks.2": 2, "blocks.1": 3, "blocks.0": 4, "embeddings": 5}


# Tiny models: one intra-op thread is faster, and far faster on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def training_args(tmp_path, **overrides: Any) -> TrainingArguments:
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return TrainingArguments(**values)


def group_by_prefix(name: str) -> str:
    """The tiny-BERT group of a parameter name, from the hand-written prefixes (not the discovery code)."""
    name = name.removeprefix("base_model.model.")
    return next(g for g, prefix in TINY_BERT_GROUP_PREFIXES.items() if name.startswith(prefix))


class LrRecorder(TrainerCallback):
    """Records, before each optimizer step, the lr of every param group (the lr that step uses)."""

    def __init__(self) -> None:
        self.lrs: dict[int, list[tuple[str, float]]] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[state.global_step] = [(g.get("group_name", "?"), g["lr"]) for g in optimizer.param_groups]


def linear(t: int, warmup: int, total: int) -> float:
    return t / warmup if t < warmup else max(0.0, (total - t) / (total - warmup))


def cosine(t: int, warmup: int, total: int) -> float:
    if t < warmup:
        return t / warmup
    progress = (t - warmup) / (total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def constant_with_warmup(t: int, warmup: int, total: int) -> float:
    return t / warmup if t < warmup else 1.0


# ------------------------------------------------------------------------------------------------ param groups
def test_param_groups_hold_every_parameter_once_with_decayed_lrs_and_no_decay_for_biases_and_norms():
    model = build_tiny_bert()
    groups = layerwise_param_groups(model, base_lr=1e-3, weight_decay=0.1, lr_decay=0.5)
    held = [p for g in groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        assert set(group) == {"params", "lr", "weight_decay", "group_name", "lr_scale"}
        assert group["lr_scale"] == 0.5 ** DEPTH[group["group_name"]]
        assert group["lr"] == pytest.approx(1e-3 * 0.5 ** DEPTH[group["group_name"]], rel=1e-12)
        for param in group["params"]:
            name = names[id(param)]
            assert group_by_prefix(name) == group["group_name"], name
            exempt = name.endswith("bias") or "LayerNorm" in name
            assert group["weight_decay"] == (0.0 if exempt else 0.1), name
    # the head's group comes first: the Trainer logs the lr of param group 0
    assert groups[0]["group_name"] == "head"


def test_no_decay_override_and_no_lr_decay_means_one_lr():
    model = build_tiny_bert()
    groups = layerwise_param_groups(model, base_lr=2e-3, weight_decay=0.1, no_decay=["classifier.bias"])
    assert {g["lr"] for g in groups} == {2e-3}
    exempt = [p for g in groups if g["weight_decay"] == 0.0 for p in g["params"]]
    assert exempt == [model.classifier.bias]


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), True, "0.8"])
def test_lr_decay_outside_0_1_is_rejected_everywhere(bad, tmp_path):
    model = build_tiny_bert()
    message = r"`lr_decay` must be a finite number in \(0, 1\]"
    with pytest.raises(ValueError, match=message):
        layerwise_param_groups(model, 1e-3, lr_decay=bad)
    with pytest.raises(ValueError, match=message):
        optimizer_cls_and_kwargs(model, training_args(tmp_path), lr_decay=bad)
    with pytest.raises(ValueError, match=message):
        LayerwiseLRDecayCallback(bad)
    with pytest.raises(ValueError, match=message):
        TransferTrainer(model=model, args=training_args(tmp_path), lr_decay=bad)


def test_wrapped_parameter_names_map_back_to_their_groups():
    assert canonical_parameter_name("module.bert.pooler.dense.weight") == "bert.pooler.dense.weight"
    assert (
        canonical_parameter_name(
            "_fsdp_wrapped_module.bert.encoder.layer.0._fsdp_wrapped_module.output.dense.bias"
        )
        == "bert.encoder.layer.0.output.dense.bias"
    )
    model = build_tiny_bert()
    groups = discover_layer_groups(model)

    class FakeFSDP(nn.Module):  # stands in for a wrapper that inserts `_fsdp_wrapped_module.` into the names
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._fsdp_wrapped_module = inner

    wrapped = FakeFSDP(model)
    assert next(iter(dict(wrapped.named_parameters()))).startswith("_fsdp_wrapped_module.")
    param_groups = layerwise_param_groups(wrapped, 1e-3, lr_decay=0.5, groups=groups)
    query = model.bert.encoder.layer[0].attention.self.query.weight
    assert any(p is query for g in param_groups if g["group_name"] == "blocks.0" for p in g["params"])
    assert sum(len(g["params"]) for g in param_groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="in no layer group"):
        layerwise_param_groups(nn.Linear(2, 2), 1e-3, groups=groups)


# ------------------------------------------------------------------------------------------------ real runs
@pytest.mark.parametrize(
    ("scheduler", "factor"),
    [("linear", linear), ("cosine", cosine), ("constant_with_warmup", constant_with_warmup)],
)
def test_effective_lr_of_every_group_is_base_times_decay_pow_depth_times_schedule(
    tmp_path, scheduler, factor
):
    recorder = LrRecorder()
    args = training_args(tmp_path, lr_scheduler_type=scheduler, warmup_steps=3, logging_steps=1)
    trainer = TransferTrainer(
        model=build_tiny_bert(), args=args, train_dataset=RandomTokens(), callbacks=[recorder], lr_decay=0.7
    )
    trainer.train()
    assert sorted(recorder.lrs) == list(range(12))
    for step in (0, 1, 3, 5, 8, 11):
        expected_factor = factor(step, 3, 12)
        for name, lr in recorder.lrs[step]:
            assert lr == pytest.approx(1e-3 * 0.7 ** DEPTH[name] * expected_factor, rel=1e-9, abs=1e-15), (
                step,
                name,
            )
    # the Trainer logs the lr of param group 0, the head's: the base lr times the schedule factor
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert logged == pytest.approx([1e-3 * factor(t, 3, 12) for t in range(12)], rel=1e-6, abs=1e-15)


@pytest.mark.parametrize("how", ["optimizer_cls_and_kwargs", "attach", "create_optimizer"])
def test_plain_trainer_gets_the_same_layerwise_lrs(tmp_path, how):
    model = build_tiny_bert()
    args = training_args(tmp_path, max_steps=4, lr_scheduler_type="linear")
    recorder = LrRecorder()
    kwargs: dict[str, Any] = {}
    if how == "optimizer_cls_and_kwargs":
        kwargs["optimizer_cls_and_kwargs"] = optimizer_cls_and_kwargs(model, args, lr_decay=0.5)
    elif how == "create_optimizer":
        kwargs["optimizers"] = (create_optimizer(model, args, lr_decay=0.5), None)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[recorder], **kwargs)
    if how == "attach":
        attach(trainer, LayerwiseLRDecayCallback(0.5))
    trainer.train()
    for step in (0, 2):
        for name, lr in recorder.lrs[step]:
            assert lr == pytest.approx(1e-3 * 0.5 ** DEPTH[name] * linear(step, 0, 4), rel=1e-9), (step, name)
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}


def test_layerwise_callback_alone_in_a_plain_trainer_rebuilds_the_optimizer_at_train_start(tmp_path):
    model = build_tiny_bert()
    recorder = LrRecorder()
    args = training_args(tmp_path, max_steps=4, weight_decay=0.1)
    callback = LayerwiseLRDecayCallback(0.5)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[callback, recorder])
    trainer.train()
    assert callback.trainer is None  # never bound: nothing looks for the trainer
    for name, lr in recorder.lrs[1]:
        assert lr == pytest.approx(1e-3 * 0.5 ** DEPTH[name] * linear(1, 0, 4), rel=1e-9), name
    # the same groups, lrs and weight decays as the layer-wise factory builds
    reference = create_optimizer(build_tiny_bert(), args, lr_decay=0.5)
    built = trainer.optimizer.param_groups
    assert [(g["group_name"], len(g["params"]), g["weight_decay"], g["initial_lr"]) for g in built] == [
        (g["group_name"], len(g["params"]), g["weight_decay"], g["lr"]) for g in reference.param_groups
    ]
    assert {id(p) for g in built for p in g["params"]} == {id(p) for p in model.parameters()}
    logged = [e for e in trainer.state.log_history if "tl/lr_scale/blocks.0" in e]
    assert logged[0]["tl/lr_scale/blocks.0"] == 0.5**4


def test_an_unattached_callback_with_a_reporting_integration_stops_naming_attach(tmp_path):
    from transformers.integrations import get_available_reporting_integrations

    if "tensorboard" not in get_available_reporting_integrations():
        pytest.skip("no TensorBoard writer installed (tensorboard or tensorboardX)")
    model = build_tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(tmp_path, max_steps=2, report_to=["tensorboard"])
    trainer = Trainer(
        model=model, args=args, train_dataset=RandomTokens(), callbacks=[LayerwiseLRDecayCallback(0.5)]
    )
    with pytest.raises(
        ValueError, match=r"^LayerwiseLRDecayCallback cannot send .* `tl_plugin.attach\(trainer"
    ):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # attached, the same run trains and logs through `Trainer.log`
    attached = attach(
        Trainer(model=model, args=args, train_dataset=RandomTokens()), LayerwiseLRDecayCallback(0.5)
    )
    attached.train()
    assert any("tl/lr_scale/blocks.0" in e for e in attached.state.log_history)


def test_layerwise_callback_with_your_own_optimizer_fails_before_training_and_names_the_fix(tmp_path):
    model = build_tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=RandomTokens(),
        optimizers=(torch.optim.AdamW(model.parameters(), lr=1e-3), None),
        callbacks=[LayerwiseLRDecayCallback(0.8)],
    )
    with pytest.raises(ValueError, match=r"optimizer_cls_and_kwargs\(model, training_args, lr_decay=0.8\)"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_layerwise_callback_rejects_an_optimizer_built_with_another_decay(tmp_path):
    model = build_tiny_bert()
    args = training_args(tmp_path)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomTokens(),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, args, lr_decay=0.5),
        callbacks=[LayerwiseLRDecayCallback(0.8)],
    )
    with pytest.raises(ValueError, match=r"lr_scale 0\.5, expected 0\.8"):
        trainer.train()


def test_frozen_parameters_get_no_update_no_weight_decay_and_no_optimizer_state(tmp_path):
    model = build_tiny_bert()
    freeze(model, ["embeddings", "blocks[:2]"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(tmp_path, weight_decay=0.5, learning_rate=1e-2)
    trainer = TransferTrainer(model=model, args=args, train_dataset=RandomTokens(), lr_decay=0.9)
    trainer.train()
    optimizer = trainer.optimizer
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}  # frozen ones are in the optimizer ...
    for name, param in model.named_parameters():
        if group_by_prefix(name) in ("embeddings", "blocks.0", "blocks.1"):
            assert torch.equal(param, before[name]), name  # ... untouched, even by weight decay 0.5
            assert param.grad is None, name
            assert param not in optimizer.state, name
        else:
            assert not torch.equal(param, before[name]), name
            assert param in optimizer.state, name


def test_peft_lora_adapters_get_their_own_groups_at_the_base_lr(tmp_path):
    pytest.importorskip("peft")
    model = build_lora_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    recorder = LrRecorder()
    args = training_args(tmp_path, max_steps=4, learning_rate=1e-2)
    trainer = TransferTrainer(
        model=model, args=args, train_dataset=RandomTokens(), callbacks=[recorder], lr_decay=0.5
    )
    trainer.train()
    lrs = dict(recorder.lrs[1])
    assert lrs["adapters"] == pytest.approx(1e-2 * linear(1, 0, 4))
    assert lrs["blocks.0"] == pytest.approx(1e-2 * 0.5**4 * linear(1, 0, 4))
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
            assert param not in trainer.optimizer.state, name
    assert any("lora_A" in n for n in trainable)


def test_optim_has_no_upward_re_export():
    # TransferTrainer lives in tl_plugin.trainer (above the callbacks); tl_plugin.optim sits below and names nothing
    # from there, not even lazily.
    import tl_plugin.optim as optim

    assert not hasattr(optim, "TransferTrainer")
    assert not hasattr(optim, "__getattr__")

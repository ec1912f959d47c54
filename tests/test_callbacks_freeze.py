"""Freeze callbacks in real `transformers.Trainer` runs: frozen parameters bit-identical, unfrozen ones changed, a
parameter unfrozen at step k identical before k and changed after, lrs read from the optimizer during training
(per-phase lr, LR warm restart), gradient accumulation, PEFT LoRA, and bad input rejected before training."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from tiny_models import (
    TINY_BERT_GROUP_PREFIXES,
    RandomTokens,
    build_lora_bert,
    build_tiny_bert,
    tiny_bert_params,
)
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.training_args import ParallelMode

from tl_plugin import TransferConfig, freeze
from tl_plugin.callbacks import (
    FreezeSchedule,
    FreezeScheduleCallback,
    GradualUnfreezingCallback,
    LayerwiseLRDecayCallback,
    LinearProbeThenFineTuneCallback,
    TrainingHistoryCallback,
    TransferCallback,
    attach,
)
from tl_plugin.callbacks.schedules import SCHEDULE_STATE_FILE
from tl_plugin.trainer import TransferTrainer

ALL_GROUPS = list(TINY_BERT_GROUP_PREFIXES)  # embeddings, blocks.0-3, other, head


# Tiny models: one intra-op thread is faster, and far faster on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def training_args(tmp_path, **overrides: Any) -> TrainingArguments:
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return TrainingArguments(**values)


class StepRecorder(TrainerCallback):
    """Before each optimizer step (after the schedule callbacks, which come first in the list): requires_grad of
    every parameter, the lr of every param group, and a copy of every parameter."""

    def __init__(self) -> None:
        self.requires_grad: dict[int, dict[str, bool]] = {}
        self.lrs: dict[int, list[float]] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        self.requires_grad[step] = {n: p.requires_grad for n, p in model.named_parameters()}
        self.lrs[step] = [g["lr"] for g in optimizer.param_groups]
        self.weights[step] = {n: p.detach().clone() for n, p in model.named_parameters()}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model: torch.nn.Module, before: dict[str, torch.Tensor], names) -> list[str]:
    params = dict(model.named_parameters())
    return [n for n in names if not torch.equal(params[n], before[n])]


def run(tmp_path, callback, *, model=None, trainer_cls=Trainer, recorder=True, **overrides):
    model = model if model is not None else build_tiny_bert()
    before = snapshot(model)
    record = StepRecorder()
    callbacks = [callback] + ([record] if recorder else [])
    kwargs: dict[str, Any] = {}
    if overrides.get("eval_strategy", "no") != "no":
        kwargs["eval_dataset"] = RandomTokens(16, seed=1)
    trainer = trainer_cls(
        model=model,
        args=training_args(tmp_path, **overrides),
        train_dataset=RandomTokens(),
        callbacks=callbacks,
        **kwargs,
    )
    trainer.train()
    return trainer, model, before, record


def linear(t: int, warmup: int, total: int) -> float:
    return t / warmup if t < warmup else max(0.0, (total - t) / (total - warmup))


def cosine(t: int, warmup: int, total: int) -> float:
    if t < warmup:
        return t / warmup
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / (total - warmup))))


# ================================================================================================ TransferCallback
def test_transfer_callback_freezes_before_the_optimizer_and_logs_the_report(tmp_path):
    callback = TransferCallback(TransferConfig(strategy="layers", train_groups=["blocks[-1:]", "head"]))
    trainer, model, before, _ = run(tmp_path, callback, gradient_accumulation_steps=2, weight_decay=0.5)
    trained = tiny_bert_params(model, "blocks.3", "head")
    frozen = [n for n, _ in model.named_parameters() if n not in trained]
    assert changed(model, before, frozen) == []
    assert sorted(changed(model, before, trained)) == sorted(trained)
    params = dict(model.named_parameters())
    assert all(params[n].grad is None and params[n] not in trainer.optimizer.state for n in frozen)
    # frozen before the optimizer was built: the default Trainer optimizer holds only the trained parameters
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(params[n]) for n in trained
    }
    logged = [e for e in trainer.state.log_history if "tl/trainable_params" in e]
    assert len(logged) == 1
    assert logged[0]["step"] == 0
    assert logged[0]["tl/phase"] == 0
    assert logged[0]["tl/trainable_params"] == sum(params[n].numel() for n in trained)
    assert "blocks.3" in callback.events[0]["message"]
    assert "trainable" in callback.events[0]["message"]


def test_transfer_callback_partial_reinitialises_once_at_init(tmp_path):
    model = build_tiny_bert()
    before = snapshot(model)
    config = TransferConfig(strategy="partial", reinit_top_k=1, freeze_transferred=True, reinit_seed=3)
    Trainer(model=model, args=training_args(tmp_path), callbacks=[TransferCallback(config)])
    # re-initialised at the end of Trainer(...) (biases and LayerNorms re-initialise to the same 0 / 1)
    top = [n for n in tiny_bert_params(model, "blocks.3") if n.endswith("weight") and "LayerNorm" not in n]
    assert changed(model, before, top) == top
    assert changed(model, before, tiny_bert_params(model, "blocks.0", "embeddings")) == []
    assert [n for n, p in model.named_parameters() if p.requires_grad] == tiny_bert_params(
        model, "blocks.3", "other", "head"
    )


def test_transfer_config_lr_decay_makes_a_plain_trainer_build_layerwise_groups(tmp_path):
    callback = TransferCallback(TransferConfig(strategy="layers", freeze_bottom_blocks=2, lr_decay=0.5))
    trainer, model, before, record = run(tmp_path, callback, max_steps=3)
    depth = {
        "head": 0,
        "other": 0,
        "blocks.3": 1,
        "blocks.2": 2,
        "blocks.1": 3,
        "blocks.0": 4,
        "embeddings": 5,
    }
    names = [g["group_name"] for g in trainer.optimizer.param_groups]
    assert record.lrs[1] == pytest.approx([1e-2 * 0.5 ** depth[n] * linear(1, 0, 3) for n in names], rel=1e-9)
    frozen = tiny_bert_params(model, "embeddings", "blocks.0", "blocks.1")
    assert changed(model, before, frozen) == []
    params = dict(model.named_parameters())
    assert all(params[n] not in trainer.optimizer.state for n in frozen)


# ================================================================================================ gradual unfreezing
def test_gradual_unfreezing_by_steps_with_gradient_accumulation(tmp_path):
    # 32 examples, batch 8, accumulation 2: 2 optimizer steps per epoch; unfreeze one group every 3 steps
    callback = GradualUnfreezingCallback(every_n_steps=3)
    trainer, model, before, record = run(
        tmp_path, callback, gradient_accumulation_steps=2, weight_decay=0.3, max_steps=12
    )
    order = ["head", "other", "blocks.3", "blocks.2", "blocks.1", "blocks.0", "embeddings"]
    unfrozen_at = {
        group: 3 * i for i, group in enumerate(order) if 3 * i < 12
    }  # head 0, other 3, ... blocks.1 9
    assert sorted(record.requires_grad) == list(range(12))
    for group in order:
        names = tiny_bert_params(model, group)
        start = unfrozen_at.get(group)
        for step in range(12):
            trainable = start is not None and step >= start
            assert all(record.requires_grad[step][n] is trainable for n in names), (group, step)
            if not trainable:  # identical until the step it is unfrozen at
                assert changed(model, record.weights[step], []) == []
                assert all(torch.equal(record.weights[step][n], before[n]) for n in names), (group, step)
        if (
            start is None
        ):  # never unfrozen: bit-identical (weight decay 0.3 never touched it), no grad, no state
            assert changed(model, before, names) == [], group
            params = dict(model.named_parameters())
            assert all(params[n].grad is None and params[n] not in trainer.optimizer.state for n in names)
        else:
            assert sorted(changed(model, before, names)) == sorted(names), group
    # with a plain Trainer, every parameter the rule could ever unfreeze is in the optimizer from the start
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    phases = [(e["step"], e["tl/phase"]) for e in trainer.state.log_history if "tl/phase" in e]
    assert phases == [(0, 0), (3, 1), (6, 2), (9, 3)]


def test_gradual_unfreezing_by_epochs_k_groups_at_a_time_with_explicit_boundaries(tmp_path):
    # 4 optimizer steps per epoch; 2 groups at a time at epochs 1 and 2.5
    callback = GradualUnfreezingCallback(epochs=[1, 2.5], groups_per_phase=2)
    trainer, model, before, record = run(tmp_path, callback, max_steps=-1, num_train_epochs=3)
    assert [callback.trainable_groups(k) for k in range(3)] == [
        ["other", "head"],
        ["blocks.2", "blocks.3", "other", "head"],
        ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "other", "head"],
    ]
    # 4 optimizer steps per epoch: epoch 1 is step 4, epoch 2.5 step 10
    first_trainable = {"head": 0, "other": 0, "blocks.3": 4, "blocks.2": 4, "blocks.1": 10, "blocks.0": 10}
    for group, first in first_trainable.items():
        name = tiny_bert_params(model, group)[0]
        assert [record.requires_grad[s][name] for s in range(12)] == [s >= first for s in range(12)], group
        assert all(torch.equal(record.weights[first][n], before[n]) for n in tiny_bert_params(model, group))
    assert changed(model, before, tiny_bert_params(model, "embeddings")) == []
    assert changed(model, before, tiny_bert_params(model, "blocks.0")) != []


def test_peft_lora_model_only_non_adapter_groups_are_touched(tmp_path):
    pytest.importorskip("peft")
    model = build_lora_bert()
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    callback = GradualUnfreezingCallback(every_n_steps=2, max_groups=3)  # head, other, blocks.3
    trainer, model, before, record = run(tmp_path, callback, model=model, max_steps=6)
    for step in range(6):
        assert all(record.requires_grad[step][n] for n in lora), step  # PEFT's choice, never changed
    assert sorted(changed(model, before, lora)) == sorted(lora)
    prefix = "base_model.model."
    never = [n for n in tiny_bert_params(model, "embeddings", "blocks.0", prefix=prefix) if "lora_" not in n]
    assert changed(model, before, never) == []
    block3 = [n for n in tiny_bert_params(model, "blocks.3", prefix=prefix) if "lora_" not in n]
    assert not record.requires_grad[3][block3[0]]
    assert record.requires_grad[4][block3[0]]
    assert all(torch.equal(record.weights[4][n], before[n]) for n in block3)  # untouched before step 4 ...
    assert changed(model, before, [block3[0]]) == [block3[0]]  # ... it trains from step 4 on
    assert callback.trainable_groups() == ["blocks.3", "other", "head"]


# ================================================================================================ LP-FT
@pytest.mark.parametrize(("scheduler", "factor"), [("linear", linear), ("cosine", cosine)])
def test_lpft_switches_at_n_steps_and_restarts_the_lr_schedule(tmp_path, scheduler, factor):
    callback = LinearProbeThenFineTuneCallback(probe_steps=4, warm_restart=True, restart_warmup_steps=2)
    trainer, model, before, record = run(
        tmp_path, callback, max_steps=12, lr_scheduler_type=scheduler, warmup_steps=1
    )
    head = tiny_bert_params(model, "head")
    body = [n for n, _ in model.named_parameters() if n not in head]
    assert all(torch.equal(record.weights[4][n], before[n]) for n in body)  # probe: only the head moved
    assert changed(model, record.weights[0], head) == head
    assert sorted(changed(model, record.weights[4], body)) == sorted(body)  # then everything
    for step in range(12):
        expected = 1e-2 * (factor(step, 1, 12) if step < 4 else factor(step - 4, 2, 8))
        assert record.lrs[step] == pytest.approx([expected] * len(record.lrs[step]), abs=1e-12), step


def test_lpft_until_plateau_then_a_transfer_config(tmp_path):
    # min_delta so large that nothing counts as an improvement: the second evaluation (step 4) ends the probe
    callback = LinearProbeThenFineTuneCallback(
        plateau={"metric": "loss", "patience": 1, "min_delta": 1e9},
        then=TransferConfig(strategy="layers", freeze_bottom_blocks=2),
        probe_lr=5e-3,
    )
    trainer, model, before, record = run(
        tmp_path, callback, max_steps=10, eval_strategy="steps", eval_steps=2
    )
    assert callback.trainable_groups(1) == ["blocks.2", "blocks.3", "other", "head"]
    phases = [(e["step"], e["tl/phase"]) for e in trainer.state.log_history if "tl/phase" in e]
    assert phases == [(0, 0), (4, 1)]
    assert record.lrs[3] == pytest.approx([5e-3 * linear(3, 0, 10)] * 2)  # probe lr
    assert record.lrs[4] == pytest.approx([1e-2 * linear(4, 0, 10)] * 2)  # back to learning_rate
    assert changed(model, before, tiny_bert_params(model, "embeddings", "blocks.0", "blocks.1")) == []
    assert all(torch.equal(record.weights[4][n], before[n]) for n in tiny_bert_params(model, "blocks.2"))


# ================================================================================================ YAML schedule
SCHEDULE_YAML = """
phases:
  - name: probe
    train: [head]
    until_step: 3
    lr: 2.0e-2
  - train: [head, other, "blocks[-2:]"]
    until_epoch: 1.5
  - train: [all]
    lr: 5.0e-3
"""


@pytest.mark.parametrize("trainer_cls", [TransferTrainer, Trainer])
def test_yaml_schedule_with_per_phase_lr_and_layerwise_decay(tmp_path, trainer_cls):
    # with a plain Trainer, the decay callback (after the schedule in the list, never bound) rebuilds the optimizer
    # at train start, after the schedule applied phase 0's lr: the schedule re-applies it before the first step
    path = tmp_path / "schedule.yaml"
    path.write_text(SCHEDULE_YAML)
    callback = FreezeScheduleCallback(str(path))
    recorder = StepRecorder()
    model = build_tiny_bert()
    before = snapshot(model)
    trainer = trainer_cls(
        model=model,
        args=training_args(tmp_path, max_steps=10),
        train_dataset=RandomTokens(),
        callbacks=[callback, LayerwiseLRDecayCallback(0.5), recorder],
    )
    trainer.train()
    depth = {
        "head": 0,
        "other": 0,
        "blocks.3": 1,
        "blocks.2": 2,
        "blocks.1": 3,
        "blocks.0": 4,
        "embeddings": 5,
    }
    names = [g["group_name"] for g in trainer.optimizer.param_groups]
    for step in range(10):
        base = 2e-2 if step < 3 else (1e-2 if step < 6 else 5e-3)  # 4 steps per epoch: epoch 1.5 = step 6
        expected = [base * 0.5 ** depth[n] * linear(step, 0, 10) for n in names]
        assert recorder.lrs[step] == pytest.approx(expected, rel=1e-9, abs=1e-15), step
    assert all(torch.equal(recorder.weights[6][n], before[n]) for n in tiny_bert_params(model, "blocks.1"))
    assert changed(model, before, tiny_bert_params(model, "blocks.1", "embeddings")) != []
    assert all(torch.equal(recorder.weights[3][n], before[n]) for n in tiny_bert_params(model, "blocks.3"))


def test_schedule_state_is_saved_by_parameter_names_in_each_checkpoint(tmp_path):
    import json

    callback = GradualUnfreezingCallback(every_n_steps=2)
    run(tmp_path, callback, max_steps=4, save_strategy="steps", save_steps=2, recorder=False)
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / SCHEDULE_STATE_FILE).read_text())
    assert saved["phase"] == 0
    assert saved["global_step"] == 2
    assert saved["trainable_groups"] == ["head"]
    assert saved["requires_grad"]["classifier.weight"] is True
    assert saved["requires_grad"]["bert.pooler.dense.weight"] is False
    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    entry = state["stateful_callbacks"]["GradualUnfreezingCallback"]
    assert entry["args"]["every_n_steps"] == 2
    assert entry["attributes"]["_tl_resume"]["phase"] == 1


# ================================================================================================ bad input
def test_a_group_that_does_not_exist_fails_in_trainer_construction(tmp_path):
    callback = FreezeScheduleCallback(
        {"phases": [{"train": ["head"], "until_step": 2}, {"train": ["blocks.7"]}]}
    )
    with pytest.raises(ValueError, match=r"`phases\[1\].train`=\['blocks.7'\].*blocks \(0-3") as info:
        Trainer(model=build_tiny_bert(), args=training_args(tmp_path), callbacks=[callback])
    assert "embeddings, other, head" in str(info.value)
    with pytest.raises(ValueError, match=r"`then`=\['decoder'\]"):
        Trainer(
            model=build_tiny_bert(),
            args=training_args(tmp_path),
            callbacks=[LinearProbeThenFineTuneCallback(probe_steps=2, then=["decoder"])],
        )


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (
            FreezeScheduleCallback({"phases": [{"train": ["head"], "until_step": 50}, {"train": ["all"]}]}),
            r"`phases\[0\].until_step`=50 is not before the end of training \(max_steps=12\).*valid: 1 to 11",
        ),
        (GradualUnfreezingCallback(steps=[2, 30]), r"`steps\[1\]`=30 is not before the end"),
        (
            GradualUnfreezingCallback(epochs=[1, 3]),
            r"`epochs\[1\]`=3 is not before the end of training \(3 epochs",
        ),
        (LinearProbeThenFineTuneCallback(probe_steps=12), r"`probe_steps`=12"),
    ],
)
def test_boundaries_beyond_the_training_length_fail_before_the_first_step(tmp_path, callback, message):
    model = build_tiny_bert()
    before = snapshot(model)
    trainer = Trainer(
        model=model, args=training_args(tmp_path), train_dataset=RandomTokens(), callbacks=[callback]
    )
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0
    assert changed(model, before, before) == []


def test_a_rule_past_the_end_of_training_is_fine(tmp_path):
    callback = GradualUnfreezingCallback(every_n_epochs=10)
    _, model, before, _ = run(tmp_path, callback, max_steps=4, recorder=False)
    assert changed(model, before, tiny_bert_params(model, "head"))
    assert callback.phase == 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GradualUnfreezingCallback(every_n_epochs=1, every_n_steps=2), "Give one of"),
        (
            lambda: GradualUnfreezingCallback(steps=[3, 2]),
            r"`steps` must be a non-empty, strictly increasing",
        ),
        (lambda: GradualUnfreezingCallback(groups_per_phase=0), "`groups_per_phase` must be an integer >= 1"),
        (
            lambda: GradualUnfreezingCallback(groups_per_phase=True),
            r"`groups_per_phase` must be an integer >= 1, got True",
        ),
        (
            lambda: GradualUnfreezingCallback(every_n_epochs=0),
            r"`every_n_epochs` must be a finite number > 0, got 0",
        ),
        (
            lambda: FreezeSchedule.from_dict({"phases": [{"train": ["head"], "until_epoch": float("inf")}]}),
            r"`until_epoch` must be a finite number > 0, got inf",
        ),
        (
            lambda: FreezeSchedule.from_dict(
                {"phases": [{"train": ["head"], "until_step": 2, "warm_restart": "yes"}]}
            ),
            r"`warm_restart` must be True or False, got 'yes'",
        ),
        (
            lambda: FreezeSchedule.from_dict(
                {"phases": [{"train": ["head"], "until_plateau": {"min_delta": -1}}, {"train": ["all"]}]}
            ),
            r"`min_delta` must be a finite number >= 0, got -1",
        ),
        (
            lambda: TrainingHistoryCallback(every_n_steps=False),
            r"`every_n_steps` must be an integer >= 1, got False",
        ),
        (lambda: LinearProbeThenFineTuneCallback(), "needs the length of the probe"),
        (
            lambda: FreezeSchedule.from_dict({"phases": [{"train": ["head"]}, {"train": ["all"]}]}),
            "needs an end",
        ),
        (
            lambda: FreezeSchedule.from_dict(
                {"phases": [{"train": ["head"], "until_step": 2}, {"train": ["x"], "until_step": 4}]}
            ),
            "The last phase",
        ),
        (
            lambda: FreezeSchedule.from_dict(
                {
                    "phases": [
                        {"train": ["head"], "until_step": 4},
                        {"train": ["x"], "until_step": 2},
                        {"train": ["x"]},
                    ]
                }
            ),
            r"`phases\[1\].until_step`=2 must be greater than `phases\[0\].until_step`=4",
        ),
        (lambda: FreezeSchedule.from_yaml("phases:\n  - {train: [head], untill_step: 3}\n"), "untill_step"),
        (
            lambda: FreezeSchedule.from_yaml(
                "phases:\n  - {train: [head], until_plateau: {mode: up}}\n  - {train: [all]}"
            ),
            "`mode` must be one of 'min', 'max', got 'up'",
        ),
        (lambda: FreezeSchedule.from_dict({"phases": [{"train": ["adapters"]}]}), "may not name 'adapters'"),
    ],
)
def test_bad_configurations_are_rejected_with_the_argument_and_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_malformed_schedule_file_names_the_file_line_and_column(tmp_path):
    from tl_plugin.config import ConfigFileError

    path = tmp_path / "schedule.yaml"
    path.write_text("phases:\n  - train: [head]\n    until_step: 3\n   - train: [all]\n")  # misindented item
    expected = f"Freeze schedule file {str(path)!r} cannot be parsed at line 4, column 4: invalid YAML: "
    with pytest.raises(ConfigFileError) as info:
        FreezeSchedule.load(path)
    assert str(info.value).startswith(expected), str(info.value)
    assert (info.value.path, info.value.line, info.value.column) == (path, 4, 4)
    # a path given to the callback goes through load
    with pytest.raises(ValueError, match=re.escape(expected)):
        FreezeScheduleCallback(str(path))


def test_a_schedule_file_with_a_tab_names_the_line(tmp_path):
    path = tmp_path / "schedule.yml"
    path.write_text("phases:\n\t- {train: [all]}\n")
    with pytest.raises(ValueError, match=re.escape(f"{str(path)!r} cannot be parsed at line 2, column 1")):
        FreezeSchedule.load(path)


def test_two_freeze_schedules_conflict_before_training(tmp_path):
    first, second = GradualUnfreezingCallback(), LinearProbeThenFineTuneCallback(probe_steps=2)
    with pytest.raises(ValueError, match="Conflicting callbacks: GradualUnfreezingCallback and LinearProbe"):
        Trainer(model=build_tiny_bert(), args=training_args(tmp_path), callbacks=[first, second])
    with pytest.raises(
        ValueError, match="Conflicting callbacks: TransferCallback and FreezeScheduleCallback"
    ):
        TransferTrainer(
            model=build_tiny_bert(),
            args=training_args(tmp_path),
            callbacks=[
                TransferCallback(TransferConfig()),
                FreezeScheduleCallback({"phases": [{"train": ["all"]}]}),
            ],
        )
    trainer = Trainer(model=build_tiny_bert(), args=training_args(tmp_path), train_dataset=RandomTokens())
    with pytest.raises(ValueError, match="Conflicting callbacks"):
        attach(trainer, LayerwiseLRDecayCallback(0.5), LayerwiseLRDecayCallback(0.9))
    # one callback per Trainer: no conflict between two Trainers built on the same model
    model = build_tiny_bert()
    Trainer(model=model, args=training_args(tmp_path), callbacks=[GradualUnfreezingCallback()])
    Trainer(model=model, args=training_args(tmp_path), callbacks=[GradualUnfreezingCallback()])


def test_plateau_without_evaluation_is_rejected(tmp_path):
    callback = LinearProbeThenFineTuneCallback(plateau={"metric": "eval_loss"})
    trainer = Trainer(
        model=build_tiny_bert(),
        args=training_args(tmp_path),
        train_dataset=RandomTokens(),
        callbacks=[callback],
    )
    with pytest.raises(ValueError, match="`TrainingArguments.eval_strategy` is 'no'"):
        trainer.train()


def test_an_optimizer_without_the_parameters_to_unfreeze_is_rejected(tmp_path):
    model = build_tiny_bert()
    freeze(model, "embeddings")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=RandomTokens(),
        optimizers=(optimizer, None),
        callbacks=[GradualUnfreezingCallback(every_n_steps=1)],
    )
    with pytest.raises(ValueError, match=r"optimizer does not hold \(groups \['embeddings'\]"):
        trainer.train()


def test_callback_added_after_construction_still_trains_every_group_it_unfreezes(tmp_path):
    model = build_tiny_bert()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=RandomTokens())
    callback = FreezeScheduleCallback(
        {"phases": [{"train": ["head"], "until_step": 2}, {"train": ["blocks.0"]}]}
    )
    attach(trainer, callback)  # bound before train(): it prepares the model then
    before = snapshot(model)
    trainer.train()
    assert changed(model, before, tiny_bert_params(model, "blocks.0")) != []
    assert changed(model, before, tiny_bert_params(model, "blocks.1")) == []


def test_ddp_without_find_unused_parameters_is_rejected_naming_the_field(tmp_path):
    class DistributedArgs:  # the two fields the check reads, as a 2-process DDP run would have them
        parallel_mode = ParallelMode.DISTRIBUTED
        ddp_find_unused_parameters = None
        seed = 0

    callback = GradualUnfreezingCallback()
    with pytest.raises(ValueError, match=r"`TrainingArguments.ddp_find_unused_parameters=True` \(got None\)"):
        callback.on_init_end(DistributedArgs(), TrainerState(), TrainerControl(), model=build_tiny_bert())  # type: ignore[arg-type]
    DistributedArgs.ddp_find_unused_parameters = True  # type: ignore[assignment]
    callback.on_init_end(DistributedArgs(), TrainerState(), TrainerControl(), model=build_tiny_bert())  # type: ignore[arg-type]
    # a static transfer freezes before the wrap: DDP never sees a parameter change, no flag needed
    DistributedArgs.ddp_find_unused_parameters = None  # type: ignore[assignment]
    static = TransferCallback(TransferConfig(strategy="layers", freeze_bottom_blocks=2))
    static.on_init_end(DistributedArgs(), TrainerState(), TrainerControl(), model=build_tiny_bert())  # type: ignore[arg-type]

"""Schedule export: gradual unfreezing and LP-FT write the phases they run on a model as the YAML that
`FreezeScheduleCallback` reads, and that YAML, run through `FreezeScheduleCallback`, trains bit-identically to the
generator. The expected YAML content is written out by hand from the tiny BERT's groups (head, other, blocks.3 ...)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import yaml
from tiny_models import RandomTokens, build_tiny_bert
from transformers import PrinterCallback, Trainer, TrainingArguments

from tl_plugin import LayerDiscoveryError, TransferConfig
from tl_plugin.callbacks import (
    FreezeSchedule,
    FreezeScheduleCallback,
    GradualUnfreezingCallback,
    LinearProbeThenFineTuneCallback,
)
from tl_plugin.schedule import GradualUnfreezing

# Tiny models: one intra-op thread is faster, and far faster on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def training_args(tmp_path, **overrides: Any) -> TrainingArguments:
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), max_steps=-1, num_train_epochs=3, per_device_train_batch_size=16,
        learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1,
        seed=0,
    )  # fmt: skip
    values.update(overrides)
    return TrainingArguments(**values)


def train(tmp_path, callback, **overrides: Any) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Train a fresh (seeded) tiny BERT with `callback`; its final weights and (step, phase, lr) log."""
    model = build_tiny_bert()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, **overrides),
        train_dataset=RandomTokens(),  # 32 examples, batch 16: 2 optimizer steps per epoch
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = [
        (e["step"], e.get("tl/phase"), e.get("learning_rate"))
        for e in trainer.state.log_history
        if "tl/phase" in e or "learning_rate" in e
    ]
    return weights, log


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert different == [], different


def test_gradual_unfreezing_exports_its_phases_for_the_run_and_the_yaml_trains_identically(tmp_path):
    generator = GradualUnfreezingCallback(every_n_epochs=1)
    path = tmp_path / "gradual.yaml"
    schedule = generator.export_schedule(build_tiny_bert(), path, num_train_epochs=3)
    # 7 groups top-down, one more every epoch; a 3-epoch run reaches the third phase, which lasts to the end
    assert yaml.safe_load(path.read_text()) == {
        "phases": [
            {"train": ["head"], "until_epoch": 1.0, "name": "unfreeze head"},
            {"train": ["head", "other"], "until_epoch": 2.0, "name": "unfreeze other"},
            {"train": ["head", "other", "blocks.3"], "name": "unfreeze blocks.3"},
        ]
    }
    assert FreezeSchedule.load(path) == schedule

    generated, generated_log = train(tmp_path / "generator", generator)
    replayed, replayed_log = train(tmp_path / "replay", FreezeScheduleCallback(path))
    assert_bit_equal(generated, replayed)
    assert generated_log == replayed_log
    assert [p for _, p, _ in generated_log if p is not None] == [0, 1, 2]
    # and the run really unfroze something: blocks.3 moved, blocks.2 did not
    initial = dict(build_tiny_bert().named_parameters())
    block3, block2 = "bert.encoder.layer.3.output.dense.weight", "bert.encoder.layer.2.output.dense.weight"
    assert not torch.equal(generated[block3], initial[block3])
    assert torch.equal(generated[block2], initial[block2])


def test_lpft_with_probe_lr_and_warm_restart_round_trips_bit_identically(tmp_path):
    generator = LinearProbeThenFineTuneCallback(
        probe_steps=2,
        probe_lr=5e-3,
        then=["head", "other", "blocks[-2:]"],
        warm_restart=True,
        restart_warmup_steps=1,
    )
    path = tmp_path / "lpft.yaml"
    generator.export_schedule(build_tiny_bert(), path)
    assert yaml.safe_load(path.read_text()) == {
        "phases": [
            {"train": ["head"], "until_step": 2, "lr": 5e-3, "name": "linear probe"},
            {
                "train": ["head", "other", "blocks[-2:]"],
                "warm_restart": True,
                "restart_warmup_steps": 1,
                "name": "fine-tune",
            },
        ]
    }
    generated, generated_log = train(tmp_path / "generator", generator, max_steps=5)
    replayed, replayed_log = train(tmp_path / "replay", FreezeScheduleCallback(str(path)), max_steps=5)
    assert_bit_equal(generated, replayed)
    assert generated_log == replayed_log
    assert [p for _, p, _ in generated_log if p is not None] == [0, 1]


def test_export_for_a_model_whose_groups_cannot_be_found_raises_discoverys_error(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(LayerDiscoveryError, match="Could not find the block stack of Sequential"):
        GradualUnfreezingCallback(every_n_steps=2).export_schedule(model, tmp_path / "x.yaml")
    with pytest.raises(LayerDiscoveryError):
        LinearProbeThenFineTuneCallback(probe_steps=2).export_schedule(model)
    assert not (tmp_path / "x.yaml").exists()


def test_what_a_freeze_schedule_cannot_express_is_refused_naming_the_fix():
    model = build_tiny_bert()
    partial = LinearProbeThenFineTuneCallback(
        probe_steps=2, then=TransferConfig(strategy="partial", reinit_top_k=1)
    )
    with pytest.raises(ValueError, match=r"re-initialises \['blocks.3'\].*cannot express"):
        partial.export_schedule(model)
    decayed = LinearProbeThenFineTuneCallback(probe_steps=2, then=TransferConfig(lr_decay=0.8))
    with pytest.raises(ValueError, match=r"add `LayerwiseLRDecayCallback\(0.8\)` beside"):
        decayed.export_schedule(model)
    with pytest.raises(ValueError, match=r"`num_train_epochs` must be a finite number > 0, got 0"):
        GradualUnfreezing().export(model, num_train_epochs=0)
    with pytest.raises(ValueError, match=r"`max_steps` must be an integer >= 1, got 2.5"):
        GradualUnfreezing(every_n_steps=1).export(model, max_steps=2.5)  # type: ignore[arg-type]


def test_without_a_run_length_every_group_gets_its_phase_and_overrides_are_kept():
    schedule = GradualUnfreezing(every_n_steps=3, groups_per_phase=3, blocks="bert.encoder.layer").export(
        build_tiny_bert()
    )
    assert [p.train for p in schedule.phases] == [
        ["head", "other", "blocks.3"],
        ["head", "other", "blocks.3", "blocks.2", "blocks.1", "blocks.0"],
        ["head", "other", "blocks.3", "blocks.2", "blocks.1", "blocks.0", "embeddings"],
    ]
    assert [p.until_step for p in schedule.phases] == [3, 6, None]
    assert schedule.blocks == "bert.encoder.layer"


def test_the_shared_run_builder_binds_its_callbacks_so_report_to_gets_their_numbers(tmp_path):
    """`tl_plugin.training.build_classification_run` (the CLI's and the trials' Trainer) attaches the callbacks it is
    given: with a reporting integration, a freeze schedule trains instead of stopping, and logs through the Trainer."""
    from transformers.integrations import get_available_reporting_integrations

    from tl_plugin import discover_layer_groups
    from tl_plugin.training import build_classification_run

    if "tensorboard" not in get_available_reporting_integrations():
        pytest.skip("no TensorBoard writer installed (tensorboard or tensorboardX)")
    model = build_tiny_bert()
    callback = GradualUnfreezingCallback(every_n_steps=1)
    run = build_classification_run(
        model,
        None,
        RandomTokens(),
        None,
        training_args(tmp_path, max_steps=2, report_to=["tensorboard"]),
        groups=discover_layer_groups(model),
        callbacks=[callback],
    )
    assert callback.trainer is run.trainer
    run.trainer.train()
    assert [e["tl/phase"] for e in run.trainer.state.log_history if "tl/phase" in e] == [0, 1]

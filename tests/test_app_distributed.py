"""``tl-plugin train`` on your own data under ``torchrun`` and ``accelerate launch``: 2 real processes over gloo.

The assertion is DDP itself: each run's ``metrics.json`` records, from inside the run, the class the Trainer wrapped
the model in and whether the ranks' final weights are bit-identical (a SHA-256 of every rank's state dict, gathered).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> tuple[Path, str]:
    import csv

    from tl_plugin.tune import save_tiny_bert

    folder = tmp_path_factory.mktemp("ddp-data")
    with open(folder / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(48):
            writer.writerow([f"{'good great fine' if i % 2 else 'bad awful poor'} item {i}", "pos" if i % 2 else "neg"])
    save_tiny_bert(folder / "tiny")
    return folder / "train.csv", str(folder / "tiny")


def _train_args(data: tuple[Path, str], out: Path) -> list[str]:
    train_file, model = data
    return ["train", "--train_file", str(train_file), "--model_name_or_path", model, "--output_dir", str(out),
            "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no",
            "--disable_tqdm", "true", "--max_length", "16", "--learning_rate", "1e-3"]  # fmt: skip


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=env, cwd=ROOT)


def _assert_real_ddp(out: Path, result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    distributed = json.loads((out / "metrics.json").read_text())["distributed"]
    assert distributed["world_size"] == 2
    assert distributed["backend"] == "gloo"
    assert distributed["wrapped_in"] == "DistributedDataParallel"
    assert distributed["ranks_identical"] is True


def test_torchrun_trains_own_data_with_real_ddp(own_data, tmp_path):
    out = tmp_path / "torchrun"
    result = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(_free_port()), "-m", "tl_plugin.cli", *_train_args(own_data, out)])  # fmt: skip
    _assert_real_ddp(out, result)


def test_accelerate_launch_trains_own_data_with_real_ddp(own_data, tmp_path):
    out = tmp_path / "accelerate"
    result = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "recipes" / "accelerate" / "two_process.yaml"), "--main_process_port", str(_free_port()),
                   "-m", "tl_plugin.cli", *_train_args(own_data, out)])  # fmt: skip
    _assert_real_ddp(out, result)


def test_a_launch_without_ddp_is_refused_before_training(own_data, tmp_path):
    """``--use_cpu false`` on a CPU machine: the Trainer would not wrap the model and each rank would train alone;
    the run stops before the first step, and writes nothing."""
    out = tmp_path / "no-ddp"
    result = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(_free_port()), "-m", "tl_plugin.cli", *_train_args(own_data, out),
                   "--use_cpu", "false"])  # fmt: skip
    assert result.returncode != 0
    assert "DistributedDataParallel" in result.stderr or "DDP" in result.stderr
    assert not (out / "metrics.json").exists()


def _sync_worker(rank: int, port: int, same: bool, results: dict) -> None:
    import torch
    import torch.distributed as dist

    from tl_plugin.app.train import ranks_in_sync

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0 if same else rank)
    model = torch.nn.Linear(4, 2)
    trainer = type("T", (), {"model": model, "model_wrapped": model})()
    results[rank] = ranks_in_sync(trainer)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("same", [True, False])
def test_ranks_in_sync_tells_identical_from_diverged_weights(same):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sync_worker, args=(_free_port(), same, results), nprocs=2, join=True)
        reports = dict(results)
    assert {r["ranks_identical"] for r in reports.values()} == {same}
    assert reports[0]["wrapped_in"] == "Linear"

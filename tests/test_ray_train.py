"""Distributed trials: each trial of a search is a 2-worker DDP run through Ray Train (`tl_plugin.app.ray_trials`).

A local Ray with 2 CPUs runs one trial whose `TorchTrainer` has 2 CPU workers over gloo; each worker trains the
trial through tl-plugin train's app path (`prepare_trainer`, `RayTrainReportCallback`) with the plugin's gradual
unfreezing on. Asserted from what every worker wrote: both models were wrapped in ``DistributedDataParallel``,
both ranks ended with identical weights (a gathered SHA-256, and the digests each wrote), both gradual-unfreezing
callbacks reached the same phase, and Tune received one report per epoch.

Through the command line: ``tl-plugin search --workers_per_trial 2`` with a worker that fails once after its first
epoch's checkpoint (``TL_TUNE_FAIL_ONCE``): Ray Train restarts the workers, they resume from that checkpoint, and the
trial ends with the weights and the eval loss of the same search run without the failure.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tl_plugin import tune as tlt

TINY_BLOCKS = 3
TL_PLUGIN = str(Path(sys.executable).with_name("tl-plugin"))


@pytest.fixture(scope="module")
def tiny_model_dir():
    folder = tempfile.mkdtemp(prefix="tltiny-", dir="/tmp")
    try:
        yield str(tlt.save_tiny_bert(Path(folder) / "bert", num_hidden_layers=TINY_BLOCKS))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def ray_env(monkeypatch, tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch")
    home = Path(tempfile.mkdtemp(prefix="tlhome-", dir="/tmp"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    yield ray
    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow  # about 1.5 minutes on 2 cores; passed on 2026-11-30 (make test runs -m "not slow")
@pytest.mark.ray
@pytest.mark.distributed
def test_a_trial_is_a_two_worker_ddp_run_with_the_callbacks_in_sync(ray_env, tiny_model_dir, tmp_path):
    from ray import tune

    from tl_plugin.app.ray_trials import RANK_FILE, distributed_trainable

    settings = tlt.SearchSettings(
        num_blocks=TINY_BLOCKS, model_path=tiny_model_dir, train_size=32, max_epochs=2, train_batch_size=8
    )
    storage = str(tmp_path / "ray_results")
    point = {
        "learning_rate": 1e-3,
        "strategy": "layers",
        "freeze_bottom_blocks": 1,
        "reinit_top_k": 1,
        "lr_decay": 1.0,
        "unfreeze_pace": 1,  # gradual unfreezing: one more group per epoch, from the head down
    }
    with tlt.ray_session(num_cpus=2, log_to_driver=False):
        tuner = tune.Tuner(
            distributed_trainable(settings.to_dict(), 2, experiment_path=f"{storage}/dist"),
            param_space=point,
            tune_config=tune.TuneConfig(metric="eval_loss", mode="min", num_samples=1,
                                        trial_dirname_creator=tlt.trial_dirname),
            run_config=tune.RunConfig(name="dist", storage_path=storage, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )  # fmt: skip
        results = tuner.fit()
    (result,) = results
    assert result.error is None, result.error
    assert result.metrics["training_iteration"] == 2  # one Tune report per epoch
    assert result.metrics["epoch"] == 2.0
    assert "eval_loss" in result.metrics
    trial_dir = Path(storage, "dist", Path(result.path).name)
    records = [json.loads((trial_dir / RANK_FILE.format(rank=r)).read_text()) for r in (0, 1)]
    for rank, record in enumerate(records):
        assert record["rank"] == rank
        assert record["world_size"] == 2
        assert record["backend"] == "gloo"
        assert record["wrapped_in"] == "DistributedDataParallel"
        assert record["ranks_identical"] is True
    assert records[0]["pid"] != records[1]["pid"]  # two processes
    assert records[0]["weights_digest"] == records[1]["weights_digest"]
    # the plugin's gradual unfreezing moved on in step on both workers, and unfroze the same parameters
    assert records[0]["unfreeze_phase"] == records[1]["unfreeze_phase"] >= 1
    assert records[0]["trainable_parameters"] == records[1]["trainable_parameters"]


def _cli_distributed_search(model: str, out: Path, home: Path, fail_once: Path | None) -> dict:
    """``tl-plugin search --workers_per_trial 2`` (one trial, 2 epochs) in a subprocess; its ranks' records."""
    from tl_plugin.app.ray_trials import RANK_FILE

    env = {**os.environ, "HOME": str(home), "RAY_DEDUP_LOGS": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop(tlt.FAIL_ONCE_ENV, None)
    if fail_once is not None:
        env[tlt.FAIL_ONCE_ENV] = str(fail_once)
    command = [
        TL_PLUGIN, "search", "--model_name_or_path", model, "--train_size", "32", "--max_epochs", "2",
        "--num_samples", "1", "--workers_per_trial", "2", "--cpus_per_trial", "1", "--num_cpus", "2",
        "--max_failures", "1", "--metric", "eval_loss", "--mode", "min", "--output_dir", str(out),
        "--quiet_workers", "--verbose", "0",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    with (out / "results.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["status"] == "completed", row
    (trial_dir,) = (out / "ray_results" / "tl-search").glob("trial_*")
    ranks = [json.loads((trial_dir / RANK_FILE.format(rank=r)).read_text()) for r in (0, 1)]
    saved = json.loads((out / "search.json").read_text())
    return {"ranks": ranks, "row": row, "saved": saved}


@pytest.mark.slow  # about 3 minutes on 2 cores (two searches); passed on 2026-12-01
@pytest.mark.ray
@pytest.mark.distributed
def test_cli_distributed_trial_that_fails_once_resumes_from_its_checkpoint_with_equal_results(
    ray_env, tiny_model_dir, tmp_path
):
    home = Path(os.environ["HOME"])  # the fixture's isolated HOME (Ray's temp files)
    flag = tmp_path / "failed-once"
    failed = _cli_distributed_search(tiny_model_dir, tmp_path / "failed", home, fail_once=flag)
    assert flag.is_file()  # the fault was injected (after the first epoch's checkpoint was reported)
    clean = _cli_distributed_search(tiny_model_dir, tmp_path / "clean", home, fail_once=None)
    assert failed["saved"]["search"]["workers_per_trial"] == 2  # remembered for --resume
    for run in (failed, clean):
        for rank, record in enumerate(run["ranks"]):
            assert (record["rank"], record["world_size"], record["backend"]) == (rank, 2, "gloo")
            assert record["wrapped_in"] == "DistributedDataParallel"
            assert record["ranks_identical"] is True
    # the restarted workers resumed from the first epoch's checkpoint, the uninterrupted ones started fresh
    assert {r["resumed_from"] for r in failed["ranks"]} == {failed["ranks"][0]["resumed_from"]} != {None}
    assert {r["resumed_from"] for r in clean["ranks"]} == {None}
    # ... and ended where the uninterrupted trial ended: same steps, same weights, same eval loss
    assert failed["ranks"][0]["global_step"] == clean["ranks"][0]["global_step"]
    assert failed["ranks"][0]["weights_digest"] == clean["ranks"][0]["weights_digest"]
    assert failed["ranks"][0]["eval_loss"] == pytest.approx(clean["ranks"][0]["eval_loss"], abs=1e-6)

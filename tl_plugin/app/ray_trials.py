"""Distributed trials: each trial of ``tl-plugin search --workers_per_trial N`` is an N-worker DDP run (Ray Train).

The Tune trial is a small driver (`train_distributed_trial`) that runs a `ray.train.torch.TorchTrainer` with
``N`` workers; Ray Train starts the workers, sets up ``torch.distributed`` (gloo on CPU, NCCL on GPU) and the
``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` environment, so the Trainer of every worker wraps the model in
``DistributedDataParallel`` as under ``torchrun``. Each worker trains the trial exactly like ``tl-plugin train``
(`tl_plugin.app.train.parse_train_args` / `prepare_run` / `build_run`, the sampled transfer config, the sampled
gradual unfreezing / L2-SP callbacks), with Ray's Hugging Face integration: `prepare_trainer` and
`RayTrainReportCallback` (a Trainer checkpoint per epoch, reported with the metrics). The metrics go on to Tune
through `ray.tune.integration.ray_train.TuneReportCallback` (one Tune iteration per epoch, as for plain trials, so
ASHA works unchanged).

After training, every worker writes ``distributed_rank<R>.json`` into the trial's folder under the search's
storage path: world size, backend, the class its model was wrapped in, whether all ranks ended with identical
weights (`tl_plugin.app.train.ranks_in_sync`, a gathered SHA-256 of each state dict), the weights digest and the
gradual-unfreezing phase of its callback. With a local storage path only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RANK_FILE", "distributed_trainable", "train_distributed_trial"]

#: Written by every worker of a distributed trial into the trial folder (``{rank}``: the worker's rank).
RANK_FILE = "distributed_rank{rank}.json"


def _worker_loop(loop_config: Mapping[str, Any]) -> None:
    """One Ray Train worker: the trial's training through the app path, with `prepare_trainer` and
    `RayTrainReportCallback`."""
    import datasets
    import torch
    import torch.distributed as dist
    import transformers
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import PrinterCallback

    from .. import tune as tlt
    from .train import build_run, class_weight_loss, parse_train_args, prepare_run, ranks_in_sync

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(max(1, int(threads)))
    config = dict(loop_config["config"])
    settings = tlt.SearchSettings.from_dict(loop_config["settings"])
    output_dir = tempfile.mkdtemp(prefix="tl-dtrial-")
    run = None
    try:
        argv = tlt.trial_command_line(config, settings, output_dir)
        # RayTrainReportCallback reports in on_save: one checkpoint (and one report) per epoch, after the eval
        argv[argv.index("--save_strategy") + 1] = "epoch"
        if int(config.get("unfreeze_pace") or 0) > 0:
            # gradual unfreezing changes which parameters train: DDP must look for unused ones (the plugin checks)
            argv += ["--ddp_find_unused_parameters", "true"]
        options = parse_train_args(argv)
        options.transfer = tlt.transfer_config_from_trial(config, seed=settings.seed)
        prepared = prepare_run(options)
        extra = tlt._extra_callbacks(config, len(prepared.trainable.trainable_groups))
        loss = class_weight_loss(options.data.class_weights, prepared)
        run = build_run(options, prepared, loss, callbacks=[*extra, RayTrainReportCallback()])
        trainer = prepare_trainer(run.trainer)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_fail_once_after_report())  # after RayTrainReportCallback: only with TL_TUNE_FAIL_ONCE set
        resume_from = _restored_checkpoint(output_dir)
        trainer.train(resume_from_checkpoint=resume_from)
        sync = ranks_in_sync(trainer) or {"world_size": 1, "wrapped_in": type(trainer.model_wrapped).__name__}
        record_dir = loop_config.get("record_dir")
        if record_dir:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            phases = [getattr(c, "phase", None) for c in extra if type(c).__name__ == "GradualUnfreezingCallback"]
            model = trainer.model
            assert model is not None
            record = {
                **sync,
                "rank": rank,
                "weights_digest": tlt.weights_digest(model),
                "unfreeze_phase": phases[0] if phases else None,
                "trainable_parameters": sorted(n for n, p in model.named_parameters() if p.requires_grad),
                "pid": os.getpid(),
                "resumed_from": Path(resume_from).parent.name if resume_from else None,
                "global_step": trainer.state.global_step,
                "eval_loss": _last_eval_loss(trainer),
            }
            Path(record_dir).mkdir(parents=True, exist_ok=True)
            (Path(record_dir) / RANK_FILE.format(rank=rank)).write_text(json.dumps(record, indent=1) + "\n")
    finally:
        if run is not None:
            run.close()
        shutil.rmtree(output_dir, ignore_errors=True)


def _restored_checkpoint(scratch_dir: str) -> str | None:
    """The Trainer checkpoint folder to resume from, when Ray Train restarts the workers of a failed run (its
    latest reported checkpoint, copied under `scratch_dir`); `None` for a fresh start."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    local = Path(scratch_dir, "restored", Path(checkpoint.path).name)
    checkpoint.to_directory(str(local))
    return str(local / RayTrainReportCallback.CHECKPOINT_NAME)


def _last_eval_loss(trainer: Any) -> float | None:
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    return float(losses[-1]) if losses else None


def _fail_once_after_report() -> Any:
    """Fault injection for the tests (``TL_TUNE_FAIL_ONCE``, as for plain trials): a callback, placed after
    `RayTrainReportCallback`, with which the first worker to save a checkpoint raises once, after the report."""
    from transformers import TrainerCallback

    from .. import tune as tlt

    class FailOnceAfterReport(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tlt._maybe_fail_once(f"ray-train-worker-step-{state.global_step}")

    return FailOnceAfterReport()


def train_distributed_trial(
    config: dict[str, Any],
    settings: Mapping[str, Any],
    workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    experiment_path: str | None = None,
    max_failures: int = 0,
) -> None:
    """The Tune function trainable of a distributed trial: a `TorchTrainer` with ``workers`` workers (gloo on CPU)
    that each train the sampled config; their epoch metrics are reported to Tune.

    Wrap it with ``tune.with_parameters(train_distributed_trial, settings=..., workers=2,
    experiment_path=...)`` and ``tune.with_resources(..., {"cpu": 0, "memory": 2**20})``: the trial itself only waits, the workers
    hold the resources.

    A worker that fails (its process, its node) makes Ray Train restart the worker group up to `max_failures`
    times; the restarted workers resume from the run's last reported Trainer checkpoint (weights, optimizer,
    scheduler, RNG, the callbacks' state), so the trial continues as it would have without the failure.
    """
    import ray.tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_dir_name = Path(ray.tune.get_context().get_trial_dir()).name
    record_dir = None
    storage = f"{experiment_path.rstrip('/')}/{trial_dir_name}" if experiment_path else None
    if storage and "://" not in storage:
        record_dir = storage
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": dict(config), "settings": dict(settings), "record_dir": record_dir},
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name="ray_train",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # a Train V2 callback (Ray's stubs: V1)
        ),
    )
    trainer.fit()


def distributed_trainable(
    settings: Mapping[str, Any],
    workers: int,
    *,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    experiment_path: str | None = None,
    max_failures: int = 0,
) -> Any:
    """``train_distributed_trial`` bound to the search's settings, with the trial's own resources set to none
    (its workers reserve ``cpus_per_worker`` / ``gpus_per_worker`` each): ready for ``tune.Tuner``."""
    from ray import tune

    trainable = tune.with_parameters(
        train_distributed_trial,
        settings=dict(settings),
        workers=workers,
        use_gpu=gpus_per_worker > 0,
        cpus_per_worker=cpus_per_worker,
        experiment_path=experiment_path,
        max_failures=max_failures,
    )
    # no CPU for the waiting trial (a CPU held by it would be missing for the workers), but Tune needs some
    # resource in the request: a token amount of memory
    return tune.with_resources(trainable, {"cpu": 0, "memory": 2**20})

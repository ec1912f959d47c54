"""One trial: the Ray Tune function trainable (`train_transfer_trial`), trained like ``tl-plugin train``, reporting
metrics and a checkpoint every epoch, resuming from its last checkpoint, with its markers in the search's storage
(`TrialFolder`)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .deps import _plain, require_ray
from .settings import SearchSettings
from .space import transfer_config_from_trial


def trial_training_arguments(
    settings: SearchSettings, learning_rate: float, output_dir: str, **overrides: Any
) -> Any:
    """`TrainingArguments` of a trial: ``tl-plugin train``'s defaults, the trial's lr, no checkpoints."""
    from transformers import TrainingArguments

    from ..app.arguments import TRAINING_DEFAULTS

    values = {
        **TRAINING_DEFAULTS,
        "output_dir": output_dir,
        "learning_rate": float(learning_rate),
        "num_train_epochs": float(settings.max_epochs),
        "seed": settings.seed,
        "per_device_train_batch_size": settings.train_batch_size,
        "per_device_eval_batch_size": settings.eval_batch_size,
        "eval_strategy": "epoch",
        "save_strategy": "no",
        "disable_tqdm": True,
        "report_to": "none",
        **overrides,
    }
    values.pop("save_total_limit", None)
    return TrainingArguments(**values)


def _build_model(model_path: str, num_labels: int, seed: int) -> Any:
    from transformers import AutoModelForSequenceClassification, set_seed

    from ..data import LABEL_NAMES

    set_seed(seed)  # as in `tl-plugin train`: the new head is initialised right after seeding
    return AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=num_labels,
        id2label=dict(enumerate(LABEL_NAMES)),
        label2id={n: i for i, n in enumerate(LABEL_NAMES)},
    )


def _extra_callbacks(config: Mapping[str, Any], trained_groups: int) -> list[Any]:
    """Trainer callbacks a sampled point asks for: gradual unfreezing (at most the ``trained_groups`` groups the
    transfer strategy trains) and L2-SP."""
    callbacks: list[Any] = []
    pace = int(config.get("unfreeze_pace") or 0)
    if pace > 0:
        from ..callbacks import GradualUnfreezingCallback

        # `pace` groups per epoch: one more group every 1/pace epochs, from the head down
        callbacks.append(GradualUnfreezingCallback(every_n_epochs=1 / pace, max_groups=trained_groups))
    alpha = float(config.get("l2sp_alpha") or 0.0)
    if alpha > 0:
        from ..callbacks.regularization import L2SPCallback

        callbacks.append(L2SPCallback(alpha=alpha))
    return callbacks


#: In each checkpoint a trial reports: who saved it, at which step, with which config, weights digest, freeze state.
CHECKPOINT_INFO_FILE = "tl_trial.json"
#: Written by a trial into its Tune trial folder just *before* its last report: the trial finished (its metrics).
FINISHED_FILE = "tl_finished.json"
#: One JSON line per start of a trial's trainable: fresh, resumed (from which trial and step), or skipped.
RUNS_FILE = "tl_runs.jsonl"
#: Fault injection for failure drills: a file path; the first trial that creates it raises once, after its first
#: checkpointed report (the file makes it once per search).
FAIL_ONCE_ENV = "TL_TUNE_FAIL_ONCE"


def weights_digest(model: Any) -> str:
    """SHA-256 over a model's ``state_dict`` (names and bytes, sorted): equal digests mean equal weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _frozen_names(model: Any) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if not p.requires_grad)


def _schedule_phase(callbacks: Any) -> int | None:
    for callback in callbacks or ():
        phase = getattr(callback, "phase", None)
        if type(callback).__name__ == "GradualUnfreezingCallback" and isinstance(phase, int):
            return phase
    return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class TrialFolder:
    """A trial's folder in the search's storage (``<storage_path>/<experiment>/<trial>``, on the storage's
    filesystem: a local or shared disk, or a bucket), where the trial keeps `FINISHED_FILE` and `RUNS_FILE`.

    Not the trial's local folder (``get_trial_dir()``): that one lives on the node that ran the trial and reaches
    the storage only when the driver syncs it, so a driver killed right after a trial's last report, or a retry on
    another node after a node was lost, would not find what the trial wrote there. Written here, a marker is in the
    storage before the report that follows it.
    """

    def __init__(self, filesystem: Any, path: str) -> None:
        self.filesystem = filesystem
        self.path = path.rstrip("/")

    @classmethod
    def of_current_trial(cls) -> TrialFolder:
        """The folder of the trial this Tune function runs (``ray.tune.get_context().get_storage()``)."""
        storage = require_ray().tune.get_context().get_storage()
        return cls(storage.storage_filesystem, storage.trial_fs_path)

    def _file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def exists(self, name: str) -> bool:
        import pyarrow.fs

        return self.filesystem.get_file_info(self._file(name)).type != pyarrow.fs.FileType.NotFound

    def read_text(self, name: str) -> str | None:
        if not self.exists(name):
            return None
        with self.filesystem.open_input_stream(self._file(name)) as stream:
            return stream.read().decode()

    def write_text(self, name: str, text: str) -> None:
        """Write `name` whole (a temporary file moved into place: a reader never sees half of it)."""
        self.filesystem.create_dir(self.path, recursive=True)
        temporary = self._file(f".{name}.{os.getpid()}.tmp")
        with self.filesystem.open_output_stream(temporary) as stream:
            stream.write(text.encode())
        self.filesystem.move(temporary, self._file(name))

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=1, default=str) + "\n")

    def append_line(self, name: str, record: Mapping[str, Any]) -> None:
        """Append one JSON line to `name` (rewritten whole: buckets cannot append; these files are small)."""
        self.write_text(name, (self.read_text(name) or "") + json.dumps(dict(record), default=str) + "\n")


class TuneReportCallback(TrainerCallback):
    """A `transformers.TrainerCallback` that sends every evaluation's metrics to Ray Tune (``ray.tune.report``).

    One evaluation per epoch (``eval_strategy="epoch"``) makes one Tune iteration per epoch, the time unit of the
    ASHA and PBT schedulers. ``ray.tune.report`` is the Tune API (``ray.train.report`` errors inside a Tune
    function).

    With ``checkpoints=True`` (``save_strategy="epoch"``) the metrics are reported in ``on_save``, after the
    Trainer wrote its checkpoint (weights, optimizer, scheduler, RNG, trainer state, the schedules' state file), with
    that folder as the Tune checkpoint, plus `CHECKPOINT_INFO_FILE` (trial, step, config, weights digest, frozen
    parameters, gradual-unfreezing phase). Just before the last epoch's report, `FINISHED_FILE` is written into
    the trial's `TrialFolder` (``folder``): a restored trial that finds it does not train again.
    """

    def __init__(
        self,
        checkpoints: bool = False,
        *,
        trial_id: str | None = None,
        folder: TrialFolder | None = None,
        config: Mapping[str, Any] | None = None,
        max_epochs: int | None = None,
    ) -> None:
        self.checkpoints = checkpoints
        self.trial_id = trial_id
        self.folder = folder
        self.config = {k: _plain(v) for k, v in (config or {}).items()}
        self.max_epochs = max_epochs
        self._pending: dict[str, float] | None = None

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        import ray.tune

        report = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        report["epoch"] = float(state.epoch or 0.0)
        if self.checkpoints:
            self._pending = report  # reported with the checkpoint, in on_save
        else:
            ray.tune.report(report)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import ray.tune

        from ..callbacks.base import checkpoint_folder

        if not self.checkpoints or self._pending is None:
            return
        report, self._pending = self._pending, None
        folder = Path(checkpoint_folder(args, state))
        model = kwargs.get("model")
        epoch = float(state.epoch or 0.0)
        finished = self.max_epochs is not None and epoch >= self.max_epochs - 1e-6
        info = {
            "trial_id": self.trial_id,
            "global_step": int(state.global_step),
            "epoch": epoch,
            "config": self.config,
            "learning_rate": float(self.config.get("learning_rate", args.learning_rate)),
            "metrics": report,
            "finished": finished,
            "weights_digest": weights_digest(model) if model is not None else None,
            "frozen": _frozen_names(model) if model is not None else None,
            "unfreeze_phase": _schedule_phase(getattr(self, "_callbacks", None)),
        }
        _write_json(folder / CHECKPOINT_INFO_FILE, info)
        if finished and self.folder is not None:
            # before the report: `ray.tune.report` may not return once the driver has the result (it waits for the
            # driver's next request), and a driver killed now must still see this trial as finished on --resume
            record = {
                "trial_id": self.trial_id,
                "metrics": report,
                "epoch": epoch,
                "global_step": state.global_step,
            }
            self.folder.write_json(FINISHED_FILE, record)
        ray.tune.report(report, checkpoint=ray.tune.Checkpoint.from_directory(str(folder)))
        _maybe_fail_once(self.trial_id)


def _maybe_fail_once(trial_id: str | None) -> None:
    flag = os.environ.get(FAIL_ONCE_ENV)
    if not flag:
        return
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(trial_id).encode())
    os.close(fd)
    raise RuntimeError(f"{FAIL_ONCE_ENV}: injected failure of trial {trial_id} after its checkpointed report")


class _RescaleLR(TrainerCallback):
    """After a resume whose checkpoint was trained with another learning rate (a PBT exploit with a perturbed
    ``learning_rate``): scale every param group's lr and the scheduler's base lrs by ``ratio``, so the run goes on
    at the new rate from the schedule position of the checkpoint (the layer-wise decay ratios are kept)."""

    def __init__(self, ratio: float) -> None:
        self.ratio = float(ratio)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from ..callbacks.base import unwrap_scheduler

        optimizer, scheduler = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] *= self.ratio
                if "initial_lr" in group:
                    group["initial_lr"] *= self.ratio
        if scheduler is not None:
            inner = unwrap_scheduler(scheduler)
            if hasattr(inner, "base_lrs"):
                inner.base_lrs = [b * self.ratio for b in inner.base_lrs]
            if hasattr(inner, "_last_lr"):
                inner._last_lr = [b * self.ratio for b in inner._last_lr]


class _RecordStart(TrainerCallback):
    """Appends one line to the trial's `RUNS_FILE` when training starts (after a checkpoint is loaded): how the run
    started, the weights digest and the frozen parameters at that moment."""

    def __init__(self, folder: TrialFolder | None, record: Mapping[str, Any]) -> None:
        self.folder = folder
        self.record = dict(record)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.folder is None or not state.is_world_process_zero:
            return
        model = kwargs.get("model")
        line = {**self.record, "global_step": int(state.global_step), "pid": os.getpid()}
        if model is not None:
            line["weights_digest"] = weights_digest(model)
            line["frozen"] = _frozen_names(model)
        self.folder.append_line(RUNS_FILE, line)


def trial_command_line(
    config: Mapping[str, Any], settings: SearchSettings, output_dir: str, checkpoints: bool = False
) -> list[str]:
    """The ``tl-plugin train`` options of a trial (without the transfer config, which is passed as an object):
    the user's data options, the search's settings and the sampled learning rate; no reports; a checkpoint per
    epoch (in the trial's temporary ``output_dir``) with ``checkpoints``."""
    import torch

    argv = [
        *settings.train_args,
        "--train_size", str(settings.train_size),
        "--test_size", "1",
        "--max_length", str(settings.max_length),
        "--learning_rate", repr(float(config["learning_rate"])),
        "--num_train_epochs", str(settings.max_epochs),
        "--seed", str(settings.seed),
        "--per_device_train_batch_size", str(settings.train_batch_size),
        "--per_device_eval_batch_size", str(settings.eval_batch_size),
        "--eval_strategy", "epoch",
        "--save_strategy", "epoch" if checkpoints else "no",
        "--disable_tqdm", "true",
        "--report_to", "none",
        "--output_dir", output_dir,
        "--use_cpu", str(not torch.cuda.is_available()).lower(),
    ]  # fmt: skip
    if settings.model_path:
        argv += ["--model_name_or_path", settings.model_path]
    if settings.activation_cache:
        argv += ["--activation_cache", "true"]
        if settings.activation_cache_dir:
            argv += ["--activation_cache_dir", settings.activation_cache_dir]
    return argv


def _run_training(
    config: Mapping[str, Any],
    settings: SearchSettings,
    callbacks: Sequence[Any],
    *,
    checkpoints: bool = False,
    resume: tuple[str, Mapping[str, Any]] | None = None,
    front_callbacks: Sequence[Any] = (),
) -> Any:
    """Train one configuration like ``tl-plugin train`` does (the same preparation and Trainer); returns the
    trainer after training.

    ``checkpoints``: save a Trainer checkpoint every epoch. ``resume``: ``(folder, info)`` of a checkpoint (a Trainer
    checkpoint folder and its `CHECKPOINT_INFO_FILE` content) to resume from with ``resume_from_checkpoint``:
    weights, optimizer, scheduler, RNG, trainer state and the schedules' phase come from it; the transfer config
    (hence the freeze boundary) is this ``config``'s, applied before the weights are loaded; a different learning
    rate than the checkpoint's is applied by scaling the loaded optimizer and scheduler. ``front_callbacks`` run
    before every other callback of the trial.
    """
    import datasets
    import transformers
    from transformers import PrinterCallback

    from ..app.train import build_run, class_weight_loss, parse_train_args, prepare_run

    # Keep the trial logs readable: no progress bars, no load reports (Tune reports the metrics).
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    output_dir = tempfile.mkdtemp(prefix="tl-trial-")
    run = None
    try:
        options = parse_train_args(trial_command_line(config, settings, output_dir, checkpoints=checkpoints))
        options.transfer = transfer_config_from_trial(config, seed=settings.seed)
        prepared = prepare_run(options)
        extra = _extra_callbacks(config, len(prepared.trainable.trainable_groups))
        front = list(front_callbacks)
        resume_path = None
        if resume is not None:
            folder, info = resume
            resume_path = str(Path(output_dir) / f"checkpoint-{int(info['global_step'])}")
            shutil.copytree(folder, resume_path)
            old_lr = float(info.get("learning_rate") or config["learning_rate"])
            new_lr = float(config["learning_rate"])
            if not math.isclose(old_lr, new_lr, rel_tol=1e-12):
                front.insert(0, _RescaleLR(new_lr / old_lr))
        loss = class_weight_loss(options.data.class_weights, prepared)
        run = build_run(options, prepared, loss, callbacks=[*front, *extra, *callbacks])
        trainer = run.trainer
        for callback in callbacks:
            if isinstance(callback, TuneReportCallback):
                callback._callbacks = trainer.callback_handler.callbacks  # type: ignore[attr-defined]
        trainer.remove_callback(PrinterCallback)  # prints every log dict when tqdm is off
        trainer.train(resume_from_checkpoint=resume_path)
    finally:
        if run is not None:
            run.close()
        shutil.rmtree(output_dir, ignore_errors=True)
    return trainer


def _append_run(folder: TrialFolder, record: Mapping[str, Any]) -> None:
    folder.append_line(RUNS_FILE, {**record, "pid": os.getpid()})


def _checkpoint_info(checkpoint: Any) -> dict[str, Any]:
    """The `CHECKPOINT_INFO_FILE` of a Tune checkpoint, read where it is stored (empty if it has none)."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{CHECKPOINT_INFO_FILE}") as stream:
            data = json.loads(stream.read().decode())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _latest_checkpoint(given: Any, folder: TrialFolder, trial_id: str) -> Any:
    """The checkpoint a (re)started trial resumes from: the one Tune gives (`given`), unless the trial's own folder
    in the storage holds a later checkpoint of this trial.

    A driver killed after a trial reported an epoch's checkpoint, but before it saved its experiment state, restores
    the trial with an older checkpoint or none; the checkpoint itself was already in the storage (Tune uploads it
    before the report reaches the driver). A checkpoint of another trial (a PBT exploit) is kept as given.
    """
    import pyarrow.fs

    ray = require_ray()
    given_info = _checkpoint_info(given) if given is not None else {}
    if given is not None and given_info.get("trial_id") not in (None, trial_id):
        return given  # PBT: the exploited trial's weights
    best, best_step = given, int(given_info.get("global_step") or -1)
    selector = pyarrow.fs.FileSelector(folder.path, allow_not_found=True)
    for entry in folder.filesystem.get_file_info(selector):
        if entry.type != pyarrow.fs.FileType.Directory or not entry.base_name.startswith("checkpoint_"):
            continue
        candidate = ray.tune.Checkpoint(entry.path, filesystem=folder.filesystem)
        info = _checkpoint_info(candidate)
        if info.get("trial_id") != trial_id or int(info.get("global_step") or -1) <= best_step:
            continue
        complete = folder.filesystem.get_file_info(f"{entry.path}/trainer_state.json")
        if complete.type == pyarrow.fs.FileType.File:  # not a half-uploaded one (the Trainer's last file)
            best, best_step = candidate, int(info["global_step"])
    return best


def train_transfer_trial(config: dict[str, Any], settings: Mapping[str, Any]) -> None:
    """The Ray Tune function trainable: train one sampled transfer config, report eval metrics and a checkpoint
    every epoch.

    Wrap it with ``tune.with_parameters(train_transfer_trial, settings=SearchSettings(...).to_dict())``. A config
    that is invalid for the model (or an out-of-memory error) raises: Tune retries it up to
    ``FailureConfig(max_failures)`` times from its last checkpoint, then records the trial as failed and the search
    goes on.

    Started again by Tune (after a failure, a PBT exploit, or a restored driver), it resumes from
    ``ray.tune.get_checkpoint()`` (its own last checkpoint, or the exploited trial's). A trial whose folder holds
    `FINISHED_FILE` (it finished, but the driver died before it recorded that) or whose checkpoint is its own last
    epoch returns at once: it does not train, nor report, again.
    """
    ray = require_ray()
    import torch

    resolved = SearchSettings.from_dict(settings)
    cpus = os.environ.get("OMP_NUM_THREADS")  # Ray sets it to the trial's CPU count
    if cpus and cpus.isdigit():
        torch.set_num_threads(max(1, int(cpus)))
    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    trial_dir = context.get_trial_dir()
    if trial_dir:  # on a Ray worker node (not the driver's), Ray does not create it before the trial writes to it
        Path(trial_dir).mkdir(parents=True, exist_ok=True)
    folder = TrialFolder.of_current_trial()
    if folder.exists(FINISHED_FILE):
        _append_run(folder, {"start": "skipped", "why": FINISHED_FILE})
        return
    checkpoint = _latest_checkpoint(ray.tune.get_checkpoint(), folder, trial_id)
    local = None
    try:
        resume = None
        if checkpoint is not None:
            local = tempfile.mkdtemp(prefix="tl-restore-")
            checkpoint.to_directory(local)
            info = json.loads(Path(local, CHECKPOINT_INFO_FILE).read_text())
            if info.get("finished") and info.get("trial_id") == trial_id:
                _append_run(folder, {"start": "skipped", "why": "finished checkpoint"})
                return
            resume = (local, info)
        record = {"start": "fresh"} if resume is None else {
            "start": "resumed" if resume[1].get("trial_id") == trial_id else "exploit",
            "from_trial": resume[1].get("trial_id"),
            "from_step": resume[1].get("global_step"),
            "learning_rate": float(config["learning_rate"]),
            "freeze_bottom_blocks": config.get("freeze_bottom_blocks"),
            # what the checkpoint's trial had when it saved: weights digest, freeze boundary, frozen parameters
            "donor_weights_digest": resume[1].get("weights_digest"),
            "donor_learning_rate": resume[1].get("learning_rate"),
            "donor_frozen_blocks": (resume[1].get("config") or {}).get("freeze_bottom_blocks"),
            "donor_frozen": resume[1].get("frozen"),
            "donor_unfreeze_phase": resume[1].get("unfreeze_phase"),
        }  # fmt: skip
        reporter = TuneReportCallback(
            checkpoints=True,
            trial_id=trial_id,
            folder=folder,
            config=config,
            max_epochs=resolved.max_epochs,
        )
        start = _RecordStart(folder, record)
        _run_training(config, resolved, [reporter], checkpoints=True, resume=resume, front_callbacks=[start])
    finally:
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)

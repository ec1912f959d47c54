"""`ResultsCSVCallback`, a Ray Tune callback that keeps the results CSV current. It subclasses `ray.tune.Callback`, so
this module imports Ray at its top: import it where Ray is needed (``pip install 'tl-plugin[ray]'``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ray import tune

from .results import rows_from_trials, write_results_csv
from .settings import SearchSettings

logger = logging.getLogger("tl_plugin")

class ResultsCSVCallback(tune.Callback):
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

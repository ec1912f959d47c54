"""A search's results: rows from Tune's trials (with the finished markers), the table, the CSV, the plot, the
best config and the exact final command."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .deps import _plain, require_matplotlib
from .settings import SearchSettings
from .space import CALLBACK_KEYS, _frozen_blocks, transfer_config_from_trial
from .trial import FINISHED_FILE

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


def plot_results(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    metric: str,
    title: str | None = None,
    baseline: float | None = None,
    baseline_label: str = "majority class",
) -> Path:
    """Scatter plot (PNG) of ``metric`` vs learning rate (log scale), coloured by the frozen-block count.

    Marker shape: the strategy (full ●, partial ■, layers ▲); hollow markers: trials stopped early by the
    scheduler; failed trials are not plotted (they have no metric). With ``baseline``, a dashed horizontal line
    marks it (for accuracy, the majority-class rate: a trial on that line learned nothing), and the legend says how
    many trials sit on it.

    Args:
        rows (`Sequence[Mapping]`): the results rows (`rows_from_results` / `rows_from_trials`, or read back from
            ``results.csv``).
        path (`str` or `os.PathLike`): the PNG file to write.
        metric (`str`): the column to plot, e.g. ``"eval_accuracy"``.
        title (`str`, *optional*): the figure title.
        baseline (`float`, *optional*): a reference value of ``metric`` to draw, e.g. the majority-class accuracy
            of the validation set.
        baseline_label (`str`, *optional*, defaults to `"majority class"`): what the baseline is, for the legend.

    Returns:
        `Path`: the written file.
    """
    if baseline is not None and not math.isfinite(float(baseline)):
        raise ValueError(f"`baseline` must be a finite number or None, got {baseline!r}.")
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
        ax.margins(x=0.06, y=0.12)  # markers on the lowest / highest value (often the baseline) stay inside
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
        if baseline is not None:
            on_it = sum(1 for r in points if abs(float(r[metric]) - baseline) <= 1e-9 + 1e-6 * abs(baseline))
            ax.axhline(baseline, color="firebrick", linestyle="--", linewidth=1.2, gid="baseline", zorder=0)
            handles.append(
                Line2D([], [], color="firebrick", linestyle="--",
                       label=f"{baseline_label} {baseline:.4g} ({on_it} of {len(points)} trials on it)")
            )  # fmt: skip
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

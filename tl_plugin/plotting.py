"""Plots a person would rather look at than read: which groups were trainable when, and the lr of each group.

matplotlib is an optional dependency (``pip install tl-plugin[plot]``), imported only when a plot is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .callbacks.history import TrainingHistory

INSTALL_HINT = "Plotting needs matplotlib: pip install 'tl-plugin[plot]'"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(INSTALL_HINT) from err
    return plt


def _as_history(history: TrainingHistory | str | Path) -> TrainingHistory:
    return history if isinstance(history, TrainingHistory) else TrainingHistory.load(history)


def plot_trainable_map(
    history: TrainingHistory | str | Path, path: str | Path, title: str | None = None
) -> Path:
    """Draw a map of layer groups (rows, input at the bottom) over training steps (columns): dark = trained.

    Args:
        history (`TrainingHistory` or path): what a `TrainingHistoryCallback` recorded (or its JSON file).
        path (`str` or `Path`): the PNG file to write.
        title (`str`, *optional*): the figure title.

    Returns:
        `Path`: the written file.
    """
    history = _as_history(history)
    if not history.steps:
        raise ValueError(
            "The history has no recorded step: attach a TrainingHistoryCallback and train first."
        )
    plt = _pyplot()
    groups = history.groups
    matrix = [[row.get(g, 0.0) for row in history.trainable_fraction] for g in groups]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(groups) + 1.5))
    image = ax.imshow(
        matrix,
        aspect="auto",
        origin="lower",
        cmap="Blues",
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
        extent=(history.steps[0] - 0.5, history.steps[-1] + 0.5, -0.5, len(groups) - 0.5),
    )
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels(groups)
    ax.set_xlabel("optimizer step")
    ax.set_title(title or "Trainable layer groups over training")
    fig.colorbar(image, ax=ax, label="fraction of the group's parameters trained")
    return _save(fig, plt, path)


def plot_lr_per_group(
    history: TrainingHistory | str | Path, path: str | Path, title: str | None = None
) -> Path:
    """Draw the learning rate of every optimizer param group over training steps (log scale)."""
    history = _as_history(history)
    seen = {label for row in history.lrs for label in row}
    labels = [g for g in reversed(history.groups) if g in seen] + sorted(seen - set(history.groups))
    if not labels:
        raise ValueError("The history has no learning rates: was the optimizer available to the callback?")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, label in enumerate(labels):
        points = [
            (s, row[label])
            for s, row in zip(history.steps, history.lrs, strict=True)
            if row.get(label, 0.0) > 0
        ]
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            label=label,
            color=cmap(i / max(len(labels) - 1, 1)),
        )
    ax.set_yscale("log")  # zero lrs (e.g. the first warmup step) are left out
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title or "Learning rate per param group")
    ax.legend(fontsize="x-small", ncol=2, loc="best")
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

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


def lr_segments(history: TrainingHistory) -> dict[str, list[tuple[list[int], list[float]]]]:
    """The stretches of steps in which each param group learns: trainable (a fraction of its layer group above 0)
    and with a positive lr. A param group whose label is no layer group (``param_group_3``) counts as trainable.

    Returns:
        `dict[str, list[tuple[list[int], list[float]]]]`: for each label, its stretches as (steps, lrs), in order;
        an empty list for a group that never learns.

    Example:

    ```python
    >>> from tl_plugin.callbacks.history import TrainingHistory
    >>> from tl_plugin.plotting import lr_segments
    >>> history = TrainingHistory(
    ...     groups=["blocks.0", "head"], steps=[0, 1, 2],
    ...     trainable_fraction=[{"blocks.0": 0.0, "head": 1.0}] + [{"blocks.0": 1.0, "head": 1.0}] * 2,
    ...     lrs=[{"blocks.0": 1e-4, "head": 1e-3}] * 3,
    ... )
    >>> lr_segments(history)  # blocks.0 is frozen at step 0: its line starts at step 1
    {'head': [([0, 1, 2], [0.001, 0.001, 0.001])], 'blocks.0': [([1, 2], [0.0001, 0.0001])]}

    ```
    """
    seen = {label for row in history.lrs for label in row}
    labels = [g for g in reversed(history.groups) if g in seen] + sorted(seen - set(history.groups))
    segments: dict[str, list[tuple[list[int], list[float]]]] = {}
    for label in labels:
        runs: list[tuple[list[int], list[float]]] = []
        previous_learning = False
        for i, (step, row) in enumerate(zip(history.steps, history.lrs, strict=True)):
            fraction = (
                history.trainable_fraction[i].get(label, 1.0) if i < len(history.trainable_fraction) else 1.0
            )
            learning = fraction > 0 and row.get(label, 0.0) > 0
            if learning and not previous_learning:
                runs.append(([], []))
            if learning:
                runs[-1][0].append(step)
                runs[-1][1].append(row[label])
            previous_learning = learning
        segments[label] = runs
    return segments


#: Line styles cycled over the groups, so that groups with the same lr (``head`` and ``other``) stay apart.
LINE_STYLES = ("-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def plot_lr_per_group(
    history: TrainingHistory | str | Path, path: str | Path, title: str | None = None
) -> Path:
    """Draw the learning rate of every optimizer param group over training steps (log scale), only while the group
    learns: a frozen stretch has no line, and the step where a group starts learning is marked with a dot. Groups
    get their own colour, line style and marker, and a label at the end of their line, so that groups sharing an lr
    (``head`` and ``other`` without decay between them) stay apart.

    Args:
        history (`TrainingHistory` or path): what a `TrainingHistoryCallback` recorded (or its JSON file).
        path (`str` or `Path`): the PNG file to write.
        title (`str`, *optional*): the figure title.

    Returns:
        `Path`: the written file.
    """
    history = _as_history(history)
    segments = lr_segments(history)
    if not segments:
        raise ValueError("The history has no learning rates: was the optimizer available to the callback?")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    cmap = plt.get_cmap("viridis")
    labels = list(segments)
    span = max(len(history.steps), 1)
    ends: list[tuple[float, float, str, Any]] = []
    for i, label in enumerate(labels):
        colour = cmap(0.9 * i / max(len(labels) - 1, 1))
        style = {
            "color": colour,
            "linestyle": LINE_STYLES[i % len(LINE_STYLES)],
            "linewidth": 1.8,
            "marker": MARKERS[i % len(MARKERS)],
            "markersize": 4,
        }
        runs = segments[label]
        if not runs:
            ax.plot([], [], label=f"{label} (frozen throughout)", **style)
            continue
        for number, (steps, lrs) in enumerate(runs):
            # markers spread along the line, each group's at another offset so that equal lines show both
            every = max(span // 8, 1)
            ax.plot(
                steps, lrs, label=label if number == 0 else None, gid=label,
                markevery=slice((i * every) // max(len(labels), 1) % every, None, every), **style,
            )  # fmt: skip
            ax.plot(
                steps[0], lrs[0], marker="o", markersize=6, color=colour, linestyle="", gid=f"{label}:start"
            )
        ends.append((runs[-1][0][-1], runs[-1][1][-1], label, colour))
    ax.set_yscale("log")  # zero lrs (e.g. the first warmup step) are left out
    _label_line_ends(ax, ends)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title or "Learning rate per param group")
    ax.text(
        0.01, 0.02, "no line while a group is frozen; ● the step it starts learning", transform=ax.transAxes,
        fontsize="small", color="0.35",
    )  # fmt: skip
    ax.legend(fontsize="small", ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    return _save(fig, plt, path)


def _label_line_ends(ax: Any, ends: list[tuple[float, float, str, Any]]) -> None:
    """Write each group's name right of its line's last point, pushed apart vertically where lines end together."""
    import math

    if not ends:
        return
    low, high = ax.get_ylim()
    span = math.log10(high) - math.log10(low)
    gap = span / 28  # about one label height in log10 units
    right = max(x for x, *_ in ends)
    left = ax.get_xlim()[0]
    ax.set_xlim(left, right + 0.17 * (right - left))
    column = right + 0.03 * (right - left)
    ordered = sorted(ends, key=lambda e: -e[1])
    placed: list[float] = []
    for _, y, _, _ in ordered:
        position = math.log10(y)
        placed.append(min(position, placed[-1] - gap) if placed else position)
    floor = math.log10(low) + gap  # keep the lowest name inside the axes
    shift = max(0.0, floor - placed[-1]) if placed else 0.0
    for (x, y, label, colour), position in zip(ordered, placed, strict=True):
        ax.annotate(
            label, xy=(x, y), xytext=(column, 10 ** (position + shift)), textcoords="data", fontsize="small",
            color=colour, annotation_clip=False, xycoords="data", ha="left", va="center",
            arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6, "alpha": 0.6},
        )  # fmt: skip


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

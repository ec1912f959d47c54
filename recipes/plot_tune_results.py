"""Redraw the search-results plot of docs/hyperparameter-search.md from the stored results table of that run.

    python recipes/plot_tune_results.py

Reads ``docs/data/tune-results-real-400.csv`` (the results table the real 8-trial search printed, as shown on the
page: all-MiniLM-L6-v2, 400 fine-food reviews, 2 epochs) and writes ``docs/images/tune-results.png`` with
`tl_plugin.tune.plot_results`, the majority-class rate of the validation split (0.65: 260 of the 400 validation
reviews are ``great``) drawn as the dashed baseline. ``--csv`` / ``--output`` / ``--baseline`` draw another
results table (a search's own ``results.csv`` reads the same way).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT / "docs" / "data" / "tune-results-real-400.csv"
DEFAULT_PNG = ROOT / "docs" / "images" / "tune-results.png"
#: The share of ``great`` among the 400 validation reviews every trial was evaluated on.
DEFAULT_BASELINE = 0.65
TITLE = "all-MiniLM-L6-v2, 400 reviews, 2 epochs: validation accuracy of 8 trials"

__all__ = ["DEFAULT_BASELINE", "DEFAULT_CSV", "DEFAULT_PNG", "main", "read_rows", "redraw"]


def read_rows(path: str | Path, metric: str = "eval_accuracy") -> list[dict[str, Any]]:
    """The rows of a results table (CSV, one trial a line) with numbers as numbers; empty cells become `None`."""
    numeric = {"epochs": int, "learning_rate": float, "frozen_blocks": int, "reinit_top_k": int,
               "lr_decay": float, metric: float, "time_s": float}  # fmt: skip
    rows = []
    with Path(path).open(newline="") as handle:
        for raw in csv.DictReader(handle):
            rows.append(
                {key: (None if value == "" else numeric[key](value) if key in numeric else value)
                 for key, value in raw.items()}
            )  # fmt: skip
    return rows


def redraw(
    csv_path: str | Path = DEFAULT_CSV,
    png_path: str | Path = DEFAULT_PNG,
    baseline: float | None = DEFAULT_BASELINE,
    metric: str = "eval_accuracy",
    title: str | None = TITLE,
) -> Path:
    """Plot the results table at ``csv_path`` to ``png_path`` (`tl_plugin.tune.plot_results`) with ``baseline``."""
    from tl_plugin.tune import plot_results

    return plot_results(read_rows(csv_path, metric), png_path, metric, title=title, baseline=baseline)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--csv", default=str(DEFAULT_CSV), help="The results table to draw.")
    parser.add_argument("--output", default=str(DEFAULT_PNG), help="The PNG file to write.")
    parser.add_argument(
        "--baseline", type=float, default=DEFAULT_BASELINE, help="The dashed line (majority rate)."
    )
    parser.add_argument("--metric", default="eval_accuracy", help="The column to plot.")
    args = parser.parse_args(argv)
    title = TITLE if Path(args.csv).resolve() == DEFAULT_CSV else None
    path = redraw(args.csv, args.output, args.baseline, args.metric, title)
    print(f"Wrote {path}")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])

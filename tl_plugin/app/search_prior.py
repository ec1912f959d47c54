"""``tl-plugin search --prior scan``: a search seeded by the layer scan.

Before any trial, the driver runs ``tl-plugin scan`` on the search's model and data (one no-grad pass, per-layer
probes and LogME; `tl_plugin.scan`) and narrows the search with its recommendation:

- the freeze boundary: only the recommended boundary and its two neighbours are searched (strategy ``layers``;
  ``full`` too when the scan recommends training everything);
- the learning rate: the scan's range for that many trained blocks, unless ``--lr_min`` / ``--lr_max`` are given;
- the order: the recommended config (its boundary, the middle of its learning-rate range) is the first trial,
  then its neighbours, before any sampled point.

With ``--activation_cache``, trials of the same boundary share one cache file, as in any search. The scan's table,
plot and YAML are written to ``<output_dir>/scan/``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PRIORS", "ScanPrior", "prior_from_recommendation", "run_scan_prior"]

#: The values of ``--prior``.
PRIORS = ("none", "scan")


@dataclass
class ScanPrior:
    """How a scan narrows a search: the boundaries, strategies and learning-rate range searched, and the points
    tried first (the recommendation, then its neighbours)."""

    boundary: int
    freeze_blocks: list[int]
    strategies: list[str]
    lr_range: tuple[float, float]
    first_points: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "boundary": self.boundary,
            "freeze_blocks": self.freeze_blocks,
            "strategies": self.strategies,
            "lr_range": list(self.lr_range),
            "first_points": self.first_points,
        }


def prior_from_recommendation(
    boundary: int, lr_range: tuple[float, float], num_blocks: int, *, keep_lr_range: tuple[float, float] | None = None
) -> ScanPrior:
    """The narrowed search for a scan that recommends freezing `boundary` bottom blocks (0: train everything) with
    learning rates in `lr_range`, on a model of `num_blocks` blocks; `keep_lr_range`: the user's own range, kept.

    Example:

    ```python
    >>> from tl_plugin.app.search_prior import prior_from_recommendation
    >>> prior = prior_from_recommendation(2, (5e-5, 2e-4), num_blocks=6)
    >>> prior.freeze_blocks, prior.strategies, prior.lr_range
    ([1, 2, 3], ['layers'], (5e-05, 0.0002))
    >>> [(p["strategy"], p["freeze_bottom_blocks"]) for p in prior.first_points]
    [('layers', 2), ('layers', 1), ('layers', 3)]
    >>> prior_from_recommendation(0, (2e-5, 1e-4), num_blocks=6).strategies
    ['full', 'layers']

    ```
    """
    if not 0 <= boundary < num_blocks:
        raise ValueError(f"`boundary` must be in [0, {num_blocks - 1}] for a {num_blocks}-block model, got {boundary}.")
    low, high = keep_lr_range or lr_range
    middle = float((low * high) ** 0.5)
    centre = max(1, boundary)
    freeze_blocks = sorted({max(1, centre - 1), centre, min(num_blocks - 1, centre + 1)} | {centre})
    strategies = ["full", "layers"] if boundary == 0 else ["layers"]
    base = {"learning_rate": middle, "reinit_top_k": 1, "lr_decay": 1.0}
    first = [{**base, "strategy": "full", "freeze_bottom_blocks": centre}] if boundary == 0 else []
    order = [centre] + [b for b in freeze_blocks if b != centre]
    first += [{**base, "strategy": "layers", "freeze_bottom_blocks": b} for b in order]
    return ScanPrior(boundary, freeze_blocks, strategies, (float(low), float(high)), first)


def run_scan_prior(args: argparse.Namespace, settings: Any, train_flags: list[str], output_dir: Path) -> ScanPrior:
    """Run ``tl-plugin scan`` on the search's model and data (in this process), and narrow the search with it."""
    from .scan import run_scan

    argv = [*train_flags, "--output_dir", str(output_dir / "scan"), "--train_size", str(settings.train_size),
            "--max_length", str(settings.max_length), "--seed", str(settings.seed)]  # fmt: skip
    if settings.model_path:
        argv += ["--model_name_or_path", settings.model_path]
    print("\nPrior: the layer scan of the search's model and data (tl-plugin scan)", flush=True)
    result = run_scan(argv)
    recommendation = result["recommendation"]
    explicit: set[str] = getattr(args, "explicit", set())
    keep = (args.lr_min, args.lr_max) if {"lr_min", "lr_max"} & explicit else None
    prior = prior_from_recommendation(
        int(recommendation["boundary"]),
        (float(recommendation["learning_rate_range"][0]), float(recommendation["learning_rate_range"][1])),
        settings.num_blocks,
        keep_lr_range=keep,
    )
    print(
        f"Prior: boundaries {prior.freeze_blocks} (recommended {prior.boundary}), strategies {prior.strategies}, "
        f"learning rate {prior.lr_range[0]:g} to {prior.lr_range[1]:g}; the recommendation is the first trial",
        flush=True,
    )
    return prior

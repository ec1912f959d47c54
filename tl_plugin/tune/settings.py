"""The fixed settings of a search (`SearchSettings`), the same for every trial, from the command line."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checks import check_int
from ..testing import save_tiny_bert
from .space import _check_num_blocks, count_blocks


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
            check_int(name, getattr(self, name), minimum=1)

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

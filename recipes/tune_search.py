"""Ray Tune recipe: which layers should I transfer and train, and at what learning rate?

A thin wrapper over ``tl-plugin search`` (`tl_plugin.app.search`): the same options, spelled with dashes or
underscores, including the model / data / task options of ``tl-plugin train``. Without data options it searches the
bundled all-MiniLM-L6-v2 on the bundled fine-food reviews.

    python recipes/tune_search.py --num-samples 8 --max-epochs 2 --train-size 400
    python recipes/tune_search.py --tiny --num-samples 4            # smoke run on a tiny BERT (a minute)
    python recipes/tune_search.py --train_file my.csv --metric eval_macro_f1 --num-samples 8
    python recipes/tune_search.py --resume --output-dir outputs/tune  # finish an interrupted search

Outputs (``--output-dir``, default ``outputs/tune``): ``results.csv`` (rewritten after every trial event),
``results.png`` (with ``--metric eval_accuracy``, the majority-class rate of the validation split as a dashed line;
the rate is printed too), ``best.yaml`` (a transfer config for ``tl-plugin train --transfer_config``),
``best_training_args.json`` (with the exact final ``tl-plugin train`` command, also printed), ``search.json`` and
the Ray experiment under ``--storage-path``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tl_plugin.app.search import (  # noqa: E402
    DEFAULT_NAME,
    DEFAULT_OUTPUT_DIR,
    build_search_parser,
    run_search,
)
from tl_plugin.cli import main as cli_main  # noqa: E402

__all__ = ["DEFAULT_NAME", "DEFAULT_OUTPUT_DIR", "build_parser", "main", "run_search"]


def build_parser() -> object:
    """The parser of ``tl-plugin search``, named for this recipe."""
    return build_search_parser(prog="python recipes/tune_search.py")


def main(argv: list[str] | None = None) -> int:
    return cli_main(["search", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

"""``tl-plugin``: the command line. It lives in `tl_plugin.app` (`tl_plugin.app.cli`); this module keeps the
entry point ``tl_plugin.cli:main`` and ``python -m tl_plugin.cli``. Part of the applications layer."""

from __future__ import annotations

from .app.arguments import DEFAULT_OUTPUT_DIR, TRAINING_DEFAULTS
from .app.cli import main
from .app.train import parse_train_args, run_train

__all__ = ["DEFAULT_OUTPUT_DIR", "TRAINING_DEFAULTS", "main", "parse_train_args", "run_train"]

if __name__ == "__main__":
    raise SystemExit(main())

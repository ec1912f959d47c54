"""``tl-plugin``: the command line (``train``, ``search``, ``groups``, ``scan``).

Every subcommand has a ``--help`` that loads nothing. Unknown flags are rejected with the nearest valid one; a
missing or bad value is one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import UsageError
from .parser import suggest_flag

__all__ = ["COMMANDS", "main"]


@dataclass
class Command:
    summary: str
    run: Callable[[list[str]], object]
    aliases: tuple[str, ...] = field(default_factory=tuple)


def _train(argv: list[str]) -> object:
    from .train import run_train

    return run_train(argv)


def _search(argv: list[str]) -> object:
    from .search import main as search_main

    return search_main(argv)


def _groups(argv: list[str]) -> object:
    from .groups import run_groups

    run_groups(argv)
    return 0


def _lr_find(argv: list[str]) -> object:
    from .lr_find import run_lr_find

    run_lr_find(argv)
    return 0


def _scan(argv: list[str]) -> object:
    from .scan import run_scan

    run_scan(argv)
    return 0


def _demo_data(argv: list[str]) -> object:
    from .demo_data import run_demo_data

    run_demo_data(argv)
    return 0


COMMANDS: dict[str, Command] = {
    "train": Command("fine-tune a pretrained model on your data (or the bundled demo) with a transfer strategy", _train),
    "search": Command("search learning rate and which layers to transfer with Ray Tune, on the same data options", _search),
    "lr-find": Command("learning-rate range test on the same model/data/transfer options as train; suggests an lr", _lr_find),
    "groups": Command("print a model's layer groups (embeddings, blocks, head) and their sizes", _groups),
    "scan": Command("score every layer's frozen features (linear probe, LogME) and recommend what to freeze", _scan),
    "demo-data": Command("write the bundled fine-food reviews as CSV files (to try the own-data path)", _demo_data),
}


def usage() -> str:
    lines = ["usage: tl-plugin <command> [options]   (tl-plugin <command> --help lists its options)", "", "commands:"]
    lines += [f"  {name:<8} {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "  --debug  (any command) show the traceback of an error"]
    return "\n".join(lines)


def _set_offline_environment() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    """Run ``tl-plugin``; returns the exit code (0 success, 2 bad command line or data)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    _set_offline_environment()
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    command = COMMANDS.get(name)
    if command is None:
        hint = suggest_flag("--" + name, ["--" + c for c in COMMANDS]).replace("--", "")
        print(f"tl-plugin: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        result = command.run(rest)
    except UsageError as err:
        if debug:
            traceback.print_exc()
        print(f"tl-plugin {name}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())

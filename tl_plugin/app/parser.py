"""A strict argument parser for the subcommands: unknown flags are rejected with the nearest valid one, abbreviations
are not accepted, and every error is a `UsageError` (one line, exit code 2) instead of argparse's usage dump."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any

from transformers import HfArgumentParser

from .errors import UsageError

__all__ = ["CommandParser", "suggest_flag"]


def suggest_flag(flag: str, valid: Sequence[str]) -> str:
    """`` (did you mean --x?)`` for the nearest valid flag, or an empty string."""
    name = flag.split("=", 1)[0]
    close = difflib.get_close_matches(name, [v for v in valid if v.startswith("--")], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class CommandParser(HfArgumentParser):
    """`transformers.HfArgumentParser` for one ``tl-plugin`` subcommand.

    Args:
        dataclass_types: the option dataclasses (`transformers.TrainingArguments` among them for ``train``).
        prog (`str`): the command, e.g. ``"tl-plugin train"``.
        description (`str`): shown by ``--help``.
    """

    def __init__(self, dataclass_types: Sequence[Any], prog: str, description: str) -> None:
        super().__init__(
            list(dataclass_types),
            prog=prog,
            description=description,
            allow_abbrev=False,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        self._types = list(dataclass_types)

    def error(self, message: str) -> Any:  # argparse's hook for bad command lines
        raise UsageError(message)

    def parse(self, argv: Sequence[str]) -> tuple[list[Any], argparse.Namespace]:
        """Parse `argv` into one instance per dataclass and a namespace with the other options.

        Raises:
            UsageError: for an unknown flag (with the nearest valid one), a stray value, a missing or bad value.
        """
        namespace, unknown = self.parse_known_args(list(argv))
        if unknown:
            first = unknown[0]
            if first.startswith("-"):
                hint = suggest_flag(first, list(self._option_string_actions))
                raise UsageError(f"unknown option {first}{hint}; `{self.prog} --help` lists the options")
            raise UsageError(f"unexpected value {first!r} (every value follows its --option)")
        outputs = []
        for dtype in self._types:
            names = {f.name for f in dataclasses.fields(dtype) if f.init}
            values = {k: v for k, v in vars(namespace).items() if k in names}
            for name in values:
                delattr(namespace, name)
            try:
                outputs.append(dtype(**values))
            except UsageError:
                raise
            except (ValueError, TypeError) as err:
                raise UsageError(str(err).strip().splitlines()[0]) from err
        return outputs, namespace

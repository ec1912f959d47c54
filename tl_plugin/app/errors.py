"""Errors of the command line: bad arguments and bad data, each reported as one line with exit code 2."""

from __future__ import annotations

__all__ = ["DataError", "UsageError"]


class UsageError(ValueError):
    """A bad command line: an unknown flag, a missing or bad value. ``tl-plugin`` prints the message as one line
    and exits with code 2 (``--debug`` shows the traceback)."""


class DataError(UsageError):
    """Bad input data: a missing file, an unknown column, an empty split, unknown labels ... The message names the
    file / column / row and the fix."""

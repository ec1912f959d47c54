"""``tl-plugin search --resume``: the resumed search is the search that was started, or it is refused.

A search saves, in ``<output_dir>/search.json``, its settings, its search space and a fingerprint of the user's data
files (`data_fingerprint`). On ``--resume`` the saved search is what runs. Options given again on the resume
command line must agree with it, and the data must not have changed: otherwise finished trials (kept) and resumed
ones (trained on other data or another space) would be compared in one results table. `resume_differences` lists
what differs, by flag, and the search stops with it before Ray starts.

Options of *where* the search runs (``--address``, ``--num_cpus``, ``--cpus_per_trial``, ``--max_concurrent``,
``--verbose`` ...) may change on resume; the saved ``--workers_per_trial`` is kept unless given again (and then
it must agree).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DATA_PATH_OPTIONS", "data_fingerprint", "explicit_options", "resume_differences"]

#: The data options that name files or folders: their content is fingerprinted.
DATA_PATH_OPTIONS = (
    "train_file", "validation_file", "test_file", "train_dir", "validation_dir", "test_dir", "dataset_dir",
    "dataset_name",
)  # fmt: skip

#: Search options (dest → key of the saved ``search`` dict); ``lr_min`` / ``lr_max`` and ``no_baseline`` apart.
_SEARCH_KEYS = {
    "num_samples": "num_samples",
    "strategies": "strategies",
    "gradual_unfreezing": "gradual_unfreezing",
    "l2sp": "l2sp",
    "grace_period": "grace_period",
    "reduction_factor": "reduction_factor",
    "scheduler": "scheduler",
    "perturbation_interval": "perturbation_interval",
    "max_failures": "max_failures",
    "workers_per_trial": "workers_per_trial",
}
#: Options stored in the saved settings (dest → `tl_plugin.tune.SearchSettings` field).
_SETTINGS_KEYS = {
    "max_epochs": "max_epochs",
    "seed": "seed",
    "metric": "metric",
    "mode": "mode",
    "train_size": "train_size",
    "max_length": "max_length",
    "activation_cache": "activation_cache",
}


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the options written on the command line `argv` (``--lr_max=1e-3`` and
    ``--lr-max 1e-3`` alike), as opposed to those left at their defaults."""
    by_flag = parser._option_string_actions  # noqa: SLF001  (argparse keeps no public map of flags)
    found: set[str] = set()
    for token in argv:
        if token.startswith("--"):
            action = by_flag.get(token.split("=", 1)[0])
            if action is not None:
                found.add(action.dest)
    return found


def _file_digest(path: Path, digest: Any) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def _path_fingerprint(path: Path) -> str:
    """SHA-256 of a file's bytes; of a folder: of every file's relative path, size and modification time (image and
    audio folders can be large: reading every byte on each resume would cost more than it protects)."""
    digest = hashlib.sha256()
    if path.is_file():
        _file_digest(path, digest)
    elif path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                file = Path(root, name)
                stat = file.stat()
                digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        return "missing"
    return digest.hexdigest()


def data_fingerprint(data_args: Any) -> dict[str, str]:
    """``{option: fingerprint}`` for the data options of `data_args` that name a file or folder."""
    found: dict[str, str] = {}
    for name in DATA_PATH_OPTIONS:
        value = getattr(data_args, name, None)
        if value:
            found[name] = _path_fingerprint(Path(value).expanduser().resolve())
    return found


def _flag_values(flags: Iterable[str]) -> dict[str, str]:
    """``["--task", "x", "--train_file", "y"]`` → ``{"task": "x", "train_file": "y"}``."""
    items = list(flags)
    return {items[i][2:]: items[i + 1] for i in range(0, len(items) - 1, 2) if items[i].startswith("--")}


def _differs(differences: list[str], flag: str, now: Any, then: Any) -> None:
    if now != then:
        differences.append(f"--{flag} {_show(now)} (the search was started with {_show(then)})")


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return "(not given)" if value is None else str(value)


def resume_differences(
    args: argparse.Namespace,
    saved: Mapping[str, Any],
    *,
    explicit: set[str],
    train_flags: Sequence[str],
) -> list[str]:
    """What the resume command line (`args`, with the options in `explicit` written on it) and the data on disk
    change against the `saved` search (the content of ``search.json``); empty when the resume is the same search.

    Args:
        args: the parsed ``tl-plugin search`` options (``args.data``: the data options).
        saved: ``{"settings": ..., "search": ..., "data_fingerprint": ...}`` as written by the first run.
        explicit: the option destinations written on the resume command line (`explicit_options`).
        train_flags: the resume command's model / data / task flags as ``tl-plugin train`` flags.
    """
    differences: list[str] = []
    search, settings = saved.get("search", {}), saved.get("settings", {})
    for dest, key in _SEARCH_KEYS.items():
        if dest in explicit and key in search:
            _differs(differences, dest, getattr(args, dest), search[key])
    low, high = search.get("lr_range", (None, None))
    if "lr_min" in explicit:
        _differs(differences, "lr_min", args.lr_min, low)
    if "lr_max" in explicit:
        _differs(differences, "lr_max", args.lr_max, high)
    if "prior" in explicit:
        _differs(differences, "prior", args.prior, "scan" if isinstance(search.get("prior"), dict) else "none")
    if "no_baseline" in explicit and "baseline" in search:
        _differs(differences, "no_baseline", bool(args.no_baseline), not search["baseline"])
    for dest, key in _SETTINGS_KEYS.items():
        if dest in explicit and key in settings:
            _differs(differences, dest, getattr(args, dest), settings[key])
    if "model_name_or_path" in explicit and settings.get("model_path") is not None and args.model_path:
        _differs(differences, "model_name_or_path", str(Path(args.model_path).resolve()), settings["model_path"])
    then_flags, now_flags = _flag_values(settings.get("train_args", [])), _flag_values(train_flags)
    for dest in sorted(explicit & (set(now_flags) | set(then_flags))):
        _differs(differences, dest, now_flags.get(dest), then_flags.get(dest))
    differences += _changed_data(saved.get("data_fingerprint") or {}, then_flags)
    return differences


def _changed_data(fingerprints: Mapping[str, str], then_flags: Mapping[str, str]) -> list[str]:
    """The data files or folders of the first run whose content is not what it was then."""
    changed = []
    for name, before in fingerprints.items():
        path = then_flags.get(name)
        if path is None:
            continue
        now = _path_fingerprint(Path(path))
        if now != before:
            what = "is gone" if now == "missing" else "changed since the search started"
            changed.append(f"--{name} {path}: the data {what}")
    return changed

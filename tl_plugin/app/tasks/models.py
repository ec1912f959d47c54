"""Loading a local pretrained model for a task: a clear error for a missing folder, a notice when the head is
re-initialised for the run's labels, and the from-scratch baseline."""

from __future__ import annotations

import os
from typing import Any

from ..errors import UsageError

__all__ = ["check_model_folder", "load_pretrained"]


def check_model_folder(path: str) -> str:
    """`path`, or a `UsageError` when it is not a local model folder (no hub look-ups here)."""
    if not os.path.isdir(path):
        raise UsageError(
            f"--model_name_or_path: no such folder {path!r} (tl-plugin loads local model folders only; download "
            f"a hub model first, e.g. with `huggingface-cli download`, and pass its folder)"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"--model_name_or_path: {path!r} has no config.json; it is not a Hugging Face model folder")
    return path


def _head_size(model_path: str) -> int | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None
    id2label = getattr(config, "id2label", None) or {}
    return len(id2label) if config.architectures and any("For" in a for a in config.architectures) else None


def load_pretrained(auto_class: Any, model_path: str, args: Any, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(model_path, ...)`` (or ``from_config`` with ``args.from_scratch``).

    A pretrained head whose size disagrees with ``kwargs["num_labels"]`` is re-initialised
    (``ignore_mismatched_sizes=True``) and a notice says so.
    """
    from transformers import AutoConfig

    check_model_folder(model_path)
    trust = bool(getattr(args, "trust_remote_code", False))
    if getattr(args, "from_scratch", False):
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust, **kwargs)
        return auto_class.from_config(config, trust_remote_code=trust)
    saved = _head_size(model_path)
    wanted = kwargs.get("num_labels")
    if saved is not None and wanted is not None and saved != wanted:
        print(
            f"Notice: the model in {model_path} has a {saved}-label head; it is re-initialised for the "
            f"{wanted} labels of this data."
        )
    return auto_class.from_pretrained(model_path, trust_remote_code=trust, ignore_mismatched_sizes=True, **kwargs)

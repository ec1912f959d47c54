"""The key of a stored slot: everything that changes what the prefix computes for a dataset.

A key hashes the prefix weights (`prefix_fingerprint`), the boundary, the content of the dataset's model inputs,
the collator, the model class and config (`config_fingerprint`), the stored positions and dtype, and the torch
version. A changed key is a new file; nothing stale is ever read.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from .layout import PrefixLayout

__all__ = ["cache_key", "config_fingerprint", "prefix_fingerprint"]

# Config keys that do not change what the prefix computes (they describe the task head or the output format).
_CONFIG_KEYS_IGNORED = (
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "_name_or_path",
    "architectures",
    "finetuning_task",
    "transformers_version",
    "classifier_dropout",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_cache",
    "torchscript",
    "_commit_hash",
)


def prefix_fingerprint(layout: PrefixLayout, units: int) -> str:
    """A digest of the parameters and buffers of the first `units` units (their names, shapes and values)."""
    digest = hashlib.blake2b(digest_size=20)
    for names, modules in zip(layout.unit_names[:units], layout.unit_modules[:units], strict=True):
        for name, module in zip(names, modules, strict=True):
            digest.update(f"{name}:{type(module).__qualname__}|".encode())
            tensors = list(module.named_parameters()) + list(module.named_buffers())
            for tensor_name, tensor in sorted(tensors, key=lambda item: item[0]):
                data = tensor.detach().cpu().contiguous()
                digest.update(f"{tensor_name}|{data.dtype}|{tuple(data.shape)}|".encode())
                digest.update(data.reshape(-1).view(torch.uint8).numpy().data)  # in place, no copy
    return digest.hexdigest()


def config_fingerprint(model: nn.Module) -> str:
    """A digest of the model config, without the keys that describe only the head or the output format."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return "no-config"
    data = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_KEYS_IGNORED}
    data["attn_implementation"] = getattr(config, "_attn_implementation", None)
    return hashlib.blake2b(json.dumps(data, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def cache_key(
    model: nn.Module,
    *,
    fingerprint: str,
    units: int,
    content_hash: str,
    collator: dict[str, Any],
    first_position_only: bool,
    dtype: str,
    format_version: int,
) -> str:
    """The key of one slot (see the module docstring)."""
    material = {
        "format": format_version,
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": config_fingerprint(model),
        "prefix": fingerprint,
        "units": units,
        "data": content_hash,
        "collator": collator,
        "prefix_mode": "eval",
        "positions": "first" if first_position_only else "all",
        "dtype": dtype,
        "torch": torch.__version__,
    }
    text = json.dumps(material, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

"""Datasets registered with the activation cache: example ids, row checksums, and the collator that carries ids.

Each registered dataset gets an index; example ``i`` of dataset ``d`` has the cache id ``d << 32 | i``, carried
to the model by the ``tl_cache_id`` column and `CacheIdCollator`. `RowIndex` holds what a lookup checks: a
content hash of the model inputs (for the store's key), and per example a checksum and the length of its main
input (``input_ids``), so that a row edited after registration is caught instead of given stale activations.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CACHE_ID_COLUMN",
    "CacheIdCollator",
    "RowIndex",
    "describe_collator",
    "feature_batches",
    "is_hf_dataset",
    "model_input_keys",
    "collate_inputs",
    "with_cache_ids",
]

#: The dataset column (and model keyword) that carries each example's cache id.
CACHE_ID_COLUMN = "tl_cache_id"
_LABEL_NAMES = ("label", "labels", "label_ids")
#: Bits of a cache id that hold the row (the rest holds the dataset's index).
ROW_BITS = 32


def model_input_keys(model: nn.Module) -> set[str]:
    """The keywords of `model`'s forward that are inputs: not labels, not the cache ids."""
    from transformers.utils import find_labels

    params = inspect.signature(model.forward).parameters
    keys = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return keys - set(find_labels(type(model))) - set(_LABEL_NAMES) - {CACHE_ID_COLUMN}


def collate_inputs(
    collator: Callable[[list[dict[str, Any]]], Any],
    features: list[dict[str, Any]],
    keys: set[str],
    model: nn.Module,
) -> dict[str, Any]:
    """`features` collated, model inputs only (on the model's device)."""
    batch = collator([{k: v for k, v in f.items() if k in keys} for f in features])
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return {
        k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in dict(batch).items() if k in keys
    }


def checksum_weights(length: int) -> np.ndarray:
    return np.arange(length, dtype=np.int64) * np.int64(2654435761) + np.int64(97)


def is_hf_dataset(dataset: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(dataset, datasets.Dataset)


def feature_batches(dataset: Any, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """The examples of `dataset`, in order, as lists of feature dicts."""
    if is_hf_dataset(dataset):
        for batch in dataset.iter(batch_size=batch_size):
            keys = list(batch)
            n = len(batch[keys[0]]) if keys else 0
            yield [{k: batch[k][i] for k in keys} for i in range(n)]
        return
    n = len(dataset)
    for start in range(0, n, batch_size):
        yield [dict(dataset[i]) for i in range(start, min(start + batch_size, n))]


@dataclass
class RowIndex:
    """What the cache knows about the examples of one dataset (see the module docstring)."""

    content_hash: str
    checksums: np.ndarray
    lengths: np.ndarray

    @property
    def width(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def scan(cls, dataset: Any, input_keys: set[str], main: str) -> RowIndex:
        """Content hash of the model inputs, and per-example checksums and lengths of the main input."""
        digest = hashlib.blake2b(digest_size=20)
        checksums: list[int] = []
        lengths: list[int] = []
        for features in feature_batches(dataset, 1024):
            for feature in features:
                for key in sorted(k for k in feature if k in input_keys):
                    value = np.asarray(feature[key])
                    digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
                    digest.update(np.ascontiguousarray(value).tobytes())
                if main not in feature:
                    raise ValueError(
                        f"The dataset's examples have no {main!r} (they have {sorted(feature)}): the "
                        "activation cache needs tokenized examples."
                    )
                ids = np.asarray(feature[main], dtype=np.int64).reshape(-1)
                mask = np.asarray(feature.get("attention_mask", np.ones_like(ids)), dtype=np.int64).reshape(
                    -1
                )
                checksums.append(int(((ids + 1) * checksum_weights(len(ids)) * mask).sum()))
                lengths.append(len(ids))
        return cls(
            digest.hexdigest(), np.asarray(checksums, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
        )

    def batch_checksums(self, rows: np.ndarray, input_ids: torch.Tensor, mask: Any) -> np.ndarray:
        """The checksums of a collated batch of `rows` (to compare with ``self.checksums[rows]``)."""
        length = input_ids.shape[1]
        lengths = torch.from_numpy(self.lengths[rows]).to(input_ids.device)
        positions = torch.arange(length, device=input_ids.device)
        valid = (positions[None, :] < lengths[:, None]).long()
        if isinstance(mask, torch.Tensor) and mask.shape == input_ids.shape:
            valid = valid * mask.long()
        weights = torch.from_numpy(checksum_weights(length)).to(input_ids.device)
        return ((input_ids.long() + 1) * weights * valid).sum(dim=1).cpu().numpy()


class _WithCacheIds(torch.utils.data.Dataset):
    """A map-style dataset whose examples get a ``tl_cache_id`` entry."""

    def __init__(self, dataset: Any, ids: np.ndarray) -> None:
        self.dataset = dataset
        self.ids = ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item[CACHE_ID_COLUMN] = int(self.ids[index])
        return item


def with_cache_ids(dataset: Any, index: int) -> Any:
    """`dataset` with a ``tl_cache_id`` column for dataset number `index` (a `datasets.Dataset` stays one)."""
    ids = (np.int64(index) << ROW_BITS) + np.arange(len(dataset), dtype=np.int64)
    if is_hf_dataset(dataset):
        if CACHE_ID_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(CACHE_ID_COLUMN)
        return dataset.add_column(CACHE_ID_COLUMN, ids.tolist())
    return _WithCacheIds(dataset, ids)


def split_ids(ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """The dataset indices and rows of a batch of cache ids."""
    ids_np = torch.as_tensor(ids).detach().to("cpu", torch.int64).numpy()
    return ids_np >> ROW_BITS, ids_np & ((1 << ROW_BITS) - 1)


class CacheIdCollator:
    """Wraps a data collator: pops ``tl_cache_id`` from the features, collates the rest, adds the ids back."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], Any]) -> None:
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        if not features or CACHE_ID_COLUMN not in features[0]:
            return self.collator(features)
        ids = [int(f[CACHE_ID_COLUMN]) for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != CACHE_ID_COLUMN} for f in features])
        batch[CACHE_ID_COLUMN] = torch.tensor(ids, dtype=torch.int64)
        return batch


def describe_collator(collator: Any) -> dict[str, Any]:
    """What of a collator changes the collated inputs (its class, padding, the tokenizer's pad token and side)."""
    info: dict[str, Any] = {"class": f"{type(collator).__module__}.{type(collator).__qualname__}"}
    for attr in ("padding", "max_length", "pad_to_multiple_of", "return_tensors"):
        if hasattr(collator, attr):
            info[attr] = repr(getattr(collator, attr))
    tokenizer = getattr(collator, "tokenizer", None)
    if tokenizer is not None:
        info["pad_token_id"] = getattr(tokenizer, "pad_token_id", None)
        info["padding_side"] = getattr(tokenizer, "padding_side", None)
    return info

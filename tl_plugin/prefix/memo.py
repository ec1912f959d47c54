"""Finding cached rows by what a batch contains, for batches that carry no cache ids.

A `transformers.Trainer` given a dataset the cache never registered (``trainer.evaluate(eval_dataset=other)``), or
a training dataloader built before the cache existed, hands the model batches without ``tl_cache_id``. With
``by_content=True`` the cache finds their rows by a digest of each example's model inputs at its attended
positions (`row_digest` on a collated batch, `feature_digest` on a dataset's example: the same bytes for the
same example, padded or not), and keeps the prefix outputs of the examples it did not find in a `RowMemo`, so
that the next pass over them (the next evaluation) reads them instead of computing.

Example:

```python
>>> import torch
>>> from tl_plugin.prefix.memo import feature_digest, row_digests
>>> batch = {"input_ids": torch.tensor([[2, 7, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
>>> row_digests(batch, "input_ids")[0] == feature_digest({"input_ids": [2, 7, 3]}, "input_ids")
True

```
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .store import decode, encode

__all__ = ["RowMemo", "feature_digest", "row_digests"]


def _digest(parts: list[tuple[str, np.ndarray]]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for key, values in parts:
        digest.update(f"{key}|{len(values)}|".encode())
        digest.update(np.ascontiguousarray(values, dtype=np.int64).tobytes())
    return digest.digest()


def feature_digest(feature: Mapping[str, Any], main: str, keys: set[str] | None = None) -> bytes:
    """The digest of one example (a dict of model inputs): its per-position inputs at the attended positions."""
    ids = np.asarray(feature[main], dtype=np.int64).reshape(-1)
    mask = feature.get("attention_mask")
    keep = np.ones(len(ids), bool) if mask is None else np.asarray(mask).reshape(-1).astype(bool)
    names = sorted(k for k in feature if (keys is None or k in keys) and k != "attention_mask")
    parts = []
    for name in names:
        values = np.asarray(feature[name]).reshape(-1)
        if values.shape == ids.shape and np.issubdtype(values.dtype, np.integer):
            parts.append((name, values[keep]))
    return _digest(parts)


def row_digests(batch: Mapping[str, Any], main: str) -> list[bytes] | None:
    """The digest of every row of a collated batch (`None` when its main input is not a 2-d tensor)."""
    ids = batch.get(main)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    mask = batch.get("attention_mask")
    keep = mask.bool() if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else None
    names = sorted(
        k
        for k, v in batch.items()
        if k != "attention_mask"
        and isinstance(v, torch.Tensor)
        and v.shape == ids.shape
        and not v.is_floating_point()
    )
    arrays = {k: batch[k].detach().to("cpu", torch.int64).numpy() for k in names}
    kept = keep.cpu().numpy() if keep is not None else np.ones(ids.shape, bool)
    return [_digest([(k, arrays[k][r][kept[r]]) for k in names]) for r in range(ids.shape[0])]


class RowMemo:
    """Prefix outputs of single examples, by digest, within a byte budget.

    Args:
        dtype (`str`): the storage dtype (``"float32"`` or ``"float16"``).
    """

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.rows: dict[bytes, np.ndarray] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, digest: bytes) -> np.ndarray | None:
        return self.rows.get(digest)

    def clear(self) -> None:
        self.rows.clear()
        self.nbytes = 0

    def record(self, digests: list[bytes], boundary: torch.Tensor, lengths: list[int], budget: int) -> bool:
        """Keep row ``r`` of `boundary` (as `storage_dtype`) (its first ``lengths[r]`` positions) under ``digests[r]``.

        Returns `False` (and keeps nothing more) once `budget` bytes would be exceeded.
        """
        values = encode(boundary, self.dtype)
        for row, (digest, length) in enumerate(zip(digests, lengths, strict=True)):
            if digest in self.rows:
                continue
            stored = np.array(values[row, :length] if values.ndim >= 3 else values[row])
            if self.nbytes + stored.nbytes > budget:
                return False
            self.rows[digest] = stored
            self.nbytes += stored.nbytes
        return True


class ContentLookup:
    """Rows of a batch without cache ids, found by content in the store's slots or in the memo.

    Args:
        main (`str`): the model's main input (``input_ids``).
        dtype (`str`): the memo's storage dtype.
    """

    def __init__(self, main: str, dtype: str) -> None:
        self.main = main
        self.index: dict[bytes, tuple[int, int]] = {}
        self.memo = RowMemo(dtype)
        self._pending: tuple[list[bytes], list[int]] | None = None

    def forget_pending(self) -> None:
        self._pending = None

    def index_rows(self, slot_index: int, digests: list[bytes]) -> None:
        """Make the rows of slot `slot_index` findable by their digests."""
        for row, digest in enumerate(digests):
            self.index.setdefault(digest, (slot_index, row))

    def find(
        self, inputs: Mapping[str, Any], store: Any, like: torch.Tensor, first_position_only: bool
    ) -> torch.Tensor | None:
        """The stored rows of every example of `inputs` (shaped like the model's hidden states), or `None`.

        On `None` the digests of the batch are kept until :meth:`record` (the same forward) stores its rows.
        """
        self._pending = None
        digests = row_digests(inputs, self.main)
        if digests is None:
            return None
        ids = inputs[self.main]
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
            lengths = [int(n) for n in mask.sum(dim=1).tolist()]
        else:
            lengths = [int(ids.shape[1])] * ids.shape[0]
        from_slots: dict[int, list[tuple[int, int]]] = {}
        from_memo: list[tuple[int, np.ndarray]] = []
        for position, digest in enumerate(digests):
            found = self.index.get(digest)
            if found is not None and store.slots[found[0]].array is not None:
                from_slots.setdefault(found[0], []).append((position, found[1]))
                continue
            row = self.memo.get(digest)
            if row is None:
                self._pending = (digests, [1 if first_position_only else n for n in lengths])
                return None
            from_memo.append((position, row))
        parts: list[tuple[list[int], torch.Tensor]] = []
        for slot_index, pairs in from_slots.items():
            rows = np.asarray([row for _, row in pairs], dtype=np.int64)
            parts.append(
                ([p for p, _ in pairs], store.rows_tensor(store.slots[slot_index], rows, like[: len(rows)]))
            )
        for position, row in from_memo:
            values = decode(row, self.memo.dtype)
            if like.dim() >= 2:
                length = like.shape[1]
                values = values[:length]
                if values.shape[0] < length:
                    pad = torch.zeros((length - values.shape[0],) + tuple(values.shape[1:]))
                    values = torch.cat([values, pad])
            parts.append(([position], values.unsqueeze(0).to(device=like.device, dtype=like.dtype)))
        if len(parts) == 1 and parts[0][0] == list(range(len(digests))):
            return parts[0][1]
        first = parts[0][1]
        out = first.new_zeros((len(digests),) + tuple(first.shape[1:]))
        for positions, values in parts:
            out[positions] = values
        return out

    def record(self, boundary: torch.Tensor, budget: int) -> bool:
        """Keep the rows of the forward whose lookup missed (`False`: over `budget`, nothing more kept)."""
        pending, self._pending = self._pending, None
        if pending is None or boundary.shape[0] != len(pending[0]):
            return True
        return self.memo.record(pending[0], boundary, pending[1], budget)

    def clear(self) -> None:
        """Forget the memo (the boundary or the prefix weights changed); the slot index stays."""
        self.memo.clear()
        self._pending = None

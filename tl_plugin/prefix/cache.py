"""Frozen-prefix activation cache: compute the frozen bottom of a model once, train the rest on its outputs.

When the embeddings and the bottom ``k`` blocks of a model stay frozen and the training data is fixed, every epoch
recomputes the same prefix outputs. `ActivationCache` computes them once per example and stores them
(`tl_plugin.prefix.store`: memory-mapped ``.npy`` files under a cache directory, or RAM); in a cached forward the
prefix modules' hooks (`runner`) return the stored hidden state instead of computing, so the model's own forward
still builds the attention mask, runs blocks ``>= k``, the pooler, the head and the loss (no per-model code).
The cache is a façade: the layout is derived once (`layout`), the datasets' ids and checksums are `rows`, the keys
`keys`, batches without ids are found by content in `memo`, and the checks before a boundary is used are
`verify`: on a few examples the plain model and the cached path must give the same outputs, and the prefix output
must not depend on a trainable parameter (else an `UnsupportedPrefixError`). Tested: BERT, RoBERTa, DistilBERT,
ELECTRA, DeBERTa-v2, GPT-2 and Llama classifiers; ALBERT (one layer group shared by all layers) is refused.

Dropout in the frozen prefix is an explicit choice (``prefix_dropout``): ``"off"`` (the default) computes the
prefix in eval mode, cached or not; ``"forbid"`` refuses a prefix with dropout p>0 or batch norm, so the cached
run equals a plain Trainer run; ``"on"`` cannot be cached. A stored file is keyed by the prefix weights, the
boundary, the dataset's model inputs, the collator, the dtype and the model config, and written under a file lock
(Ray Tune trials that share ``cache_dir`` and a boundary build it once); each example's ``input_ids`` checksum is
checked at every lookup.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments

from ..callbacks.base import TLCallback
from ..discovery import LayerGroups
from .keys import cache_key, prefix_fingerprint
from .last_block import LastBlock, resolve_last_block
from .layout import PrefixLayout, UnsupportedPrefixError
from .memo import ContentLookup, feature_digest
from .no_grad import PrefixDropout
from .options import check_cache_options
from .rows import (
    CACHE_ID_COLUMN,
    ROW_BITS,
    CacheIdCollator,
    RowIndex,
    collate_inputs,
    describe_collator,
    feature_batches,
    model_input_keys,
    split_ids,
    with_cache_ids,
)
from .runner import Capture, PrefixRunner
from .store import (
    CACHE_FORMAT_VERSION,
    DEFAULT_MAX_BYTES,
    ActivationCacheError,
    ActivationStore,
    RowWriter,
    Slot,
    default_cache_dir,
    encode,
    human_bytes,
)
from .verify import check_split, stored_difference

# The logger keeps the name it had before the move to tl_plugin.prefix, for anyone filtering on it.
logger = logging.getLogger("tl_plugin.cache")

__all__ = ["ActivationCache", "ActivationCacheCallback"]


class ActivationCache:
    """Cache the outputs of the frozen prefix of `model` for fixed datasets, and train on them.

    Creating it adds its hooks to `model` (see the module docstring); :meth:`prepare` registers a dataset, builds (or
    loads) its activations and returns it with a ``tl_cache_id`` column; :attr:`data_collator` wraps your
    collator so the ids reach the model. Pass the three to a normal `transformers.Trainer`, with
    :meth:`callback` (it rebuilds the cache when a freeze schedule moves the boundary), or use
    `prepare_cached_training`. A batch without ids, or whose boundary has moved since the cache was built,
    runs the whole model (the frozen prefix under `torch.no_grad()`, as `tl_plugin.prefix.FrozenPrefixNoGrad`
    does): results stay correct, only slower.

    The cached prefix is the embeddings plus the longest run of frozen blocks above them; nothing is cached
    while the embeddings or block 0 are trainable.

    Args:
        model (`torch.nn.Module`): the model, with its frozen layers already frozen.
        data_collator (`Callable`, *optional*): the collator the Trainer will use (default:
            `transformers.default_data_collator`, which needs examples padded to one length); pass
            ``DataCollatorWithPadding(tokenizer)`` for tokenized-but-unpadded data.
        groups (`LayerGroups`, *optional*): the model's layer groups; discovered when not given.
        cache_dir (`str` or `os.PathLike`, *optional*): where files go (default: `default_cache_dir`).
            Trials of a search that share it share their caches.
        storage (`str`, *optional*, defaults to ``"disk"``): ``"disk"`` (memory-mapped ``.npy`` files, shared
            across processes) or ``"memory"`` (RAM of this process only).
        max_bytes (`int`, *optional*, defaults to `DEFAULT_MAX_BYTES`): most bytes of activations held by this
            cache, all datasets together.
        on_too_large (`str`, *optional*, defaults to ``"error"``): when a dataset's activations would exceed
            `max_bytes` or the free disk space: ``"error"`` raises `CacheTooLargeError`, ``"uncached"`` logs a
            warning and trains that dataset without the cache.
        prefix_dropout (`str`, *optional*, defaults to ``"off"``): ``"off"`` computes the prefix in eval mode
            (dropout off in frozen layers, cached or not); ``"forbid"`` also requires the prefix to have no
            dropout p>0 and no batch norm, so that a cached run equals a plain one. ``"on"`` is refused.
        dtype (`str`, *optional*, defaults to ``"float32"``): storage dtype, ``"float32"``, ``"float16"`` or
            ``"bfloat16"`` (half the size; the results then differ slightly from an uncached run).
        batch_size (`int`, *optional*, defaults to 64): batch size of the pass that computes the activations.
        lock_timeout (`float`, *optional*, defaults to 3600): seconds to wait for another process building the
            same file.
        layout (`PrefixLayout`, *optional*): the model's prefix layout, when already derived.
        last_block (`str`, *optional*, defaults to ``"auto"``): how the last block runs while it trains:
            ``"auto"`` computes it at the first position only (`tl_plugin.prefix.FirstTokenLastBlock`) for
            the first-token classifiers that support it (BERT, RoBERTa, ELECTRA, DistilBERT sequence
            classifiers) and in full otherwise; ``"first_token"`` requires it (an error when not supported);
            ``"full"`` never prunes. The logits, losses and gradients are the same either way.

    Raises:
        `ValueError`: for an invalid argument (the message names it and its valid values).
        `UnsupportedPrefixError`: when the model cannot be split at its frozen boundary.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin import freeze_bottom_blocks
    >>> from tl_plugin.prefix import ActivationCache
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = BertForSequenceClassification(
    ...     BertConfig(
    ...         vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=8
    ...     )
    ... )
    >>> _ = freeze_bottom_blocks(model, 2)
    >>> rows = [{"input_ids": [2, 5 + i, 7, 3], "attention_mask": [1] * 4, "label": i % 2} for i in range(6)]
    >>> cache = ActivationCache(model, storage="memory")
    >>> train = cache.prepare(rows, name="train")
    >>> cache.frozen_blocks, train[0]["tl_cache_id"], cache.stats["builds"]
    (2, 0, 1)
    >>> batch = cache.data_collator([train[i] for i in range(4)])
    >>> cached = model.eval()(**batch).logits
    >>> _ = batch.pop("tl_cache_id")
    >>> model(**batch).logits.sub(cached).abs().max() < 1e-5  # same as running the whole model
    tensor(True)
    >>> cache.detach()

    ```
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        data_collator: Callable[[list[dict[str, Any]]], Any] | None = None,
        groups: LayerGroups | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        storage: Literal["disk", "memory"] = "disk",
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_too_large: Literal["error", "uncached"] = "error",
        prefix_dropout: PrefixDropout = "off",
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        batch_size: int = 64,
        lock_timeout: float = 3600.0,
        last_block: LastBlock = "auto",
        layout: PrefixLayout | None = None,
        by_content: bool = False,
    ) -> None:
        check_cache_options(
            storage=storage,
            max_bytes=max_bytes,
            on_too_large=on_too_large,
            prefix_dropout=prefix_dropout,
            dtype=dtype,
            batch_size=batch_size,
            lock_timeout=lock_timeout,
            last_block=last_block,
            by_content=by_content,
        )
        if data_collator is None:
            from transformers import default_data_collator

            data_collator = default_data_collator
        tokenizer = getattr(data_collator, "tokenizer", None)
        if getattr(tokenizer, "padding_side", "right") == "left":
            raise ValueError(
                "The data collator pads on the left (`tokenizer.padding_side='left'`); the activation cache "
                "stores positions from the left and needs right padding. Set `tokenizer.padding_side = "
                "'right'`."
            )
        self.model = model
        self.layout = layout if layout is not None else PrefixLayout.of(model, groups)
        self.groups = self.layout.groups
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.storage = storage
        self.max_bytes = max_bytes
        self.on_too_large = on_too_large
        self.prefix_dropout = prefix_dropout
        self.dtype = dtype
        self.batch_size = batch_size
        self.lock_timeout = float(lock_timeout)
        self._collator = data_collator
        self.data_collator = CacheIdCollator(data_collator)
        self.stats: dict[str, float] = {
            "builds": 0,
            "loads": 0,
            "build_seconds": 0.0,
            "cached_batches": 0,
            "uncached_batches": 0,
            "boundary_changes": 0,
            "memo_rows": 0,
        }
        self.store = ActivationStore(
            storage=storage,
            cache_dir=self.cache_dir,
            max_bytes=max_bytes,
            on_too_large=on_too_large,
            dtype=dtype,
            lock_timeout=self.lock_timeout,
            stats=self.stats,
        )
        # Added before the prefix runner's hooks (inside them on the last block), removed after them.
        self.last_block = resolve_last_block(model, last_block, layout=self.layout)
        try:
            self._runner = PrefixRunner(model, self.layout, "off", extra_kwarg=CACHE_ID_COLUMN)
        except BaseException:
            if self.last_block is not None:
                self.last_block.remove()
            raise
        self._runner.provider = self._lookup
        self.by_content = by_content
        self._content = (
            ContentLookup(getattr(model, "main_input_name", "input_ids"), dtype) if by_content else None
        )
        if by_content:
            self._runner.on_boundary = self._record
        self._units = 0  # prefix units the stored activations cover (0: no cache)
        # Prefix weights the stored activations were computed with; re-checked once at the first cached forward
        # after each build, which catches weights changed behind the cache's back (a DDP broadcast of rank 0's
        # weights, a checkpoint loaded into the model) when `cache.callback()` is not in the Trainer.
        self._fingerprint: str | None = None
        self._fingerprint_checked = False
        self._stale = False
        self._checked_units: set[int] = set()
        self._stop_early: dict[int, bool] = {}
        self._warned: set[str] = set()
        self._input_keys = model_input_keys(model)
        self._main_input = getattr(model, "main_input_name", "input_ids")

    # ------------------------------------------------------------------ public API
    @property
    def frozen_blocks(self) -> int | None:
        """Blocks covered by the stored activations (`None`: no cache in use, everything runs)."""
        return self._units - 1 if self._units else None

    @property
    def nbytes(self) -> int:
        """Bytes of activations held right now (all datasets)."""
        return self.store.nbytes

    @property
    def _slots(self) -> list[Slot]:
        return self.store.slots

    def prepare(self, dataset: Any, name: str | None = None) -> Any:
        """Register `dataset`, build or load its activations, and return it with a ``tl_cache_id`` column.

        Args:
            dataset (`datasets.Dataset` or map-style dataset of dicts): tokenized examples, in a fixed order.
            name (`str`, *optional*): a label for messages (default ``"dataset<i>"``).

        Returns:
            The same examples with a ``tl_cache_id`` entry: a `datasets.Dataset` for a `datasets.Dataset`,
            else a `torch.utils.data.Dataset`.

        Raises:
            `CacheTooLargeError`, `UnsupportedPrefixError`: the cache then detaches itself from the model.
        """
        if len(dataset) == 0:
            raise ValueError(f"`dataset` {name or ''} is empty: there is nothing to cache.")
        if len(dataset) >= 2**ROW_BITS:
            raise ValueError(f"`dataset` has {len(dataset)} examples; the cache supports fewer than 2**32.")
        slot = self.store.add(name, dataset, RowIndex.scan(dataset, self._input_keys, self._main_input))
        if self._content is not None:
            self._content.index_rows(
                slot.index,
                [
                    feature_digest(feature, self._main_input, self._input_keys)
                    for features in feature_batches(dataset, 1024)
                    for feature in features
                ],
            )
        units = self._target_units()
        try:
            if units != self._units:
                self._switch(units)
            elif units:
                self._fill(slot)
            else:
                self._warn_nothing_to_cache()
        except BaseException:
            self.detach()  # leave the model as it was: the caller gets the error and an untouched model
            raise
        return with_cache_ids(dataset, slot.index)

    def refresh(self, check_weights: bool = False) -> bool:
        """Rebuild the activations if the boundary moved (or, `check_weights`, if the prefix weights changed).

        Returns:
            `bool`: whether anything was rebuilt (or dropped).
        """
        units = self._target_units()
        if units != self._units:
            self.stats["boundary_changes"] += 1
            self._switch(units)
            return True
        if check_weights and units:
            fingerprint = prefix_fingerprint(self.layout, units)
            stale = [
                s for s in self._slots if s.array is not None and s.key != self._key(s, units, fingerprint)
            ]
            if stale:
                self._switch(units)
                return True
            if fingerprint == self._fingerprint:
                self._fingerprint_checked = True  # just checked: the first cached forward need not hash again
        return False

    def callback(self) -> ActivationCacheCallback:
        """A Trainer callback that calls :meth:`refresh` (add it after the callbacks that freeze layers)."""
        return ActivationCacheCallback(self)

    def detach(self) -> None:
        """Remove the cache's hooks from the model and release the stored activations."""
        self._runner.remove()
        if self.last_block is not None:
            self.last_block.remove()
        for slot in self._slots:
            slot.array = None

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ boundary
    def _target_units(self) -> int:
        units = self.layout.frozen_units()
        return units if units >= 2 else 0  # cache only when at least one block is frozen

    def _switch(self, units: int) -> None:
        self.store.clear()
        if self._content is not None:
            self._content.clear()
            self.stats["memo_rows"] = 0
        self._units = units
        self._fingerprint = None
        if not units or not self._slots:
            self._warn_nothing_to_cache()
            return
        if units not in self._checked_units:
            self._check_split(units)
            self._checked_units.add(units)
        for slot in self._slots:
            self._fill(slot)
        logger.info("Activation cache: frozen prefix = embeddings + %d blocks", units - 1)

    def _warn_nothing_to_cache(self) -> None:
        if not self._units and self._slots and "nothing" not in self._warned:
            self._warned.add("nothing")
            logger.warning(
                "Activation cache: the embeddings or block 0 of %s are trainable, so there is no frozen "
                "prefix to cache; batches run the whole model until the bottom is frozen.",
                type(self.model).__name__,
            )

    def _collate_inputs(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        # Model inputs only: other columns (labels, raw text the Trainer would drop) never reach the prefix.
        return collate_inputs(self._collator, features, self._input_keys, self.model)

    def _key(self, slot: Slot, units: int, fingerprint: str | None = None) -> str:
        return cache_key(
            self.model,
            fingerprint=fingerprint if fingerprint is not None else prefix_fingerprint(self.layout, units),
            units=units,
            content_hash=slot.rows.content_hash,
            collator=describe_collator(self._collator),
            first_position_only=self._first_position_only(units),
            dtype=self.dtype,
            format_version=CACHE_FORMAT_VERSION,
        )

    def _first_position_only(self, units: int) -> bool:
        """Whether to store only position 0: every block is frozen (a linear probe) and the classifier reads
        the first position only (`self.last_block` is installed), so no other position is ever read."""
        return self.last_block is not None and units == self.layout.num_units

    # ------------------------------------------------------------------ checks
    def _verify_batch(self, slot: Slot) -> dict[str, Any]:
        return self._collate_inputs(next(feature_batches(slot.dataset, min(4, len(slot.dataset)))))

    def _check_split(self, units: int) -> None:
        """Check on a few examples that the model can be split after prefix unit ``units - 1``."""
        plan = check_split(
            self._runner,
            self._verify_batch(self._slots[0]),
            units,
            prefix_dropout=self.prefix_dropout,
            first_position_only=self._first_position_only(units),
        )
        self._stop_early[units] = plan.stop_early

    def _check_stored(self, slot: Slot, units: int) -> float | None:
        """Check the stored first rows with a fresh computation: the difference or `None`."""
        batch = self._verify_batch(slot)
        fresh = self._runner.capture(batch, units, stop=self._stop_early.get(units, False), grad=False)
        stored = self.store.rows_tensor(slot, np.arange(fresh.boundary.shape[0]), fresh.boundary)
        return stored_difference(
            stored,
            fresh.boundary,
            batch.get("attention_mask"),
            seq_axis=slot.seq_axis,
            first_position_only=self._first_position_only(units),
            dtype=self.dtype,
        )

    # ------------------------------------------------------------------ build / load
    def _fill(self, slot: Slot) -> None:
        units = self._units
        fingerprint = prefix_fingerprint(self.layout, units)
        if fingerprint != self._fingerprint:
            if any(s.array is not None for s in self._slots if s is not slot):
                # the prefix weights changed since the other datasets were stored: all of them are stale
                self._switch(units)
                return
            self._fingerprint, self._fingerprint_checked, self._stale = fingerprint, False, False
        key = self._key(slot, units, fingerprint)

        def build(target: Slot, directory: Path | None) -> bool:
            return self._build(target, units, directory)

        built = self.store.fill(slot, key, build)
        if slot.array is None:
            return
        difference = self._check_stored(slot, units)
        if difference is not None and not built:
            logger.warning(
                "The stored activations %s differ from a fresh computation by %.3g; rebuilding them.",
                slot.path,
                difference,
            )
            built = self.store.fill(slot, key, build, discard=True)
            difference = self._check_stored(slot, units) if slot.array is not None else None
        if difference is not None:
            slot.release()
            raise ActivationCacheError(
                f"The prefix outputs of {slot.name!r} depend on how the examples are batched: a batch of the "
                f"first examples gives outputs that differ by {difference:.3g} from the cache build's "
                "batches. Typically the collator pads without an `attention_mask` (pass one, e.g. with "
                "DataCollatorWithPadding); otherwise train this model without the activation cache."
            )

    def _build(self, slot: Slot, units: int, directory: Path | None) -> bool:
        """Compute the activations of `slot` (into `directory`, or RAM). `False` when over budget."""
        started = time.perf_counter()
        n, width = len(slot.rows), 1 if self._first_position_only(units) else slot.rows.width
        writer: RowWriter | None = None
        seq_axis = True
        row_shape: tuple[int, ...] = ()
        stop = self._stop_early.get(units, False)
        for features in feature_batches(slot.dataset, self.batch_size):
            batch = self._collate_inputs(features)
            capture: Capture = self._runner.capture(batch, units, stop=stop, grad=False)
            out = capture.boundary.detach()
            if out.shape[0] != len(features):
                raise UnsupportedPrefixError(
                    f"The prefix output has {out.shape[0]} rows for a batch of {len(features)}: the "
                    "activation cache needs one row per example."
                )
            if writer is None:
                main = batch.get(self._main_input)
                seq_len = main.shape[1] if isinstance(main, torch.Tensor) and main.dim() > 1 else None
                seq_axis = out.dim() >= 3 and seq_len is not None and out.shape[1] == seq_len
                row_shape = ((width,) + tuple(out.shape[2:])) if seq_axis else tuple(out.shape[1:])
                writer = self.store.writer(slot, (n,) + row_shape, directory)
                if writer is None:
                    return False
            if seq_axis:  # every row padded (with zeros) or cut to the stored width
                block = out.new_zeros((len(features),) + row_shape)
                length = min(out.shape[1], width)
                block[:, :length] = out[:, :length]
                out = block
            writer.write(encode(out, self.dtype))
        assert writer is not None
        seconds = time.perf_counter() - started
        self.stats["builds"] += 1
        self.stats["build_seconds"] += seconds
        meta = {
            "model": type(self.model).__name__,
            "frozen_blocks": units - 1,
            "build_seconds": round(seconds, 3),
        }
        self.store.finish(slot, writer, directory, seq_axis, meta)
        logger.info(
            "Activation cache: built %d examples of %r (%s) in %.1f s",
            n,
            slot.name,
            human_bytes(writer.nbytes),
            seconds,
        )
        return True

    # ------------------------------------------------------------------ lookup (from the model's forward)
    def _lookup(self, ids: Any, bound: Any, frozen_units: int) -> tuple[torch.Tensor, int] | None:
        if self._content is None:
            if ids is None:
                return None
        else:
            self._content.forget_pending()
        if not self._units or frozen_units < self._units:
            if self._units and "moved" not in self._warned:
                self._warned.add("moved")
                logger.warning(
                    "The frozen boundary moved below the cached one (embeddings + %d blocks); running the "
                    "whole model until the cache is refreshed (add `cache.callback()` to the Trainer to "
                    "rebuild it).",
                    self._units - 1,
                )
            self.stats["uncached_batches"] += 1
            return None
        arguments = bound.arguments
        main = arguments.get(self._main_input)
        if not isinstance(main, torch.Tensor) or main.dim() != 2:
            self.stats["uncached_batches"] += 1
            return None
        if ids is None:
            return self._lookup_content(arguments, main)
        slot_index, rows = split_ids(ids)
        if len(set(slot_index.tolist())) != 1 or not 0 <= int(slot_index[0]) < len(self._slots):
            self.stats["uncached_batches"] += 1
            return None
        slot = self._slots[int(slot_index[0])]
        if slot.array is None or rows.max() >= len(slot.rows) or self._prefix_changed():
            self.stats["uncached_batches"] += 1
            return None
        self._check_rows(slot, rows, main, arguments.get("attention_mask"))
        like = torch.empty(
            (len(rows), main.shape[1]) if slot.seq_axis else (len(rows),),
            dtype=self._hidden_dtype(),
            device=main.device,
        )
        self.stats["cached_batches"] += 1
        return self.store.rows_tensor(slot, rows, like), self._units

    def _lookup_content(
        self, arguments: dict[str, Any], main: torch.Tensor
    ) -> tuple[torch.Tensor, int] | None:
        """A batch without ids: its rows by content (`memo`), else `None` and its prefix output kept."""
        assert self._content is not None
        if self._prefix_changed():
            self.stats["uncached_batches"] += 1
            return None
        inputs = {k: v for k, v in arguments.items() if k in self._input_keys}
        like = torch.empty((main.shape[0], main.shape[1]), dtype=self._hidden_dtype(), device=main.device)
        found = self._content.find(inputs, self.store, like, self._first_position_only(self._units))
        if found is None:
            self.stats["uncached_batches"] += 1
            return None
        self.stats["cached_batches"] += 1
        return found, self._units

    def _record(self, boundary: torch.Tensor) -> None:
        """Keep the prefix output of a batch not found by content (the next pass over it reads it)."""
        assert self._content is not None
        if not self._units or self.layout.frozen_units() != self._units or self._stale:
            return
        kept = self._content.record(boundary, self.max_bytes - self.store.nbytes)
        self.stats["memo_rows"] = len(self._content.memo)
        if not kept and "memo" not in self._warned:
            self._warned.add("memo")
            logger.warning(
                "Activation cache: max_bytes=%d reached; examples not prepared beforehand now run the whole model.",
                self.max_bytes,
            )

    def _prefix_changed(self) -> bool:
        """Whether the prefix weights differ from those the activations were computed with (checked once)."""
        if not self._fingerprint_checked:
            self._fingerprint_checked = True
            if (
                self._fingerprint is not None
                and prefix_fingerprint(self.layout, self._units) != self._fingerprint
            ):
                self._stale = True
                logger.warning(
                    "The frozen prefix's weights changed after the activation cache was built (for example DDP "
                    "broadcast rank 0's weights, or a checkpoint was loaded): running the whole model until "
                    "`cache.refresh(check_weights=True)` rebuilds it. Add `cache.callback()` to the Trainer "
                    "(`prepare_cached_training` does) to refresh it when training starts."
                )
        return self._stale

    def _hidden_dtype(self) -> torch.dtype:
        param = next(self.model.parameters(), None)
        return param.dtype if param is not None and param.is_floating_point() else torch.float32

    def _check_rows(self, slot: Slot, rows: np.ndarray, input_ids: torch.Tensor, mask: Any) -> None:
        bad = np.nonzero(slot.rows.batch_checksums(rows, input_ids, mask) != slot.rows.checksums[rows])[0]
        if len(bad):
            raise ActivationCacheError(
                f"Examples {rows[bad][:5].tolist()} of {slot.name!r} are not the ones the activation cache "
                f"was built from (their {self._main_input} changed after `prepare()`, or the collator pads "
                "differently). Call `cache.prepare()` on the changed dataset."
            )


# -------------------------------------------------------------------------------------------- Trainer glue
class ActivationCacheCallback(TLCallback):
    """The activation cache in a `transformers.Trainer`: one callback, added to an existing script.

    ``ActivationCacheCallback()`` (no cache given) builds an `ActivationCache` at the start of training, from the
    Trainer's model, training data and collator, with ``by_content=True``: the Trainer's batches need no cache ids,
    their rows are found by content, and the batches of any other dataset the Trainer evaluates or predicts on
    (``trainer.evaluate(eval_dataset=other)``) keep their prefix outputs, so that the next evaluation of the same
    examples reads them. The cache stays on the model after training (the script's last ``trainer.evaluate``
    goes through it); :attr:`cache` ``.detach()`` removes it.

    ``ActivationCacheCallback(cache)`` keeps a cache you built (`prepare_cached_training` does) in step.

    Either way, at the start of training it checks the prefix weights (a resumed checkpoint may have changed
    them), and at the start of every epoch and step it rebuilds the cache if a freeze schedule moved the boundary.
    Without it, a moved boundary makes batches run uncached. Freeze the model before training starts (e.g. with
    `tl_plugin.callbacks.TransferCallback`, which freezes when the Trainer is built); nothing is cached while the
    embeddings or block 0 train.

    Args:
        cache (`ActivationCache`, *optional*): a cache to keep in step; when not given, one is built at train start.
        **cache_options: options of the cache built at train start (`ActivationCache`'s keywords, e.g.
            ``cache_dir``, ``storage``, ``max_bytes``, ``dtype``); ``data_collator`` defaults to the Trainer's.

    Raises:
        `ValueError`: an unknown or invalid option (at construction), both `cache` and options, or (at train start)
            training data that is not a map-style dataset.
    """

    def __init__(self, cache: ActivationCache | None = None, **cache_options: Any) -> None:
        super().__init__()
        if cache is not None and cache_options:
            raise ValueError(
                f"Pass either `cache` or options for a new one ({sorted(cache_options)}), not both: the options of "
                "an existing cache were set when it was built."
            )
        if cache is not None and not isinstance(cache, ActivationCache):
            raise ValueError(f"`cache` must be an ActivationCache or None, got {type(cache).__name__}.")
        check_cache_options(**cache_options)
        self.cache = cache
        self.cache_options = {"by_content": True, **cache_options}

    def _refresh(self, state: TrainerState, check_weights: bool = False) -> None:
        if self.cache is None:
            return
        before = self.cache.frozen_blocks
        started = time.perf_counter()
        if self.cache.refresh(check_weights=check_weights):
            after = self.cache.frozen_blocks
            self.log_event(
                state,
                f"activation cache: frozen blocks {before} -> {after} ({time.perf_counter() - started:.1f} "
                "s)",
                {"activation_cache/frozen_blocks": float(-1 if after is None else after)},
            )

    def _new_cache(self, model: nn.Module, loader: Any) -> ActivationCache:
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(
                "ActivationCacheCallback() caches the training data, which must be a map-style dataset (tokenized "
                f"examples in a fixed order); the Trainer's is {type(dataset).__name__}. Remove the callback, or "
                "pass a `datasets.Dataset`."
            )
        options = dict(self.cache_options)
        options.setdefault("data_collator", getattr(loader, "collate_fn", None))
        cache = ActivationCache(model, **options)
        cache.prepare(dataset, name="train")
        return cache

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.cache is None:
            self.cache = self._new_cache(kwargs["model"], kwargs.get("train_dataloader"))
            return  # just built with the current weights and boundary
        self._refresh(state, check_weights=True)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._refresh(state)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._refresh(state)

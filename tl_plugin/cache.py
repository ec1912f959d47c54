"""Frozen-prefix activation cache: compute the frozen bottom of a model once, train the rest on its outputs.

When the embeddings and the bottom ``k`` blocks of a model stay frozen and the training data is fixed
(tokenized once, no random augmentation), every epoch recomputes the same prefix outputs. `ActivationCache`
computes them once per example, stores them (a memory-mapped ``.npy`` file under a cache directory, or RAM),
and during training the model's forward takes them from the store instead of running the prefix: the
embeddings and blocks ``< k`` are skipped, block ``k`` and everything above run as usual (with their own
dropout, gradients and optimizer).

How the model is split (no per-model code): each prefix module (the embeddings modules and every block) gets
an instance-level ``forward``; during a cached forward they return the stored hidden state instead of
computing, so the model's own forward still builds the attention mask, runs blocks ``>= k``, the pooler, the
head and the loss. Before a boundary is used, one small batch checks that this split is exact for the model:
the plain model and the cached path must give the same outputs, and the prefix output must not depend on a
trainable parameter. Models for which that fails get an `UnsupportedPrefixError` naming the reason. Tested:
BERT, RoBERTa, DistilBERT, ELECTRA, DeBERTa-v2, GPT-2 and Llama classifiers; ALBERT (one layer group shared by
all layers) is refused.

Dropout in the frozen prefix is an explicit choice (``prefix_dropout``): ``"off"`` (the default) computes the
prefix in eval mode, cached or not; ``"forbid"`` refuses a prefix with dropout p>0 or batch norm, so the
cached run equals a plain Trainer run. Random dropout in frozen layers cannot be cached (``"on"`` is refused).

The cache is keyed by the prefix weights, the boundary, the content of the model inputs of the dataset, the
collator, the dtype and the model config; a changed key is a new file. Each example also carries a checksum of
its ``input_ids``, checked at every lookup. Files are written to a temporary directory and renamed into place,
under a file lock: trials of a Ray Tune search that share ``cache_dir`` and a boundary build the file once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .callbacks.base import TLCallback
from .discovery import LayerGroups, discover_layer_groups
from .last_block import LastBlock, resolve_last_block
from .perf import (
    Capture,
    PrefixController,
    PrefixDropout,
    UnsupportedPrefixError,
    _active_randomness,
    _eval_mode,
    check_prefix_dropout,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_ID_COLUMN",
    "DEFAULT_MAX_BYTES",
    "ActivationCache",
    "ActivationCacheCallback",
    "ActivationCacheError",
    "CacheTooLargeError",
    "CachedTraining",
    "UnsupportedPrefixError",
    "clear_activation_cache",
    "default_cache_dir",
    "prepare_cached_training",
]

#: The dataset column (and model keyword) that carries each example's cache id.
CACHE_ID_COLUMN = "tl_cache_id"
#: Default bound on the activations one `ActivationCache` holds (all datasets together): 4 GiB.
DEFAULT_MAX_BYTES = 4 * 1024**3
#: Bump when the on-disk layout changes: older files are then never read.
CACHE_FORMAT_VERSION = 1
STORAGE_CHOICES = ("disk", "memory")
ON_TOO_LARGE_CHOICES = ("error", "uncached")
DTYPE_CHOICES = ("float32", "float16")
_ROW_BITS = 32
_LABEL_NAMES = ("label", "labels", "label_ids")
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


class ActivationCacheError(RuntimeError):
    """Raised when cached activations cannot be used as asked (stale rows, a lock held too long, ...)."""


class CacheTooLargeError(ActivationCacheError):
    """Raised when the activations would exceed ``max_bytes`` or the disk, with ``on_too_large='error'``."""


def default_cache_dir() -> Path:
    """``$TL_PLUGIN_ACTIVATION_CACHE``, else ``~/.cache/tl_plugin/activations``."""
    env = os.environ.get("TL_PLUGIN_ACTIVATION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tl_plugin" / "activations"


def clear_activation_cache(cache_dir: str | os.PathLike[str] | None = None) -> int:
    """Delete the activation files under `cache_dir` (default `default_cache_dir`); returns bytes freed."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    freed = 0
    if not root.is_dir():
        return 0
    for entry in root.iterdir():
        if entry.is_dir():
            freed += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.suffix == ".lock":
            entry.unlink(missing_ok=True)
    return freed


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def _checksum_weights(length: int) -> np.ndarray:
    return np.arange(length, dtype=np.int64) * np.int64(2654435761) + np.int64(97)


# ------------------------------------------------------------------------------------------------ datasets
@dataclass
class _Rows:
    content_hash: str
    checksums: np.ndarray
    lengths: np.ndarray

    @property
    def width(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0


@dataclass
class _Slot:
    index: int
    name: str
    dataset: Any
    rows: _Rows
    array: np.ndarray | None = None
    key: str | None = None
    path: Path | None = None
    nbytes: int = 0
    seq_axis: bool = True


def _is_hf_dataset(dataset: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(dataset, datasets.Dataset)


def _feature_batches(dataset: Any, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """The examples of `dataset`, in order, as lists of feature dicts."""
    if _is_hf_dataset(dataset):
        for batch in dataset.iter(batch_size=batch_size):
            keys = list(batch)
            n = len(batch[keys[0]]) if keys else 0
            yield [{k: batch[k][i] for k in keys} for i in range(n)]
        return
    n = len(dataset)
    for start in range(0, n, batch_size):
        yield [dict(dataset[i]) for i in range(start, min(start + batch_size, n))]


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


def _describe_collator(collator: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"class": f"{type(collator).__module__}.{type(collator).__qualname__}"}
    for attr in ("padding", "max_length", "pad_to_multiple_of", "return_tensors"):
        if hasattr(collator, attr):
            info[attr] = repr(getattr(collator, attr))
    tokenizer = getattr(collator, "tokenizer", None)
    if tokenizer is not None:
        info["pad_token_id"] = getattr(tokenizer, "pad_token_id", None)
        info["padding_side"] = getattr(tokenizer, "padding_side", None)
    return info


# ------------------------------------------------------------------------------------------------ the cache
class ActivationCache:
    """Cache the outputs of the frozen prefix of `model` for fixed datasets, and train on them.

    Creating it patches `model` (see the module docstring); :meth:`prepare` registers a dataset, builds (or
    loads) its activations and returns it with a ``tl_cache_id`` column; :attr:`data_collator` wraps your
    collator so the ids reach the model. Pass the three to a normal `transformers.Trainer`, with
    :meth:`callback` (it rebuilds the cache when a freeze schedule moves the boundary), or use
    `prepare_cached_training`. A batch without ids, or whose boundary has moved since the cache was built,
    runs the whole model (the frozen prefix under `torch.no_grad()`, as `tl_plugin.perf.FrozenPrefixNoGrad`
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
        dtype (`str`, *optional*, defaults to ``"float32"``): storage dtype, ``"float32"`` or ``"float16"``
            (half the size; the results then differ slightly from an uncached run).
        batch_size (`int`, *optional*, defaults to 64): batch size of the pass that computes the activations.
        lock_timeout (`float`, *optional*, defaults to 3600): seconds to wait for another process building the
            same file.
        last_block (`str`, *optional*, defaults to ``"auto"``): how the last block runs while it trains:
            ``"auto"`` computes it at the first position only (`tl_plugin.last_block.FirstTokenLastBlock`) for
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
    >>> from tl_plugin.cache import ActivationCache
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
        dtype: Literal["float32", "float16"] = "float32",
        batch_size: int = 64,
        lock_timeout: float = 3600.0,
        last_block: LastBlock = "auto",
    ) -> None:
        check_prefix_dropout(prefix_dropout, ("off", "forbid"))
        for name, value, choices in (
            ("storage", storage, STORAGE_CHOICES),
            ("on_too_large", on_too_large, ON_TOO_LARGE_CHOICES),
            ("dtype", dtype, DTYPE_CHOICES),
        ):
            if value not in choices:
                raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")
        for name, number in (("max_bytes", max_bytes), ("batch_size", batch_size)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {number!r}.")
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or lock_timeout <= 0:
            raise ValueError(f"`lock_timeout` must be a positive number of seconds, got {lock_timeout!r}.")
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
        self.groups = groups if groups is not None else discover_layer_groups(model)
        self.storage = storage
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.max_bytes = max_bytes
        self.on_too_large = on_too_large
        self.prefix_dropout = prefix_dropout
        self.dtype = dtype
        self.batch_size = batch_size
        self.lock_timeout = float(lock_timeout)
        self._collator = data_collator
        self.data_collator = CacheIdCollator(data_collator)
        # Installed before the prefix controller, removed after it (both patch instance-level forwards).
        self.last_block = resolve_last_block(model, last_block, self.groups)
        try:
            self._controller = PrefixController(model, self.groups, "off", extra_kwarg=CACHE_ID_COLUMN)
        except BaseException:
            if self.last_block is not None:
                self.last_block.remove()
            raise
        self._controller.provider = self._lookup
        self._slots: list[_Slot] = []
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
        self._input_keys = self._model_input_keys()
        self._main_input = getattr(model, "main_input_name", "input_ids")
        self.stats: dict[str, float] = {
            "builds": 0,
            "loads": 0,
            "build_seconds": 0.0,
            "cached_batches": 0,
            "uncached_batches": 0,
            "boundary_changes": 0,
        }

    # ------------------------------------------------------------------ public API
    @property
    def frozen_blocks(self) -> int | None:
        """Blocks covered by the stored activations (`None`: no cache in use, everything runs)."""
        return self._units - 1 if self._units else None

    @property
    def nbytes(self) -> int:
        """Bytes of activations held right now (all datasets)."""
        return sum(slot.nbytes for slot in self._slots if slot.array is not None)

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
        if len(dataset) >= 2**_ROW_BITS:
            raise ValueError(f"`dataset` has {len(dataset)} examples; the cache supports fewer than 2**32.")
        index = len(self._slots)
        slot = _Slot(index, name or f"dataset{index}", dataset, self._scan(dataset))
        self._slots.append(slot)
        ids = (np.int64(index) << _ROW_BITS) + np.arange(len(dataset), dtype=np.int64)
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
        if _is_hf_dataset(dataset):
            if CACHE_ID_COLUMN in dataset.column_names:
                dataset = dataset.remove_columns(CACHE_ID_COLUMN)
            return dataset.add_column(CACHE_ID_COLUMN, ids.tolist())
        return _WithCacheIds(dataset, ids)

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
            fingerprint = self._prefix_fingerprint(units)
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
        """Restore the model's forwards and release the stored activations."""
        self._controller.remove()
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
        units = self._controller.frozen_units()
        return units if units >= 2 else 0  # cache only when at least one block is frozen

    def _switch(self, units: int) -> None:
        for slot in self._slots:
            slot.array, slot.key, slot.path, slot.nbytes = None, None, None, 0
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

    def _model_input_keys(self) -> set[str]:
        import inspect

        from transformers.utils import find_labels

        params = inspect.signature(self.model.forward).parameters
        keys = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        labels = set(find_labels(type(self.model))) | set(_LABEL_NAMES)
        return keys - labels - {CACHE_ID_COLUMN}

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _collate_inputs(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        # Model inputs only: other columns (labels, raw text the Trainer would drop) never reach the prefix.
        clean = [{k: v for k, v in f.items() if k in self._input_keys} for f in features]
        batch = self._collator(clean)
        device = self._device()
        return {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for k, v in dict(batch).items()
            if k in self._input_keys
        }

    def _scan(self, dataset: Any) -> _Rows:
        """Content hash of the model inputs, and per-example checksums and lengths of the main input."""
        digest = hashlib.blake2b(digest_size=20)
        checksums: list[int] = []
        lengths: list[int] = []
        main = getattr(self.model, "main_input_name", "input_ids")
        for features in _feature_batches(dataset, 1024):
            for feature in features:
                for key in sorted(k for k in feature if k in self._input_keys):
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
                checksums.append(int(((ids + 1) * _checksum_weights(len(ids)) * mask).sum()))
                lengths.append(len(ids))
        return _Rows(
            digest.hexdigest(), np.asarray(checksums, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
        )

    def _prefix_fingerprint(self, units: int) -> str:
        digest = hashlib.blake2b(digest_size=20)
        for names, modules in zip(
            self._controller.unit_names[:units], self._controller.unit_modules[:units], strict=True
        ):
            for name, module in zip(names, modules, strict=True):
                digest.update(f"{name}:{type(module).__qualname__}|".encode())
                tensors = list(module.named_parameters()) + list(module.named_buffers())
                for tensor_name, tensor in sorted(tensors, key=lambda item: item[0]):
                    data = tensor.detach().cpu().contiguous()
                    digest.update(f"{tensor_name}|{data.dtype}|{tuple(data.shape)}|".encode())
                    digest.update(data.reshape(-1).view(torch.uint8).numpy().data)  # in place, no copy
        return digest.hexdigest()

    def _config_fingerprint(self) -> str:
        config = getattr(self.model, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            return "no-config"
        data = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_KEYS_IGNORED}
        data["attn_implementation"] = getattr(config, "_attn_implementation", None)
        return hashlib.blake2b(
            json.dumps(data, sort_keys=True, default=str).encode(), digest_size=16
        ).hexdigest()

    def _key(self, slot: _Slot, units: int, fingerprint: str | None = None) -> str:
        material = {
            "format": CACHE_FORMAT_VERSION,
            "model": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "config": self._config_fingerprint(),
            "prefix": fingerprint if fingerprint is not None else self._prefix_fingerprint(units),
            "units": units,
            "data": slot.rows.content_hash,
            "collator": _describe_collator(self._collator),
            "prefix_mode": "eval",
            "positions": "first" if self._first_position_only(units) else "all",
            "dtype": self.dtype,
            "torch": torch.__version__,
        }
        text = json.dumps(material, sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def _first_position_only(self, units: int) -> bool:
        """Whether to store only position 0: every block is frozen (a linear probe) and the classifier reads
        the first position only (`self.last_block` is installed), so no other position is ever read."""
        return self.last_block is not None and units == len(self._controller.unit_names)

    # ------------------------------------------------------------------ checks
    def _verify_batch(self, slot: _Slot) -> dict[str, Any]:
        features = next(_feature_batches(slot.dataset, min(4, len(slot.dataset))))
        return self._collate_inputs(features)

    def _check_split(self, units: int) -> None:
        """Check on a few examples that the model can be split after prefix unit ``units - 1``."""
        model_name = type(self.model).__name__
        where = f"{model_name} after its embeddings and {units - 1} blocks"
        batch = self._verify_batch(self._slots[0])
        try:
            probe = self._controller.capture(batch, units, stop=False, grad=True)
        except UnsupportedPrefixError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure means the split is not supported
            raise UnsupportedPrefixError(
                f"Cannot run the prefix of {where}: {type(err).__name__}: {err}"
            ) from err
        leaves = self._trainable_leaves(probe.boundary)
        if leaves:
            raise UnsupportedPrefixError(
                f"Cannot cache {where}: the prefix output depends on trainable parameters {leaves[:5]}. "
                "Freeze them, or train without the activation cache."
            )
        last = self._controller.unit_names[units - 1]
        for name in last:
            if probe.forms.get(name) is None:
                raise UnsupportedPrefixError(
                    f"Cannot cache {where}: {name} returns something other than a tensor or a (tensor, None, "
                    "...) tuple, so its output cannot be replaced."
                )
        if self.prefix_dropout == "forbid":
            modules = dict(self.model.named_modules())
            names = [n for unit in self._controller.unit_names[:units] for n in unit]
            names += [n for index, n in probe.interstitial if index < units]
            active = [found for n in names for found in _active_randomness(modules[n])]
            if active:
                raise ValueError(
                    "prefix_dropout='forbid' but the frozen prefix has modules that act differently in "
                    f"training: {active[:5]}. Set their dropout to 0, or use prefix_dropout='off' (the "
                    "prefix then runs in eval mode, cached or not)."
                )
        self._controller.set_forms(probe.forms)
        self._controller.set_interstitial(probe.interstitial)
        try:
            with torch.no_grad(), _eval_mode(self.model):
                stored = probe.boundary.detach()
                if self._first_position_only(units):  # what the cache will store: position 0, zeros after
                    stored = torch.cat([stored[:, :1], torch.zeros_like(stored[:, 1:])], dim=1)
                cached = self._controller.run_with_slot(batch, stored, units)
        except Exception as err:  # noqa: BLE001
            raise UnsupportedPrefixError(
                f"Cannot cache {where}: the model fails when its prefix is replaced by stored hidden states "
                f"({type(err).__name__}: {err})."
            ) from err
        worst = _max_difference(probe.outputs, cached)
        if worst is None or worst > 1e-4:
            raise UnsupportedPrefixError(
                f"Cannot cache {where}: replacing the prefix by its stored output changes the model's "
                f"outputs (max difference {worst}); the model uses the prefix in a way the cache cannot "
                "reproduce. Supported: BERT-family encoders (BERT, RoBERTa, DistilBERT, ELECTRA) and models "
                "that pass this check."
            )
        self._stop_early[units] = all(probe.calls.get(n, 0) == 1 for n in last)

    def _trainable_leaves(self, tensor: torch.Tensor) -> list[str]:
        from .perf import _trainable_leaves

        return _trainable_leaves(tensor, self._controller.param_names)

    # ------------------------------------------------------------------ build / load
    def _fill(self, slot: _Slot) -> None:
        units = self._units
        fingerprint = self._prefix_fingerprint(units)
        if fingerprint != self._fingerprint:
            if any(s.array is not None for s in self._slots if s is not slot):
                # the prefix weights changed since the other datasets were stored: all of them are stale
                self._switch(units)
                return
            self._fingerprint, self._fingerprint_checked, self._stale = fingerprint, False, False
        key = self._key(slot, units, fingerprint)
        slot.key = key
        if self.storage == "memory":
            built = self._build(slot, units, None)
        else:
            built = self._load_or_build(slot, units, key)
        if slot.array is None:
            return
        difference = self._check_stored(slot, units)
        if difference is not None and not built:
            logger.warning(
                "The stored activations %s differ from a fresh computation by %.3g; rebuilding them.",
                slot.path,
                difference,
            )
            built = self._load_or_build(slot, units, key, discard=True)
            difference = self._check_stored(slot, units) if slot.array is not None else None
        if difference is not None:
            self._release(slot)
            raise ActivationCacheError(
                f"The prefix outputs of {slot.name!r} depend on how the examples are batched: a batch of the "
                f"first examples gives outputs that differ by {difference:.3g} from the cache build's "
                "batches. Typically the collator pads without an `attention_mask` (pass one, e.g. with "
                "DataCollatorWithPadding); otherwise train this model without the activation cache."
            )

    def _release(self, slot: _Slot) -> None:
        slot.array, slot.path, slot.nbytes = None, None, 0

    def _load_or_build(self, slot: _Slot, units: int, key: str, discard: bool = False) -> bool:
        """Load the file of `key`, or build it (`True`: built here). `discard`: rebuild an existing file."""
        from filelock import FileLock, Timeout

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        final = self.cache_dir / key
        lock = FileLock(str(self.cache_dir / f"{key}.lock"), timeout=self.lock_timeout)
        try:
            with lock:
                if not discard and self._load(slot, final, key):
                    return False
                self._release(slot)
                if final.exists():
                    shutil.rmtree(final, ignore_errors=True)  # unreadable or stale: rebuild under the lock
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.cache_dir))
                try:
                    if not self._build(slot, units, tmp):
                        return True
                    slot.array = None  # close the memmap before the rename
                    try:
                        os.rename(tmp, final)
                    except OSError:
                        if not final.exists():
                            raise
                        # another process (without a working lock) renamed the same key first: use theirs
                    if not self._load(slot, final, key, count=False):
                        raise ActivationCacheError(
                            f"The activation cache just written to {final} cannot be read."
                        )
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                return True
        except Timeout as err:
            raise ActivationCacheError(
                f"Waited {self.lock_timeout:.0f} s for another process building the activation cache "
                f"{final}; raise `lock_timeout`, or delete {final}.lock if no process is building it."
            ) from err

    def _load(self, slot: _Slot, final: Path, key: str, count: bool = True) -> bool:
        meta_path, data_path, rows_path = final / "meta.json", final / "activations.npy", final / "rows.npy"
        if not (meta_path.is_file() and data_path.is_file() and rows_path.is_file()):
            return False
        try:
            meta = json.loads(meta_path.read_text())
            rows = np.load(rows_path)
            array = np.load(data_path, mmap_mode="r")
        except (OSError, ValueError) as err:
            logger.warning("Activation cache %s is unreadable (%s); rebuilding it.", final, err)
            return False
        n = len(slot.rows.lengths)
        if (
            meta.get("key") != key
            or array.shape[0] != n
            or rows.shape != (2, n)
            or not np.array_equal(rows[0], slot.rows.checksums)
            or not np.array_equal(rows[1], slot.rows.lengths)
        ):
            logger.warning("Activation cache %s does not match its dataset; rebuilding it.", final)
            return False
        nbytes = int(array.nbytes)
        if not self._within_budget(slot, nbytes, array.shape):
            return True  # too large: train this dataset without the cache
        slot.array, slot.path, slot.nbytes, slot.seq_axis = array, final, nbytes, bool(meta["seq_axis"])
        if count:
            self.stats["loads"] += 1
            logger.info("Activation cache: loaded %s (%s) for %r", final, _human(nbytes), slot.name)
        return True

    def _within_budget(self, slot: _Slot, nbytes: int, shape: tuple[int, ...], disk: bool = False) -> bool:
        held = sum(s.nbytes for s in self._slots if s is not slot and s.array is not None)
        problem = None
        if held + nbytes > self.max_bytes:
            problem = (
                f"The activations of {slot.name!r} ({shape[0]} examples x {list(shape[1:])} x "
                f"{np.dtype(self.dtype).itemsize} B = {_human(nbytes)}"
                + (f", plus {_human(held)} already held" if held else "")
                + f") exceed max_bytes={self.max_bytes} ({_human(self.max_bytes)})."
            )
        elif disk:
            free = shutil.disk_usage(self.cache_dir).free
            if nbytes + 256 * 1024**2 > free:
                problem = (
                    f"The activations of {slot.name!r} ({_human(nbytes)}) do not fit in the free space of "
                    f"{self.cache_dir} ({_human(free)})."
                )
        if problem is None:
            return True
        advice = (
            "Raise `max_bytes`, store float16 (`dtype='float16'`, half the size), shorten `max_length`, use "
            "another `cache_dir`, or pass `on_too_large='uncached'` to train without the cache."
        )
        if self.on_too_large == "error":
            raise CacheTooLargeError(f"{problem} {advice}")
        if f"budget:{slot.name}" not in self._warned:
            self._warned.add(f"budget:{slot.name}")
            logger.warning(
                "%s Training %r without the activation cache (on_too_large='uncached').", problem, slot.name
            )
        return False

    def _build(self, slot: _Slot, units: int, directory: Path | None) -> bool:
        """Compute the activations of `slot` (into `directory`, or RAM). `False` when over budget."""
        started = time.perf_counter()
        n, width = len(slot.rows.lengths), 1 if self._first_position_only(units) else slot.rows.width
        storage_dtype = np.dtype(self.dtype)
        array: np.ndarray | None = None
        seq_axis = True
        position = 0
        stop = self._stop_early.get(units, False)
        for features in _feature_batches(slot.dataset, self.batch_size):
            batch = self._collate_inputs(features)
            capture: Capture = self._controller.capture(batch, units, stop=stop, grad=False)
            out = capture.boundary.detach()
            if out.shape[0] != len(features):
                raise UnsupportedPrefixError(
                    f"The prefix output has {out.shape[0]} rows for a batch of {len(features)}: the "
                    "activation cache needs one row per example."
                )
            if array is None:
                main = batch.get(self._main_input)
                seq_len = main.shape[1] if isinstance(main, torch.Tensor) and main.dim() > 1 else None
                seq_axis = out.dim() >= 3 and seq_len is not None and out.shape[1] == seq_len
                row_shape = ((width,) + tuple(out.shape[2:])) if seq_axis else tuple(out.shape[1:])
                shape = (n,) + row_shape
                nbytes = math.prod(shape) * storage_dtype.itemsize
                if not self._within_budget(slot, nbytes, shape, disk=directory is not None):
                    return False
                if directory is None:
                    array = np.zeros(shape, dtype=storage_dtype)
                else:
                    array = np.lib.format.open_memmap(
                        directory / "activations.npy", mode="w+", dtype=storage_dtype, shape=shape
                    )
            values = out.to("cpu", torch.float32).numpy()
            if seq_axis:
                length = min(values.shape[1], width)
                array[position : position + len(features), :length] = values[:, :length]
            else:
                array[position : position + len(features)] = values
            position += len(features)
        assert array is not None
        seconds = time.perf_counter() - started
        self.stats["builds"] += 1
        self.stats["build_seconds"] += seconds
        if directory is not None:
            if isinstance(array, np.memmap):
                array.flush()
            np.save(directory / "rows.npy", np.stack([slot.rows.checksums, slot.rows.lengths]))
            meta = {
                "key": slot.key,
                "format": CACHE_FORMAT_VERSION,
                "model": type(self.model).__name__,
                "frozen_blocks": units - 1,
                "examples": n,
                "shape": list(array.shape),
                "dtype": self.dtype,
                "seq_axis": seq_axis,
                "build_seconds": round(seconds, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (directory / "meta.json").write_text(json.dumps(meta, indent=1))
            for name in ("activations.npy", "rows.npy", "meta.json"):
                with open(directory / name, "rb") as handle:
                    os.fsync(handle.fileno())
        slot.array, slot.nbytes, slot.seq_axis = array, int(array.nbytes), seq_axis
        logger.info(
            "Activation cache: built %d examples of %r (%s) in %.1f s",
            n,
            slot.name,
            _human(array.nbytes),
            seconds,
        )
        return True

    def _check_stored(self, slot: _Slot, units: int) -> float | None:
        """Check the stored first rows with a fresh computation: the difference or `None`."""
        assert slot.array is not None
        batch = self._verify_batch(slot)
        fresh = self._controller.capture(batch, units, stop=self._stop_early.get(units, False), grad=False)
        stored = self._rows_tensor(slot, np.arange(fresh.boundary.shape[0]), fresh.boundary)
        expected = fresh.boundary.to(stored.dtype)
        mask = batch.get("attention_mask")
        if slot.seq_axis and self._first_position_only(units):
            stored, expected = stored[:, :1], expected[:, :1]  # the only position stored
        elif slot.seq_axis and isinstance(mask, torch.Tensor) and mask.shape == stored.shape[:2]:
            # Padding positions may legitimately differ (some models compute them from the batch's padded
            # length); the layers above never read them.
            keep = mask.bool()
            stored, expected = stored[keep], expected[keep]
        tolerance = 1e-4 if self.dtype == "float32" else 2e-2
        if torch.allclose(stored, expected, atol=tolerance, rtol=tolerance * 10):
            return None
        return float((stored - expected).abs().max())

    # ------------------------------------------------------------------ lookup (from the model's forward)
    def _rows_tensor(self, slot: _Slot, rows: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        assert slot.array is not None
        values = torch.from_numpy(np.ascontiguousarray(slot.array[rows]))
        if slot.seq_axis and like.dim() >= 2:
            length = like.shape[1]
            if values.shape[1] >= length:
                values = values[:, :length]
            else:
                pad = torch.zeros((values.shape[0], length - values.shape[1]) + tuple(values.shape[2:]))
                values = torch.cat([values, pad.to(values.dtype)], dim=1)
        return values.to(device=like.device, dtype=like.dtype)

    def _lookup(self, ids: Any, bound: Any, frozen_units: int) -> tuple[torch.Tensor, int] | None:
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
        ids_np = torch.as_tensor(ids).detach().to("cpu", torch.int64).numpy()
        slot_index = ids_np >> _ROW_BITS
        rows = ids_np & ((1 << _ROW_BITS) - 1)
        if len(set(slot_index.tolist())) != 1 or not 0 <= int(slot_index[0]) < len(self._slots):
            self.stats["uncached_batches"] += 1
            return None
        slot = self._slots[int(slot_index[0])]
        if slot.array is None or rows.max() >= len(slot.rows.lengths) or self._prefix_changed():
            self.stats["uncached_batches"] += 1
            return None
        self._check_rows(slot, rows, main, arguments.get("attention_mask"))
        like = torch.empty(
            (len(rows), main.shape[1]) if slot.seq_axis else (len(rows),),
            dtype=self._hidden_dtype(),
            device=main.device,
        )
        self.stats["cached_batches"] += 1
        return self._rows_tensor(slot, rows, like), self._units

    def _prefix_changed(self) -> bool:
        """Whether the prefix weights differ from those the activations were computed with (checked once)."""
        if not self._fingerprint_checked:
            self._fingerprint_checked = True
            if self._fingerprint is not None and self._prefix_fingerprint(self._units) != self._fingerprint:
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

    def _check_rows(self, slot: _Slot, rows: np.ndarray, input_ids: torch.Tensor, mask: Any) -> None:
        length = input_ids.shape[1]
        lengths = torch.from_numpy(slot.rows.lengths[rows]).to(input_ids.device)
        positions = torch.arange(length, device=input_ids.device)
        valid = (positions[None, :] < lengths[:, None]).long()
        if isinstance(mask, torch.Tensor) and mask.shape == input_ids.shape:
            valid = valid * mask.long()
        weights = torch.from_numpy(_checksum_weights(length)).to(input_ids.device)
        got = ((input_ids.long() + 1) * weights * valid).sum(dim=1).cpu().numpy()
        bad = np.nonzero(got != slot.rows.checksums[rows])[0]
        if len(bad):
            raise ActivationCacheError(
                f"Examples {rows[bad][:5].tolist()} of {slot.name!r} are not the ones the activation cache "
                f"was built from (their {self._main_input} changed after `prepare()`, or the collator pads "
                "differently). Call `cache.prepare()` on the changed dataset."
            )


def _max_difference(expected: Any, actual: Any) -> float | None:
    """Largest absolute difference between the tensors of two model outputs (None: different structure)."""
    from .perf import _flat

    left = [t for t in _flat(expected) if isinstance(t, torch.Tensor)]
    right = [t for t in _flat(actual) if isinstance(t, torch.Tensor)]
    if (
        not left
        or len(left) != len(right)
        or any(a.shape != b.shape for a, b in zip(left, right, strict=True))
    ):
        return None
    return max(
        float((a.detach().float() - b.detach().float()).abs().max()) for a, b in zip(left, right, strict=True)
    )


# -------------------------------------------------------------------------------------------- Trainer glue
class ActivationCacheCallback(TLCallback):
    """Keeps an `ActivationCache` in step with the freeze boundary during `Trainer.train`.

    At the start of training it checks the prefix weights (a resumed checkpoint may have changed them), and at
    the start of every epoch and step it rebuilds the cache if a freeze schedule moved the boundary. Add it
    *after* the callbacks that freeze or unfreeze layers. Without it, a moved boundary makes batches run
    uncached.
    """

    def __init__(self, cache: ActivationCache) -> None:
        super().__init__()
        self.cache = cache

    def _refresh(self, state: TrainerState, check_weights: bool = False) -> None:
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

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._refresh(state, check_weights=True)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._refresh(state)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._refresh(state)


@dataclass
class CachedTraining:
    """What `prepare_cached_training` returns: pass :meth:`trainer_kwargs` to `transformers.Trainer`."""

    model: nn.Module
    cache: ActivationCache
    train_dataset: Any
    eval_dataset: Any
    data_collator: Callable[[list[dict[str, Any]]], Any]
    callbacks: list[TrainerCallback] = field(default_factory=list)

    def trainer_kwargs(self) -> dict[str, Any]:
        """``model``, ``train_dataset``, ``eval_dataset``, ``data_collator``, ``callbacks`` for a Trainer."""
        return {
            "model": self.model,
            "train_dataset": self.train_dataset,
            "eval_dataset": self.eval_dataset,
            "data_collator": self.data_collator,
            "callbacks": list(self.callbacks),
        }


def prepare_cached_training(
    model: nn.Module,
    train_dataset: Any,
    eval_dataset: Any = None,
    *,
    data_collator: Callable[[list[dict[str, Any]]], Any] | None = None,
    tokenizer: Any = None,
    **cache_kwargs: Any,
) -> CachedTraining:
    """Attach an `ActivationCache` to `model` and prepare the datasets for a plain `transformers.Trainer`.

    Args:
        model (`torch.nn.Module`): the model, with its frozen layers frozen.
        train_dataset: tokenized training examples (fixed: no random augmentation).
        eval_dataset (*optional*): a dataset or a dict of datasets to evaluate on.
        data_collator (*optional*): the collator; default ``DataCollatorWithPadding(tokenizer)`` when
            `tokenizer` is given, else `transformers.default_data_collator`.
        tokenizer (*optional*): used for the default collator.
        **cache_kwargs: passed to `ActivationCache` (``cache_dir``, ``max_bytes``, ``prefix_dropout``, ...).

    Returns:
        `CachedTraining`: ``Trainer(args=args, **prepared.trainer_kwargs())`` trains with the cache.
    """
    if data_collator is None and tokenizer is not None:
        from transformers import DataCollatorWithPadding

        data_collator = DataCollatorWithPadding(tokenizer)
    cache = ActivationCache(model, data_collator=data_collator, **cache_kwargs)
    train = cache.prepare(train_dataset, name="train")
    evaluation: Any = None
    if isinstance(eval_dataset, Mapping):
        evaluation = {name: cache.prepare(ds, name=f"eval/{name}") for name, ds in eval_dataset.items()}
    elif eval_dataset is not None:
        evaluation = cache.prepare(eval_dataset, name="eval")
    return CachedTraining(model, cache, train, evaluation, cache.data_collator, [cache.callback()])

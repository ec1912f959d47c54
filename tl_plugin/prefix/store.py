"""Where cached prefix outputs live: keyed, memory-mapped, locked rows within a byte budget.

`ActivationStore` holds one *slot* per registered dataset: an array of shape ``(examples, positions, hidden)`` (or
``(examples, hidden)``), in RAM (``storage="memory"``) or as a memory-mapped ``activations.npy`` in a directory
named by the slot's key under ``cache_dir`` (``storage="disk"``). A disk slot is written to a temporary
directory and renamed into place under a file lock, so that processes sharing ``cache_dir`` (trials of a Ray Tune
search) build each key once; a file that does not match its dataset's row checksums is rebuilt. All slots
together stay within ``max_bytes`` (and the free disk space): past it, ``on_too_large`` says whether to raise
`CacheTooLargeError` or to leave that dataset uncached.

Rows are written in order and read back with ``pread`` (`RowWriter`, `RowFile`): nothing is memory-mapped, so the
resident memory of a build or of a cached epoch is a batch of rows, whatever the number of examples. ``dtype``
is ``float32``, ``float16`` or ``bfloat16`` (half the bytes; bfloat16 keeps float32's range, stored as its 16
bits). The store does not compute anything: the cache hands it a ``build(slot, directory)`` callable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .rows import RowIndex

# The logger keeps the name it had before the move to tl_plugin.prefix, for anyone filtering on it.
logger = logging.getLogger("tl_plugin.cache")

__all__ = [
    "CACHE_FORMAT_VERSION",
    "DEFAULT_MAX_BYTES",
    "ActivationCacheError",
    "ActivationStore",
    "CacheTooLargeError",
    "Slot",
    "clear_activation_cache",
    "default_cache_dir",
]

#: Default bound on the activations one store holds (all datasets together): 4 GiB.
DEFAULT_MAX_BYTES = 4 * 1024**3
#: Bump when the on-disk layout changes: older files are then never read.
CACHE_FORMAT_VERSION = 1
STORAGE_CHOICES = ("disk", "memory")
ON_TOO_LARGE_CHOICES = ("error", "uncached")
DTYPE_CHOICES = ("float32", "float16", "bfloat16")


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


def human_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype rows are stored as (bfloat16, which numpy lacks, as its 16 bits in an int16)."""
    return np.dtype(np.int16) if dtype == "bfloat16" else np.dtype(dtype)


def encode(values: torch.Tensor, dtype: str) -> np.ndarray:
    """`values` (any float tensor) as stored rows of `dtype`."""
    if dtype == "bfloat16":
        return values.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy()
    return values.detach().to("cpu", torch.float32).numpy().astype(dtype, copy=False)


def decode(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows of `dtype` as a tensor (bfloat16 rows as a bfloat16 tensor)."""
    values = torch.from_numpy(np.ascontiguousarray(stored))
    return values.view(torch.bfloat16) if dtype == "bfloat16" else values


class RowFile:
    """The rows of an ``.npy`` file, read with ``pread`` when asked for.

    Nothing is mapped into memory, so the resident memory of a cached epoch is the rows of one batch, whatever the
    size of the file. Supports what the cache reads: ``shape``, ``nbytes``, ``dtype`` and ``rows_file[indices]``.
    """

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            self.offset = handle.tell()
        if fortran:
            raise ValueError(f"{path} is stored in Fortran order; the activation cache writes C order.")
        self.path = path
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(math.prod(self.shape[1:])) * self.dtype.itemsize
        expected = self.offset + self.shape[0] * self.row_bytes
        if os.path.getsize(path) != expected:
            raise ValueError(f"{path} has {os.path.getsize(path)} bytes, its header says {expected}.")
        self._fd: int | None = os.open(path, os.O_RDONLY)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        out = np.empty((len(rows),) + self.shape[1:], dtype=self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        assert self._fd is not None
        for i, row in enumerate(rows.tolist()):
            data = os.pread(self._fd, self.row_bytes, self.offset + row * self.row_bytes)
            flat[i] = np.frombuffer(data, np.uint8)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class RowWriter:
    """Writes rows in order: appended to an ``.npy`` file (no mapping: bounded memory), or into a RAM array."""

    def __init__(self, shape: tuple[int, ...], dtype: str, path: Path | None) -> None:
        self.shape, self.dtype, self.path = shape, dtype, path
        self.written = 0
        self.array: np.ndarray | None = None
        self._handle: Any = None
        if path is None:
            self.array = np.zeros(shape, dtype=storage_dtype(dtype))
        else:
            self._handle = open(path, "wb")  # noqa: SIM115 - closed by finish()
            header = {
                "descr": np.lib.format.dtype_to_descr(storage_dtype(dtype)),
                "fortran_order": False,
                "shape": shape,
            }
            np.lib.format.write_array_header_2_0(self._handle, header)

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape)) * storage_dtype(self.dtype).itemsize

    def write(self, block: np.ndarray) -> None:
        """Append `block` (the next rows, already of the stored dtype and row shape)."""
        if self.array is not None:
            self.array[self.written : self.written + len(block)] = block
        else:
            self._handle.write(np.ascontiguousarray(block).tobytes())
        self.written += len(block)

    def finish(self) -> np.ndarray | RowFile:
        """Close the file and open its rows for reading (or return the RAM array)."""
        if self.written != self.shape[0]:
            raise ActivationCacheError(f"Wrote {self.written} rows of {self.shape[0]}.")
        if self.array is not None:
            return self.array
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        assert self.path is not None
        return RowFile(self.path)


@dataclass
class Slot:
    """One registered dataset and its stored rows (``array`` is `None` while nothing is stored)."""

    index: int
    name: str
    dataset: Any
    rows: RowIndex
    array: np.ndarray | RowFile | None = None
    key: str | None = None
    path: Path | None = None
    nbytes: int = 0
    seq_axis: bool = True

    def release(self) -> None:
        if isinstance(self.array, RowFile):
            self.array.close()
        self.array, self.path, self.nbytes = None, None, 0


#: ``build(slot, directory)``: compute the rows of `slot` into `directory` (RAM when `None`); `False` when over
#: budget (nothing stored).
Builder = Callable[[Slot, "Path | None"], bool]


class ActivationStore:
    """The slots of one activation cache (see the module docstring).

    Args:
        storage (`str`): ``"disk"`` or ``"memory"``.
        cache_dir (`Path`): where disk slots go.
        max_bytes (`int`): most bytes held by all slots together.
        on_too_large (`str`): ``"error"`` or ``"uncached"``.
        dtype (`str`): ``"float32"`` or ``"float16"``.
        lock_timeout (`float`): seconds to wait for another process building the same key.
        stats (`dict`): counters shared with the cache (``loads`` is counted here).
    """

    def __init__(
        self,
        *,
        storage: str,
        cache_dir: Path,
        max_bytes: int,
        on_too_large: str,
        dtype: str,
        lock_timeout: float,
        stats: dict[str, float],
    ) -> None:
        self.storage = storage
        self.cache_dir = cache_dir
        self.max_bytes = max_bytes
        self.on_too_large = on_too_large
        self.dtype = dtype
        self.lock_timeout = lock_timeout
        self.stats = stats
        self.slots: list[Slot] = []
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ slots
    def add(self, name: str | None, dataset: Any, rows: RowIndex) -> Slot:
        index = len(self.slots)
        slot = Slot(index, name or f"dataset{index}", dataset, rows)
        self.slots.append(slot)
        return slot

    @property
    def nbytes(self) -> int:
        """Bytes of activations held right now (all slots)."""
        return sum(slot.nbytes for slot in self.slots if slot.array is not None)

    def clear(self) -> None:
        """Drop every stored array (the slots stay registered)."""
        for slot in self.slots:
            slot.array, slot.key, slot.path, slot.nbytes = None, None, None, 0

    def fill(self, slot: Slot, key: str, build: Builder, discard: bool = False) -> bool:
        """Store the rows of `slot` under `key`: loaded, or built by `build` (`True`: built here)."""
        slot.key = key
        if self.storage == "memory":
            return build(slot, None)
        return self._load_or_build(slot, key, build, discard)

    # ------------------------------------------------------------------ writing
    def writer(self, slot: Slot, shape: tuple[int, ...], directory: Path | None) -> RowWriter | None:
        """A writer of `shape` rows for `slot` (a file in `directory`, else RAM); `None` when over budget."""
        nbytes = math.prod(shape) * storage_dtype(self.dtype).itemsize
        if not self.within_budget(slot, nbytes, shape, disk=directory is not None):
            return None
        return RowWriter(shape, self.dtype, directory / "activations.npy" if directory is not None else None)

    def finish(
        self, slot: Slot, writer: RowWriter, directory: Path | None, seq_axis: bool, meta: dict[str, Any]
    ) -> None:
        """Make the rows of `writer` the rows of `slot`; in `directory`, also the row checksums and meta.json."""
        array = writer.finish()
        if directory is not None:
            np.save(directory / "rows.npy", np.stack([slot.rows.checksums, slot.rows.lengths]))
            meta = {
                "key": slot.key,
                "format": CACHE_FORMAT_VERSION,
                **meta,
                "examples": len(slot.rows),
                "shape": list(array.shape),
                "dtype": self.dtype,
                "seq_axis": seq_axis,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (directory / "meta.json").write_text(json.dumps(meta, indent=1))
            for name in ("rows.npy", "meta.json"):
                with open(directory / name, "rb") as handle:
                    os.fsync(handle.fileno())
        slot.array, slot.nbytes, slot.seq_axis = array, int(array.nbytes), seq_axis

    def _load_or_build(self, slot: Slot, key: str, build: Builder, discard: bool) -> bool:
        from filelock import FileLock, Timeout

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        final = self.cache_dir / key
        lock = FileLock(str(self.cache_dir / f"{key}.lock"), timeout=self.lock_timeout)
        try:
            with lock:
                if not discard and self._load(slot, final, key):
                    return False
                slot.release()
                if final.exists():
                    shutil.rmtree(final, ignore_errors=True)  # unreadable or stale: rebuild under the lock
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.cache_dir))
                try:
                    if not build(slot, tmp):
                        return True
                    slot.release()  # close the file before the rename
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

    def _load(self, slot: Slot, final: Path, key: str, count: bool = True) -> bool:
        meta_path, data_path, rows_path = final / "meta.json", final / "activations.npy", final / "rows.npy"
        if not (meta_path.is_file() and data_path.is_file() and rows_path.is_file()):
            return False
        try:
            meta = json.loads(meta_path.read_text())
            rows = np.load(rows_path)
            array = RowFile(data_path)
        except (OSError, ValueError) as err:
            logger.warning("Activation cache %s is unreadable (%s); rebuilding it.", final, err)
            return False
        n = len(slot.rows)
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
        if not self.within_budget(slot, nbytes, array.shape):
            return True  # too large: train this dataset without the cache
        slot.array, slot.path, slot.nbytes, slot.seq_axis = array, final, nbytes, bool(meta["seq_axis"])
        if count:
            self.stats["loads"] += 1
            logger.info("Activation cache: loaded %s (%s) for %r", final, human_bytes(nbytes), slot.name)
        return True

    def within_budget(self, slot: Slot, nbytes: int, shape: tuple[int, ...], disk: bool = False) -> bool:
        """Whether `nbytes` more for `slot` fit (`False`, or `CacheTooLargeError`, when they do not)."""
        held = sum(s.nbytes for s in self.slots if s is not slot and s.array is not None)
        problem = None
        if held + nbytes > self.max_bytes:
            problem = (
                f"The activations of {slot.name!r} ({shape[0]} examples x {list(shape[1:])} x "
                f"{storage_dtype(self.dtype).itemsize} B = {human_bytes(nbytes)}"
                + (f", plus {human_bytes(held)} already held" if held else "")
                + f") exceed max_bytes={self.max_bytes} ({human_bytes(self.max_bytes)})."
            )
        elif disk:
            free = shutil.disk_usage(self.cache_dir).free
            if nbytes + 256 * 1024**2 > free:
                problem = (
                    f"The activations of {slot.name!r} ({human_bytes(nbytes)}) do not fit in the free space of "
                    f"{self.cache_dir} ({human_bytes(free)})."
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

    # ------------------------------------------------------------------ reading
    def rows_tensor(self, slot: Slot, rows: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        """Rows of `slot` as a tensor with `like`'s device, dtype and (padded or cut) sequence length."""
        assert slot.array is not None
        values = decode(slot.array[rows], self.dtype)
        if slot.seq_axis and like.dim() >= 2:
            length = like.shape[1]
            if values.shape[1] >= length:
                values = values[:, :length]
            else:
                pad = torch.zeros((values.shape[0], length - values.shape[1]) + tuple(values.shape[2:]))
                values = torch.cat([values, pad.to(values.dtype)], dim=1)
        return values.to(device=like.device, dtype=like.dtype)

"""Loading a user's data for ``tl-plugin``: files, folders, saved or local data sets, into train / validation /
test splits, with the checks that stop a run before any training step.

Sources (one per run):

- ``--train_file`` [``--validation_file``] [``--test_file``]: CSV, JSON/JSONL or Parquet, read with `datasets`;
- ``--train_dir`` [``--validation_dir``] [``--test_dir``]: image or audio files in one sub-folder per class;
- ``--dataset_dir``: a folder written by ``DatasetDict.save_to_disk``;
- ``--dataset_name``: a local data set folder (or loading script) that ``datasets.load_dataset`` reads offline.

Without validation data a stratified, seeded share of train is held out (``--validation_split``); without test
data the report uses the validation split.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict
from datasets import Sequence as SequenceFeature

from .errors import DataError

__all__ = [
    "FILE_FORMATS",
    "LABEL_COLUMN_CANDIDATES",
    "TEXT_COLUMN_CANDIDATES",
    "add_validation_split",
    "check_texts",
    "detect_column",
    "encode_sequence_labels",
    "hold_out_validation",
    "load_raw_data",
    "require_column",
    "sequence_labels",
    "subsample",
]

#: File extension → `datasets` builder.
FILE_FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
TEXT_COLUMN_CANDIDATES: tuple[str, ...] = ("text", "sentence", "sentence1", "content", "review", "document")
LABEL_COLUMN_CANDIDATES: tuple[str, ...] = ("label", "labels", "class", "target", "category")
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation", "eval": "validation"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a"}


# ------------------------------------------------------------------------------------------------- loading
def _check_file(flag: str, path: str) -> str:
    if not os.path.exists(path):
        raise DataError(f"--{flag}: no such file {path!r}")
    if os.path.isdir(path):
        raise DataError(f"--{flag}: {path!r} is a folder; give a CSV, JSON/JSONL or Parquet file")
    if not os.access(path, os.R_OK):
        raise DataError(f"--{flag}: cannot read {path!r} (permission denied)")
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_FORMATS:
        raise DataError(
            f"--{flag}: {path!r} has the extension {suffix or '(none)'!r}; supported: {', '.join(FILE_FORMATS)}"
        )
    return FILE_FORMATS[suffix]


def _builder_kwargs(builder: str, paths: Sequence[str], encoding: str) -> dict[str, Any]:
    if builder == "csv":
        kwargs: dict[str, Any] = {"encoding": encoding}
        if all(p.lower().endswith(".tsv") for p in paths):
            kwargs["sep"] = "\t"
        return kwargs
    if builder == "json":
        return {"encoding": encoding}
    return {}


def _explain_load_error(err: BaseException, flag: str, path: str, encoding: str) -> DataError:
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in chain:
        if isinstance(item, UnicodeDecodeError):
            return DataError(
                f"--{flag}: {path!r} is not {encoding} text (byte 0x{item.object[item.start]:02x} at offset "
                f"{item.start}); pass its encoding with --encoding, e.g. --encoding latin-1"
            )
    last = chain[-1]
    return DataError(f"--{flag}: cannot read {path!r}: {type(last).__name__}: {str(last).splitlines()[0][:300]}")


def _load_files(files: dict[str, tuple[str, str]], encoding: str) -> DatasetDict:
    """``{split: (flag, path)}`` → one `Dataset` per split (each file read on its own, so a bad one is named)."""
    from datasets import load_dataset

    splits = {}
    for split, (flag, path) in files.items():
        builder = _check_file(flag, path)
        try:
            loaded = load_dataset(builder, data_files={"data": path}, split="data", **_builder_kwargs(builder, [path], encoding))
        except Exception as err:  # noqa: BLE001  (every reader error becomes one line naming the file)
            if "corresponds to no data" in str(err):  # a CSV with a header only, an empty JSONL file
                raise DataError(f"the {split} split is empty (--{flag} {path} has no rows)") from err
            raise _explain_load_error(err, flag, path, encoding) from err
        splits[split] = loaded
    return DatasetDict(splits)


def _media_kind(folder: Path) -> str:
    suffixes = Counter(p.suffix.lower() for p in folder.rglob("*") if p.is_file())
    images = sum(n for s, n in suffixes.items() if s in _IMAGE_SUFFIXES)
    audio = sum(n for s, n in suffixes.items() if s in _AUDIO_SUFFIXES)
    if images == 0 and audio == 0:
        found = ", ".join(f"{s or '(none)'}" for s in sorted(suffixes)) or "no files"
        raise DataError(
            f"{folder} holds no image ({', '.join(sorted(_IMAGE_SUFFIXES))}) or audio "
            f"({', '.join(sorted(_AUDIO_SUFFIXES))}) files; found {found}"
        )
    return "imagefolder" if images >= audio else "audiofolder"


def _load_folders(folders: dict[str, tuple[str, str]]) -> DatasetDict:
    """Image or audio folders (one sub-folder per class) → splits with a `ClassLabel` ``label`` column."""
    from datasets import load_dataset

    kinds = set()
    data_files = {}
    for split, (flag, path) in folders.items():
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(f"--{flag}: no such folder {path!r}")
        kinds.add(_media_kind(folder))
        data_files[split] = str(folder / "**")
    if len(kinds) > 1:
        raise DataError(f"the folders mix images and audio: {', '.join(p for _, p in folders.values())}")
    builder = kinds.pop()
    if builder == "audiofolder":  # datasets' audiofolder needs torchcodec (and FFmpeg) even to list the files
        return load_audio_folders(folders)
    try:
        loaded = load_dataset(builder, data_files=data_files)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot read the {builder} data in {', '.join(p for _, p in folders.values())}: {err}") from err
    return DatasetDict(dict(loaded))


def load_audio_folders(folders: Mapping[str, tuple[str, str]]) -> Any:
    """Audio folders (one sub-folder per class) as splits with an ``audio`` column (`datasets.Audio`, not
    decoded: ``{"bytes": None, "path": ...}``) and a `datasets.ClassLabel` ``label`` column.

    Args:
        folders (`Mapping[str, tuple[str, str]]`): ``{split: (flag, folder)}``, e.g.
            ``{"train": ("train_dir", "data/train")}``.

    Returns:
        `datasets.DatasetDict`: one split per folder; the class names are the sorted sub-folder names of all the
        folders (a file's class is the name of the folder it is in).

    Raises:
        DataError: a missing folder, a folder without audio files, or an audio file outside a class sub-folder.
    """
    from datasets import Audio, ClassLabel, Dataset, DatasetDict, Features

    files: dict[str, list[tuple[str, str]]] = {}
    for split, (flag, path) in folders.items():
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(f"--{flag}: no such folder {path!r}")
        found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _AUDIO_SUFFIXES)
        if not found:
            raise DataError(f"--{flag}: {path!r} holds no audio files ({', '.join(sorted(_AUDIO_SUFFIXES))})")
        loose = [p for p in found if p.parent == folder]
        if loose:
            raise DataError(
                f"--{flag}: {loose[0]} is not in a class sub-folder ({len(loose)} such files); put each file in a "
                f"sub-folder named after its class: {path}/<class>/<file>"
            )
        files[split] = [(str(p.resolve()), p.parent.name) for p in found]
    names = sorted({label for rows in files.values() for _, label in rows})
    features = Features({"audio": Audio(decode=False), "label": ClassLabel(names=names)})
    splits = {}
    for split, rows in files.items():
        raw = Dataset.from_dict(
            {
                "audio": [{"bytes": None, "path": p} for p, _ in rows],
                "label": [names.index(n) for _, n in rows],
            }
        )
        splits[split] = raw.cast(features)  # an Arrow cast: no audio encoder (torchcodec) needed
    return DatasetDict(splits)


def _normalize_splits(data: DatasetDict | Dataset, source: str) -> DatasetDict:
    if isinstance(data, Dataset):
        return DatasetDict({"train": data})
    renamed = {_SPLIT_ALIASES.get(name, name): split for name, split in data.items()}
    if "train" not in renamed:
        raise DataError(f"{source} has no 'train' split; its splits are {sorted(data)}")
    extra = sorted(set(renamed) - {"train", "validation", "test"})
    if extra:
        raise DataError(f"{source} has splits {extra} besides train/validation/test; keep only those three")
    return DatasetDict(renamed)


def _load_source(args: Any) -> DatasetDict:
    if args.train_file:
        files = {"train": ("train_file", args.train_file)}
        if args.validation_file:
            files["validation"] = ("validation_file", args.validation_file)
        if args.test_file:
            files["test"] = ("test_file", args.test_file)
        return _load_files(files, args.encoding)
    if args.train_dir:
        folders = {"train": ("train_dir", args.train_dir)}
        if args.validation_dir:
            folders["validation"] = ("validation_dir", args.validation_dir)
        if args.test_dir:
            folders["test"] = ("test_dir", args.test_dir)
        return _load_folders(folders)
    if args.dataset_dir:
        from datasets import load_from_disk

        if not os.path.isdir(args.dataset_dir):
            raise DataError(f"--dataset_dir: no such folder {args.dataset_dir!r}")
        try:
            saved = load_from_disk(args.dataset_dir)
        except Exception as err:  # noqa: BLE001
            raise DataError(f"--dataset_dir {args.dataset_dir!r} is not a save_to_disk folder: {err}") from err
        return _normalize_splits(saved, f"--dataset_dir {args.dataset_dir}")
    from datasets import load_dataset

    if not os.path.exists(args.dataset_name):
        raise DataError(
            f"--dataset_name: no such local data set {args.dataset_name!r} (tl-plugin reads local folders or "
            f"scripts offline; download a hub data set first and pass its folder)"
        )
    try:
        loaded = load_dataset(args.dataset_name, args.dataset_config_name)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"--dataset_name {args.dataset_name!r}: {str(err).splitlines()[0][:300]}") from err
    return _normalize_splits(loaded, f"--dataset_name {args.dataset_name}")


def load_raw_data(args: Any) -> DatasetDict:
    """The splits of the data options in `args` (a `tl_plugin.app.arguments.DataArguments`), before any
    column checks: ``train`` and, when given, ``validation`` and ``test`` (`add_validation_split` holds out a
    validation split when there is none).

    Args:
        args: the data options.

    Raises:
        DataError: a missing or unreadable file or folder, an empty split.
    """
    data = _load_source(args)
    for name, split in data.items():
        if split.num_rows == 0:
            raise DataError(f"the {name} split is empty ({_source_of(args, name)})")
    return data


def _source_of(args: Any, split: str) -> str:
    for flag in (f"{split}_file", f"{split}_dir", "dataset_dir", "dataset_name"):
        value = getattr(args, flag, None)
        if value:
            return f"--{flag} {value}"
    return "the data"


# ------------------------------------------------------------------------------------------------- columns
def require_column(dataset: Dataset, column: str, flag: str) -> str:
    """`column`, or a `DataError` naming `flag` and the columns there are."""
    if column not in dataset.column_names:
        raise DataError(f"--{flag} {column!r} is not a column of the data; its columns are {dataset.column_names}")
    return column


def detect_column(
    dataset: Dataset, given: str | None, flag: str, candidates: Iterable[str], what: str
) -> str:
    """The column `given` by `flag`, else the first of `candidates` the data has (case-insensitive)."""
    if given is not None:
        return require_column(dataset, given, flag)
    by_lower = {c.lower(): c for c in dataset.column_names}
    for candidate in candidates:
        if candidate in by_lower:
            return by_lower[candidate]
    raise DataError(
        f"cannot tell which column holds the {what}: none is named {' / '.join(candidates)}; pass --{flag} "
        f"(the columns are {dataset.column_names})"
    )


def _rows(values: Sequence[Any], bad: Any) -> list[int]:
    return [i for i, v in enumerate(values) if bad(v)]


def check_texts(data: DatasetDict, column: str, flag: str, drop_empty: bool) -> DatasetDict:
    """Stop on empty or null texts (count and first row numbers), or drop them with ``--drop_empty``."""

    def empty(value: Any) -> bool:
        return value is None or (isinstance(value, str) and not value.strip()) or (
            isinstance(value, list) and len(value) == 0
        )

    out = {}
    for name, split in data.items():
        if column not in split.column_names:
            out[name] = split
            continue
        bad = _rows(split[column], empty)
        if bad and not drop_empty:
            first = ", ".join(str(i + 1) for i in bad[:5])
            raise DataError(
                f"{len(bad)} empty or null values in column {column!r} (--{flag}) of the {name} split, first at "
                f"row {first} (1-based, header not counted); fix them or pass --drop_empty true to skip them"
            )
        if bad:
            keep = sorted(set(range(split.num_rows)) - set(bad))
            split = split.select(keep)
            print(f"--drop_empty: skipped {len(bad)} empty examples of the {name} split")
            if split.num_rows == 0:
                raise DataError(f"the {name} split has no examples left after --drop_empty")
        out[name] = split
    return DatasetDict(out)


# ------------------------------------------------------------------------------------------------- labels
def sequence_labels(data: DatasetDict, column: str) -> tuple[list[str], bool]:
    """The label names of a sequence-level task (text / image / audio classification) and whether it is
    multi-label (the labels are lists).

    `datasets.ClassLabel` columns keep their names (in id order); string or integer labels are sorted (integers
    numerically). Raises `DataError` for null labels, a single class in train, or a validation/test label that
    train lacks.
    """
    train = data["train"]
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        multi = False
    else:
        values = train[column]
        nulls = _rows(values, lambda v: v is None)
        if nulls:
            raise DataError(
                f"{len(nulls)} null labels in column {column!r} of the train split, first at row {nulls[0] + 1}"
            )
        multi = isinstance(feature, (SequenceFeature, list)) or any(isinstance(v, list) for v in values)
        flat = [x for v in values for x in v] if multi else list(values)
        names = _sorted_names(flat)
    counts = Counter(_label_names_of(train, column, names, multi))
    if len(names) < 2 or len(counts) < 2:
        only = names[0] if names else "(none)"
        raise DataError(f"the train split has a single class ({only!r} in column {column!r}); a classifier needs two or more")
    known = set(names)
    for split_name in ("validation", "test"):
        if split_name not in data:
            continue
        for row, value in enumerate(_label_names_of(data[split_name], column, names, multi, per_example=True)):
            for name in value:
                if name not in known:
                    raise DataError(
                        f"label {name!r} in row {row + 1} of the {split_name} split does not occur in train "
                        f"(train has {names}); add training examples of it or remove it"
                    )
    return names, multi


def _sorted_names(values: Sequence[Any]) -> list[str]:
    unique = set(values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in unique):
        return [str(v) for v in sorted(unique)]
    return sorted(str(v) for v in unique)


def _label_names_of(
    split: Dataset, column: str, names: list[str], multi: bool, per_example: bool = False
) -> list[Any]:
    feature = split.features[column]
    values = split[column]
    if isinstance(feature, ClassLabel):
        as_names = [[feature.int2str(v)] if v is not None and v >= 0 else [None] for v in values]
    elif multi:
        as_names = [[str(x) for x in (v or [])] for v in values]
    else:
        as_names = [[None if v is None else str(v)] for v in values]
    if per_example:
        return as_names
    return [n for v in as_names for n in v]


def encode_sequence_labels(data: DatasetDict, column: str, names: list[str], multi: bool) -> DatasetDict:
    """A ``labels`` column: label ids (`int`), or multi-hot `float` vectors for multi-label data."""
    index = {n: i for i, n in enumerate(names)}

    def encode(batch: dict[str, list[Any]], feature: Any) -> dict[str, list[Any]]:
        out: list[Any] = []
        for value in batch[column]:
            if multi:
                hot = [0.0] * len(names)
                for name in value or []:
                    hot[index[str(name)]] = 1.0
                out.append(hot)
            elif isinstance(feature, ClassLabel):
                out.append(index[feature.int2str(value)])
            else:
                if value is None:
                    raise DataError(f"null label in column {column!r}")
                out.append(index[str(value)])
        return {"labels": out}

    encoded = {}
    for split_name, split in data.items():
        feature = split.features[column]
        encoded[split_name] = split.map(
            encode, batched=True, fn_kwargs={"feature": feature}, desc=f"Labels ({split_name})"
        )
    return DatasetDict(encoded)


# ------------------------------------------------------------------------------------------------- splits
def hold_out_validation(train: Dataset, fraction: float, seed: int, stratify_by: Sequence[Any] | None) -> tuple[Dataset, Dataset]:
    """A seeded split of `train` into (train, validation), stratified by `stratify_by` (one key per row) when
    every class has at least two examples."""
    from sklearn.model_selection import train_test_split

    indices = list(range(train.num_rows))
    n_val = max(1, math.floor(fraction * train.num_rows + 0.5))
    if n_val >= train.num_rows:
        raise DataError(f"the train split has {train.num_rows} examples: too few to hold out a validation split")
    stratify = None
    if stratify_by is not None:
        counts = Counter(stratify_by)
        if min(counts.values()) >= 2 and len(counts) <= n_val and len(counts) <= train.num_rows - n_val:
            stratify = list(stratify_by)
    kept, held = train_test_split(indices, test_size=n_val, random_state=seed, shuffle=True, stratify=stratify)
    return train.select(sorted(kept)), train.select(sorted(held))


def subsample(train: Dataset, n: int, seed: int, stratify_by: Sequence[Any] | None) -> Dataset:
    """At most `n` rows of `train`, seeded and stratified (when possible)."""
    if n >= train.num_rows:
        return train
    kept, _ = hold_out_validation(train, 1 - n / train.num_rows, seed, stratify_by)
    return kept


def add_validation_split(
    data: DatasetDict, args: Any, seed: int, stratify_key: Callable[[Dataset], Sequence[Any]] | None
) -> DatasetDict:
    """`data` with a validation split (held out of train when absent) and train cut to ``--max_train_samples``.

    `stratify_key` gives one stratification key per row of a split (its label), or `None` for no stratification.
    """
    splits = dict(data)
    if "validation" not in splits:
        keys = None if stratify_key is None else stratify_key(splits["train"])
        splits["train"], splits["validation"] = hold_out_validation(splits["train"], args.validation_split, seed, keys)
    if args.max_train_samples is not None:
        keys = None if stratify_key is None else stratify_key(splits["train"])
        splits["train"] = subsample(splits["train"], args.max_train_samples, seed, keys)
    return DatasetDict(splits)

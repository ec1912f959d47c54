"""Real grayscale image data sets available offline, and the collator that feeds them to EfficientNet-Lite0.

- Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``):
  70,000 28x28 images of 10 clothing classes, read from the original idx-ubyte gzip files;
- scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`): 1,797 8x8 images of 10 digits.

Both loaders return a `datasets.DatasetDict` with ``train`` and ``test`` splits whose rows hold ``image`` (a
2-D uint8 array, 0 = background) and ``label`` (a `datasets.ClassLabel` carrying the class names).
:class:`GrayscaleImageCollator` turns a list of such rows into the ``pixel_values`` / ``labels`` batch that
`EfficientNetLite0ForImageClassification` takes. Because the model's `forward` has no ``image`` argument,
train with ``TrainingArguments(remove_unused_columns=False)`` so that the `Trainer` keeps the ``image`` column
for the collator.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .efficientnet_lite import LITE0_MEAN, LITE0_STD

__all__ = [
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "GrayscaleImageCollator",
    "load_digits_dataset",
    "load_fashion_mnist",
    "read_idx_gz",
]

#: Where Debian's ``dataset-fashion-mnist`` package installs the files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
#: Fashion-MNIST class names, by label index.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Digits class names, by label index.
DIGITS_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UINT8 = 0x08


def read_idx_gz(path: str | Path) -> np.ndarray:
    """Read a gzip-compressed idx file of unsigned bytes (the MNIST / Fashion-MNIST format) as a numpy array.

    The header is two zero bytes, the type code (``0x08`` = uint8), the number of dimensions, then one
    big-endian uint32 per dimension; the data follows.

    Args:
        path (`str` or `Path`): an ``*-idx?-ubyte.gz`` file.

    Returns:
        `np.ndarray`: uint8, of the shape the header gives (e.g. ``(60000, 28, 28)`` for images, ``(60000,)``
        for labels).

    Raises:
        `ValueError`: when the header is not that of a uint8 idx file or the size does not match it.
    """
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UINT8:
        raise ValueError(f"{path}: not a uint8 idx file (header {raw[:4].hex()}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says {shape} ({expected} bytes) but {len(raw) - header} bytes follow."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _stratified_indices(labels: np.ndarray, size: int | None, seed: int, split: str) -> np.ndarray:
    """Sorted indices of a class-stratified random subset of `size` rows (all rows when `size` is None)."""
    n = len(labels)
    if size is None or size == n:
        return np.arange(n)
    if not 0 < size < n:
        raise ValueError(
            f"{split}_size must be between 1 and {n} (the size of the {split} split), got {size}."
        )
    from sklearn.model_selection import train_test_split

    chosen, _ = train_test_split(np.arange(n), train_size=size, stratify=labels, random_state=seed)
    return np.sort(chosen)


def _to_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> Any:
    import datasets

    height, width = images.shape[1:]
    features = datasets.Features(
        {
            "image": datasets.Array2D(shape=(height, width), dtype="uint8"),
            "label": datasets.ClassLabel(names=list(names)),
        }
    )
    return datasets.Dataset.from_dict(
        {"image": np.ascontiguousarray(images), "label": labels.astype(np.int64)}, features=features
    )


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_ROOT,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> Any:
    """Fashion-MNIST (60,000 train / 10,000 test 28x28 grayscale images, 10 classes) from idx gzip files.

    Args:
        root (`str` or `Path`, *optional*): the folder with the four ``*-ubyte.gz`` files; by default where
            Debian's ``dataset-fashion-mnist`` package puts them.
        train_size (`int`, *optional*): keep a class-stratified random subset of this many training images.
        test_size (`int`, *optional*): the same for the test images.
        seed (`int`, *optional*, defaults to 0): seed of the subsets; the same arguments give the same rows.

    Returns:
        `datasets.DatasetDict`: ``train`` and ``test``, columns ``image`` (28x28 uint8) and ``label``
        (`ClassLabel` with :data:`FASHION_MNIST_CLASSES`); subsets keep the original file order.

    Raises:
        `FileNotFoundError`: when a file is missing, saying how to install the package.

    Example:

    ```python
    >>> from tl_plugin.vision import load_fashion_mnist
    >>> data = load_fashion_mnist(train_size=100, test_size=50)  # doctest: +SKIP
    >>> data["train"].num_rows, data["train"].features["label"].names[9]  # doctest: +SKIP
    (100, 'Ankle boot')

    ```
    """
    import datasets

    root = Path(root)
    missing = [name for pair in _FASHION_FILES.values() for name in pair if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing: {', '.join(missing)}). It comes from the Debian "
            f"package `dataset-fashion-mnist`: run `apt-get install dataset-fashion-mnist` (as root, after "
            f"`apt-get update`), or pass `root=` a folder holding the four idx-ubyte gzip files."
        )
    splits = {}
    for split, size in (("train", train_size), ("test", test_size)):
        image_file, label_file = _FASHION_FILES[split]
        images, labels = read_idx_gz(root / image_file), read_idx_gz(root / label_file)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match.")
        keep = _stratified_indices(labels, size, seed, split)
        splits[split] = _to_dataset(images[keep], labels[keep], FASHION_MNIST_CLASSES)
    return datasets.DatasetDict(splits)


def load_digits_dataset(
    test_size: int | float = 0.25,
    train_size: int | None = None,
    seed: int = 0,
) -> Any:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes) with a fixed stratified split.

    The 0-16 intensities are rescaled to 0-255 uint8 so that the images look like any other grayscale image.

    Args:
        test_size (`int` or `float`, *optional*, defaults to 0.25): test rows (a count or a fraction).
        train_size (`int`, *optional*): keep a class-stratified random subset of this many training rows.
        seed (`int`, *optional*, defaults to 0): seed of the split and the subset.

    Returns:
        `datasets.DatasetDict`: ``train`` and ``test``, columns ``image`` (8x8 uint8) and ``label``
        (`ClassLabel` with names ``"0"`` ... ``"9"``), each split in the original order.

    Example:

    ```python
    >>> from tl_plugin.vision import load_digits_dataset
    >>> data = load_digits_dataset()
    >>> data["train"].num_rows, data["test"].num_rows
    (1347, 450)
    >>> data["train"].features["image"].shape
    (8, 8)

    ```
    """
    import datasets
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    train_idx = train_idx[_stratified_indices(labels[train_idx], train_size, seed, "train")]
    return datasets.DatasetDict(
        {
            "train": _to_dataset(images[train_idx], labels[train_idx], DIGITS_CLASSES),
            "test": _to_dataset(images[test_idx], labels[test_idx], DIGITS_CLASSES),
        }
    )


@dataclass
class GrayscaleImageCollator:
    """Batch grayscale image rows into normalised 3-channel ``pixel_values`` for EfficientNet-Lite0.

    Each image (2-D, uint8 0-255, any size) is scaled to 0-1, resized to ``image_size`` x ``image_size``
    (bilinear), repeated over 3 channels and normalised with ``mean`` / ``std`` (by default the checkpoint's,
    :data:`LITE0_MEAN` / :data:`LITE0_STD`). Use it as the ``data_collator`` of a `transformers.Trainer` (with
    ``remove_unused_columns=False``), or as a `datasets` transform through :meth:`transform`.

    Args:
        image_size (`int`, *optional*, defaults to 64): output height and width, 16 to 224 (224 is the
            resolution the model was trained at; 64-96 is much faster on a CPU).
        mean (`Sequence[float]`, *optional*): per-channel mean on 0-1 pixels.
        std (`Sequence[float]`, *optional*): per-channel std on 0-1 pixels.
        image_column (`str`, *optional*, defaults to ``"image"``): the column with the images.
        label_column (`str`, *optional*, defaults to ``"label"``): the column with the labels, if any.
        invert (`bool`, *optional*, defaults to `False`): use ``255 - pixel`` (dark objects on a light
            background, closer to photos; the data sets here are light on dark).

    Example:

    ```python
    >>> import numpy as np
    >>> from tl_plugin.vision import GrayscaleImageCollator
    >>> collate = GrayscaleImageCollator(image_size=32)
    >>> black, white = np.zeros((8, 8), dtype=np.uint8), np.full((8, 8), 255, dtype=np.uint8)
    >>> rows = [{"image": black, "label": 3}, {"image": white, "label": 1}]
    >>> batch = collate(rows)
    >>> batch["pixel_values"].shape, batch["pixel_values"].dtype, batch["labels"].tolist()
    (torch.Size([2, 3, 32, 32]), torch.float32, [3, 1])

    ```
    """

    image_size: int = 64
    mean: Sequence[float] = LITE0_MEAN
    std: Sequence[float] = LITE0_STD
    image_column: str = "image"
    label_column: str = "label"
    invert: bool = False

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 224:
            raise ValueError(f"image_size must be between 16 and 224, got {self.image_size}.")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need 3 values each (std > 0), got {self.mean} and {self.std}.")

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """The normalised ``(batch, 3, image_size, image_size)`` float32 tensor of a list of 2-D images."""
        arrays = [torch.as_tensor(np.asarray(image), dtype=torch.float32) for image in images]
        shapes = {tuple(a.shape) for a in arrays}
        if any(len(s) != 2 for s in shapes):
            raise ValueError(f"expected 2-D grayscale images, got shapes {sorted(shapes)}.")
        if len(shapes) == 1:
            x = torch.stack(arrays).unsqueeze(1)
            x = self._resize(x)
        else:
            x = torch.cat([self._resize(a[None, None]) for a in arrays])
        x = x / 255.0
        if self.invert:
            x = 1.0 - x
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((x.expand(-1, 3, -1, -1) - mean) / std).contiguous()

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.image_size, self.image_size):
            return x
        size = (self.image_size, self.image_size)
        resized = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return resized.clamp_(0, 255)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": self.pixel_values([f[self.image_column] for f in features])}
        if features and self.label_column in features[0]:
            batch["labels"] = torch.as_tensor([int(f[self.label_column]) for f in features], dtype=torch.long)
        return batch

    def transform(self, examples: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        """A batched `datasets` transform (for ``dataset.with_transform(collator.transform)``).

        Returns ``pixel_values`` (a float tensor) and, when the examples have labels, ``labels``.
        """
        out: dict[str, Any] = {"pixel_values": self.pixel_values(examples[self.image_column])}
        if self.label_column in examples:
            out["labels"] = torch.as_tensor([int(v) for v in examples[self.label_column]], dtype=torch.long)
        return out

"""What the data package shares: the in-memory types, the train set's statistics and the
normalization they give, the data fingerprint, and the helpers and checks every file source uses.
"""

import dataclasses
import gzip
import hashlib
import pathlib
import zlib
from typing import Any, Protocol

import numpy as np


class DataError(Exception):
    """The data is missing, damaged or not what it claims to be; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset, held in memory.

    Attributes:
      images: uint8 array of shape (N, H, W, C).
      labels: int32 array of shape (N,).
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.ndim != 4 or self.labels.ndim != 1:
            raise ValueError(
                f"Split wants images (N, H, W, C) and labels (N,), got shapes "
                f"{self.images.shape} and {self.labels.shape}."
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"Split has {len(self.images)} images but {len(self.labels)} labels.")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset with its train and test splits and the train set's per-channel statistics.

    Attributes:
      name: the dataset's name, e.g. 'fashion_mnist'.
      train: the training split.
      test: the test split.
      num_classes: labels lie in [0, num_classes).
      mean: float32 array of shape (C,): per-channel mean of the train images scaled to [0, 1].
      std: float32 array of shape (C,): per-channel (population) standard deviation of the same.
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    mean: np.ndarray
    std: np.ndarray


class LocalFiles(Protocol):
    """A module that reads a published dataset from its authors' files in a directory."""

    def has_files(self, data_dir: pathlib.Path) -> bool:
        """Whether `data_dir` holds any of the dataset's files (so `load` should read them)."""

    def load(
        self, spec: "DatasetSpec", data_dir: pathlib.Path, how_to_get: str
    ) -> tuple[Split, Split]:
        """Reads the train and test splits; raises `DataError` ending in `how_to_get` if missing."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What is known in advance about a published dataset, and which module reads its files."""

    title: str  # For messages.
    tfds_name: str
    default_dir: str
    local_files: LocalFiles  # The module that reads its files: `idx` or `cifar`.
    image_shape: tuple[int, int, int]
    num_classes: int
    local_hint: str  # How to get the local files; `{data_dir}` is filled in.
    class_names: tuple[str, ...]  # By label, as the dataset's authors name them.


def data_fingerprint(dataset: Dataset) -> str:
    """Identifies the data a run trains on: split sizes and a SHA-256 of every image and label.

    Equal for the same data whatever its path or source (local files, TFDS), different when any
    byte differs; a resumed run compares it with the one saved in its checkpoint. Hashing
    Fashion-MNIST (55 MB in memory) takes a fraction of a second.
    """
    digest = hashlib.sha256(dataset.name.encode())
    for split in (dataset.train, dataset.test):
        for array in (split.images, split.labels):
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).data)
    return (
        f"{dataset.name}: {len(dataset.train.labels)} train and {len(dataset.test.labels)} test "
        f"examples, sha256 {digest.hexdigest()[:16]}"
    )


def normalize_images(images: Any, mean: np.ndarray, std: np.ndarray) -> Any:
    """uint8 (B, H, W, C) -> float32 (B, H, W, C): (images / 255 - mean) / std.

    `images` is a numpy array or a JAX array (traced too): the exported model applies this same
    function inside its graph, so serving normalizes exactly as training did.
    """
    std = np.asarray(std, np.float32)
    scale = 1.0 / (255.0 * std)
    shift = -np.asarray(mean, np.float32) / std
    return images.astype(np.float32) * scale + shift


# ----------------------------------------------------------------------------------------------
# Assembling a dataset from the splits a source read.


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of uint8 (N, H, W, C) images scaled to [0, 1].

    Computed exactly in float64 from a 256-bin histogram per channel, which avoids a float64 copy
    of the images (376 MB for Fashion-MNIST's train set).

    Returns:
      float32 mean and std, each of shape (C,).
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[-1]):
        counts = np.bincount(images[..., channel].ravel(), minlength=256).astype(np.float64)
        mean = counts @ values / counts.sum()
        means.append(mean)
        stds.append(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
    return np.array(means, np.float32), np.array(stds, np.float32)


def _readonly(array: np.ndarray) -> np.ndarray:
    # The frozen dataclasses can't stop in-place writes into the arrays; the read-only flag can.
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


def make_dataset(name: str, train: Split, test: Split, num_classes: int) -> Dataset:
    """Makes a `Dataset` of read-only arrays with the train set's channel statistics.

    Raises:
      DataError: the train split is empty or a channel of its images is constant.
    """
    if len(train.labels) == 0:
        raise DataError(f"The {name!r} training split is empty.")
    mean, std = _channel_stats(train.images)
    if np.any(std == 0):
        raise DataError(
            f"A channel of the {name!r} training images is constant (std {std}); they can't be "
            "normalized. The data is not a real image dataset."
        )
    return Dataset(
        name=name,
        train=Split(_readonly(train.images), _readonly(train.labels.astype(np.int32))),
        test=Split(_readonly(test.images), _readonly(test.labels.astype(np.int32))),
        num_classes=num_classes,
        mean=_readonly(mean),
        std=_readonly(std),
    )


# ----------------------------------------------------------------------------------------------
# Helpers the file sources share.


def read_file(path: pathlib.Path) -> bytes:
    """Returns the bytes of `path`, decompressed if its name ends in .gz.

    Raises:
      DataError: the file cannot be read or decompressed.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as file:
                return file.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        # gzip raises EOFError for a truncated file and BadGzipFile (an OSError) or zlib.error for a
        # damaged one.
        raise DataError(
            f"{path}: cannot read it ({type(err).__name__}: {err}). The file is truncated or "
            "damaged; get it again."
        ) from None


def check_labels(labels: np.ndarray, num_classes: int, where: object) -> None:
    """Raises `DataError`, naming `where`, unless every label lies in [0, num_classes)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{where}: labels range over [{labels.min()}, {labels.max()}], expected [0, "
            f"{num_classes - 1}]. The file is damaged or belongs to another dataset; get it again."
        )

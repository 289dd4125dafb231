"""Input pipeline: loads an image classification dataset into memory and batches it with numpy.

The datasets are small (at most 60000 images of 32x32x3 bytes), so each is held in memory as uint8
arrays and batched with numpy; no tf.data and no TensorFlow.

Where the data comes from (`config.source`):

* ``local``: the files as their authors publish them, in `config.data_dir`:
  MNIST and Fashion-MNIST as IDX files (``train-images-idx3-ubyte.gz`` etc., gzipped or not; the
  Debian package ``dataset-fashion-mnist`` installs them in /usr/share/datasets/fashion-mnist);
  CIFAR-10 in its binary version (``cifar-10-batches-bin/`` or ``cifar-10-binary.tar.gz``) or its
  python version (``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``).
* ``tfds``: TensorFlow Datasets, read through `DatasetBuilder.as_data_source`, which reads
  ``array_record`` files and decodes the PNG images with PIL: reading needs no TensorFlow.
  Preparing (downloading and writing) ``mnist``, ``fashion_mnist`` or ``cifar10`` does: their
  builders yield numpy images, which TFDS 4.9 encodes to PNG with TensorFlow.
* ``auto``: local files if there are any, else TFDS (downloading only if `config.tfds_download`).
* ``synthetic``: class templates plus noise, generated from a seed; for smoke tests.

Every problem with the data raises `DataError` with one message that names the file or directory
and says how to fix it.
"""

import dataclasses
import functools
import gzip
import hashlib
import importlib
import io
import os
import pathlib
import pickle
import posixpath
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
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


@dataclasses.dataclass(frozen=True)
class _DatasetSpec:
    """What is known in advance about a published dataset."""

    title: str  # For messages.
    tfds_name: str
    default_dir: str
    file_format: str  # 'idx' or 'cifar'.
    image_shape: tuple[int, int, int]
    num_classes: int
    local_hint: str  # How to get the local files; `{data_dir}` is filled in.
    class_names: tuple[str, ...]  # By label, as the dataset's authors name them.


_SPECS: dict[str, _DatasetSpec] = {
    "fashion_mnist": _DatasetSpec(
        title="Fashion-MNIST",
        tfds_name="fashion_mnist",
        default_dir="/usr/share/datasets/fashion-mnist",
        file_format="idx",
        image_shape=(28, 28, 1),
        num_classes=10,
        local_hint=(
            "install the Debian package (`sudo apt-get install dataset-fashion-mnist`; it puts the "
            "files in /usr/share/datasets/fashion-mnist)"
        ),
        class_names=(
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
        ),
    ),
    "mnist": _DatasetSpec(
        title="MNIST",
        tfds_name="mnist",
        default_dir="/usr/share/datasets/mnist",
        file_format="idx",
        image_shape=(28, 28, 1),
        num_classes=10,
        local_hint=(
            "put the four MNIST files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in {data_dir}"
        ),
        class_names=tuple(str(digit) for digit in range(10)),
    ),
    "cifar10": _DatasetSpec(
        title="CIFAR-10",
        tfds_name="cifar10",
        default_dir="~/.cache/jbn/cifar10",
        file_format="cifar",
        image_shape=(32, 32, 3),
        num_classes=10,
        local_hint=(
            "download cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
            "into {data_dir} (no need to unpack it)"
        ),
        class_names=(
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
    ),
}

_SOURCES = ("auto", "local", "tfds", "synthetic")


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """Loads the dataset that `config` (the `dataset` sub-config) names into memory.

    Args:
      config: fields `name` ('fashion_mnist', 'mnist', 'cifar10' or 'synthetic'), `source` ('auto',
        'local', 'tfds' or 'synthetic'), `data_dir` (None: the dataset's default directory),
        `tfds_data_dir` (None: TFDS's default), `tfds_download`, optional `tfds_name` (the TFDS
        builder to use instead of the dataset's own, e.g. 'fashion_mnist:3.0.1'), and for
        'synthetic' `synthetic_train_size`, `synthetic_test_size`, `synthetic_image_shape`
        (H, W, C), `synthetic_num_classes` and optional `synthetic_seed` (default 0).

    Returns:
      The dataset, with uint8 (N, H, W, C) images and int32 (N,) labels.

    Raises:
      DataError: the data is missing or damaged, or the config names no known dataset or source.
    """
    name = config.name
    source = config.get("source", "auto")
    if source not in _SOURCES:
        raise DataError(f"Unknown dataset source {source!r}: use one of {', '.join(_SOURCES)}.")
    if name == "synthetic":
        if source not in ("auto", "synthetic"):
            raise DataError(f"The synthetic dataset has no {source!r} source: use source='auto'.")
        return make_synthetic_dataset(
            train_size=config.synthetic_train_size,
            test_size=config.synthetic_test_size,
            image_shape=tuple(config.synthetic_image_shape),
            num_classes=config.synthetic_num_classes,
            seed=config.get("synthetic_seed", 0),
        )
    if name not in _SPECS:
        raise DataError(
            f"Unknown dataset {name!r}: use one of {', '.join([*_SPECS, 'synthetic'])}."
        )
    if source == "synthetic":
        raise DataError(f"source='synthetic' goes with name='synthetic', not {name!r}.")

    spec = _SPECS[name]
    data_dir = pathlib.Path(os.path.expanduser(config.get("data_dir") or spec.default_dir))
    tfds_name = config.get("tfds_name") or spec.tfds_name
    tfds_data_dir = config.get("tfds_data_dir")
    tfds_download = bool(config.get("tfds_download", False))
    how_to_get = _how_to_get(spec, data_dir)

    origin = f"TFDS dataset {tfds_name!r}"
    if source == "local" or (source == "auto" and _has_local_files(spec, data_dir)):
        origin = str(data_dir)
        train, test = _load_local(spec, data_dir, how_to_get)
    elif source == "tfds":
        train, test = _load_tfds(spec, tfds_name, tfds_data_dir, tfds_download, how_to_get)
    else:
        try:
            train, test = _load_tfds(spec, tfds_name, tfds_data_dir, tfds_download, how_to_get)
        except DataError as err:
            raise DataError(f"No {spec.title} files in {data_dir}, and {err}") from None

    for split_name, split in (("train", train), ("test", test)):
        if split.images.shape[1:] != spec.image_shape:
            raise DataError(
                f"{spec.title} {split_name} images have shape {split.images.shape[1:]}, expected "
                f"{spec.image_shape}: the data in {origin} is not {spec.title}."
            )
    return _make_dataset(name, train, test, spec.num_classes)


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


def class_names(dataset: Dataset) -> tuple[str, ...]:
    """The name of each label of `dataset`; 'class 0', 'class 1', ... for the synthetic data."""
    spec = _SPECS.get(dataset.name)
    if spec is not None and len(spec.class_names) == dataset.num_classes:
        return spec.class_names
    return tuple(f"class {label}" for label in range(dataset.num_classes))


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
    """Returns how many full batches of `batch_size` one epoch of `train_batches` yields."""
    num_train = len(dataset.train.labels)
    if not 1 <= batch_size <= num_train:
        raise ValueError(
            f"batch_size must be between 1 and the {num_train} training examples of "
            f"{dataset.name!r}, got batch_size={batch_size}."
        )
    return num_train // batch_size


def train_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
    augment: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields one epoch of shuffled training batches, dropping the incomplete last batch.

    The order (and the augmentation) depends only on (seed, epoch), so an interrupted epoch resumes
    exactly with `start_step`, which skips the first `start_step` batches without computing them.

    Args:
      dataset: the dataset.
      batch_size: examples per batch, 1 <= batch_size <= number of training examples.
      seed: non-negative seed of the shuffling and augmentation.
      epoch: non-negative epoch number; every epoch has its own order.
      start_step: the first batch to yield, 0 <= start_step <= steps_per_epoch.
      augment: pad each image with 4 zero (black) pixels on every side, take a random crop of the
        original size, and flip it horizontally with probability 1/2 (the CIFAR-10 augmentation of
        He et al., 2016). Meant for CIFAR-10; it runs on any data, but flipping digits or shoes
        does not suit them.

    Yields:
      Dicts with 'image': float32 (batch_size, H, W, C), normalized by the dataset's mean and std,
      and 'label': int32 (batch_size,).

    Raises:
      ValueError: batch_size, start_step, seed or epoch out of range (raised by the call, not by
        the first `next`).
    """
    num_steps = steps_per_epoch(dataset, batch_size)
    if not 0 <= start_step <= num_steps:
        raise ValueError(f"start_step must be between 0 and {num_steps}, got {start_step}.")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}.")
    return _train_batches(dataset, batch_size, num_steps, seed, epoch, start_step, augment)


def eval_batches(dataset: Dataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Yields every test example exactly once, in order, padding the last batch.

    Yields:
      Dicts with 'image': float32 (batch_size, H, W, C), normalized by the dataset's mean and std
      (padding images are zeros), 'label': int32 (batch_size,) (padding labels are 0), and 'mask':
      bool (batch_size,), True for real examples and False for padding.

    Raises:
      ValueError: batch_size < 1 (raised by the call, not by the first `next`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got batch_size={batch_size}.")
    return _eval_batches(dataset, batch_size)


def make_synthetic_dataset(
    *,
    train_size: int,
    test_size: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    seed: int = 0,
) -> Dataset:
    """Makes a deterministic, learnable dataset: per-class template images plus noise.

    Each class has a template with pixels drawn uniformly from [0.2, 0.8]; an image is its class's
    template plus Gaussian noise of standard deviation 0.25, clipped to [0, 1] and stored as uint8.
    The nearest template tells the class almost always (for images of 64 pixels or more), so a
    small model learns it quickly. Classes are balanced, and the test split does not depend on the
    train size.
    """
    if train_size < 1 or test_size < 0 or num_classes < 2 or len(image_shape) != 3:
        raise DataError(
            "The synthetic dataset wants synthetic_train_size >= 1, synthetic_test_size >= 0, "
            "synthetic_num_classes >= 2 and synthetic_image_shape (H, W, C), got "
            f"{train_size}, {test_size}, {num_classes} and {image_shape}."
        )
    # Separate streams, so that the test set is the same whatever the train size.
    templates_seq, train_seq, test_seq = np.random.SeedSequence(seed).spawn(3)
    templates = np.random.default_rng(templates_seq).uniform(
        0.2, 0.8, size=(num_classes, *image_shape)
    )

    def make_split(size: int, seed_seq: np.random.SeedSequence) -> Split:
        rng = np.random.default_rng(seed_seq)
        labels = rng.permutation(np.arange(size) % num_classes).astype(np.int32)
        noise = rng.standard_normal(size=(size, *image_shape), dtype=np.float32)
        images = np.clip(templates[labels] + 0.25 * noise, 0.0, 1.0)
        return Split(images=np.round(images * 255).astype(np.uint8), labels=labels)

    train = make_split(train_size, train_seq)
    test = make_split(test_size, test_seq)
    return _make_dataset("synthetic", train, test, num_classes)


# ----------------------------------------------------------------------------------------------
# Batching.

# Streams of randomness derived from (seed, epoch).
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1
_CROP_PADDING = 4


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    # spawn_key gives independent streams per (epoch, purpose) from one seed.
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch, stream)))


def normalize_images(images: Any, mean: np.ndarray, std: np.ndarray) -> Any:
    """uint8 (B, H, W, C) -> float32 (B, H, W, C): (images / 255 - mean) / std.

    `images` is a numpy array or a JAX array (traced too): the exported model applies this same
    function inside its graph, so serving normalizes exactly as training did.
    """
    std = np.asarray(std, np.float32)
    scale = 1.0 / (255.0 * std)
    shift = -np.asarray(mean, np.float32) / std
    return images.astype(np.float32) * scale + shift


def _crop_and_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Random-crops zero-padded images and flips some, in one gather.

    Args:
      images: uint8 (B, H, W, C).
      offsets: int (B, 2): row and column of each crop's top-left corner in the padded image,
        in [0, 2 * _CROP_PADDING].
      flips: bool (B,): whether to flip each crop horizontally.

    Returns:
      uint8 (B, H, W, C).
    """
    batch, height, width, _ = images.shape
    pad = _CROP_PADDING
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(height)
    columns = np.where(flips[:, None], np.arange(width)[::-1], np.arange(width))
    columns = offsets[:, 1, None] + columns
    return padded[np.arange(batch)[:, None, None], rows[:, :, None], columns[:, None, :]]


def _train_batches(
    dataset: Dataset,
    batch_size: int,
    num_steps: int,
    seed: int,
    epoch: int,
    start_step: int,
    augment: bool,
) -> Iterator[dict[str, np.ndarray]]:
    num_train = len(dataset.train.labels)
    order = _epoch_rng(seed, epoch, _ORDER_STREAM).permutation(num_train)
    if augment:
        # Drawn for the whole epoch up front, indexed by position in the epoch, so that a resumed
        # epoch gets the same crops and flips as an uninterrupted one.
        rng = _epoch_rng(seed, epoch, _AUGMENT_STREAM)
        offsets = rng.integers(0, 2 * _CROP_PADDING + 1, size=(num_train, 2))
        flips = rng.random(num_train) < 0.5
    for step in range(start_step, num_steps):
        positions = slice(step * batch_size, (step + 1) * batch_size)
        indices = order[positions]
        images = dataset.train.images[indices]
        if augment:
            images = _crop_and_flip(images, offsets[positions], flips[positions])
        yield {
            "image": normalize_images(images, dataset.mean, dataset.std),
            "label": dataset.train.labels[indices].astype(np.int32),
        }


def _eval_batches(dataset: Dataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    test = dataset.test
    for start in range(0, len(test.labels), batch_size):
        images = normalize_images(
            test.images[start : start + batch_size], dataset.mean, dataset.std
        )
        labels = test.labels[start : start + batch_size].astype(np.int32)
        num_real = len(labels)
        num_padding = batch_size - num_real
        if num_padding:
            images = np.concatenate(
                [images, np.zeros((num_padding, *images.shape[1:]), np.float32)]
            )
            labels = np.concatenate([labels, np.zeros(num_padding, np.int32)])
        yield {"image": images, "label": labels, "mask": np.arange(batch_size) < num_real}


# ----------------------------------------------------------------------------------------------
# Assembling a dataset.


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


def _make_dataset(name: str, train: Split, test: Split, num_classes: int) -> Dataset:
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


def _how_to_get(spec: _DatasetSpec, data_dir: pathlib.Path) -> str:
    return (
        f"To get {spec.title}: {spec.local_hint.format(data_dir=data_dir)} "
        "(or set --config.dataset.data_dir to where the files are); or let TFDS download and "
        "prepare it with --config.dataset.tfds_download=True (source 'auto' or 'tfds'), which "
        f"needs internet access and, to prepare '{spec.tfds_name}', TensorFlow "
        "(pip install 'jbn[tensorflow]')."
    )


def _check_labels(labels: np.ndarray, num_classes: int, where: object) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{where}: labels range over [{labels.min()}, {labels.max()}], expected [0, "
            f"{num_classes - 1}]. The file is damaged or belongs to another dataset; get it again."
        )


def _has_local_files(spec: _DatasetSpec, data_dir: pathlib.Path) -> bool:
    if spec.file_format == "idx":
        return any(_find_idx_file(data_dir, stem) for pair in _IDX_FILES.values() for stem in pair)
    return _find_cifar_source(data_dir) is not None


def _load_local(spec: _DatasetSpec, data_dir: pathlib.Path, how_to_get: str) -> tuple[Split, Split]:
    if spec.file_format == "idx":
        return _load_idx_dataset(spec, data_dir, how_to_get)
    return _load_cifar(spec, data_dir, how_to_get)


# ----------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST).
#
# Parsed with numpy: the format is a 4-byte magic number, one big-endian uint32 per dimension, and
# the raw values, and no maintained library reads it without pulling in a framework.

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The magic number's third byte gives the type of the values.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _find_idx_file(data_dir: pathlib.Path, stem: str) -> pathlib.Path | None:
    for path in (data_dir / f"{stem}.gz", data_dir / stem):
        if path.is_file():
            return path
    return None


def _read_file(path: pathlib.Path) -> bytes:
    """Returns the bytes of `path`, decompressed if its name ends in .gz."""
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


def parse_idx(data: bytes, where: object) -> np.ndarray:
    """Parses the contents of an IDX file into an array with the header's shape and dtype.

    Args:
      data: the file's bytes (decompressed).
      where: the file, for error messages.

    Raises:
      DataError: bad magic number or dtype code, or a length that disagrees with the header.
    """
    damaged = "The file is damaged or not an IDX file; get it again."
    if len(data) < 4:
        raise DataError(f"{where}: {len(data)} bytes is too short for an IDX header. {damaged}")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{where}: bad magic number 0x{data[:4].hex()}, IDX files start with two zero bytes. "
            f"{damaged}"
        )
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise DataError(f"{where}: unknown IDX value type 0x{dtype_code:02x}. {damaged}")
    dtype = _IDX_DTYPES[dtype_code]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(
            f"{where}: {len(data)} bytes is too short for an IDX header of {ndim} dimensions. "
            f"The file is truncated; get it again."
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected_size = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected_size:
        problem = "truncated" if len(data) < expected_size else "longer than its header says"
        raise DataError(
            f"{where}: the header gives shape {shape} of {dtype}, i.e. {expected_size} bytes, but "
            f"the file has {len(data)} bytes. The file is {problem}; get it again."
        )
    return np.frombuffer(data, dtype, offset=header_size).reshape(shape)


def _load_idx_split(
    images_path: pathlib.Path, labels_path: pathlib.Path, spec: _DatasetSpec
) -> Split:
    images = parse_idx(_read_file(images_path), images_path)
    labels = parse_idx(_read_file(labels_path), labels_path)
    height, width, _ = spec.image_shape
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (height, width):
        raise DataError(
            f"{images_path}: holds {images.dtype} values of shape {images.shape}, expected uint8 "
            f"images of shape (N, {height}, {width}). It is not a {spec.title} images file."
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{labels_path}: holds {labels.dtype} values of shape {labels.shape}, expected uint8 "
            f"labels of shape (N,). It is not a {spec.title} labels file."
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels. "
            "One of them is from another dataset or damaged; get both again."
        )
    _check_labels(labels, spec.num_classes, labels_path)
    return Split(images=images[..., None], labels=labels.astype(np.int32))


def _load_idx_dataset(
    spec: _DatasetSpec, data_dir: pathlib.Path, how_to_get: str
) -> tuple[Split, Split]:
    stems = [stem for pair in _IDX_FILES.values() for stem in pair]
    paths = {stem: _find_idx_file(data_dir, stem) for stem in stems}
    missing = [stem for stem, path in paths.items() if path is None]
    if missing:
        raise DataError(
            f"No {spec.title} file {' or '.join(f'{s}[.gz]' for s in missing)} in {data_dir}. "
            f"{how_to_get}"
        )
    return tuple(
        _load_idx_split(paths[images_stem], paths[labels_stem], spec)
        for images_stem, labels_stem in _IDX_FILES.values()
    )


# ----------------------------------------------------------------------------------------------
# CIFAR-10.
#
# The binary version is parsed with numpy: each batch is 10000 records of one label byte and 3072
# pixel bytes (1024 red, then green, then blue, each row-major), and no maintained library reads
# it without pulling in a framework.

_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCHES = ("test_batch",)
_CIFAR_PIXELS = 32 * 32 * 3
_CIFAR_RECORD_SIZE = 1 + _CIFAR_PIXELS


@dataclasses.dataclass(frozen=True)
class _CifarSource:
    path: pathlib.Path  # A directory of batches or a .tar.gz archive of them.
    version: str  # 'bin' (batches named data_batch_1.bin etc.) or 'py' (pickles data_batch_1 etc.)


def _find_cifar_source(data_dir: pathlib.Path) -> _CifarSource | None:
    """Finds CIFAR-10 in `data_dir`, preferring the binary version: it needs no unpickling."""
    candidates = (
        _CifarSource(data_dir / "cifar-10-batches-bin", "bin"),
        _CifarSource(data_dir, "bin"),
        _CifarSource(data_dir / "cifar-10-binary.tar.gz", "bin"),
        _CifarSource(data_dir / "cifar-10-batches-py", "py"),
        _CifarSource(data_dir, "py"),
        _CifarSource(data_dir / "cifar-10-python.tar.gz", "py"),
    )
    for source in candidates:
        if source.path.name.endswith(".tar.gz"):
            if source.path.is_file():
                return source
        elif (source.path / _cifar_file_name("data_batch_1", source.version)).is_file():
            return source
    return None


def _cifar_file_name(batch: str, version: str) -> str:
    return f"{batch}.bin" if version == "bin" else batch


def _read_tar_members(archive: pathlib.Path, names: set[str]) -> dict[str, bytes]:
    """Reads the files called `names` (base names) from a .tar.gz archive.

    Reads them in one pass straight from the archive: nothing is written to disk, so the archive's
    paths can't escape anywhere.
    """
    contents = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = posixpath.basename(member.name)
                if member.isfile() and name in names and name not in contents:
                    contents[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{archive}: cannot read the archive ({type(err).__name__}: {err}). It is truncated "
            "or damaged; delete it and download it again."
        ) from None
    missing = sorted(names - contents.keys())
    if missing:
        raise DataError(
            f"{archive}: the archive lacks {', '.join(missing)}. It is not the CIFAR-10 archive "
            "it is named after; delete it and download it again."
        )
    return contents


def _parse_cifar_binary(data: bytes, where: object) -> tuple[np.ndarray, np.ndarray]:
    """Parses a binary CIFAR-10 batch into uint8 (N, 32, 32, 3) images and uint8 (N,) labels."""
    if not data or len(data) % _CIFAR_RECORD_SIZE:
        raise DataError(
            f"{where}: {len(data)} bytes is not a whole number of {_CIFAR_RECORD_SIZE}-byte "
            "CIFAR-10 records. The file is truncated or damaged; get it again."
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD_SIZE)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, records[:, 0]


@functools.cache
def _allowed_pickle_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR-10 pickle may name: what rebuilding plain numpy arrays needs.

    Keys are spelled as numpy 1 (numpy.core) and numpy 2 (numpy._core) pickle them; values are
    taken from the numpy that is installed.
    """

    def numpy_internal(module: str, name: str) -> object:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 deprecates numpy.core.
            for package in ("numpy._core", "numpy.core"):
                try:
                    return getattr(importlib.import_module(f"{package}.{module}"), name)
                except (ImportError, AttributeError):
                    continue
        raise ImportError(f"numpy has no {module}.{name}")

    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Pickle protocols <= 2 store bytes as _codecs.encode(str, 'latin1'): a pure conversion.
        ("_codecs", "encode"): __import__("codecs").encode,
    }
    for module, name in (
        ("multiarray", "_reconstruct"),  # ndarray.__reduce__, protocols <= 4.
        ("multiarray", "scalar"),  # numpy scalars, e.g. a numpy int label.
        ("numeric", "_frombuffer"),  # ndarray.__reduce_ex__, protocol 5.
    ):
        function = numpy_internal(module, name)
        for package in ("numpy._core", "numpy.core"):
            allowed[(f"{package}.{module}", name)] = function
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and builtin containers and nothing else.

    Unpickling calls whatever callables the pickle names, so an arbitrary pickle can run arbitrary
    code. `find_class` is where every named callable is looked up; it allows only the few numpy
    functions that rebuild arrays (lists, dicts, str, bytes and ints need no lookup).
    """

    def __init__(self, file: io.BufferedIOBase, where: object):
        # CIFAR-10's pickles were written by Python 2; 'bytes' keeps their str keys as bytes.
        super().__init__(file, encoding="bytes")
        self._where = where

    def find_class(self, module: str, name: str) -> object:
        allowed = _allowed_pickle_globals().get((module, name))
        if allowed is None:
            raise DataError(
                f"{self._where}: refused to unpickle {module}.{name}. CIFAR-10 batches hold only "
                "numpy arrays, lists and dicts, and loading anything else could run code. The "
                "file is not a genuine CIFAR-10 batch; delete it and download it again."
            )
        return allowed


def _parse_cifar_pickle(data: bytes, where: object) -> tuple[np.ndarray, np.ndarray]:
    """Parses a python-version CIFAR-10 batch into uint8 (N, 32, 32, 3) and (N,) labels."""
    damaged = "The file is truncated or damaged; get it again."
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(data), where).load()
    except DataError:
        raise
    except Exception as err:
        # Unpickling a malformed stream can raise almost any exception type.
        raise DataError(
            f"{where}: cannot unpickle it ({type(err).__name__}: {err}). {damaged}"
        ) from None
    if not isinstance(batch, dict):
        raise DataError(f"{where}: holds a {type(batch).__name__}, not a CIFAR-10 batch dict.")
    pixels = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise DataError(f"{where}: 'data' is not a uint8 (N, {_CIFAR_PIXELS}) array. {damaged}")
    if pixels.shape[1] != _CIFAR_PIXELS:
        raise DataError(
            f"{where}: 'data' has shape {pixels.shape}, expected (N, {_CIFAR_PIXELS}). {damaged}"
        )
    labels = np.asarray(labels if labels is not None else [])
    if labels.dtype.kind not in "iu" or labels.shape != (len(pixels),):
        raise DataError(
            f"{where}: 'labels' should be {len(pixels)} integers, got {labels.dtype} of shape "
            f"{labels.shape}. {damaged}"
        )
    return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _load_cifar(spec: _DatasetSpec, data_dir: pathlib.Path, how_to_get: str) -> tuple[Split, Split]:
    source = _find_cifar_source(data_dir)
    if source is None:
        raise DataError(
            f"No CIFAR-10 in {data_dir} (looked for cifar-10-batches-bin/, "
            f"cifar-10-binary.tar.gz, cifar-10-batches-py/ and cifar-10-python.tar.gz). "
            f"{how_to_get}"
        )
    batches = _CIFAR_TRAIN_BATCHES + _CIFAR_TEST_BATCHES
    file_names = {batch: _cifar_file_name(batch, source.version) for batch in batches}
    read: Callable[[str], bytes]
    if source.path.is_dir():

        def read(file_name: str) -> bytes:
            path = source.path / file_name
            if not path.is_file():
                raise DataError(f"No {path}: the CIFAR-10 copy is incomplete. {how_to_get}")
            return _read_file(path)

        where = {batch: source.path / name for batch, name in file_names.items()}
    else:
        contents = _read_tar_members(source.path, set(file_names.values()))
        read = contents.__getitem__
        where = {batch: f"{source.path}:{name}" for batch, name in file_names.items()}

    parse = _parse_cifar_binary if source.version == "bin" else _parse_cifar_pickle

    def load_split(split_batches: tuple[str, ...]) -> Split:
        images, labels = [], []
        for batch in split_batches:
            batch_images, batch_labels = parse(read(file_names[batch]), where[batch])
            _check_labels(batch_labels, spec.num_classes, where[batch])
            images.append(batch_images)
            labels.append(batch_labels)
        return Split(images=np.concatenate(images), labels=np.concatenate(labels).astype(np.int32))

    return load_split(_CIFAR_TRAIN_BATCHES), load_split(_CIFAR_TEST_BATCHES)


# ----------------------------------------------------------------------------------------------
# TensorFlow Datasets.

_TFDS_READ_CHUNK = 10_000  # Examples decoded per read, to bound the memory of decoded dicts.


def _tfds_failure(err: BaseException) -> str:
    """Says why TFDS failed, naming a missing module if that was the cause."""
    cause: BaseException | None = err
    seen = set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ModuleNotFoundError) and cause.name:
            if cause.name.split(".")[0] == "tensorflow":
                return "preparing it needs TensorFlow, which is not installed"
            note = ""
            if cause.name == "importlib_resources":
                note = " (TFDS 4.9 needs it but does not declare it: tensorflow/datasets#11212)"
            return (
                f"TFDS needs the Python module {cause.name!r}, which is not installed; "
                f"pip install {cause.name}{note}"
            )
        cause = cause.__cause__ or cause.__context__
    # TFDS often wraps errors; the innermost says what went wrong, the first line is enough.
    innermost = err
    while innermost.__cause__ is not None and innermost.__cause__ is not err:
        innermost = innermost.__cause__
    first_line = (str(innermost).strip().splitlines() or [""])[0][:300]
    return f"{type(innermost).__name__}: {first_line}"


def _read_data_source(source: object, tfds_name: str, split: str) -> Split:
    """Reads every example of a TFDS data source into uint8 (N, H, W, C) and int32 (N,)."""
    images, labels = [], []
    for start in range(0, len(source), _TFDS_READ_CHUNK):
        stop = min(start + _TFDS_READ_CHUNK, len(source))
        for example in source.__getitems__(list(range(start, stop))):
            images.append(example["image"])
            labels.append(example["label"])
    if not images:
        raise DataError(f"TFDS dataset {tfds_name!r} has an empty {split!r} split.")
    return Split(images=np.stack(images).astype(np.uint8), labels=np.asarray(labels, np.int32))


def _load_tfds(
    spec: _DatasetSpec,
    tfds_name: str,
    data_dir: str | None,
    download: bool,
    how_to_get: str,
) -> tuple[Split, Split]:
    # Imported here: importing TFDS takes a while, and only this path needs it.
    import tensorflow_datasets as tfds

    where = f"TFDS dataset {tfds_name!r}"
    try:
        # as_data_source reads array_record files (random access, no TensorFlow); TFDS's default
        # format is tfrecord, so ask for array_record when preparing.
        builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
        where = f"{where} in {builder.data_dir}"
        if not builder.is_prepared():
            if not download:
                raise DataError(f"{where} is not prepared, and downloading is off. {how_to_get}")
            builder.download_and_prepare()
        sources = builder.as_data_source()
        splits = []
        for split in ("train", "test"):
            if split not in sources:
                raise DataError(f"{where} has no {split!r} split.")
            split_data = _read_data_source(sources[split], tfds_name, split)
            _check_labels(split_data.labels, spec.num_classes, f"{where}, split {split!r}")
            splits.append(split_data)
    except DataError:
        raise
    except Exception as err:
        # TFDS raises many types here (ImportError, NotImplementedError, AssertionError, OSError,
        # download errors); all mean the same to the user: the data could not be had this way.
        raise DataError(
            f"{where} could not be prepared or read: {_tfds_failure(err)}. {how_to_get}"
        ) from None
    return splits[0], splits[1]


__all__ = [
    "DataError",
    "Dataset",
    "Split",
    "class_names",
    "eval_batches",
    "load_dataset",
    "make_synthetic_dataset",
    "normalize_images",
    "parse_idx",
    "steps_per_epoch",
    "train_batches",
]

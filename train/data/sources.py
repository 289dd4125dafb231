"""Where a dataset comes from: the table of the published datasets, and `load_dataset`.

`config.source` says where to read it:

* ``local``: the files as their authors publish them, in `config.data_dir`: MNIST and
  Fashion-MNIST as IDX files (``train-images-idx3-ubyte.gz`` etc., gzipped or not; the Debian
  package ``dataset-fashion-mnist`` installs them in /usr/share/datasets/fashion-mnist), read by
  `idx`; CIFAR-10 in its binary or python version, read by `cifar`.
* ``tfds``: TensorFlow Datasets, read by `tfds` (reading needs no TensorFlow, preparing does).
* ``auto``: local files if there are any, else TFDS (downloading only if `config.tfds_download`).
* ``synthetic``: class templates plus noise, generated from a seed by `synthetic`; for smoke tests.
"""

import os
import pathlib

import ml_collections

from train.data import cifar, idx, synthetic, tfds
from train.data.dataset import DataError, Dataset, DatasetSpec, make_dataset

# Every published dataset `load_dataset` knows: what it is, where its files are by default, the
# module that reads them, and its TFDS builder. A new dataset is a new row (and a new module if its
# files have a format of their own).
DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        title="Fashion-MNIST",
        tfds_name="fashion_mnist",
        default_dir="/usr/share/datasets/fashion-mnist",
        local_files=idx,
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
    "mnist": DatasetSpec(
        title="MNIST",
        tfds_name="mnist",
        default_dir="/usr/share/datasets/mnist",
        local_files=idx,
        image_shape=(28, 28, 1),
        num_classes=10,
        local_hint=(
            "put the four MNIST files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in {data_dir}"
        ),
        class_names=tuple(str(digit) for digit in range(10)),
    ),
    "cifar10": DatasetSpec(
        title="CIFAR-10",
        tfds_name="cifar10",
        default_dir="~/.cache/jbn/cifar10",
        local_files=cifar,
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
        return synthetic.load(config)
    if name not in DATASETS:
        raise DataError(
            f"Unknown dataset {name!r}: use one of {', '.join([*DATASETS, 'synthetic'])}."
        )
    if source == "synthetic":
        raise DataError(f"source='synthetic' goes with name='synthetic', not {name!r}.")

    spec = DATASETS[name]
    data_dir = pathlib.Path(os.path.expanduser(config.get("data_dir") or spec.default_dir))
    tfds_name = config.get("tfds_name") or spec.tfds_name
    tfds_data_dir = config.get("tfds_data_dir")
    tfds_download = bool(config.get("tfds_download", False))
    how_to_get = _how_to_get(spec, data_dir)

    origin = f"TFDS dataset {tfds_name!r}"
    if source == "local" or (source == "auto" and spec.local_files.has_files(data_dir)):
        origin = str(data_dir)
        train, test = spec.local_files.load(spec, data_dir, how_to_get)
    elif source == "tfds":
        train, test = tfds.load(spec, tfds_name, tfds_data_dir, tfds_download, how_to_get)
    else:
        try:
            train, test = tfds.load(spec, tfds_name, tfds_data_dir, tfds_download, how_to_get)
        except DataError as err:
            raise DataError(f"No {spec.title} files in {data_dir}, and {err}") from None

    for split_name, split in (("train", train), ("test", test)):
        if split.images.shape[1:] != spec.image_shape:
            raise DataError(
                f"{spec.title} {split_name} images have shape {split.images.shape[1:]}, expected "
                f"{spec.image_shape}: the data in {origin} is not {spec.title}."
            )
    return make_dataset(name, train, test, spec.num_classes)


def class_names(dataset: Dataset) -> tuple[str, ...]:
    """The name of each label of `dataset`; 'class 0', 'class 1', ... for the synthetic data."""
    spec = DATASETS.get(dataset.name)
    if spec is not None and len(spec.class_names) == dataset.num_classes:
        return spec.class_names
    return tuple(f"class {label}" for label in range(dataset.num_classes))


def _how_to_get(spec: DatasetSpec, data_dir: pathlib.Path) -> str:
    return (
        f"To get {spec.title}: {spec.local_hint.format(data_dir=data_dir)} "
        "(or set --config.dataset.data_dir to where the files are); or let TFDS download and "
        "prepare it with --config.dataset.tfds_download=True (source 'auto' or 'tfds'), which "
        f"needs internet access and, to prepare '{spec.tfds_name}', TensorFlow "
        "(pip install 'jbn[tensorflow]')."
    )

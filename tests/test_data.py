"""Tests of train/data/ against files written here to the published formats."""

import gzip
import io
import os
import pathlib
import pickle
import struct
import tarfile

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from train.data import (
    DataError,
    Dataset,
    Split,
    data_fingerprint,
    eval_batches,
    load_dataset,
    steps_per_epoch,
    train_batches,
)

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")


def make_config(**fields) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {
            "name": "fashion_mnist",
            "source": "local",
            "data_dir": None,
            "tfds_data_dir": None,
            "tfds_download": False,
            "synthetic_train_size": 8,
            "synthetic_test_size": 4,
            "synthetic_image_shape": (8, 8, 1),
            "synthetic_num_classes": 4,
            "augment": False,
        }
    )
    config.update(fields)
    return config


# ----------------------------------------------------------------------------------------------
# IDX (MNIST layout).


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: 0, 0, type 0x08, ndim, big-endian uint32 dims, values."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_file(path: pathlib.Path, data: bytes) -> None:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_idx_dataset(directory: pathlib.Path, *, gz: bool = True, sizes=(23, 7), seed=0):
    """Writes MNIST-layout files of random images; returns {split: (images, labels)}."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for (split, (images_stem, labels_stem)), size in zip(IDX_STEMS.items(), sizes, strict=True):
        images = rng.integers(0, 256, size=(size, 28, 28), dtype=np.uint8)
        labels = (np.arange(size) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_file(directory / f"{images_stem}{suffix}", idx_bytes(images))
        write_file(directory / f"{labels_stem}{suffix}", idx_bytes(labels))
        written[split] = (images, labels)
    return written


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_idx_round_trip(tmp_path, gz):
    written = write_idx_dataset(tmp_path, gz=gz)

    dataset = load_dataset(make_config(data_dir=str(tmp_path)))

    assert dataset.name == "fashion_mnist"
    assert dataset.num_classes == 10
    for split_name, split in (("train", dataset.train), ("test", dataset.test)):
        images, labels = written[split_name]
        assert split.images.dtype == np.uint8
        assert split.labels.dtype == np.int32
        np.testing.assert_array_equal(split.images, images[..., None])
        np.testing.assert_array_equal(split.labels, labels)
    train_images = written["train"][0].astype(np.float64) / 255
    assert dataset.mean.dtype == np.float32 and dataset.mean.shape == (1,)
    np.testing.assert_allclose(dataset.mean, [train_images.mean()], rtol=1e-6)
    np.testing.assert_allclose(dataset.std, [train_images.std()], rtol=1e-6)


@pytest.mark.parametrize("damage", ["short_payload", "cut_gzip_stream", "cut_header"])
def test_idx_truncated_file_raises_naming_it(tmp_path, damage):
    written = write_idx_dataset(tmp_path)
    damaged = tmp_path / "train-images-idx3-ubyte.gz"
    data = idx_bytes(written["train"][0])
    if damage == "short_payload":
        damaged.write_bytes(gzip.compress(data[:-100]))
    elif damage == "cut_header":
        damaged.write_bytes(gzip.compress(data[:10]))
    else:
        compressed = gzip.compress(data)
        damaged.write_bytes(compressed[: len(compressed) // 2])

    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz") as info:
        load_dataset(make_config(data_dir=str(tmp_path)))
    assert "truncated" in str(info.value)


def test_idx_bad_magic_raises_naming_file(tmp_path):
    written = write_idx_dataset(tmp_path, gz=False)
    data = bytearray(idx_bytes(written["test"][1]))
    data[0:2] = b"PK"
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(data))

    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*magic"):
        load_dataset(make_config(data_dir=str(tmp_path)))


def test_idx_count_mismatch_raises_naming_both_files(tmp_path):
    written = write_idx_dataset(tmp_path)
    write_file(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(written["train"][1][:-1]))

    with pytest.raises(DataError) as info:
        load_dataset(make_config(data_dir=str(tmp_path)))
    assert "train-images-idx3-ubyte.gz has 23 images" in str(info.value)
    assert "train-labels-idx1-ubyte.gz has 22 labels" in str(info.value)


def test_idx_label_out_of_range_raises_naming_file(tmp_path):
    written = write_idx_dataset(tmp_path)
    labels = written["test"][1].copy()
    labels[3] = 10
    write_file(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(labels))

    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: labels range over \[0, 10\]"):
        load_dataset(make_config(data_dir=str(tmp_path)))


def test_data_fingerprint_follows_the_content_not_the_files(tmp_path):
    """Same images and labels in other files (raw vs gzip): equal. One pixel or label: differs."""
    write_idx_dataset(tmp_path / "gz", gz=True, seed=3)
    written = write_idx_dataset(tmp_path / "raw", gz=False, seed=3)
    fingerprints = {
        name: data_fingerprint(load_dataset(make_config(data_dir=str(tmp_path / name))))
        for name in ("gz", "raw")
    }
    assert fingerprints["gz"] == fingerprints["raw"]
    assert fingerprints["gz"].startswith("fashion_mnist: 23 train and 7 test examples, sha256 ")

    images, labels = written["test"]
    for changed_images, changed_labels in ((images.copy(), labels), (images, labels.copy())):
        if changed_images is not images:
            changed_images[6, 27, 27] ^= 1
        else:
            changed_labels[6] = (changed_labels[6] + 1) % 10
        directory = tmp_path / f"changed_{len(fingerprints)}"
        write_idx_dataset(directory, gz=True, seed=3)
        write_file(directory / "t10k-images-idx3-ubyte.gz", idx_bytes(changed_images))
        write_file(directory / "t10k-labels-idx1-ubyte.gz", idx_bytes(changed_labels))
        fingerprints[directory.name] = data_fingerprint(
            load_dataset(make_config(data_dir=str(directory)))
        )
    assert len(set(fingerprints.values())) == 3


def test_real_fashion_mnist():
    dataset = load_dataset(make_config(source="auto"))

    assert dataset.train.images.shape == (60000, 28, 28, 1)
    assert dataset.test.images.shape == (10000, 28, 28, 1)
    assert dataset.train.images.dtype == np.uint8
    assert dataset.train.labels.shape == (60000,) and dataset.train.labels.dtype == np.int32
    # Fashion-MNIST is balanced: 6000 train and 1000 test images of each of the 10 classes.
    np.testing.assert_array_equal(np.bincount(dataset.train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(dataset.test.labels), [1000] * 10)
    # The commonly quoted statistics of the train set.
    np.testing.assert_allclose(dataset.mean, [0.2860], atol=1e-4)
    np.testing.assert_allclose(dataset.std, [0.3530], atol=1e-4)


# ----------------------------------------------------------------------------------------------
# CIFAR-10.


def random_cifar(num_batches: int, per_batch: int, seed: int):
    """Random HWC uint8 images and labels, split into batches."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num_batches, per_batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(num_batches, per_batch)).astype(np.uint8)
    return images, labels


def cifar_binary_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    """Records as published: the label byte, then the red, green and blue planes, row by row."""
    records = []
    for image, label in zip(images, labels, strict=True):
        planes = b"".join(image[:, :, channel].tobytes() for channel in range(3))
        records.append(bytes([label]) + planes)
    return b"".join(records)


def cifar_pickle_batch(images: np.ndarray, labels: np.ndarray, protocol: int) -> bytes:
    data = np.stack(
        [np.concatenate([image[:, :, c].ravel() for c in range(3)]) for image in images]
    )
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(label) for label in labels],
        b"data": data,
        b"filenames": [b"image_%d.png" % i for i in range(len(labels))],
    }
    return pickle.dumps(batch, protocol=protocol)


def write_cifar(directory: pathlib.Path, version: str, layout: str, protocol: int = 2):
    """Writes a small CIFAR-10 (3 images per train batch, 4 test images); returns expectations."""
    train_images, train_labels = random_cifar(5, 3, seed=1)
    test_images, test_labels = random_cifar(1, 4, seed=2)
    files = {}
    batches = zip(
        (*CIFAR_BATCHES, "test_batch"),
        (*train_images, test_images[0]),
        (*train_labels, test_labels[0]),
        strict=True,
    )
    for name, images, labels in batches:
        if version == "bin":
            files[f"{name}.bin"] = cifar_binary_batch(images, labels)
        else:
            files[name] = cifar_pickle_batch(images, labels, protocol)
    folder = "cifar-10-batches-bin" if version == "bin" else "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "dir":
        (directory / folder).mkdir()
        for name, data in files.items():
            (directory / folder / name).write_bytes(data)
    else:
        archive = "cifar-10-binary.tar.gz" if version == "bin" else "cifar-10-python.tar.gz"
        with tarfile.open(directory / archive, "w:gz") as tar:
            for name, data in {"readme.html": b"<html></html>", **files}.items():
                member = tarfile.TarInfo(f"{folder}/{name}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return (
        (train_images.reshape(15, 32, 32, 3), train_labels.reshape(15)),
        (test_images.reshape(4, 32, 32, 3), test_labels.reshape(4)),
    )


def check_cifar(dataset: Dataset, expected) -> None:
    (train_images, train_labels), (test_images, test_labels) = expected
    assert dataset.name == "cifar10"
    np.testing.assert_array_equal(dataset.train.images, train_images)
    np.testing.assert_array_equal(dataset.train.labels, train_labels)
    np.testing.assert_array_equal(dataset.test.images, test_images)
    np.testing.assert_array_equal(dataset.test.labels, test_labels)
    assert dataset.train.labels.dtype == np.int32
    pixels = train_images.astype(np.float64) / 255
    np.testing.assert_allclose(dataset.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(dataset.std, pixels.std(axis=(0, 1, 2)), rtol=1e-6)


@pytest.mark.parametrize("layout", ["dir", "tar.gz"])
def test_cifar_binary_round_trip(tmp_path, layout):
    expected = write_cifar(tmp_path, "bin", layout)

    dataset = load_dataset(make_config(name="cifar10", data_dir=str(tmp_path)))

    check_cifar(dataset, expected)


@pytest.mark.parametrize("layout", ["dir", "tar.gz"])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_python_round_trip(tmp_path, layout, protocol):
    expected = write_cifar(tmp_path, "py", layout, protocol)

    dataset = load_dataset(make_config(name="cifar10", data_dir=str(tmp_path)))

    check_cifar(dataset, expected)


class RunsShellCommand:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsPython:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [RunsShellCommand, RunsPython])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, payload):
    write_cifar(tmp_path / "data", "py", "dir")
    marker = tmp_path / "pwned"
    batch = {b"labels": [0], b"data": payload(marker)}
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(batch))

    with pytest.raises(DataError, match=r"data_batch_2: refused to unpickle (posix|os|builtins)\."):
        load_dataset(make_config(name="cifar10", data_dir=str(tmp_path / "data")))
    assert not marker.exists()


def test_cifar_truncated_binary_raises_naming_file(tmp_path):
    write_cifar(tmp_path, "bin", "dir")
    damaged = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    damaged.write_bytes(damaged.read_bytes()[:-1000])

    with pytest.raises(DataError, match=r"data_batch_3.bin: .*truncated"):
        load_dataset(make_config(name="cifar10", data_dir=str(tmp_path)))


def test_cifar_truncated_pickle_raises_naming_file(tmp_path):
    write_cifar(tmp_path, "py", "dir")
    damaged = tmp_path / "cifar-10-batches-py" / "test_batch"
    damaged.write_bytes(damaged.read_bytes()[:500])

    with pytest.raises(DataError, match=r"test_batch: cannot unpickle"):
        load_dataset(make_config(name="cifar10", data_dir=str(tmp_path)))


def test_cifar_truncated_archive_raises_naming_it(tmp_path):
    write_cifar(tmp_path, "bin", "tar.gz")
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])

    with pytest.raises(DataError, match=r"cifar-10-binary.tar.gz: .*truncated"):
        load_dataset(make_config(name="cifar10", data_dir=str(tmp_path)))


# ----------------------------------------------------------------------------------------------
# Missing data.


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(make_config(data_dir=str(tmp_path / "nowhere")))
    message = str(info.value)
    assert "nowhere" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--config.dataset.tfds_download=True" in message


def test_missing_data_auto_falls_back_to_tfds_and_says_how_to_get_it(tmp_path):
    config = make_config(
        source="auto", data_dir=str(tmp_path / "nowhere"), tfds_data_dir=str(tmp_path / "tfds")
    )

    with pytest.raises(DataError) as info:
        load_dataset(config)
    message = str(info.value)
    assert "No Fashion-MNIST files in" in message and "nowhere" in message
    assert "'fashion_mnist'" in message and "not prepared" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "pip install 'jbn[tensorflow]'" in message


def test_missing_cifar_says_where_to_download_it(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-binary.tar.gz from https://www.cs.toronto"):
        load_dataset(make_config(name="cifar10", data_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "fields", [{"name": "imagenet"}, {"source": "internet"}, {"source": "synthetic"}]
)
def test_bad_config_raises_data_error(fields):
    with pytest.raises(DataError):
        load_dataset(make_config(**fields))


# ----------------------------------------------------------------------------------------------
# TFDS, on a tiny dataset built here without TensorFlow.


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_fashion_split(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(size, 28, 28, 1), dtype=np.uint8)
    return images, (np.arange(size) % 10).astype(np.int32)


TINY_SPLITS = {"train": tiny_fashion_split(12, seed=3), "test": tiny_fashion_split(5, seed=4)}


class JbnTestTinyFashion(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST's features and splits, with 17 random images."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS 4.9 looks for a checksums file next to the builder's code, which fails for a builder in
    # a package without the importlib_resources module (tensorflow/datasets#11212); it needs none.
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in TINY_SPLITS}

    def _generate_examples(self, split):
        # PNG bytes, encoded with PIL: TFDS would need TensorFlow to encode numpy images itself.
        images, labels = TINY_SPLITS[split]
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"image": png(image), "label": int(label)}


class JbnTestNeedsTensorflow(JbnTestTinyFashion):
    """Fails to prepare the way fashion_mnist does without TensorFlow."""

    def _generate_examples(self, split):
        # What TFDS 4.9.10 raises when asked to encode a numpy image without TensorFlow.
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
        yield


def sorted_examples(images: np.ndarray, labels: np.ndarray) -> list[tuple[int, bytes]]:
    # TFDS stores examples in an order of its own (a hash of their keys).
    return sorted(
        (int(label), image.tobytes()) for image, label in zip(images, labels, strict=True)
    )


def test_tfds_prepares_and_reads_without_tensorflow(tmp_path):
    config = make_config(
        source="tfds",
        tfds_name="jbn_test_tiny_fashion",
        tfds_data_dir=str(tmp_path),
        tfds_download=True,
    )

    prepared = load_dataset(config)
    config.tfds_download = False
    reread = load_dataset(config)

    for dataset in (prepared, reread):
        assert dataset.name == "fashion_mnist"
        for split_name, split in (("train", dataset.train), ("test", dataset.test)):
            assert split.images.shape[1:] == (28, 28, 1) and split.images.dtype == np.uint8
            assert split.labels.dtype == np.int32
            assert sorted_examples(split.images, split.labels) == sorted_examples(
                *TINY_SPLITS[split_name]
            )


def test_auto_reads_prepared_tfds_when_there_are_no_local_files(tmp_path):
    config = make_config(
        source="auto",
        data_dir=str(tmp_path / "nowhere"),
        tfds_name="jbn_test_tiny_fashion",
        tfds_data_dir=str(tmp_path / "tfds"),
        tfds_download=True,
    )

    dataset = load_dataset(config)

    assert len(dataset.train.labels) == 12 and len(dataset.test.labels) == 5


def test_tfds_not_prepared_and_no_download_says_how_to_get_it(tmp_path):
    config = make_config(source="tfds", tfds_data_dir=str(tmp_path), tfds_download=False)

    with pytest.raises(DataError) as info:
        load_dataset(config)
    message = str(info.value)
    assert str(tmp_path) in message and "not prepared" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_tfds_preparing_without_tensorflow_says_to_install_it(tmp_path):
    config = make_config(
        source="tfds",
        tfds_name="jbn_test_needs_tensorflow",
        tfds_data_dir=str(tmp_path),
        tfds_download=True,
    )

    with pytest.raises(DataError) as info:
        load_dataset(config)
    message = str(info.value)
    assert "needs TensorFlow" in message
    assert "pip install 'jbn[tensorflow]'" in message
    assert "apt-get install dataset-fashion-mnist" in message


# ----------------------------------------------------------------------------------------------
# Batching.


def indexed_dataset(num_train: int = 50, num_test: int = 10, channels: int = 3) -> Dataset:
    """Random images whose label is their index, so batches tell which examples they hold."""
    rng = np.random.default_rng(5)
    train_images = rng.integers(0, 256, size=(num_train, 6, 6, channels), dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(num_test, 6, 6, channels), dtype=np.uint8)
    pixels = train_images.astype(np.float64) / 255
    return Dataset(
        name="indexed",
        train=Split(train_images, np.arange(num_train, dtype=np.int32)),
        test=Split(test_images, np.arange(num_test, dtype=np.int32)),
        num_classes=num_train,
        mean=pixels.mean(axis=(0, 1, 2)).astype(np.float32),
        std=pixels.std(axis=(0, 1, 2)).astype(np.float32),
    )


def as_arrays(batches) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(batch["image"], batch["label"]) for batch in batches]


def assert_same_batches(first, second) -> None:
    assert len(first) == len(second)
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second, strict=True):
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(labels_a, labels_b)


def test_train_batches_shapes_and_dtypes():
    dataset = indexed_dataset()

    batches = list(train_batches(dataset, 8, seed=0, epoch=0))

    assert len(batches) == steps_per_epoch(dataset, 8) == 6
    for batch in batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (8, 6, 6, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32


def test_train_batches_are_deterministic_per_seed_and_epoch():
    dataset = indexed_dataset()

    def run(seed, epoch):
        return as_arrays(train_batches(dataset, 8, seed=seed, epoch=epoch))

    assert_same_batches(run(0, 0), run(0, 0))
    order = np.concatenate([labels for _, labels in run(0, 0)])
    assert not np.array_equal(order, np.concatenate([labels for _, labels in run(0, 1)]))
    assert not np.array_equal(order, np.concatenate([labels for _, labels in run(1, 0)]))


def test_train_batches_use_each_example_at_most_once_and_drop_the_remainder():
    dataset = indexed_dataset(num_train=50)

    labels = np.concatenate([b["label"] for b in train_batches(dataset, 8, seed=3, epoch=2)])

    assert len(labels) == 48
    assert len(np.unique(labels)) == 48
    assert not np.array_equal(labels, np.sort(labels))  # Shuffled.


@pytest.mark.parametrize("augment", [False, True])
def test_train_batches_resume_exactly_from_start_step(augment):
    dataset = indexed_dataset()
    full = as_arrays(train_batches(dataset, 8, seed=7, epoch=3, augment=augment))

    for start_step in (1, 4, 6):
        resumed = train_batches(dataset, 8, seed=7, epoch=3, start_step=start_step, augment=augment)
        assert_same_batches(as_arrays(resumed), full[start_step:])


def test_train_batches_are_normalized():
    dataset = indexed_dataset(num_train=64)

    (batch,) = train_batches(dataset, 64, seed=0, epoch=0)

    np.testing.assert_allclose(batch["image"].mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(batch["image"].std(axis=(0, 1, 2)), 1.0, atol=1e-5)


def test_augment_crops_zero_padded_images_and_flips_them_deterministically():
    original = indexed_dataset(num_train=40)
    # Statistics that make normalization the identity up to float error: images stay pixel values.
    dataset = Dataset(
        name="pixels",
        train=original.train,
        test=original.test,
        num_classes=40,
        mean=np.zeros(3, np.float32),
        std=np.full(3, 1 / 255, np.float32),
    )

    def run():
        return as_arrays(train_batches(dataset, 8, seed=1, epoch=0, augment=True))

    batches = run()
    assert_same_batches(batches, run())
    padded = np.pad(original.train.images, ((0, 0), (4, 4), (4, 4), (0, 0))).astype(np.float32)
    used = set()
    for images, labels in batches:
        assert images.shape == (8, 6, 6, 3) and images.dtype == np.float32
        for image, label in zip(images, labels, strict=True):
            matches = [
                (dy, dx, flip)
                for dy in range(9)
                for dx in range(9)
                for flip in (False, True)
                if np.allclose(
                    image,
                    padded[label, dy : dy + 6, dx : dx + 6][:, :: -1 if flip else 1],
                    atol=1e-3,
                )
            ]
            assert matches, f"example {label} is not a crop of its padded image"
            used.update(matches)
    # The 40 crops are not all the same: offsets and flips vary.
    assert len({flip for _, _, flip in used}) == 2
    assert len({(dy, dx) for dy, dx, _ in used}) > 10


@pytest.mark.parametrize("batch_size", [0, -1, 51])
def test_train_batches_reject_bad_batch_size_when_called(batch_size):
    dataset = indexed_dataset(num_train=50)

    with pytest.raises(ValueError, match="batch_size"):
        train_batches(dataset, batch_size, seed=0, epoch=0)
    with pytest.raises(ValueError, match="batch_size"):
        steps_per_epoch(dataset, batch_size)


def test_train_batches_reject_start_step_past_the_epoch():
    with pytest.raises(ValueError, match="start_step"):
        train_batches(indexed_dataset(), 8, seed=0, epoch=0, start_step=7)


@pytest.mark.parametrize(("num_test", "batch_size"), [(10, 4), (12, 4), (3, 8)])
def test_eval_batches_cover_every_example_once_in_order(num_test, batch_size):
    dataset = indexed_dataset(num_test=num_test)

    batches = list(eval_batches(dataset, batch_size))

    assert len(batches) == -(-num_test // batch_size)
    for batch in batches:
        assert batch["image"].shape == (batch_size, 6, 6, 3)
        assert batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["mask"].dtype == np.bool_
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    assert mask.sum() == num_test and mask[:num_test].all()
    np.testing.assert_array_equal(labels[mask], np.arange(num_test))
    expected = (dataset.test.images / 255 - dataset.mean) / dataset.std
    np.testing.assert_allclose(images[mask], expected, atol=1e-5)


def test_eval_batches_reject_bad_batch_size_when_called():
    with pytest.raises(ValueError, match="batch_size"):
        eval_batches(indexed_dataset(), 0)


# ----------------------------------------------------------------------------------------------
# Synthetic data.


def synthetic_config(**fields) -> ml_collections.ConfigDict:
    defaults = {
        "name": "synthetic",
        "source": "synthetic",
        "synthetic_train_size": 400,
        "synthetic_test_size": 200,
        "synthetic_image_shape": (8, 8, 3),
        "synthetic_num_classes": 10,
    }
    return make_config(**{**defaults, **fields})


def test_synthetic_is_deterministic():
    first = load_dataset(synthetic_config())
    second = load_dataset(synthetic_config())
    other_seed = load_dataset(synthetic_config(synthetic_seed=1))

    assert first.name == "synthetic" and first.num_classes == 10
    assert first.train.images.shape == (400, 8, 8, 3) and first.test.images.shape == (200, 8, 8, 3)
    np.testing.assert_array_equal(first.train.images, second.train.images)
    np.testing.assert_array_equal(first.test.labels, second.test.labels)
    assert not np.array_equal(first.train.images, other_seed.train.images)


def test_synthetic_classes_are_separable():
    dataset = load_dataset(synthetic_config())
    train_images = dataset.train.images.reshape(400, -1).astype(np.float64)
    test_images = dataset.test.images.reshape(200, -1).astype(np.float64)

    # Nearest class mean, estimated from the train split.
    class_means = np.stack([train_images[dataset.train.labels == c].mean(0) for c in range(10)])
    distances = ((test_images[:, None, :] - class_means[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == dataset.test.labels).mean()

    assert accuracy > 0.95
    np.testing.assert_array_equal(np.bincount(dataset.train.labels), [40] * 10)

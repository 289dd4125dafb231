"""CIFAR-10 from its published batches in a directory: the binary version (``cifar-10-batches-bin/``
or ``cifar-10-binary.tar.gz``) or the python version (``cifar-10-batches-py/`` or
``cifar-10-python.tar.gz``), read straight from the archive without unpacking it.

The binary version is parsed with numpy: each batch is 10000 records of one label byte and 3072
pixel bytes (1024 red, then green, then blue, each row-major), and no maintained library reads it
without pulling in a framework. The python version's pickles are read by an unpickler that
rebuilds numpy arrays and nothing else, so a doctored file cannot run code.
"""

import dataclasses
import functools
import importlib
import io
import pathlib
import pickle
import posixpath
import tarfile
import warnings
import zlib
from collections.abc import Callable

import numpy as np

from train.data.dataset import DataError, DatasetSpec, Split, check_labels, read_file

_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCHES = ("test_batch",)
_CIFAR_PIXELS = 32 * 32 * 3
_CIFAR_RECORD_SIZE = 1 + _CIFAR_PIXELS


def has_files(data_dir: pathlib.Path) -> bool:
    """Whether `data_dir` holds CIFAR-10 in either version, unpacked or as the archive."""
    return _find_cifar_source(data_dir) is not None


def load(spec: DatasetSpec, data_dir: pathlib.Path, how_to_get: str) -> tuple[Split, Split]:
    """Reads the train and test splits of CIFAR-10 from `data_dir`.

    Raises:
      DataError: no CIFAR-10 there, or a batch is missing, damaged or refused by the unpickler; the
        message ends in `how_to_get` when files are missing.
    """
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
            return read_file(path)

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
            check_labels(batch_labels, spec.num_classes, where[batch])
            images.append(batch_images)
            labels.append(batch_labels)
        return Split(images=np.concatenate(images), labels=np.concatenate(labels).astype(np.int32))

    return load_split(_CIFAR_TRAIN_BATCHES), load_split(_CIFAR_TEST_BATCHES)


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

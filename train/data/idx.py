"""MNIST and Fashion-MNIST from their published IDX files (gzipped or not) in a directory.

Parsed with numpy: the format is a 4-byte magic number, one big-endian uint32 per dimension, and
the raw values, and no maintained library reads it without pulling in a framework.
"""

import pathlib

import numpy as np

from train.data.dataset import DataError, DatasetSpec, Split, check_labels, read_file

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


def has_files(data_dir: pathlib.Path) -> bool:
    """Whether `data_dir` holds any of the four IDX files (`load` reads them or says why not)."""
    return any(_find_idx_file(data_dir, stem) for pair in _IDX_FILES.values() for stem in pair)


def load(spec: DatasetSpec, data_dir: pathlib.Path, how_to_get: str) -> tuple[Split, Split]:
    """Reads the train and test splits of `spec` from the IDX files in `data_dir`.

    Raises:
      DataError: a file is missing, damaged or of another dataset; the message ends in `how_to_get`
        when a file is missing.
    """
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


def _find_idx_file(data_dir: pathlib.Path, stem: str) -> pathlib.Path | None:
    for path in (data_dir / f"{stem}.gz", data_dir / stem):
        if path.is_file():
            return path
    return None


def _load_idx_split(
    images_path: pathlib.Path, labels_path: pathlib.Path, spec: DatasetSpec
) -> Split:
    images = parse_idx(read_file(images_path), images_path)
    labels = parse_idx(read_file(labels_path), labels_path)
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
    check_labels(labels, spec.num_classes, labels_path)
    return Split(images=images[..., None], labels=labels.astype(np.int32))

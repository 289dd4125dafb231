"""Datasets from TensorFlow Datasets, read through `DatasetBuilder.as_data_source`.

`as_data_source` reads ``array_record`` files and decodes the PNG images with PIL: reading needs no
TensorFlow. Preparing (downloading and writing) ``mnist``, ``fashion_mnist`` or ``cifar10`` does:
their builders yield numpy images, which TFDS 4.9 encodes to PNG with TensorFlow.
"""

import numpy as np

from train.data.dataset import DataError, DatasetSpec, Split, check_labels

_TFDS_READ_CHUNK = 10_000  # Examples decoded per read, to bound the memory of decoded dicts.


def load(
    spec: DatasetSpec,
    tfds_name: str,
    data_dir: str | None,
    download: bool,
    how_to_get: str,
) -> tuple[Split, Split]:
    """Reads the train and test splits of `spec` from the TFDS builder `tfds_name`.

    Args:
      spec: the dataset the builder should hold.
      tfds_name: the builder's name, with an optional ':version'.
      data_dir: TFDS's data directory; None for its default.
      download: whether to download and prepare the dataset if it is not prepared.
      how_to_get: how to get the data, ending the messages that say it could not be had.

    Raises:
      DataError: the dataset is not prepared (and `download` is off), could not be prepared or
        read, or lacks a split; the message says why, naming a missing module if that was it.
    """
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
            check_labels(split_data.labels, spec.num_classes, f"{where}, split {split!r}")
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

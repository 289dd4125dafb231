"""The data: loads an image classification dataset into memory and batches it with numpy.

The datasets are small (at most 60000 images of 32x32x3 bytes), so each is held in memory as uint8
arrays and batched with numpy; no tf.data and no TensorFlow. Every problem with the data raises
`DataError` with one message that names the file or directory and says how to fix it.

Where things are:

* `batching`: what the training loop reads: `train_batches` (seeded shuffle, exact resume,
  crop-and-flip augmentation), `eval_batches` (padded and masked) and `steps_per_epoch`.
* `dataset`: the shared types (`Dataset`, `Split`, `DatasetSpec`, `DataError`), normalization,
  the data fingerprint, and the checks every source runs.
* `sources`: the table of known datasets and `load_dataset`, which picks where to read one from
  (`config.source`: 'local', 'tfds', 'synthetic', or 'auto': local files if there are any, else
  TFDS).
* one module per source: `idx` (MNIST and Fashion-MNIST files), `cifar` (CIFAR-10 files, binary
  or pickled), `tfds` (TensorFlow Datasets) and `synthetic` (generated from a seed).
"""

from train.data.batching import eval_batches, steps_per_epoch, train_batches
from train.data.dataset import (
    DataError,
    Dataset,
    Split,
    data_fingerprint,
    normalize_images,
)
from train.data.idx import parse_idx
from train.data.sources import class_names, load_dataset
from train.data.synthetic import make_synthetic_dataset

__all__ = [
    "DataError",
    "Dataset",
    "Split",
    "class_names",
    "data_fingerprint",
    "eval_batches",
    "load_dataset",
    "make_synthetic_dataset",
    "normalize_images",
    "parse_idx",
    "steps_per_epoch",
    "train_batches",
]

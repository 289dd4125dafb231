"""The batches the training loop reads: seeded shuffled train epochs that resume exactly, with
optional crop-and-flip augmentation, and padded, masked eval batches over every test example.

Batching is plain numpy over the in-memory uint8 arrays; images come out normalized float32.
"""

from collections.abc import Iterator

import numpy as np

from train.data.dataset import Dataset, normalize_images

# Streams of randomness derived from (seed, epoch).
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1
_CROP_PADDING = 4


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


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    # spawn_key gives independent streams per (epoch, purpose) from one seed.
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch, stream)))


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

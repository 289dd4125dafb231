"""The synthetic dataset: class templates plus noise, generated from a seed; for smoke tests."""

import ml_collections
import numpy as np

from train.data.dataset import DataError, Dataset, Split, make_dataset


def load(config: ml_collections.ConfigDict) -> Dataset:
    """Makes the synthetic dataset that `config`'s `synthetic_*` fields describe.

    Args:
      config: the `dataset` sub-config, with `synthetic_train_size`, `synthetic_test_size`,
        `synthetic_image_shape` (H, W, C), `synthetic_num_classes` and optional `synthetic_seed`
        (default 0).
    """
    return make_synthetic_dataset(
        train_size=config.synthetic_train_size,
        test_size=config.synthetic_test_size,
        image_shape=tuple(config.synthetic_image_shape),
        num_classes=config.synthetic_num_classes,
        seed=config.get("synthetic_seed", 0),
    )


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
    return make_dataset("synthetic", train, test, num_classes)

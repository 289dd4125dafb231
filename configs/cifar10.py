"""The document's original experiment: CIFAR-10 (32x32x3), random crops and flips.

CIFAR-10 is read from a local archive when one is found (dataset.data_dir or the standard places)
and otherwise through TFDS (set --config.dataset.tfds_download=True to let TFDS fetch it).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset.name = "cifar10"
    config.dataset.augment = True
    config.num_epochs = 20
    return config

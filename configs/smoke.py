"""A seconds-long end-to-end run on tiny synthetic data (no files needed)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset.name = "synthetic"
    config.dataset.source = "synthetic"
    config.dataset.synthetic_train_size = 512
    config.dataset.synthetic_test_size = 200
    config.dataset.synthetic_image_shape = (16, 16, 3)
    config.dataset.synthetic_num_classes = 10
    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_epochs = 2
    config.log_every_steps = 4
    return config

"""The baseline: the default experiment without batch norm (conv + bias -> ReLU)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model.use_batch_norm = False
    return config

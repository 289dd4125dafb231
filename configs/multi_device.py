"""The default experiment, data parallel over all local devices with synchronized BN.

One `jax.jit` over a mesh of the devices with the batch sharded (`parallelism='sharding'`, the
default; `--config.parallelism=pmap` for pmap). The global batch (128) is split evenly over the
devices; batch norm uses the statistics of the whole global batch, so the result matches one
device to float32 round-off. On a CPU-only machine, simulate devices with
--config.num_cpu_devices=4.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.num_devices = -1
    config.parallelism = "sharding"
    config.model.sync_batch_stats = True
    return config

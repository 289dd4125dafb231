"""jbn: batch normalization for JAX, done properly.

Pure functions (`moments`, `weighted_moments`, `batch_normalization`, `fused_batch_norm`,
`ghost_batch_norm`, `batch_renorm`, moving averages) and a Flax module, `BatchNorm`.
"""

from jbn.averages import MovingAverage, MovingAverageState, moving_average
from jbn.fold import fold_batch_norm
from jbn.module import BatchNorm
from jbn.normalization import batch_normalization, fused_batch_norm, ghost_batch_norm
from jbn.renorm import batch_renorm, renorm_correction
from jbn.stats import moments, weighted_moments

__all__ = [
    "BatchNorm",
    "MovingAverage",
    "MovingAverageState",
    "batch_normalization",
    "batch_renorm",
    "fold_batch_norm",
    "fused_batch_norm",
    "ghost_batch_norm",
    "moments",
    "moving_average",
    "renorm_correction",
    "weighted_moments",
]

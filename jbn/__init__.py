"""jbn: batch normalization for JAX, done properly.

Pure functions (`moments`, `weighted_moments`, `batch_normalization`, `fused_batch_norm`,
`ghost_batch_norm`, `batch_renorm`, moving averages, `jbn.running` for the running
statistics, `jbn.precise_bn` to recompute them for final weights) and thin Flax modules:
`BatchNorm` (linen, TF1's arguments), `jbn.linen.BatchNorm` (linen, a drop-in for
`flax.linen.BatchNorm`) and `jbn.nnx.BatchNorm` (NNX).
"""

# The one place the version is written: pyproject.toml reads it from here (setuptools' dynamic
# `attr`, parsed without importing jbn).
__version__ = "0.1.0"

from jbn import linen, nnx, precise_bn, running
from jbn.averages import MovingAverage, MovingAverageState, moving_average
from jbn.fold import batch_norm_inference_statistics, fold_batch_norm
from jbn.module import BatchNorm
from jbn.normalization import batch_normalization, fused_batch_norm, ghost_batch_norm
from jbn.precise_bn import recalibrate_statistics
from jbn.renorm import batch_renorm, renorm_correction
from jbn.stats import moments, weighted_moments

__all__ = [
    "BatchNorm",
    "MovingAverage",
    "MovingAverageState",
    "batch_norm_inference_statistics",
    "batch_normalization",
    "batch_renorm",
    "fold_batch_norm",
    "fused_batch_norm",
    "ghost_batch_norm",
    "linen",
    "moments",
    "moving_average",
    "nnx",
    "precise_bn",
    "recalibrate_statistics",
    "renorm_correction",
    "running",
    "weighted_moments",
]

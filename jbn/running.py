"""Running (moving) statistics of a batch-norm layer: a NamedTuple state and pure functions.

Every formula the layers need between "this batch's statistics" and "the statistics inference
reads" lives here, in the style of optax: `running_statistics(...)` returns
`RunningStatisticsUpdate(init, update)`.

Given this batch's per-feature `(count, mean, variance)` (biased variance; `count` = counted
elements, or sum of frequency weights, over every device), with `d` = `decay` and
`e` = `epsilon`:

.. math::

    v_B &= variance \\cdot \\tfrac{n}{n-1} \\text{ with unbiased (Bessel, } n > 1\\text{), else }
           variance \\\\
    moving\\_mean &\\leftarrow d \\cdot moving\\_mean + (1 - d) \\cdot mean \\\\
    moving\\_variance &\\leftarrow d \\cdot moving\\_variance + (1 - d) \\cdot v_B

* zero-debiased mean (TF's `zero_debias_moving_mean`, Adam): `biased <- d biased + (1 - d)
  mean` from 0, `moving_mean = biased / (1 - d**num_updates)`;
* cumulative (`decay=None`, PyTorch's `momentum=None`): `avg <- avg + (value - avg) /
  num_updates`, the plain mean of every batch so far;
* renorm (TF1 / Keras): the inference scale is a moving average of the standard deviation,
  `moving_stddev <- d moving_stddev + (1 - d) sqrt(v_B + e)`, and the reported variance is
  `moving_variance = max(moving_stddev**2 - e, 0)`, so that `sqrt(moving_variance + e)` is the
  averaged stddev itself. The correction statistics move with `renorm_decay` `r`:
  `renorm_mean <- r renorm_mean + (1 - r) mean`,
  `renorm_stddev <- r renorm_stddev + (1 - r) sqrt(variance + e)` (biased: it corrects the
  batch's own normalization). Both stddevs start at `sqrt(initial moving variance)` and
  `renorm_mean` at the initial moving mean (Keras). With no clipping and `renorm_decay ==
  decay` the renorm statistics equal the inference ones, so inference before a step gives that
  step's training output.

Ghost batches: statistics with a leading axis of `G` ghost batches are pooled first: the
count-weighted mean over ghost batches (and over devices with `axis_name`) of the means, of the
variances (each Bessel-corrected with its own count) and of the stddevs. A feature with no
counted element keeps its old statistics; the update count advances when any feature counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _checks
from jbn.averages import MovingAverageState, unchecked_moving_average

__all__ = [
    "VARIABLE_NAMES",
    "BatchStatistics",
    "RunningStatistics",
    "RunningStatisticsUpdate",
    "bessel_correction",
    "pool_statistics",
    "running_rule",
    "running_statistics",
    "statistics_dtype",
]

# Moving statistics are float32 or wider whatever the input and parameter dtypes: a bf16 average
# would stop moving once (1 - decay) * batch falls under half a bf16 ulp of the average.
STATS_DTYPE = jnp.float32


def statistics_dtype(param_dtype=STATS_DTYPE) -> jnp.dtype:
    """The dtype of a layer's moving statistics, `promote_types(param_dtype, float32)`.

    float64 parameters (under `jax_enable_x64`) get float64 statistics, so inference matches
    training on float64 data (float32 would round a mean of 1e4 to a multiple of 2**-10). Fixed
    by the constructor, not by the data: a variable's dtype never changes between steps (flax's
    starts float32 and becomes the batch statistics' dtype after the first update).
    Canonicalized: float32 when x64 is off, without JAX's warning about an unavailable float64.
    """
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(param_dtype, STATS_DTYPE))


class BatchStatistics(NamedTuple):
    """One batch's statistics: feature-shaped, or `(G, *feature_shape)` for G ghost batches.

    Attributes:
      count: counted elements (sum of frequency weights) behind each statistic.
      mean: the batch mean.
      variance: the biased batch variance (divided by `count`).
    """

    count: jax.Array
    mean: jax.Array
    variance: jax.Array


class RunningStatistics(NamedTuple):
    """State of a layer's running statistics (the rule's `dtype`, float32 by default, except the
    int32 count).

    Attributes:
      mean: `moving_mean`, what inference subtracts.
      variance: `moving_variance`, what inference divides by (`sqrt(variance + epsilon)`).
      stddev: `moving_stddev` (renorm only, else None): moving average of
        `sqrt(variance + epsilon)`; `variance` is derived from it.
      mean_biased: zero-debias accumulator of the mean (else None).
      renorm_mean, renorm_stddev: renorm correction statistics (else None).
      num_updates: int32 number of updates (zero-debias and cumulative only, else None).
    """

    mean: jax.Array
    variance: jax.Array
    stddev: jax.Array | None = None
    mean_biased: jax.Array | None = None
    renorm_mean: jax.Array | None = None
    renorm_stddev: jax.Array | None = None
    num_updates: jax.Array | None = None


#: The variable name of each `RunningStatistics` field in both layers (TF1's names).
VARIABLE_NAMES = {
    "mean": "moving_mean",
    "variance": "moving_variance",
    "stddev": "moving_stddev",
    "mean_biased": "moving_mean_biased",
    "renorm_mean": "renorm_mean",
    "renorm_stddev": "renorm_stddev",
    "num_updates": "num_updates",
}


class RunningStatisticsUpdate(NamedTuple):
    """`init(mean, variance) -> state` and `update(state, batch, ...) -> state`, both pure."""

    init: Callable[..., RunningStatistics]
    update: Callable[..., RunningStatistics]


def bessel_correction(batch: BatchStatistics) -> jax.Array:
    """The unbiased variance `variance * n / (n - 1)`; `n <= 1` keeps the biased one."""
    count = batch.count
    return batch.variance * jnp.where(count > 1, count / jnp.where(count > 1, count - 1, 1), 1)


def pool_statistics(values, count, axis_name=None, axis_index_groups=None):
    """Count-weighted mean over axis 0 (ghost batches) and over `axis_name` of each value.

    Returns `(pooled values, total count)`; a feature whose total count is 0 gets 0.
    """
    weighted_sums = jax.tree.map(lambda v: jnp.sum(count * v, axis=0), values)
    total = jnp.sum(count, axis=0)
    if axis_name is not None:
        weighted_sums, total = lax.psum(
            (weighted_sums, total), axis_name, axis_index_groups=axis_index_groups
        )
    safe_total = jnp.where(total > 0, total, 1)
    return jax.tree.map(lambda v: v / safe_total, weighted_sums), total


def running_statistics(
    decay: float | None,
    *,
    epsilon: float,
    zero_debias_mean: bool = False,
    unbiased_variance: bool = False,
    renorm: bool = False,
    renorm_decay: float = 0.99,
    dtype=STATS_DTYPE,
) -> RunningStatisticsUpdate:
    """Builds the running-statistics rule of a batch-norm layer (see the module docstring).

    Args:
      decay: weight on the old value in [0, 1), or None for the cumulative average.
      epsilon: the layer's positive epsilon (renorm's stddevs are `sqrt(variance + epsilon)`).
      zero_debias_mean: debias the moving mean (exponential decay only).
      unbiased_variance: store the Bessel-corrected variance (PyTorch's running_var).
      renorm: keep TF1's renorm statistics (`stddev`, `renorm_mean`, `renorm_stddev`).
      renorm_decay: decay of the renorm correction statistics, in [0, 1).
      dtype: floating dtype of the state (the layers pass `statistics_dtype(param_dtype)`);
        updates keep it whatever the batch statistics' dtype.

    Returns:
      `RunningStatisticsUpdate(init, update)`:

      * `init(mean, variance)`: the state from initial (feature-shaped) moving mean and variance;
      * `update(state, batch, axis_name=None, axis_index_groups=None)`: the state after one
        training batch (`BatchStatistics`, feature-shaped or with a leading ghost axis;
        `axis_name` pools ghost statistics over devices too).
    """
    if decay is not None:
        _checks.check_decay(decay, "decay")
    _checks.check_decay(renorm_decay, "renorm_decay")
    epsilon = _checks.static_epsilon(epsilon, "epsilon")
    _checks.check_floating_dtype(dtype, "dtype")
    _checks.check_zero_debias(decay, zero_debias_mean, "zero_debias_mean")
    return running_rule(
        decay,
        epsilon=epsilon,
        zero_debias_mean=zero_debias_mean,
        unbiased_variance=unbiased_variance,
        renorm=renorm,
        renorm_decay=renorm_decay,
        dtype=dtype,
    )


def running_rule(
    decay: float | None,
    *,
    epsilon: float,
    zero_debias_mean: bool,
    unbiased_variance: bool,
    renorm: bool,
    renorm_decay: float,
    dtype,
) -> RunningStatisticsUpdate:
    """`running_statistics` for arguments its caller has checked (`jbn.layer.LayerOptions`)."""
    counts_updates = zero_debias_mean or decay is None
    average = unchecked_moving_average(decay, zero_debias_mean)
    plain_average = unchecked_moving_average(decay, False)
    renorm_average = unchecked_moving_average(renorm_decay, False)

    def init(mean: jax.Array, variance: jax.Array) -> RunningStatistics:
        mean = jnp.asarray(mean, dtype)
        variance = jnp.asarray(variance, dtype)
        state = RunningStatistics(mean, variance)
        if zero_debias_mean:
            state = state._replace(mean_biased=jnp.zeros_like(mean))
        if counts_updates:
            state = state._replace(num_updates=jnp.zeros((), jnp.int32))
        if renorm:
            stddev = jnp.sqrt(variance)
            state = state._replace(
                variance=_renorm_variance(stddev, epsilon),
                stddev=stddev,
                renorm_mean=mean,
                renorm_stddev=stddev,
            )
        return state

    def update(
        state: RunningStatistics, batch: BatchStatistics, axis_name=None, axis_index_groups=None
    ) -> RunningStatistics:
        values = {"mean": batch.mean}
        values["variance"] = bessel_correction(batch) if unbiased_variance else batch.variance
        if renorm:
            values["stddev"] = jnp.sqrt(values["variance"] + epsilon)
            values["renorm_stddev"] = jnp.sqrt(batch.variance + epsilon)
        count = batch.count
        if jnp.ndim(batch.mean) > jnp.ndim(state.mean):
            values, count = pool_statistics(values, count, axis_name, axis_index_groups)
        # A feature without any counted element (all masked) keeps its statistics.
        has_data = count > 0
        keep_old = lambda new, old: jnp.where(has_data, new, old).astype(old.dtype)
        # The step count is shared by all features: it advances when any feature counted
        # something (a feature without data in an otherwise counted batch drifts slightly).
        any_data = jnp.any(has_data)
        num_updates = jnp.zeros((), jnp.int32) if state.num_updates is None else state.num_updates

        def step(rule, old, biased, value):
            new = rule.update(MovingAverageState(old, biased, num_updates), value)
            return keep_old(new.average, old), None if biased is None else keep_old(
                new.biased, biased
            )

        mean, mean_biased = step(average, state.mean, state.mean_biased, values["mean"])
        new = state._replace(mean=mean, mean_biased=mean_biased)
        if counts_updates:
            new = new._replace(num_updates=jnp.where(any_data, num_updates + 1, num_updates))
        if not renorm:
            variance, _ = step(plain_average, state.variance, None, values["variance"])
            return new._replace(variance=variance)
        stddev, _ = step(plain_average, state.stddev, None, values["stddev"])
        renorm_mean, _ = step(renorm_average, state.renorm_mean, None, values["mean"])
        renorm_stddev, _ = step(renorm_average, state.renorm_stddev, None, values["renorm_stddev"])
        return new._replace(
            variance=_renorm_variance(stddev, epsilon),
            stddev=stddev,
            renorm_mean=renorm_mean,
            renorm_stddev=renorm_stddev,
        )

    return RunningStatisticsUpdate(init, update)


def _renorm_variance(stddev: jax.Array, epsilon: float) -> jax.Array:
    """The variance TF1 reports for a moving stddev; the clamp absorbs round-off below 0."""
    return jnp.maximum(jnp.square(stddev) - epsilon, 0).astype(stddev.dtype)

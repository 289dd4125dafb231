"""Batch statistics: `moments` and `weighted_moments`, local and across devices.

Numerics (README, "Numerics, and why they are what they are"):

* Statistics accumulate in `promote_types(x.dtype, float32)`: float32 for bf16/fp16/float32
  inputs, float64 for float64 inputs. They are returned in that dtype too, so a bf16 network
  keeps float32 running averages.
* Two-pass variance. `var = E[x^2] - E[x]^2` reads `x` once but cancels catastrophically when
  |mean| >> std (flax's default: at N(1e4, 1) in float32 it is off by ~7e4x). jbn sums the
  deviations from a provisional mean instead (see `_local_statistics`): exact whatever the mean,
  never negative, and no branch (a `lax.cond` would compile both paths). Each of its three sums
  reads `x` once with the subtraction fused into the reduction: one read more than the one-pass
  sums.
* Weighted or masked statistics use the same formulas with weights; elements with weight 0 are
  excluded with `where`, so padding may hold anything, NaN included.
* Across devices every device reduces its own shard to `(count, mean, m2)` (m2 = sum of squared
  deviations) and the shards are merged exactly with Chan et al.'s pairwise formula

      N = sum_i n_i,  mean = sum_i n_i mean_i / N,  m2 = sum_i [m2_i + n_i (mean_i - mean)^2],

  with two `psum`s of small per-feature arrays. This is the statistic of the
  concatenated global batch, also when devices hold different numbers of counted elements
  (not flax's mean of per-device means, flax#2417).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _checks

__all__ = ["moments", "weighted_moments"]


class Statistics(NamedTuple):
    """Per-feature statistics with the reduced axes kept as size-1 dimensions.

    All fields have the accumulation dtype (float32 or wider). `count` is the (weighted) number
    of elements each statistic summarizes, over all devices when an `axis_name` was given.
    """

    count: jax.Array
    mean: jax.Array
    variance: jax.Array


def accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for bf16/fp16/float32 inputs, the input dtype when wider."""
    return jnp.promote_types(dtype, jnp.float32)


def counted_values(x: jax.Array, weights: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """(x, weights) in the accumulation dtype, at full shape, zeroed where the weight is 0.

    Zeroing keeps padding (which may hold NaN or inf) out of every product and sum.
    """
    acc = accumulation_dtype(x.dtype)
    x = x.astype(acc)
    if weights is None:
        return x, None
    weights = jnp.broadcast_to(weights.astype(acc), x.shape)
    return jnp.where(weights != 0, x, 0), weights


def _local_statistics(
    x: jax.Array, reduce_axes: tuple[int, ...], weights: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(count, mean, m2) of this device's shard, reduced axes kept, in the accumulation dtype.

    Two passes, with no branch to compile: a provisional mean `shift = sum(w x) / N`, then the
    sums of the deviations from it, `S1 = sum w (x - shift)` and `S2 = sum w (x - shift)^2`, and
    (Chan et al.)

        mean = shift + S1 / N,    m2 = S2 - S1^2 / N.

    The deviations are of the order of the spread, so nothing cancels however large the mean
    (unlike `sum(w x^2) - N mean^2`), and `S1` removes the provisional mean's round-off, which
    would otherwise enter m2 as `N (round-off)^2`. Each sum is one read of `x`, the subtraction
    fused into it: the shift reaches the `S1` reduction through `lax.optimization_barrier`, so
    that XLA does not share one `x - shift` between the two reductions, which on CPU writes it
    out in full first (several times slower).
    """
    xw, weights = counted_values(x, weights)
    acc = xw.dtype
    weighted = (lambda v: v) if weights is None else (lambda v: weights * v)
    if weights is None:
        count = 1
        for a in reduce_axes:
            count *= x.shape[a]
        count = jnp.asarray(count, acc)
    else:
        count = jnp.sum(weights, reduce_axes, keepdims=True)
    safe_count = jnp.where(count == 0, 1, count)
    # Any shift gives the same statistics, and so the same derivatives: hold it constant.
    shift = lax.stop_gradient(jnp.sum(weighted(xw), reduce_axes, keepdims=True) / safe_count)
    sum_deviations = jnp.sum(
        weighted(xw - lax.optimization_barrier(shift)), reduce_axes, keepdims=True
    )
    deviation = xw - shift
    sum_squares = jnp.sum(weighted(deviation * deviation), reduce_axes, keepdims=True)
    correction = sum_deviations / safe_count
    m2 = jnp.maximum(sum_squares - correction * sum_deviations, 0)
    return jnp.broadcast_to(count, correction.shape), shift + correction, m2


def _merge_across_devices(count, mean, m2, axis_name, axis_index_groups):
    """Chan's exact merge of per-device (count, mean, m2) over `axis_name`, by two psums."""
    psum = lambda v: lax.psum(v, axis_name, axis_index_groups=axis_index_groups)
    total, weighted_sum = psum((count, count * mean))
    global_mean = weighted_sum / jnp.where(total == 0, 1, total)
    global_m2 = psum(m2 + count * jnp.square(mean - global_mean))
    return total, global_mean, global_m2


def statistics(
    x: jax.Array,
    reduce_axes: tuple[int, ...],
    weights: jax.Array | None = None,
    axis_name=None,
    axis_index_groups=None,
) -> Statistics:
    """Count, mean and biased variance over `reduce_axes` (kept) and `axis_name`.

    The building block of every public function; arguments are assumed checked. A feature with
    zero total weight gets mean 0 and variance 0.
    """
    count, mean, m2 = _local_statistics(x, reduce_axes, weights)
    if axis_name is not None:
        count, mean, m2 = _merge_across_devices(count, mean, m2, axis_name, axis_index_groups)
    safe_count = jnp.where(count == 0, 1, count)
    # m2 >= 0 already; the clamp matters only for (traced) negative weights, whose negative
    # count would otherwise flip the sign: the variance is never negative.
    return Statistics(count, mean, jnp.maximum(m2 / safe_count, 0))


def _finish(stats: Statistics, axes: tuple[int, ...], keepdims: bool):
    if keepdims:
        return stats.mean, stats.variance
    return jnp.squeeze(stats.mean, axes), jnp.squeeze(stats.variance, axes)


def moments(
    x: jax.Array,
    axes: int | Sequence[int],
    *,
    keepdims: bool = False,
    mask: jax.Array | None = None,
    axis_name=None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance of `x` over `axes`, like `tf.nn.moments`.

        mean = sum_i m_i x_i / sum_i m_i,    variance = sum_i m_i (x_i - mean)^2 / sum_i m_i,

    where `i` runs over `axes` (and over devices when `axis_name` is given) and `m` is the mask
    (all ones without one).

    Args:
      x: floating array of any shape; bf16/fp16 are reduced in float32.
      axes: int or sequence of ints, the axes to reduce (negative values count from the end).
      keepdims: keep the reduced axes as size-1 dimensions.
      mask: optional boolean array broadcastable to `x.shape`; True marks elements that count.
        Masked-out elements may hold any value (NaN included). A feature with no counted
        element gets mean 0 and variance 0.
      axis_name: a `pmap`/`shard_map`/`vmap` axis name (or tuple of names): the statistics are
        those of the concatenation of every device's `x`, merged exactly by counts.
      axis_index_groups: optional groups of device indices along `axis_name` that reduce
        separately (pmap only).

    Returns:
      `(mean, variance)`, each of shape `x.shape` without `axes` (or with them as 1 if
      `keepdims`), dtype `promote_types(x.dtype, float32)`. The variance is never negative.
    """
    _checks.check_floating(x, "x")
    x = jnp.asarray(x)
    reduce_axes = _checks.normalize_axes(axes, x.ndim, "axes")
    groups = _checks.canonical_groups(axis_name, axis_index_groups)
    weights = None
    if mask is not None:
        _checks.check_mask(mask, x.shape)
        weights = jnp.asarray(mask)
    stats = statistics(x, reduce_axes, weights, _checks.canonical_axis_name(axis_name), groups)
    return _finish(stats, reduce_axes, keepdims)


def weighted_moments(
    x: jax.Array,
    axes: int | Sequence[int],
    frequency_weights: jax.Array,
    *,
    keepdims: bool = False,
    axis_name=None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Frequency-weighted mean and biased variance, like `tf.nn.weighted_moments`.

        mean = sum_i w_i x_i / sum_i w_i,    variance = sum_i w_i (x_i - mean)^2 / sum_i w_i.

    Args:
      x: floating array.
      axes: axes to reduce.
      frequency_weights: non-negative weights broadcastable to `x.shape` (e.g. shape `(B, 1, 1,
        1)` for per-example weights of an NHWC batch). Elements with weight 0 are ignored,
        whatever their value. Concrete negative weights raise ValueError; traced ones (under
        `jit`) cannot be checked without a host sync and give a meaningless mean and a
        variance clamped at 0 (never negative).
      keepdims, axis_name, axis_index_groups: as in `moments`; across devices the weights'
        sums are merged exactly.

    Returns:
      `(mean, variance)` as in `moments`.
    """
    _checks.check_floating(x, "x")
    x = jnp.asarray(x)
    reduce_axes = _checks.normalize_axes(axes, x.ndim, "axes")
    groups = _checks.canonical_groups(axis_name, axis_index_groups)
    frequency_weights = _checks.frequency_weights(frequency_weights, "frequency_weights")
    _checks.check_broadcastable(frequency_weights, x.shape, "frequency_weights")
    stats = statistics(
        x, reduce_axes, frequency_weights, _checks.canonical_axis_name(axis_name), groups
    )
    return _finish(stats, reduce_axes, keepdims)

"""The training kernels: batch norm of one batch, unchecked, in one table.

Every training path in jbn (the public functions and the layers) runs one of three kernels, all
with one signature,

    kernel(x, params, weights, feature_axes, epsilon, axis_name, axis_index_groups)
        -> (y, BatchStatistics)

* `fused`: statistics and normalization as one op whose `jax.custom_jvp` is the closed-form
  batch-norm derivative (below);
* `composite`: `jbn.stats.statistics`, then `normalize`; autodiff's derivative, and the only
  kernel for frequency weights;
* `renorm`: batch renormalization (`jbn.renorm`), the batch statistics corrected towards the
  running ones; its clipping bounds are bound with `functools.partial`.

`ghost_batches(kernel, virtual_batch_size)` turns any of them into ghost batch norm: the batch
is regrouped into a leading axis of ghost batches, the kernel runs once on that view, and the
output is reshaped back. `jbn.layer.LayerOptions.kernel` picks the kernel for a layer.

Nothing here checks its arguments: the public functions (`jbn.fused_batch_norm`,
`jbn.ghost_batch_norm`, `jbn.batch_renorm`, `jbn.batch_normalization`, `jbn.renorm_correction`)
check theirs at the boundary, and the layers' are checked once by `jbn.layer.LayerOptions`.
The arguments:

  x: floating input; `feature_axes` (sorted) are not reduced, every other axis is.
  params: `FeatureParams`, each entry None or an array broadcastable to `x` with size 1 on
    every reduced axis (a "keepdims" shape).
  weights: None, a boolean mask or float frequency weights, broadcastable to `x`; elements of
    weight 0 (padding) may hold anything, NaN included: they reach no statistic and no shared
    gradient.
  epsilon: a Python float.
  axis_name, axis_index_groups: the devices (or vmapped examples) the statistics span; the
    name bound, the groups canonical (`jbn._checks`).

They return `y` with `x`'s shape and dtype, and the statistics shaped
`tuple(x.shape[a] for a in feature_axes)`.

The fused op's derivative. A JVP rule rather than a `custom_vjp` because forward-mode AD
(`jvp`, `jacfwd`, `hessian`) must keep working; reverse mode transposes the rule's linear
tangent map, which yields the classic backward pass

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),   g = dy * scale,
    dscale = sum(dy * xhat),   doffset = sum(dy),

two reductions (shared by all three gradients) and one elementwise pass, instead of autodiff's
walk back through every intermediate of the statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbn.running import BatchStatistics
from jbn.stats import accumulation_dtype, counted_values, statistics

__all__ = [
    "KERNELS",
    "FeatureParams",
    "Kernel",
    "composite",
    "fused",
    "ghost_batches",
    "ghost_view",
    "normalize",
    "renorm",
    "renorm_correction",
]


class FeatureParams(NamedTuple):
    """The per-feature inputs of a kernel, each None or keepdims-shaped (see the module).

    Attributes:
      scale, offset: `gamma` and `beta` (None: 1 and 0).
      renorm_mean, renorm_stddev: the renorm correction statistics (`renorm` only).
    """

    scale: jax.Array | None = None
    offset: jax.Array | None = None
    renorm_mean: jax.Array | None = None
    renorm_stddev: jax.Array | None = None


Kernel = Callable[..., tuple[jax.Array, BatchStatistics]]


def normalize(x, mean, variance, offset, scale, epsilon, mask=None) -> jax.Array:
    """`(x - mean) / sqrt(variance + epsilon) * scale + offset` in `promote_types(x.dtype,
    float32)`, rounded once to x's dtype; the body of `jbn.batch_normalization`.

    With a boolean `mask`, masked-out elements see `mean`, `variance`, `offset` and `scale` as
    constants (`stop_gradient`): whatever they hold reaches only their own output and input
    gradient.
    """
    acc = accumulation_dtype(x.dtype)
    mean = jnp.asarray(mean, acc)
    inv = lax.rsqrt(jnp.asarray(variance, acc) + jnp.asarray(epsilon, acc))
    if scale is not None:
        inv = inv * jnp.asarray(scale, acc)
    offset = None if offset is None else jnp.asarray(offset, acc)
    x_acc = x.astype(acc)

    def affine(x_acc, mean, inv, offset):
        y = (x_acc - mean) * inv
        return y if offset is None else y + offset

    if mask is None:
        return affine(x_acc, mean, inv, offset).astype(x.dtype)
    # Counted elements see the differentiable statistics; masked-out ones see constants, and
    # the counted branch reads 0 there, so no NaN * 0 reaches a shared gradient.
    counted = affine(jnp.where(mask, x_acc, 0), mean, inv, offset)
    padding = affine(x_acc, *lax.stop_gradient((mean, inv, offset)))
    return jnp.where(mask, counted, padding).astype(x.dtype)


def renorm_correction(
    batch_mean, batch_variance, running_mean, running_stddev, epsilon, rmax, rmin, dmax
) -> tuple[jax.Array, jax.Array]:
    """Renorm's `(r, d)` under `stop_gradient`; the body of `jbn.renorm_correction`."""
    batch_stddev = jnp.sqrt(batch_variance + epsilon)
    running_stddev = jnp.maximum(running_stddev, jnp.sqrt(jnp.asarray(epsilon, batch_stddev.dtype)))
    r = batch_stddev / running_stddev
    d = (batch_mean - running_mean) / running_stddev
    if rmin is not None:
        r = jnp.maximum(r, rmin)
    if rmax is not None:
        r = jnp.minimum(r, rmax)
    if dmax is not None:
        d = jnp.clip(d, -dmax, dmax)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def _reduce_axes(ndim: int, feature_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in feature_axes)


def _as_mask(weights):
    """The boolean "counts" mask of a mask or of frequency weights (None stays None)."""
    if weights is None or weights.dtype == jnp.bool_:
        return weights
    return weights != 0


def _feature_shaped(x_shape, feature_axes, count, mean, variance) -> BatchStatistics:
    """Keepdims statistics as `BatchStatistics` of the statistics' shape."""
    shape = tuple(x_shape[a] for a in feature_axes)
    as_stats = lambda v: jnp.broadcast_to(v, mean.shape).reshape(shape)
    return BatchStatistics(as_stats(count), as_stats(mean), as_stats(variance))


def fused(x, params, weights, feature_axes, epsilon, axis_name, axis_index_groups):
    """The fused kernel: `_train_normalize`, with its closed-form derivative."""
    y, mean, variance, count = _train_normalize(
        x,
        params.scale,
        params.offset,
        weights,
        _reduce_axes(x.ndim, feature_axes),
        epsilon,
        axis_name,
        axis_index_groups,
    )
    return y, _feature_shaped(x.shape, feature_axes, count, mean, variance)


def composite(x, params, weights, feature_axes, epsilon, axis_name, axis_index_groups):
    """The composite kernel: statistics, then `normalize` (autodiff through both)."""
    stats = statistics(x, _reduce_axes(x.ndim, feature_axes), weights, axis_name, axis_index_groups)
    y = normalize(
        x, stats.mean, stats.variance, params.offset, params.scale, epsilon, _as_mask(weights)
    )
    return y, _feature_shaped(x.shape, feature_axes, *stats)


def renorm(
    x,
    params,
    weights,
    feature_axes,
    epsilon,
    axis_name,
    axis_index_groups,
    *,
    rmax=None,
    rmin=None,
    dmax=None,
):
    """The renorm kernel: the batch statistics, corrected by `renorm_correction` towards
    `params.renorm_mean`/`params.renorm_stddev`; `rmax`, `rmin`, `dmax` bound by the caller."""
    stats = statistics(x, _reduce_axes(x.ndim, feature_axes), weights, axis_name, axis_index_groups)
    r, d = renorm_correction(
        stats.mean,
        stats.variance,
        params.renorm_mean,
        params.renorm_stddev,
        epsilon,
        rmax,
        rmin,
        dmax,
    )
    scale, offset = params.scale, params.offset
    gamma = r if scale is None else scale * r
    beta = d if scale is None else scale * d
    if offset is not None:
        beta = beta + offset
    y = normalize(x, stats.mean, stats.variance, beta, gamma, epsilon, _as_mask(weights))
    return y, _feature_shaped(x.shape, feature_axes, *stats)


#: The kernels by name; `jbn.layer.LayerOptions.kernel` chooses among them.
KERNELS: dict[str, Kernel] = {"fused": fused, "composite": composite, "renorm": renorm}


def ghost_view(
    x_shape: tuple[int, ...], virtual_batch_size: int, feature_axes: tuple[int, ...]
) -> tuple[Callable, tuple[int, ...]]:
    """Ghost batches as a leading axis: `(regroup, ghost_feature_axes)`.

    `regroup(value)` reshapes `x` (or a mask or weights broadcastable to it; None stays None)
    from `(B, ...)` to `(B // virtual_batch_size, virtual_batch_size, ...)`; in that shape
    axis 0 indexes the ghost batches and, like the features (`ghost_feature_axes`), is not
    reduced.
    """
    ghost_shape = (x_shape[0] // virtual_batch_size, virtual_batch_size, *x_shape[1:])

    def regroup(value):
        return None if value is None else jnp.broadcast_to(value, x_shape).reshape(ghost_shape)

    return regroup, (0, *(a + 1 for a in feature_axes))


def ghost_batches(kernel: Kernel, virtual_batch_size: int) -> Kernel:
    """`kernel` run on each ghost batch of `virtual_batch_size` consecutive examples (axis 0,
    which divides evenly and is not a feature axis): one call on the regrouped view.

    The statistics get a leading axis of ghost batches. They are per device whatever the
    `axis_name`: a ghost batch is a slice of this device's batch (only the running update,
    `jbn.running`, pools them across devices).
    """

    def ghost_kernel(x, params, weights, feature_axes, epsilon, axis_name, axis_index_groups):
        del axis_name, axis_index_groups  # Ghost statistics are local by definition.
        regroup, ghost_axes = ghost_view(x.shape, virtual_batch_size, feature_axes)
        # Parameters gain the leading ghost axis: the same value per feature in every ghost batch.
        ghosts = x.shape[0] // virtual_batch_size
        ghost_params = jax.tree.map(lambda p: jnp.broadcast_to(p, (ghosts, *p.shape)), params)
        y, batch = kernel(
            regroup(x), ghost_params, regroup(weights), ghost_axes, epsilon, None, None
        )
        return y.reshape(x.shape), batch

    return ghost_kernel


def _psum(value, axis_name, axis_index_groups):
    if axis_name is None:
        return value
    return lax.psum(value, axis_name, axis_index_groups=axis_index_groups)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def _train_normalize(x, scale, offset, weights, reduce_axes, epsilon, axis_name, groups):
    """(y, mean, variance, count) with keepdims statistics (count: the counted elements behind
    each statistic, over devices; it has no derivative); scale/offset keepdims-shaped or None."""
    stats = statistics(x, reduce_axes, weights, axis_name, groups)
    rstd = lax.rsqrt(stats.variance + epsilon)
    y = _affine((x.astype(rstd.dtype) - stats.mean) * rstd, scale, offset)
    return y.astype(x.dtype), stats.mean, stats.variance, stats.count


def _affine(xhat, scale, offset):
    if scale is not None:
        xhat = xhat * scale.astype(xhat.dtype)
    if offset is not None:
        xhat = xhat + offset.astype(xhat.dtype)
    return xhat


@_train_normalize.defjvp
def _train_normalize_jvp(reduce_axes, epsilon, axis_name, groups, primals, tangents):
    x, scale, offset, weights = primals
    x_dot, scale_dot, offset_dot, _ = tangents
    stats = statistics(x, reduce_axes, weights, axis_name, groups)
    rstd = lax.rsqrt(stats.variance + epsilon)
    y = _affine((x.astype(rstd.dtype) - stats.mean) * rstd, scale, offset)
    primals_out = (y.astype(x.dtype), stats.mean, stats.variance, stats.count)

    # Sums over counted elements use xw (zero where the weight is 0, so padding may hold NaN);
    # the elementwise terms use x itself: padding is normalized like everything else.
    xw, weights = counted_values(x, weights)
    acc = xw.dtype
    x_acc = x.astype(acc)
    safe_count = jnp.where(stats.count == 0, 1, stats.count)
    gamma = jnp.ones_like(rstd) if scale is None else scale.astype(acc)
    scale_dot = None if scale is None else scale_dot.astype(acc)
    offset_dot = None if offset is None else offset_dot.astype(acc)

    def local_sums(x_dot):
        # With m = mean, s = rstd, N = count, w = weights (1 without a mask):
        #   mean_dot = sum(w x_dot) / N,   p = sum(w x_dot (x - m)) / N,   var_dot = 2 p,
        #   y_dot = gamma s (x_dot - mean_dot) - gamma s^3 p (x - m) + scale_dot s (x - m)
        #           + offset_dot.
        # Deviations from the mean, not sum(w x_dot x) - m sum(w x_dot): that cancels when
        # |m| >> std. Reverse mode transposes this map into the two sums sum(dy) and
        # sum(dy (x - m)) and one elementwise pass.
        counted_dot = x_dot if weights is None else weights * x_dot
        # The sum reads its own `x - m` (the mean behind a barrier): were it shared with the
        # elementwise term below, XLA:CPU would write it out in full for both.
        counted_deviation = xw - lax.optimization_barrier(stats.mean)
        if weights is not None:
            counted_deviation = jnp.where(weights != 0, counted_deviation, 0)
        return (
            jnp.sum(counted_dot, reduce_axes, keepdims=True),
            jnp.sum(counted_dot * counted_deviation, reduce_axes, keepdims=True),
        )

    def tangent(x_dot, scale_dot, offset_dot, sums=None):
        if sums is None:
            sums = local_sums(x_dot)
        mean_dot = sums[0] / safe_count
        p = sums[1] / safe_count
        a = gamma * rstd
        # One `x - m` term, so that the transpose has a single sum(dy (x - m)) reduction.
        coefficient = -gamma * rstd**3 * p
        if scale_dot is not None:
            coefficient = coefficient + scale_dot * rstd
        deviation = (x_acc if weights is None else xw) - stats.mean
        shared = deviation * coefficient - mean_dot * a
        if offset_dot is not None:
            shared = shared + offset_dot
        if weights is not None:
            # Masked-out elements see the statistics and parameters as constants (as in
            # `batch_normalization(mask=)`): whatever they hold reaches no shared gradient.
            shared = jnp.where(weights != 0, shared, 0)
        y_dot = x_dot * a + shared
        return y_dot.astype(x.dtype), mean_dot, 2 * p

    # Rematerialized so that linearization keeps no full-size residual (x - m): the backward
    # pass recomputes it from x and the mean. Across devices the psum stays outside the
    # rematerialized parts: `jax.checkpoint` traces its function apart, and under
    # `vmap(axis_name=...)` inside `jit` this rule is traced only when differentiated, after
    # vmap's named axis is unbound (a psum traced there would be refused).
    x_dot = x_dot.astype(acc)
    if axis_name is None:
        tangents_out = jax.checkpoint(tangent)(x_dot, scale_dot, offset_dot)
    else:
        sums = _psum(jax.checkpoint(local_sums)(x_dot), axis_name, groups)
        tangents_out = jax.checkpoint(tangent)(x_dot, scale_dot, offset_dot, sums)
    return primals_out, (*tangents_out, jnp.zeros_like(stats.count))

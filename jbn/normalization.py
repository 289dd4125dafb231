"""Normalization: `batch_normalization` (given statistics) and the fused training op.

The fused op computes the batch statistics, normalizes, and carries a `jax.custom_jvp` whose
tangent is the closed-form batch-norm derivative. A JVP rule rather than a `custom_vjp` because
forward-mode AD (`jvp`, `jacfwd`, `hessian`) must keep working; reverse mode transposes the rule's
linear tangent map, which yields the classic backward pass

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),   g = dy * scale,
    dscale = sum(dy * xhat),   doffset = sum(dy),

two reductions (shared by all three gradients) and one elementwise pass, instead of autodiff's
walk back through every intermediate of the statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _checks
from jbn.stats import accumulation_dtype, counted_values, statistics

__all__ = ["batch_normalization", "fused_batch_norm", "ghost_batch_norm", "ghost_view"]


def batch_normalization(
    x: jax.Array,
    mean: jax.Array,
    variance: jax.Array,
    offset: jax.Array | None,
    scale: jax.Array | None,
    variance_epsilon: float,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Normalizes with given statistics, like `tf.nn.batch_normalization`:

        y = (x - mean) * scale / sqrt(variance + variance_epsilon) + offset

    Args:
      x: floating array of any shape.
      mean, variance: real arrays broadcastable to `x.shape` (e.g. keepdims statistics, or
        shape `(C,)` for a trailing feature axis).
      offset, scale: `beta` and `gamma`, real, broadcastable to `x.shape`, or None (0 and 1).
      variance_epsilon: positive float added to the variance inside the square root.
      mask: optional boolean array broadcastable to `x.shape`, False for padding. Masked-out
        elements are normalized too, but with `mean`, `variance`, `offset` and `scale` held
        constant (`stop_gradient`): whatever they hold (NaN, Inf) reaches only their own output
        and their own input gradient, never the gradients of the statistics or parameters.

    Returns:
      `y` with `x`'s shape and dtype. bf16/fp16 inputs are normalized in float32 and rounded once.
    """
    _checks.check_floating(x, "x")
    x = jnp.asarray(x)
    _checks.check_epsilon(variance_epsilon, "variance_epsilon")
    for name, value in (
        ("mean", mean),
        ("variance", variance),
        ("offset", offset),
        ("scale", scale),
    ):
        if value is not None:
            _checks.check_real(value, name)
            _checks.check_broadcastable(value, x.shape, name)
    acc = accumulation_dtype(x.dtype)
    mean = jnp.asarray(mean, acc)
    inv = lax.rsqrt(jnp.asarray(variance, acc) + jnp.asarray(variance_epsilon, acc))
    if scale is not None:
        inv = inv * jnp.asarray(scale, acc)
    offset = None if offset is None else jnp.asarray(offset, acc)
    x_acc = x.astype(acc)

    def normalize(x_acc, mean, inv, offset):
        y = (x_acc - mean) * inv
        return y if offset is None else y + offset

    if mask is None:
        return normalize(x_acc, mean, inv, offset).astype(x.dtype)
    _checks.check_mask(mask, x.shape)
    mask = jnp.asarray(mask)
    # Counted elements see the differentiable statistics; masked-out ones see constants, and
    # the counted branch reads 0 there, so no NaN * 0 reaches a shared gradient.
    counted = normalize(jnp.where(mask, x_acc, 0), mean, inv, offset)
    padding = normalize(x_acc, *lax.stop_gradient((mean, inv, offset)))
    return jnp.where(mask, counted, padding).astype(x.dtype)


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


def feature_param(value, name: str, feature_axes, x_shape) -> jax.Array | None:
    """Checks a per-feature parameter and reshapes it to broadcast against `x`."""
    if value is None:
        return None
    value = jnp.asarray(value)
    feature_shape = tuple(x_shape[a] for a in feature_axes)
    if value.shape != feature_shape:
        raise ValueError(
            f"{name} must have the feature shape {feature_shape} (x's size along axis "
            f"{feature_axes}), got {value.shape}."
        )
    _checks.check_floating(value, name)
    keep_shape = tuple(x_shape[a] if a in feature_axes else 1 for a in range(len(x_shape)))
    return value.reshape(keep_shape)


def _prepare(x, scale, offset, epsilon, axis, axis_name, axis_index_groups, mask):
    _checks.check_floating(x, "x")
    x = jnp.asarray(x)
    epsilon = _checks.static_epsilon(epsilon, "epsilon")
    feature_axes = _checks.normalize_axes(axis, x.ndim, "axis")
    reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    if not reduce_axes and axis_name is None:
        # With axis_name the batch is the named axis (a per-example input under
        # `vmap(..., axis_name=...)`, or one example per device): nothing local is reduced.
        raise ValueError(
            f"x of shape {x.shape} has no axis left to reduce once the feature axis {axis} is "
            "removed; batch norm needs a batch axis, or an axis_name whose axis is the batch "
            "(a per-example input under jax.vmap(..., axis_name=...))."
        )
    groups = _checks.canonical_groups(axis_name, axis_index_groups)
    if mask is not None:
        _checks.check_mask(mask, x.shape)
        mask = jnp.asarray(mask)
    scale = feature_param(scale, "scale", feature_axes, x.shape)
    offset = feature_param(offset, "offset", feature_axes, x.shape)
    return x, scale, offset, epsilon, feature_axes, reduce_axes, groups, mask


def fused_batch_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    offset: jax.Array | None = None,
    *,
    epsilon: float = 1e-3,
    axis: int | Sequence[int] = -1,
    axis_name=None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    return_count: bool = False,
) -> tuple[jax.Array, ...]:
    """Training-mode batch norm: statistics of this batch, then normalization.

        mean, var = moments(x, all axes but `axis`, mask=mask, axis_name=...)
        y = (x - mean) / sqrt(var + epsilon) * scale + offset

    The statistics are two-pass, a mean and then the deviations from it (see `jbn.stats`), so
    they stay exact however large the mean, and the derivative is the closed form (see the
    module docstring), also computed from deviations. Neither has a branch. Gradients equal
    autodiff of `moments` + `batch_normalization`; forward- and reverse-mode both work, to any
    order.

    Args:
      x: floating array, e.g. NHWC `(B, H, W, C)` with `axis=-1` or NCHW with `axis=1`.
      scale: `gamma` of the feature shape (`x.shape[axis]`, a tuple of sizes for several
        feature axes), or None for 1.
      offset: `beta` of the feature shape, or None for 0.
      epsilon: positive float inside the square root (TF's default 1e-3).
      axis: feature axis or axes; every other axis is reduced. With `axis_name` there may be
        none left: a per-example input (e.g. `(C,)` or `(C, H, W)` with `axis=0`) under
        `jax.vmap(..., axis_name=...)` (or one example per device) is normalized with the
        statistics of the whole named axis, exactly, masks and gradients included.
      axis_name, axis_index_groups: reduce across devices too (see `jbn.moments`). Under
        `pmap`, gradients are those of the sum of every device's loss, like autodiff of `psum`.
      mask: optional boolean array broadcastable to `x.shape`; False elements don't count in
        the statistics (padding). They are still normalized, with the statistics and
        parameters held constant (see `batch_normalization`), so whatever they hold (NaN, Inf)
        reaches no gradient but their own.
      return_count: also return the number of counted elements behind each statistic (over
        every device with `axis_name`), what `jbn.running` needs for Bessel's correction and
        count-weighted pooling.

    Returns:
      `(y, batch_mean, batch_variance)`, and `count` last when `return_count`: `y` has `x`'s
      shape and dtype; the statistics have the feature shape and dtype
      `promote_types(x.dtype, float32)`; the variance is biased and never negative.

    Raises:
      ValueError: when, without `axis_name`, `x` has one value per feature (e.g. shape
        `(1, C)`): its variance would be 0 and `y` all `offset`. Only the static shape is
        checked; a mask that leaves one counted value is the caller's business.
    """
    x, scale, offset, epsilon, feature_axes, reduce_axes, groups, mask = _prepare(
        x, scale, offset, epsilon, axis, axis_name, axis_index_groups, mask
    )
    _checks.check_several_values(x.shape, feature_axes, axis_name)
    y, mean, variance, count = _train_normalize(
        x,
        scale,
        offset,
        mask,
        reduce_axes,
        epsilon,
        _checks.canonical_axis_name(axis_name),
        groups,
    )
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    outputs = (y, mean.reshape(feature_shape), variance.reshape(feature_shape))
    return (*outputs, count.reshape(feature_shape)) if return_count else outputs


def ghost_view(
    x_shape: tuple[int, ...], virtual_batch_size: int, feature_axes: tuple[int, ...]
) -> tuple[Callable, tuple[int, ...]]:
    """Ghost batches as a leading axis: `(regroup, ghost_feature_axes)`.

    `regroup(value)` reshapes `x` (or a mask or weights broadcastable to it; None stays None)
    from `(B, ...)` to `(B // virtual_batch_size, virtual_batch_size, ...)`; in that shape
    axis 0 indexes the ghost batches and, like the features (`ghost_feature_axes`), is not
    reduced. Reshape the output back with `x_shape`. Arguments are the caller's, checked.
    """
    ghost_shape = (x_shape[0] // virtual_batch_size, virtual_batch_size, *x_shape[1:])

    def regroup(value):
        return None if value is None else jnp.broadcast_to(value, x_shape).reshape(ghost_shape)

    return regroup, (0, *(a + 1 for a in feature_axes))


def ghost_batch_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    offset: jax.Array | None = None,
    *,
    virtual_batch_size: int,
    epsilon: float = 1e-3,
    axis: int | Sequence[int] = -1,
    mask: jax.Array | None = None,
    return_count: bool = False,
) -> tuple[jax.Array, ...]:
    """Ghost batch norm (Hoffer et al. 2017): `fused_batch_norm` per virtual sub-batch.

    The batch (axis 0) is split into `B // virtual_batch_size` consecutive groups, and each group
    is normalized with its own statistics. For training only: at inference normalize with moving
    statistics, whatever the batch size (keras#15790 got this wrong).

    Args:
      x: floating array whose axis 0 is the batch, `B` divisible by `virtual_batch_size`.
      scale, offset, epsilon, axis, mask, return_count: as in `fused_batch_norm` (`axis`
        must not be 0).
      virtual_batch_size: positive int (Python or numpy), the size of each ghost batch.

    Returns:
      `(y, batch_mean, batch_variance)`, and `count` last when `return_count`: `y` like `x`;
      statistics of shape `(B // virtual_batch_size, *feature_shape)`, one row per ghost batch.
      A ghost batch of one value per feature raises ValueError, as in `fused_batch_norm`.
    """
    x, scale, offset, epsilon, feature_axes, _, _, mask = _prepare(
        x, scale, offset, epsilon, axis, None, None, mask
    )
    virtual_batch_size = _checks.positive_int(virtual_batch_size, "virtual_batch_size")
    batch = x.shape[0]
    _checks.check_ghost_batches(batch, virtual_batch_size, feature_axes)
    _checks.check_several_values(x.shape, feature_axes, None, virtual_batch_size)
    regroup, kept = ghost_view(x.shape, virtual_batch_size, feature_axes)
    ghost_x = regroup(x)
    reduce_axes = tuple(a for a in range(ghost_x.ndim) if a not in kept)
    expand = lambda p: None if p is None else p[None]
    y, mean, variance, count = _train_normalize(
        ghost_x, expand(scale), expand(offset), regroup(mask), reduce_axes, epsilon, None, None
    )
    stats_shape = tuple(ghost_x.shape[a] for a in kept)
    outputs = (y.reshape(x.shape), mean.reshape(stats_shape), variance.reshape(stats_shape))
    return (*outputs, count.reshape(stats_shape)) if return_count else outputs

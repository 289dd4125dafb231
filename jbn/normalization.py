"""Normalization: `batch_normalization` (given statistics) and the fused training ops.

The public functions here check their arguments, once, and run a kernel of `jbn.kernels`:
`fused_batch_norm` the fused kernel, whose `jax.custom_jvp` is the closed-form batch-norm
derivative (two reductions and one elementwise pass in reverse mode, and forward mode keeps
working), and `ghost_batch_norm` the same kernel on each ghost batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jbn import _checks, kernels

__all__ = ["batch_normalization", "fused_batch_norm", "ghost_batch_norm"]


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
    if mask is not None:
        _checks.check_mask(mask, x.shape)
        mask = jnp.asarray(mask)
    return kernels.normalize(x, mean, variance, offset, scale, variance_epsilon, mask)


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
    """The fused ops' arguments, checked once (errors name them), in the kernels' terms."""
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
    return x, kernels.FeatureParams(scale, offset), epsilon, feature_axes, groups, mask


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

        mean, var = moments(x, all axes but axis, mask=mask, axis_name=...)
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
    x, params, epsilon, feature_axes, groups, mask = _prepare(
        x, scale, offset, epsilon, axis, axis_name, axis_index_groups, mask
    )
    _checks.check_several_values(x.shape, feature_axes, axis_name)
    y, batch = kernels.fused(
        x, params, mask, feature_axes, epsilon, _checks.canonical_axis_name(axis_name), groups
    )
    return (y, batch.mean, batch.variance, batch.count)[: 4 if return_count else 3]


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
    x, params, epsilon, feature_axes, _, mask = _prepare(
        x, scale, offset, epsilon, axis, None, None, mask
    )
    virtual_batch_size = _checks.positive_int(virtual_batch_size, "virtual_batch_size")
    _checks.check_ghost_batches(x.shape[0], virtual_batch_size, feature_axes)
    _checks.check_several_values(x.shape, feature_axes, None, virtual_batch_size)
    y, batch = kernels.ghost_batches(kernels.fused, virtual_batch_size)(
        x, params, mask, feature_axes, epsilon, None, None
    )
    return (y, batch.mean, batch.variance, batch.count)[: 4 if return_count else 3]

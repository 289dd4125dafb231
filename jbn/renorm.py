"""Batch renormalization (Ioffe 2017).

With running statistics `mu`, `sigma` (a standard deviation) and batch statistics `mu_B`,
`sigma_B = sqrt(var_B + epsilon)`:

    r = stop_gradient(clip(sigma_B / sigma, rmin, rmax))
    d = stop_gradient(clip((mu_B - mu) / sigma, -dmax, dmax))
    y = ((x - mu_B) / sigma_B * r + d) * gamma + beta

With r = 1 and d = 0 this is batch norm; with r, d unclipped the output equals normalizing with
the running statistics while the gradient still flows through the batch statistics.

As in TF1 and Keras, `sigma` is floored at `sqrt(epsilon)` (no division by zero when a moving
stddev starts at 0). The moving averages themselves (`renorm_mean`, `renorm_stddev`, and the
inference `moving_stddev` whose `moving_stddev**2 - epsilon` is reported as the moving variance)
are updated by `jbn.running`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jbn import _checks, kernels
from jbn.normalization import feature_param

__all__ = ["batch_renorm", "renorm_correction"]


def renorm_correction(
    batch_mean: jax.Array,
    batch_variance: jax.Array,
    running_mean: jax.Array,
    running_stddev: jax.Array,
    *,
    epsilon: float,
    rmax: float | None = None,
    rmin: float | None = None,
    dmax: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The renorm correction `(r, d)`, both under `stop_gradient`.

    Args:
      batch_mean, batch_variance: this batch's statistics (any shape, e.g. `(C,)`).
      running_mean, running_stddev: the renorm moving averages of the mean and of
        `sqrt(var + epsilon)`, broadcastable to the batch statistics; `running_stddev` is
        floored at `sqrt(epsilon)` as in TF1/Keras.
      epsilon: positive float added to the batch variance.
      rmax, rmin, dmax: clipping bounds as in TF's `renorm_clipping`; None leaves that side
        unclipped (TF's convention; the paper uses rmin = 1 / rmax).

    Returns:
      `(r, d)` with the batch statistics' shape, in float32 or wider.
    """
    _checks.check_epsilon(epsilon, "epsilon")
    _checks.check_clipping(rmax, rmin, dmax)
    return kernels.renorm_correction(
        batch_mean, batch_variance, running_mean, running_stddev, epsilon, rmax, rmin, dmax
    )


def batch_renorm(
    x: jax.Array,
    scale: jax.Array | None,
    offset: jax.Array | None,
    running_mean: jax.Array,
    running_stddev: jax.Array,
    *,
    epsilon: float = 1e-3,
    rmax: float | None = None,
    rmin: float | None = None,
    dmax: float | None = None,
    axis: int | Sequence[int] = -1,
    axis_name=None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    return_count: bool = False,
) -> tuple[jax.Array, ...]:
    """Training-mode batch renormalization.

    Args:
      x: floating array, features along `axis`.
      scale, offset: `gamma`/`beta` of the feature shape, or None.
      running_mean, running_stddev: renorm moving averages, of the feature shape.
      epsilon, rmax, rmin, dmax: see `renorm_correction`.
      axis, axis_name, axis_index_groups, mask, return_count: as in `fused_batch_norm`
        (masked-out elements reach no gradient but their own, whatever they hold).

    Returns:
      `(y, batch_mean, batch_variance)`, and `count` last when `return_count`, as in
      `fused_batch_norm`. Gradients flow through the batch statistics, not through `r` and `d`.
      One value per feature raises ValueError, as in `fused_batch_norm`.
    """
    _checks.check_floating(x, "x")
    x = jnp.asarray(x)
    _checks.check_epsilon(epsilon, "epsilon")
    _checks.check_clipping(rmax, rmin, dmax)
    feature_axes = _checks.normalize_axes(axis, x.ndim, "axis")
    _checks.check_several_values(x.shape, feature_axes, axis_name)
    groups = _checks.canonical_groups(axis_name, axis_index_groups)
    if mask is not None:
        _checks.check_mask(mask, x.shape)
        mask = jnp.asarray(mask)
    # Feature-shaped, checked like fused_batch_norm's: a (1,) gamma must not broadcast silently
    # over C features.
    keep = lambda v, name: feature_param(v, name, feature_axes, x.shape)
    params = kernels.FeatureParams(
        keep(scale, "scale"),
        keep(offset, "offset"),
        keep(running_mean, "running_mean"),
        keep(running_stddev, "running_stddev"),
    )
    y, batch = kernels.renorm(
        x,
        params,
        mask,
        feature_axes,
        epsilon,
        _checks.canonical_axis_name(axis_name),
        groups,
        rmax=rmax,
        rmin=rmin,
        dmax=dmax,
    )
    return (y, batch.mean, batch.variance, batch.count)[: 4 if return_count else 3]

"""Folding an inference-mode batch norm into the preceding convolution or dense layer.

In inference `jbn.BatchNorm` is an affine map per output feature `c`,

    y_c = (z_c - moving_mean_c) * m_c + beta_c,    m_c = gamma_c / sqrt(moving_variance_c + eps),

and `z = conv(x, kernel) + bias` is linear in the kernel's output features, so the pair is one
layer with `kernel' = kernel * m` (along the output-feature axis) and
`bias' = (bias - moving_mean) * m + beta`, like PyTorch's `fuse_conv_bn_eval`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jbn import _checks, linen

__all__ = ["batch_norm_inference_statistics", "fold_batch_norm"]


def fold_batch_norm(
    kernel: jax.Array,
    bias: jax.Array | None,
    batch_stats: Mapping[str, jax.Array],
    params: Mapping[str, jax.Array] | None = None,
    *,
    epsilon: float,
    kernel_output_axis: int = -1,
) -> tuple[jax.Array, jax.Array]:
    """Folds an eval-mode `jbn.BatchNorm` into the kernel and bias of the layer before it.

    `layer(x, kernel', bias')` then equals `BatchNorm(is_training=False)(layer(x, kernel,
    bias))` up to float32 round-off, for any layer linear in its kernel's output features with
    a per-output-feature bias: convolutions of any rank, dense layers, einsums. The result is
    meant for inference only: training needs the batch statistics again.

    Args:
      kernel: the layer's kernel. Flax `nn.Conv` uses HWIO (`(kh, kw, in, out)`) and
        `nn.Dense` `(in, out)`: output features last, `kernel_output_axis=-1` (default). An
        OIHW kernel (PyTorch, or `lax.conv_general_dilated` with dimension numbers
        `('NCHW', 'OIHW', 'NCHW')`) has them first: pass `kernel_output_axis=0`. Note that
        the data format does not decide this (TF's NCHW convolutions keep HWIO kernels).
      bias: the layer's bias, shape `(C,)`, or None for a layer without one.
      batch_stats: the batch norm's `batch_stats` collection; reads `moving_mean` and
        `moving_variance`, shape `(C,)` (extra entries, e.g. renorm's, are ignored: they do
        not enter inference).
      params: the batch norm's `params` collection: `gamma` and `beta` if present (None or
        missing entries: `scale=False` / `center=False`).
      epsilon: the batch norm's `epsilon` (it has no default here: a mismatch would be a
        silent error).
      kernel_output_axis: the kernel's output-feature axis.

    Returns:
      `(kernel, bias)`: the folded kernel, with `kernel`'s shape and dtype, and the folded bias
      of shape `(C,)` and dtype `bias.dtype` (`kernel.dtype` without a bias). The fold is
      computed in float32 or wider.
    """
    kernel = jnp.asarray(kernel)
    _checks.check_floating(kernel, "kernel")
    _checks.check_epsilon(epsilon, "epsilon")
    (output_axis,) = _checks.normalize_axes(kernel_output_axis, kernel.ndim, "kernel_output_axis")
    num_features = kernel.shape[output_axis]
    params = params or {}
    for name in ("moving_mean", "moving_variance"):
        if name not in batch_stats:
            raise ValueError(
                f"batch_stats has no {name!r} (keys {sorted(batch_stats)}); pass the "
                "BatchNorm's batch_stats collection."
            )
    unknown = sorted(set(params) - {"beta", "gamma"})
    if unknown:
        raise ValueError(f"params has unknown keys {unknown}; expected 'beta' and/or 'gamma'.")

    acc = jnp.promote_types(kernel.dtype, jnp.float32)

    def per_feature(value, name: str) -> jax.Array:
        value = jnp.asarray(value)
        if value.shape != (num_features,):
            raise ValueError(
                f"{name} has shape {value.shape}, but the kernel has {num_features} output "
                f"features along axis {kernel_output_axis} (kernel shape {kernel.shape}); check "
                "kernel_output_axis."
            )
        return value.astype(acc)

    moving_mean = per_feature(batch_stats["moving_mean"], "moving_mean")
    moving_variance = per_feature(batch_stats["moving_variance"], "moving_variance")
    multiplier = lax.rsqrt(moving_variance + jnp.asarray(epsilon, acc))
    if "gamma" in params:
        multiplier = multiplier * per_feature(params["gamma"], "gamma")
    layer_bias = jnp.zeros((num_features,), acc) if bias is None else per_feature(bias, "bias")
    folded_bias = (layer_bias - moving_mean) * multiplier
    if "beta" in params:
        folded_bias = folded_bias + per_feature(params["beta"], "beta")

    broadcast_shape = [1] * kernel.ndim
    broadcast_shape[output_axis] = num_features
    folded_kernel = kernel.astype(acc) * multiplier.reshape(broadcast_shape)
    bias_dtype = kernel.dtype if bias is None else jnp.result_type(bias)
    return folded_kernel.astype(kernel.dtype), folded_bias.astype(bias_dtype)


def batch_norm_inference_statistics(
    batch_norm: nn.Module, params: Mapping[str, Any], batch_stats: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """What a linen batch norm normalizes with at inference, in `fold_batch_norm`'s names.

    `batch_norm` is a `jbn.BatchNorm`, a `flax.linen.BatchNorm` or a `jbn.linen.BatchNorm` (the
    bound or unbound module, only its type and `epsilon` are read); `params` and `batch_stats`
    are its variables.

    Returns `(batch_stats, params, epsilon)` for `fold_batch_norm`: the moving mean and variance
    its inference mode reads, its `gamma`/`beta` and its epsilon. `jbn.BatchNorm` keeps them
    under these names (with `zero_debias_moving_mean`, `moving_mean` is already the debiased
    mean; renorm's own statistics only steer training); `flax.linen.BatchNorm` calls them
    `mean`, `var`, `scale`, `bias` (as does `jbn.linen.BatchNorm`; `jbn.linen.FLAX_NAMES`).
    """
    if isinstance(batch_norm, (nn.BatchNorm, linen.BatchNorm)):
        variables = linen.from_flax_variables({"params": params, "batch_stats": batch_stats})
        params, batch_stats = variables["params"], variables["batch_stats"]
    stats = {k: batch_stats[k] for k in ("moving_mean", "moving_variance")}
    return stats, dict(params), batch_norm.epsilon

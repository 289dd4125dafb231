"""Layers with their own derivatives, for speed on XLA:CPU; same values and gradients.

* `max_pool`: a drop-in for `flax.linen.max_pool`. For non-overlapping windows (strides equal to
  the window, the network's 2x2/2 pools) it reshapes the input into windows and takes their
  maximum, with a `custom_jvp` whose tangent is elementwise: the tangent of the first maximal
  element of each window in row-major order (XLA's choice on ties). Reverse mode transposes that
  into one elementwise select. XLA:CPU's own gradient of a max pool (`select_and_scatter`) is
  expanded into a variadic reduce-window argmax over int32 iotas of the activation's size and a
  serial scatter, the largest part of the network's backward pass. Other pools fall back to
  flax's.
* `conv_general_dilated`: a drop-in for `lax.conv_general_dilated` (pass it to
  `flax.linen.Conv(conv_general_dilated=...)`) whose kernel gradient is a forward convolution of
  explicitly transposed operands (see `kernel_gradient`). JAX's transpose rule gives the kernel
  gradient as a convolution with batch and feature labels swapped; XLA:CPU handles that well in
  a single step but, inside `lax.scan`, folds the transposes into convolution labels its fast
  convolution path does not take. Other convolutions fall back to `lax.conv_general_dilated`.

Both keep forward mode (`jax.jvp`) working: the derivatives are `custom_jvp` rules whose
tangents are linear, and reverse mode transposes them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

__all__ = ["conv_general_dilated", "max_pool"]


def _window_padding(size: int, window: int, padding: str) -> tuple[int, int]:
    """(low, high) padding of one spatial axis; negative values crop (VALID's remainder)."""
    if padding == "VALID":
        return 0, -(size % window)
    # SAME with stride == window: ceil(size / window) outputs, padding split as XLA does.
    total = -size % window
    return total // 2, total - total // 2


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_over_windows(x: jax.Array, window_shape: tuple[int, ...]) -> jax.Array:
    """Max over non-overlapping windows; every spatial size is a multiple of its window."""
    return jnp.max(_split_windows(x, window_shape), axis=_window_axes(x.ndim, window_shape))


def _split_windows(x: jax.Array, window_shape: tuple[int, ...]) -> jax.Array:
    """(batch..., S1, ..., Sn, C) -> (batch..., S1/k1, k1, ..., Sn/kn, kn, C): a free reshape."""
    first = x.ndim - len(window_shape) - 1
    shape = list(x.shape[:first])
    for size, window in zip(x.shape[first:-1], window_shape):
        shape += [size // window, window]
    return x.reshape((*shape, x.shape[-1]))


def _window_axes(ndim: int, window_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Axes of `_split_windows`'s output that run within a window."""
    first = ndim - len(window_shape) - 1
    return tuple(first + 2 * i + 1 for i in range(len(window_shape)))


def _first_maximum(windows: jax.Array, maximum: jax.Array, window_axes) -> jax.Array:
    """Boolean one-hot of the first maximal element of each window, in row-major window order.

    `windows` is `_split_windows`'s output and `maximum` its max with the window axes kept.
    XLA's max-pool derivative (`select_and_scatter` with `>=`) keeps the earlier element on
    ties, i.e. this one.
    """
    window_shape = [windows.shape[a] for a in window_axes]
    position_shape = [1] * windows.ndim
    for axis, window in zip(window_axes, window_shape):
        position_shape[axis] = window
    # Row-major position of each element within its window, a small constant.
    positions = jnp.asarray(
        np.arange(math.prod(window_shape), dtype=np.int32).reshape(position_shape)
    )
    candidates = jnp.where(windows == maximum, positions, math.prod(window_shape))
    first = jnp.min(candidates, axis=window_axes, keepdims=True)
    return positions == first


@_max_over_windows.defjvp
def _max_over_windows_jvp(window_shape, primals, tangents):
    (x,), (tangent,) = primals, tangents
    windows = _split_windows(x, window_shape)
    axes = _window_axes(x.ndim, window_shape)
    maximum = jnp.max(windows, axis=axes, keepdims=True)
    chosen = _first_maximum(windows, maximum, axes)
    # One term of each sum is the chosen tangent, the others are exact zeros.
    tangent_out = jnp.sum(jnp.where(chosen, _split_windows(tangent, window_shape), 0), axis=axes)
    return jnp.squeeze(maximum, axes), tangent_out


def max_pool(
    inputs: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """`flax.linen.max_pool` with a fast derivative for non-overlapping windows.

    Args:
      inputs: (batch..., spatial..., features), as for `flax.linen.max_pool`.
      window_shape: the window's spatial shape.
      strides: the strides (default: all 1, as flax).
      padding: 'SAME', 'VALID' or explicit (low, high) pairs.

    Returns:
      Exactly `flax.linen.max_pool(inputs, window_shape, strides, padding)`. When the strides
      equal the window, the padding is 'SAME' or 'VALID', the input is floating and has a batch
      axis, the value comes from a reshape and a max and the derivative is the tangent of the
      first maximal element of each window (row-major), as XLA's; otherwise flax's pool runs.
      Windows that are all -inf or hold a NaN may route their derivative differently from XLA.
    """
    window_shape = tuple(window_shape)
    fast = (
        strides is not None
        and tuple(strides) == window_shape
        and isinstance(padding, str)
        and padding in ("SAME", "VALID")
        and inputs.ndim >= len(window_shape) + 2
        and jnp.issubdtype(inputs.dtype, jnp.floating)
    )
    if not fast:
        return nn.max_pool(inputs, window_shape, strides, padding)
    first = inputs.ndim - len(window_shape) - 1
    pads = [(0, 0)] * first
    for size, window in zip(inputs.shape[first:-1], window_shape):
        pads.append(_window_padding(size, window, padding))
    pads.append((0, 0))
    if any(low or high for low, high in pads):
        # lax.pad crops on negative padding; -inf never wins a window that has a real element.
        inputs = lax.pad(
            inputs, jnp.array(-jnp.inf, inputs.dtype), [(lo, hi, 0) for lo, hi in pads]
        )
    return _max_over_windows(inputs, window_shape)


# Dimension numbers under which JAX's transpose rule for the kernel operand yields a convolution
# with canonical labels (NHWC, HWIO, NHWC) of operands transposed in memory: the input stored as
# (C, H, W, N) acts as a batch of C, the output cotangent stored as (H, W, N, C) as the kernel.
_KERNEL_TANGENT_DIMENSIONS = ("CHWN", "IHWO", "HWNC")
# The kernel stored as (H, W, O, I): the input gradient's kernel gets labels HWIO.
_INPUT_TANGENT = ("NHWC", "HWOI", "NHWC")


def _kernel_tangent(x: jax.Array, kernel_tangent: jax.Array, padding) -> jax.Array:
    """`conv(x, kernel_tangent)` (NHWC, HWIO), written so that its transpose is fast.

    Linear in `kernel_tangent`. Its transpose, the kernel gradient, is a forward convolution of
    `x` transposed to (C, H, W, N) with the cotangent transposed to (H, W, N, C), giving the
    gradient as (I, H, W, O). The optimization barriers keep XLA from folding those transposes
    back into the convolution's labels.
    """
    (x_by_channel,) = lax.optimization_barrier((jnp.transpose(x, (3, 1, 2, 0)),))
    (kernel_by_input,) = lax.optimization_barrier((jnp.transpose(kernel_tangent, (2, 0, 1, 3)),))
    out = lax.conv_general_dilated(
        x_by_channel,
        kernel_by_input,
        (1, 1),
        padding,
        dimension_numbers=_KERNEL_TANGENT_DIMENSIONS,
    )
    (out,) = lax.optimization_barrier((out,))
    return jnp.transpose(out, (2, 0, 1, 3))


def _input_tangent(x_tangent: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """`conv(x_tangent, kernel)`, written so that its transpose keeps canonical labels.

    Linear in `x_tangent`. JAX transposes it into a convolution of the cotangent with the
    kernel flipped and its I/O labels swapped; here the kernel is stored as (H, W, O, I) and
    flipped behind an optimization barrier, so that the transpose's `rev` cancels this one and
    its labels are NHWC/HWIO: XLA:CPU's fast path, also inside `lax.scan` (where the usual
    input gradient runs at about half speed).
    """
    (flipped,) = lax.optimization_barrier((jnp.flip(jnp.transpose(kernel, (0, 1, 3, 2)), (0, 1)),))
    return lax.conv_general_dilated(
        x_tangent, jnp.flip(flipped, (0, 1)), (1, 1), padding, dimension_numbers=_INPUT_TANGENT
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv_nhwc(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """Stride-1, undilated, ungrouped 2-D convolution, NHWC input, HWIO kernel."""
    return lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _conv_nhwc_jvp(padding, primals, tangents):
    (x, kernel), (x_tangent, kernel_tangent) = primals, tangents
    out = _conv_nhwc(x, kernel, padding)
    # Symbolic zeros (e.g. the images' tangent) cost nothing instead of a convolution of zeros.
    parts = []
    if not isinstance(x_tangent, SymbolicZero):
        parts.append(_input_tangent(x_tangent, kernel, padding))
    if not isinstance(kernel_tangent, SymbolicZero):
        parts.append(_kernel_tangent(x, kernel_tangent, padding))
    if not parts:
        return out, SymbolicZero(jax.typeof(out).to_tangent_aval())
    return out, functools.reduce(jnp.add, parts)


_conv_nhwc.defjvp(_conv_nhwc_jvp, symbolic_zeros=True)
_CANONICAL_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """`lax.conv_general_dilated` with a fast kernel gradient for the network's convolutions.

    Same arguments and result as `lax.conv_general_dilated`. 2-D NHWC/HWIO convolutions with
    stride 1, no dilation, one group and default precision get the derivative of `_conv_nhwc`
    (the same values; see `_kernel_tangent`); all others are passed to `lax` unchanged.
    """
    call = functools.partial(
        lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        precision,
        preferred_element_type,
    )
    if lhs.ndim != 4 or rhs.ndim != 4:
        return call()
    canonical = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CANONICAL_DIMENSIONS)
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    fast = (
        given == canonical
        and all(s == 1 for s in window_strides)
        and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        and feature_group_count == 1
        and batch_group_count == 1
        and precision is None
        and preferred_element_type is None
    )
    if not fast:
        return call()
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
    return _conv_nhwc(lhs, rhs, tuple((int(lo), int(hi)) for lo, hi in padding))

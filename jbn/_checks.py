"""Argument checks shared by the core functions.

Every check runs on static information (shapes, dtypes, Python scalars), so errors surface at
trace time under `jit` and name the offending argument.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax import lax

AxisName = Hashable | tuple[Hashable, ...]
AxisIndexGroups = Sequence[Sequence[int]] | None


def check_floating(x, name: str) -> None:
    """Raises TypeError unless `x` is floating (statistics of integers are ill-posed)."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {dtype}; cast it first.")


def as_float(value, name: str, expected: str) -> float:
    """`float(value)`, or a TypeError naming the argument (bools and strings are rejected too:
    `float("0.9")` would succeed, and a config typo must not pass as a number)."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or np.ndim(value) != 0:
        raise TypeError(f"{name} must be {expected}, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {expected}, got {value!r}.") from None


def check_decay(value, name: str) -> None:
    """A moving-average decay (weight on the old value) must lie in [0, 1)."""
    if not 0.0 <= as_float(value, name, "a float in [0, 1)") < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}.")


def check_zero_debias(decay, zero_debias, name: str) -> None:
    """Zero-debiasing corrects an exponential average; the cumulative one (`decay=None`) has
    no bias to correct."""
    if decay is None and zero_debias:
        raise ValueError(
            f"{name} needs an exponential decay; decay=None (the cumulative average) is already "
            "unbiased."
        )


def normalize_axes(axes: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """Returns `axes` as a sorted tuple of non-negative ints, rejecting bad or repeated axes."""
    if isinstance(axes, (int, np.integer)):
        axes = (int(axes),)
    try:
        axes = tuple(axes)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {axes!r}.") from None
    normalized = []
    for axis in axes:
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
            raise TypeError(f"{name} must contain ints, got {axis!r}.")
        if not -ndim <= axis < ndim:
            raise ValueError(f"{name}: axis {axis} is out of range for an input of rank {ndim}.")
        normalized.append(int(axis) % ndim)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{name} contains duplicate axes: {tuple(axes)}.")
    return tuple(sorted(normalized))


def check_epsilon(epsilon, name: str) -> None:
    """Raises for an epsilon that is not a positive finite number; traced ones are not checked."""
    if isinstance(epsilon, jax_core.Tracer):
        return
    if np.ndim(epsilon) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(epsilon)}.")
    value = as_float(epsilon, name, "a positive float")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}.")


def static_epsilon(epsilon, name: str = "epsilon") -> float:
    """A checked epsilon as a Python float; ops whose derivative is built at trace time need it
    static, so a traced value gets an error that says so (not a bare ConcretizationTypeError)."""
    if isinstance(epsilon, jax_core.Tracer):
        raise TypeError(
            f"{name} must be a static Python float, not a traced value: pass it as a constant "
            "(or mark it static, e.g. jit static_argnames)."
        )
    check_epsilon(epsilon, name)
    return float(epsilon)


def positive_int(value, name: str) -> int:
    """`int(value)` for a positive Python or numpy integer (not a bool), else ValueError."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def as_bool(value, name: str) -> bool:
    """A Python bool from a Python/numpy bool or a concrete boolean scalar array.

    Strings and numbers are refused: `bool("False")` is True, which would silently pick the
    wrong mode. Traced values are refused too, since the two modes read and update different
    variables.
    """
    if isinstance(value, jax_core.Tracer):
        raise TypeError(
            f"{name} must be a Python bool, not a traced value: the two modes read and update "
            "different variables. Mark it static (e.g. jit static_argnames)."
        )
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if hasattr(value, "dtype") and np.shape(value) == () and value.dtype == np.bool_:
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {value!r}.")


def check_real(value, name: str) -> None:
    """Raises TypeError for complex values, whose imaginary part would be dropped silently."""
    if jnp.issubdtype(jnp.result_type(value), jnp.complexfloating):
        raise TypeError(f"{name} must be real, got dtype {jnp.result_type(value)}.")


def check_floating_dtype(dtype, name: str) -> None:
    """Raises TypeError unless `dtype` names a floating dtype (ints would truncate outputs)."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a floating dtype, got {dtype!r}.") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype such as jnp.float32, got {resolved}.")


def check_ghost_batches(batch: int, virtual_batch_size: int, feature_axes) -> None:
    """Ghost batches split axis 0 into groups of `virtual_batch_size`: axis 0 must not be a
    feature axis, and the batch must divide evenly."""
    if 0 in feature_axes:
        raise ValueError(
            "axis must not include 0 with virtual_batch_size: ghost batches split the batch axis 0."
        )
    if batch % virtual_batch_size:
        # A symbolic batch (jax.export) divides only when it is written as a multiple.
        hint = (
            ""
            if isinstance(batch, int)
            else f" (export it as a multiple, e.g. {virtual_batch_size}*{batch})"
        )
        raise ValueError(
            f"The batch size {batch} is not divisible by virtual_batch_size={virtual_batch_size}"
            f"{hint}."
        )


def check_several_values(
    shape: tuple[int, ...],
    feature_axes: tuple[int, ...],
    axis_name,
    virtual_batch_size: int | None = None,
) -> None:
    """Training-mode batch norm of `shape` needs more than one value per feature.

    With one, the batch variance is 0, every output is `offset`, and a few such steps collapse
    the moving variance (PyTorch refuses it too: "Expected more than 1 value per channel when
    training"). Only what is static is checked: the local count, the product of the sizes of
    the axes not in `feature_axes` (per ghost batch, axis 0 counting `virtual_batch_size`).
    With `axis_name` the batch also comes from the other devices or vmapped examples, so
    nothing is refused; masks and traced weights that leave one counted value are the caller's
    business, and so is a symbolic (exported) batch size.
    """
    if axis_name is not None:
        return
    sizes = [
        virtual_batch_size if virtual_batch_size is not None and a == 0 else shape[a]
        for a in range(len(shape))
        if a not in feature_axes
    ]
    if all(isinstance(size, int) and size == 1 for size in sizes):
        if virtual_batch_size is None:
            per, fix = "", "give axis_name when vmap/pmap/shard_map supplies the batch"
        else:
            per = f" per ghost batch of virtual_batch_size={virtual_batch_size}"
            fix = "use a larger virtual_batch_size"
        raise ValueError(
            f"Training-mode batch norm needs more than one value per feature, but x of shape "
            f"{tuple(shape)} has one{per} (feature axes {tuple(feature_axes)}): the batch "
            "variance would be 0 and the output all offset. Train on a larger batch, use the "
            f"moving statistics (inference mode) for single examples, or {fix}."
        )


def check_clipping(rmax, rmin, dmax, names=("rmax", "rmin", "dmax")) -> None:
    """Renorm clipping bounds: numbers (None = unclipped, inf allowed), not NaN, not negative,
    and `rmin <= rmax`. Traced bounds are not checked. `names` label the three in messages."""
    concrete = {}
    for name, value in zip(names, (rmax, rmin, dmax), strict=True):
        if value is None or isinstance(value, jax_core.Tracer):
            continue
        number = as_float(value, name, "a non-negative number or None")
        if math.isnan(number) or number < 0:
            raise ValueError(f"{name} must be a non-negative number, got {value}.")
        concrete[name] = number
    rmax_name, rmin_name, _ = names
    if (
        rmax_name in concrete
        and rmin_name in concrete
        and concrete[rmin_name] > concrete[rmax_name]
    ):
        raise ValueError(
            f"{rmin_name} ({concrete[rmin_name]}) must not exceed {rmax_name} "
            f"({concrete[rmax_name]})."
        )


def check_broadcastable(value, shape: tuple[int, ...], name: str) -> None:
    """Raises ValueError unless `value` broadcasts to `shape` without changing it.

    Symbolic dimensions (`jax.export`) are accepted: `jnp.broadcast_shapes` compares them as
    expressions (a symbolic batch `b` matches `b` or 1), where numpy's would raise a TypeError.
    """
    value_shape = jnp.shape(value)
    try:
        result = jnp.broadcast_shapes(value_shape, shape)
    except ValueError:
        result = None
    if result != tuple(shape):
        raise ValueError(
            f"{name} of shape {value_shape} does not broadcast to the input shape {shape}."
        )


def frequency_weights(weights, name: str):
    """`weights` as an array after the frequency-weight checks: a numeric (floating, integer or
    boolean) dtype, and no negative entry where the values are known.

    Concrete values are read on the host, also inside `jit` (where a comparison would be
    traced); traced ones cannot be checked without a host sync.
    """
    array = jnp.asarray(weights)
    dtype = array.dtype
    if not (
        jnp.issubdtype(dtype, jnp.floating)
        or jnp.issubdtype(dtype, jnp.integer)
        or dtype == jnp.bool_
    ):
        raise TypeError(f"{name} must be numeric (frequency weights), got dtype {dtype}.")
    # The given value, not `array`: under `jit`, `jnp.asarray` may stage a constant as a tracer.
    if not isinstance(weights, jax_core.Tracer) and np.any(np.asarray(weights) < 0):
        raise ValueError(f"{name} must be non-negative (frequency weights).")
    return array


def check_mask_dtype(mask, name: str = "mask") -> None:
    """A mask is boolean, True for the elements that count."""
    dtype = jnp.result_type(mask)
    if dtype != jnp.bool_:
        raise TypeError(f"{name} must be boolean (True = counts), got dtype {dtype}.")


def check_mask(mask, shape: tuple[int, ...], name: str = "mask") -> None:
    check_mask_dtype(mask, name)
    check_broadcastable(mask, shape, name)


def canonical_groups(axis_name, axis_index_groups) -> tuple[tuple[int, ...], ...] | None:
    """Validates `axis_index_groups` and returns it as a hashable tuple of tuples."""
    if axis_index_groups is None:
        return None
    if axis_name is None:
        raise ValueError(
            "axis_index_groups requires axis_name: groups only make sense across devices."
        )
    try:
        groups = tuple(tuple(int(i) for i in group) for group in axis_index_groups)
    except TypeError:
        raise TypeError(
            f"axis_index_groups must be a sequence of sequences of ints, got {axis_index_groups!r}."
        ) from None
    flat = [i for group in groups for i in group]
    if not groups or any(len(g) != len(groups[0]) for g in groups) or not groups[0]:
        raise ValueError(f"axis_index_groups must be non-empty groups of equal size, got {groups}.")
    if len(set(flat)) != len(flat) or min(flat) < 0:
        raise ValueError(f"axis_index_groups must list each device index once, got {groups}.")
    return groups


def canonical_axis_name(axis_name):
    """Checks that `axis_name` is bound here; lists become tuples (static arguments hash).

    JAX's own error for an unbound name ("unbound axis name") confuses people who called a
    layer with `axis_name` outside `pmap` (flax#2606), so it is replaced by one that says what
    to do.
    """
    if axis_name is None:
        return None
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)
    try:
        lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here: call this inside jax.pmap, "
            "jax.shard_map or jax.vmap with that axis name, or pass axis_name=None for "
            "single-device statistics."
        ) from None
    return axis_name

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
    """`float(value)`, or a TypeError naming the argument (bools are rejected too)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {expected}, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {expected}, got {value!r}.") from None


def check_decay(value, name: str) -> None:
    """A moving-average decay (weight on the old value) must lie in [0, 1)."""
    if not 0.0 <= as_float(value, name, "a float in [0, 1)") < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}.")


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
    """Raises ValueError for a non-positive epsilon; traced epsilons cannot be checked."""
    if isinstance(epsilon, jax_core.Tracer):
        return
    value = np.asarray(epsilon)
    if value.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {value.shape}.")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be positive and finite, got {float(value)}.")


def check_broadcastable(value, shape: tuple[int, ...], name: str) -> None:
    """Raises ValueError unless `value` broadcasts to `shape` without changing it."""
    value_shape = jnp.shape(value)
    try:
        result = np.broadcast_shapes(value_shape, shape)
    except ValueError:
        result = None
    if result != tuple(shape):
        raise ValueError(
            f"{name} of shape {value_shape} does not broadcast to the input shape {shape}."
        )


def check_mask(mask, shape: tuple[int, ...], name: str = "mask") -> None:
    dtype = jnp.result_type(mask)
    if dtype != jnp.bool_:
        raise TypeError(f"{name} must be boolean (True = counts), got dtype {dtype}.")
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

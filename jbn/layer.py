"""What a batch-norm layer does, without Flax: argument checks, layout and the training forward.

`jbn.BatchNorm` (linen) and `jbn.nnx.BatchNorm` are thin shells over this module and
`jbn.running`: they own variables and modes; the checks and the choice of core op live here,
once, so both modules give identical numbers and identical errors.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbn import _checks, kernels, running
from jbn.running import STATS_DTYPE, BatchStatistics, RunningStatistics, RunningStatisticsUpdate

__all__ = [
    "LAYER_ARGUMENTS",
    "LayerArguments",
    "LayerOptions",
    "apply",
    "feature_axes",
    "feature_shape",
    "finish",
    "inference_forward",
    "initial_statistic",
    "layer_options",
    "prepare_input",
    "prepare_weights",
    "train_forward",
]

DEFAULT_INITIALIZERS: dict[str, Callable] = {
    "beta": jax.nn.initializers.zeros,
    "gamma": jax.nn.initializers.ones,
    "moving_mean": jax.nn.initializers.zeros,
    "moving_variance": jax.nn.initializers.ones,
}

PARAM_INITIALIZER_KEYS = ("beta", "gamma", "moving_mean", "moving_variance")
PARAM_REGULARIZER_KEYS = ("beta", "gamma")
RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
DATA_FORMATS = ("NHWC", "NCHW")
# With data_format: inputs of rank 2 (B, C) to 5 (B, D, H, W, C), as TF1 accepts.
MIN_RANK, MAX_RANK = 2, 5


class _FrozenMapping(Mapping):
    """A read-only, hashable copy of a mapping: options are static arguments, which must hash."""

    def __init__(self, mapping: Mapping) -> None:
        self._items = dict(mapping)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


def _check_keys(mapping: Mapping[str, Any] | None, allowed: Sequence[str], name: str) -> None:
    if mapping is None:
        return
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{name} must be a dict with keys {list(allowed)}, got {mapping!r}.")
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; allowed keys are {list(allowed)}.")


def _check_flag(value, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}.")


# An entry of `param_initializers` (flax's initializer signature) and of `param_regularizers`.
Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
Regularizer = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(repr=False, eq=False)
class LayerArguments:
    """The arguments of a jbn batch-norm layer, with their types and defaults: their one
    declaration.

    The linen `jbn.BatchNorm` extends it (these are its fields), `jbn.nnx.BatchNorm` takes them
    as keywords, and `LayerOptions` extends it with the checks; the meaning of each argument is
    documented on `jbn.BatchNorm`. It only declares: no checks, and no `repr`, `==` or hash of
    its own, so that `jbn.BatchNorm` keeps flax's module repr and `LayerOptions` its own.
    """

    # Moving averages.
    decay: float | None = 0.999
    # Normalization, the affine transform and the output.
    center: bool = True
    scale: bool = False
    epsilon: float = 0.001
    activation_fn: Callable[[jax.Array], jax.Array] | None = None
    param_initializers: Mapping[str, Initializer] | None = None
    param_regularizers: Mapping[str, Regularizer] | None = None
    trainable: bool = True
    # The core op and the layout.
    fused: bool | None = None
    data_format: str | None = None
    axis: int | Sequence[int] | None = None
    # Debiasing, batch renormalization and ghost batches.
    zero_debias_moving_mean: bool = False
    renorm: bool = False
    renorm_clipping: Mapping[str, float] | None = None
    renorm_decay: float = 0.99
    virtual_batch_size: int | None = None
    # Devices.
    axis_name: Any = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    # Dtypes, and the moving variance's convention.
    dtype: Any = None
    param_dtype: Any = jnp.float32
    unbiased_moving_variance: bool = False


@dataclasses.dataclass(eq=True, unsafe_hash=True)
class LayerOptions(LayerArguments):
    """The checked arguments of a jbn batch-norm layer: immutable and hashable.

    Every module (`jbn.BatchNorm`, `jbn.linen.BatchNorm`, `jbn.nnx.BatchNorm`,
    `jbn.equinox.BatchNorm`) holds one and hands it to `apply`. Construction checks every
    argument (errors name it) and canonicalizes: lists become tuples, mappings read-only and
    hashable, `epsilon` a float, `virtual_batch_size` an int, `axis_index_groups` a tuple of
    tuples; nothing downstream checks them again. The arguments are `LayerArguments`' fields.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        # Frozen as a `frozen=True` dataclass is (which dataclasses refuse over the non-frozen
        # `LayerArguments`, itself non-frozen because linen modules extend it): the generated
        # __init__ sets each field once, then nothing can be set.
        if name in self.__dict__ or name not in LAYER_ARGUMENTS:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __post_init__(self) -> None:
        if self.decay is not None:
            _checks.check_decay(self.decay, "decay")
        _checks.check_decay(self.renorm_decay, "renorm_decay")
        _checks.check_epsilon(self.epsilon, "epsilon")
        for name in (
            "center",
            "scale",
            "trainable",
            "zero_debias_moving_mean",
            "renorm",
            "unbiased_moving_variance",
        ):
            _check_flag(getattr(self, name), name)
        _checks.check_zero_debias(
            self.decay, self.zero_debias_moving_mean, "zero_debias_moving_mean"
        )
        data_format, axis, fused = self.data_format, self.axis, self.fused
        if data_format is not None and data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be 'NHWC' or 'NCHW', got {data_format!r}.")
        if data_format is not None and axis is not None:
            raise ValueError(
                "Give either data_format (TF1) or axis (flax), not both: they both set the feature "
                "axis."
            )
        if axis is not None:
            # Checked for its type here; its range depends on the input's rank (call time).
            _checks.normalize_axes(axis, 64, "axis")
        if fused not in (None, True, False):
            raise TypeError(f"fused must be None, True or False, got {fused!r}.")
        if fused is True and self.renorm:
            raise ValueError(
                "fused=True cannot be combined with renorm=True: batch renormalization has no "
                "fused op. Use fused=None or False."
            )
        if self.activation_fn is not None and not callable(self.activation_fn):
            raise TypeError(f"activation_fn must be callable or None, got {self.activation_fn!r}.")
        initializers, regularizers = self.param_initializers, self.param_regularizers
        _check_keys(initializers, PARAM_INITIALIZER_KEYS, "param_initializers")
        _check_keys(regularizers, PARAM_REGULARIZER_KEYS, "param_regularizers")
        _check_keys(self.renorm_clipping, RENORM_CLIPPING_KEYS, "renorm_clipping")
        for mapping, name in (
            (initializers, "param_initializers"),
            (regularizers, "param_regularizers"),
        ):
            for key, value in (mapping or {}).items():
                if not callable(value):
                    raise TypeError(f"{name}[{key!r}] must be callable, got {value!r}.")
        if self.renorm_clipping is not None and not self.renorm:
            raise ValueError("renorm_clipping is given but renorm=False; set renorm=True.")
        for key, flag in (("gamma", "scale"), ("beta", "center")):
            # An initializer for a parameter the layer does not create would be silently ignored.
            if key in (initializers or {}) and not getattr(self, flag):
                raise ValueError(
                    f"param_initializers[{key!r}] is given but {flag}=False, so there is no {key} "
                    f"to initialize; set {flag}=True or drop the initializer."
                )
        clipping = dict(self.renorm_clipping or {})
        _checks.check_clipping(
            *(clipping.get(key) for key in RENORM_CLIPPING_KEYS),
            names=tuple(f"renorm_clipping[{k!r}]" for k in RENORM_CLIPPING_KEYS),
        )
        virtual_batch_size = self.virtual_batch_size
        if virtual_batch_size is not None:
            virtual_batch_size = _checks.positive_int(virtual_batch_size, "virtual_batch_size")
        axis_name = tuple(self.axis_name) if isinstance(self.axis_name, list) else self.axis_name
        groups = _checks.canonical_groups(axis_name, self.axis_index_groups)
        if self.dtype is not None:
            _checks.check_floating_dtype(self.dtype, "dtype")
        _checks.check_floating_dtype(self.param_dtype, "param_dtype")
        freeze = lambda m: None if m is None else _FrozenMapping(m)
        canonical = {
            "epsilon": float(self.epsilon),
            "param_initializers": freeze(initializers),
            "param_regularizers": freeze(regularizers),
            "axis": tuple(axis) if isinstance(axis, (list, tuple)) else axis,
            "renorm_clipping": freeze(
                None
                if self.renorm_clipping is None
                else {k: None if v is None else float(v) for k, v in clipping.items()}
            ),
            "virtual_batch_size": virtual_batch_size,
            "axis_name": axis_name,
            "axis_index_groups": groups,
        }
        for name, value in canonical.items():
            object.__setattr__(self, name, value)

    def _clipping(self, key: str) -> float | None:
        return (self.renorm_clipping or {}).get(key)

    @property
    def rmax(self) -> float | None:
        return self._clipping("rmax")

    @property
    def rmin(self) -> float | None:
        return self._clipping("rmin")

    @property
    def dmax(self) -> float | None:
        return self._clipping("dmax")

    def running_rule(self, dtype=None) -> RunningStatisticsUpdate:
        """The running-statistics rule of these options (`jbn.running`), in `dtype` (None:
        `statistics_dtype(param_dtype)`)."""
        return running.running_rule(
            self.decay,
            epsilon=self.epsilon,
            zero_debias_mean=self.zero_debias_moving_mean,
            unbiased_variance=self.unbiased_moving_variance,
            renorm=self.renorm,
            renorm_decay=self.renorm_decay,
            dtype=running.statistics_dtype(self.param_dtype) if dtype is None else dtype,
        )

    def kernel(self, weighted: bool = False) -> kernels.Kernel:
        """The training kernel of these options (`jbn.kernels`), ghost batches included.

        Renorm runs the renorm kernel; otherwise the fused kernel wherever it applies (no
        frequency weights: `weighted`) unless `fused` is False, and the composite one where it
        does not. Raises ValueError for frequency weights with `renorm` or `fused=True`.
        """
        if weighted and self.renorm:
            raise ValueError(
                "batch_weights cannot be combined with renorm=True (as in TF1); use mask for 0/1 "
                "weights."
            )
        if weighted and self.fused is True:
            raise ValueError(
                "fused=True cannot apply with batch_weights: the fused op takes a boolean mask "
                "only. Use fused=None (auto) or False."
            )
        if self.renorm:
            name = "renorm"
        elif self.fused is not False and not weighted:
            name = "fused"
        else:
            name = "composite"
        kernel = kernels.KERNELS[name]
        if self.renorm:
            kernel = functools.partial(kernel, rmax=self.rmax, rmin=self.rmin, dmax=self.dmax)
        if self.virtual_batch_size is None:
            return kernel
        return kernels.ghost_batches(kernel, self.virtual_batch_size)


def layer_options(**arguments: Any) -> LayerOptions:
    """Checks a jbn batch-norm layer's arguments (`LAYER_ARGUMENTS`, by keyword; missing ones
    take `jbn.BatchNorm`'s defaults) and returns them as `LayerOptions`; errors name the
    argument (ValueError, TypeError; TypeError for an unknown name, listing the arguments)."""
    unknown = [name for name in arguments if name not in LAYER_ARGUMENTS]
    if unknown:
        raise TypeError(
            f"unknown argument(s) {unknown} for a jbn batch-norm layer; its arguments are "
            f"{', '.join(LAYER_ARGUMENTS)}."
        )
    return LayerOptions(**arguments)


# The layer's arguments, in their order: `LayerArguments`' fields.
LAYER_ARGUMENTS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(LayerArguments))


def feature_axes(ndim: int, data_format: str | None, axis) -> tuple[int, ...]:
    """The feature axes of an input of rank `ndim`, checked (errors name the argument).

    With `axis` (flax style, any rank with an axis left to reduce) they are `axis`; otherwise
    `data_format` (None means 'NHWC') picks the last axis or axis 1 for ranks 2 to 5 (rank 2 has
    its features last in both formats).
    """
    if axis is not None:
        axes = _checks.normalize_axes(axis, ndim, "axis")
        if len(axes) == ndim:
            raise ValueError(f"axis={axis} leaves no axis to reduce for an input of rank {ndim}.")
        return axes
    if not MIN_RANK <= ndim <= MAX_RANK:
        raise ValueError(
            f"x must have rank {MIN_RANK} to {MAX_RANK} (batch, [spatial...,] features) with "
            f"data_format, got rank {ndim}; pass axis= for other ranks."
        )
    return (ndim - 1,) if data_format in (None, "NHWC") or ndim == 2 else (1,)


def _per_example(value: jax.Array, x: jax.Array, name: str) -> jax.Array:
    """A rank-1 value of length B becomes (B, 1, ..., 1); anything else must broadcast to x."""
    value = jnp.asarray(value)
    if value.ndim == 1 and value.shape[0] == x.shape[0]:
        return value.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    try:
        # jnp's, not numpy's: it accepts symbolic dimensions (a batch exported as "b").
        broadcast = jnp.broadcast_shapes(value.shape, x.shape)
    except ValueError:
        broadcast = None
    if broadcast != x.shape:
        raise ValueError(
            f"{name} of shape {value.shape} must have shape ({x.shape[0]},) (one entry per "
            f"example) or broadcast to the input shape {x.shape}."
        )
    return value


def prepare_weights(x, batch_weights, mask):
    """`(weights, mask)`: float32 frequency weights when `batch_weights` is given (the mask
    folded in), else None and the boolean mask (or None); both broadcastable to `x`."""
    if mask is not None:
        _checks.check_mask_dtype(mask)
        mask = _per_example(mask, x, "mask")
    if batch_weights is None:
        return None, mask
    batch_weights = _checks.frequency_weights(batch_weights, "batch_weights")
    weights = _per_example(batch_weights, x, "batch_weights").astype(STATS_DTYPE)
    if mask is not None:
        weights = weights * mask.astype(STATS_DTYPE)
    return weights, None


def train_forward(
    x: jax.Array,
    gamma: jax.Array | None,
    beta: jax.Array | None,
    options: LayerOptions,
    axes: tuple[int, ...],
    *,
    weights: jax.Array | None = None,
    mask: jax.Array | None = None,
    renorm_mean: jax.Array | None = None,
    renorm_stddev: jax.Array | None = None,
) -> tuple[jax.Array, BatchStatistics]:
    """Normalizes with batch statistics, with the kernel `options.kernel` chooses.

    Args:
      x: the input, features along `axes` (from `feature_axes`).
      gamma, beta: feature-shaped parameters or None.
      options: the layer's checked options.
      axes: the feature axes.
      weights, mask: from `prepare_weights`.
      renorm_mean, renorm_stddev: the renorm correction statistics, feature-shaped (renorm
        only).

    Returns:
      `(y, batch)`: `y` like `x`; `batch` the statistics, feature-shaped, or with a leading
      axis of ghost batches, with the counted elements over all devices where the statistics
      are (ghost statistics are per device).

    Raises:
      ValueError: for one value per feature (per ghost batch) without `axis_name`, on every
        path (`jbn._checks.check_several_values`); for a batch the ghost batches do not divide.
    """
    ghost_size = options.virtual_batch_size
    if ghost_size is not None:
        _checks.check_ghost_batches(x.shape[0], ghost_size, axes)
    # Ghost statistics are per device: axis_name brings no values to a ghost batch.
    _checks.check_several_values(
        x.shape, axes, options.axis_name if ghost_size is None else None, ghost_size
    )
    kernel = options.kernel(weighted=weights is not None)
    keep_shape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
    params = kernels.FeatureParams(
        *(None if v is None else jnp.reshape(v, keep_shape) for v in (gamma, beta))
    )
    if options.renorm:
        params = params._replace(
            renorm_mean=jnp.reshape(renorm_mean, keep_shape),
            renorm_stddev=jnp.reshape(renorm_stddev, keep_shape),
        )
    return kernel(
        x,
        params,
        mask if weights is None else weights,
        axes,
        options.epsilon,
        _checks.canonical_axis_name(options.axis_name),
        options.axis_index_groups,
    )


def initializer(initializers: Mapping[str, Callable] | None, name: str) -> Callable:
    """The `param_initializers` entry for `name`, or its default (zeros / ones)."""
    return (initializers or {}).get(name, DEFAULT_INITIALIZERS[name])


def initial_statistic(
    initializers, name: str, make_key, feature_shape, dtype=STATS_DTYPE
) -> jax.Array:
    """The initial `moving_mean`/`moving_variance` from `param_initializers`, in `dtype` (the
    layers pass `jbn.running.statistics_dtype(param_dtype)`); `make_key()` gives the RNG key,
    drawn only for a user initializer."""
    user_initializer = (initializers or {}).get(name)
    if user_initializer is None:
        return DEFAULT_INITIALIZERS[name](None, feature_shape, dtype)
    value = jnp.asarray(user_initializer(make_key(), feature_shape, dtype), dtype)
    if value.shape != feature_shape:
        raise ValueError(
            f"param_initializers[{name!r}] returned shape {value.shape}, expected {feature_shape}."
        )
    return value


def prepare_input(x, dtype) -> tuple[jax.Array, jnp.dtype]:
    """`(x in the computation dtype, output dtype)`: checks that `x` is floating; computes in
    `promote_types(x.dtype, dtype)`; the output has `dtype` (None: x's dtype)."""
    x = jnp.asarray(x)
    _checks.check_floating(x, "x")
    output_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    return x.astype(jnp.promote_types(x.dtype, output_dtype)), output_dtype


def inference_forward(x, mean, variance, beta, gamma, epsilon, axes) -> jax.Array:
    """Normalizes with the moving statistics (feature-shaped values, features along `axes`)."""
    keep_shape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
    as_keep = lambda v: None if v is None else jnp.reshape(v, keep_shape)
    return kernels.normalize(
        x, as_keep(mean), as_keep(variance), as_keep(beta), as_keep(gamma), epsilon
    )


def finish(y: jax.Array, output_dtype, activation_fn) -> jax.Array:
    """Casts to the output dtype, then applies `activation_fn` (TF1's Python-level fusion)."""
    y = y.astype(output_dtype)
    return y if activation_fn is None else activation_fn(y)


def feature_shape(options: LayerOptions, x) -> tuple[int, ...]:
    """The shape of the layer's parameters and statistics for input `x` (checked: a rank the
    options' `data_format`/`axis` accept; `apply` checks the dtype)."""
    shape = jnp.shape(x)
    return tuple(shape[a] for a in feature_axes(len(shape), options.data_format, options.axis))


def apply(
    options: LayerOptions,
    params: Mapping[str, jax.Array | None],
    statistics: RunningStatistics,
    x: jax.Array,
    *,
    training: bool,
    batch_weights: jax.Array | None = None,
    mask: jax.Array | None = None,
    update_statistics: bool = True,
    axes: tuple[int, ...] | None = None,
) -> tuple[jax.Array, RunningStatistics]:
    """What a batch-norm layer does, as a pure function: every module reads its variables,
    calls this, and writes back the statistics.

    Args:
      options: the layer's checked options.
      params: `beta` and `gamma` (feature-shaped; a missing or None entry is absent); frozen
        with `stop_gradient` unless `options.trainable`.
      statistics: the running statistics (`jbn.running.RunningStatistics`), feature-shaped.
      x: the input, floating, features where `options.data_format`/`options.axis` say.
      training: True normalizes with the batch statistics and moves the running ones; False
        normalizes with the running statistics and returns them unchanged.
      batch_weights, mask: as in `jbn.BatchNorm.__call__` (training only).
      update_statistics: False returns `statistics` unchanged in training too (linen's `init`).
      axes: the feature axes where the caller fixes them (Equinox's one example, channels
        first, may have no other axis); None: `feature_axes` of the options.

    Returns:
      `(y, new_statistics)`: `y` of `x`'s shape in `options.dtype` (None: `x`'s dtype), after
      `options.activation_fn`.
    """
    x, output_dtype = prepare_input(x, options.dtype)
    if axes is None:
        axes = feature_axes(x.ndim, options.data_format, options.axis)
    beta, gamma = (params.get(name) for name in ("beta", "gamma"))
    if not options.trainable:
        # TF1's trainable=False: frozen parameters, statistics mode unchanged.
        beta, gamma = (None if p is None else lax.stop_gradient(p) for p in (beta, gamma))
    if not training:
        y = inference_forward(
            x, statistics.mean, statistics.variance, beta, gamma, options.epsilon, axes
        )
        return finish(y, output_dtype, options.activation_fn), statistics
    weights, mask = prepare_weights(x, batch_weights, mask)
    y, batch = train_forward(
        x,
        gamma,
        beta,
        options,
        axes,
        weights=weights,
        mask=mask,
        renorm_mean=statistics.renorm_mean,
        renorm_stddev=statistics.renorm_stddev,
    )
    if update_statistics:
        statistics = options.running_rule().update(
            statistics, batch, options.axis_name, options.axis_index_groups
        )
    return finish(y, output_dtype, options.activation_fn), statistics

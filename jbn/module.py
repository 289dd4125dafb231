"""`jbn.BatchNorm`: a Flax linen module with the arguments of TF1's `tf.contrib.layers.batch_norm`.

The module owns variables and modes only; every formula comes from the jbn core
(`fused_batch_norm`, `ghost_batch_norm`, `batch_renorm`, `moments`, `weighted_moments`,
`batch_normalization`, `moving_average`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbn import _checks
from jbn.averages import MovingAverageState, moving_average
from jbn.normalization import batch_normalization, fused_batch_norm, ghost_batch_norm
from jbn.renorm import batch_renorm
from jbn.stats import moments, weighted_moments

__all__ = ["BatchNorm"]

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
Regularizer = Callable[[jax.Array], jax.Array]

PARAM_INITIALIZER_KEYS = ("beta", "gamma", "moving_mean", "moving_variance")
PARAM_REGULARIZER_KEYS = ("beta", "gamma")
RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
DATA_FORMATS = ("NHWC", "NCHW")
# Inputs of rank 2 (B, C) to 5 (B, D, H, W, C), as TF1 accepts.
MIN_RANK, MAX_RANK = 2, 5

_DEFAULT_INITIALIZERS: dict[str, Initializer] = {
    "beta": nn.initializers.zeros,
    "gamma": nn.initializers.ones,
    "moving_mean": nn.initializers.zeros,
    "moving_variance": nn.initializers.ones,
}

# Moving statistics are float32 whatever the input and parameter dtypes: a bf16 average would
# stop moving once (1 - decay) * batch falls under half a bf16 ulp of the average.
STATS_DTYPE = jnp.float32


def _check_keys(mapping: Mapping[str, Any] | None, allowed: Sequence[str], name: str) -> None:
    if mapping is None:
        return
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{name} must be a dict with keys {list(allowed)}, got {mapping!r}.")
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; allowed keys are {list(allowed)}.")


def _per_example(value: jax.Array, x: jax.Array, name: str) -> jax.Array:
    """A rank-1 value of length B becomes (B, 1, ..., 1); anything else must broadcast to x."""
    value = jnp.asarray(value)
    if value.ndim == 1 and value.shape[0] == x.shape[0]:
        return value.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    try:
        broadcast = np.broadcast_shapes(value.shape, x.shape)
    except ValueError:
        broadcast = None
    if broadcast != x.shape:
        raise ValueError(
            f"{name} of shape {value.shape} must have shape ({x.shape[0]},) (one entry per "
            f"example) or broadcast to the input shape {x.shape}."
        )
    return value


class BatchNorm(nn.Module):
    """Batch normalization with the arguments of TF1's `tf.contrib.layers.batch_norm`.

    Training (`is_training=True`) normalizes with the statistics of the batch and moves the
    moving statistics toward them; inference (`is_training=False`) normalizes with the moving
    statistics and never changes them:

        y = activation_fn((x - mean) / sqrt(variance + epsilon) * gamma + beta)

    Statistics are per feature (the channel axis given by `data_format`) over every other axis,
    accumulated in float32 whatever the input dtype, with a variance that stays accurate when
    the mean is large against the spread (see `jbn.stats`).

    Example, one training step and an evaluation::

        model = jbn.BatchNorm(decay=0.9, scale=True)
        variables = model.init(jax.random.key(0), x, is_training=False)
        params, batch_stats = variables["params"], variables["batch_stats"]

        def loss_fn(params):
            y, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, is_training=True,
                mutable=["batch_stats", "losses"])
            regularization = sum(jax.tree.leaves(updates.get("losses", {})))
            return jnp.mean((y - target) ** 2) + regularization, updates["batch_stats"]

        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params)
        # ... apply grads with optax ...
        y_eval = model.apply({"params": params, "batch_stats": batch_stats}, x, is_training=False)

    Names in other libraries (TF1 contrib / jbn -> flax.linen.BatchNorm -> PyTorch BatchNorm2d):

    * `decay=0.9` (weight on the old value) -> `momentum=0.9` -> `momentum=0.1` (weight on the
      new value: `momentum = 1 - decay`).
    * `is_training=False` -> `use_running_average=True` -> `module.eval()`; Keras:
      `training=False`.
    * `center`, `scale` -> `use_bias`, `use_scale` -> `affine` (both together).
    * `data_format='NCHW'` -> `axis=1` -> the only layout.
    * `epsilon` (default 1e-3) -> `epsilon` (1e-5) -> `eps` (1e-5).
    * `moving_mean`, `moving_variance` -> `mean`, `var` -> `running_mean`, `running_var`.
      TF1 (non-fused), flax and jbn store the biased variance (divided by n); PyTorch stores the
      unbiased one (n - 1): set `unbiased_moving_variance=True` to match its checkpoints.
    * `updates_collections` / `UPDATE_OPS` -> `mutable=["batch_stats"]` -> in-place buffers.

    Variables: `params` hold `beta` (if `center`) and `gamma` (if `scale`), of shape `(C,)` and
    dtype `param_dtype`. `batch_stats` holds `moving_mean` and `moving_variance`, shape `(C,)`,
    always float32; with `renorm` also `renorm_mean` and `renorm_stddev` (the renorm moving mean
    and moving `sqrt(variance + epsilon)`, updated with `renorm_decay` and used only for the
    renorm correction); with `zero_debias_moving_mean` also `moving_mean_biased` (the biased
    accumulator, starting at 0) and `num_updates` (int32 step count). The statistics move only
    when `is_training` and `batch_stats` is mutable in `apply`; `init` never moves them.

    Attributes:
      decay: weight of the old value in the moving averages,
        `new = decay * old + (1 - decay) * batch` (TF/flax convention; PyTorch's momentum is
        `1 - decay`). In [0, 1).
      center: add the learned offset `beta`.
      scale: multiply by the learned `gamma` (TF1's default is False: when the next layer is
        linear or a ReLU the scale can be folded into it).
      epsilon: positive float added to the variance inside the square root.
      activation_fn: optional callable applied to the output (TF1's Python-level fusion).
      param_initializers: optional dict of flax initializers `(key, shape, dtype) -> array`
        for any of `beta`, `gamma`, `moving_mean`, `moving_variance` (defaults: zeros, ones,
        zeros, ones). Moving statistics are initialized in float32 with the `params` RNG.
      param_regularizers: optional dict of callables `param -> scalar` for `beta` and/or
        `gamma`. Their values are recorded with `self.sow("losses", "<name>_regularization")`
        (not during `init`); pass `mutable=["losses", ...]` to `apply` and add the sum of the
        `losses` collection's leaves to the training loss.
      is_training: default mode, overridden by the call argument. One of the two must be given.
      trainable: False freezes `beta` and `gamma` (their gradients are exactly zero, through
        `stop_gradient`) without changing the mode: in training the batch statistics are still
        used and the moving statistics still move (TF1 semantics; in Keras `trainable=False`
        also switches to inference mode, here use `is_training=False` for that).
      fused: None (default) uses the fused training op (`jbn.fused_batch_norm`, or
        `jbn.ghost_batch_norm` with `virtual_batch_size`) wherever it applies, that is in
        training without `renorm` and without `batch_weights`; True forces it and raises
        ValueError where it cannot apply; False always uses the composite
        `jbn.moments`/`jbn.weighted_moments` + `jbn.batch_normalization`. Both give the same
        outputs and gradients up to float32 round-off. Renorm always uses `jbn.batch_renorm`;
        inference always uses `jbn.batch_normalization`.
      data_format: `'NHWC'` (features last) or `'NCHW'` (features on axis 1), for inputs of
        rank 2 to 5; rank-2 inputs `(B, C)` have their features last in both formats.
      zero_debias_moving_mean: debias the moving mean as TF/Adam do, so early inference is not
        dragged toward the initial value: a biased accumulator starts at 0 and
        `moving_mean = moving_mean_biased / (1 - decay**num_updates)` (the variance is not
        debiased, as in TF1).
      renorm: batch renormalization (Ioffe 2017): training normalizes with the batch statistics
        corrected by `r = sigma_B / renorm_stddev`, `d = (mu_B - renorm_mean) / renorm_stddev`
        (clipped, without gradient), so that training and inference agree.
      renorm_clipping: optional dict with keys `rmax`, `rmin`, `dmax` clipping `r` to
        `[rmin, rmax]` and `d` to `[-dmax, dmax]`; a missing key leaves that side unclipped.
      renorm_decay: decay of `renorm_mean`/`renorm_stddev` (the inference statistics use
        `decay`).
      virtual_batch_size: ghost batch norm (Hoffer et al. 2017), training only: the batch
        (axis 0, divisible by it) is split into consecutive groups of this size, each
        normalized with its own statistics. The moving mean and variance are updated with the
        mean over ghost batches of their means and of their variances (weighted by each
        ghost batch's counted elements when a mask or batch weights are given; over every
        device's ghost batches with `axis_name`). Inference accepts any batch size.
      axis_name: pmap/shard_map axis name (or tuple of names): the batch statistics are those
        of the batch concatenated over devices, merged exactly by counts. With
        `virtual_batch_size` the ghost batches stay per device and only the moving-statistics
        update is merged, so replicas stay identical. Outside pmap/shard_map the name is unbound:
        initialize with `is_training=False`, which reduces nothing across devices.
      axis_index_groups: optional groups of device indices along `axis_name` that reduce
        separately (pmap only).
      dtype: output dtype; None keeps the input dtype. The computation is done in
        `promote_types(input dtype, dtype)` with float32 statistics.
      param_dtype: dtype of `beta` and `gamma`.
      unbiased_moving_variance: store the unbiased (Bessel-corrected, `n / (n - 1)` with `n`
        the number of counted elements per feature, or per ghost batch, over all devices with
        `axis_name`; the sum of the frequency weights with `batch_weights`) variance in
        `moving_variance`, as PyTorch does, for checkpoints that must match PyTorch. Training
        still normalizes with the biased batch variance, so inference (which reads
        `moving_variance`) divides by a slightly larger variance than training did: outputs
        of the two modes differ by a factor `sqrt((n - 1) / n)` on the same batch, which
        matters for small batches (pytorch#19902).
    """

    decay: float = 0.999
    center: bool = True
    scale: bool = False
    epsilon: float = 0.001
    activation_fn: Callable[[jax.Array], jax.Array] | None = None
    param_initializers: Mapping[str, Initializer] | None = None
    param_regularizers: Mapping[str, Regularizer] | None = None
    is_training: bool | None = None
    trainable: bool = True
    fused: bool | None = None
    data_format: str = "NHWC"
    zero_debias_moving_mean: bool = False
    renorm: bool = False
    renorm_clipping: Mapping[str, float] | None = None
    renorm_decay: float = 0.99
    virtual_batch_size: int | None = None
    axis_name: Any = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    unbiased_moving_variance: bool = False

    def __post_init__(self) -> None:
        # Constructor arguments are checked here, so a bad TF1 port fails where it is written.
        _checks.check_decay(self.decay, "decay")
        _checks.check_decay(self.renorm_decay, "renorm_decay")
        epsilon = _checks.as_float(self.epsilon, "epsilon", "a positive float")
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be positive and finite, got {self.epsilon}.")
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be 'NHWC' or 'NCHW', got {self.data_format!r}.")
        if self.fused not in (None, True, False):
            raise TypeError(f"fused must be None, True or False, got {self.fused!r}.")
        if self.fused is True and self.renorm:
            raise ValueError(
                "fused=True cannot be combined with renorm=True: batch renormalization has no "
                "fused op. Use fused=None or False."
            )
        if self.activation_fn is not None and not callable(self.activation_fn):
            raise TypeError(f"activation_fn must be callable or None, got {self.activation_fn!r}.")
        _check_keys(self.param_initializers, PARAM_INITIALIZER_KEYS, "param_initializers")
        _check_keys(self.param_regularizers, PARAM_REGULARIZER_KEYS, "param_regularizers")
        _check_keys(self.renorm_clipping, RENORM_CLIPPING_KEYS, "renorm_clipping")
        for mapping, name in (
            (self.param_initializers, "param_initializers"),
            (self.param_regularizers, "param_regularizers"),
        ):
            for key, value in (mapping or {}).items():
                if not callable(value):
                    raise TypeError(f"{name}[{key!r}] must be callable, got {value!r}.")
        if self.renorm_clipping is not None and not self.renorm:
            raise ValueError("renorm_clipping is given but renorm=False; set renorm=True.")
        if self.virtual_batch_size is not None and (
            not isinstance(self.virtual_batch_size, (int, np.integer))
            or isinstance(self.virtual_batch_size, bool)
            or self.virtual_batch_size < 1
        ):
            raise ValueError(
                f"virtual_batch_size must be a positive int or None, got "
                f"{self.virtual_batch_size!r}."
            )
        if self.axis_index_groups is not None and self.axis_name is None:
            raise ValueError("axis_index_groups requires axis_name.")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        is_training: bool | None = None,
        *,
        batch_weights: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes `x`; in training also updates `batch_stats` when it is mutable.

        Args:
          x: floating array of rank 2 to 5: `(B, C)`, or `(B, ..., C)` for NHWC and
            `(B, C, ...)` for NCHW. bf16/fp16 inputs get float32 statistics.
          is_training: True: batch statistics, and update the moving ones (requires
            `mutable=["batch_stats"]` in `apply`); False: moving statistics. Overrides the
            attribute of the same name.
          batch_weights: optional non-negative frequency weights of shape `(B,)` (or
            broadcastable to `x`): the statistics are the weighted ones
            (`jbn.weighted_moments`). Training only (ignored at inference); not with `renorm`
            (as in TF1) nor with `fused=True`.
          mask: optional boolean array, of shape `(B,)` (True = this example counts) or
            broadcastable to `x` (True = this element counts). Masked elements (padding) may
            hold anything and do not count in the statistics; they are still normalized.
            Training only (ignored at inference). A rank-1 mask or weight vector of length B
            is always read as per example.

        Returns:
          An array of `x`'s shape and dtype `dtype` (None: `x`'s dtype).
        """
        training = self._resolve_is_training(is_training)
        x = jnp.asarray(x)
        _checks.check_floating(x, "x")
        if not MIN_RANK <= x.ndim <= MAX_RANK:
            raise ValueError(
                f"x must have rank {MIN_RANK} to {MAX_RANK} (batch, [spatial...,] features), got "
                f"shape {x.shape} of rank {x.ndim}."
            )
        output_dtype = x.dtype if self.dtype is None else jnp.dtype(self.dtype)
        x = x.astype(jnp.promote_types(x.dtype, output_dtype))

        feature_axis = x.ndim - 1 if self.data_format == "NHWC" or x.ndim == 2 else 1
        num_features = x.shape[feature_axis]
        feature_shape = (num_features,)
        keep_shape = tuple(num_features if a == feature_axis else 1 for a in range(x.ndim))
        as_keep = lambda v: None if v is None else jnp.reshape(v, keep_shape)

        beta, gamma = self._affine_params(feature_shape)
        stats = self._batch_stats_variables(feature_shape)

        if not training:
            y = batch_normalization(
                x,
                as_keep(stats["moving_mean"].value),
                as_keep(stats["moving_variance"].value),
                as_keep(beta),
                as_keep(gamma),
                self.epsilon,
            )
            return self._finish(y, output_dtype)

        if not self.is_mutable_collection("batch_stats"):
            raise ValueError(
                "jbn.BatchNorm is in training mode (is_training=True), which updates the moving "
                "statistics in the 'batch_stats' collection, but that collection is immutable. "
                "Pass mutable=['batch_stats'] to apply() (and use the returned updates), or "
                "is_training=False to normalize with the moving statistics."
            )
        if batch_weights is not None and self.renorm:
            raise ValueError(
                "batch_weights cannot be combined with renorm=True (as in TF1); use mask for "
                "0/1 weights."
            )
        if batch_weights is not None and self.fused is True:
            raise ValueError(
                "fused=True cannot apply with batch_weights: the fused op takes a boolean mask "
                "only. Use fused=None (auto) or False."
            )
        weights, mask = self._prepare_weights(x, batch_weights, mask)
        y, batch_mean, batch_variance, count = self._train_forward(
            x, gamma, beta, stats, feature_axis, weights, mask
        )
        if not self.is_initializing():
            self._update_statistics(stats, batch_mean, batch_variance, count)
        return self._finish(y, output_dtype)

    # ----------------------------------------------------------------------------------------
    # Modes and variables.

    def _resolve_is_training(self, is_training: Any) -> bool:
        value = self.is_training if is_training is None else is_training
        if value is None:
            raise ValueError(
                "jbn.BatchNorm needs is_training: pass is_training=True/False to the call or to "
                "the constructor (the call wins)."
            )
        if isinstance(value, jax.core.Tracer):
            raise TypeError(
                "is_training must be a Python bool, not a traced value: the two modes read and "
                "update different variables. Mark it static (e.g. jit static_argnames)."
            )
        return bool(value)

    def _initializer(self, name: str) -> Initializer:
        return (self.param_initializers or {}).get(name, _DEFAULT_INITIALIZERS[name])

    def _affine_params(self, feature_shape: tuple[int, ...]):
        regularizers = self.param_regularizers or {}
        values = {}
        for name, enabled in (("beta", self.center), ("gamma", self.scale)):
            if not enabled:
                values[name] = None
                continue
            value = self.param(name, self._initializer(name), feature_shape, self.param_dtype)
            if not self.trainable:
                # TF1's trainable=False: frozen parameters, statistics mode unchanged.
                value = lax.stop_gradient(value)
            if name in regularizers and not self.is_initializing():
                # Skipped in init so that the losses collection does not leak into variables.
                self.sow("losses", f"{name}_regularization", regularizers[name](value))
            values[name] = value
        return values["beta"], values["gamma"]

    def _batch_stats_variables(self, feature_shape: tuple[int, ...]) -> dict[str, Any]:
        def initialized(name: str):
            def init() -> jax.Array:
                initializer = (self.param_initializers or {}).get(name)
                if initializer is None:
                    return _DEFAULT_INITIALIZERS[name](None, feature_shape, STATS_DTYPE)
                value = jnp.asarray(
                    initializer(self.make_rng("params"), feature_shape, STATS_DTYPE), STATS_DTYPE
                )
                if value.shape != feature_shape:
                    raise ValueError(
                        f"param_initializers[{name!r}] returned shape {value.shape}, expected "
                        f"{feature_shape}."
                    )
                return value

            return init

        stats = {
            "moving_mean": self.variable("batch_stats", "moving_mean", initialized("moving_mean")),
            "moving_variance": self.variable(
                "batch_stats", "moving_variance", initialized("moving_variance")
            ),
        }
        if self.zero_debias_moving_mean:
            stats["moving_mean_biased"] = self.variable(
                "batch_stats", "moving_mean_biased", jnp.zeros, feature_shape, STATS_DTYPE
            )
            stats["num_updates"] = self.variable(
                "batch_stats", "num_updates", jnp.zeros, (), jnp.int32
            )
        if self.renorm:
            stats["renorm_mean"] = self.variable(
                "batch_stats", "renorm_mean", jnp.zeros, feature_shape, STATS_DTYPE
            )
            stats["renorm_stddev"] = self.variable(
                "batch_stats", "renorm_stddev", jnp.ones, feature_shape, STATS_DTYPE
            )
        return stats

    def _finish(self, y: jax.Array, output_dtype) -> jax.Array:
        y = y.astype(output_dtype)
        if self.activation_fn is not None:
            y = self.activation_fn(y)
        return y

    # ----------------------------------------------------------------------------------------
    # Training.

    def _prepare_weights(self, x, batch_weights, mask):
        """(weights, mask): float frequency weights when batch_weights is given (the mask folded
        in), else None and the boolean mask (or None), both broadcastable to x."""
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.dtype != jnp.bool_:
                raise TypeError(f"mask must be boolean (True = counts), got dtype {mask.dtype}.")
            mask = _per_example(mask, x, "mask")
        if batch_weights is None:
            return None, mask
        batch_weights = jnp.asarray(batch_weights)
        if not jnp.issubdtype(batch_weights.dtype, jnp.number):
            raise TypeError(f"batch_weights must be numeric, got dtype {batch_weights.dtype}.")
        weights = _per_example(batch_weights, x, "batch_weights").astype(STATS_DTYPE)
        if mask is not None:
            weights = weights * mask.astype(STATS_DTYPE)
        return weights, None

    def _train_forward(self, x, gamma, beta, stats, feature_axis, weights, mask):
        """Normalizes with batch statistics.

        Returns `(y, mean, variance, count)`: mean and variance of shape `(C,)`, or `(G, C)`
        with G ghost batches, and count, the number (sum of weights) of elements behind each
        statistic, same shape, over all devices where the statistics are.
        """
        ghost_size = self.virtual_batch_size
        batch = x.shape[0]
        if ghost_size is not None and batch % ghost_size:
            raise ValueError(
                f"The batch size {batch} is not divisible by virtual_batch_size={ghost_size}."
            )
        num_ghosts = 1 if ghost_size is None else batch // ghost_size
        use_fused = self.fused is not False and not self.renorm and weights is None
        clipping = dict(self.renorm_clipping or {})

        if ghost_size is None:
            work_x, work_axes = x, (feature_axis,)
            work_mask, work_weights = mask, weights
            axis_name, groups = self.axis_name, self.axis_index_groups
        else:
            # Ghost batches become a leading axis that, like the features, is not reduced.
            ghost_shape = (num_ghosts, ghost_size, *x.shape[1:])
            work_x, work_axes = x.reshape(ghost_shape), (0, feature_axis + 1)
            regroup = lambda v: (
                None if v is None else jnp.broadcast_to(v, x.shape).reshape(ghost_shape)
            )
            work_mask, work_weights = regroup(mask), regroup(weights)
            # Ghost statistics are local by definition; only the update is merged (below).
            axis_name, groups = None, None
        reduce_axes = tuple(a for a in range(work_x.ndim) if a not in work_axes)
        stats_shape = tuple(work_x.shape[a] for a in work_axes)
        per_stat = lambda v: None if v is None else jnp.broadcast_to(v, stats_shape)

        if self.renorm:
            y, mean, variance = batch_renorm(
                work_x,
                per_stat(gamma),
                per_stat(beta),
                per_stat(stats["renorm_mean"].value),
                per_stat(stats["renorm_stddev"].value),
                epsilon=self.epsilon,
                rmax=clipping.get("rmax"),
                rmin=clipping.get("rmin"),
                dmax=clipping.get("dmax"),
                axis=work_axes,
                axis_name=axis_name,
                axis_index_groups=groups,
                mask=work_mask,
            )
        elif use_fused and ghost_size is not None:
            y, mean, variance = ghost_batch_norm(
                x,
                gamma,
                beta,
                virtual_batch_size=ghost_size,
                epsilon=self.epsilon,
                axis=feature_axis,
                mask=mask,
            )
        elif use_fused:
            y, mean, variance = fused_batch_norm(
                x,
                gamma,
                beta,
                epsilon=self.epsilon,
                axis=feature_axis,
                axis_name=axis_name,
                axis_index_groups=groups,
                mask=mask,
            )
        else:
            if work_weights is not None:
                mean, variance = weighted_moments(
                    work_x,
                    reduce_axes,
                    work_weights,
                    keepdims=True,
                    axis_name=axis_name,
                    axis_index_groups=groups,
                )
            else:
                mean, variance = moments(
                    work_x,
                    reduce_axes,
                    keepdims=True,
                    mask=work_mask,
                    axis_name=axis_name,
                    axis_index_groups=groups,
                )
            keep = lambda v: None if v is None else jnp.expand_dims(per_stat(v), reduce_axes)
            y = batch_normalization(work_x, mean, variance, keep(beta), keep(gamma), self.epsilon)
            mean, variance = mean.reshape(stats_shape), variance.reshape(stats_shape)
        y = y.reshape(x.shape)

        counted = work_weights if work_weights is not None else work_mask
        if counted is None:
            count = jnp.full(
                stats_shape, math.prod(work_x.shape[a] for a in reduce_axes), STATS_DTYPE
            )
        else:
            count = jnp.sum(
                jnp.broadcast_to(counted, work_x.shape).astype(STATS_DTYPE), reduce_axes
            ).reshape(stats_shape)
        if axis_name is not None:
            count = lax.psum(count, axis_name, axis_index_groups=groups)
        return y, mean, variance, count

    def _update_statistics(self, stats, batch_mean, batch_variance, count) -> None:
        """Moves the moving statistics toward this batch's (see the class docstring)."""
        values = {"mean": batch_mean, "variance": batch_variance}
        if self.unbiased_moving_variance:
            # Bessel's correction with n counted elements; a single element keeps variance 0.
            bessel = jnp.where(count > 1, count / jnp.where(count > 1, count - 1, 1), 1)
            values["variance"] = batch_variance * bessel
        if self.renorm:
            values["renorm_stddev"] = jnp.sqrt(batch_variance + self.epsilon)
        if self.virtual_batch_size is not None:
            # Mean over ghost batches (and devices), weighted by counted elements: the plain
            # mean without mask or weights, and empty ghost batches do not count.
            weighted_sums = {k: jnp.sum(count * v, axis=0) for k, v in values.items()}
            total = jnp.sum(count, axis=0)
            if self.axis_name is not None:
                weighted_sums, total = lax.psum(
                    (weighted_sums, total),
                    self.axis_name,
                    axis_index_groups=self.axis_index_groups,
                )
            safe_total = jnp.where(total > 0, total, 1)
            values = {k: v / safe_total for k, v in weighted_sums.items()}
            count = total
        # A feature without any counted element (all masked) keeps its statistics.
        has_data = count > 0
        keep_old = lambda new, old: jnp.where(has_data, new, old)
        no_count = jnp.zeros((), jnp.int32)

        if self.zero_debias_moving_mean:
            state = MovingAverageState(
                stats["moving_mean"].value,
                stats["moving_mean_biased"].value,
                stats["num_updates"].value,
            )
            new = moving_average(self.decay, zero_debias=True).update(state, values["mean"])
            stats["moving_mean"].value = keep_old(new.average, state.average)
            stats["moving_mean_biased"].value = keep_old(new.biased, state.biased)
            # The step count is shared by all features: it advances when any feature counted
            # something (a feature without data in an otherwise counted batch drifts slightly).
            stats["num_updates"].value = jnp.where(jnp.any(has_data), new.count, state.count)
        else:
            old = stats["moving_mean"].value
            new = moving_average(self.decay).update(
                MovingAverageState(old, None, no_count), values["mean"]
            )
            stats["moving_mean"].value = keep_old(new.average, old)
        old = stats["moving_variance"].value
        new = moving_average(self.decay).update(
            MovingAverageState(old, None, no_count), values["variance"]
        )
        stats["moving_variance"].value = keep_old(new.average, old)
        if self.renorm:
            old = (stats["renorm_mean"].value, stats["renorm_stddev"].value)
            new = moving_average(self.renorm_decay).update(
                MovingAverageState(old, None, no_count), (values["mean"], values["renorm_stddev"])
            )
            stats["renorm_mean"].value = keep_old(new.average[0], old[0])
            stats["renorm_stddev"].value = keep_old(new.average[1], old[1])

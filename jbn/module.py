"""`jbn.BatchNorm`: a Flax linen module with the arguments of TF1's `tf.contrib.layers.batch_norm`.

The module owns variables and modes only: its fields are checked once into a
`jbn.layer.LayerOptions`, and each call reads the variables, runs the pure `jbn.layer.apply`
(every formula in the core, `jbn.running` for the moving statistics) and writes the statistics
back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jbn import _checks, layer, running

__all__ = ["BatchNorm"]

STATS_DTYPE = running.STATS_DTYPE


class BatchNorm(layer.LayerArguments, nn.Module):
    """Batch normalization with the arguments of TF1's `tf.contrib.layers.batch_norm`.

    Training (`is_training=True`) normalizes with the statistics of the batch and moves the
    moving statistics toward them; inference (`is_training=False`) normalizes with the moving
    statistics and never changes them:

        y = activation_fn((x - mean) / sqrt(variance + epsilon) * gamma + beta)

    Statistics are per feature (the axis given by `data_format` or `axis`) over every other axis,
    accumulated in float32 whatever the input dtype, with a variance that stays accurate when
    the mean is large against the spread (see `jbn.stats`).

    Example, one training step and an evaluation (a doctest, run by tests/test_docstrings.py):

    >>> import jax, jax.numpy as jnp, jbn
    >>> x = jax.random.normal(jax.random.key(0), (16, 4, 4, 3))  # NHWC
    >>> target = jnp.tanh(x)
    >>> model = jbn.BatchNorm(decay=0.9, scale=True)
    >>> variables = model.init(jax.random.key(0), x, is_training=False)
    >>> params, batch_stats = variables["params"], variables["batch_stats"]
    >>> def loss_fn(params):
    ...     y, updates = model.apply(
    ...         {"params": params, "batch_stats": batch_stats}, x, is_training=True,
    ...         mutable=["batch_stats", "losses"])
    ...     regularization = sum(jax.tree.leaves(updates.get("losses", {})))
    ...     return jnp.mean((y - target) ** 2) + regularization, updates["batch_stats"]
    >>> grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params)
    >>> params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)  # or optax
    >>> y_eval = model.apply({"params": params, "batch_stats": batch_stats}, x, is_training=False)
    >>> y_eval.shape, sorted(batch_stats)
    ((16, 4, 4, 3), ['moving_mean', 'moving_variance'])

    Names in other libraries (TF1, flax.linen, flax.nnx, PyTorch) and where their semantics
    differ: the table of the guide "Coming from TF1, flax or PyTorch" (docs/guides/migration.md).

    Variables: `params` hold `beta` (if `center`) and `gamma` (if `scale`), of the feature shape
    `(C,)` (the sizes along `axis`) and dtype `param_dtype`. `batch_stats` holds `moving_mean`
    and `moving_variance`, feature-shaped, of dtype `promote_types(param_dtype, float32)`
    (float32; float64 with `param_dtype=float64` under `jax_enable_x64`), as is every statistic
    below but the int32 `num_updates`; with `renorm` also `moving_stddev`
    (TF1's inference moving average of `sqrt(variance + epsilon)`, from which
    `moving_variance = max(moving_stddev**2 - epsilon, 0)` is derived), `renorm_mean` and
    `renorm_stddev` (the correction statistics, updated with `renorm_decay`); with
    `zero_debias_moving_mean` also `moving_mean_biased` (the biased accumulator, starting at 0);
    with `zero_debias_moving_mean` or `decay=None` also `num_updates` (int32 step count). Every
    update formula is in `jbn.running`. The statistics move only when `is_training` and
    `batch_stats` is mutable in `apply`; `init` never moves them.

    Attributes:
      decay: weight of the old value in the moving averages,
        `new = decay * old + (1 - decay) * batch` (TF/flax convention; PyTorch's momentum is
        `1 - decay`), a number in [0, 1); or None for the cumulative average of every batch so
        far (PyTorch's `momentum=None`).
      center: add the learned offset `beta`.
      scale: multiply by the learned `gamma` (TF1's default is False: when the next layer is
        linear or a ReLU the scale can be folded into it).
      epsilon: positive float added to the variance inside the square root.
      activation_fn: optional callable applied to the output (TF1's Python-level fusion).
      param_initializers: optional dict of flax initializers `(key, shape, dtype) -> array`
        for any of `beta`, `gamma`, `moving_mean`, `moving_variance` (defaults: zeros, ones,
        zeros, ones). Moving statistics are initialized in their dtype (above) with the `params`
        RNG.
      param_regularizers: optional dict of callables `param -> scalar` for `beta` and/or
        `gamma`. Their values are recorded with `self.sow("losses", "<name>_regularization")`
        (not during `init`); pass `mutable=["losses", ...]` to `apply` and add the sum of the
        `losses` collection's leaves to the training loss.
      is_training: default mode (a bool), overridden by the call argument. One of the two must
        be given.
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
        rank 2 to 5; rank-2 inputs `(B, C)` have their features last in both formats. None
        (default) means `'NHWC'` unless `axis` is given.
      axis: flax's way to name the feature axis: an int or a tuple of ints (several feature
        axes give parameters of their joint shape), for inputs of any rank with an axis left to
        reduce. Give `data_format` or `axis`, not both.
      zero_debias_moving_mean: debias the moving mean as TF/Adam do, so early inference is not
        dragged toward the initial value: a biased accumulator starts at 0 and
        `moving_mean = moving_mean_biased / (1 - decay**num_updates)` (the variance is not
        debiased, as in TF1).
      renorm: batch renormalization as TF1/Keras define it (Ioffe 2017): training normalizes
        with the batch statistics corrected by `r = sigma_B / renorm_stddev`,
        `d = (mu_B - renorm_mean) / renorm_stddev` (clipped, without gradient; `renorm_stddev`
        floored at `sqrt(epsilon)`), with `sigma_B = sqrt(var_B + epsilon)`; inference divides
        by `moving_stddev`, a moving average (with `decay`) of `sigma_B`. Both stddevs start at
        the square root of the initial moving variance and `renorm_mean` at the initial moving
        mean, so with no clipping and `renorm_decay == decay` inference with the statistics
        before a step equals that step's training output.
      renorm_clipping: optional dict with keys `rmax`, `rmin`, `dmax` clipping `r` to
        `[rmin, rmax]` and `d` to `[-dmax, dmax]`; a missing key leaves that side unclipped.
        Values are checked at construction: non-negative numbers (inf allowed, NaN not) with
        `rmin <= rmax`.
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
      dtype: floating output dtype; None keeps the input dtype. The computation is done in
        `promote_types(input dtype, dtype)` with float32 (or wider) statistics.
      param_dtype: floating dtype of `beta` and `gamma`; the moving statistics get
        `promote_types(param_dtype, float32)`.
      unbiased_moving_variance: store the unbiased (Bessel-corrected, `n / (n - 1)` with `n`
        the number of counted elements per feature, or per ghost batch, over all devices with
        `axis_name`; the sum of the frequency weights with `batch_weights`) variance in
        `moving_variance`, as PyTorch does, for checkpoints that must match PyTorch. Training
        still normalizes with the biased batch variance, so inference (which reads
        `moving_variance`) divides by a slightly larger variance than training did: outputs
        of the two modes differ by a factor `sqrt((n - 1) / n)` on the same batch, which
        matters for small batches (pytorch#19902).
    """

    # The layer's arguments (the attributes above but `is_training`) are the fields of
    # `jbn.layer.LayerArguments`, declared there once; `is_training` follows them.
    is_training: bool | None = None

    # Variable names as stored, for jbn's names (the identity here): `jbn.linen.BatchNorm`, the
    # flax-named drop-in, stores the same variables under flax's names.
    variable_names: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self) -> None:
        # Constructor arguments are checked here, once, so a bad TF1 port fails where it is
        # written; the checked options are kept for the calls.
        options = layer.LayerOptions(
            **{name: getattr(self, name) for name in layer.LAYER_ARGUMENTS}
        )
        object.__setattr__(self, "_layer_options", options)
        if self.is_training is not None:
            _checks.as_bool(self.is_training, "is_training")
        super().__post_init__()

    def _options(self) -> layer.LayerOptions:
        """The checked options (`jbn.layer.LayerOptions`) of this module's fields."""
        return self._layer_options

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
          x: floating array: with `data_format`, of rank 2 to 5, `(B, C)`, or `(B, ..., C)` for
            NHWC and `(B, C, ...)` for NCHW; with `axis`, any rank with an axis left to reduce.
            bf16/fp16 inputs get float32 statistics. Training needs more than one value per
            feature (per ghost batch): an input such as `(1, C)` raises ValueError unless
            `axis_name` brings the rest of the batch; masks and traced `batch_weights` that
            leave one counted value are not checked.
          is_training: True: batch statistics, and update the moving ones (requires
            `mutable=["batch_stats"]` in `apply`); False: moving statistics. A Python/numpy
            bool or a concrete boolean scalar (a string such as "False" is refused). Overrides
            the attribute of the same name.
          batch_weights: optional non-negative frequency weights of shape `(B,)` (or
            broadcastable to `x`): the statistics are the weighted ones
            (`jbn.weighted_moments`). Training only (ignored at inference); not with `renorm`
            (as in TF1) nor with `fused=True`.
          mask: optional boolean array, of shape `(B,)` (True = this example counts) or
            broadcastable to `x` (True = this element counts). Masked elements (padding) may
            hold anything, NaN and Inf included: they do not count in the statistics, and they
            are still normalized, but with the statistics and parameters held constant, so that
            nothing they hold reaches another output or any gradient but their own. Training
            only (ignored at inference). A rank-1 mask or weight vector of length B is always
            read as per example.

        Returns:
          An array of `x`'s shape and dtype `dtype` (None: `x`'s dtype).
        """
        training = self._resolve_is_training(is_training)
        options = self._options()
        x = jnp.asarray(x)
        feature_shape = layer.feature_shape(options, x)
        params = self._affine_params(feature_shape)
        variables = self._statistics_variables(feature_shape)
        state = running.RunningStatistics(
            **{field: variable.value for field, variable in variables.items()}
        )
        if training and not self.is_mutable_collection("batch_stats"):
            raise ValueError(
                "jbn.BatchNorm is in training mode (is_training=True), which updates the moving "
                "statistics in the 'batch_stats' collection, but that collection is immutable. "
                "Pass mutable=['batch_stats'] to apply() (and use the returned updates), or "
                "is_training=False to normalize with the moving statistics."
            )
        y, new_state = layer.apply(
            options,
            params,
            state,
            x,
            training=training,
            batch_weights=batch_weights,
            mask=mask,
            update_statistics=not self.is_initializing(),
        )
        if training and not self.is_initializing():
            for field, variable in variables.items():
                variable.value = getattr(new_state, field)
        return y

    # ----------------------------------------------------------------------------------------
    # Modes and variables.

    def _resolve_is_training(self, is_training: Any) -> bool:
        value = self.is_training if is_training is None else is_training
        if value is None:
            raise ValueError(
                "jbn.BatchNorm needs is_training: pass is_training=True/False to the call or to "
                "the constructor (the call wins)."
            )
        return _checks.as_bool(value, "is_training")

    def _affine_params(self, feature_shape: tuple[int, ...]) -> dict[str, jax.Array]:
        """`beta` and `gamma` (those enabled), created on first use; sows their regularizers."""
        regularizers = self.param_regularizers or {}
        values = {}
        for name, enabled in (("beta", self.center), ("gamma", self.scale)):
            if not enabled:
                continue
            value = self.param(
                self.variable_names.get(name, name),
                layer.initializer(self.param_initializers, name),
                feature_shape,
                self.param_dtype,
            )
            if name in regularizers and not self.is_initializing():
                # Skipped in init so that the losses collection does not leak into variables.
                # A frozen parameter (trainable=False) gets no gradient from its loss either.
                frozen = value if self.trainable else lax.stop_gradient(value)
                self.sow("losses", f"{name}_regularization", regularizers[name](frozen))
            values[name] = value
        return values

    def _statistics_variables(self, feature_shape: tuple[int, ...]) -> dict[str, Any]:
        """One `batch_stats` variable per field of the running state, keyed by field."""
        rule = self._options().running_rule()
        rule_dtype = running.statistics_dtype(self.param_dtype)
        initial = {}

        def initial_state() -> running.RunningStatistics:
            # Computed once, when the variables are created (the params RNG is drawn then).
            if "state" not in initial:
                key = lambda: self.make_rng("params")
                initial["state"] = rule.init(
                    layer.initial_statistic(
                        self.param_initializers, "moving_mean", key, feature_shape, rule_dtype
                    ),
                    layer.initial_statistic(
                        self.param_initializers, "moving_variance", key, feature_shape, rule_dtype
                    ),
                )
            return initial["state"]

        shapes = jax.eval_shape(
            lambda: rule.init(
                jnp.zeros(feature_shape, STATS_DTYPE), jnp.ones(feature_shape, STATS_DTYPE)
            )
        )
        return {
            field: self.variable(
                "batch_stats",
                self.variable_names.get(
                    running.VARIABLE_NAMES[field], running.VARIABLE_NAMES[field]
                ),
                lambda field=field: getattr(initial_state(), field),
            )
            for field, shape in shapes._asdict().items()
            if shape is not None
        }

"""`jbn.equinox.BatchNorm`: jbn's batch norm as an Equinox layer (the extra `jbn[equinox]`).

A thin shell over `jbn.layer` and `jbn.running`, like `jbn.BatchNorm` (linen) and
`jbn.nnx.BatchNorm`, in Equinox's conventions: the layer sees one example `(C, ...)` (channels
first) and is called under `jax.vmap(..., axis_name=...)`, whose named axis is the batch; the
running statistics live in an `eqx.nn.State` under a `StateIndex`; the mode is the `inference`
field that `eqx.nn.inference_mode` flips. `jbn` itself never imports equinox: this module does,
and is imported only as `jbn.equinox`.

Unlike `eqx.nn.BatchNorm` (0.13): training normalizes with the batch statistics, never with
EMA-mixed ones (equinox#659); the running variance starts at 1 (equinox#955); inference reads
the moving averages themselves, with no `m**t / (1 - m**t)` inflation of the variance; the
statistics are float32 or wider whatever the input dtype; nested vmaps and inputs of any rank
work (equinox#707, #592).

Example (a doctest, run by tests/test_docstrings.py):

>>> import equinox as eqx, jax, jax.numpy as jnp
>>> import jbn.equinox
>>> x = jax.random.normal(jax.random.key(0), (8, 3, 4, 4))  # (B, C, H, W)
>>> bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, "batch")
>>> batched = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
>>> y, state = batched(x, state)  # training: the batch's statistics; the moving ones move
>>> inference = eqx.nn.inference_mode(bn)
>>> y = jax.vmap(inference, in_axes=(0, None), out_axes=(0, None))(x, state)[0]
>>> y.shape, state.get(bn.state_index).mean.shape
((8, 3, 4, 4), (3,))
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from jbn import _checks, layer, running

__all__ = ["BatchNorm"]

# Per-example inputs have their channels first, as every Equinox layer takes them.
FEATURE_AXES = (0,)


class BatchNorm(eqx.nn.StatefulLayer):
    """Batch normalization for Equinox, per example under `jax.vmap(..., axis_name=...)`.

    Training (`inference=False`):

        y = (x - mean_B) / sqrt(var_B + epsilon) * gamma + beta

    with `mean_B`, `var_B` the exact statistics of the whole batch (every example of the named
    axis or axes, and every element of the non-channel axes), computed in float32 or wider;
    then `moving_mean <- decay * moving_mean + (1 - decay) * mean_B`, and the same for the
    variance (see `jbn.running`). Inference normalizes with `moving_mean` and `moving_variance`
    and moves nothing.

    Args:
      input_size: the number of channels `C`.
      axis_name: the batch's named axis (or a tuple of names), as given to `jax.vmap`,
        `jax.pmap` or `shard_map`; required for training (statistics over one example would be
        meaningless), unused at inference.
      decay: weight on the old value of the moving averages in [0, 1) (`eqx.nn.BatchNorm`'s
        `momentum`), or None for the cumulative average.
      center, scale: learn `beta` / `gamma` (`channelwise_affine=True` is both).
      epsilon: positive float added to the variance (`eps`).
      inference: the mode; `eqx.nn.inference_mode` sets it, the call's `inference` overrides it.
      **options: `fused`, `zero_debias_moving_mean`, `unbiased_moving_variance`, `renorm`,
        `renorm_clipping`, `renorm_decay`, `axis_index_groups`, `dtype`, `param_dtype`: as in
        `jbn.BatchNorm` (same checks, same numbers). `dtype` is the computation and output
        dtype (None: the input's); `param_dtype` that of `gamma`/`beta`; the statistics are
        float32 (float64 inputs are reduced in float64).

    Attributes: `gamma`, `beta` (arrays of shape `(C,)`, or None), `state_index` (a `StateIndex`
    of `jbn.running.RunningStatistics`: `mean` and `variance`, float32, start at 0 and 1).
    """

    gamma: jax.Array | None
    beta: jax.Array | None
    state_index: eqx.nn.StateIndex
    inference: bool
    input_size: int = eqx.field(static=True)
    options: layer.LayerOptions = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable] | None,
        *,
        decay: float | None = 0.99,
        center: bool = True,
        scale: bool = True,
        epsilon: float = 1e-5,
        inference: bool = False,
        fused: bool | None = None,
        zero_debias_moving_mean: bool = False,
        unbiased_moving_variance: bool = False,
        renorm: bool = False,
        renorm_clipping: Mapping[str, float] | None = None,
        renorm_decay: float = 0.99,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        # Equinox's sequence of names is jbn's tuple of names (a list would not hash).
        if isinstance(axis_name, list):
            axis_name = tuple(axis_name)
        self.options = layer.LayerOptions(
            decay=decay,
            center=center,
            scale=scale,
            epsilon=epsilon,
            fused=fused,
            axis=FEATURE_AXES,
            zero_debias_moving_mean=zero_debias_moving_mean,
            renorm=renorm,
            renorm_clipping=renorm_clipping,
            renorm_decay=renorm_decay,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            dtype=dtype,
            param_dtype=param_dtype,
            unbiased_moving_variance=unbiased_moving_variance,
        )
        _checks.as_bool(inference, "inference")
        self.input_size = _checks.positive_int(input_size, "input_size")
        shape = (self.input_size,)
        # The layers' default initializers (ones, zeros; they draw no key).
        self.gamma = layer.initializer(None, "gamma")(None, shape, param_dtype) if scale else None
        self.beta = layer.initializer(None, "beta")(None, shape, param_dtype) if center else None
        self.inference = inference
        initial = (
            layer.initial_statistic(None, name, None, shape)
            for name in ("moving_mean", "moving_variance")
        )
        self.state_index = eqx.nn.StateIndex(self._rule().init(*initial))

    @property
    def axis_name(self) -> Any:
        return self.options.axis_name

    @property
    def decay(self) -> float | None:
        return self.options.decay

    @property
    def zero_debias_moving_mean(self) -> bool:
        return self.options.zero_debias_moving_mean

    @property
    def unbiased_moving_variance(self) -> bool:
        return self.options.unbiased_moving_variance

    @property
    def renorm_decay(self) -> float:
        return self.options.renorm_decay

    @property
    def dtype(self) -> Any:
        return self.options.dtype

    def _rule(self) -> running.RunningStatisticsUpdate:
        # float32 statistics whatever param_dtype (the documented dtype of this layer's state).
        return self.options.running_rule(running.STATS_DTYPE)

    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State,
        *,
        key: jax.Array | None = None,
        inference: bool | None = None,
        mask: jax.Array | None = None,
        batch_weights: jax.Array | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """Normalizes one example; in training also returns the moved running statistics.

        Args:
          x: one example `(C, ...)`, floating, of any rank >= 1 (the batch is the vmapped axis).
          state: the `eqx.nn.State` holding this layer's statistics.
          key: ignored (Equinox's layer signature).
          inference: overrides the `inference` field when not None (a Python bool).
          mask: boolean, True if this element counts (training only): a scalar for the whole
            example, or an array broadcastable to `x.shape`. Masked-out elements reach neither
            the statistics nor any shared gradient, whatever they hold (NaN included).
          batch_weights: non-negative frequency weights, scalar or broadcastable to `x.shape`
            (training only; not with renorm).

        Returns:
          `(y, new_state)`: `y` of `x`'s shape in `dtype` (None: `x`'s dtype); the state moved
          in training, unchanged at inference.
        """
        del key
        inference = self.inference if inference is None else inference
        training = not _checks.as_bool(inference, "inference")
        x = jnp.asarray(x)
        _checks.check_floating(x, "x")
        if x.ndim < 1 or x.shape[0] != self.input_size:
            raise ValueError(
                f"x must be one example (C, ...) with C = input_size = {self.input_size}, got "
                f"shape {x.shape}: call the layer under jax.vmap over the batch."
            )
        if training and self.options.axis_name is None:
            raise ValueError(
                "jbn.equinox.BatchNorm needs axis_name to train: it sees one example, so the "
                "batch is the axis of jax.vmap(..., axis_name=...) (or pmap/shard_map)."
            )
        # Broadcast first (training only, as the arguments are): `jbn.layer.apply` reads a
        # rank-1 value as one entry per example of axis 0, which here is the channel axis.
        full = {}
        for name, value in (("mask", mask), ("batch_weights", batch_weights)):
            if value is not None and training:
                _checks.check_broadcastable(value, x.shape, name)
                full[name] = jnp.broadcast_to(value, x.shape)
        statistics = state.get(self.state_index)
        y, new = layer.apply(
            self.options,
            {"beta": self.beta, "gamma": self.gamma},
            statistics,
            x,
            training=training,
            axes=FEATURE_AXES,
            **full,
        )
        if training:
            state = state.set(self.state_index, jax.tree.map(lax.stop_gradient, new))
        return y, state

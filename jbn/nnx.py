"""`jbn.nnx.BatchNorm`: jbn's batch norm as a Flax NNX module, plus conversion helpers.

Same arguments, defaults, checks and numbers as the linen `jbn.BatchNorm` (both are thin shells
over `jbn.layer` and `jbn.running`), with NNX's conventions: the mode is the attribute
`use_running_average`, False (training) by default as in `nnx.BatchNorm`, set by
`model.train()`, `model.eval()` and `nnx.view(model, use_running_average=...)` (through
`set_view`); `gamma`/`beta` are `nnx.Param`, the running statistics `nnx.BatchStat` updated in
place during training.

Example, training with `nnx.Optimizer` and evaluating (a doctest, run by
tests/test_docstrings.py):

>>> import jax, jax.numpy as jnp, optax, jbn
>>> from flax import nnx
>>> x = jax.random.normal(jax.random.key(0), (16, 3)) + 5.0
>>> target = jnp.tanh(x)
>>> model = jbn.nnx.BatchNorm(3, decay=0.9, scale=True, rngs=nnx.Rngs(0))
>>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
>>> @nnx.jit
... def train_step(model, optimizer, x, target):
...     def loss_fn(model):
...         return jnp.mean((model(x) - target) ** 2) + jbn.nnx.regularization_loss(model)
...     loss, grads = nnx.value_and_grad(loss_fn)(model)
...     optimizer.update(model, grads)
...     return loss
>>> model.train()  # batch statistics; moving statistics move
>>> loss = train_step(model, optimizer, x, target)
>>> model.eval()  # moving statistics, nothing moves
>>> y = model(x)
>>> y.shape, bool(jnp.all(model.moving_mean[...] > 0))
((16, 3), True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jbn import _checks, layer, linen, running

__all__ = [
    "BatchNorm",
    "from_linen_variables",
    "regularization_loss",
    "replace_flax_batch_norm",
    "to_linen_variables",
]


class BatchNorm(nnx.Module):
    """Batch normalization with TF1's arguments, for Flax NNX.

    Args:
      num_features: size of the feature axis (a tuple of sizes for several `axis` entries).
      use_running_average: the mode attribute: False (default, as `nnx.BatchNorm` and TF1's
        `is_training=True`) trains (batch statistics; the moving statistics move in place), True
        evaluates (moving statistics, nothing moves), None requires the call argument.
        `model.train()`, `model.eval()` and `nnx.view` set it.
      rngs: `nnx.Rngs` for the initializers.
      **options: `decay`, `center`, `scale`, `epsilon`, `activation_fn`,
        `param_initializers`, `param_regularizers`, `trainable`, `fused`, `data_format`,
        `axis`, `zero_debias_moving_mean`, `renorm`, `renorm_clipping`, `renorm_decay`,
        `virtual_batch_size`, `axis_name`, `axis_index_groups`, `dtype`, `param_dtype`,
        `unbiased_moving_variance`: as in `jbn.BatchNorm` (same defaults, same checks, same
        numbers).

    Attributes: `beta`, `gamma` (`nnx.Param` or None); `moving_mean`, `moving_variance` and,
    depending on the options, `moving_stddev`, `moving_mean_biased`, `renorm_mean`,
    `renorm_stddev`, `num_updates` (`nnx.BatchStat` of dtype `promote_types(param_dtype,
    float32)` / int32), the variables of the linen module under the same names. `decay` and
    `epsilon` may be reassigned on a built layer (a new `epsilon` is checked and used by the
    next call, as in `nnx.BatchNorm`).

    Regularization: where linen sows to `losses`, call `self.regularization_loss()` (or
    `jbn.nnx.regularization_loss(model)` for every jbn layer of a model) and add it to the loss.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool | None = False,
        rngs: nnx.Rngs,
        **options: Any,
    ):
        # The layer's arguments are declared once, in `jbn.layer.LayerArguments`; an unknown
        # one is a TypeError naming it.
        options = layer.layer_options(**options)
        self.options = nnx.static(options)
        if use_running_average is not None:
            _checks.as_bool(use_running_average, "use_running_average")
        feature_shape = (
            (_checks.positive_int(num_features, "num_features"),)
            if not isinstance(num_features, Sequence)
            else tuple(_checks.positive_int(n, "num_features") for n in num_features)
        )
        self.feature_shape = feature_shape
        self.use_running_average = use_running_average

        initializers, param_dtype = options.param_initializers, options.param_dtype
        for name, enabled in (("beta", options.center), ("gamma", options.scale)):
            value = None
            if enabled:
                init = layer.initializer(initializers, name)
                value = nnx.Param(init(rngs.params(), feature_shape, param_dtype))
            setattr(self, name, value if enabled else nnx.data(None))
        stats_dtype = running.statistics_dtype(param_dtype)
        state = options.running_rule().init(
            layer.initial_statistic(
                initializers, "moving_mean", rngs.params, feature_shape, stats_dtype
            ),
            layer.initial_statistic(
                initializers, "moving_variance", rngs.params, feature_shape, stats_dtype
            ),
        )
        for field, value in state._asdict().items():
            if value is not None:
                setattr(self, running.VARIABLE_NAMES[field], nnx.BatchStat(value))

    @property
    def epsilon(self) -> float:
        """The variance epsilon; assigning a new value checks it and the next call uses it."""
        return self.options.epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self.options = nnx.static(dataclasses.replace(self.options, epsilon=value))

    @property
    def decay(self) -> float | None:
        """The moving averages' decay; assigning a new value checks it and the next call uses
        it."""
        return self.options.decay

    @decay.setter
    def decay(self, value: float | None) -> None:
        self.options = nnx.static(dataclasses.replace(self.options, decay=value))

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Class method used by ``nnx.view``.

        Args:
          use_running_average: if True, the stored batch statistics will be
            used instead of computing the batch statistics on the input.
        """
        if use_running_average is not None:
            self.use_running_average = _checks.as_bool(use_running_average, "use_running_average")

    def _statistics(self) -> dict[str, nnx.BatchStat]:
        """The running-statistics variables, keyed by `RunningStatistics` field."""
        return {
            field: getattr(self, name)
            for field, name in running.VARIABLE_NAMES.items()
            if isinstance(getattr(self, name, None), nnx.BatchStat)
        }

    @staticmethod
    def _param(param: nnx.Param | None) -> jax.Array | None:
        return None if param is None else param[...]

    def regularization_loss(self) -> jax.Array:
        """Sum of `param_regularizers` applied to `beta`/`gamma` (0.0 without any)."""
        total = jnp.zeros((), jnp.float32)
        for name, regularizer in (self.options.param_regularizers or {}).items():
            param = getattr(self, name)
            if param is not None:
                total = total + regularizer(param[...])
        return total

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        batch_weights: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes `x`; in training also updates the running statistics in place.

        Args:
          x: as in `jbn.BatchNorm`.
          use_running_average: overrides the attribute: True evaluates, False trains.
          batch_weights, mask: as in `jbn.BatchNorm` (training only).

        Returns:
          An array of `x`'s shape and dtype `dtype` (None: `x`'s dtype).
        """
        value = self.use_running_average if use_running_average is None else use_running_average
        if value is None:
            raise ValueError(
                "jbn.nnx.BatchNorm needs use_running_average: call model.train() or "
                "model.eval(), use nnx.view(model, use_running_average=...), pass it to the "
                "constructor, or to the call."
            )
        training = not _checks.as_bool(value, "use_running_average")
        x = jnp.asarray(x)
        feature_shape = layer.feature_shape(self.options, x)
        if feature_shape != self.feature_shape:
            raise ValueError(
                f"x of shape {x.shape} has features of shape {feature_shape}, but the layer "
                f"was built with num_features={self.feature_shape}."
            )
        params = {"beta": self._param(self.beta), "gamma": self._param(self.gamma)}
        variables = self._statistics()
        state = running.RunningStatistics(**{k: v[...] for k, v in variables.items()})
        y, new_state = layer.apply(
            self.options,
            params,
            state,
            x,
            training=training,
            batch_weights=batch_weights,
            mask=mask,
        )
        if training:
            for field, variable in variables.items():
                variable[...] = lax.stop_gradient(getattr(new_state, field))
        return y


# The other arguments read back from the options (read-only: a built layer's variables follow
# them).
for _name in layer.LAYER_ARGUMENTS:
    if not hasattr(BatchNorm, _name):
        setattr(BatchNorm, _name, property(lambda self, name=_name: getattr(self.options, name)))


def regularization_loss(model: nnx.Module) -> jax.Array:
    """Sum of every `jbn.nnx.BatchNorm`'s `regularization_loss()` inside `model`."""
    total = jnp.zeros((), jnp.float32)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, BatchNorm):
            total = total + node.regularization_loss()
    return total


def to_linen_variables(model: BatchNorm) -> dict[str, dict[str, jax.Array]]:
    """`{"params": ..., "batch_stats": ...}` for `jbn.BatchNorm(...).apply` (same names)."""
    params = {
        name: getattr(model, name)[...]
        for name in ("beta", "gamma")
        if getattr(model, name) is not None
    }
    return {
        "params": params,
        "batch_stats": {
            running.VARIABLE_NAMES[field]: variable[...]
            for field, variable in model._statistics().items()
        },
    }


def from_linen_variables(model: BatchNorm, variables: Mapping[str, Any]) -> BatchNorm:
    """Copies one linen layer's variables into `model` in place (and returns it).

    `variables` are `{"params": ..., "batch_stats": ...}` of a `jbn.BatchNorm`, or of a
    `flax.linen.BatchNorm` / `jbn.linen.BatchNorm` (flax's names `scale`, `bias`, `mean`, `var`
    are converted with `jbn.linen.from_flax_variables`).

    Raises ValueError when the two do not hold the same variables (different options).
    """
    if "mean" in variables.get("batch_stats", {}):
        variables = linen.from_flax_variables(variables)
    params = dict(variables.get("params", {}))
    stats = dict(variables.get("batch_stats", {}))
    want_params = {n for n in ("beta", "gamma") if getattr(model, n) is not None}
    want_stats = {running.VARIABLE_NAMES[f] for f in model._statistics()}
    if set(params) != want_params or set(stats) != want_stats:
        raise ValueError(
            f"variables hold params {sorted(params)} and batch_stats {sorted(stats)}, but the "
            f"model has {sorted(want_params)} and {sorted(want_stats)}: build both modules "
            "with the same options."
        )
    for name, value in params.items():
        getattr(model, name)[...] = jnp.asarray(value, getattr(model, name)[...].dtype)
    for name, value in stats.items():
        getattr(model, name)[...] = jnp.asarray(value, getattr(model, name)[...].dtype)
    return model


def _get(parent, key):
    return (
        parent[key]
        if isinstance(parent, (nnx.List, nnx.Dict, list, dict))
        else getattr(parent, key)
    )


def _set(parent, key, value) -> None:
    if isinstance(parent, (nnx.List, nnx.Dict, list, dict)):
        parent[key] = value
    else:
        setattr(parent, key, value)


def from_flax(layer_: nnx.BatchNorm, **overrides) -> BatchNorm:
    """A `jbn.nnx.BatchNorm` with a `flax.nnx.BatchNorm`'s settings, parameters and statistics.

    Mapping: the arguments by `jbn.linen.FLAX_ARGUMENTS` (`momentum -> decay`, `use_bias ->
    center`, `use_scale -> scale`; `epsilon`, `axis`, `axis_name`, `axis_index_groups`,
    `dtype`, `param_dtype` keep their names), the variables by `jbn.linen.FLAX_NAMES` (`bias ->
    beta`, `scale -> gamma`, `mean -> moving_mean`, `var -> moving_variance`);
    `use_running_average` carries over.
    `overrides` are further `jbn.nnx.BatchNorm` arguments (e.g. `renorm=True`).
    """
    kwargs = {name: getattr(layer_, flax) for name, flax in linen.FLAX_ARGUMENTS.items()}
    kwargs.update(use_running_average=layer_.use_running_average, **overrides)
    new = BatchNorm(layer_.num_features, rngs=nnx.Rngs(0), **kwargs)
    for name, flax_name in linen.FLAX_NAMES.items():
        variable = getattr(layer_, flax_name, None)
        if variable is not None and getattr(new, name) is not None:
            getattr(new, name)[...] = variable[...]
    return new


def replace_flax_batch_norm(
    model: nnx.Module, *, optimizer: nnx.Optimizer | None = None, **overrides
) -> nnx.Module:
    """Replaces every `flax.nnx.BatchNorm` inside `model` by a `jbn.nnx.BatchNorm` in place.

    Parameters and statistics carry over (see `from_flax`), so a model switches in one line::

        model = jbn.nnx.replace_flax_batch_norm(model)            # same numbers, jbn's layer
        model = jbn.nnx.replace_flax_batch_norm(model, renorm=True)  # and a jbn feature

    Run it before creating the `nnx.Optimizer`: an optimizer's state mirrors the parameters by
    name (flax's `scale`/`bias` become `gamma`/`beta`), so an optimizer made before the switch
    no longer matches the model and its `update` fails with a pytree-structure error. To switch
    a model whose optimizer already exists (e.g. restored mid-training), pass it as `optimizer`:
    its state (Adam's moments, ...) is renamed to follow the new parameters.

    Nested submodules, `nnx.List` and `nnx.Dict` are searched. Returns `model` (or the new layer
    when `model` itself is a `flax.nnx.BatchNorm`, which then cannot take `optimizer`).

    Raises ValueError when `optimizer` is given and `overrides` change which parameters exist
    (`center`, `scale`): the state of a parameter that appears or disappears cannot follow.
    """
    if isinstance(model, nnx.BatchNorm):
        if optimizer is not None:
            raise ValueError(
                "optimizer needs the model that holds the flax.nnx.BatchNorm, not the layer."
            )
        return from_flax(model, **overrides)
    paths = [path for path, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)]
    for path in paths:
        parent = model
        for key in path[:-1]:
            parent = _get(parent, key)
        _set(parent, path[-1], from_flax(_get(parent, path[-1]), **overrides))
    if optimizer is not None:
        _rename_optimizer_state(model, optimizer, {tuple(path) for path in paths})
    return model


def _rename_optimizer_state(model: nnx.Module, optimizer: nnx.Optimizer, layers: set) -> None:
    """Renames the parameters of the replaced `layers` (paths) in every `nnx.State` of the
    optimizer's state that mirrors the model's parameters."""
    names = {flax: name for name, flax in linen.FLAX_NAMES.items()}
    wanted = {path for path, _ in nnx.to_flat_state(nnx.state(model, optimizer.wrt))}

    def rename(node):
        if not isinstance(node, nnx.State):
            return node
        renamed = [
            ((*path[:-1], names[path[-1]]) if path[:-1] in layers else path, value)
            for path, value in nnx.to_flat_state(node)
        ]
        if {path for path, _ in renamed} != wanted:
            raise ValueError(
                "optimizer's state does not match the switched model's parameters (did "
                "overrides change center or scale?); create the optimizer after "
                "replace_flax_batch_norm instead."
            )
        return nnx.from_flat_state(renamed)

    is_leaf = lambda node: isinstance(node, (nnx.State, nnx.Variable))
    optimizer.opt_state = jax.tree.map(rename, optimizer.opt_state, is_leaf=is_leaf)

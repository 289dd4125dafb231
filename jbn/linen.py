"""`jbn.linen.BatchNorm`: a drop-in for `flax.linen.BatchNorm`, and flax <-> jbn variable names.

Switching a flax model (e.g. flax's `examples/imagenet` ResNet) is one line::

    norm = partial(jbn.linen.BatchNorm, use_running_average=not train, momentum=0.9,
                   epsilon=1e-5, dtype=self.dtype, axis_name="batch")

The module takes flax's arguments, defaults and call signature, and stores flax's variable
names (`params`: `scale`, `bias`; `batch_stats`: `mean`, `var`), so checkpoints of a flax model
load unchanged. Underneath it is `jbn.BatchNorm` (the same checks, kernels and running
statistics) with the names mapped by `FLAX_NAMES`, the one table of jbn <-> flax names;
`from_flax_variables`/`to_flax_variables` convert whole models' variables with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbn import layer, module

__all__ = ["FLAX_ARGUMENTS", "FLAX_NAMES", "BatchNorm", "from_flax_variables", "to_flax_variables"]

Initializer = layer.Initializer

#: jbn's variable names -> flax's (`flax.linen.BatchNorm`, `flax.nnx.BatchNorm`); params first.
FLAX_NAMES: dict[str, str] = {
    "gamma": "scale",
    "beta": "bias",
    "moving_mean": "mean",
    "moving_variance": "var",
}
_PARAM_NAMES = ("gamma", "beta")

#: jbn's layer arguments -> flax's (`flax.linen.BatchNorm`, `flax.nnx.BatchNorm`) of the same
#: meaning; jbn's others have no flax counterpart, and flax's initializers are jbn's
#: `param_initializers` (`scale_init`, `bias_init`).
FLAX_ARGUMENTS: dict[str, str] = {
    "decay": "momentum",
    "center": "use_bias",
    "scale": "use_scale",
    "epsilon": "epsilon",
    "axis": "axis",
    "axis_name": "axis_name",
    "axis_index_groups": "axis_index_groups",
    "dtype": "dtype",
    "param_dtype": "param_dtype",
}
_JBN_NAMES_OF_FLAX = ", ".join(
    [f"{name} is {flax}" for name, flax in FLAX_ARGUMENTS.items() if name != flax]
    + ["param_initializers are scale_init and bias_init"]
)


class _FlaxNamed(module.BatchNorm):
    """`jbn.BatchNorm` storing its variables under flax's names."""

    variable_names: ClassVar[Mapping[str, str]] = FLAX_NAMES


class BatchNorm(nn.Module):
    """`flax.linen.BatchNorm`'s arguments, defaults, call and variables, computed by jbn.

    Same outputs, `batch_stats` updates and gradients as `flax.linen.BatchNorm` (to float32
    round-off; jbn's variance is the accurate one, see below), so
    `norm = partial(jbn.linen.BatchNorm, ...)` switches a flax model and its checkpoints load
    unchanged. For jbn's own arguments (renorm, ghost batches, zero-debiasing, TF1 names) use
    `jbn.BatchNorm`; `to_flax_variables`/`from_flax_variables` move variables between the two.

    The attributes are flax's; `jbn.BatchNorm`'s name for each is in parentheses.

    Attributes:
      use_running_average: True normalizes with the stored statistics (`not is_training`);
        given here or at the call, not both (flax's `merge_param`).
      axis: the feature axis or axes (default -1).
      momentum: weight of the old value in the running averages (`decay`), default 0.99.
      epsilon: added to the variance (default 1e-5, flax's; jbn.BatchNorm's is 1e-3).
      dtype: output dtype; None gives, as flax, `x`'s dtype promoted with `param_dtype` when the
        layer has a scale or bias. Statistics are float32.
      param_dtype: dtype of `scale` and `bias`.
      use_bias, use_scale: create `bias` (`center`) / `scale` (`scale`).
      bias_init, scale_init: their initializers (`param_initializers`; ignored when the
        parameter is disabled, as in flax). Random initializers draw their keys in a different
        order than flax's, so a random init differs from flax's; loaded values do not.
      axis_name, axis_index_groups: cross-device statistics under pmap/shard_map (merged
        exactly by counts). As in flax, `init` does not reduce across devices.
      use_fast_variance, force_float32_reductions: accepted and ignored. jbn's variance is
        always one pass, accurate when the mean is large against the spread, and accumulated
        in float32 or wider (the numerics contract), so there is no faster, less accurate
        variant to choose and no reduction dtype to force.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    def __post_init__(self) -> None:
        # Checked at construction by jbn's one owner of the layer's options; its messages use
        # jbn's names, so say which flax argument each one is.
        try:
            layer.layer_options(**self._jbn_arguments(self.dtype, self.axis_name))
        except (TypeError, ValueError) as error:
            raise type(error)(f"{error} (jbn.linen.BatchNorm: {_JBN_NAMES_OF_FLAX})") from None
        super().__post_init__()

    def _jbn_arguments(self, dtype: Any, axis_name: Any) -> dict[str, Any]:
        """`jbn.BatchNorm`'s arguments for these flax ones (the others keep their defaults)."""
        initializers = {}
        if self.use_scale:
            initializers["gamma"] = self.scale_init
        if self.use_bias:
            initializers["beta"] = self.bias_init
        arguments = {name: getattr(self, flax) for name, flax in FLAX_ARGUMENTS.items()}
        return arguments | dict(
            param_initializers=initializers,
            axis_name=axis_name,
            axis_index_groups=self.axis_index_groups if axis_name is not None else None,
            dtype=dtype,
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes `x`; with `use_running_average=False` also updates `batch_stats`.

        Args:
          x: floating input, features along `axis`.
          use_running_average: as the attribute (give one of the two).
          mask: optional boolean array broadcastable to `x` (or `(B,)`, per example): only True
            elements count in the statistics (training only). Masked elements are padding:
            unlike flax, jbn keeps what they hold out of every gradient but their own (so
            `scale`/`bias` gradients agree with flax's when the loss ignores masked outputs).

        Returns:
          An array of `x`'s shape, dtype as described for `dtype`.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = jnp.asarray(x)
        dtype = self.dtype
        if dtype is None and (self.use_scale or self.use_bias):
            dtype = jnp.result_type(x.dtype, self.param_dtype)
        # flax's init does not reduce over axis_name (it may run outside pmap/shard_map).
        axis_name = None if self.is_initializing() else self.axis_name
        core = _FlaxNamed(**self._jbn_arguments(dtype, axis_name))
        nn.share_scope(self, core)  # the variables live in this module's scope, not a child's
        return core(x, is_training=not use_running_average, mask=mask)


def _rename_layers(variables: Mapping[str, Any], to_flax: bool) -> dict[str, Any]:
    """Renames the variables of every batch-norm layer found in `variables["batch_stats"]`.

    A layer is a `batch_stats` dict holding the (source-named) mean and variance; its `params`
    at the same path are renamed too. Other collections and layers are copied unchanged.
    """
    names = dict(FLAX_NAMES) if to_flax else {flax: jbn for jbn, flax in FLAX_NAMES.items()}
    param_names = [old for old in names if (old if to_flax else names[old]) in _PARAM_NAMES]
    stat_names = [old for old in names if old not in param_names]
    if "batch_stats" not in variables:
        raise ValueError(
            f"variables hold {sorted(variables)}, no 'batch_stats': pass the model's whole "
            "variables (params and batch_stats)."
        )
    result = {collection: _copy(tree) for collection, tree in variables.items()}

    def where(path: tuple[str, ...]) -> str:
        return "/".join(path) or "the top level"

    def visit(stats: dict, path: tuple[str, ...]) -> None:
        if all(name in stats and not isinstance(stats[name], Mapping) for name in stat_names):
            extra = sorted(set(stats) - set(stat_names))
            if extra:
                raise ValueError(
                    f"batch_stats at {where(path)} hold {extra}, which have no equivalent under "
                    f"the other names (only {sorted(names)} convert): jbn.BatchNorm's renorm, "
                    "zero-debias and cumulative (decay=None) statistics have none in flax."
                )
            stats.update({names[name]: stats.pop(name) for name in stat_names})
            params = result.get("params", {})
            for key in path:
                params = params.get(key, {})
            unknown = sorted(set(params) - set(param_names))
            if unknown:
                raise ValueError(
                    f"params at {where(path)} hold {unknown}; a batch norm's params here are "
                    f"{sorted(param_names)}."
                )
            params.update({names[name]: params.pop(name) for name in list(params)})
            return
        for key, value in stats.items():
            if isinstance(value, dict):
                visit(value, (*path, key))

    visit(result["batch_stats"], ())
    return result


def _copy(tree: Any) -> Any:
    """Plain nested dicts (FrozenDicts thawed) sharing the arrays."""
    if isinstance(tree, Mapping):
        return {key: _copy(value) for key, value in tree.items()}
    return tree


def from_flax_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """A model's variables with every batch norm's flax names turned into jbn's.

    `scale -> gamma`, `bias -> beta` (params), `mean -> moving_mean`, `var -> moving_variance`
    (batch_stats), for every layer whose `batch_stats` hold `mean` and `var` (e.g. a
    `flax.linen.BatchNorm` or `jbn.linen.BatchNorm`); everything else is copied unchanged, so
    the result loads into the same model built with `jbn.BatchNorm` (options as the flax layer:
    `decay=momentum`, `epsilon`, `scale=use_scale`, `axis`). Returns new plain dicts sharing
    the arrays.

    Raises ValueError without a `batch_stats` collection or when a layer holds other names.
    """
    return _rename_layers(variables, to_flax=False)


def to_flax_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `from_flax_variables`: jbn's names turned into flax's, for every layer
    whose `batch_stats` hold `moving_mean` and `moving_variance`.

    Raises ValueError for layers with statistics flax has no name for (renorm, zero-debias,
    `decay=None`), whose meaning a flax layer could not reproduce.
    """
    return _rename_layers(variables, to_flax=True)

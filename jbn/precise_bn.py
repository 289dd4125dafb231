"""Precise BN: batch-norm statistics recomputed for fixed, final weights.

Moving averages lag the weights they describe: with `decay = d` the statistics are an average
over roughly the last `1 / (1 - d)` steps, taken while the weights were still changing, so
after training they describe an older network (badly so with `d = 0.999` after a few hundred
steps). Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"; fvcore/detectron2's
`PreciseBN`, mmcls's `PreciseBNHook`) fixes the weights after training, runs the model in
training mode on a number of training batches (fvcore: 200) and replaces the moving statistics
with the statistics of those batches.

The statistic. Let batch `b` give a layer `n_b` counted elements per feature (a mask or batch
weights count exactly; ghost batches count one by one), mean `mu_b` and biased variance
`v_b`, and let `N = sum_b n_b`. Then

.. math::

    \\mu = \\frac{1}{N} \\sum_b n_b \\mu_b, \\qquad
    \\sigma^2_{\\text{batch}} = \\frac{1}{N} \\sum_b n_b v_b, \\qquad
    \\sigma^2_{\\text{population}} = \\sigma^2_{\\text{batch}}
        + \\frac{1}{N} \\sum_b n_b (\\mu_b - \\mu)^2 .

`mu` is the mean of all counted elements together. `sigma2_population` is the exact biased
variance of all counted elements of all batches together (Chan et al.'s merge), and
`sigma2_batch` is the count-weighted mean of the per-batch variances: what BN divided by in
training, on average. They differ by the between-batch variance of the batch means, about
`sigma^2 / n_b` per feature (small for convolutions, with `n_b = batch * H * W`, larger for
small batches of dense features). The default is `variance='batch'`, fvcore's choice, because
inference should reproduce what the following layers saw in training: each training example
was divided by its batch's `sqrt(v_b + epsilon)`, whose typical square is `sigma2_batch`, not
`sigma2_population`; and it is the value the moving average itself estimates (an exponential
average of `v_b`), without the lag. `variance='population'` gives the union's variance.
Both are exact for unequal batch sizes and masks (fvcore weights its per-batch averages by
the batch size too, and notes that equal weighting would be wrong for unequal batches).

What is written, per layer (`jbn.BatchNorm`, `flax.linen.BatchNorm`):

* `moving_mean`/`moving_variance` (flax: `mean`/`var`) become `mu` and the chosen variance;
  a layer with `unbiased_moving_variance=True` averages the Bessel-corrected `v_b n_b /
  (n_b - 1)` instead, as its running update does (and as fvcore does with PyTorch's
  `running_var`); it refuses `variance='population'`.
* zero-debias (`zero_debias_moving_mean=True`): `moving_mean = mu` and the biased accumulator
  `moving_mean_biased = mu (1 - decay**num_updates)`, so that the layer's invariant
  `moving_mean = moving_mean_biased / (1 - decay**num_updates)` still holds; `num_updates` is
  kept.
* renorm: inference divides by `moving_stddev`, so `moving_stddev = sqrt(variance + epsilon)`
  and `moving_variance = max(moving_stddev**2 - epsilon, 0)` as the layer derives it. The
  renorm correction statistics (`renorm_mean`, `renorm_stddev`) steer training only and are
  kept.
* `decay=None` (cumulative average): the statistics are replaced, `num_updates` kept.
* A feature with no counted element in any batch keeps its statistics.

Layers inside Flax's lifted transforms (`nn.scan`, `nn.remat`, `nn.vmap`) are not supported
(their calls are traced separately; JAX raises an UnexpectedTracerError), nor are NNX modules
(`jbn.nnx.BatchNorm`): feed `update` with their batch statistics directly.

Pieces, all pure and usable under `jit`, `pmap` and `shard_map`: the accumulator of one layer
(`init`, `update`, `finalize` over `Accumulator`), `capture_batch_statistics` (one training-mode
call of a linen model, every batch norm's `BatchStatistics`), `recalibrate_variables` (the
model's `batch_stats` with the new statistics) and the driver `recalibrate_statistics`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jbn import _checks, layer
from jbn.module import BatchNorm
from jbn.running import STATS_DTYPE, BatchStatistics, bessel_correction
from jbn.stats import statistics

__all__ = [
    "VARIANCES",
    "Accumulator",
    "LayerInfo",
    "capture_batch_statistics",
    "finalize",
    "init",
    "recalibrate_statistics",
    "recalibrate_variables",
    "update",
]

#: The values of `recalibrate_statistics`'s `variance` argument.
VARIANCES = ("batch", "population")
BATCH_NORM_TYPES = (BatchNorm, nn.BatchNorm)


class Accumulator(NamedTuple):
    """The statistics of the batches seen so far, per feature (float32).

    Attributes:
      count: `N`, the counted elements of all batches.
      mean: `mu`, their mean.
      batch_variance_sum: `sum_b n_b v_b`, the count-weighted sum of the batch variances.
      between_m2: `sum_b n_b (mu_b - mu)^2`, the between-batch sum of squares (Chan's merge).
    """

    count: jax.Array
    mean: jax.Array
    batch_variance_sum: jax.Array
    between_m2: jax.Array


def init(feature_shape: tuple[int, ...]) -> Accumulator:
    """An empty accumulator for features of `feature_shape`."""
    zeros = jnp.zeros(feature_shape, STATS_DTYPE)
    return Accumulator(zeros, zeros, zeros, zeros)


def _merge_one(state: Accumulator, batch: BatchStatistics) -> Accumulator:
    count = jnp.broadcast_to(batch.count, batch.mean.shape).astype(STATS_DTYPE)
    mean = batch.mean.astype(STATS_DTYPE)
    total = state.count + count
    safe_total = jnp.where(total > 0, total, 1)
    delta = mean - state.mean
    # Chan et al.: exact for any counts; a batch with count 0 changes nothing.
    return Accumulator(
        count=total,
        mean=state.mean + delta * count / safe_total,
        batch_variance_sum=state.batch_variance_sum + count * batch.variance.astype(STATS_DTYPE),
        between_m2=state.between_m2 + jnp.square(delta) * state.count * count / safe_total,
    )


def update(state: Accumulator, batch: BatchStatistics) -> Accumulator:
    """Adds one batch's statistics: feature-shaped, or `(G, *features)` for G ghost batches
    (each ghost batch counts as a batch of its own).

    `batch.count` is the counted elements behind each statistic (feature-shaped or scalar,
    over every device when the statistics are global); `batch.variance` the biased variance.
    """
    if jnp.ndim(batch.mean) == jnp.ndim(state.mean):
        return _merge_one(state, batch)
    for ghost in range(batch.mean.shape[0]):
        count = batch.count if jnp.ndim(batch.count) < jnp.ndim(batch.mean) else batch.count[ghost]
        state = _merge_one(state, BatchStatistics(count, batch.mean[ghost], batch.variance[ghost]))
    return state


def finalize(state: Accumulator, variance: str = "batch") -> tuple[jax.Array, jax.Array]:
    """`(mean, variance)` of everything accumulated (module docstring: `mu` and
    `sigma2_batch` or `sigma2_population`); features with count 0 get 0 and 0."""
    _check_variance(variance)
    safe_count = jnp.where(state.count > 0, state.count, 1)
    within = state.batch_variance_sum / safe_count
    if variance == "population":
        within = within + state.between_m2 / safe_count
    return state.mean, jnp.maximum(within, 0)


def _check_variance(variance: str) -> None:
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}.")


# ----------------------------------------------------------------------------- capture


class LayerInfo(NamedTuple):
    """What recalibration needs to know about one batch norm (static)."""

    kind: str  # 'jbn' or 'flax'
    epsilon: float
    decay: float | None
    renorm: bool
    zero_debias: bool
    unbiased: bool


def _bind(function: Callable[..., Any], args, kwargs) -> dict[str, Any]:
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _jbn_call(x, is_training=None, *, batch_weights=None, mask=None):
    """The signature of `jbn.BatchNorm.__call__`."""


def _flax_call(x, use_running_average=None, *, mask=None):
    """The signature of `flax.linen.BatchNorm.__call__`."""


def _jbn_statistics(module: BatchNorm, args, kwargs) -> tuple[BatchStatistics, LayerInfo]:
    """The batch statistics `module` normalizes with in training, as its own forward computes
    them (`jbn.layer`: masks, batch weights, ghost batches, `axis_name`)."""
    call = _bind(_jbn_call, args, kwargs)
    training = module.is_training if call["is_training"] is None else call["is_training"]
    if training is None or not _checks.as_bool(training, "is_training"):
        raise ValueError(
            f"recalibration runs the model in training mode, but the batch norm "
            f"{'/'.join(module.path) or '(root)'} was called with is_training=False; make "
            "apply_fn call it with is_training=True (and mutable=['batch_stats'])."
        )
    options = module._options()
    x, _ = layer.prepare_input(call["x"], module.dtype)
    axes = layer.feature_axes(x.ndim, module.data_format, module.axis)
    weights, mask = layer.prepare_weights(x, call["batch_weights"], call["mask"])
    # Renorm normalizes with the same batch moments (then corrects them): the plain forward
    # gives them without the correction statistics.
    _, batch = layer.train_forward(
        x,
        None,
        None,
        dataclasses.replace(options, renorm=False, renorm_clipping=None),
        axes,
        weights=weights,
        mask=mask,
    )
    info = LayerInfo(
        "jbn",
        float(module.epsilon),
        module.decay,
        module.renorm,
        module.zero_debias_moving_mean,
        module.unbiased_moving_variance,
    )
    return batch, info


def _flax_statistics(module: nn.BatchNorm, args, kwargs) -> tuple[BatchStatistics, LayerInfo]:
    """The batch statistics of a `flax.linen.BatchNorm` call, computed by jbn: exact across
    devices (flax itself averages per-device means) and with an exact variance."""
    call = _bind(_flax_call, args, kwargs)
    if nn.merge_param(
        "use_running_average", module.use_running_average, call["use_running_average"]
    ):
        raise ValueError(
            f"recalibration runs the model in training mode, but the batch norm "
            f"{'/'.join(module.path) or '(root)'} was called with use_running_average=True; make "
            "apply_fn call it in training mode (and mutable=['batch_stats'])."
        )
    x = jnp.asarray(call["x"])
    axes = layer.feature_axes(x.ndim, None, module.axis)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in axes)
    mask = call["mask"]
    if mask is not None:
        _checks.check_mask(mask, x.shape)
    axis_name = _checks.canonical_axis_name(module.axis_name)
    groups = _checks.canonical_groups(module.axis_name, module.axis_index_groups)
    stats = statistics(x, reduce_axes, mask, axis_name, groups)
    feature_shape = tuple(x.shape[a] for a in axes)
    as_features = lambda v: jnp.broadcast_to(v, stats.mean.shape).reshape(feature_shape)
    batch = BatchStatistics(*(as_features(v) for v in stats))
    info = LayerInfo("flax", float(module.epsilon), module.momentum, False, False, False)
    return batch, info


def capture_batch_statistics(
    apply_fn: Callable[[Any, Any], Any], variables: Any, batch: Any
) -> tuple[dict[tuple[str, ...], list[BatchStatistics]], dict[tuple[str, ...], LayerInfo]]:
    """Every batch norm's batch statistics in one training-mode call `apply_fn(variables, batch)`.

    Pure and traceable (use it inside `jit`, `pmap`, `shard_map`): the statistics are collected
    while `apply_fn` runs, through `flax.linen.intercept_methods`, and returned; what `apply_fn`
    returns is discarded.

    Args:
      apply_fn: runs the linen model in training mode, e.g. `lambda v, b: model.apply(v,
        b['image'], is_training=True, mutable=['batch_stats'])`; masks and batch weights passed
        to the batch norms count as in training.
      variables: the model's variables (`params`, `batch_stats`, ...).
      batch: whatever `apply_fn` takes.

    Returns:
      `(statistics, info)`: per batch-norm module path (`module.path`, the keys of its
      `batch_stats`), the `BatchStatistics` of each of its calls (biased variance, float32,
      feature-shaped or with a leading ghost-batch axis), and its static `LayerInfo`.

    Raises:
      ValueError: a batch norm called in inference mode.
    """
    captured: dict[tuple[str, ...], list[BatchStatistics]] = {}
    infos: dict[tuple[str, ...], LayerInfo] = {}

    def capture(next_fun: Callable[..., Any], args, kwargs, context) -> Any:
        module = context.module
        if context.method_name == "__call__" and isinstance(module, BATCH_NORM_TYPES):
            find = _jbn_statistics if isinstance(module, BatchNorm) else _flax_statistics
            statistics_, info = find(module, args, kwargs)
            path = tuple(module.path)
            captured.setdefault(path, []).append(statistics_)
            infos[path] = info
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        apply_fn(variables, batch)
    return captured, infos


# ----------------------------------------------------------------------------- writing


def recalibrate_variables(
    batch_stats: Mapping[str, Any],
    accumulators: Mapping[tuple[str, ...], Accumulator],
    infos: Mapping[tuple[str, ...], LayerInfo],
    variance: str = "batch",
) -> dict[str, Any]:
    """`batch_stats` with each accumulated layer's statistics replaced (module docstring).

    Args:
      batch_stats: the model's `batch_stats` collection (nested dicts by module path).
      accumulators, infos: per module path, from `update` and `capture_batch_statistics`.
      variance: 'batch' (default, fvcore's) or 'population' (module docstring).

    Returns:
      A new nested dict of the same structure, dtypes and shapes.

    Raises:
      ValueError: `variance='population'` for a layer with `unbiased_moving_variance=True`.
    """
    _check_variance(variance)
    flat = traverse_util.flatten_dict(dict(batch_stats))
    for path, state in accumulators.items():
        info = infos[path]
        if info.unbiased and variance == "population":
            raise ValueError(
                f"variance='population' is not supported for {'/'.join(path)}, a layer with "
                "unbiased_moving_variance=True; use variance='batch' (the mean of its "
                "Bessel-corrected batch variances)."
            )
        mean, var = finalize(state, variance)
        has_data = state.count > 0
        names = ("mean", "var") if info.kind == "flax" else ("moving_mean", "moving_variance")
        new = {names[0]: mean, names[1]: var}
        if info.renorm:
            stddev = jnp.sqrt(var + info.epsilon)
            new["moving_stddev"] = stddev
            new["moving_variance"] = jnp.maximum(jnp.square(stddev) - info.epsilon, 0)
        if info.zero_debias:
            num_updates = flat[(*path, "num_updates")]
            new["moving_mean_biased"] = mean * (1 - jnp.power(info.decay, num_updates))
        for name, value in new.items():
            key = (*path, name)
            if key not in flat:
                raise ValueError(
                    f"batch_stats has no {'/'.join(key)}: pass the variables apply_fn ran with."
                )
            old = flat[key]
            flat[key] = jnp.where(has_data, value, old).astype(jnp.asarray(old).dtype)
    return traverse_util.unflatten_dict(flat)


def _layer_batches(
    captured: Mapping[tuple[str, ...], list[BatchStatistics]],
    infos: Mapping[tuple[str, ...], LayerInfo],
) -> dict[tuple[str, ...], list[BatchStatistics]]:
    """The captured statistics, Bessel-corrected for `unbiased_moving_variance` layers."""
    corrected = {}
    for path, batches in captured.items():
        if infos[path].unbiased:
            batches = [b._replace(variance=bessel_correction(b)) for b in batches]
        corrected[path] = batches
    return corrected


def recalibrate_statistics(
    apply_fn: Callable[[Any, Any], Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    variance: str = "batch",
    jit: bool = True,
) -> dict[str, Any]:
    """Precise BN: the `batch_stats` of `variables` recomputed over `batches` (module docstring).

    Example (a doctest, run by tests/test_docstrings.py):

    >>> import jax, jax.numpy as jnp, numpy as np, jbn
    >>> model = jbn.BatchNorm()
    >>> train_batches = [jax.random.normal(jax.random.key(i), (32, 4)) * 2 + 1 for i in range(3)]
    >>> variables = model.init(jax.random.key(0), train_batches[0], is_training=False)
    >>> apply_fn = lambda v, x: model.apply(v, x, is_training=True, mutable=['batch_stats'])
    >>> batch_stats = jbn.recalibrate_statistics(apply_fn, variables, train_batches,
    ...                                          num_batches=200)
    >>> variables = {**variables, 'batch_stats': batch_stats}
    >>> everything = np.concatenate(train_batches)
    >>> bool(np.allclose(batch_stats["moving_mean"], everything.mean(0), atol=1e-5))
    True

    Args:
      apply_fn: `apply_fn(variables, batch)` runs the model in training mode (see
        `capture_batch_statistics`); the weights in `variables` stay fixed.
      variables: the model's variables, with `batch_stats`.
      batches: an iterable of whatever `apply_fn` takes. Batches may differ in size (a new
        size compiles once more) and be sharded over devices: under `jit` the statistics are
        global.
      num_batches: use at most this many batches (None: all of `batches`; fvcore uses 200).
      variance: 'batch' (the default, fvcore's: the count-weighted mean of the batch
        variances) or 'population' (the variance of all batches together).
      jit: compile each step with `jax.jit` (False: run each step op by op). Under `pmap` or
        `shard_map`, build your own step from `capture_batch_statistics` and `update`.

    Returns:
      The new `batch_stats` collection: same structure, shapes and dtypes.

    Raises:
      ValueError: `variance` unknown, `num_batches` not positive, no batch, no batch norm in the
        model, or a batch norm called in inference mode.
    """
    _check_variance(variance)
    if num_batches is not None:
        num_batches = _checks.positive_int(num_batches, "num_batches")
    if "batch_stats" not in variables:
        raise ValueError("variables has no 'batch_stats' collection to recalibrate.")
    flat_stats = traverse_util.flatten_dict(dict(variables["batch_stats"]))

    def feature_shape(path: tuple[str, ...], info: LayerInfo) -> tuple[int, ...]:
        name = "mean" if info.kind == "flax" else "moving_mean"
        return jnp.shape(flat_stats[(*path, name)])

    def step(accumulators, variables, batch):
        captured, infos = capture_batch_statistics(apply_fn, variables, batch)
        new = dict(accumulators)
        for path, layer_batches in _layer_batches(captured, infos).items():
            state = new.get(path, init(feature_shape(path, infos[path])))
            for batch_statistics in layer_batches:
                state = update(state, batch_statistics)
            new[path] = state
        return new

    step_fn = jax.jit(step) if jit else step
    accumulators: dict[tuple[str, ...], Accumulator] = {}
    infos: dict[tuple[str, ...], LayerInfo] = {}
    used = 0
    for batch in batches:
        if num_batches is not None and used >= num_batches:
            break
        if not infos:
            # The first batch finds the layers (shapes only), so that every step sees the same
            # accumulator structure and jit compiles once per batch shape.
            def discover(variables, batch):
                infos.update(capture_batch_statistics(apply_fn, variables, batch)[1])

            jax.eval_shape(discover, variables, batch)
            if not infos:
                raise ValueError(
                    "apply_fn called no jbn.BatchNorm or flax.linen.BatchNorm: nothing to "
                    "recalibrate."
                )
            accumulators = {path: init(feature_shape(path, info)) for path, info in infos.items()}
        accumulators = step_fn(accumulators, variables, batch)
        used += 1
    if used == 0:
        raise ValueError("batches is empty: recalibration needs at least one batch.")
    return recalibrate_variables(variables["batch_stats"], accumulators, infos, variance)

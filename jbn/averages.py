"""Moving averages of statistics, in the optax style: a NamedTuple state and pure functions.

Three modes, chosen by `moving_average(decay, zero_debias=...)`:

* exponential (TF, flax, the document): `average = decay * average + (1 - decay) * value`,
  starting from a given initial value (0 for means, 1 for variances);
* zero-debiased (TF's `zero_debias_moving_mean`, Adam): a biased accumulator starting at 0,

      biased = decay * biased + (1 - decay) * value,    average = biased / (1 - decay**count),

  so early averages are not dragged toward the initial value; before the first update the
  average is the initial value;
* cumulative (`decay=None`, PyTorch's `momentum=None`): the plain mean of every value so far,
  `average = average + (value - average) / count`.

`decay` is the weight on the OLD value (TF's and flax's convention). PyTorch's `momentum`
is `1 - decay`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from jbn import _checks
from jbn.stats import accumulation_dtype

__all__ = ["MovingAverage", "MovingAverageState", "moving_average", "unchecked_moving_average"]

PyTree = Any


class MovingAverageState(NamedTuple):
    """State of a moving average.

    Attributes:
      average: the current average (a pytree of arrays), what inference reads.
      biased: the zero-debias accumulator (same structure), or None when not debiasing.
      count: int32 scalar, the number of updates so far.
    """

    average: PyTree
    biased: PyTree
    count: jax.Array


class InitFn(Protocol):
    def __call__(self, initial_value: PyTree) -> MovingAverageState: ...


class UpdateFn(Protocol):
    def __call__(self, state: MovingAverageState, value: PyTree) -> MovingAverageState: ...


class MovingAverage(NamedTuple):
    """A pair of pure functions, like `optax.GradientTransformation`."""

    init: InitFn
    update: UpdateFn


def moving_average(decay: float | None, *, zero_debias: bool = False) -> MovingAverage:
    """Builds an exponential, zero-debiased or cumulative moving average.

    Args:
      decay: weight on the old average, in [0, 1); None for the cumulative average.
      zero_debias: debias the exponential average as TF/Adam do (ignored meaning for
        `decay=None`, which is rejected with zero_debias=True).

    Returns:
      `MovingAverage(init, update)`: `init(initial_value)` and `update(state, value)`, both
      pure; arrays keep their dtypes (keep statistics in float32).
    """
    # None is the cumulative average; a traced decay cannot be checked.
    if decay is not None and not isinstance(decay, jax.core.Tracer):
        _checks.check_decay(decay, "decay")
    _checks.check_zero_debias(decay, zero_debias, "zero_debias")
    return unchecked_moving_average(decay, zero_debias)


def unchecked_moving_average(decay: float | None, zero_debias: bool) -> MovingAverage:
    """`moving_average` for arguments its caller has checked (`jbn.running`)."""

    def init(initial_value: PyTree) -> MovingAverageState:
        initial_value = jax.tree.map(jnp.asarray, initial_value)
        biased = jax.tree.map(jnp.zeros_like, initial_value) if zero_debias else None
        return MovingAverageState(initial_value, biased, jnp.zeros((), jnp.int32))

    def update(state: MovingAverageState, value: PyTree) -> MovingAverageState:
        count = state.count + 1
        if decay is None:
            average = jax.tree.map(
                lambda old, new: old + (new - old) / count.astype(old.dtype), state.average, value
            )
            return MovingAverageState(average, None, count)

        def ema(old, new):
            return (decay * old + (1 - decay) * new).astype(old.dtype)

        if not zero_debias:
            return MovingAverageState(jax.tree.map(ema, state.average, value), None, count)
        biased = jax.tree.map(ema, state.biased, value)

        def debias(b):
            # In the average's dtype (float32 or wider): float64 statistics under
            # jax_enable_x64 would otherwise be debiased with float32 round-off.
            correction = 1 - jnp.asarray(decay, accumulation_dtype(b.dtype)) ** count
            return (b / correction).astype(b.dtype)

        average = jax.tree.map(debias, biased)
        return MovingAverageState(average, biased, count)

    return MovingAverage(init, update)

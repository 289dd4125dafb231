"""jbn.moving_average against plain Python loops in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn

VALUES = np.random.default_rng(0).standard_normal((7, 3)) * 2 + 5


def _run(average, initial):
    state = average.init(jnp.asarray(initial, jnp.float32))
    update = jax.jit(average.update)
    history = []
    for value in VALUES:
        state = update(state, jnp.asarray(value, jnp.float32))
        history.append(np.asarray(state.average))
    return state, np.stack(history)


def test_exponential_average():
    decay = 0.9
    state, history = _run(jbn.moving_average(decay), np.zeros(3))
    want, expected = np.zeros(3), []
    for value in VALUES:
        want = decay * want + (1 - decay) * value
        expected.append(want)
    np.testing.assert_allclose(history, expected, rtol=1e-5)
    assert int(state.count) == len(VALUES) and state.biased is None


def test_zero_debiased_average_matches_tf_adam_formula():
    decay = 0.99
    state = jbn.moving_average(decay, zero_debias=True).init(jnp.full(3, 7.0))
    # Before any update the average is the initial value.
    np.testing.assert_allclose(state.average, 7.0)
    state, history = _run(jbn.moving_average(decay, zero_debias=True), np.zeros(3))
    biased, expected = np.zeros(3), []
    for step, value in enumerate(VALUES, start=1):
        biased = decay * biased + (1 - decay) * value
        expected.append(biased / (1 - decay**step))
    np.testing.assert_allclose(history, expected, rtol=1e-4)
    # The first debiased value is exactly the first observation, not 1% of it.
    np.testing.assert_allclose(history[0], VALUES[0], rtol=1e-5)


def test_cumulative_average_is_the_running_mean():
    _, history = _run(jbn.moving_average(None), np.zeros(3))
    expected = np.cumsum(VALUES, axis=0) / np.arange(1, len(VALUES) + 1)[:, None]
    np.testing.assert_allclose(history, expected, rtol=1e-5)


def test_pytrees_and_dtypes_are_kept():
    average = jbn.moving_average(0.5)
    state = average.init({"mean": jnp.zeros(2), "var": jnp.ones(2)})
    state = average.update(state, {"mean": jnp.ones(2), "var": jnp.full(2, 3.0)})
    np.testing.assert_allclose(state.average["mean"], 0.5)
    np.testing.assert_allclose(state.average["var"], 2.0)
    assert state.average["var"].dtype == jnp.float32


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match="decay"):
        jbn.moving_average(decay)


def test_cumulative_with_zero_debias_is_rejected():
    with pytest.raises(ValueError, match="zero_debias"):
        jbn.moving_average(None, zero_debias=True)

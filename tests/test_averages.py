"""jbn.moving_average against the float64 running averages of `reference.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

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
    expected = reference.moving_averages(VALUES, decay, initial=np.zeros(3))
    np.testing.assert_allclose(history, expected, rtol=1e-5)
    assert int(state.count) == len(VALUES) and state.biased is None


def test_zero_debiased_average_matches_tf_adam_formula():
    decay = 0.99
    state = jbn.moving_average(decay, zero_debias=True).init(jnp.full(3, 7.0))
    # Before any update the average is the initial value.
    np.testing.assert_allclose(state.average, 7.0)
    state, history = _run(jbn.moving_average(decay, zero_debias=True), np.zeros(3))
    expected = reference.moving_averages(VALUES, decay, zero_debias=True)
    np.testing.assert_allclose(history, expected, rtol=1e-4)
    # The first debiased value is exactly the first observation, not 1% of it.
    np.testing.assert_allclose(history[0], VALUES[0], rtol=1e-5)


def test_cumulative_average_is_the_running_mean():
    _, history = _run(jbn.moving_average(None), np.zeros(3))
    expected = reference.moving_averages(VALUES, None)
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

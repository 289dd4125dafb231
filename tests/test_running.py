"""jbn.running against the update rules written out in float64 numpy (`reference.py`, no Flax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

from jbn.running import BatchStatistics, running_statistics, statistics_dtype

EPS = 1e-3


def random_batches(steps, ghosts=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (3,) if ghosts is None else (ghosts, 3)
    return [
        BatchStatistics(
            count=rng.integers(2, 9, shape).astype(np.float32),
            mean=rng.normal(2.0, 1.0, shape).astype(np.float32),
            variance=rng.uniform(0.5, 4.0, shape).astype(np.float32),
        )
        for _ in range(steps)
    ]


def run(rule, batches, mean0, variance0):
    state = rule.init(mean0, variance0)
    for batch in batches:
        state = rule.update(state, batch)
    return state


MEAN0, VARIANCE0 = np.array([0.5, 0.0, -1.0]), np.array([4.0, 1.0, 0.25])


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("decay", [0.9, None])
def test_exponential_and_cumulative(decay, unbiased):
    batches = random_batches(4)
    state = run(
        running_statistics(decay, epsilon=EPS, unbiased_variance=unbiased),
        batches,
        MEAN0,
        VARIANCE0,
    )
    variances = [
        reference.unbiased_variance(b.variance, b.count) if unbiased else b.variance
        for b in batches
    ]
    mean = reference.moving_averages([b.mean for b in batches], decay, MEAN0)[-1]
    variance = reference.moving_averages(variances, decay, VARIANCE0)[-1]
    np.testing.assert_allclose(state.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(state.variance, variance, rtol=1e-5)
    if decay is None:
        assert int(state.num_updates) == 4


def test_zero_debiased_mean():
    decay, batches = 0.8, random_batches(3)
    state = run(
        running_statistics(decay, epsilon=EPS, zero_debias_mean=True), batches, MEAN0, VARIANCE0
    )
    biased = reference.moving_averages([b.mean for b in batches], decay, initial=0.0)[-1]
    np.testing.assert_allclose(state.mean_biased, biased, rtol=1e-5)
    np.testing.assert_allclose(state.mean, biased / (1 - decay**3), rtol=1e-5)
    assert int(state.num_updates) == 3


def test_renorm_as_tf1():
    decay, renorm_decay, batches = 0.9, 0.6, random_batches(4)
    rule = running_statistics(decay, epsilon=EPS, renorm=True, renorm_decay=renorm_decay)
    state = rule.init(MEAN0, VARIANCE0)
    np.testing.assert_allclose(state.stddev, np.sqrt(VARIANCE0))  # Keras: sqrt of the initializer
    np.testing.assert_allclose(state.variance, VARIANCE0 - EPS, rtol=1e-6)
    for b in batches:
        state = rule.update(state, b)
    want = reference.RenormState.init(MEAN0, VARIANCE0)
    for b in batches:
        want = want.update(b.mean, b.variance, decay=decay, renorm_decay=renorm_decay, epsilon=EPS)
    np.testing.assert_allclose(state.mean, want.moving_mean, rtol=1e-5)
    np.testing.assert_allclose(state.stddev, want.moving_stddev, rtol=1e-5)
    np.testing.assert_allclose(state.variance, want.moving_variance(EPS), rtol=1e-5)
    np.testing.assert_allclose(state.renorm_mean, want.renorm_mean, rtol=1e-5)
    np.testing.assert_allclose(state.renorm_stddev, want.renorm_stddev, rtol=1e-5)


def test_ghost_statistics_are_pooled_by_count_and_empty_features_keep_their_values():
    decay = 0.7
    (batch,) = random_batches(1, ghosts=4)
    count = batch.count.copy()
    count[:, 2] = 0  # feature 2 counted nothing in any ghost batch
    batch = batch._replace(count=count)
    rule = running_statistics(decay, epsilon=EPS, unbiased_variance=True)
    state = rule.update(rule.init(MEAN0, VARIANCE0), batch)
    n = count[:, :2]
    pooled_mean = reference.pooled(n, batch.mean[:, :2])
    pooled_variance = reference.pooled(n, reference.unbiased_variance(batch.variance[:, :2], n))
    np.testing.assert_allclose(
        state.mean[:2], reference.moving_average(MEAN0[:2], pooled_mean, decay), rtol=1e-5
    )
    np.testing.assert_allclose(
        state.variance[:2],
        reference.moving_average(VARIANCE0[:2], pooled_variance, decay),
        rtol=1e-5,
    )
    assert state.mean[2] == MEAN0[2] and state.variance[2] == VARIANCE0[2]


@pytest.mark.parametrize("renorm", [False, True])
def test_the_state_keeps_its_dtype(renorm):
    # A float64 state under x64 (what a layer with param_dtype=float64 gets) follows the
    # formulas in float64, the zero-debias correction included; without x64 the layers'
    # statistics_dtype(float64) is float32.
    assert statistics_dtype(jnp.float64) == jnp.float32
    assert statistics_dtype(jnp.bfloat16) == jnp.float32
    with jax.enable_x64():
        assert statistics_dtype(jnp.float64) == jnp.float64
        rule = running_statistics(
            0.9, epsilon=EPS, zero_debias_mean=True, renorm=renorm, dtype=jnp.float64
        )
        batches = [BatchStatistics(*(v.astype(np.float64) for v in b)) for b in random_batches(3)]
        state = run(rule, batches, MEAN0, VARIANCE0)
        floats = [v for v in state._asdict().values() if v is not None and v.ndim == 1]
        assert len(floats) == (6 if renorm else 3)
        assert {v.dtype for v in floats} == {np.dtype(np.float64)}
        means = [batch.mean for batch in batches]
        want = reference.moving_averages(means, 0.9, zero_debias=True)[-1]
        np.testing.assert_allclose(state.mean, want, rtol=1e-12)
    with pytest.raises(TypeError, match="dtype"):
        running_statistics(0.9, epsilon=EPS, dtype=jnp.int32)


def test_bad_arguments():
    with pytest.raises(ValueError, match="zero_debias"):
        running_statistics(None, epsilon=EPS, zero_debias_mean=True)
    with pytest.raises(TypeError, match="decay"):
        running_statistics("0.9", epsilon=EPS)
    with pytest.raises(TypeError, match="epsilon"):
        running_statistics(0.9, epsilon=None)

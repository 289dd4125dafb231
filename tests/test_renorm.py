"""Batch renormalization against the paper's formulas (Ioffe 2017) in float64 numpy
(`reference.batch_renorm`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import jbn

EPS = 1e-3


def _data():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((32, 6)) * 3 + 2).astype(np.float32)
    running_mean = rng.standard_normal(6).astype(np.float32)
    running_stddev = rng.uniform(0.5, 5, 6).astype(np.float32)
    gamma = rng.uniform(0.5, 2, 6).astype(np.float32)
    beta = rng.standard_normal(6).astype(np.float32)
    return x, running_mean, running_stddev, gamma, beta


def _paper(x, mu, sigma, gamma, beta, rmax, dmax):
    """Training-mode renorm with r in [1/rmax, rmax], d in [-dmax, dmax]; r, d per feature."""
    y, r, d = reference.batch_renorm(
        x, 0, beta, gamma, mu, sigma, EPS, rmin=1 / rmax, rmax=rmax, dmax=dmax
    )
    return y, r[0], d[0]


def test_renorm_matches_paper_with_clipping_active():
    x, mu, sigma, gamma, beta = _data()
    rmax, dmax = 1.5, 0.5
    want_y, want_r, want_d = _paper(x, mu, sigma, gamma, beta, rmax, dmax)
    # The clipping really bites in this data, on both bounds of r and on d.
    assert np.any(want_r == rmax) and np.any(want_r == 1 / rmax) and np.any(np.abs(want_d) == dmax)
    y, mean, var = jbn.batch_renorm(
        x, gamma, beta, mu, sigma, epsilon=EPS, rmax=rmax, rmin=1 / rmax, dmax=dmax
    )
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-5)
    r, d = jbn.renorm_correction(
        mean, var, mu, sigma, epsilon=EPS, rmax=rmax, rmin=1 / rmax, dmax=dmax
    )
    np.testing.assert_allclose(r, want_r, rtol=1e-5)
    np.testing.assert_allclose(d, want_d, rtol=1e-5, atol=1e-6)


def test_unclipped_renorm_output_equals_running_statistics_normalization():
    x, mu, sigma, gamma, beta = _data()
    y, _, _ = jbn.batch_renorm(x, gamma, beta, mu, sigma, epsilon=EPS)
    np.testing.assert_allclose(y, (x - mu) / sigma * gamma + beta, rtol=1e-4, atol=1e-4)


def test_gradient_flows_through_batch_statistics_not_r_and_d():
    x, mu, sigma, gamma, beta = _data()
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    _, r, d = _paper(x, mu, sigma, gamma, beta, 1.5, 0.5)

    def with_constants(x):  # r and d frozen at their values: what stop_gradient means
        mu_b = jnp.mean(x, 0)
        sigma_b = jnp.sqrt(jnp.mean((x - mu_b) ** 2, 0) + EPS)
        return ((x - mu_b) / sigma_b * r + d) * gamma + beta

    def renorm(x):
        return jbn.batch_renorm(
            x, gamma, beta, mu, sigma, epsilon=EPS, rmax=1.5, rmin=1 / 1.5, dmax=0.5
        )[0]

    want = jax.vjp(with_constants, x)[1](dy)[0]
    got = jax.vjp(renorm, x)[1](dy)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rmax": -1.0}, "rmax must be a non-negative number"),
        ({"rmin": 2.0, "rmax": 1.0}, "rmin"),
        ({"dmax": -0.1}, "dmax"),
        ({"epsilon": 0.0}, "epsilon"),
    ],
)
def test_bad_clipping(kwargs, match):
    kwargs = {"epsilon": EPS, **kwargs}
    with pytest.raises(ValueError, match=match):
        jbn.renorm_correction(jnp.zeros(2), jnp.ones(2), jnp.zeros(2), jnp.ones(2), **kwargs)


def test_parameter_shapes_are_checked():
    x, mu, sigma, gamma, beta = _data()
    with pytest.raises(ValueError, match="scale must have the feature shape"):
        jbn.batch_renorm(x, gamma[:1], beta, mu, sigma, epsilon=EPS)
    with pytest.raises(ValueError, match="running_stddev must have the feature shape"):
        jbn.batch_renorm(x, gamma, beta, mu, sigma[:2], epsilon=EPS)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rmax": float("nan")}, ValueError),
        ({"dmax": "1"}, TypeError),
        ({"rmin": [1.0]}, TypeError),
    ],
)
def test_nan_or_non_numeric_clipping_is_refused(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        jbn.renorm_correction(
            jnp.zeros(2), jnp.ones(2), jnp.zeros(2), jnp.ones(2), epsilon=EPS, **kwargs
        )


def test_running_stddev_is_floored_at_sqrt_epsilon_as_tf():
    # A moving variance initialized at 0 gives stddev 0: TF divides by sqrt(epsilon) instead.
    r, d = jbn.renorm_correction(
        jnp.array([1.0]), jnp.array([3.0]), jnp.array([0.0]), jnp.array([0.0]), epsilon=EPS
    )
    np.testing.assert_allclose(r, np.sqrt(3.0 + EPS) / np.sqrt(EPS), rtol=1e-5)
    np.testing.assert_allclose(d, 1.0 / np.sqrt(EPS), rtol=1e-5)

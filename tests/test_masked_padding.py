"""Masked-out elements may hold anything (NaN, Inf): they reach no output but their own, no
statistic and no gradient, in every path (fused, composite, ghost, renorm, weighted; core and
module). Reference: the closed-form batch-norm gradient in float64 numpy over counted rows
(`reference.batch_norm_vjp`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jbn_testing import init_variables, padded_batch

import jbn

EPS = 1e-3
PADDING = [np.nan, np.inf, -np.inf]
CLIPPING = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.5}


def reference_vjp(x, counted, gamma, beta, dy, **kwargs):
    """The float64 outputs and gradients of batch norm over the counted rows."""
    return reference.batch_norm_vjp(x, counted, gamma, beta, dy, EPS, **kwargs)


def check(normalize, x, mask, gamma, beta, dy, want, atol=1e-5):
    """`normalize(x, gamma, beta) -> y`; compares counted outputs and all gradients."""

    def loss(x, gamma, beta):
        y = normalize(x, gamma, beta)
        return jnp.sum(jnp.where(mask[:, None], y, 0) * dy), y

    (dx, dgamma, dbeta), y = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
        x, gamma, beta
    )
    want_y, want_dx, want_dgamma, want_dbeta = want
    np.testing.assert_allclose(np.asarray(y)[mask], want_y[mask], rtol=1e-5, atol=atol)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(dgamma, want_dgamma, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(dbeta, want_dbeta, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("padding", PADDING)
def test_fused(padding):
    x, mask, _, gamma, beta, dy = padded_batch(padding)
    check(
        lambda x, g, b: jbn.fused_batch_norm(x, g, b, epsilon=EPS, mask=mask[:, None])[0],
        x,
        mask,
        gamma,
        beta,
        dy,
        reference_vjp(x, mask, gamma, beta, dy),
    )


@pytest.mark.parametrize("padding", PADDING)
def test_fused_ill_conditioned_branch(padding):
    x, mask, _, gamma, beta, dy = padded_batch(padding)
    x = np.where(mask[:, None], x + 1e3, x).astype(np.float32)  # |mean| >> std: two passes
    check(
        lambda x, g, b: jbn.fused_batch_norm(x, g, b, epsilon=EPS, mask=mask[:, None])[0],
        x,
        mask,
        gamma,
        beta,
        dy,
        reference_vjp(x, mask, gamma, beta, dy),
        atol=1e-4,  # float32 round-off of x near 1e3
    )


@pytest.mark.parametrize("padding", PADDING)
def test_composite(padding):
    x, mask, _, gamma, beta, dy = padded_batch(padding)

    def normalize(x, gamma, beta):
        mean, var = jbn.moments(x, 0, mask=mask[:, None])
        return jbn.batch_normalization(x, mean, var, beta, gamma, EPS, mask=mask[:, None])

    check(normalize, x, mask, gamma, beta, dy, reference_vjp(x, mask, gamma, beta, dy))


@pytest.mark.parametrize("padding", PADDING)
def test_weighted(padding):
    x, mask, weights, gamma, beta, dy = padded_batch(padding)

    def normalize(x, gamma, beta):
        mean, var = jbn.weighted_moments(x, 0, weights[:, None])
        return jbn.batch_normalization(x, mean, var, beta, gamma, EPS, mask=mask[:, None])

    check(normalize, x, mask, gamma, beta, dy, reference_vjp(x, weights, gamma, beta, dy))


@pytest.mark.parametrize("padding", PADDING)
def test_ghost(padding):
    x, mask, _, gamma, beta, dy = padded_batch(padding)
    check(
        lambda x, g, b: jbn.ghost_batch_norm(
            x, g, b, virtual_batch_size=4, epsilon=EPS, mask=mask[:, None]
        )[0],
        x,
        mask,
        gamma,
        beta,
        dy,
        reference_vjp(x, mask, gamma, beta, dy, virtual_batch_size=4),
    )


@pytest.mark.parametrize("padding", PADDING)
def test_renorm(padding):
    x, mask, _, gamma, beta, dy = padded_batch(padding)
    mu = np.array([0.5, -0.5, 1.0], np.float32)
    sigma = np.array([1.5, 2.0, 0.8], np.float32)
    check(
        lambda x, g, b: jbn.batch_renorm(
            x,
            g,
            b,
            mu,
            sigma,
            epsilon=EPS,
            **CLIPPING,
            mask=mask[:, None],
        )[0],
        x,
        mask,
        gamma,
        beta,
        dy,
        reference_vjp(x, mask, gamma, beta, dy, renorm_statistics=(mu, sigma), clipping=CLIPPING),
    )


MODULE_PATHS = {
    "fused": (dict(), "mask"),
    "composite": (dict(fused=False), "mask"),
    "ghost": (dict(virtual_batch_size=4), "mask"),
    "ghost_composite": (dict(virtual_batch_size=4, fused=False), "mask"),
    "renorm": (dict(renorm=True, renorm_clipping=CLIPPING), "mask"),
    "weighted": (dict(), "batch_weights"),
}


@pytest.mark.parametrize("padding", PADDING)
@pytest.mark.parametrize("path", sorted(MODULE_PATHS))
def test_module(path, padding):
    kwargs, how = MODULE_PATHS[path]
    x, mask, weights, gamma, beta, dy = padded_batch(padding)
    module = jbn.BatchNorm(decay=0.5, scale=True, epsilon=EPS, **kwargs)
    variables = init_variables(module, x)
    stats = variables["batch_stats"]
    call = {"mask": mask} if how == "mask" else {"batch_weights": weights}

    def normalize(x, gamma, beta):
        y, _ = module.apply(
            {"params": {"gamma": gamma, "beta": beta}, "batch_stats": stats},
            x,
            is_training=True,
            mutable=["batch_stats"],
            **call,
        )
        return y

    ghost = kwargs.get("virtual_batch_size")
    renorm = None
    if kwargs.get("renorm"):  # the renorm statistics start at mean 0, stddev 1
        renorm = (np.zeros_like(gamma), np.ones_like(gamma))
    counted = weights if how == "batch_weights" else mask
    want = reference_vjp(
        x,
        counted,
        gamma,
        beta,
        dy,
        virtual_batch_size=ghost,
        renorm_statistics=renorm,
        clipping=CLIPPING,
    )
    check(normalize, x, mask, gamma, beta, dy, want)
    # ... and the statistics stay finite and equal those of the counted rows.
    _, updates = jax.jit(
        lambda x: module.apply(variables, x, is_training=True, mutable=["batch_stats"], **call)
    )(x)
    for name, value in updates["batch_stats"].items():
        assert np.all(np.isfinite(value)), name
    if ghost is None:
        mean, _, _ = reference.moments(x, 0, counted[:, None], keepdims=False)
        np.testing.assert_allclose(
            updates["batch_stats"]["moving_mean"],
            reference.moving_average(0.0, mean, decay=0.5),
            rtol=1e-5,
        )

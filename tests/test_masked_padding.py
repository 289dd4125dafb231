"""Masked-out elements may hold anything (NaN, Inf): they reach no output but their own, no
statistic and no gradient, in every path (fused, composite, ghost, renorm, weighted; core and
module). References: the closed-form batch-norm gradient in float64 numpy over counted rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn

EPS = 1e-3
BATCH, FEATURES = 8, 3
PADDING = [np.nan, np.inf, -np.inf]


def np_reference(x, weights, gamma, beta, dy, *, ghost=None, renorm_stats=None, clip=None):
    """float64 outputs (counted rows) and gradients of sum(dy * y) over counted rows.

    `weights` per row (0 = padding); statistics per group of `ghost` rows (all rows if None);
    with `renorm_stats=(mu, sigma)` the output is ((x - m) / s * r + d) * gamma + beta with r, d
    constants (clipped by `clip=(rmin, rmax, dmax)`).
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(weights, np.float64)[:, None]
    dy = np.where(w > 0, np.asarray(dy, np.float64), 0.0)
    ghost = ghost or len(x)
    y, dx = np.zeros_like(x), np.zeros_like(x)
    dgamma, dbeta = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start in range(0, len(x), ghost):
        rows = slice(start, start + ghost)
        xs, ws, g = np.where(w[rows] > 0, x[rows], 0.0), w[rows], dy[rows]
        total = ws.sum(0)
        mean = (ws * xs).sum(0) / total
        var = (ws * (xs - mean) ** 2).sum(0) / total
        sigma = np.sqrt(var + EPS)
        xhat = (xs - mean) / sigma
        r, d = np.ones_like(mean), np.zeros_like(mean)
        if renorm_stats is not None:
            mu, running = renorm_stats
            r, d = sigma / running, (mean - mu) / running
            if clip is not None:
                r, d = np.clip(r, clip[0], clip[1]), np.clip(d, -clip[2], clip[2])
        y[rows] = (xhat * r + d) * gamma + beta
        dgamma += (g * (xhat * r + d)).sum(0)
        dbeta += g.sum(0)
        dxhat = g * gamma * r
        dx[rows] = dxhat - ws * dxhat.sum(0) / total - ws * xhat * (dxhat * xhat).sum(0) / total
        dx[rows] /= sigma
    return y, dx, dgamma, dbeta


def data(padding):
    rng = np.random.default_rng(0)
    x = (1.0 + 2.0 * rng.standard_normal((BATCH, FEATURES))).astype(np.float32)
    mask = np.array([True, True, False, True, True, True, False, True])
    x[~mask] = padding
    weights = mask * rng.uniform(0.5, 2.0, BATCH)
    gamma = rng.uniform(0.5, 2.0, FEATURES).astype(np.float32)
    beta = rng.standard_normal(FEATURES).astype(np.float32)
    dy = rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
    return x, mask, weights.astype(np.float32), gamma, beta, dy


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
    x, mask, _, gamma, beta, dy = data(padding)
    check(
        lambda x, g, b: jbn.fused_batch_norm(x, g, b, epsilon=EPS, mask=mask[:, None])[0],
        x,
        mask,
        gamma,
        beta,
        dy,
        np_reference(x, mask, gamma, beta, dy),
    )


@pytest.mark.parametrize("padding", PADDING)
def test_fused_ill_conditioned_branch(padding):
    x, mask, _, gamma, beta, dy = data(padding)
    x = np.where(mask[:, None], x + 1e3, x).astype(np.float32)  # |mean| >> std: two passes
    check(
        lambda x, g, b: jbn.fused_batch_norm(x, g, b, epsilon=EPS, mask=mask[:, None])[0],
        x,
        mask,
        gamma,
        beta,
        dy,
        np_reference(x, mask, gamma, beta, dy),
        atol=1e-4,  # float32 round-off of x near 1e3
    )


@pytest.mark.parametrize("padding", PADDING)
def test_composite(padding):
    x, mask, _, gamma, beta, dy = data(padding)

    def normalize(x, gamma, beta):
        mean, var = jbn.moments(x, 0, mask=mask[:, None])
        return jbn.batch_normalization(x, mean, var, beta, gamma, EPS, mask=mask[:, None])

    check(normalize, x, mask, gamma, beta, dy, np_reference(x, mask, gamma, beta, dy))


@pytest.mark.parametrize("padding", PADDING)
def test_weighted(padding):
    x, mask, weights, gamma, beta, dy = data(padding)

    def normalize(x, gamma, beta):
        mean, var = jbn.weighted_moments(x, 0, weights[:, None])
        return jbn.batch_normalization(x, mean, var, beta, gamma, EPS, mask=mask[:, None])

    check(normalize, x, mask, gamma, beta, dy, np_reference(x, weights, gamma, beta, dy))


@pytest.mark.parametrize("padding", PADDING)
def test_ghost(padding):
    x, mask, _, gamma, beta, dy = data(padding)
    check(
        lambda x, g, b: jbn.ghost_batch_norm(
            x, g, b, virtual_batch_size=4, epsilon=EPS, mask=mask[:, None]
        )[0],
        x,
        mask,
        gamma,
        beta,
        dy,
        np_reference(x, mask, gamma, beta, dy, ghost=4),
    )


@pytest.mark.parametrize("padding", PADDING)
def test_renorm(padding):
    x, mask, _, gamma, beta, dy = data(padding)
    mu = np.array([0.5, -0.5, 1.0], np.float32)
    sigma = np.array([1.5, 2.0, 0.8], np.float32)
    clip = (0.8, 1.25, 0.5)
    check(
        lambda x, g, b: jbn.batch_renorm(
            x,
            g,
            b,
            mu,
            sigma,
            epsilon=EPS,
            rmin=clip[0],
            rmax=clip[1],
            dmax=clip[2],
            mask=mask[:, None],
        )[0],
        x,
        mask,
        gamma,
        beta,
        dy,
        np_reference(x, mask, gamma, beta, dy, renorm_stats=(mu, sigma), clip=clip),
    )


MODULE_PATHS = {
    "fused": (dict(), "mask"),
    "composite": (dict(fused=False), "mask"),
    "ghost": (dict(virtual_batch_size=4), "mask"),
    "ghost_composite": (dict(virtual_batch_size=4, fused=False), "mask"),
    "renorm": (dict(renorm=True, renorm_clipping={"rmax": 1.25, "rmin": 0.8, "dmax": 0.5}), "mask"),
    "weighted": (dict(), "batch_weights"),
}


@pytest.mark.parametrize("padding", PADDING)
@pytest.mark.parametrize("path", sorted(MODULE_PATHS))
def test_module(path, padding):
    kwargs, how = MODULE_PATHS[path]
    x, mask, weights, gamma, beta, dy = data(padding)
    module = jbn.BatchNorm(decay=0.5, scale=True, epsilon=EPS, **kwargs)
    variables = module.init(jax.random.key(0), x, is_training=False)
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
        renorm = (np.zeros(FEATURES), np.ones(FEATURES))
    clip = (0.8, 1.25, 0.5) if renorm else None
    counted = weights if how == "batch_weights" else mask
    want = np_reference(x, counted, gamma, beta, dy, ghost=ghost, renorm_stats=renorm, clip=clip)
    check(normalize, x, mask, gamma, beta, dy, want)
    # ... and the statistics stay finite and equal those of the counted rows.
    _, updates = jax.jit(
        lambda x: module.apply(variables, x, is_training=True, mutable=["batch_stats"], **call)
    )(x)
    for name, value in updates["batch_stats"].items():
        assert np.all(np.isfinite(value)), name
    if ghost is None:
        w = counted.astype(np.float64)[:, None]
        xs = np.where(w > 0, x, 0.0)
        mean = (w * xs).sum(0) / w.sum(0)
        np.testing.assert_allclose(updates["batch_stats"]["moving_mean"], 0.5 * mean, rtol=1e-5)

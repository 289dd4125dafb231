"""NaN/Inf in masked-out rows stay out of outputs, statistics and gradients across 4 devices.

Reference: the closed-form gradient of batch norm over the counted rows of the whole batch,
float64 numpy (`batch_norm_vjp` of tests/reference.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jbn_testing import padded_batch

import jbn

DEVICES, AXIS, EPS = 4, "batch", 1e-3
CLIPPING = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.5}

PATHS = {
    "fused": (dict(), "mask"),
    "composite": (dict(fused=False), "mask"),
    "renorm": (dict(renorm=True, renorm_clipping=CLIPPING), "mask"),
    "weighted": (dict(), "batch_weights"),
}


@pytest.mark.parametrize("padding", [np.nan, np.inf])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_masked_padding_across_devices(path, padding):
    kwargs, how = PATHS[path]
    x, mask, weights, gamma, beta, dy = padded_batch(padding)
    module = jbn.BatchNorm(decay=0.5, scale=True, epsilon=EPS, axis_name=AXIS, **kwargs)
    stats = jbn.BatchNorm(scale=True, epsilon=EPS, **kwargs).init(
        jax.random.key(0), x, is_training=False
    )["batch_stats"]
    counted = weights if how == "batch_weights" else mask

    def device_loss(x, mask, counted, dy, gamma, beta):
        call = {"mask": counted} if how == "mask" else {"batch_weights": counted}
        y, updates = module.apply(
            {"params": {"gamma": gamma, "beta": beta}, "batch_stats": stats},
            x,
            is_training=True,
            mutable=["batch_stats"],
            **call,
        )
        return jnp.sum(jnp.where(mask[:, None], y, 0) * dy), (y, updates["batch_stats"])

    shard = lambda v: v.reshape(DEVICES, -1, *v.shape[1:])
    grads, (y, new_stats) = jax.pmap(
        jax.grad(device_loss, argnums=(0, 4, 5), has_aux=True),
        axis_name=AXIS,
        in_axes=(0, 0, 0, 0, None, None),
    )(shard(x), shard(mask), shard(counted), shard(dy), gamma, beta)
    dx, dgamma, dbeta = grads
    renorm = (np.zeros(3), np.ones(3)) if kwargs.get("renorm") else None
    want_y, want_dx, want_dgamma, want_dbeta = reference.batch_norm_vjp(
        x, counted, gamma, beta, dy, EPS, renorm_statistics=renorm, clipping=CLIPPING
    )
    y = np.asarray(y).reshape(x.shape)
    np.testing.assert_allclose(y[mask], want_y[mask], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx).reshape(x.shape), want_dx, rtol=1e-4, atol=1e-5)
    # Each device holds the gradient of its own rows' outputs for the replicated parameters.
    np.testing.assert_allclose(np.sum(dgamma, 0), want_dgamma, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.sum(dbeta, 0), want_dbeta, rtol=1e-4, atol=1e-5)
    for name, value in new_stats.items():
        assert np.all(np.isfinite(value)), name

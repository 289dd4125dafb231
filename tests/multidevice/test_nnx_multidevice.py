"""jbn.nnx.BatchNorm under nnx.shard_map with axis_name on 4 devices equals one device on the
whole batch: outputs, running statistics, and float64 numpy."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import reference
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

import jbn

DEVICES, AXIS = 4, "batch"
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(fused=False), dict(renorm=True, renorm_decay=0.5)], ids=str
)
def test_shard_map_equals_one_device(kwargs):
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), (AXIS,))
    make = lambda **extra: jbn.nnx.BatchNorm(
        3, decay=0.5, scale=True, use_running_average=False, rngs=nnx.Rngs(0), **kwargs, **extra
    )
    synced, single = make(axis_name=AXIS), make()
    rng = np.random.default_rng(0)
    xs = [(2.0 + 3.0 * rng.standard_normal((16, 2, 3))).astype(np.float32) for _ in range(2)]

    @nnx.shard_map(
        mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(AXIS)), out_specs=PartitionSpec(AXIS)
    )
    def sharded_step(model, x):
        return model(x)

    step = nnx.jit(sharded_step)
    moving_mean = np.zeros(3)
    for x in xs:
        y = step(synced, x)
        np.testing.assert_allclose(y, single(x), **TOL)
        want, mean, _ = reference.batch_norm(x.reshape(-1, 3), 0, None, None, 1e-3)
        moving_mean = reference.moving_average(moving_mean, mean[0], 0.5)
        if not kwargs.get("renorm"):
            np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), want, **TOL)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(getattr(synced, name)[...], getattr(single, name)[...], **TOL)
    np.testing.assert_allclose(synced.moving_mean[...], moving_mean, rtol=1e-5)

"""Cross-device statistics on 4 simulated CPU devices equal those of the concatenated batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jbn

DEVICES = 4


def _per_device_data(offset=1.0, features=5, rows=8, seed=0):
    rng = np.random.default_rng(seed)
    x = (offset + rng.standard_normal((DEVICES, rows, features)) * 2).astype(np.float32)
    # A different number of counted rows on every device: 8, 6, 3 and 1.
    counted = np.array([8, 6, 3, 1])
    mask = (np.arange(rows)[None, :] < counted[:, None])[..., None]
    return x, mask


def _global_reference(x, mask):
    """float64 mean and variance of the counted rows of all devices together."""
    features = x.shape[-1]
    mean, var, _ = reference.moments(
        x.reshape(-1, features), 0, mask.reshape(-1, 1), keepdims=False
    )
    return mean, var


def test_device_count():
    assert jax.local_device_count() == DEVICES


@pytest.mark.parametrize("offset", [1.0, 1e4])
def test_moments_pmap_with_uneven_masks_are_count_weighted(offset):
    x, mask = _per_device_data(offset)
    mean, var = jax.pmap(lambda x, m: jbn.moments(x, 0, mask=m, axis_name="d"), axis_name="d")(
        x, mask
    )
    ref_mean, ref_var = _global_reference(x, mask)
    for device in range(DEVICES):
        np.testing.assert_allclose(mean[device], ref_mean, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(var[device], ref_var, rtol=1e-3)
    # A mean of per-device means (flax#2417) would be far off here.
    naive = np.mean([x[i][mask[i, :, 0]].mean(0) for i in range(DEVICES)], axis=0)
    assert np.max(np.abs(naive - ref_mean)) > 10 * np.max(np.abs(mean[0] - ref_mean)) + 1e-3


def test_weighted_moments_pmap():
    x, _ = _per_device_data()
    weights = np.random.default_rng(1).integers(0, 4, (DEVICES, 8, 1)).astype(np.float32)
    weights[:, 0] = 1
    mean, var = jax.pmap(lambda x, w: jbn.weighted_moments(x, 0, w, axis_name="d"), axis_name="d")(
        x, weights
    )
    ref_mean, ref_var, _ = reference.moments(
        x.reshape(-1, 5), 0, weights.reshape(-1, 1), keepdims=False
    )
    np.testing.assert_allclose(mean[2], ref_mean, rtol=1e-5)
    np.testing.assert_allclose(var[2], ref_var, rtol=1e-4)


def _fused_loss(x, r, mask, scale, axis_name):
    y, _, _ = jbn.fused_batch_norm(x, scale, None, axis_name=axis_name, mask=mask)
    return jnp.sum(jnp.sin(y) * r)


def _composite_loss(x, r, mask, scale, axis_name):
    mean, var = jbn.moments(x, 0, mask=mask, axis_name=axis_name)
    # Masked-out elements see constant statistics (the contract of the fused op too).
    y = jbn.batch_normalization(x, mean, var, None, scale, 1e-3, mask=mask)
    return jnp.sum(jnp.sin(y) * r)


@pytest.mark.parametrize("offset", [1.0, 1e3])
def test_fused_pmap_statistics_and_gradients(offset):
    x, mask = _per_device_data(offset)
    rng = np.random.default_rng(2)
    r = rng.standard_normal(x.shape).astype(np.float32)
    scale = rng.uniform(0.5, 2, 5).astype(np.float32)
    _, mean, var = jax.pmap(
        lambda x, m: jbn.fused_batch_norm(x, scale, None, axis_name="d", mask=m), axis_name="d"
    )(x, mask)
    ref_mean, ref_var = _global_reference(x, mask)
    np.testing.assert_allclose(mean[3], ref_mean, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(var[3], ref_var, rtol=1e-3)

    grads = {}
    for name, loss in (("fused", _fused_loss), ("composite", _composite_loss)):
        fn = functools.partial(loss, scale=scale, axis_name="d")
        grads[name] = jax.pmap(jax.grad(fn), axis_name="d")(x, r, mask)
    np.testing.assert_allclose(
        grads["fused"],
        grads["composite"],
        rtol=1e-4,
        atol=1e-4 * np.max(np.abs(grads["composite"])),
    )

    # ... and both are the gradient of the total loss on the concatenated global batch.
    def global_loss(flat):
        return _composite_loss(flat, r.reshape(-1, 5), mask.reshape(-1, 1), scale, None)

    want = jax.grad(global_loss)(x.reshape(-1, 5)).reshape(x.shape)
    np.testing.assert_allclose(grads["fused"], want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))


def test_axis_index_groups_reduce_separately():
    x, _ = _per_device_data()
    groups = [[0, 2], [1, 3]]
    mean, var = jax.pmap(
        lambda x: jbn.moments(x, 0, axis_name="d", axis_index_groups=groups), axis_name="d"
    )(x)
    for group in groups:
        members = x[group].reshape(-1, 5).astype(np.float64)
        for device in group:
            np.testing.assert_allclose(mean[device], members.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(var[device], members.var(0), rtol=1e-4)
    _, fused_mean, _ = jax.pmap(
        lambda x: jbn.fused_batch_norm(x, axis_name="d", axis_index_groups=groups), axis_name="d"
    )(x)
    np.testing.assert_allclose(fused_mean[1], x[[1, 3]].reshape(-1, 5).mean(0), rtol=1e-5)


def test_shard_map_statistics_and_gradients():
    x, _ = _per_device_data()
    flat = x.reshape(-1, 5)
    r = np.random.default_rng(3).standard_normal(flat.shape).astype(np.float32)
    scale = np.linspace(0.5, 2, 5).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()), ("d",))

    def sharded(flat, r):
        y, mean, var = jbn.fused_batch_norm(flat, scale, None, axis_name="d")
        return jnp.sin(y) * r, mean, var

    run = jax.shard_map(sharded, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=(P("d"), P(), P()))
    _, mean, var = jax.jit(run)(flat, r)
    np.testing.assert_allclose(mean, flat.astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(var, flat.astype(np.float64).var(0), rtol=1e-4)

    got = jax.jit(jax.grad(lambda flat: jnp.sum(run(flat, r)[0])))(flat)
    want = jax.grad(lambda flat: _composite_loss(flat, r, None, scale, None))(flat)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))

"""Per-example inputs across 4 simulated CPU devices: the core with one example per device
(pmap), examples under `vmap` inside pmap/shard_map, and `jbn.equinox.BatchNorm` there; each
against float64 numpy statistics and gradients of the whole global batch."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import reference
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jbn
import jbn.equinox

DEVICES = 4
EPSILON = 1e-3


def _data(shape, seed=0):
    return (2.0 + 3.0 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def test_one_example_per_device_with_uneven_mask():
    """pmap over examples `(C,)`: the batch is the device axis; masked-out devices (NaN) count
    for nothing."""
    x = _data((DEVICES, 5))
    counted = np.array([True, False, True, True])
    x[~counted] = np.nan
    y, mean, variance = jax.pmap(
        lambda xi, mi: jbn.fused_batch_norm(xi, axis=0, axis_name="d", mask=mi, epsilon=EPSILON),
        axis_name="d",
    )(x, counted)
    ref_y, ref_mean, ref_var = reference.batch_norm(x[counted], 0, None, None, EPSILON)
    np.testing.assert_allclose(y[counted], ref_y, atol=2e-5)
    for device in range(DEVICES):
        np.testing.assert_allclose(mean[device], ref_mean.ravel(), rtol=1e-6)
        np.testing.assert_allclose(variance[device], ref_var.ravel(), rtol=1e-5)


def _check_gradients(run, x, dy, scale):
    """grad of the jitted `run` against the float64 closed form over the whole batch `x`."""
    dx, dscale = jax.grad(lambda x, scale: jnp.sum(run(x, dy, scale)[0]), (0, 1))(x, scale)
    _, ref_dx, ref_dscale, _ = reference.batch_norm_vjp(x, np.ones(len(x)), scale, 0.0, dy, EPSILON)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dscale, ref_dscale, rtol=1e-4, atol=1e-4)


def test_one_example_per_device_under_shard_map_gradients():
    x = _data((DEVICES, 4), seed=1)
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    scale = np.linspace(0.5, 2, 4).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()), ("d",))

    def per_device(x, dy, scale):
        y, mean, _ = jbn.fused_batch_norm(x[0], scale, None, axis=0, axis_name="d", epsilon=EPSILON)
        return y[None] * dy, mean

    run = jax.jit(
        jax.shard_map(
            per_device, mesh=mesh, in_specs=(P("d"), P("d"), P()), out_specs=(P("d"), P())
        )
    )
    np.testing.assert_allclose(run(x, dy, scale)[1], x.astype(np.float64).mean(0), rtol=1e-6)
    _check_gradients(run, x, dy, scale)


def test_examples_vmapped_inside_shard_map_gradients():
    """shard_map over devices, vmap over each device's examples, statistics over both names.
    jax (0.10.2 and 0.12.1) refuses a psum over a vmap name and a shard_map name together when
    shard_map checks replication (`check_vma=True`: an AssertionError or ValueError inside JAX,
    also for plain arrays), hence check_vma=False."""
    x = _data((DEVICES * 3, 4), seed=1)
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    scale = np.linspace(0.5, 2, 4).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()), ("d",))

    def per_device(x, dy, scale):
        y, mean, _ = jax.vmap(
            lambda xi: jbn.fused_batch_norm(
                xi, scale, None, axis=0, axis_name=("d", "b"), epsilon=EPSILON
            ),
            axis_name="b",
            out_axes=(0, None, None),
        )(x)
        return y * dy, mean

    run = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P("d"), P("d"), P()),
            out_specs=(P("d"), P()),
            check_vma=False,
        )
    )
    np.testing.assert_allclose(run(x, dy, scale)[1], x.astype(np.float64).mean(0), rtol=1e-6)
    _check_gradients(run, x, dy, scale)


def test_equinox_batch_norm_across_devices():
    """pmap over devices of vmap over examples, `axis_name=("device", "batch")`: one state,
    the statistics of the whole batch (Equinox's multi-device pattern)."""
    x = _data((DEVICES, 3, 2, 5), seed=3)  # (devices, examples, C, W)
    bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(2, ("device", "batch"))
    per_device = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, new_state = jax.pmap(per_device, axis_name="device", in_axes=(0, None))(x, state)
    flat = x.reshape(DEVICES * 3, 2, 5)
    ref_y, ref_mean, ref_var = reference.batch_norm(flat, (0, 2), None, None, 1e-5)
    np.testing.assert_allclose(y.reshape(flat.shape), ref_y, rtol=2e-5, atol=2e-5)
    statistics = new_state.get(bn.state_index)
    for device in range(DEVICES):
        np.testing.assert_allclose(statistics.mean[device], 0.01 * ref_mean.ravel(), rtol=1e-5)
        np.testing.assert_allclose(
            statistics.variance[device], 0.99 + 0.01 * ref_var.ravel(), rtol=1e-5
        )

"""jbn.BatchNorm across 4 simulated CPU devices equals one device on the concatenated batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

import jbn

DEVICES = 4
AXIS = "batch"
TOL = dict(rtol=2e-5, atol=2e-5)


def shards(array: np.ndarray) -> np.ndarray:
    """(B, ...) -> (DEVICES, B // DEVICES, ...)."""
    return array.reshape(DEVICES, array.shape[0] // DEVICES, *array.shape[1:])


def unshard(array) -> np.ndarray:
    array = np.asarray(array)
    return array.reshape(-1, *array.shape[2:])


def step_and_grad(module, variables, x, cotangent, call_kwargs, with_grad):
    """Training step, plus the input gradient of sum(y * cotangent) if `with_grad`."""

    def loss(x):
        y, updates = module.apply(
            variables, x, is_training=True, mutable=["batch_stats"], **call_kwargs
        )
        return jnp.sum(y * cotangent), (y, updates)

    if not with_grad:
        y, updates = module.apply(
            variables, x, is_training=True, mutable=["batch_stats"], **call_kwargs
        )
        return y, updates, None
    grad_x, (y, updates) = jax.grad(loss, has_aux=True)(x)
    return y, updates, grad_x


def compare(name, module_kwargs, batch_shape, steps=2, call_kwargs=None, grads=False):
    """pmap with axis_name over the shards vs one device on the whole batch, several steps.

    With `grads`, the input gradients are compared too (only where asked: compiling dominates
    the run time).
    """
    call_kwargs = call_kwargs or {}
    rng = np.random.default_rng(0)
    synced = jbn.BatchNorm(axis_name=AXIS, **module_kwargs)
    single = jbn.BatchNorm(**module_kwargs)
    batches = [
        (2.0 + 3.0 * rng.standard_normal(batch_shape)).astype(np.float32) for _ in range(steps)
    ]
    cotangent = rng.standard_normal(batch_shape).astype(np.float32)
    variables = jax.jit(lambda x: single.init(jax.random.key(0), x, is_training=False))(batches[0])
    synced_variables = variables

    pmapped = jax.pmap(
        lambda v, x, c, kw: step_and_grad(synced, v, x, c, kw, grads),
        axis_name=AXIS,
        in_axes=(None, 0, 0, 0),
    )
    single_step = jax.jit(lambda v, x, c, kw: step_and_grad(single, v, x, c, kw, grads))
    sharded_kwargs = {k: shards(np.asarray(v)) for k, v in call_kwargs.items()}
    for x in batches:
        y, updates, grad_x = pmapped(synced_variables, shards(x), shards(cotangent), sharded_kwargs)
        y_ref, updates_ref, grad_ref = single_step(variables, x, cotangent, call_kwargs)
        np.testing.assert_allclose(unshard(y), y_ref, **TOL, err_msg=f"{name}: output")
        if grads:
            np.testing.assert_allclose(
                unshard(grad_x), grad_ref, rtol=1e-4, atol=1e-4, err_msg=f"{name}: grad"
            )
        for key, value in updates["batch_stats"].items():
            value = np.asarray(value)
            for device in range(DEVICES):
                np.testing.assert_allclose(
                    value[device],
                    updates_ref["batch_stats"][key],
                    **TOL,
                    err_msg=f"{name}: {key} on device {device}",
                )
        synced_variables = {**variables, **jax.tree.map(lambda v: v[0], updates)}
        variables = {**variables, **updates_ref}
    print(f"ok {name}")


def check_axis_index_groups():
    """Groups [[0, 1], [2, 3]] reduce like two independent 2-device runs."""
    groups = [[0, 1], [2, 3]]
    module = jbn.BatchNorm(decay=0.5, axis_name=AXIS, axis_index_groups=groups)
    single = jbn.BatchNorm(decay=0.5)
    x = (1.0 + np.random.default_rng(3).standard_normal((8, 3, 2))).astype(np.float32)
    variables = single.init(jax.random.key(0), x, is_training=False)
    step = lambda m: lambda v, x: m.apply(v, x, is_training=True, mutable=["batch_stats"])
    y, updates = jax.pmap(step(module), axis_name=AXIS, in_axes=(None, 0))(variables, shards(x))
    for group, devices in enumerate(groups):
        rows = slice(4 * group, 4 * group + 4)
        y_ref, updates_ref = step(single)(variables, x[rows])
        np.testing.assert_allclose(unshard(y[np.array(devices)]), y_ref, **TOL)
        for device in devices:
            np.testing.assert_allclose(
                updates["batch_stats"]["moving_mean"][device],
                updates_ref["batch_stats"]["moving_mean"],
                **TOL,
            )
    print("ok axis_index_groups")


def check_shard_map():
    """The same module under jax.shard_map over a 4-device mesh."""
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), (AXIS,))
    module = jbn.BatchNorm(decay=0.5, scale=True, axis_name=AXIS)
    single = jbn.BatchNorm(decay=0.5, scale=True)
    x = (3.0 + 2.0 * np.random.default_rng(4).standard_normal((8, 4, 3))).astype(np.float32)
    variables = single.init(jax.random.key(0), x, is_training=False)

    def local_step(variables, x):
        y, updates = module.apply(variables, x, is_training=True, mutable=["batch_stats"])
        return y, updates

    sharded = jax.jit(
        jax.shard_map(
            local_step,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec(AXIS)),
            out_specs=(PartitionSpec(AXIS), PartitionSpec()),
        )
    )
    y, updates = sharded(variables, x)
    y_ref, updates_ref = single.apply(variables, x, is_training=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, **TOL)
    for key in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            updates["batch_stats"][key], updates_ref["batch_stats"][key], **TOL
        )
    print("ok shard_map")


# Devices count different numbers of examples: exact count-weighted merging.
UNEVEN_MASK = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0], bool)
WEIGHTS = np.random.default_rng(1).uniform(0, 3, 8).astype(np.float32)
WEIGHTS[4:6] = 0

CASES = {
    # fused_batch_norm, plain and with a mask.
    "nhwc": dict(module_kwargs=dict(decay=0.7, scale=True), batch_shape=(8, 3, 3, 2), grads=True),
    "uneven mask": dict(
        module_kwargs=dict(decay=0.7, scale=True),
        batch_shape=(16, 2, 3),
        call_kwargs=dict(mask=UNEVEN_MASK),
        grads=True,
    ),
    # Composite moments + batch_normalization.
    "nchw composite masked": dict(
        module_kwargs=dict(decay=0.7, data_format="NCHW", fused=False),
        batch_shape=(16, 3, 2, 2),
        call_kwargs=dict(mask=UNEVEN_MASK),
    ),
    # weighted_moments; the counts behind the unbiased variance are summed over devices.
    "batch_weights unbiased zero-debiased": dict(
        module_kwargs=dict(decay=0.7, unbiased_moving_variance=True, zero_debias_moving_mean=True),
        batch_shape=(8, 3),
        call_kwargs=dict(batch_weights=WEIGHTS),
    ),
    "renorm": dict(
        module_kwargs=dict(
            decay=0.7, renorm=True, renorm_decay=0.5, renorm_clipping=dict(rmax=1.5, dmax=0.5)
        ),
        batch_shape=(8, 2, 3),
        steps=3,
        grads=True,
    ),
    # Ghost batches stay per device (2 per device here); the update is merged over all 8,
    # weighted by each ghost batch's count.
    "ghost masked": dict(
        module_kwargs=dict(decay=0.7, virtual_batch_size=2),
        batch_shape=(16, 3),
        call_kwargs=dict(mask=UNEVEN_MASK),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pmap_equals_single_device_on_concatenated_batch(name):
    assert jax.device_count() >= DEVICES, jax.devices()
    compare(name, **CASES[name])


def test_axis_index_groups():
    check_axis_index_groups()


def test_shard_map():
    check_shard_map()

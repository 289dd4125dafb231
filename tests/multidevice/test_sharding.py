"""jbn under SPMD `jax.jit` with the batch sharded over 4 simulated CPU devices.

Under `jit`, a batch sharded with `NamedSharding(mesh, P('data'))` is still one global array:
with `axis_name=None` every op computes the statistics, outputs and gradients of the whole batch
(XLA inserts the collectives), on meshes with `Auto` and `Explicit` axes alike. `jax.shard_map`
(the top-level one) gives each device its shard, and `axis_name` merges the statistics. Both
are compared with float64 numpy (statistics) and with one device on the unsharded batch
(outputs, gradients, moving averages).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from test_module_multidevice import CASES

import jbn

DEVICES = 4
AXIS = "data"
MESH_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def make_mesh(kind: str) -> jax.sharding.Mesh:
    return jax.make_mesh((DEVICES,), (AXIS,), axis_types=(MESH_TYPES[kind],))


@contextlib.contextmanager
def using(mesh: jax.sharding.Mesh):
    """The mesh as the current one (`jax.set_mesh`, which replaces the deprecated `with mesh:`)."""
    with jax.set_mesh(mesh):
        yield


def shard_batch(mesh, *arrays):
    """Each array split along axis 0 over the mesh (checked: not silently replicated)."""
    sharded = [jax.device_put(np.asarray(a), NamedSharding(mesh, P(AXIS))) for a in arrays]
    for array in sharded:
        assert len(array.sharding.device_set) == DEVICES and not array.sharding.is_fully_replicated
    return sharded


def uneven_batch(offset: float, rows_per_device: int = 8, features: int = 5, seed: int = 0):
    """x of shape (4 * rows, features) and a mask counting 8, 6, 3 and 1 rows of the 4 shards."""
    rng = np.random.default_rng(seed)
    x = (offset + 2 * rng.standard_normal((DEVICES * rows_per_device, features))).astype(np.float32)
    counted = np.array([8, 6, 3, 1])
    mask = (np.arange(rows_per_device)[None, :] < counted[:, None]).reshape(-1, 1)
    return x, mask


# ----------------------------------------------------------------------------- core ops


@pytest.mark.parametrize("kind", list(MESH_TYPES))
@pytest.mark.parametrize("offset", [1.0, 1e4])
def test_moments_under_jit_are_global_with_uneven_masks(kind, offset):
    x, mask = uneven_batch(offset)
    mesh = make_mesh(kind)
    with using(mesh):
        xs, ms = shard_batch(mesh, x, mask)
        mean, var = jax.jit(lambda x, m: jbn.moments(x, 0, mask=m))(xs, ms)
    ref_mean, ref_var, _ = reference.moments(x, 0, mask, keepdims=False)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(var, ref_var, rtol=1e-3)


@pytest.mark.parametrize("kind", list(MESH_TYPES))
def test_weighted_moments_under_jit(kind):
    x, _ = uneven_batch(1.0)
    weights = np.random.default_rng(1).integers(0, 4, (x.shape[0], 1)).astype(np.float32)
    weights[0] = 1
    mesh = make_mesh(kind)
    with using(mesh):
        xs, ws = shard_batch(mesh, x, weights)
        mean, var = jax.jit(lambda x, w: jbn.weighted_moments(x, 0, w))(xs, ws)
    ref_mean, ref_var, _ = reference.moments(x, 0, weights, keepdims=False)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5)
    np.testing.assert_allclose(var, ref_var, rtol=1e-4)


def _composite_loss(x, r, mask, scale):
    """The unfused formula on one device: the reference for values and gradients."""
    mean, var = jbn.moments(x, 0, mask=mask)
    return jnp.sum(jnp.sin(jbn.batch_normalization(x, mean, var, None, scale, 1e-3)) * r)


@pytest.mark.parametrize("kind", list(MESH_TYPES))
def test_fused_batch_norm_under_jit_statistics_and_gradients(kind):
    x, mask = uneven_batch(1e3)
    rng = np.random.default_rng(2)
    # The loss reads only kept rows: masked-out outputs send no gradient into the statistics
    # (jbn's masking contract), which the unmasked composite reference below would not know.
    r = (rng.standard_normal(x.shape) * mask).astype(np.float32)
    scale = rng.uniform(0.5, 2, x.shape[1]).astype(np.float32)

    def loss(x, r, mask):
        y, _, _ = jbn.fused_batch_norm(x, scale, None, mask=mask)
        return jnp.sum(jnp.sin(y) * r)

    mesh = make_mesh(kind)
    with using(mesh):
        xs, rs, ms = shard_batch(mesh, x, r, mask)
        _, mean, var = jax.jit(lambda x, m: jbn.fused_batch_norm(x, scale, None, mask=m))(xs, ms)
        grad = jax.jit(jax.grad(loss))(xs, rs, ms)
    ref_mean, ref_var, _ = reference.moments(x, 0, mask, keepdims=False)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(var, ref_var, rtol=1e-3)
    want = jax.jit(jax.grad(_composite_loss))(x, r, mask, scale)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))


@pytest.mark.parametrize("kind", list(MESH_TYPES))
def test_ghost_batch_norm_under_jit(kind):
    """Ghost batches of 4 straddle nothing: each is the same 4 rows as on one device."""
    x, mask = uneven_batch(2.0)
    mesh = make_mesh(kind)
    ghost = lambda x, m: jbn.ghost_batch_norm(x, virtual_batch_size=4, mask=m)
    with using(mesh):
        xs, ms = shard_batch(mesh, x, mask)
        # To host arrays: indexing an Explicit-sharded array needs an out_sharding.
        y, mean, var = jax.device_get(jax.jit(ghost)(xs, ms))
    for group in range(x.shape[0] // 4):
        rows = slice(4 * group, 4 * group + 4)
        if mask[rows].any():
            ref_mean, ref_var, _ = reference.moments(x[rows], 0, mask[rows], keepdims=False)
            np.testing.assert_allclose(mean[group], ref_mean, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(var[group], ref_var, rtol=1e-3, atol=1e-6)
    y_ref, _, _ = jax.jit(ghost)(x, mask)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(MESH_TYPES))
def test_batch_renorm_under_jit(kind):
    x, mask = uneven_batch(3.0)
    features = x.shape[1]
    running_mean = np.full(features, 2.0, np.float32)
    running_stddev = np.full(features, 1.5, np.float32)

    def renorm(x, m):
        return jbn.batch_renorm(
            x, None, None, running_mean, running_stddev, rmax=1.2, dmax=0.3, mask=m
        )

    mesh = make_mesh(kind)
    with using(mesh):
        xs, ms = shard_batch(mesh, x, mask)
        y, mean, var = jax.jit(renorm)(xs, ms)
        grad = jax.jit(jax.grad(lambda x, m: jnp.sum(jnp.sin(renorm(x, m)[0]))))(xs, ms)
    ref_mean, ref_var, _ = reference.moments(x, 0, mask, keepdims=False)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5)
    np.testing.assert_allclose(var, ref_var, rtol=1e-3)
    y_ref, _, _ = jax.jit(renorm)(x, mask)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    want = jax.jit(jax.grad(lambda x, m: jnp.sum(jnp.sin(renorm(x, m)[0]))))(x, mask)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- linen module


def module_step(module, variables, x, cotangent, call_kwargs):
    """A training step and the input gradient of sum(y * cotangent)."""

    def loss(x):
        y, updates = module.apply(
            variables, x, is_training=True, mutable=["batch_stats"], **call_kwargs
        )
        return jnp.sum(y * cotangent), (y, updates)

    grad_x, (y, updates) = jax.grad(loss, has_aux=True)(x)
    return y, updates, grad_x


def run_sharded(mode, module_kwargs, variables, x, cotangent, call_kwargs):
    """One step over a 4-device mesh: SPMD jit (Auto or Explicit axes) or shard_map."""
    if mode == "shard_map":
        mesh = make_mesh("explicit")
        module = jbn.BatchNorm(axis_name=AXIS, **module_kwargs)
        step = jax.shard_map(
            lambda v, x, c, kw: module_step(module, v, x, c, kw),
            mesh=mesh,
            in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
            out_specs=(P(AXIS), P(), P(AXIS)),
        )
    else:
        mesh = make_mesh(mode.removeprefix("jit/"))
        module = jbn.BatchNorm(**module_kwargs)  # axis_name=None: the batch is global
        step = lambda v, x, c, kw: module_step(module, v, x, c, kw)
    with using(mesh):
        names = sorted(call_kwargs)
        xs, cs, *extras = shard_batch(mesh, x, cotangent, *(call_kwargs[k] for k in names))
        variables = jax.device_put(variables, NamedSharding(mesh, P()))
        return jax.jit(step)(variables, xs, cs, dict(zip(names, extras, strict=True)))


@pytest.mark.parametrize("mode", ["jit/auto", "jit/explicit", "shard_map"])
@pytest.mark.parametrize("name", list(CASES))
def test_module_on_a_sharded_batch_equals_one_device(name, mode):
    """Outputs, input gradients and moving statistics over 2 steps, every multi-device case
    (uneven masks, batch weights, NCHW, zero-debias, renorm, ghost batches)."""
    case = CASES[name]
    module_kwargs, batch_shape = case["module_kwargs"], case["batch_shape"]
    call_kwargs = {k: np.asarray(v) for k, v in case.get("call_kwargs", {}).items()}
    rng = np.random.default_rng(0)
    single = jbn.BatchNorm(**module_kwargs)
    cotangent = rng.standard_normal(batch_shape).astype(np.float32)
    batches = [(2.0 + 3.0 * rng.standard_normal(batch_shape)).astype(np.float32) for _ in "ab"]
    variables = jax.jit(lambda x: single.init(jax.random.key(0), x, is_training=False))(batches[0])
    sharded_variables = variables
    single_step = jax.jit(lambda v, x, c, kw: module_step(single, v, x, c, kw))
    for x in batches:
        y, updates, grad_x = run_sharded(
            mode, module_kwargs, sharded_variables, x, cotangent, call_kwargs
        )
        y_ref, updates_ref, grad_ref = single_step(variables, x, cotangent, call_kwargs)
        np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5, err_msg=f"{name}: output")
        np.testing.assert_allclose(grad_x, grad_ref, rtol=1e-4, atol=1e-4, err_msg=f"{name}: grad")
        jax.tree.map(
            lambda got, want: np.testing.assert_allclose(
                got, want, rtol=2e-5, atol=2e-5, err_msg=f"{name}: moving statistics"
            ),
            updates["batch_stats"],
            updates_ref["batch_stats"],
        )
        sharded_variables = {**variables, **jax.device_get(updates)}
        variables = {**variables, **updates_ref}


# ----------------------------------------------------------------------------- NNX module


def nnx_step(graphdef, state, x, cotangent, call_kwargs):
    """A training step of a `jbn.nnx.BatchNorm` as a pure function of its state: the output, the
    new statistics and the input gradient of sum(y * cotangent)."""
    model = nnx.merge(graphdef, state)
    y = model(x, use_running_average=False, **call_kwargs)

    def loss(copy, x):
        return jnp.sum(copy(x, use_running_average=False, **call_kwargs) * cotangent)

    # A fresh copy, so that the statistics it moves while differentiated are dropped.
    grad_x = nnx.grad(loss, argnums=1)(nnx.merge(graphdef, state), x)
    return y, nnx.state(model, nnx.BatchStat), grad_x


@pytest.mark.parametrize("kind", list(MESH_TYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_nnx_module_on_a_sharded_batch_equals_one_device(name, kind):
    """jbn.nnx.BatchNorm under SPMD jit, axis_name=None: outputs, input gradients and moving
    statistics over 2 steps equal one device on the unsharded batch, for every multi-device case."""
    case = CASES[name]
    module_kwargs, batch_shape = case["module_kwargs"], case["batch_shape"]
    features = batch_shape[1] if module_kwargs.get("data_format") == "NCHW" else batch_shape[-1]
    call_kwargs = {k: np.asarray(v) for k, v in case.get("call_kwargs", {}).items()}
    graphdef, state = nnx.split(jbn.nnx.BatchNorm(features, rngs=nnx.Rngs(0), **module_kwargs))
    rng = np.random.default_rng(0)
    cotangent = rng.standard_normal(batch_shape).astype(np.float32)
    batches = [(2.0 + 3.0 * rng.standard_normal(batch_shape)).astype(np.float32) for _ in "ab"]
    step = jax.jit(functools.partial(nnx_step, graphdef))
    mesh = make_mesh(kind)
    single_state = sharded_state = state
    for x in batches:
        y_ref, stats_ref, grad_ref = step(single_state, x, cotangent, call_kwargs)
        with using(mesh):
            names = sorted(call_kwargs)
            xs, cs, *extras = shard_batch(mesh, x, cotangent, *(call_kwargs[k] for k in names))
            replicated = jax.device_put(sharded_state, NamedSharding(mesh, P()))
            y, stats, grad_x = step(replicated, xs, cs, dict(zip(names, extras, strict=True)))
        np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5, err_msg=f"{name}: output")
        np.testing.assert_allclose(grad_x, grad_ref, rtol=1e-4, atol=1e-4, err_msg=f"{name}: grad")
        jax.tree.map(
            lambda got, want: np.testing.assert_allclose(
                got, want, rtol=2e-5, atol=2e-5, err_msg=f"{name}: moving statistics"
            ),
            jax.device_get(stats),
            jax.device_get(stats_ref),
        )
        single_state = nnx.merge_state(single_state, stats_ref)
        sharded_state = nnx.merge_state(sharded_state, jax.device_get(stats))

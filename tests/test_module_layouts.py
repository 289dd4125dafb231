"""jbn.BatchNorm's layouts and dtypes: flax.linen.BatchNorm's numbers for every data_format,
axis and fused choice, and float32 statistics for low-precision inputs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jbn_testing import F32_TOL, init_variables, random_batches, train_steps

import jbn

# ---------------------------------------------------------------------------------------------
# Agreement with flax.linen.BatchNorm over layouts.


LAYOUTS = [
    # (shape, data_format, flax axis)
    ((6, 5, 4, 3), "NHWC", -1),
    ((6, 3, 5, 4), "NCHW", 1),
    ((16, 5), "NHWC", -1),
    ((16, 5), "NCHW", -1),
    ((4, 3, 2, 3, 2), "NCHW", 1),
    ((4, 7, 3), "NHWC", -1),
]


@pytest.mark.parametrize(
    ("shape", "data_format", "flax_axis", "fused"),
    [(*layout, None) for layout in LAYOUTS] + [(*LAYOUTS[1], False), (*LAYOUTS[2], False)],
)
def test_matches_flax_over_training_steps_and_eval(shape, data_format, flax_axis, fused):
    decay, epsilon = 0.9, 1e-3
    ours = jbn.BatchNorm(
        decay=decay, epsilon=epsilon, scale=True, data_format=data_format, fused=fused
    )
    theirs = nn.BatchNorm(momentum=decay, epsilon=epsilon, axis=flax_axis, use_fast_variance=False)
    batches = random_batches(shape, steps=3)
    num_features = shape[flax_axis]
    rng = np.random.default_rng(1)
    params = {
        "beta": rng.standard_normal(num_features).astype(np.float32),
        "gamma": rng.uniform(0.5, 2, num_features).astype(np.float32),
    }
    flax_params = {"bias": params["beta"], "scale": params["gamma"]}
    ours_vars = {**init_variables(ours, batches[0]), "params": params}
    theirs_vars = {
        "params": flax_params,
        "batch_stats": {"mean": jnp.zeros(num_features), "var": jnp.ones(num_features)},
    }
    cotangent = jnp.asarray(random_batches(shape, steps=1, seed=3)[0])

    def make_step(module, training_kwargs, eval_kwargs):
        def loss(params, other, x):
            y, updates = module.apply(
                {**other, "params": params}, x, mutable=["batch_stats"], **training_kwargs
            )
            return jnp.sum(y * cotangent), (y, updates)

        @jax.jit
        def step(variables, x, x_eval):
            params = variables["params"]
            other = {k: v for k, v in variables.items() if k != "params"}
            grads, (y, updates) = jax.grad(loss, argnums=(0, 2), has_aux=True)(params, other, x)
            y_eval = module.apply({**variables, **updates}, x_eval, **eval_kwargs)
            return y, updates, grads, y_eval

        return step

    our_step = make_step(ours, {"is_training": True}, {"is_training": False})
    their_step = make_step(theirs, {"use_running_average": False}, {"use_running_average": True})
    x_eval = random_batches(shape, steps=1, seed=7)[0]
    for x in batches:
        y, updates, grads, y_eval = our_step(ours_vars, x, x_eval)
        y_ref, updates_ref, grads_ref, y_eval_ref = their_step(theirs_vars, x, x_eval)
        ours_vars = {**ours_vars, **updates}
        theirs_vars = {**theirs_vars, **updates_ref}
        np.testing.assert_allclose(y, y_ref, **F32_TOL)
        stats, stats_ref = ours_vars["batch_stats"], theirs_vars["batch_stats"]
        assert stats["moving_mean"].shape == (num_features,)
        np.testing.assert_allclose(stats["moving_mean"], stats_ref["mean"], **F32_TOL)
        np.testing.assert_allclose(stats["moving_variance"], stats_ref["var"], **F32_TOL)
        # Eval mode with the updated statistics.
        np.testing.assert_allclose(y_eval, y_eval_ref, **F32_TOL)
        # Gradients with respect to the input and the parameters.
        grad_tol = dict(rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(grads[1], grads_ref[1], **grad_tol)
        np.testing.assert_allclose(grads[0]["beta"], grads_ref[0]["bias"], **grad_tol)
        np.testing.assert_allclose(grads[0]["gamma"], grads_ref[0]["scale"], **grad_tol)


def test_fused_choices_agree():
    x = random_batches((8, 4, 4, 3), steps=1)[0]
    results = {}
    for fused in (None, True, False):
        module = jbn.BatchNorm(decay=0.8, scale=True, fused=fused)
        variables = init_variables(module, x)

        def loss(params, x, module=module, variables=variables):
            y, updates = module.apply(
                {**variables, "params": params}, x, is_training=True, mutable=["batch_stats"]
            )
            return jnp.sum(jnp.sin(y)), (y, updates)

        grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        results[fused] = grad_fn(variables["params"], x)
    for fused in (True, False):
        for got, want in zip(
            jax.tree.leaves(results[fused]), jax.tree.leaves(results[None]), strict=True
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# axis= (flax's feature axis).


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((6, 3, 4, 5), 1), ((6, 3, 4, 5), (1, 3)), ((5, 4), -1), ((3, 2, 2, 2, 2, 3), -1)],
)
def test_axis_like_flax(shape, axis):
    decay = 0.8
    ours = jbn.BatchNorm(decay=decay, scale=True, epsilon=1e-3, axis=axis)
    theirs = nn.BatchNorm(momentum=decay, epsilon=1e-3, axis=axis, use_fast_variance=False)
    batches = random_batches(shape, steps=2)
    outputs, variables = train_steps(ours, batches)
    flax_variables = theirs.init(jax.random.key(0), batches[0], use_running_average=True)
    for x, y in zip(batches, outputs, strict=True):
        want, updates = theirs.apply(
            flax_variables, x, use_running_average=False, mutable=["batch_stats"]
        )
        flax_variables = {**flax_variables, **updates}
        np.testing.assert_allclose(y, want, **F32_TOL)
    assert variables["params"]["gamma"].shape == flax_variables["params"]["scale"].shape
    np.testing.assert_allclose(
        variables["batch_stats"]["moving_variance"], flax_variables["batch_stats"]["var"], rtol=1e-5
    )


def test_axis_one_equals_nchw():
    x = random_batches((4, 3, 5, 5), steps=1)[0]
    (by_axis,), _ = train_steps(jbn.BatchNorm(axis=1), [x])
    (by_format,), _ = train_steps(jbn.BatchNorm(data_format="NCHW"), [x])
    np.testing.assert_array_equal(by_axis, by_format)


# ---------------------------------------------------------------------------------------------
# Dtypes.


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_bfloat16_large_offset(offset):
    decay = 0.5
    module = jbn.BatchNorm(decay=decay, scale=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(offset + 4 * rng.standard_normal((16, 4, 4, 3)) * offset / 1e3, jnp.bfloat16)
    (y,), variables = train_steps(module, [x])
    assert y.dtype == jnp.bfloat16
    stats = variables["batch_stats"]
    assert stats["moving_mean"].dtype == stats["moving_variance"].dtype == jnp.float32
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    mean, var, _ = reference.moments(x64, (0, 1, 2))
    np.testing.assert_allclose(
        stats["moving_mean"], reference.moving_average(0.0, mean.ravel(), decay), rtol=1e-6
    )
    np.testing.assert_allclose(
        stats["moving_variance"], reference.moving_average(1.0, var.ravel(), decay), 1e-4
    )
    y32 = np.asarray(y.astype(jnp.float32))
    assert np.all(np.isfinite(y32))
    # One bf16 rounding of a value of order 1-3.
    np.testing.assert_allclose(y32, reference.normalize(x64, mean, var, 0, 1, 1e-3), atol=0.03)
    y_eval = module.apply(variables, x, is_training=False)
    assert y_eval.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y_eval, np.float32)))


def test_dtype_sets_the_output_dtype():
    x = random_batches((8, 3), steps=1)[0]
    module = jbn.BatchNorm(dtype=jnp.bfloat16)
    (y,), _ = train_steps(module, [x])
    assert y.dtype == jnp.bfloat16
    mean, var, _ = reference.moments(x, (0,))
    np.testing.assert_allclose(
        np.asarray(y, np.float32), reference.normalize(x, mean, var, 0, None, 1e-3), atol=0.02
    )
    # A wider output dtype computes from the upcast input.
    module = jbn.BatchNorm(dtype=jnp.float32)
    (y,), _ = train_steps(module, [jnp.asarray(x, jnp.bfloat16)])
    assert y.dtype == jnp.float32

"""Tests of jbn.BatchNorm against flax.linen.BatchNorm and float64 numpy formulas."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jbn_testing import F32_TOL, init_variables, random_batches, train_steps, training_step

import jbn

# ---------------------------------------------------------------------------------------------
# Agreement with flax.linen.BatchNorm.

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
# Modes and variables.


def test_init_never_moves_statistics_and_eval_never_updates():
    module = jbn.BatchNorm(decay=0.5)
    x = random_batches((8, 3), steps=1)[0]
    variables = module.init(jax.random.key(0), x, is_training=True)
    np.testing.assert_array_equal(variables["batch_stats"]["moving_mean"], np.zeros(3))
    np.testing.assert_array_equal(variables["batch_stats"]["moving_variance"], np.ones(3))
    assert variables["batch_stats"]["moving_mean"].dtype == jnp.float32
    assert set(variables) == {"params", "batch_stats"}
    _, updates = module.apply(variables, x, is_training=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(updates["batch_stats"]["moving_mean"], np.zeros(3))
    np.testing.assert_array_equal(updates["batch_stats"]["moving_variance"], np.ones(3))


def test_default_arguments_follow_tf1():
    module = jbn.BatchNorm()
    assert (module.decay, module.center, module.scale, module.epsilon) == (0.999, True, False, 1e-3)
    # data_format=None means 'NHWC' (features last) unless axis= is given.
    assert module.renorm_decay == 0.99 and module.data_format is None and module.axis is None
    x = random_batches((8, 4), steps=1)[0]
    variables = module.init(jax.random.key(0), x, is_training=False)
    # scale=False: no gamma; center=True: beta of zeros.
    assert set(variables["params"]) == {"beta"}
    (y,), after = train_steps(module, [x])
    mean, var, _ = reference.moments(x, (0,))
    np.testing.assert_allclose(y, reference.normalize(x, mean, var, None, None, 1e-3), **F32_TOL)
    np.testing.assert_allclose(
        after["batch_stats"]["moving_mean"],
        reference.moving_average(0.0, mean[0], 0.999),
        rtol=1e-5,
        atol=1e-7,
    )


def test_is_training_attribute_and_call_argument():
    x = random_batches((8, 3), steps=1)[0]
    stats = {"moving_mean": jnp.full(3, 5.0), "moving_variance": jnp.full(3, 4.0)}
    variables = {"params": {"beta": jnp.zeros(3)}, "batch_stats": stats}
    expected_eval = reference.normalize(x, 5.0, 4.0, None, None, 1e-3)
    eval_module = jbn.BatchNorm(is_training=False)
    np.testing.assert_allclose(eval_module.apply(variables, x), expected_eval, **F32_TOL)
    # The call argument wins over the attribute.
    y, _ = eval_module.apply(variables, x, is_training=True, mutable=["batch_stats"])
    assert abs(float(jnp.mean(y))) < 1e-4
    train_module = jbn.BatchNorm(is_training=True)
    np.testing.assert_allclose(
        train_module.apply(variables, x, is_training=False), expected_eval, **F32_TOL
    )
    with pytest.raises(ValueError, match="is_training"):
        jbn.BatchNorm().apply(variables, x)


def test_training_without_mutable_batch_stats_says_what_to_pass():
    module = jbn.BatchNorm()
    x = random_batches((8, 3), steps=1)[0]
    variables = module.init(jax.random.key(0), x, is_training=False)
    with pytest.raises(ValueError) as error:
        module.apply(variables, x, is_training=True)
    message = str(error.value)
    assert "mutable=['batch_stats']" in message and "is_training=False" in message
    # Under jit the same message.
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
        jax.jit(lambda v, x: module.apply(v, x, is_training=True))(variables, x)


def test_zero_debias_moving_mean():
    decay, steps = 0.9, 3
    module = jbn.BatchNorm(decay=decay, zero_debias_moving_mean=True)
    batches = random_batches((10, 2, 4), steps=steps, loc=4.0)
    _, variables = train_steps(module, batches)
    means, variances, _ = zip(*(reference.moments(x, (0, 1), keepdims=False) for x in batches))
    biased = reference.moving_averages(means, decay)[-1]
    debiased = reference.moving_averages(means, decay, zero_debias=True)[-1]
    variance = reference.moving_averages(variances, decay, initial=1.0)[-1]  # as TF1: biased
    stats = variables["batch_stats"]
    np.testing.assert_allclose(stats["moving_mean"], debiased, rtol=1e-5)
    np.testing.assert_allclose(stats["moving_mean_biased"], biased, rtol=1e-5)
    np.testing.assert_allclose(stats["moving_variance"], variance, rtol=1e-5)
    assert int(stats["num_updates"]) == steps and stats["num_updates"].dtype == jnp.int32
    # The debiased mean is close to the data's mean already; the plain EMA is not.
    assert np.all(np.abs(stats["moving_mean"] - 4.0) < 1.5)


def test_renorm_against_paper_formulas_with_clipping():
    clipping = {"rmax": 1.5, "rmin": 1 / 1.5, "dmax": 1.0}
    decay, renorm_decay, epsilon = 0.9, 0.5, 1e-3
    module = jbn.BatchNorm(
        decay=decay,
        scale=True,
        epsilon=epsilon,
        renorm=True,
        renorm_clipping=clipping,
        renorm_decay=renorm_decay,
    )
    batches = random_batches((6, 3, 2, 4), steps=4, loc=3.0, spread=2.5)
    gamma = np.array([1.0, 2.0, 0.5, -1.0])
    beta = np.array([0.0, 1.0, -1.0, 0.5])
    variables = module.init(jax.random.key(0), batches[0], is_training=False)
    variables = {**variables, "params": {"beta": beta, "gamma": gamma}}
    outputs, variables = train_steps(module, batches, variables)
    want, _, clipped, stats = reference.renorm_training(
        batches,
        gamma,
        beta,
        decay=decay,
        renorm_decay=renorm_decay,
        epsilon=epsilon,
        clipping=clipping,
    )
    assert clipped[0] == (True, True)  # the reference really exercises both clips
    for got, expected in zip(outputs, want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert set(variables["batch_stats"]) == set(stats)
    for name, expected in stats.items():
        np.testing.assert_allclose(variables["batch_stats"][name], expected, rtol=1e-5)

    # r and d carry no gradient: the input gradient is that of
    # ((x - mu_B) / sigma_B * r + d) * gamma + beta with r and d held constant.
    x = jnp.asarray(batches[0])
    fresh = init_variables(module, x)
    fresh = {**fresh, "params": {"beta": jnp.asarray(beta), "gamma": jnp.asarray(gamma)}}
    cotangent = jnp.asarray(random_batches(x.shape, steps=1, seed=5)[0])

    def loss(x):
        y, _ = module.apply(fresh, x, is_training=True, mutable=["batch_stats"])
        return jnp.sum(y * cotangent)

    def reference_loss(x):
        mean = jnp.mean(x, (0, 1, 2))
        sigma = jnp.sqrt(jnp.mean(jnp.square(x - mean), (0, 1, 2)) + epsilon)
        r = jax.lax.stop_gradient(jnp.clip(sigma, clipping["rmin"], clipping["rmax"]))
        d = jax.lax.stop_gradient(jnp.clip(mean, -clipping["dmax"], clipping["dmax"]))
        return jnp.sum((((x - mean) / sigma * r + d) * gamma + beta) * cotangent)

    np.testing.assert_allclose(
        jax.jit(jax.grad(loss))(x), jax.jit(jax.grad(reference_loss))(x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("fused", [None, False])
def test_ghost_batches(fused):
    decay, epsilon, ghost = 0.8, 1e-3, 3
    module = jbn.BatchNorm(
        decay=decay, epsilon=epsilon, virtual_batch_size=ghost, fused=fused, data_format="NCHW"
    )
    x = random_batches((9, 2, 3, 2), steps=1)[0]
    x[3:6] += 5.0  # the middle ghost batch has a different mean
    (y,), variables = train_steps(module, [x])
    means, variances = [], []
    for g in range(3):
        part = x[g * ghost : (g + 1) * ghost]
        mean, var, _ = reference.moments(part, (0, 2, 3))
        np.testing.assert_allclose(
            y[g * ghost : (g + 1) * ghost],
            reference.normalize(part, mean, var, 0, None, epsilon),
            **F32_TOL,
        )
        means.append(mean.ravel())
        variances.append(var.ravel())
    stats = variables["batch_stats"]
    # Ghost batches of equal size pool with equal weights.
    np.testing.assert_allclose(
        stats["moving_mean"],
        reference.moving_average(0.0, np.mean(means, 0), decay),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        stats["moving_variance"],
        reference.moving_average(1.0, np.mean(variances, 0), decay),
        rtol=1e-5,
    )
    # Inference ignores ghost batches and accepts any batch size.
    x_eval = x[:4]
    np.testing.assert_allclose(
        module.apply(variables, x_eval, is_training=False),
        reference.normalize(
            x_eval,
            np.asarray(stats["moving_mean"]).reshape(1, 2, 1, 1),
            np.asarray(stats["moving_variance"]).reshape(1, 2, 1, 1),
            0,
            None,
            epsilon,
        ),
        **F32_TOL,
    )
    with pytest.raises(ValueError, match="virtual_batch_size"):
        module.apply(variables, x[:4], is_training=True, mutable=["batch_stats"])


@pytest.mark.parametrize(
    ("fused", "as_weights"), [(None, False), (False, False), (None, True)], ids=str
)
def test_ghost_batches_with_mask_weight_the_update_by_counts(fused, as_weights):
    """Ghost batches with fewer counted examples weigh less; an empty one not at all."""
    decay = 0.5
    module = jbn.BatchNorm(
        decay=decay, virtual_batch_size=3, unbiased_moving_variance=True, fused=fused
    )
    x = random_batches((9, 2), steps=1)[0]
    mask = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    # 0/1 batch weights (the composite weighted path) mean the same as the mask.
    call = dict(batch_weights=mask.astype(np.float32)) if as_weights else dict(mask=mask)
    (y,), variables = train_steps(module, [x], **call)
    counts, means, variances = [], [], []
    for g in range(2):  # the third ghost batch is fully masked
        rows = slice(3 * g, 3 * g + 3)
        mean, var, count = reference.moments(x[rows], (0,), mask[rows, None])
        np.testing.assert_allclose(
            y[rows][mask[rows]],
            reference.normalize(x[rows], mean, var, 0, None, 1e-3)[mask[rows]],
            **F32_TOL,
        )
        counts.append(count.ravel())
        means.append(mean.ravel())
        # Unbiased per ghost batch; a single counted example has variance 0 either way.
        variances.append(reference.unbiased_variance(var.ravel(), count.ravel()))
    stats = variables["batch_stats"]
    np.testing.assert_allclose(
        stats["moving_mean"],
        reference.moving_average(0.0, reference.pooled(counts, means), decay),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        stats["moving_variance"],
        reference.moving_average(1.0, reference.pooled(counts, variances), decay),
        rtol=1e-5,
    )


def test_ghost_batches_with_renorm_use_per_ghost_corrections():
    clipping = {"rmax": 1.2, "dmax": 0.5}
    module = jbn.BatchNorm(
        decay=0.5, renorm=True, renorm_clipping=clipping, renorm_decay=0.5, virtual_batch_size=2
    )
    x = random_batches((4, 3), steps=1, loc=2.0)[0]
    (y,), variables = train_steps(module, [x])
    sigmas = []
    for g in range(2):
        part = x[2 * g : 2 * g + 2]
        # renorm_stddev starts at 1, renorm_mean at 0.
        want, _, _ = reference.batch_renorm(part, (0,), 0.0, 1.0, 0.0, 1.0, 1e-3, **clipping)
        np.testing.assert_allclose(y[2 * g : 2 * g + 2], want, **F32_TOL)
        _, var, _ = reference.moments(part, (0,), keepdims=False)
        sigmas.append(np.sqrt(var + 1e-3))
    np.testing.assert_allclose(
        variables["batch_stats"]["renorm_stddev"],
        reference.moving_average(1.0, np.mean(sigmas, 0), 0.5),
        rtol=1e-5,
    )


def test_batch_weights_give_weighted_statistics():
    decay, epsilon = 0.7, 1e-3
    module = jbn.BatchNorm(decay=decay, epsilon=epsilon)
    x = random_batches((6, 2, 3), steps=1)[0]
    weights = np.array([1.0, 2.0, 0.0, 0.5, 3.0, 1.0], np.float32)
    x[2] = np.nan  # weight 0: must not reach the statistics
    (y,), variables = train_steps(module, [x], batch_weights=weights)
    mean, var, _ = reference.moments(x, (0, 1), weights[:, None, None])
    valid = weights > 0
    np.testing.assert_allclose(
        y[valid], reference.normalize(x, mean, var, 0, None, epsilon)[valid], **F32_TOL
    )
    stats = variables["batch_stats"]
    np.testing.assert_allclose(
        stats["moving_mean"], reference.moving_average(0.0, mean.ravel(), decay), rtol=1e-5
    )
    np.testing.assert_allclose(
        stats["moving_variance"], reference.moving_average(1.0, var.ravel(), decay), rtol=1e-5
    )
    # Integer frequency weights equal repeating the examples.
    counts = np.array([1, 2, 1, 0, 3, 1])
    x = random_batches((6, 3), steps=1, seed=4)[0]
    (y_weighted,), weighted = train_steps(module, [x], batch_weights=counts)
    (y_repeated,), repeated = train_steps(module, [np.repeat(x, counts, axis=0)])
    np.testing.assert_allclose(
        np.asarray(y_weighted)[counts > 0], np.asarray(y_repeated)[[0, 1, 3, 4, 7]], **F32_TOL
    )
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            weighted["batch_stats"][name], repeated["batch_stats"][name], rtol=1e-5
        )


@pytest.mark.parametrize("fused", [None, False])
def test_mask_per_example_and_elementwise(fused):
    decay, epsilon = 0.6, 1e-3
    module = jbn.BatchNorm(decay=decay, epsilon=epsilon, fused=fused, data_format="NCHW")
    x = random_batches((5, 3, 4), steps=1)[0]
    example_mask = np.array([True, False, True, True, False])
    x_padded = x.copy()
    x_padded[~example_mask] = np.nan
    (y,), variables = train_steps(module, [x_padded], mask=example_mask)
    mean, var, _ = reference.moments(x, (0, 2), example_mask[:, None, None])
    np.testing.assert_allclose(
        y[example_mask],
        reference.normalize(x, mean, var, 0, None, epsilon)[example_mask],
        **F32_TOL,
    )
    np.testing.assert_allclose(
        variables["batch_stats"]["moving_mean"],
        reference.moving_average(0.0, mean.ravel(), decay),
        rtol=1e-5,
    )
    # Elementwise mask (e.g. padded sequence positions), broadcast over features.
    element_mask = np.random.default_rng(2).uniform(size=(5, 1, 4)) > 0.4
    (y,), variables = train_steps(module, [x], mask=element_mask)
    mean, var, _ = reference.moments(x, (0, 2), element_mask)
    np.testing.assert_allclose(y, reference.normalize(x, mean, var, 0, None, epsilon), **F32_TOL)
    np.testing.assert_allclose(
        variables["batch_stats"]["moving_variance"],
        reference.moving_average(1.0, var.ravel(), decay),
        rtol=1e-5,
    )


def test_mask_combined_with_batch_weights_and_all_masked_batch():
    module = jbn.BatchNorm(decay=0.5)
    x = random_batches((4, 2), steps=1)[0]
    weights = np.array([1.0, 2.0, 3.0, 4.0])
    mask = np.array([True, True, False, True])
    (_,), variables = train_steps(module, [x], batch_weights=weights, mask=mask)
    mean, _, _ = reference.moments(x, (0,), (weights * mask)[:, None])
    np.testing.assert_allclose(
        variables["batch_stats"]["moving_mean"], reference.moving_average(0.0, mean.ravel(), 0.5)
    )
    # A batch with nothing counted leaves the moving statistics as they were.
    module = jbn.BatchNorm(decay=0.5, zero_debias_moving_mean=True)
    (_,), variables = train_steps(module, [x], mask=np.zeros(4, bool))
    np.testing.assert_array_equal(variables["batch_stats"]["moving_mean"], np.zeros(2))
    np.testing.assert_array_equal(variables["batch_stats"]["moving_variance"], np.ones(2))


def test_trainable_false_freezes_params_but_statistics_still_update():
    x = random_batches((8, 3), steps=1)[0]
    cotangent = random_batches((8, 3), steps=1, seed=9)[0]
    results = {}
    for trainable in (True, False):
        module = jbn.BatchNorm(decay=0.5, scale=True, trainable=trainable)
        variables = init_variables(module, x)

        def loss(params, module=module, variables=variables):
            y, updates = module.apply(
                {**variables, "params": params}, x, is_training=True, mutable=["batch_stats"]
            )
            return jnp.sum(y * cotangent), updates

        results[trainable] = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    frozen_grads, frozen_updates = results[False]
    assert np.all(np.asarray(frozen_grads["beta"]) == 0)
    assert np.all(np.asarray(frozen_grads["gamma"]) == 0)
    # The trainable module's gradient is not zero (so the check above can fail).
    np.testing.assert_allclose(results[True][0]["beta"], cotangent.sum(0), rtol=1e-5)
    mean, var, _ = reference.moments(x, (0,))
    np.testing.assert_allclose(
        frozen_updates["batch_stats"]["moving_mean"],
        reference.moving_average(0.0, mean.ravel(), 0.5),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        frozen_updates["batch_stats"]["moving_variance"],
        reference.moving_average(1.0, var.ravel(), 0.5),
        rtol=1e-5,
    )


def test_activation_fn_applies_to_the_normalized_output():
    module = jbn.BatchNorm(activation_fn=jax.nn.relu, scale=True)
    x = random_batches((8, 3), steps=1)[0]
    variables = module.init(jax.random.key(0), x, is_training=False)
    params = {"beta": jnp.array([0.5, -0.5, 0.0]), "gamma": jnp.array([2.0, 1.0, -1.0])}
    variables = {**variables, "params": params}
    y, _ = module.apply(variables, x, is_training=True, mutable=["batch_stats"])
    mean, var, _ = reference.moments(x, (0,))
    expected = np.maximum(
        reference.normalize(
            x, mean, var, np.asarray(params["beta"]), np.asarray(params["gamma"]), 1e-3
        ),
        0,
    )
    np.testing.assert_allclose(y, expected, **F32_TOL)


def test_param_initializers():
    constant = lambda value: lambda key, shape, dtype: jnp.full(shape, value, dtype)
    module = jbn.BatchNorm(
        scale=True,
        param_initializers={
            "beta": constant(0.25),
            "gamma": constant(3.0),
            "moving_mean": constant(-2.0),
            "moving_variance": constant(9.0),
        },
        param_dtype=jnp.bfloat16,
    )
    x = random_batches((4, 2, 5), steps=1)[0]
    variables = module.init(jax.random.key(0), x, is_training=False)
    np.testing.assert_array_equal(variables["params"]["beta"], np.full(5, 0.25))
    np.testing.assert_array_equal(variables["params"]["gamma"], np.full(5, 3.0))
    assert variables["params"]["gamma"].dtype == jnp.bfloat16
    assert variables["batch_stats"]["moving_variance"].dtype == jnp.float32
    np.testing.assert_array_equal(variables["batch_stats"]["moving_mean"], np.full(5, -2.0))
    np.testing.assert_array_equal(variables["batch_stats"]["moving_variance"], np.full(5, 9.0))
    np.testing.assert_allclose(
        module.apply(variables, x, is_training=False),
        reference.normalize(x, -2.0, 9.0, 0.25, 3.0, 1e-3),
        **F32_TOL,
    )
    # Random initializers draw from the params RNG.
    random_module = jbn.BatchNorm(param_initializers={"moving_mean": nn.initializers.normal(1.0)})
    first = random_module.init(jax.random.key(0), x, is_training=False)
    second = random_module.init(jax.random.key(1), x, is_training=False)
    assert not np.allclose(
        first["batch_stats"]["moving_mean"], second["batch_stats"]["moving_mean"]
    )


def test_param_regularizers_sow_losses():
    l2 = lambda p: 0.5 * jnp.sum(jnp.square(p))
    l1 = lambda p: jnp.sum(jnp.abs(p))
    module = jbn.BatchNorm(scale=True, param_regularizers={"beta": l2, "gamma": l1})
    x = random_batches((6, 3), steps=1)[0]
    variables = module.init(jax.random.key(0), x, is_training=False)
    assert "losses" not in variables  # init does not leak the losses collection
    beta, gamma = np.array([1.0, -2.0, 3.0]), np.array([0.5, -1.5, 2.0])
    variables = {**variables, "params": {"beta": beta, "gamma": gamma}}
    _, updates = module.apply(variables, x, is_training=True, mutable=["batch_stats", "losses"])
    losses = updates["losses"]
    np.testing.assert_allclose(losses["beta_regularization"][0], 0.5 * np.sum(beta**2))
    np.testing.assert_allclose(losses["gamma_regularization"][0], np.sum(np.abs(gamma)))
    # Also in inference, and its gradient reaches the parameters.
    grads = jax.grad(
        lambda params: sum(
            jax.tree.leaves(
                module.apply(
                    {**variables, "params": params}, x, is_training=False, mutable=["losses"]
                )[1]
            )
        )
    )(variables["params"])
    np.testing.assert_allclose(grads["beta"], beta)
    np.testing.assert_allclose(grads["gamma"], np.sign(gamma))


def test_unbiased_moving_variance_like_pytorch():
    decay = 0.9
    module = jbn.BatchNorm(decay=decay, unbiased_moving_variance=True)
    x = random_batches((4, 3, 2), steps=1)[0]
    (y,), variables = train_steps(module, [x])
    mean, var, _ = reference.moments(x, (0, 1))
    n = 4 * 3
    np.testing.assert_allclose(
        variables["batch_stats"]["moving_variance"],
        reference.moving_average(1.0, reference.unbiased_variance(var.ravel(), n), decay),
        rtol=1e-5,
    )
    # Training still normalizes with the biased variance.
    np.testing.assert_allclose(y, reference.normalize(x, mean, var, 0, None, 1e-3), **F32_TOL)
    # Renorm's moving stddev tracks the biased sqrt(var + epsilon) that normalizes the batch.
    renorm = jbn.BatchNorm(
        decay=decay, renorm=True, renorm_decay=0.5, unbiased_moving_variance=True
    )
    (_,), renorm_variables = train_steps(renorm, [x])
    np.testing.assert_allclose(
        renorm_variables["batch_stats"]["renorm_stddev"],
        reference.moving_average(1.0, np.sqrt(var.ravel() + 1e-3), 0.5),
        rtol=1e-5,
    )
    # With an elementwise mask, n counts the unmasked elements of each feature.
    mask = np.ones((4, 3, 2), bool)
    mask[0, :, 1] = False
    (_,), variables = train_steps(module, [x], mask=mask)
    _, var, count = reference.moments(x, (0, 1), mask)
    count = count.ravel()
    np.testing.assert_allclose(
        variables["batch_stats"]["moving_variance"],
        reference.moving_average(1.0, reference.unbiased_variance(var.ravel(), count), decay),
        rtol=1e-5,
    )


def test_ensemble_under_vmap_matches_a_loop():
    members = 3
    module = jbn.BatchNorm(
        decay=0.8,
        scale=True,
        param_initializers={"gamma": nn.initializers.uniform(2.0)},
    )
    x = jnp.asarray(random_batches((members, 6, 4), steps=1)[0])
    keys = jax.random.split(jax.random.key(0), members)
    stacked = jax.vmap(lambda key, x: module.init(key, x, is_training=False))(keys, x)

    def step(variables, x):
        return module.apply(variables, x, is_training=True, mutable=["batch_stats"])

    y, updates = jax.jit(jax.vmap(step))(stacked, x)
    jitted_step = jax.jit(step)
    for member in range(members):
        variables = jax.tree.map(lambda leaf, m=member: leaf[m], stacked)
        y_member, updates_member = jitted_step(variables, x[member])
        np.testing.assert_allclose(y[member], y_member, rtol=1e-6, atol=1e-6)
        for got, want in zip(
            jax.tree.leaves(jax.tree.map(lambda leaf, m=member: leaf[m], updates)),
            jax.tree.leaves(updates_member),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


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


# ---------------------------------------------------------------------------------------------
# Argument errors.


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(data_format="NCWH"), ValueError, "data_format"),
        (dict(param_initializers={"scale": jnp.ones}), ValueError, "param_initializers.*scale"),
        (dict(param_initializers={"gamma": 1.0}), TypeError, "param_initializers"),
        (dict(param_regularizers={"moving_mean": abs}), ValueError, "moving_mean"),
        (dict(renorm=True, renorm_clipping={"r_max": 3.0}), ValueError, "renorm_clipping.*r_max"),
        (dict(renorm_clipping={"rmax": 3.0}), ValueError, "renorm"),
        (dict(decay=1.0), ValueError, "decay"),
        (dict(renorm_decay=-0.1), ValueError, "renorm_decay"),
        (dict(epsilon=0.0), ValueError, "epsilon"),
        (dict(fused=True, renorm=True), ValueError, "fused"),
        (dict(fused="yes"), TypeError, "fused"),
        (dict(virtual_batch_size=0), ValueError, "virtual_batch_size"),
        (dict(axis_index_groups=[[0, 1]]), ValueError, "axis_name"),
        (dict(activation_fn="relu"), TypeError, "activation_fn"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        jbn.BatchNorm(**kwargs)


@pytest.mark.parametrize("shape", [(8,), (2, 2, 2, 2, 2, 2)])
def test_bad_input_rank(shape):
    module = jbn.BatchNorm()
    with pytest.raises(ValueError, match="rank"):
        module.init(jax.random.key(0), jnp.ones(shape), is_training=False)


def test_bad_call_arguments():
    x = random_batches((4, 3), steps=1)[0]
    module = jbn.BatchNorm()
    variables = module.init(jax.random.key(0), x, is_training=False)
    train = lambda m, x, **kw: m.apply(
        variables, x, is_training=True, mutable=["batch_stats"], **kw
    )
    with pytest.raises(TypeError, match="floating"):
        module.init(jax.random.key(0), jnp.ones((4, 3), jnp.int32), is_training=False)
    with pytest.raises(TypeError, match="mask"):
        train(module, x, mask=np.ones(4, np.int32))
    with pytest.raises(ValueError, match="mask"):
        train(module, x, mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="batch_weights"):
        train(module, x, batch_weights=np.ones((4, 2)))
    with pytest.raises(ValueError, match="fused"):
        train(jbn.BatchNorm(fused=True), x, batch_weights=np.ones(4))
    renorm = jbn.BatchNorm(renorm=True)
    renorm_vars = renorm.init(jax.random.key(0), x, is_training=False)
    with pytest.raises(ValueError, match="batch_weights"):
        renorm.apply(
            renorm_vars, x, is_training=True, mutable=["batch_stats"], batch_weights=np.ones(4)
        )
    with pytest.raises(TypeError, match="is_training"):
        jax.jit(lambda flag: module.apply(variables, x, is_training=flag))(True)


# ---------------------------------------------------------------------------------------------
# Batch renormalization as TF1 / Keras define it.


@pytest.mark.parametrize(
    "clipping", [None, {"rmax": 1.3, "rmin": 0.8, "dmax": 0.4}], ids=["unclipped", "clipped"]
)
def test_renorm_training_inference_and_statistics_follow_tf1_over_steps(clipping):
    decay, renorm_decay, epsilon = 0.8, 0.6, 1e-3
    module = jbn.BatchNorm(
        decay=decay,
        scale=True,
        epsilon=epsilon,
        renorm=True,
        renorm_clipping=clipping,
        renorm_decay=renorm_decay,
        param_initializers={
            "moving_mean": nn.initializers.constant(0.5),
            "moving_variance": nn.initializers.constant(4.0),
        },
    )
    batches = random_batches((5, 2, 3), steps=5, loc=2.0, spread=3.0)
    gamma, beta = np.array([1.5, -0.5, 2.0]), np.array([0.3, 0.0, -1.0])
    variables = init_variables(module, batches[0])
    variables = {**variables, "params": {"beta": beta, "gamma": gamma}}
    evaluate = jax.jit(lambda v, x: module.apply(v, x, is_training=False))
    step = training_step(module)
    inference, outputs = [], []
    for x in batches:
        inference.append(evaluate(variables, x))
        y, updates = step(variables, x)
        variables = {**variables, **updates}
        outputs.append(y)
    want, want_inference, clipped, stats = reference.renorm_training(
        batches,
        gamma,
        beta,
        decay=decay,
        renorm_decay=renorm_decay,
        epsilon=epsilon,
        clipping=clipping,
        mean0=0.5,
        variance0=4.0,
    )
    if clipping:
        assert any(r for r, _ in clipped) and any(d for _, d in clipped)
    for got, expected in zip(outputs, want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for got, expected in zip(inference, want_inference, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for name, expected in stats.items():
        np.testing.assert_allclose(variables["batch_stats"][name], expected, rtol=1e-5)


@pytest.mark.parametrize("variance0", [1.0, 4.0])
def test_renorm_no_clipping_same_decay_gives_same_test_and_train(variance0):
    # TF's testRenormNoClippingSameMomentumGivesSameTestTrain: inference with the statistics
    # before a step equals that step's training output, from the first step, on batches of 4.
    decay = 0.9
    module = jbn.BatchNorm(
        decay=decay,
        scale=True,
        renorm=True,
        renorm_decay=decay,
        param_initializers={
            "gamma": nn.initializers.constant(2.0),
            "beta": nn.initializers.constant(3.0),
            "moving_variance": nn.initializers.constant(variance0),
        },
    )
    rng = np.random.default_rng(3)
    batches = [rng.random((4, 3)).astype(np.float32) for _ in range(6)]
    variables = init_variables(module, batches[0])
    evaluate = jax.jit(lambda v, x: module.apply(v, x, is_training=False))
    step = training_step(module)
    for x in batches:
        y_test = evaluate(variables, x)
        y_train, updates = step(variables, x)
        np.testing.assert_allclose(y_test, y_train, atol=1e-5, rtol=0)
        variables = {**variables, **updates}


def test_renorm_statistics_start_from_the_initializers_as_keras():
    module = jbn.BatchNorm(
        renorm=True,
        param_initializers={
            "moving_mean": nn.initializers.constant(1.5),
            "moving_variance": nn.initializers.constant(4.0),
        },
    )
    stats = init_variables(module, np.zeros((2, 3), np.float32))["batch_stats"]
    np.testing.assert_allclose(stats["renorm_stddev"], [2.0] * 3)
    np.testing.assert_allclose(stats["moving_stddev"], [2.0] * 3)
    np.testing.assert_allclose(stats["renorm_mean"], [1.5] * 3)
    # Reported as moving_stddev**2 - epsilon, so that sqrt(variance + epsilon) is the stddev.
    np.testing.assert_allclose(stats["moving_variance"], [4.0 - 1e-3] * 3, rtol=1e-6)


@pytest.mark.parametrize(
    ("clipping", "error", "pattern"),
    [
        ({"rmin": 2.0, "rmax": 1.0}, ValueError, r"renorm_clipping\['rmin'\].*rmax"),
        ({"dmax": -0.5}, ValueError, r"renorm_clipping\['dmax'\]"),
        ({"rmax": float("nan")}, ValueError, r"renorm_clipping\['rmax'\]"),
        ({"rmax": "3"}, TypeError, r"renorm_clipping\['rmax'\]"),
        ({"rmin": None, "dmax": [1.0]}, TypeError, r"renorm_clipping\['dmax'\]"),
    ],
)
def test_renorm_clipping_checked_at_construction(clipping, error, pattern):
    with pytest.raises(error, match=pattern):
        jbn.BatchNorm(renorm=True, renorm_clipping=clipping)


# ---------------------------------------------------------------------------------------------
# Arguments: every bad one gets a named error early.


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(dtype=jnp.int32), TypeError, "dtype"),
        (dict(param_dtype=jnp.int8), TypeError, "param_dtype"),
        (dict(decay="0.9"), TypeError, "decay"),
        (dict(epsilon="1e-3"), TypeError, "epsilon"),
        (dict(is_training="False"), TypeError, "is_training"),
        (dict(center="yes"), TypeError, "center"),
        (dict(data_format="NCHW", axis=1), ValueError, "data_format.*axis"),
        (dict(axis=1.5), TypeError, "axis must be an int or a sequence of ints"),
        (dict(decay=None, zero_debias_moving_mean=True), ValueError, "zero_debias"),
    ],
)
def test_more_bad_constructor_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        jbn.BatchNorm(**kwargs)


def test_is_training_must_be_a_bool():
    x = random_batches((4, 3), steps=1)[0]
    module = jbn.BatchNorm(decay=0.5)
    variables = module.init(jax.random.key(0), x, is_training=False)
    for flag in ("False", 0, 1.0, np.array([True, False])):
        with pytest.raises(TypeError, match="is_training"):
            module.apply(variables, x, is_training=flag, mutable=["batch_stats"])
    # numpy and concrete jax booleans are real booleans.
    for flag in (np.bool_(False), jnp.asarray(False)):
        _, updates = module.apply(variables, x, is_training=flag, mutable=["batch_stats"])
        np.testing.assert_array_equal(updates["batch_stats"]["moving_mean"], np.zeros(3))
    _, updates = module.apply(variables, x, is_training=np.bool_(True), mutable=["batch_stats"])
    mean, _, _ = reference.moments(x, (0,))
    np.testing.assert_allclose(
        updates["batch_stats"]["moving_mean"],
        reference.moving_average(0.0, mean.ravel(), 0.5),
        rtol=1e-6,
    )


def test_numpy_integer_virtual_batch_size_equals_python_int():
    x = random_batches((8, 3), steps=1)[0]
    outputs = {}
    for size in (2, np.int64(2)):
        (y,), variables = train_steps(jbn.BatchNorm(decay=0.5, virtual_batch_size=size), [x])
        outputs[type(size).__name__] = (y, variables["batch_stats"]["moving_variance"])
    want, _, var = reference.batch_norm(x.reshape(4, 2, 3), 1, None, None, 1e-3)
    for y, moving_variance in outputs.values():
        np.testing.assert_allclose(y, want.reshape(x.shape), **F32_TOL)
        np.testing.assert_allclose(
            moving_variance, reference.moving_average(1.0, var.mean((0, 1)), 0.5), rtol=1e-5
        )


# ---------------------------------------------------------------------------------------------
# decay=None (PyTorch's momentum=None) and axis= (flax's feature axis).


@pytest.mark.parametrize("renorm", [False, True])
def test_decay_none_is_the_cumulative_average(renorm):
    module = jbn.BatchNorm(decay=None, renorm=renorm, epsilon=1e-3)
    batches = random_batches((6, 4), steps=4, loc=3.0)
    _, variables = train_steps(module, batches)
    means, variances, _ = zip(*(reference.moments(x, 0, keepdims=False) for x in batches))
    stats = variables["batch_stats"]
    np.testing.assert_allclose(
        stats["moving_mean"], reference.moving_averages(means, None)[-1], rtol=1e-5
    )
    if renorm:  # TF1: the averaged quantity is sqrt(var + eps)
        stddevs = [np.sqrt(v + 1e-3) for v in variances]
        stddev = reference.moving_averages(stddevs, None)[-1]
        np.testing.assert_allclose(stats["moving_variance"], stddev**2 - 1e-3, rtol=1e-5)
    else:
        np.testing.assert_allclose(
            stats["moving_variance"], reference.moving_averages(variances, None)[-1], rtol=1e-5
        )
    assert int(stats["num_updates"]) == 4


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

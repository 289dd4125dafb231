"""jbn.BatchNorm's modes, variables and running averages against float64 numpy
(`reference.py`): training vs inference, TF1 defaults, zero-debiased, unbiased and cumulative
averages, parameters, regularizers and vmapped ensembles."""

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
# Running averages.


@pytest.mark.parametrize(
    "kwargs", [dict(decay=0.0), dict(decay=0.9, zero_debias_moving_mean=True), dict(decay=None)]
)
def test_float64_parameters_keep_float64_statistics_under_x64(kwargs):
    # Issue 19: float32 statistics of float64 N(1e4, 1) data (the mean rounded to a multiple of
    # 2**-10) made inference differ from training by 2e-4 after a step with decay=0.
    with jax.enable_x64():
        rng = np.random.default_rng(0)
        batches = [rng.normal(1e4, 1.0, (16, 3)) for _ in range(3)]
        module = jbn.BatchNorm(param_dtype=jnp.float64, **kwargs)
        outputs, variables = train_steps(module, batches)
        stats = variables["batch_stats"]
        assert {k: v.dtype for k, v in stats.items() if k != "num_updates"} == dict.fromkeys(
            set(stats) - {"num_updates"}, jnp.float64
        )
        means, variances, _ = zip(*(reference.moments(x, 0, keepdims=False) for x in batches))
        zero_debias = kwargs.get("zero_debias_moving_mean", False)
        mean = reference.moving_averages(means, kwargs["decay"], zero_debias=zero_debias)[-1]
        variance = reference.moving_averages(variances, kwargs["decay"], initial=1.0)[-1]
        np.testing.assert_allclose(stats["moving_mean"], mean, rtol=1e-12)
        np.testing.assert_allclose(stats["moving_variance"], variance, rtol=1e-9)
        y = module.apply(variables, batches[-1], is_training=False)
        want = reference.normalize(batches[-1], mean, variance, 0.0, None, 1e-3)
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-9)
        if kwargs["decay"] == 0.0:  # inference with this step's statistics is this step
            np.testing.assert_allclose(y, outputs[-1], rtol=0, atol=1e-9)
        # float32 parameters keep float32 statistics (promote_types(param_dtype, float32)).
        default = init_variables(jbn.BatchNorm(), batches[0])["batch_stats"]
        assert default["moving_mean"].dtype == jnp.float32


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

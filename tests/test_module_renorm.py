"""jbn.BatchNorm(renorm=True): batch renormalization as TF1 / Keras define it, against the paper's
formulas in float64 numpy (`reference.renorm_training`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jbn_testing import F32_TOL, init_variables, random_batches, train_steps, training_step

import jbn


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

"""jbn.fold_batch_norm: folded layer == layer followed by an eval-mode jbn.BatchNorm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jbn

EPSILON = 1e-3
# The folded layer rounds differently; outputs are O(1-10), so this is float32 round-off.
TOL = dict(rtol=1e-5, atol=5e-5)


def random_bn_variables(num_features, seed=0, center=True, scale=True):
    """Non-trivial statistics and parameters, as after training."""
    rng = np.random.default_rng(seed)
    batch_stats = {
        "moving_mean": rng.normal(0, 2, num_features).astype(np.float32),
        "moving_variance": rng.uniform(0.1, 5, num_features).astype(np.float32),
    }
    params = {}
    if center:
        params["beta"] = rng.normal(0, 1, num_features).astype(np.float32)
    if scale:
        params["gamma"] = rng.uniform(-2, 2, num_features).astype(np.float32)
    return {"params": params, "batch_stats": batch_stats}


def bn_eval(x, variables, data_format="NHWC", center=True, scale=True):
    module = jbn.BatchNorm(epsilon=EPSILON, center=center, scale=scale, data_format=data_format)
    # Jitted: compiling once is cheaper than dispatching each small op.
    return jax.jit(lambda v, x: module.apply(v, x, is_training=False))(variables, x)


def test_conv_nhwc_hwio():
    rng = np.random.default_rng(0)
    # numpy data and kernels: eager jax.random and flax init would dominate the run time.
    x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
    conv = nn.Conv(5, kernel_size=(3, 3), padding="SAME", use_bias=True)
    conv_params = {
        "kernel": rng.normal(0, 0.5, (3, 3, 3, 5)).astype(np.float32),  # HWIO
        "bias": np.linspace(-1, 1, 5, dtype=np.float32),
    }
    apply_conv = jax.jit(lambda params, x: conv.apply({"params": params}, x))
    bn = random_bn_variables(5)
    expected = bn_eval(apply_conv(conv_params, x), bn)
    kernel, bias = jbn.fold_batch_norm(
        conv_params["kernel"], conv_params["bias"], bn["batch_stats"], bn["params"], epsilon=EPSILON
    )
    assert kernel.shape == conv_params["kernel"].shape and bias.shape == (5,)
    folded = apply_conv({"kernel": kernel, "bias": bias}, x)
    np.testing.assert_allclose(folded, expected, **TOL)
    # Folding is not the identity: the check above can fail.
    assert not np.allclose(apply_conv(conv_params, x), expected, atol=0.1)


def test_conv_nchw_oihw():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 6, 5)).astype(np.float32)
    kernel = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)  # OIHW
    bias = np.array([0.5, -1.0, 0.0, 2.0], np.float32)
    dimension_numbers = ("NCHW", "OIHW", "NCHW")

    @jax.jit
    def conv(x, kernel, bias):
        y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dimension_numbers)
        return y + bias[None, :, None, None]

    bn = random_bn_variables(4, seed=1)
    expected = bn_eval(conv(x, kernel, bias), bn, data_format="NCHW")
    folded_kernel, folded_bias = jbn.fold_batch_norm(
        kernel, bias, bn["batch_stats"], bn["params"], epsilon=EPSILON, kernel_output_axis=0
    )
    np.testing.assert_allclose(conv(x, folded_kernel, folded_bias), expected, **TOL)


def test_dense_without_bias_and_batch_norm_without_affine():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 6)).astype(np.float32)
    dense_params = {"kernel": rng.normal(size=(6, 3)).astype(np.float32)}
    for center, scale in ((False, False), (True, False), (False, True)):
        bn = random_bn_variables(3, seed=2, center=center, scale=scale)
        expected = bn_eval(x @ dense_params["kernel"], bn, center=center, scale=scale)
        kernel, bias = jbn.fold_batch_norm(
            dense_params["kernel"], None, bn["batch_stats"], bn["params"], epsilon=EPSILON
        )
        folded = nn.Dense(3).apply({"params": {"kernel": kernel, "bias": bias}}, x)
        np.testing.assert_allclose(folded, expected, **TOL)


def test_against_float64_formula_and_after_training():
    """A BatchNorm trained for a few steps (renorm variables present) folds like numpy says."""
    x = np.random.default_rng(6).normal(3, 2, (16, 4)).astype(np.float32)
    module = jbn.BatchNorm(decay=0.5, scale=True, renorm=True, epsilon=EPSILON)
    variables = jax.jit(lambda x: module.init(jax.random.key(0), x, is_training=False))(x)
    step = jax.jit(lambda v, x: module.apply(v, x, is_training=True, mutable=["batch_stats"]))
    for shift in (0.0, 1.0):
        _, updates = step(variables, x + shift)
        variables = {**variables, **updates}
    kernel = np.random.default_rng(7).normal(size=(5, 4)).astype(np.float32)
    bias = np.arange(4, dtype=np.float32)
    stats = {k: np.asarray(v, np.float64) for k, v in variables["batch_stats"].items()}
    gamma = np.asarray(variables["params"]["gamma"], np.float64)
    beta = np.asarray(variables["params"]["beta"], np.float64)
    multiplier = gamma / np.sqrt(stats["moving_variance"] + EPSILON)
    folded_kernel, folded_bias = jbn.fold_batch_norm(
        kernel, bias, variables["batch_stats"], variables["params"], epsilon=EPSILON
    )
    np.testing.assert_allclose(folded_kernel, kernel * multiplier, rtol=1e-6)
    np.testing.assert_allclose(
        folded_bias, (bias - stats["moving_mean"]) * multiplier + beta, rtol=1e-6, atol=1e-6
    )
    assert folded_kernel.dtype == jnp.float32


def test_bad_arguments():
    bn = random_bn_variables(4)
    kernel = jnp.ones((3, 3, 2, 4))
    with pytest.raises(ValueError, match="kernel_output_axis"):
        jbn.fold_batch_norm(
            kernel, None, bn["batch_stats"], bn["params"], epsilon=EPSILON, kernel_output_axis=0
        )
    with pytest.raises(ValueError, match="moving_variance"):
        jbn.fold_batch_norm(
            kernel, None, {"moving_mean": jnp.zeros(4)}, bn["params"], epsilon=EPSILON
        )
    with pytest.raises(ValueError, match="scale"):
        jbn.fold_batch_norm(kernel, None, bn["batch_stats"], {"scale": jnp.ones(4)}, epsilon=1e-3)
    with pytest.raises(ValueError, match="epsilon"):
        jbn.fold_batch_norm(kernel, None, bn["batch_stats"], bn["params"], epsilon=0.0)


@pytest.mark.parametrize("layer", ["jbn", "flax"])
def test_inference_statistics_fold_either_batch_norm_as_its_eval_mode(layer):
    """jbn.BatchNorm and flax.linen.BatchNorm name their variables differently; folding with
    `batch_norm_inference_statistics` reproduces the eval-mode output of each (epsilon 0.5, so
    that a wrong epsilon shows)."""
    rng = np.random.default_rng(7)
    x = rng.normal(0, 1, (8, 3)).astype(np.float32)
    kernel = rng.normal(0, 1, (3, 4)).astype(np.float32)
    bias = rng.normal(0, 1, 4).astype(np.float32)
    variables = random_bn_variables(4, seed=3)
    if layer == "jbn":
        batch_norm = jbn.BatchNorm(epsilon=0.5, scale=True)  # (TF1 default: no gamma)
        apply = lambda v, z: batch_norm.apply(v, z, is_training=False)
    else:
        batch_norm = nn.BatchNorm(epsilon=0.5)
        stats, params = variables["batch_stats"], variables["params"]
        variables = {
            "params": {"scale": params["gamma"], "bias": params["beta"]},
            "batch_stats": {"mean": stats["moving_mean"], "var": stats["moving_variance"]},
        }
        apply = lambda v, z: batch_norm.apply(v, z, use_running_average=True)
    stats, affine, epsilon = jbn.batch_norm_inference_statistics(
        batch_norm, variables["params"], variables["batch_stats"]
    )
    folded_kernel, folded_bias = jbn.fold_batch_norm(kernel, bias, stats, affine, epsilon=epsilon)
    np.testing.assert_allclose(
        x @ folded_kernel + folded_bias, apply(variables, x @ kernel + bias), **TOL
    )

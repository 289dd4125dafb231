"""jbn.moments / jbn.weighted_moments against float64 numpy (`reference.moments`)."""

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from hypothesis import given, settings
from hypothesis import strategies as st

import jbn


@st.composite
def _array_and_axes(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6))
    x = draw(
        hnp.arrays(
            np.float32,
            shape,
            elements=st.floats(-100, 100, width=32, allow_nan=False, allow_infinity=False),
        )
    )
    axes = draw(
        st.lists(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape), unique=True)
    )
    negate = draw(st.booleans())
    axes = tuple(a - len(shape) if negate else a for a in axes)
    return x, axes


@settings(max_examples=25, deadline=None)
@given(_array_and_axes(), st.booleans())
def test_moments_match_float64(case, keepdims):
    x, axes = case
    mean, var = jbn.moments(x, axes, keepdims=keepdims)
    ref_mean, ref_var, _ = reference.moments(x, tuple(a % x.ndim for a in axes), keepdims=False)
    if keepdims:
        ref_mean = np.expand_dims(ref_mean, tuple(a % x.ndim for a in axes))
        ref_var = np.expand_dims(ref_var, tuple(a % x.ndim for a in axes))
    scale = np.max(np.abs(x)) + 1
    np.testing.assert_allclose(mean, ref_mean, atol=1e-5 * scale)
    np.testing.assert_allclose(var, ref_var, atol=1e-5 * scale**2)
    assert np.all(np.asarray(var) >= 0)


@settings(max_examples=20, deadline=None)
@given(_array_and_axes(), st.data())
def test_masked_and_weighted_moments_match_float64(case, data):
    x, axes = case
    axes = tuple(a % x.ndim for a in axes)
    mask = data.draw(hnp.arrays(np.bool_, x.shape))
    # At least one counted element per output, so the reference is defined.
    mask = mask | (np.arange(x.size).reshape(x.shape) == 0)
    mask = np.where(np.any(mask, axis=axes, keepdims=True), mask, True)
    weights = data.draw(
        hnp.arrays(np.float32, x.shape, elements=st.sampled_from([0.0, 0.5, 1.0, 3.0]))
    )
    weights = np.where(np.sum(weights, axis=axes, keepdims=True) > 0, weights, 1.0).astype(
        np.float32
    )
    # Padding may hold anything; it must not leak into the statistics.
    x_padded = np.where(mask, x, np.float32(np.nan))
    scale = np.max(np.abs(x)) + 1
    masked_reference = reference.moments(x, axes, mask, keepdims=False)[:2]
    for got, want in zip(jbn.moments(x_padded, axes, mask=mask), masked_reference):
        np.testing.assert_allclose(got, want, atol=1e-5 * scale**2)
    got = jbn.weighted_moments(x, axes, weights)
    for got_part, want_part in zip(got, reference.moments(x, axes, weights, keepdims=False)[:2]):
        np.testing.assert_allclose(got_part, want_part, atol=1e-5 * scale**2)


def test_large_offset_variance_is_accurate_where_flax_default_is_not():
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((256, 8, 8, 16))).astype(np.float32)
    ref_mean, ref_var, _ = reference.moments(x, (0, 1, 2), keepdims=False)
    mean, var = jax.jit(lambda x: jbn.moments(x, (0, 1, 2)))(x)
    np.testing.assert_allclose(var, ref_var, rtol=1e-3)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    # The same test would catch the one-pass formula flax uses by default.
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
    variables = bn.init(jax.random.key(0), x)
    _, updated = bn.apply(variables, x, mutable=["batch_stats"])
    flax_var = (updated["batch_stats"]["var"] - 0.9) / 0.1
    assert np.max(np.abs(flax_var - ref_var) / ref_var) > 1e-1


@pytest.mark.parametrize("offset", [0.0, 1.9, 3.0, 1e3, 1e4, 1e6])
def test_variance_across_offsets_and_never_negative(offset):
    rng = np.random.default_rng(1)
    x = (offset + rng.standard_normal((512, 32)) * 0.5).astype(np.float32)
    _, var = jbn.moments(x, 0)
    _, ref_var, _ = reference.moments(x, (0,), keepdims=False)
    np.testing.assert_allclose(var, ref_var, rtol=1e-3)
    constant = np.full((100, 3), offset + 0.1, np.float32)
    _, var = jbn.moments(constant, 0)
    assert np.all(np.asarray(var) >= 0)
    np.testing.assert_allclose(var, 0, atol=1e-6 * max(offset, 1) ** 2 * 1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_reduce_in_float32(dtype):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((64, 4, 4, 8)) * 3 + 100, dtype)
    mean, var = jbn.moments(x, (0, 1, 2))
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32
    exact = np.asarray(x.astype(jnp.float32))
    ref_mean, ref_var, _ = reference.moments(exact, (0, 1, 2), keepdims=False)
    # float32 accumulation of the exactly representable low-precision values.
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5)
    np.testing.assert_allclose(var, ref_var, rtol=1e-3)


def test_float64_inputs_keep_float64():
    with jax.enable_x64(True):
        x = np.random.default_rng(3).standard_normal((10, 3))
        mean, var = jbn.moments(x, 0)
        assert mean.dtype == jnp.float64
        np.testing.assert_allclose(var, x.var(0), rtol=1e-12)


def test_fully_masked_feature_gives_zero_statistics():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    mask = np.array([[True, False, True]] * 4)
    mean, var = jbn.moments(x, 0, mask=mask)
    np.testing.assert_allclose(mean, [4.5, 0.0, 6.5])
    np.testing.assert_allclose(var, [x[:, 0].var(), 0.0, x[:, 2].var()])


def test_vmap_over_ensemble_gives_per_member_statistics():
    x = np.random.default_rng(4).standard_normal((3, 16, 5)).astype(np.float32)
    x = x + np.arange(3, dtype=np.float32)[:, None, None] * 10
    mean, var = jax.vmap(lambda member: jbn.moments(member, 0))(x)
    for i in range(3):
        ref_mean, ref_var, _ = reference.moments(x[i], (0,), keepdims=False)
        np.testing.assert_allclose(mean[i], ref_mean, rtol=1e-5)
        np.testing.assert_allclose(var[i], ref_var, rtol=1e-4)


def test_vmap_with_axis_name_reduces_across_the_mapped_axis():
    x = np.random.default_rng(5).standard_normal((4, 6, 3)).astype(np.float32)
    weights = np.random.default_rng(6).integers(0, 3, (4, 6, 1)).astype(np.float32)
    weights[0] = 1
    mean, var = jax.vmap(lambda x, w: jbn.weighted_moments(x, 0, w, axis_name="b"), axis_name="b")(
        x, weights
    )
    ref_mean, ref_var, _ = reference.moments(
        x.reshape(24, 3), (0,), weights.reshape(24, 1), keepdims=False
    )
    for i in range(4):
        np.testing.assert_allclose(mean[i], ref_mean, rtol=1e-5)
        np.testing.assert_allclose(var[i], ref_var, rtol=1e-4)


def test_moments_under_jit_and_grad():
    x = np.random.default_rng(7).standard_normal((8, 3)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jbn.moments(x, 0)[1])))(x)
    # d var / dx = 2 (x - mean) / N
    np.testing.assert_allclose(grad, 2 * (x - x.mean(0)) / 8, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: jbn.moments(np.zeros((2, 3), np.int32), 0), TypeError, "x must have a floating"),
        (lambda: jbn.moments(np.zeros((2, 3)), 2), ValueError, "axes: axis 2 is out of range"),
        (lambda: jbn.moments(np.zeros((2, 3)), (0, -2)), ValueError, "duplicate axes"),
        (lambda: jbn.moments(np.zeros((2, 3)), 0, mask=np.ones((2, 3))), TypeError, "mask must be"),
        (
            lambda: jbn.moments(np.zeros((2, 3)), 0, mask=np.ones((3, 3), bool)),
            ValueError,
            "mask of shape",
        ),
        (
            lambda: jbn.moments(np.zeros((2, 3)), 0, axis_index_groups=[[0, 1]]),
            ValueError,
            "axis_index_groups requires axis_name",
        ),
        (
            lambda: jbn.moments(np.zeros((2, 3)), 0, axis_name="batch"),
            ValueError,
            "axis_name='batch' is not bound here",
        ),
        (
            lambda: jbn.weighted_moments(np.zeros((2, 3)), 0, np.ones((4,))),
            ValueError,
            "frequency_weights of shape",
        ),
    ],
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_errors_surface_at_trace_time():
    with pytest.raises(ValueError, match="axes"):
        jax.jit(lambda x: jbn.moments(x, 5)).lower(jnp.zeros((2, 3)))


def test_negative_frequency_weights():
    x = np.random.default_rng(0).standard_normal((6, 2)).astype(np.float32)
    weights = np.array([1.0, 2.0, -3.0, 1.0, 1.0, 1.0])[:, None]
    with pytest.raises(ValueError, match="frequency_weights must be non-negative"):
        jbn.weighted_moments(x, 0, weights)
    # Traced weights cannot be checked: the variance is still never negative.
    _, variance = jax.jit(lambda x, w: jbn.weighted_moments(x, 0, w))(x, weights)
    assert np.all(np.asarray(variance) >= 0)
    # Weights closed over by a jitted function are known: checked there too (a jnp comparison
    # inside the trace used to raise TracerBoolConversionError).
    with pytest.raises(ValueError, match="frequency_weights must be non-negative"):
        jax.jit(lambda x: jbn.weighted_moments(x, 0, weights))(x)
    valid = np.abs(weights)
    mean, variance = jax.jit(lambda x: jbn.weighted_moments(x, 0, valid))(x)
    expected_mean, expected_variance, _ = reference.moments(x, (0,), valid, keepdims=False)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5)
    np.testing.assert_allclose(variance, expected_variance, rtol=1e-5)

"""batch_normalization, fused_batch_norm and ghost_batch_norm against float64 numpy
(`reference.py`)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import jbn


def _composite_loss(x, scale, offset, r, *, axis, mask=None, epsilon=1e-3):
    reduce_axes = tuple(a for a in range(x.ndim) if a not in axis)
    mean, var = jbn.moments(x, reduce_axes, keepdims=True, mask=mask)
    shape = [1] * x.ndim
    for a in axis:
        shape[a] = x.shape[a]
    y = jbn.batch_normalization(
        x, mean, var, offset.reshape(shape), scale.reshape(shape), epsilon, mask=mask
    )
    return jnp.sum(jnp.sin(y) * r)


def _fused_loss(x, scale, offset, r, *, axis, mask=None, epsilon=1e-3):
    y, _, _ = jbn.fused_batch_norm(x, scale, offset, epsilon=epsilon, axis=axis, mask=mask)
    return jnp.sum(jnp.sin(y) * r)


CASES = [
    # (shape, feature axes, data offset)
    ((16, 6, 6, 8), (3,), 0.0),  # NHWC
    ((16, 8, 6, 6), (1,), 2.0),  # NCHW
    ((32, 5), (1,), -1.0),  # dense
    ((4, 3, 5, 7), (1, 3), 0.5),  # several feature axes
    ((16, 4, 4, 8), (3,), 1e3),  # ill conditioned: |mean| >> std
]


@pytest.mark.parametrize("shape, axis, offset", CASES)
def test_fused_forward_matches_float64(shape, axis, offset):
    rng = np.random.default_rng(0)
    x = (offset + rng.standard_normal(shape) * 2).astype(np.float32)
    feature_shape = tuple(shape[a] for a in axis)
    scale = rng.uniform(0.5, 2, feature_shape).astype(np.float32)
    offset_param = rng.standard_normal(feature_shape).astype(np.float32)
    y, mean, var = jax.jit(functools.partial(jbn.fused_batch_norm, epsilon=1e-3, axis=axis))(
        x, scale, offset_param
    )
    reduce_axes = tuple(a for a in range(len(shape)) if a not in axis)
    keep = [shape[a] if a in axis else 1 for a in range(len(shape))]
    ref_y, ref_mean, ref_var = reference.batch_norm(
        x, reduce_axes, offset_param.reshape(keep), scale.reshape(keep), 1e-3
    )
    np.testing.assert_allclose(y, ref_y, atol=2e-4 * max(1, abs(offset) / 100))
    np.testing.assert_allclose(mean, ref_mean.reshape(feature_shape), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(var, ref_var.reshape(feature_shape), rtol=1e-4)
    assert y.dtype == jnp.float32 and mean.shape == feature_shape


@pytest.mark.parametrize("shape, axis, offset", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_fused_gradient_equals_composite_autodiff(shape, axis, offset, masked):
    rng = np.random.default_rng(1)
    x = (offset + rng.standard_normal(shape) * 2).astype(np.float32)
    r = rng.standard_normal(shape).astype(np.float32)
    feature_shape = tuple(shape[a] for a in axis)
    scale = rng.uniform(0.5, 2, feature_shape).astype(np.float32)
    offset_param = rng.standard_normal(feature_shape).astype(np.float32)
    mask = None
    if masked:
        mask = rng.random((shape[0],) + (1,) * (len(shape) - 1)) > 0.4
        mask[0] = True
    grads = {}
    for name, fn in (("fused", _fused_loss), ("composite", _composite_loss)):
        loss = functools.partial(fn, r=r, axis=axis, mask=mask)
        grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, offset_param)
    for got, want in zip(grads["fused"], grads["composite"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))


def test_gradient_at_large_offset_matches_float64_finite_differences_free_formula():
    # The closed-form gradient in float64: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal((64, 16))).astype(np.float32)
    dy = rng.standard_normal((64, 16)).astype(np.float32)
    scale = rng.uniform(0.5, 2, 16).astype(np.float32)
    _, vjp = jax.vjp(lambda x: jbn.fused_batch_norm(x, scale, None)[0], x)
    (dx,) = vjp(dy)
    _, want, _, _ = reference.batch_norm_vjp(x, np.ones(len(x)), scale, 0.0, dy, 1e-3)
    np.testing.assert_allclose(dx, want, rtol=1e-3, atol=1e-3 * np.max(np.abs(want)))


@pytest.mark.parametrize("offset", [0.5, 1e3])
def test_forward_mode_and_hessian_match_composite(offset):
    rng = np.random.default_rng(3)
    x = (offset + rng.standard_normal((6, 4, 3))).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    scale = rng.uniform(0.5, 2, 3).astype(np.float32)
    beta = rng.standard_normal(3).astype(np.float32)
    fused = functools.partial(_fused_loss, r=r, axis=(2,))
    composite = functools.partial(_composite_loss, r=r, axis=(2,))
    tangent = rng.standard_normal(x.shape).astype(np.float32)
    _, jvp_fused = jax.jvp(lambda x: fused(x, scale, beta), (x,), (tangent,))
    _, jvp_composite = jax.jvp(lambda x: composite(x, scale, beta), (x,), (tangent,))
    np.testing.assert_allclose(jvp_fused, jvp_composite, rtol=1e-3)
    h_fused = jax.hessian(fused, argnums=1)(x, scale, beta)
    h_composite = jax.hessian(composite, argnums=1)(x, scale, beta)
    np.testing.assert_allclose(h_fused, h_composite, rtol=1e-3, atol=1e-3)
    jf = jax.jacfwd(fused)(x, scale, beta)
    jr = jax.jacrev(composite)(x, scale, beta)
    np.testing.assert_allclose(jf, jr, rtol=1e-3, atol=1e-3 * np.max(np.abs(jr)))


def test_statistics_and_derivatives_have_no_branch():
    # A `lax.cond` compiles (and traces) both branches: the train step's compile time pays for
    # both. The exactness the tests above check must come from branch-free formulas.
    x = np.random.default_rng(5).standard_normal((8, 4, 4, 3)).astype(np.float32)
    mask = np.arange(8)[:, None, None, None] < 6

    def loss(x):
        return jnp.sum(jnp.sin(jbn.fused_batch_norm(x, mask=mask)[0]))

    for jaxpr in (
        jax.make_jaxpr(jax.grad(loss))(x),
        jax.make_jaxpr(lambda x, t: jax.jvp(loss, (x,), (t,)))(x, x),
        jax.make_jaxpr(lambda x: jbn.moments(x, (0, 1, 2)))(x),
    ):
        assert " cond[" not in str(jaxpr)


def test_gradient_of_returned_statistics():
    # Losses may use the returned batch statistics too (e.g. a variance penalty).
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 4)).astype(np.float32)

    def fused(x):
        y, mean, var = jbn.fused_batch_norm(x)
        return jnp.sum(y[:2]) + jnp.sum(mean**2) + jnp.sum(jnp.sqrt(var))

    def composite(x):
        mean, var = jbn.moments(x, 0)
        y = jbn.batch_normalization(x, mean, var, None, None, 1e-3)
        return jnp.sum(y[:2]) + jnp.sum(mean**2) + jnp.sum(jnp.sqrt(var))

    np.testing.assert_allclose(jax.grad(fused)(x), jax.grad(composite)(x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_statistics_in_float32_output_in_input_dtype(dtype):
    rng = np.random.default_rng(5)
    x = jnp.asarray(1e3 + rng.standard_normal((32, 4, 4, 8)), dtype)
    y, mean, var = jbn.fused_batch_norm(x, jnp.ones(8, dtype), jnp.zeros(8, dtype))
    assert y.dtype == dtype and mean.dtype == jnp.float32 and var.dtype == jnp.float32
    assert not np.any(np.isnan(np.asarray(y, np.float32)))
    ref_y, _, ref_var = reference.batch_norm(np.asarray(x, np.float32), (0, 1, 2), None, None, 1e-3)
    np.testing.assert_allclose(var, ref_var.reshape(8), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref_y, atol=0.05)
    grad = jax.grad(lambda x: jnp.sum(jbn.fused_batch_norm(x)[0].astype(jnp.float32) ** 2))(x)
    assert grad.dtype == dtype


def test_batch_normalization_matches_formula_and_broadcasts():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    mean = rng.standard_normal((3, 1)).astype(np.float32)
    var = rng.uniform(0.1, 2, (3, 1)).astype(np.float32)
    scale = rng.standard_normal((3, 1)).astype(np.float32)
    y = jbn.batch_normalization(x, mean, var, None, scale, 0.01)
    want = reference.normalize(x, mean, var, None, scale, 0.01)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    y = jbn.batch_normalization(x, mean, var, 1.5, None, 0.01)
    want = reference.normalize(x, mean, var, 1.5, None, 0.01)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_ghost_batch_norm_normalizes_each_virtual_batch():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((12, 3, 4)) + np.arange(12)[:, None, None]).astype(np.float32)
    scale = rng.uniform(0.5, 2, 4).astype(np.float32)
    y, mean, var = jbn.ghost_batch_norm(x, scale, None, virtual_batch_size=4)
    assert mean.shape == (3, 4) and var.shape == (3, 4)
    for g in range(3):
        chunk = x[4 * g : 4 * g + 4]
        ref_y, ref_mean, ref_var = reference.batch_norm(chunk, (0, 1), None, scale, 1e-3)
        np.testing.assert_allclose(y[4 * g : 4 * g + 4], ref_y, atol=1e-4)
        np.testing.assert_allclose(mean[g], ref_mean.reshape(4), rtol=1e-5)
        np.testing.assert_allclose(var[g], ref_var.reshape(4), rtol=1e-4)


def test_vmap_over_ensemble_members():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 16, 4)).astype(np.float32) * np.array([1, 5, 20])[:, None, None]
    scale = rng.uniform(0.5, 2, (3, 4)).astype(np.float32)
    y, mean, _ = jax.vmap(lambda x, s: jbn.fused_batch_norm(x, s, None))(x, scale)
    for i in range(3):
        ref_y, ref_mean, _ = reference.batch_norm(x[i], (0,), None, scale[i], 1e-3)
        np.testing.assert_allclose(y[i], ref_y, atol=1e-4)
        np.testing.assert_allclose(mean[i], ref_mean.reshape(4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: jbn.fused_batch_norm(np.zeros((4, 3), np.int32)), TypeError, "x must have"),
        (lambda: jbn.fused_batch_norm(np.zeros((4, 3)), axis=2), ValueError, "axis: axis 2"),
        (lambda: jbn.fused_batch_norm(np.zeros((4, 3)), axis=(1, -1)), ValueError, "duplicate"),
        (lambda: jbn.fused_batch_norm(np.zeros((4, 3)), epsilon=0.0), ValueError, "epsilon"),
        (lambda: jbn.fused_batch_norm(np.zeros((4, 3)), epsilon=-1e-3), ValueError, "epsilon"),
        (lambda: jbn.fused_batch_norm(np.zeros((4, 3)), np.ones(4)), ValueError, "scale must"),
        (lambda: jbn.fused_batch_norm(np.zeros((3,))), ValueError, "no axis left"),
        (
            lambda: jbn.fused_batch_norm(np.zeros((4, 3)), axis_index_groups=[[0]]),
            ValueError,
            "axis_index_groups requires axis_name",
        ),
        (
            lambda: jbn.batch_normalization(np.zeros((4, 3)), np.zeros(4), 1.0, None, None, 1e-3),
            ValueError,
            "mean of shape",
        ),
        (
            lambda: jbn.batch_normalization(np.zeros((4, 3)), 0.0, np.ones(2), None, None, 1e-3),
            ValueError,
            "variance of shape",
        ),
        (
            lambda: jbn.batch_normalization(np.zeros((4, 3)), 0.0, 1.0, None, None, 0),
            ValueError,
            "variance_epsilon",
        ),
        (
            lambda: jbn.ghost_batch_norm(np.zeros((6, 3)), virtual_batch_size=4),
            ValueError,
            "not divisible by virtual_batch_size=4",
        ),
        (
            lambda: jbn.ghost_batch_norm(np.zeros((6, 4, 3)), virtual_batch_size=2, axis=(0, 2)),
            ValueError,
            "axis must not include 0 with virtual_batch_size",
        ),
        (
            lambda: jbn.ghost_batch_norm(np.zeros((6, 3)), virtual_batch_size=0),
            ValueError,
            "virtual_batch_size must be a positive int",
        ),
    ],
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_epsilon_none_or_traced_is_named():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match="epsilon"):
        jbn.fused_batch_norm(x, epsilon=None)
    with pytest.raises(TypeError, match="epsilon must be a static Python float"):
        jax.jit(lambda x, eps: jbn.fused_batch_norm(x, epsilon=eps))(x, 1e-3)
    with pytest.raises(TypeError, match="epsilon must be a static Python float"):
        jax.jit(lambda x, eps: jbn.ghost_batch_norm(x, virtual_batch_size=2, epsilon=eps))(x, 1e-3)
    with pytest.raises(TypeError, match="variance_epsilon"):
        jbn.batch_normalization(x, 0.0, 1.0, None, None, None)


@pytest.mark.parametrize("name", ["mean", "variance", "offset", "scale"])
def test_complex_statistics_or_parameters_are_refused(name):
    x = np.ones((4, 3), np.float32)
    arguments = {"mean": np.zeros(3), "variance": np.ones(3), "offset": None, "scale": None}
    arguments[name] = np.full(3, 1 + 2j)
    with pytest.raises(TypeError, match=f"{name} must be real"):
        jbn.batch_normalization(x, variance_epsilon=1e-3, **arguments)


def test_ghost_batch_norm_accepts_numpy_integers():
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    y, mean, var = jbn.ghost_batch_norm(x, virtual_batch_size=np.int64(4))
    want, want_mean, want_var = reference.batch_norm(x.reshape(2, 4, 3), 1, None, None, 1e-3)
    np.testing.assert_allclose(y, want.reshape(x.shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, want_mean[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, want_var[:, 0], rtol=1e-5)


def test_counts_are_handed_back_on_request():
    x = np.random.default_rng(0).standard_normal((8, 2, 3)).astype(np.float32)
    mask = np.ones((8, 2, 3), bool)
    mask[:3, :, 0] = False
    *_, count = jbn.fused_batch_norm(x, mask=mask, return_count=True)
    np.testing.assert_array_equal(count, mask.sum((0, 1)))
    *_, count = jbn.ghost_batch_norm(x, virtual_batch_size=4, mask=mask, return_count=True)
    np.testing.assert_array_equal(count, mask.reshape(2, 4, 2, 3).sum((1, 2)))
    outputs = jbn.batch_renorm(x, None, None, np.zeros(3), np.ones(3), mask=mask, return_count=True)
    np.testing.assert_array_equal(outputs[3], mask.sum((0, 1)))
    assert len(jbn.fused_batch_norm(x)) == 3  # the documented return value is unchanged


# Training ops and an input of one value per feature. Renorm is clipped to r = 1, d = 0, that
# is to batch norm, so that all three compare with the same reference.
RENORM_AS_BATCH_NORM = dict(rmax=1.0, rmin=1.0, dmax=0.0)
ONE_VALUE_PER_FEATURE = {
    "fused": (lambda x, **kw: jbn.fused_batch_norm(x, **kw), (1, 4)),
    "fused_nchw": (lambda x, **kw: jbn.fused_batch_norm(x, axis=1, **kw), (1, 4, 1, 1)),
    "renorm": (
        lambda x, **kw: jbn.batch_renorm(
            x, None, None, np.zeros(4), np.ones(4), **RENORM_AS_BATCH_NORM, **kw
        ),
        (1, 4),
    ),
}


@pytest.mark.parametrize("op", sorted(ONE_VALUE_PER_FEATURE))
def test_training_on_one_value_per_feature_is_refused_unless_axis_name_brings_the_batch(op):
    # PyTorch: "Expected more than 1 value per channel when training"; the output would be all
    # offset and the batch variance 0.
    call, shape = ONE_VALUE_PER_FEATURE[op]
    with pytest.raises(ValueError, match=re.escape(f"x of shape {shape} has one (feature axes")):
        jax.jit(call)(np.ones(shape, np.float32))
    # Per-example inputs whose batch comes from vmap's axis: the global batch of 6 counts.
    x = np.random.default_rng(0).normal(2.0, 1.5, (6, *shape)).astype(np.float32)
    y, mean, variance = jax.vmap(lambda x: call(x, axis_name="batch"), axis_name="batch")(x)
    feature_axis = len(shape) - 1 if op != "fused_nchw" else 1
    rows = np.moveaxis(x, feature_axis + 1, -1).reshape(-1, 4)
    want, want_mean, want_variance = reference.batch_norm(rows, 0, None, None, 1e-3)
    np.testing.assert_allclose(
        np.moveaxis(y, feature_axis + 1, -1).reshape(-1, 4), want, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(mean[0], want_mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(variance[0], want_variance.ravel(), rtol=1e-5)


def test_ghost_batches_of_one_value_per_feature_are_refused_but_masks_are_the_callers_business():
    with pytest.raises(
        ValueError, match=re.escape("x of shape (4, 3) has one per ghost batch of virtual_batch")
    ):
        jbn.ghost_batch_norm(np.ones((4, 3), np.float32), virtual_batch_size=1)
    # Spatial positions count: one example of 2x2 pixels is a batch of 4 values per channel.
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 3)).astype(np.float32)
    _, mean, _ = jbn.ghost_batch_norm(x, virtual_batch_size=1)
    np.testing.assert_allclose(mean[0], reference.moments(x, (0, 1, 2))[0].ravel(), rtol=1e-5)
    # A mask that leaves one counted value is not checked (it may be traced): documented.
    mask = np.array([True, False, False, False])[:, None]
    _, _, variance = jbn.fused_batch_norm(np.ones((4, 3), np.float32), mask=mask)
    np.testing.assert_array_equal(variance, np.zeros(3))

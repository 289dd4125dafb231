"""Per-example inputs whose batch is a named axis: the core under `jax.vmap(..., axis_name=...)`
against float64 numpy statistics and gradients of the whole batch (`reference.py`).

Each call sees one example, `(C,)` or `(C, H, W)` with the features first, so nothing or only
the spatial axes are reduced locally; the named axis supplies the batch (haiku's cross-replica
tests and Equinox's layers work this way). Multi-device versions: tests/multidevice/
test_per_example_multidevice.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import jbn

EPSILON = 1e-3


def _batch(shape, seed=0, loc=3.0, spread=2.0):
    return (loc + spread * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _per_example(fn, axis_name="batch"):
    """`fn` mapped over axis 0 of its arguments; feature-shaped outputs come back unbatched."""
    return jax.vmap(fn, axis_name=axis_name)


def test_fused_batch_norm_per_example_equals_the_whole_batch():
    x = _batch((16, 5))
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.5, 2, 5).astype(np.float32)
    offset = rng.standard_normal(5).astype(np.float32)
    y, mean, variance, count = _per_example(
        lambda xi: jbn.fused_batch_norm(
            xi, scale, offset, axis=0, axis_name="batch", epsilon=EPSILON, return_count=True
        )
    )(x)
    ref_y, ref_mean, ref_var = reference.batch_norm(x, 0, offset, scale, EPSILON)
    np.testing.assert_allclose(y, ref_y, atol=2e-5)
    # Every example holds the statistics of the whole batch.
    for row in range(16):
        np.testing.assert_allclose(mean[row], ref_mean.ravel(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(variance[row], ref_var.ravel(), rtol=1e-5)
        np.testing.assert_allclose(count[row], 16)


def test_per_example_needs_axis_name():
    with pytest.raises(ValueError, match=r"no axis left.*axis_name"):
        jax.vmap(lambda xi: jbn.fused_batch_norm(xi, axis=0))(_batch((4, 3)))


def test_masked_per_example_ignores_padding_whatever_it_holds():
    x = _batch((10, 3))
    counted = np.arange(10) < 6
    x[~counted] = np.nan
    scale = np.array([1.0, 2.0, 0.5], np.float32)
    dy = np.random.default_rng(3).standard_normal((10, 3)).astype(np.float32)

    def loss(x, scale):
        y, mean, variance = _per_example(
            lambda xi, mi: jbn.fused_batch_norm(
                xi, scale, None, axis=0, axis_name="batch", mask=mi, epsilon=EPSILON
            )
        )(x, counted)
        return jnp.sum(jnp.where(counted[:, None], y * dy, 0)), (y, mean, variance)

    (_, (y, mean, variance)), (dx, dscale) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        x, scale
    )
    ref_y, ref_dx, ref_dscale, _ = reference.batch_norm_vjp(
        x, counted.astype(np.float64), scale, 0.0, dy, EPSILON
    )
    ref_mean, ref_var, _ = reference.moments(x, 0, counted[:, None], keepdims=False)
    np.testing.assert_allclose(mean[0], ref_mean, rtol=1e-6)
    np.testing.assert_allclose(variance[0], ref_var, rtol=1e-5)
    np.testing.assert_allclose(y[counted], ref_y[counted], atol=2e-5)
    np.testing.assert_allclose(dx[counted], ref_dx[counted], atol=1e-4)
    np.testing.assert_allclose(dscale, ref_dscale, rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(dscale))


def _rows(a):
    """(B, C, ...) -> (B * ..., C): one row per counted element, as `reference` takes them."""
    return np.moveaxis(np.asarray(a), 1, -1).reshape(-1, a.shape[1])


# (C, H, W) examples (the spatial axes reduced locally) already worked outside jit.
@pytest.mark.parametrize(
    "shape, jit_inside", [((16, 4), False), ((16, 4), True), ((6, 4, 3, 2), True)]
)
def test_gradients_per_example_equal_the_whole_batch(shape, jit_inside):
    """grad(vmap(...)), and grad(jit(vmap(...))): under jit the fused op's derivative rule is
    traced only when differentiated, after vmap has unbound its axis name."""
    x = _batch(shape)
    scale = np.array([1.0, 2.0, 0.5, 1.5], np.float32)
    offset = np.array([0.0, 1.0, -1.0, 2.0], np.float32)
    dy = np.random.default_rng(4).standard_normal(shape).astype(np.float32)

    def loss(x, scale, offset):
        y, _, _ = _per_example(
            lambda xi: jbn.fused_batch_norm(
                xi, scale, offset, axis=0, axis_name="batch", epsilon=EPSILON
            )
        )(x)
        return jnp.sum(y * dy)

    dx, dscale, doffset = jax.grad(jax.jit(loss) if jit_inside else loss, (0, 1, 2))(
        x, scale, offset
    )
    rows = _rows(x)
    _, ref_dx, ref_dscale, ref_doffset = reference.batch_norm_vjp(
        rows, np.ones(len(rows)), scale, offset, _rows(dy), EPSILON
    )
    np.testing.assert_allclose(_rows(dx), ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dscale, ref_dscale, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(doffset, ref_doffset, rtol=1e-4, atol=1e-4)


def test_two_named_axes_reduce_over_both():
    """vmap inside vmap, statistics over both named axes (equinox#707's double vmap)."""
    x = _batch((3, 5, 4))
    inner = jax.vmap(
        lambda xi: jbn.fused_batch_norm(xi, axis=0, axis_name=("outer", "inner"))[:2],
        axis_name="inner",
    )
    y, mean = jax.vmap(inner, axis_name="outer")(x)
    ref_y, ref_mean, _ = reference.batch_norm(x.reshape(15, 4), 0, None, None, 1e-3)
    np.testing.assert_allclose(y.reshape(15, 4), ref_y, atol=2e-5)
    np.testing.assert_allclose(mean[1, 2], ref_mean.ravel(), rtol=1e-6)

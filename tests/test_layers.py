"""train/layers.py against XLA's own layers (flax.linen.max_pool, lax.conv_general_dilated).

Values and reverse-mode gradients must be equal (same arithmetic, so equal to the last bit),
ties included; forward mode is checked against a float64 numpy reference of the derivative.
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from configs import default
from train import layers, models, xla_options

# (input shape, window, padding): even and odd sizes (28 -> 14 -> 7 -> 4 is the network's SAME
# case), VALID cropping, a 3x3 window whose SAME padding splits low and high, two batch axes.
POOL_CASES = [
    ((3, 8, 8, 5), (2, 2), "SAME"),
    ((3, 7, 7, 5), (2, 2), "SAME"),
    ((3, 7, 6, 5), (2, 2), "VALID"),
    ((2, 8, 7, 3), (3, 3), "SAME"),
    ((2, 3, 7, 9, 4), (3, 2), "SAME"),
]


def tied_inputs(shape, seed=0):
    """Small integers: most windows have several maximal elements."""
    return np.random.default_rng(seed).integers(0, 3, shape).astype(np.float32)


def reference_pool_and_tangent(x, tangent, window, padding):
    """float64 numpy max pool and its derivative: the tangent of the first maximal element of
    each window in row-major order (XLA's choice on ties); padding never wins."""
    first = x.ndim - len(window) - 1
    spatial = x.shape[first:-1]
    if padding == "VALID":
        out_sizes = [s // k for s, k in zip(spatial, window)]
        low = [0] * len(window)
    else:
        out_sizes = [-(-s // k) for s, k in zip(spatial, window)]
        low = [(o * k - s) // 2 for o, k, s in zip(out_sizes, window, spatial)]
    values = np.empty((*x.shape[:first], *out_sizes, x.shape[-1]))
    tangents = np.empty_like(values)
    for out_index in itertools.product(*map(range, out_sizes)):
        best = best_tangent = None
        for offset in itertools.product(*map(range, window)):
            index = [o * k + d - lo for o, k, d, lo in zip(out_index, window, offset, low)]
            if not all(0 <= i < s for i, s in zip(index, spatial)):
                continue
            where = (Ellipsis, *index, slice(None))
            value, value_tangent = x[where].astype(np.float64), tangent[where].astype(np.float64)
            if best is None:
                best, best_tangent = value, value_tangent
            else:
                take = value > best  # strictly: an earlier maximum keeps its place
                best = np.where(take, value, best)
                best_tangent = np.where(take, value_tangent, best_tangent)
        values[(Ellipsis, *out_index, slice(None))] = best
        tangents[(Ellipsis, *out_index, slice(None))] = best_tangent
    return values, tangents


def pool_fn(pool, window, padding):
    return functools.partial(pool, window_shape=window, strides=window, padding=padding)


@pytest.mark.parametrize("shape,window,padding", POOL_CASES)
def test_max_pool_values_and_gradients_equal_flax_with_ties(shape, window, padding):
    x = tied_inputs(shape)
    fast, plain = pool_fn(layers.max_pool, window, padding), pool_fn(nn.max_pool, window, padding)
    cotangent = np.random.default_rng(1).standard_normal(plain(x).shape).astype(np.float32)
    loss = lambda pool: jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * cotangent)))
    np.testing.assert_array_equal(jax.jit(fast)(x), jax.jit(plain)(x))
    np.testing.assert_array_equal(loss(fast)(x), loss(plain)(x))


@pytest.mark.parametrize("shape,window,padding", POOL_CASES)
def test_max_pool_forward_mode_matches_reference_with_ties(shape, window, padding):
    x = tied_inputs(shape)
    tangent = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    fast = pool_fn(layers.max_pool, window, padding)
    values, tangents = jax.jit(lambda x, t: jax.jvp(fast, (x,), (t,)))(x, tangent)
    expected_values, expected_tangents = reference_pool_and_tangent(x, tangent, window, padding)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(tangents, expected_tangents)


def test_max_pool_forward_mode_equals_xla_without_ties():
    # XLA's forward mode breaks ties in padded windows its own way; without ties it is defined.
    shape, window = (3, 7, 7, 5), (2, 2)
    x, tangent = np.random.default_rng(3).standard_normal((2, *shape)).astype(np.float32)
    jvp = lambda pool: jax.jvp(pool_fn(pool, window, "SAME"), (x,), (tangent,))
    for fast, plain in zip(jvp(layers.max_pool), jvp(nn.max_pool)):
        np.testing.assert_array_equal(fast, plain)


def test_max_pool_takes_the_fast_path_and_falls_back_otherwise():
    x = tied_inputs((2, 7, 7, 3))
    grad_jaxpr = lambda pool: str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(pool(x))))(x))
    # The fast path's derivative has no reduce-window (select_and_scatter) at all.
    assert "select_and" not in grad_jaxpr(pool_fn(layers.max_pool, (2, 2), "SAME"))
    assert "select_and" in grad_jaxpr(pool_fn(nn.max_pool, (2, 2), "SAME"))
    # Overlapping windows, explicit padding and integers are flax's pool, unchanged.
    for window, strides, padding, dtype in [
        ((3, 3), (2, 2), "SAME", np.float32),
        ((2, 2), (2, 2), ((0, 1), (0, 1)), np.float32),
        ((2, 2), (2, 2), "SAME", np.int32),
    ]:
        xs = x.astype(dtype)
        np.testing.assert_array_equal(
            layers.max_pool(xs, window, strides, padding), nn.max_pool(xs, window, strides, padding)
        )


CONV_CASES = [
    ((4, 9, 9, 3), (3, 3, 3, 8), "SAME"),
    ((4, 8, 7, 6), (3, 3, 6, 5), "VALID"),
    ((2, 6, 6, 4), (2, 3, 4, 4), ((1, 0), (2, 1))),
    ((2, 5, 5, 4), (1, 1, 4, 3), "SAME"),
]
# The network's second layer at batch 8: wide enough for XLA's YNNPACK convolutions.
NETWORK_CONV_CASE = ((8, 16, 16, 64), (3, 3, 64, 64), "SAME")
# XLA's default convolutions (YNNPACK) and the training's (config.cpu_convolutions='eigen').
COMPILER_OPTIONS = {
    choice: xla_options.compiler_options(choice, "cpu") for choice in xla_options.CPU_CONVOLUTIONS
}
NHWC = ("NHWC", "HWIO", "NHWC")


def conv_inputs(x_shape, kernel_shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    kernel = rng.standard_normal(kernel_shape).astype(np.float32)
    return x, kernel


def conv_fn(conv, padding, **kwargs):
    return lambda x, kernel: conv(x, kernel, (1, 1), padding, dimension_numbers=NHWC, **kwargs)


@pytest.mark.parametrize("cpu_convolutions", COMPILER_OPTIONS)
@pytest.mark.parametrize("x_shape,kernel_shape,padding", [*CONV_CASES, NETWORK_CONV_CASE])
def test_conv_values_and_gradients_equal_lax(x_shape, kernel_shape, padding, cpu_convolutions):
    x, kernel = conv_inputs(x_shape, kernel_shape)
    fast = conv_fn(layers.conv_general_dilated, padding)
    plain = conv_fn(lax.conv_general_dilated, padding)
    cotangent = np.random.default_rng(1).standard_normal(plain(x, kernel).shape).astype(np.float32)
    jit = functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS[cpu_convolutions])
    grads = lambda conv: jit(
        jax.grad(lambda x, k: jnp.sum(conv(x, k) * cotangent), argnums=(0, 1))
    )(x, kernel)
    np.testing.assert_array_equal(jit(fast)(x, kernel), jit(plain)(x, kernel))
    for fast_grad, plain_grad in zip(grads(fast), grads(plain)):
        np.testing.assert_array_equal(fast_grad, plain_grad)


@pytest.mark.parametrize("x_shape,kernel_shape,padding", CONV_CASES)
def test_conv_forward_mode_matches_float64_reference(x_shape, kernel_shape, padding):
    x, kernel = conv_inputs(x_shape, kernel_shape)
    x_tangent, kernel_tangent = conv_inputs(x_shape, kernel_shape, seed=1)
    fast = conv_fn(layers.conv_general_dilated, padding)
    _, tangent = jax.jvp(fast, (x, kernel), (x_tangent, kernel_tangent))
    # Bilinear: the tangent is conv(x_dot, k) + conv(x, k_dot), here in float64 numpy.
    reference = conv_fn(lambda *a, **k: np.asarray(lax.conv_general_dilated(*a, **k)), padding)
    with jax.enable_x64():
        as64 = lambda a: jnp.asarray(a, jnp.float64)
        expected = reference(as64(x_tangent), as64(kernel)) + reference(
            as64(x), as64(kernel_tangent)
        )
    np.testing.assert_allclose(tangent, expected, rtol=1e-5, atol=1e-5)
    # Only the kernel's tangent (the images' is a symbolic zero in the network).
    _, kernel_only = jax.jvp(lambda k: fast(x, k), (kernel,), (kernel_tangent,))
    with jax.enable_x64():
        expected = reference(as64(x), as64(kernel_tangent))
    np.testing.assert_allclose(kernel_only, expected, rtol=1e-5, atol=1e-5)


def test_conv_gradients_inside_scan_equal_lax_outside():
    # Inside lax.scan XLA:CPU runs its own gradients on other code paths, with other round-off;
    # the fast ones are the same inside and outside, equal to XLA's single steps.
    x, kernel = conv_inputs((4, 8, 8, 6), (3, 3, 6, 6))

    def descend(conv, scan: bool):
        loss = lambda xk: jnp.sum(conv(*xk) ** 2)
        step = lambda xk, _: (jax.tree.map(lambda v, g: v - 1e-3 * g, xk, jax.grad(loss)(xk)), None)
        if scan:
            return jax.jit(lambda xk: lax.scan(step, xk, None, length=3)[0])((x, kernel))
        return jax.jit(lambda xk: step(step(step(xk, None)[0], None)[0], None)[0])((x, kernel))

    fast = conv_fn(layers.conv_general_dilated, "SAME")
    plain = conv_fn(lax.conv_general_dilated, "SAME")
    for fast_value, plain_value in zip(descend(fast, scan=True), descend(plain, scan=False)):
        np.testing.assert_array_equal(fast_value, plain_value)
    for scanned, single in zip(descend(plain, scan=True), descend(plain, scan=False)):
        np.testing.assert_allclose(scanned, single, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(window_strides=(2, 2)),
        dict(rhs_dilation=(2, 2)),
        dict(lhs_dilation=(2, 1), padding=((1, 1), (1, 1))),
        dict(dimension_numbers=("NHWC", "OIHW", "NHWC")),
        dict(feature_group_count=4),
    ],
)
def test_conv_falls_back_for_other_convolutions(kwargs):
    # A wrongly taken fast path would give other shapes or values (it assumes all of these).
    x, kernel = conv_inputs((2, 9, 9, 4), (3, 3, 4, 4))
    if "feature_group_count" in kwargs:
        kernel = kernel[:, :, :1]
    if kwargs.get("dimension_numbers"):
        kernel = np.transpose(kernel, (3, 2, 0, 1))
    kwargs = {"window_strides": (1, 1), "padding": "SAME", "dimension_numbers": NHWC, **kwargs}
    grads = lambda conv: jax.grad(lambda k: jnp.sum(conv(x, k, **kwargs) ** 2))(kernel)
    np.testing.assert_array_equal(
        layers.conv_general_dilated(x, kernel, **kwargs),
        lax.conv_general_dilated(x, kernel, **kwargs),
    )
    np.testing.assert_array_equal(
        grads(layers.conv_general_dilated), grads(lax.conv_general_dilated)
    )


def network_loss(fast_layers: bool, image_shape):
    config = default.get_config().model
    config.fast_layers = fast_layers
    model = models.create_model(config, num_classes=10)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, *image_shape)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    variables = model.init(jax.random.key(0, impl="rbg"), images[:1], is_training=False)

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            is_training=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss, variables["params"]


@pytest.mark.parametrize("image_shape", [(32, 32, 3), (28, 28, 1)])
def test_network_gradients_equal_flax_layers(image_shape):
    # ReLU makes whole pooling windows 0: ties in every layer.
    fast_loss, params = network_loss(True, image_shape)
    plain_loss, _ = network_loss(False, image_shape)
    fast_grads = jax.jit(jax.grad(fast_loss))(params)
    plain_grads = jax.jit(jax.grad(plain_loss))(params)
    # Float32 round-off apart: XLA fuses batch norm's backward pass with its neighbours
    # differently around the two kinds of layers (the layers' own gradients are bitwise equal to
    # lax's, tests above). Kernel gradients off by 1e-4 (relative) fail here.
    equal_to_round_off = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    jax.tree.map(equal_to_round_off, fast_grads, plain_grads)
    # Forward mode through the whole network (batch norm's custom_jvp, the pools, the convs).
    tangent = jax.tree.map(jnp.ones_like, params)
    fast_value, fast_tangent = jax.jit(lambda p, t: jax.jvp(fast_loss, (p,), (t,)))(params, tangent)
    plain_value, plain_tangent = jax.jit(lambda p, t: jax.jvp(plain_loss, (p,), (t,)))(
        params, tangent
    )
    np.testing.assert_array_equal(fast_value, plain_value)
    # The directional derivative is the gradient's inner product with the tangent.
    np.testing.assert_allclose(fast_tangent, plain_tangent, rtol=1e-5)
    inner = sum(jnp.sum(g) for g in jax.tree.leaves(plain_grads))
    np.testing.assert_allclose(fast_tangent, inner, rtol=1e-4)

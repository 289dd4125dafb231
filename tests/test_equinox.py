"""`jbn.equinox.BatchNorm` against float64 numpy (`reference.py`) and against the expectations of
Equinox's own `test_batch_norm` (equinox tests/test_nn.py) where the semantics agree.

Each of `eqx.nn.BatchNorm`'s known problems has a test showing it does not occur here: EMA-mixed
training statistics (equinox#659), a running variance starting at 0 (#955), nested vmaps
(#707), higher-rank inputs (#592), statistics in the input's dtype, and the inference variance
inflated by m^t / (1 - m^t) in its "batch" mode. Several devices: tests/multidevice/
test_per_example_multidevice.py.
"""

import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jbn_testing import F32_TOL, random_batches

import jbn.equinox

EPSILON = 1e-5  # the layer's default, as Equinox's


def _make(*args, **kwargs):
    return eqx.nn.make_with_state(jbn.equinox.BatchNorm)(*args, **kwargs)


def _batched(bn, axis_name="batch"):
    """The layer over a batch: examples along axis 0, one state for all."""
    return jax.vmap(bn, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


def _statistics(bn, state):
    return state.get(bn.state_index)


def _reference_training(x, gamma=None, beta=None):
    """float64 training output and statistics of a batch `(B, C, ...)`."""
    axes = (0, *range(2, x.ndim))
    keep = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    as_keep = lambda v: None if v is None else np.reshape(v, keep)
    y, mean, variance = reference.batch_norm(x, axes, as_keep(beta), as_keep(gamma), EPSILON)
    return y, mean.ravel(), variance.ravel()


def _reference_inference(x, mean, variance):
    keep = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    return reference.normalize(x, mean.reshape(keep), variance.reshape(keep), None, None, EPSILON)


def test_importing_jbn_does_not_import_equinox():
    code = "import sys, jbn; assert 'equinox' not in sys.modules, 'jbn imported equinox'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------ Equinox's test_batch_norm, ported


def test_equinox_test_batch_norm_expectations():
    """Equinox's `test_batch_norm` ("batch" mode), step by step; one difference: without a
    bound axis name it raises ValueError (saying what to do), where Equinox raises NameError."""
    rng = np.random.default_rng(0)
    x0 = rng.uniform(size=(5,)).astype(np.float32)
    x1, x2, x3 = (
        rng.uniform(size=s).astype(np.float32) for s in [(10, 5), (10, 5, 6), (10, 5, 7, 8)]
    )

    bn, state = _make(5, "batch")
    for x in (x1, x2, x3):
        out, state = _batched(bn)(x, state)
        assert out.shape == x.shape
        assert _statistics(bn, state).mean.shape == (5,)
        assert _statistics(bn, state).variance.shape == (5,)

    with pytest.raises(ValueError, match="not bound"):
        jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(x1, state)
    with pytest.raises(ValueError, match="not bound"):
        bn(x0, state)

    # Inside another vmap without an axis name: one state per outer element.
    out, state_outer = jax.vmap(
        jax.vmap(bn, axis_name="batch", in_axes=(1, None), out_axes=(1, None)),
        in_axes=(0, None),
    )(x2, state)
    assert out.shape == x2.shape
    assert _statistics(bn, state_outer).mean.shape == (10, 5)

    # Several axis names.
    vvbn, vvstate = _make(6, ("batch1", "batch2"))
    for axis_name in ("batch1", "batch2"):
        vvbn = jax.vmap(vvbn, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))
    out, vvstate = vvbn(x2, vvstate)
    assert out.shape == x2.shape

    # It normalizes (Equinox: against jnp.mean/jnp.var; here float64 numpy).
    x1alt = rng.standard_normal((10, 5)).astype(np.float32)
    bn, state = _make(5, "batch", center=False, scale=False)
    out, state = _batched(bn)(x1alt, state)
    np.testing.assert_allclose(out, _reference_training(x1alt)[0], **F32_TOL)

    # The statistics move in training ...
    _, state = _batched(bn)(x1, state)
    before = _statistics(bn, state)
    _, state = _batched(bn)(3 * x1 + 10, state)
    after = _statistics(bn, state)
    assert not np.allclose(before.mean, after.mean)
    assert not np.allclose(before.variance, after.variance)

    # ... and not at inference.
    ibn = eqx.nn.inference_mode(bn, value=True)
    _, state = _batched(ibn)(4 * x1 + 20, state)
    np.testing.assert_array_equal(_statistics(bn, state).mean, after.mean)
    np.testing.assert_array_equal(_statistics(bn, state).variance, after.variance)

    # It differentiates.
    grad = jax.grad(lambda x: jnp.sum(_batched(bn)(x, state)[0] ** 3))(x1)
    assert grad.shape == x1.shape and np.all(np.isfinite(grad))


def test_zero_training_steps_is_the_identity():
    """equinox#1010: inference before any training step normalizes with mean 0, variance 1."""
    bn, state = _make(3, "foo", inference=True)
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    out, _ = jax.vmap(bn, in_axes=(0, None), out_axes=(0, None), axis_name="foo")(x, state)
    np.testing.assert_allclose(out, x / np.sqrt(1 + EPSILON), rtol=1e-6)


# ------------------------------------------------------------ equinox's issues, absent here


def test_running_variance_starts_at_one():
    """equinox#955: the running variance starts at 1 (`eqx.nn.BatchNorm`'s "ema" mode leaves it
    uninitialized, and uses it from the second step on)."""
    bn, state = _make(4, "batch")
    np.testing.assert_array_equal(_statistics(bn, state).mean, np.zeros(4))
    np.testing.assert_array_equal(_statistics(bn, state).variance, np.ones(4))
    assert _statistics(bn, state).variance.dtype == jnp.float32


def test_training_normalizes_with_the_batch_statistics():
    """equinox#659: every training step normalizes with its own batch's statistics, whatever the
    running ones hold (Equinox's "ema" mode mixes them in)."""
    batches = random_batches((12, 3, 4), 3, seed=2)
    gamma = np.array([0.5, 1.0, 2.0], np.float32)
    beta = np.array([1.0, -1.0, 0.0], np.float32)
    bn, state = _make(3, "batch")
    bn = eqx.tree_at(lambda m: (m.gamma, m.beta), bn, (jnp.asarray(gamma), jnp.asarray(beta)))
    for x in batches:
        y, state = _batched(bn)(x, state)
        np.testing.assert_allclose(y, _reference_training(x, gamma, beta)[0], **F32_TOL)


def test_inference_after_100_steps_uses_the_moving_averages_uninflated():
    """After 100 steps at decay 0.99 the moving statistics equal float64 numpy's exponential
    averages from (0, 1), and inference normalizes with them: no m^t / (1 - m^t) (about +0.58
    here) added to the variance, as Equinox's "batch" mode does."""
    batches = random_batches((8, 2, 3), 100, seed=3, loc=2.0, spread=1.5)
    bn, state = _make(2, "batch", decay=0.99)
    step = jax.jit(_batched(bn))
    for x in batches:
        _, state = step(x, state)
    batch_stats = [_reference_training(x)[1:] for x in batches]
    ref_mean = reference.moving_averages([m for m, _ in batch_stats], 0.99, initial=0.0)[-1]
    ref_var = reference.moving_averages([v for _, v in batch_stats], 0.99, initial=1.0)[-1]
    np.testing.assert_allclose(_statistics(bn, state).mean, ref_mean, rtol=1e-5)
    np.testing.assert_allclose(_statistics(bn, state).variance, ref_var, rtol=1e-5)
    x = batches[0]
    y, _ = _batched(eqx.nn.inference_mode(bn))(x, state)
    np.testing.assert_allclose(y, _reference_inference(x, ref_mean, ref_var), **F32_TOL)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_inputs_of_rank_2_to_5(rank):
    """equinox#592: a batch (B, C, ...) of any rank; statistics over all but the channels."""
    shape = (6, 3, 4, 2, 3)[:rank]
    x = random_batches(shape, 1, seed=rank)[0]
    bn, state = _make(3, "batch")
    y, state = _batched(bn)(x, state)
    ref_y, ref_mean, ref_var = _reference_training(x)
    np.testing.assert_allclose(y, ref_y, **F32_TOL)
    np.testing.assert_allclose(_statistics(bn, state).mean, 0.01 * ref_mean, rtol=1e-5)
    np.testing.assert_allclose(_statistics(bn, state).variance, 0.99 + 0.01 * ref_var, rtol=1e-5)


def test_vmap_over_samples_of_batches():
    """equinox#707: `(n_samples, batch, C)` with the layer vmapped twice, the outer vmap without
    an axis name: each sample is its own batch, with its own state."""
    x = random_batches((3, 8, 4), 1, seed=4)[0]
    bn, state = _make(4, "batch")
    y, states = jax.vmap(_batched(bn), in_axes=(0, None))(x, state)
    for sample in range(3):
        ref_y, ref_mean, _ = _reference_training(x[sample])
        np.testing.assert_allclose(y[sample], ref_y, **F32_TOL)
        np.testing.assert_allclose(_statistics(bn, states).mean[sample], 0.01 * ref_mean, rtol=1e-5)


def test_two_named_axes_normalize_over_both():
    x = random_batches((3, 5, 4), 1, seed=5)[0]
    bn, state = _make(4, ("samples", "batch"))
    y, state = _batched(_batched(bn, "batch"), "samples")(x, state)
    ref_y, ref_mean, _ = _reference_training(x.reshape(15, 4))
    np.testing.assert_allclose(y.reshape(15, 4), ref_y, **F32_TOL)
    np.testing.assert_allclose(_statistics(bn, state).mean, 0.01 * ref_mean, rtol=1e-5)


def test_bf16_inputs_keep_float32_statistics():
    """Equinox reduces in the input's dtype; jbn in float32 whatever it is."""
    x = random_batches((16, 3, 5), 1, seed=6, loc=50.0)[0].astype(jnp.bfloat16)
    bn, state = _make(3, "batch")
    y, state = _batched(bn)(x, state)
    assert y.dtype == jnp.bfloat16
    statistics = _statistics(bn, state)
    assert statistics.mean.dtype == statistics.variance.dtype == jnp.float32
    _, ref_mean, ref_var = _reference_training(np.asarray(x, np.float32))
    np.testing.assert_allclose(statistics.mean, 0.01 * ref_mean, rtol=1e-6)
    np.testing.assert_allclose(statistics.variance, 0.99 + 0.01 * ref_var, rtol=1e-6)


# ------------------------------------------------------------ modes, masks, gradients


def test_inference_mode_and_the_call_override():
    batches = random_batches((8, 3), 2, seed=7)
    bn, state = _make(3, "batch")
    _, state = _batched(bn)(batches[0], state)
    statistics = _statistics(bn, state)
    expected = _reference_inference(
        batches[1], np.asarray(statistics.mean), np.asarray(statistics.variance)
    )
    for model, kwargs in ((eqx.nn.inference_mode(bn), {}), (bn, {"inference": True})):
        y, new_state = jax.vmap(
            lambda x, s, model=model, kwargs=kwargs: model(x, s, **kwargs),
            axis_name="batch",
            in_axes=(0, None),
            out_axes=(0, None),
        )(batches[1], state)
        np.testing.assert_allclose(y, expected, **F32_TOL)
        np.testing.assert_array_equal(_statistics(bn, new_state).mean, statistics.mean)
    # Training mode again.
    y, _ = _batched(eqx.nn.inference_mode(bn, value=False))(batches[1], state)
    np.testing.assert_allclose(y, _reference_training(batches[1])[0], **F32_TOL)


def test_masked_examples_reach_nothing():
    """A per-example boolean mask: padding examples (NaN here) reach neither the statistics nor
    the counted outputs nor the gradients."""
    x = random_batches((8, 3, 2), 1, seed=8)[0]
    counted = np.array([True, True, False, True, True, True, False, True])
    x[~counted] = np.nan
    bn, state = _make(3, "batch")

    def loss(model, x):
        y, new_state = jax.vmap(
            lambda xi, mi, s: model(xi, s, mask=mi),
            axis_name="batch",
            in_axes=(0, 0, None),
            out_axes=(0, None),
        )(x, counted, state)
        return jnp.sum(jnp.where(counted[:, None, None], y, 0) ** 3), (y, new_state)

    grads, (y, state) = eqx.filter_grad(loss, has_aux=True)(bn, x)
    ref_y, ref_mean, ref_var = _reference_training(x[counted])
    np.testing.assert_allclose(y[counted], ref_y, **F32_TOL)
    np.testing.assert_allclose(_statistics(bn, state).mean, 0.01 * ref_mean, rtol=1e-5)
    np.testing.assert_allclose(_statistics(bn, state).variance, 0.99 + 0.01 * ref_var, rtol=1e-5)
    assert np.all(np.isfinite(grads.gamma)) and np.all(np.isfinite(grads.beta))


def test_batch_weights_count_as_repeated_examples():
    """Per-example frequency weights (the unfused path): weight 0 (NaN here) counts for
    nothing, weight k as k copies."""
    x = random_batches((8, 3), 1, seed=11)[0]
    weights = np.array([2, 1, 0, 3, 1, 1, 0, 2], np.float32)
    x[weights == 0] = np.nan
    bn, state = _make(3, "batch")
    y, state = jax.vmap(
        lambda xi, wi, s: bn(xi, s, batch_weights=wi),
        axis_name="batch",
        in_axes=(0, 0, None),
        out_axes=(0, None),
    )(x, weights, state)
    ref_mean, ref_var, _ = reference.moments(x, 0, weights[:, None], keepdims=False)
    counted = weights > 0
    np.testing.assert_allclose(
        y[counted], _reference_inference(x[counted], ref_mean, ref_var), **F32_TOL
    )
    np.testing.assert_allclose(_statistics(bn, state).mean, 0.01 * ref_mean, rtol=1e-5)
    np.testing.assert_allclose(_statistics(bn, state).variance, 0.99 + 0.01 * ref_var, rtol=1e-5)


def test_renorm_trains_as_tf1():
    """renorm=True per example: outputs and the running statistics of TF1/Keras's batch renorm
    (`reference.renorm_training`), clipping active."""
    batches = random_batches((8, 3), 4, seed=12)
    clipping = {"rmax": 1.5, "dmax": 0.5}
    bn, state = _make(
        3, "batch", decay=0.9, renorm=True, renorm_decay=0.8, renorm_clipping=clipping
    )
    step = jax.jit(_batched(bn))
    outputs = []
    for x in batches:
        y, state = step(x, state)
        outputs.append(y)
    ref_outputs, _, clipped, ref_stats = reference.renorm_training(
        batches, 1.0, 0.0, decay=0.9, renorm_decay=0.8, epsilon=EPSILON, clipping=clipping
    )
    assert any(r or d for r, d in clipped)
    for y, ref_y in zip(outputs, ref_outputs):
        np.testing.assert_allclose(y, ref_y, **F32_TOL)
    statistics = _statistics(bn, state)
    for field, name in (
        ("mean", "moving_mean"),
        ("variance", "moving_variance"),
        ("stddev", "moving_stddev"),
        ("renorm_mean", "renorm_mean"),
        ("renorm_stddev", "renorm_stddev"),
    ):
        np.testing.assert_allclose(getattr(statistics, field), ref_stats[name], rtol=1e-5)


def test_gradients_under_jit_equal_the_whole_batch():
    """A jitted loss differentiated from outside (`grad(jit(vmap(layer)))`), against the
    float64 closed-form gradients of batch norm over the whole batch."""
    x = random_batches((16, 4), 1, seed=9)[0]
    dy = np.random.default_rng(10).standard_normal((16, 4)).astype(np.float32)
    bn, state = _make(4, "batch")
    gamma = np.array([0.5, 1.0, 2.0, 1.5], np.float32)
    bn = eqx.tree_at(lambda m: m.gamma, bn, jnp.asarray(gamma))

    @eqx.filter_jit
    def loss(model, x):
        return jnp.sum(_batched(model)(x, state)[0] * dy)

    grads = eqx.filter_grad(loss)(bn, x)
    dx = jax.grad(lambda x: loss(bn, x))(x)
    _, ref_dx, ref_dgamma, ref_dbeta = reference.batch_norm_vjp(
        x, np.ones(16), gamma, 0.0, dy, EPSILON
    )
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads.gamma, ref_dgamma, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads.beta, ref_dbeta, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"decay": 1.0}, ValueError, "decay"),
        ({"epsilon": 0.0}, ValueError, "epsilon"),
        ({"inference": "no"}, TypeError, "inference"),
        ({"input_size": 0}, ValueError, "input_size"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, match):
    arguments = {"input_size": 3, "axis_name": "batch", **kwargs}
    with pytest.raises(error, match=match):
        jbn.equinox.BatchNorm(**arguments)


def test_bad_calls_say_what_to_do():
    bn, state = _make(3, None)
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="needs axis_name"):
        _batched(bn)(x, state)
    bn, state = _make(3, "batch")
    with pytest.raises(ValueError, match="input_size = 3"):
        _batched(bn)(np.zeros((4, 5), np.float32), state)

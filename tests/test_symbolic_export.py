"""`jax.export` with a symbolic batch size: each entry point below traces with a batch "b", and
the deserialized export, called at two batch sizes, matches float64 numpy (`reference.py`).

Shape checks compare what is static and leave symbolic dimensions to JAX (issue 19); flax's
BatchNorm exports this way too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx
from jax import export

import jbn

FEATURES = 3
EPSILON = 1e-3
DECAY = 0.75
BATCH_SIZES = (5, 12)
RNG = np.random.default_rng(0)
GAMMA = RNG.uniform(0.5, 2.0, FEATURES).astype(np.float32)
BETA = RNG.standard_normal(FEATURES).astype(np.float32)
MOVING_MEAN = RNG.standard_normal(FEATURES).astype(np.float32)
MOVING_VARIANCE = RNG.uniform(0.5, 2.0, FEATURES).astype(np.float32)


def _linen_variables():
    return {
        "params": {"beta": BETA, "gamma": GAMMA},
        "batch_stats": {"moving_mean": MOVING_MEAN, "moving_variance": MOVING_VARIANCE},
    }


def _inputs(batch: int):
    """x (features 2 + N(0, 1) scaled per feature), a per-example mask that keeps at least two
    rows, and per-example frequency weights with a zero."""
    rng = np.random.default_rng(batch)
    x = (2.0 + rng.standard_normal((batch, FEATURES)) * rng.uniform(0.5, 2, FEATURES)).astype(
        np.float32
    )
    rows = np.arange(batch) % 3 != 1
    weights = (rng.uniform(0.5, 2.0, batch) * rows).astype(np.float32)
    return x, rows, weights


def _eval_reference(x, rows, weights):
    return reference.normalize(x, MOVING_MEAN, MOVING_VARIANCE, BETA, GAMMA, EPSILON)


def _linen_eval(x, rows, weights):
    model = jbn.BatchNorm(scale=True, epsilon=EPSILON)
    return model.apply(_linen_variables(), x, is_training=False)


def _nnx_eval(x, rows, weights):
    model = jbn.nnx.BatchNorm(FEATURES, scale=True, epsilon=EPSILON, rngs=nnx.Rngs(0))
    jbn.nnx.from_linen_variables(model, _linen_variables())
    model.eval()
    return model(x)


def _batch_normalization(x, rows, weights):
    return jbn.batch_normalization(x, MOVING_MEAN, MOVING_VARIANCE, BETA, GAMMA, EPSILON)


def _fused_masked(x, rows, weights):
    mask = jnp.broadcast_to(rows[:, None], x.shape)  # an elementwise (b, C) mask
    return jbn.fused_batch_norm(x, GAMMA, BETA, epsilon=EPSILON, mask=mask)


def _fused_masked_reference(x, rows, weights):
    y, mean, variance = reference.batch_norm(x, 0, BETA, GAMMA, EPSILON, weights=rows[:, None])
    return y, mean.ravel(), variance.ravel()


def _linen_train(counted_by: str):
    def train(x, rows, weights):
        model = jbn.BatchNorm(decay=DECAY, scale=True, epsilon=EPSILON)
        kwargs = {"mask": rows} if counted_by == "mask" else {"batch_weights": weights}
        y, updates = model.apply(
            _linen_variables(), x, is_training=True, mutable=["batch_stats"], **kwargs
        )
        stats = updates["batch_stats"]
        return y, stats["moving_mean"], stats["moving_variance"]

    def expected(x, rows, weights):
        counted = (rows if counted_by == "mask" else weights)[:, None]
        y, mean, variance = reference.batch_norm(x, 0, BETA, GAMMA, EPSILON, weights=counted)
        moving = lambda old, new: reference.moving_average(old, new.ravel(), DECAY)
        return y, moving(MOVING_MEAN, mean), moving(MOVING_VARIANCE, variance)

    return train, expected


CASES = {
    "linen_eval": (_linen_eval, _eval_reference),
    "nnx_eval": (_nnx_eval, _eval_reference),
    "batch_normalization": (_batch_normalization, _eval_reference),
    "fused_batch_norm_mask": (_fused_masked, _fused_masked_reference),
    "linen_train_mask": _linen_train("mask"),
    "linen_train_batch_weights": _linen_train("weights"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exports_with_a_symbolic_batch_and_runs_at_two_sizes(case):
    function, expected = CASES[case]
    (b,) = export.symbolic_shape("b")
    specs = (
        jax.ShapeDtypeStruct((b, FEATURES), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.bool_),
        jax.ShapeDtypeStruct((b,), jnp.float32),
    )
    exported = export.export(jax.jit(function))(*specs)
    restored = export.deserialize(exported.serialize())
    for batch in BATCH_SIZES:
        inputs = _inputs(batch)
        got = restored.call(*inputs)
        want = expected(*inputs)
        for got_array, want_array in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert got_array.shape == np.shape(want_array)
            np.testing.assert_allclose(got_array, want_array, rtol=2e-5, atol=2e-5)


def test_ghost_batches_export_with_a_batch_written_as_a_multiple():
    (b,) = export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, FEATURES), jnp.float32)
    ghost = lambda x: jbn.ghost_batch_norm(x, virtual_batch_size=2)
    # A plain "b" may be odd: the error says how to export instead.
    with pytest.raises(
        ValueError,
        match=r"not divisible by virtual_batch_size=2 \(export it as a multiple, e.g. 2\*b\)",
    ):
        export.export(jax.jit(ghost))(spec)
    (two_b,) = export.symbolic_shape("2*b")
    restored = export.deserialize(
        export.export(jax.jit(ghost))(
            jax.ShapeDtypeStruct((two_b, FEATURES), jnp.float32)
        ).serialize()
    )
    x = _inputs(6)[0]
    y, mean, _ = restored.call(x)
    for group in range(3):
        rows = slice(2 * group, 2 * group + 2)
        want, want_mean, _ = reference.batch_norm(x[rows], 0, None, None, 1e-3)
        np.testing.assert_allclose(y[rows], want, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(mean[group], want_mean.ravel(), rtol=2e-5, atol=2e-5)

"""What jbn.BatchNorm counts in a batch: ghost (virtual) batches, batch weights and masks,
against float64 numpy (`reference.py`)."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from jbn_testing import F32_TOL, random_batches, train_steps

import jbn

# ---------------------------------------------------------------------------------------------
# Ghost batches.


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
# Batch weights and masks.


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


def test_batch_weights_known_inside_jit_are_checked_and_used():
    # Weights that are constants of a jitted function (closed over) are concrete: negative
    # ones are refused at trace time, valid ones weight the statistics. The check used to
    # compare them with jnp inside the trace, which raised TracerBoolConversionError.
    import jax

    epsilon = 1e-3
    module = jbn.BatchNorm(epsilon=epsilon)
    x = random_batches((6, 3), steps=1)[0]
    variables = module.init(jax.random.key(0), x, is_training=False)

    def train(weights):
        return jax.jit(
            lambda x: module.apply(
                variables, x, is_training=True, batch_weights=weights, mutable=["batch_stats"]
            )[0]
        )(x)

    with pytest.raises(ValueError, match="batch_weights must be non-negative"):
        train(np.array([1.0, -1.0, 1.0, 1.0, 1.0, 1.0], np.float32))
    weights = np.array([1.0, 2.0, 0.0, 0.5, 3.0, 1.0], np.float32)
    mean, var, _ = reference.moments(x, (0,), weights[:, None])
    valid = weights > 0
    np.testing.assert_allclose(
        np.asarray(train(weights))[valid],
        reference.normalize(x, mean, var, 0, None, epsilon)[valid],
        **F32_TOL,
    )

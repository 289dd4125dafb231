"""jbn.precise_bn (Precise BN) against float64 numpy: the accumulator, capture and the driver.

The expected statistics are computed in float64 from the batches themselves (tests/reference.py):
the count-weighted mean of the batch variances ('batch') or the variance of all counted elements
together ('population'), for unequal batch sizes and masks, through a two-layer model whose
second batch norm sees the first one's training-mode output.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jbn_testing import random_batches

import jbn
from jbn import precise_bn
from jbn.running import BatchStatistics

TOL = dict(rtol=2e-5, atol=2e-5)
EPSILON = 1e-3
SIZES = (5, 9, 2)  # unequal batch sizes


def masks_for(sizes, seed=1):
    """Per-example masks with at least one counted example each."""
    rng = np.random.default_rng(seed)
    masks = [rng.random(size) < 0.7 for size in sizes]
    for mask in masks:
        mask[0] = True
    return masks


def expected_statistics(inputs, masks, variance):
    """float64 (mean, variance) over the batches: see the module docstring."""
    per_batch = [
        reference.moments(x, (0,), m[:, None], keepdims=False) for x, m in zip(inputs, masks)
    ]
    counts = np.stack([c for _, _, c in per_batch])
    if variance == "batch":
        mean = reference.pooled(counts, np.stack([m for m, _, _ in per_batch]))
        return mean, reference.pooled(counts, np.stack([v for _, v, _ in per_batch]))
    together = np.concatenate(inputs)
    mask = np.concatenate(masks)[:, None]
    mean, var, _ = reference.moments(together, (0,), mask, keepdims=False)
    return mean, var


# ----------------------------------------------------------------------------- accumulator


@pytest.mark.parametrize("variance", precise_bn.VARIANCES)
def test_accumulator_is_exact_for_unequal_batches_and_element_masks(variance):
    batches = random_batches((7, 3), 4, seed=2, loc=50.0)
    batches = [b[:size] for b, size in zip(batches, (7, 1, 4, 6))]
    rng = np.random.default_rng(3)
    # Element masks: each feature counts other elements, so counts differ per feature.
    masks = [rng.random(b.shape) < 0.6 for b in batches]
    masks[0][:] = True
    state = precise_bn.init((3,))
    per_batch = []
    for x, mask in zip(batches, masks):
        mean, var = jbn.moments(x, 0, mask=mask)
        count = mask.sum(0).astype(np.float32)
        state = precise_bn.update(state, BatchStatistics(count, mean, var))
        # A feature with no counted element in a batch (NaN here) has weight 0 in the pooling.
        with np.errstate(invalid="ignore"):
            moments = reference.moments(x, (0,), mask, keepdims=False)
        per_batch.append([np.nan_to_num(v) for v in moments])
    counts = np.stack([c for _, _, c in per_batch])
    mean, var = precise_bn.finalize(state, variance)
    expected_mean = reference.pooled(counts, np.stack([m for m, _, _ in per_batch]))
    if variance == "batch":
        expected_var = reference.pooled(counts, np.stack([v for _, v, _ in per_batch]))
    else:
        _, expected_var, _ = reference.moments(
            np.concatenate(batches), (0,), np.concatenate(masks), keepdims=False
        )
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(var, expected_var, **TOL)
    np.testing.assert_array_equal(state.count, counts.sum(0))


def test_accumulator_ghost_batches_count_one_by_one():
    ghosts = random_batches((3, 4, 2), 1, seed=4)[0]  # 3 ghost batches of 4
    counts = np.array([4.0, 2.0, 3.0], np.float32)[:, None] * np.ones((3, 2), np.float32)
    means, variances = ghosts.mean(1), ghosts.var(1)
    state = precise_bn.update(precise_bn.init((2,)), BatchStatistics(counts, means, variances))
    mean, var = precise_bn.finalize(state)
    np.testing.assert_allclose(mean, reference.pooled(counts, means), **TOL)
    np.testing.assert_allclose(var, reference.pooled(counts, variances), **TOL)


def test_feature_without_data_keeps_its_statistics():
    state = precise_bn.update(
        precise_bn.init((2,)),
        BatchStatistics(jnp.array([3.0, 0.0]), jnp.array([1.0, 0.0]), jnp.array([2.0, 0.0])),
    )
    infos = {("bn",): precise_bn.LayerInfo("jbn", EPSILON, 0.9, False, False, False)}
    old = {"bn": {"moving_mean": jnp.array([7.0, 7.0]), "moving_variance": jnp.array([5.0, 5.0])}}
    new = precise_bn.recalibrate_variables(old, {("bn",): state}, infos)
    np.testing.assert_array_equal(new["bn"]["moving_mean"], [1.0, 7.0])
    np.testing.assert_array_equal(new["bn"]["moving_variance"], [2.0, 5.0])


# ----------------------------------------------------------------------------- a model


class TwoNorms(nn.Module):
    """Dense -> jbn.BatchNorm -> ReLU -> Dense -> flax.linen.BatchNorm."""

    jbn_kwargs: dict

    @nn.compact
    def __call__(self, x, training, mask=None):
        x = nn.Dense(4, name="dense1")(x)
        x = jbn.BatchNorm(epsilon=EPSILON, name="bn1", **self.jbn_kwargs)(
            x, is_training=training, mask=mask
        )
        x = nn.Dense(3, name="dense2")(nn.relu(x))
        return nn.BatchNorm(momentum=0.9, epsilon=EPSILON, name="bn2")(
            x, use_running_average=not training, mask=None if mask is None else mask[:, None]
        )


def model_batches(sizes=SIZES, seed=0):
    inputs = [b[:size] for b, size in zip(random_batches((max(sizes), 5), len(sizes), seed), sizes)]
    return inputs, masks_for(sizes)


def train_apply(model):
    return lambda v, b: model.apply(v, b[0], True, mask=b[1], mutable=["batch_stats"])


def reference_layer_inputs(variables, inputs, masks, jbn_kwargs):
    """float64: each batch's input of bn1 and of bn2 (bn1 in training mode)."""
    params = jax.tree.map(reference.as64, variables["params"])
    dense = lambda p, x: reference.as64(x) @ p["kernel"] + p["bias"]
    first, second = [], []
    for x, mask in zip(inputs, masks):
        h = dense(params["dense1"], x)
        y, _, _ = reference.batch_norm(h, (0,), params["bn1"]["beta"], None, EPSILON, mask[:, None])
        first.append(h)
        second.append(dense(params["dense2"], np.maximum(y, 0)))
    return first, second


@pytest.mark.parametrize("variance", precise_bn.VARIANCES)
def test_recalibrated_statistics_are_those_of_all_batches(variance):
    model = TwoNorms({"decay": 0.999})
    inputs, masks = model_batches()
    variables = model.init(jax.random.key(0), inputs[0], False)
    batch_stats = jbn.recalibrate_statistics(
        train_apply(model), variables, zip(inputs, masks), variance=variance
    )
    first, second = reference_layer_inputs(variables, inputs, masks, {})
    for name, layer_inputs, keys in (
        ("bn1", first, ("moving_mean", "moving_variance")),
        ("bn2", second, ("mean", "var")),
    ):
        mean, var = expected_statistics(layer_inputs, masks, variance)
        np.testing.assert_allclose(batch_stats[name][keys[0]], mean, **TOL)
        np.testing.assert_allclose(batch_stats[name][keys[1]], var, **TOL)
        assert batch_stats[name][keys[0]].dtype == jnp.float32


def test_num_batches_uses_the_first_batches_only():
    model = TwoNorms({"decay": 0.9})
    inputs, masks = model_batches()
    variables = model.init(jax.random.key(0), inputs[0], False)
    batch_stats = jbn.recalibrate_statistics(
        train_apply(model), variables, zip(inputs, masks), num_batches=2
    )
    first, _ = reference_layer_inputs(variables, inputs[:2], masks[:2], {})
    mean, var = expected_statistics(first, masks[:2], "batch")
    np.testing.assert_allclose(batch_stats["bn1"]["moving_mean"], mean, **TOL)
    np.testing.assert_allclose(batch_stats["bn1"]["moving_variance"], var, **TOL)


def test_stale_moving_averages_are_fixed_for_inference():
    """With decay 0.999 the moving averages barely left their initial values; after
    recalibration on one batch, inference on that batch gives the training-mode output (float64
    reference), which the stale averages are far from."""
    model = jbn.BatchNorm(decay=0.999, epsilon=EPSILON, scale=True)
    x = random_batches((16, 3), 1, seed=5, loc=20.0, spread=5.0)[0]
    variables = jax.jit(lambda k, x: model.init(k, x, is_training=False))(jax.random.key(0), x)
    _, updates = model.apply(variables, x, is_training=True, mutable=["batch_stats"])
    stale = {**variables, **updates}
    expected, _, _ = reference.batch_norm(x, (0,), 0.0, 1.0, EPSILON)
    stale_y = model.apply(stale, x, is_training=False)
    assert np.max(np.abs(stale_y - expected)) > 1.0
    apply_fn = lambda v, b: model.apply(v, b, is_training=True, mutable=["batch_stats"])
    batch_stats = jbn.recalibrate_statistics(apply_fn, stale, [x])
    fixed_y = model.apply({**stale, "batch_stats": batch_stats}, x, is_training=False)
    np.testing.assert_allclose(fixed_y, expected, rtol=1e-4, atol=1e-4)


def test_capture_under_jit_matches_reference():
    model = TwoNorms({"decay": 0.9})
    inputs, masks = model_batches()
    variables = model.init(jax.random.key(0), inputs[0], False)

    @jax.jit
    def first_layer(variables, x, mask):
        captured, _ = precise_bn.capture_batch_statistics(train_apply(model), variables, (x, mask))
        return captured[("bn1",)][0]

    batch = first_layer(variables, inputs[1], masks[1])
    first, _ = reference_layer_inputs(variables, inputs[1:2], masks[1:2], {})
    mean, var, count = reference.moments(first[0], (0,), masks[1][:, None], keepdims=False)
    np.testing.assert_allclose(batch.mean, mean, **TOL)
    np.testing.assert_allclose(batch.variance, var, **TOL)
    np.testing.assert_allclose(jnp.broadcast_to(batch.count, mean.shape), count)


# ----------------------------------------------------------------------------- layer variants


def recalibrated_bn1(jbn_kwargs, variance="batch"):
    model = TwoNorms(jbn_kwargs)
    inputs, masks = model_batches()
    variables = model.init(jax.random.key(0), inputs[0], False)
    # A few training steps, so that num_updates and the renorm statistics are not initial.
    for x, mask in zip(inputs, masks):
        _, updates = train_apply(model)(variables, (x, mask))
        variables = {**variables, **updates}
    batch_stats = jbn.recalibrate_statistics(
        train_apply(model), variables, zip(inputs, masks), variance=variance
    )
    first, _ = reference_layer_inputs(variables, inputs, masks, jbn_kwargs)
    return variables["batch_stats"]["bn1"], batch_stats["bn1"], first, masks


def test_zero_debias_keeps_its_invariant():
    old, new, first, masks = recalibrated_bn1({"decay": 0.9, "zero_debias_moving_mean": True})
    mean, var = expected_statistics(first, masks, "batch")
    np.testing.assert_allclose(new["moving_mean"], mean, **TOL)
    np.testing.assert_allclose(new["moving_variance"], var, **TOL)
    assert int(new["num_updates"]) == int(old["num_updates"]) == len(SIZES)
    debias = 1 - 0.9 ** len(SIZES)
    np.testing.assert_allclose(new["moving_mean_biased"], mean * debias, **TOL)


def test_renorm_writes_the_stddev_inference_divides_by():
    old, new, first, masks = recalibrated_bn1({"decay": 0.9, "renorm": True, "renorm_decay": 0.5})
    mean, var = expected_statistics(first, masks, "batch")
    np.testing.assert_allclose(new["moving_mean"], mean, **TOL)
    np.testing.assert_allclose(new["moving_stddev"], np.sqrt(var + EPSILON), **TOL)
    np.testing.assert_allclose(new["moving_variance"], var, **TOL)
    # The correction statistics steer training only: kept.
    np.testing.assert_array_equal(new["renorm_mean"], old["renorm_mean"])
    np.testing.assert_array_equal(new["renorm_stddev"], old["renorm_stddev"])


def test_unbiased_moving_variance_averages_bessel_corrected_variances():
    _, new, first, masks = recalibrated_bn1({"decay": 0.9, "unbiased_moving_variance": True})
    per_batch = [
        reference.moments(h, (0,), m[:, None], keepdims=False) for h, m in zip(first, masks)
    ]
    counts = np.stack([c for _, _, c in per_batch])
    unbiased = np.stack([reference.unbiased_variance(v, c) for _, v, c in per_batch])
    np.testing.assert_allclose(new["moving_variance"], reference.pooled(counts, unbiased), **TOL)
    with pytest.raises(ValueError, match="unbiased_moving_variance"):
        recalibrated_bn1({"decay": 0.9, "unbiased_moving_variance": True}, "population")


def test_ghost_batches_are_batches_of_their_own():
    model = jbn.BatchNorm(decay=0.9, epsilon=EPSILON, virtual_batch_size=4)
    x = random_batches((12, 3), 1, seed=6)[0]
    variables = jax.jit(lambda k, x: model.init(k, x, is_training=False))(jax.random.key(0), x)
    apply_fn = lambda v, b: model.apply(v, b, is_training=True, mutable=["batch_stats"])
    batch_stats = jbn.recalibrate_statistics(apply_fn, variables, [x])
    ghosts = x.reshape(3, 4, 3)
    np.testing.assert_allclose(batch_stats["moving_mean"], reference.as64(x).mean(0), **TOL)
    np.testing.assert_allclose(
        batch_stats["moving_variance"], reference.as64(ghosts).var(1).mean(0), **TOL
    )


# ----------------------------------------------------------------------------- errors


def test_bad_input_is_refused():
    model = TwoNorms({"decay": 0.9})
    inputs, masks = model_batches()
    variables = model.init(jax.random.key(0), inputs[0], False)
    batches = list(zip(inputs, masks))
    apply_fn = train_apply(model)
    with pytest.raises(ValueError, match="variance"):
        jbn.recalibrate_statistics(apply_fn, variables, batches, variance="unbiased")
    with pytest.raises(ValueError, match="num_batches"):
        jbn.recalibrate_statistics(apply_fn, variables, batches, num_batches=0)
    with pytest.raises(ValueError, match="empty"):
        jbn.recalibrate_statistics(apply_fn, variables, [])
    with pytest.raises(ValueError, match="training mode"):
        jbn.recalibrate_statistics(lambda v, b: model.apply(v, b[0], False), variables, batches)
    dense = nn.Dense(2)
    dense_variables = {**dense.init(jax.random.key(0), inputs[0]), "batch_stats": {}}
    with pytest.raises(ValueError, match=r"no jbn\.BatchNorm"):
        jbn.recalibrate_statistics(lambda v, b: dense.apply(v, b[0]), dense_variables, batches)
    with pytest.raises(ValueError, match="batch_stats"):
        jbn.recalibrate_statistics(apply_fn, {"params": variables["params"]}, batches)

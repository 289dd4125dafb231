"""jbn.precise_bn across 4 simulated CPU devices, against float64 numpy.

Under `jit` with the batches sharded over a mesh (`axis_name=None`), and under `pmap` with the
layer's `axis_name`, the recalibrated statistics are those of the global batches: every shard's
counted rows (uneven masks) weighted exactly, batch by batch.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import reference
from test_sharding import DEVICES, MESH_TYPES, make_mesh, shard_batch, uneven_batch, using

import jbn
from jbn import precise_bn

EPSILON = 1e-3
TOL = dict(rtol=1e-4, atol=1e-4)


def expected(batches, variance):
    """float64 (mean, variance) of the batches' statistics (see jbn.precise_bn)."""
    per_batch = [reference.moments(x, 0, m, keepdims=False) for x, m in batches]
    counts = np.stack([c for _, _, c in per_batch])
    mean = reference.pooled(counts, np.stack([m for m, _, _ in per_batch]))
    if variance == "batch":
        return mean, reference.pooled(counts, np.stack([v for _, v, _ in per_batch]))
    together = np.concatenate([x for x, _ in batches])
    mask = np.concatenate([m for _, m in batches])
    return mean, reference.moments(together, 0, mask, keepdims=False)[1]


def two_batches():
    """Two global batches of unequal sizes (32 and 16 rows) with uneven per-shard masks."""
    first = uneven_batch(5.0, rows_per_device=8, seed=0)
    x, _ = uneven_batch(-3.0, rows_per_device=4, seed=1)
    mask = (np.arange(4)[None, :] < np.array([4, 1, 2, 3])[:, None]).reshape(-1, 1)
    return [first, (x, mask)]


@pytest.mark.parametrize("variance", precise_bn.VARIANCES)
@pytest.mark.parametrize("kind", list(MESH_TYPES))
def test_recalibration_under_jit_over_a_sharded_batch_is_global(kind, variance):
    model = jbn.BatchNorm(decay=0.999, epsilon=EPSILON)
    batches = two_batches()
    variables = model.init(jax.random.key(0), batches[0][0], is_training=False)
    apply_fn = lambda v, b: model.apply(
        v, b[0], is_training=True, mask=b[1], mutable=["batch_stats"]
    )
    mesh = make_mesh(kind)
    with using(mesh):
        sharded = [tuple(shard_batch(mesh, x, m)) for x, m in batches]
        batch_stats = jax.device_get(
            jbn.recalibrate_statistics(apply_fn, variables, sharded, variance=variance)
        )
    mean, var = expected(batches, variance)
    np.testing.assert_allclose(batch_stats["moving_mean"], mean, **TOL)
    np.testing.assert_allclose(batch_stats["moving_variance"], var, **TOL)


def test_capture_under_pmap_is_global():
    """Each device holds a shard; the layer's axis_name merges the statistics, so every
    device's accumulator holds the global ones."""
    model = jbn.BatchNorm(decay=0.9, epsilon=EPSILON, axis_name="batch")
    batches = two_batches()
    variables = model.init(jax.random.key(0), batches[0][0], is_training=False)
    apply_fn = lambda v, b: model.apply(
        v, b[0], is_training=True, mask=b[1], mutable=["batch_stats"]
    )

    def step(state, x, mask):
        captured, _ = precise_bn.capture_batch_statistics(apply_fn, variables, (x, mask))
        return precise_bn.update(state, captured[()][0])

    pstep = jax.pmap(step, axis_name="batch")
    state = jax.tree.map(lambda a: np.stack([a] * DEVICES), precise_bn.init((5,)))
    for x, mask in batches:
        shard = lambda a: a.reshape(DEVICES, -1, *a.shape[1:])
        state = pstep(state, shard(x), shard(mask))
    for device in range(DEVICES):
        one = jax.tree.map(lambda a, d=device: a[d], state)
        mean, var = precise_bn.finalize(one)
        want_mean, want_var = expected(batches, "batch")
        np.testing.assert_allclose(mean, want_mean, **TOL)
        np.testing.assert_allclose(var, want_var, **TOL)

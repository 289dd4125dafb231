"""Shared setup of the jbn module tests: random batches, linen training steps, padded batches.

The expected values come from `reference.py` (float64 numpy); this module only makes inputs and
runs `jbn.BatchNorm`.
"""

from __future__ import annotations

import jax
import numpy as np

# float32 round-off on the small batches of these tests.
F32_TOL = dict(rtol=2e-5, atol=2e-5)


def random_batches(shape, steps, seed=0, loc=1.5, spread=2.0) -> list[np.ndarray]:
    """`steps` float32 batches around `loc`."""
    rng = np.random.default_rng(seed)
    # Per-feature offsets and spreads make a mix-up of axes visible.
    return [
        (loc + spread * rng.standard_normal(shape) * rng.uniform(0.5, 2.0)).astype(np.float32)
        for _ in range(steps)
    ]


def init_variables(module, x):
    # Jitted: one compilation is much cheaper than dispatching every small op eagerly.
    return jax.jit(lambda key, x: module.init(key, x, is_training=False))(jax.random.key(0), x)


def training_step(module):
    """Jitted `(variables, x, **call_kwargs) -> (y, updates)` in training mode."""

    def step(variables, x, **call_kwargs):
        return module.apply(variables, x, is_training=True, mutable=["batch_stats"], **call_kwargs)

    return jax.jit(step)


def train_steps(module, batches, variables=None, **call_kwargs):
    """Runs training steps; returns (outputs, variables after the last step)."""
    if variables is None:
        variables = init_variables(module, batches[0])
    step = training_step(module)
    outputs = []
    for x in batches:
        y, updates = step(variables, x, **call_kwargs)
        variables = {**variables, **updates}
        outputs.append(y)
    return outputs, variables


PADDED_ROWS = np.array([True, True, False, True, True, True, False, True])


def padded_batch(padding, features=3):
    """A batch of 8 rows whose rows 2 and 6 are padding filled with `padding` (NaN, Inf, ...).

    Returns (x, mask, weights, gamma, beta, dy): `weights` are positive on the counted rows and 0
    on the padding, `dy` a cotangent for the outputs.
    """
    rng = np.random.default_rng(0)
    batch = len(PADDED_ROWS)
    x = (1.0 + 2.0 * rng.standard_normal((batch, features))).astype(np.float32)
    mask = PADDED_ROWS.copy()
    x[~mask] = padding
    weights = mask * rng.uniform(0.5, 2.0, batch)
    gamma = rng.uniform(0.5, 2.0, features).astype(np.float32)
    beta = rng.standard_normal(features).astype(np.float32)
    dy = rng.standard_normal((batch, features)).astype(np.float32)
    return x, mask, weights.astype(np.float32), gamma, beta, dy

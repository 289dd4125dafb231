"""Checks an installed jbn wheel in a clean virtual environment (run by .ci/run).

Run from outside the checkout, so that the installed package is the one imported. Fails (an
AssertionError or ImportError) if the wheel misses a file, carries more than the library (the
training app, train/ and configs/, runs from a checkout), declares other dependencies than the
library imports, or pulled in the training app's.
"""

import importlib.metadata
import importlib.util
import pathlib
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jbn

location = pathlib.Path(jbn.__file__).resolve()
assert "site-packages" in location.parts, f"jbn imported from {location}, not the wheel"

installed = {file.parts[0] for file in importlib.metadata.files("jbn")}
assert installed == {"jbn", f"jbn-{importlib.metadata.version('jbn')}.dist-info"}, installed
for app_package in ("train", "configs"):
    assert importlib.util.find_spec(app_package) is None, f"{app_package} installed with jbn"

required = {
    re.split(r"[<>=!~ ;\[]", requirement)[0].lower()
    for requirement in importlib.metadata.requires("jbn")
    if "extra ==" not in requirement
}
assert required == {"jax", "jaxlib", "flax", "numpy"}, required
for app_only in ("tensorflow_datasets", "ml_collections", "matplotlib", "tensorboardX"):
    assert importlib.util.find_spec(app_only) is None, f"{app_only} installed with the library"

# The fused op under jit: statistics against float64 numpy, offset far from zero.
rng = np.random.default_rng(0)
x = (1e3 + rng.standard_normal((64, 8))).astype(np.float32)
y, mean, variance = jax.jit(jbn.fused_batch_norm)(x)
np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-6)
np.testing.assert_allclose(variance, x.astype(np.float64).var(0), rtol=1e-3)
np.testing.assert_allclose(np.asarray(y).std(0), 1.0, rtol=1e-2)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, is_training: bool):
        x = nn.Dense(16)(x)
        x = jbn.BatchNorm(decay=0.9, scale=True)(x, is_training=is_training)
        return nn.Dense(1)(nn.relu(x))[:, 0]


# A module train step: plain SGD by hand (optax belongs to the training app's extra).
net = Net()
inputs = rng.standard_normal((128, 4)).astype(np.float32)
targets = (inputs @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)) ** 2
variables = net.init(jax.random.key(0), inputs, is_training=False)


@jax.jit
def train_step(variables):
    def loss_fn(params):
        predictions, updates = net.apply(
            {**variables, "params": params}, inputs, is_training=True, mutable=["batch_stats"]
        )
        return jnp.mean((predictions - targets) ** 2), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - 0.05 * g, variables["params"], grads)
    return {"params": params, **updates}, loss


losses = []
for _ in range(20):
    variables, loss = train_step(variables)
    losses.append(float(loss))
assert losses[-1] < 0.5 * losses[0], losses
moving_mean = variables["batch_stats"]["BatchNorm_0"]["moving_mean"]
assert float(jnp.max(jnp.abs(moving_mean))) > 0, "the moving mean never moved"
assert np.all(np.isfinite(net.apply(variables, inputs, is_training=False)))
print(
    f"wheel OK: Python {sys.version.split()[0]}, jax {jax.__version__}, "
    f"flax {importlib.metadata.version('flax')}, jbn from {location.parent}; "
    f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}"
)

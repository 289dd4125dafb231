"""The network against the document's architecture, counted independently of train/models.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from train import models

# The document: five 3x3 convolutions with bias, of 64, 64, 32, 16 and 10 filters.
DOCUMENT_FILTERS = (64, 64, 32, 16, 10)


def document_param_count(in_channels: int, batch_norm: bool, center: bool, scale: bool) -> int:
    """Trainable parameters of the document's net, from its layer list."""
    total, channels = 0, in_channels
    for filters in DOCUMENT_FILTERS:
        total += 3 * 3 * channels * filters + filters  # kernel + bias
        if batch_norm:
            total += filters * (int(center) + int(scale))  # beta, gamma
        channels = filters
    return total


def init(model, image_shape, batch=2):
    x = jnp.zeros((batch, *image_shape), jnp.float32)
    # An 'rbg' key: initialization compiles in about a second instead of several with threefry.
    key = jax.random.key(0, impl="rbg")
    return jax.jit(functools.partial(model.init, is_training=False))(key, x)


def apply(model, variables, images, is_training, mutable):
    """model.apply with the outputs of every layer captured, compiled once (eager is slow)."""
    run = functools.partial(
        model.apply, is_training=is_training, capture_intermediates=True, mutable=mutable
    )
    return jax.jit(run)(variables, images)


def init_shapes(model, image_shape):
    """Variable shapes without computing anything."""
    return jax.eval_shape(lambda: init(model, image_shape))


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3)])
@pytest.mark.parametrize(
    "use_batch_norm,center,scale", [(True, True, False), (True, True, True), (False, True, False)]
)
def test_param_count_matches_the_document(image_shape, use_batch_norm, center, scale):
    config = default.get_config().model
    config.use_batch_norm = use_batch_norm
    config.batch_norm.center, config.batch_norm.scale = center, scale
    variables = init_shapes(models.create_model(config, num_classes=10), image_shape)
    expected = document_param_count(image_shape[-1], use_batch_norm, center, scale)
    assert count(variables["params"]) == expected
    # Moving mean and variance per channel of every BN layer; nothing without BN.
    expected_stats = 2 * sum(DOCUMENT_FILTERS) if use_batch_norm else 0
    assert count(variables.get("batch_stats", {})) == expected_stats


def test_layer_shapes_follow_the_document():
    variables = init_shapes(models.create_model(default.get_config().model, 10), (32, 32, 3))
    params = variables["params"]
    channels = 3
    for index, filters in enumerate(DOCUMENT_FILTERS, start=1):
        assert params[f"conv{index}"]["kernel"].shape == (3, 3, channels, filters)
        assert params[f"conv{index}"]["bias"].shape == (filters,)
        assert params[f"bn{index}"]["beta"].shape == (filters,)
        assert "gamma" not in params[f"bn{index}"]  # TF1 default scale=False
        channels = filters


@pytest.mark.parametrize(
    "image_shape,spatial", [((28, 28, 1), [28, 14, 7, 4, 2]), ((32, 32, 3), [32, 16, 8, 4, 2])]
)
def test_spatial_sizes(image_shape, spatial):
    """Four SAME 2x2/2 max pools leave a 2x2 map; the 4x4/4 average pool makes it 1x1."""
    model = models.create_model(default.get_config().model, num_classes=10)
    images = jnp.zeros((3, *image_shape))

    def run():
        return model.apply(
            init(model, image_shape),
            images,
            is_training=False,
            capture_intermediates=True,
            mutable=["intermediates"],
        )

    logits, state = jax.eval_shape(run)  # shapes only, nothing compiled
    inter = state["intermediates"]
    assert [inter[f"conv{i}"]["__call__"][0].shape[1] for i in range(1, 6)] == spatial
    assert logits.shape == (3, 10)


@pytest.fixture(scope="module")
def model_28_and_variables():
    model = models.create_model(default.get_config().model, num_classes=10)
    return model, init(model, (28, 28, 1))


@pytest.fixture(scope="module")
def images_28():
    return np.random.default_rng(2).normal(1.0, 1.0, (16, 28, 28, 1)).astype(np.float32)


def test_average_pool_excludes_padding_as_tf_same(model_28_and_variables, images_28):
    model, variables = model_28_and_variables
    logits, state = apply(model, variables, images_28, False, ["intermediates"])
    last = jax.nn.relu(state["intermediates"]["bn5"]["__call__"][0])  # (16, 2, 2, 10)
    # TF's SAME average pool over a 2x2 map divides by the 4 real values, not by 16.
    np.testing.assert_allclose(logits, last.mean(axis=(1, 2)), rtol=1e-6, atol=1e-6)


def test_relu_on_logits_switch_and_moving_mean(model_28_and_variables, images_28):
    model, variables = model_28_and_variables
    outputs, states = {}, {}
    for relu in (True, False):
        switched = model.clone(relu_on_logits=relu)
        outputs[relu], states[relu] = apply(
            switched, variables, images_28, True, ["batch_stats", "intermediates"]
        )
    assert float(outputs[True].min()) >= 0.0  # the document's ReLU: non-negative logits
    assert float(outputs[False].min()) < 0.0
    # Same parameters, only the ReLU differs: mean(relu(x)) >= mean(x), equality iff x >= 0.
    assert bool(jnp.all(outputs[True] >= outputs[False] - 1e-6))
    assert not np.allclose(outputs[True], outputs[False])

    # One training step from init: moving_mean = (1 - decay) * batch mean of the conv output.
    conv1 = states[True]["intermediates"]["conv1"]["__call__"][0]
    decay = default.get_config().model.batch_norm.decay
    np.testing.assert_allclose(
        states[True]["batch_stats"]["bn1"]["moving_mean"],
        (1 - decay) * conv1.mean(axis=(0, 1, 2)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_batch_norm_gets_the_config():
    config = default.get_config().model
    batch_norm = config.batch_norm
    batch_norm.decay, batch_norm.epsilon, batch_norm.virtual_batch_size = 0.5, 0.01, 4
    batch_norm.renorm = True
    batch_norm.renorm_clipping.rmax = 3.0
    batch_norm.renorm_clipping.rmin = 1 / 3.0
    batch_norm.renorm_clipping.dmax = 5.0
    config.batch_norm_l2 = 0.1
    options = models.batch_norm_options(config)
    assert options.decay == 0.5 and options.epsilon == 0.01
    assert options.virtual_batch_size == 4 and options.renorm
    assert dict(options.renorm_clipping) == {"rmax": 3.0, "rmin": 1 / 3.0, "dmax": 5.0}
    beta = jnp.array([1.0, 2.0])
    assert float(options.param_regularizers["beta"](beta)) == pytest.approx(0.1 * 5.0)

    config.sync_batch_stats = True
    assert models.create_model(config, 10, axis_name="batch").axis_name == "batch"
    config.sync_batch_stats = False
    assert models.create_model(config, 10, axis_name="batch").axis_name is None


def test_flax_batch_norm_network_matches_the_jbn_network():
    # The benchmarks' comparison network: same parameters, same training-mode outputs and
    # moving means (flax's one-pass variance is accurate on this well-centred data).
    config = default.get_config().model
    config.batch_norm.scale = True
    flax_config = config.copy_and_resolve_references()
    flax_config.batch_norm_impl = "flax"
    jbn_model = models.create_model(config, num_classes=10)
    flax_model = models.create_model(flax_config, num_classes=10)
    variables = init(jbn_model, (28, 28, 1))
    renamed = {
        "params": jax.tree.map(lambda v: v, variables["params"]),
        "batch_stats": {
            layer: {"mean": stats["moving_mean"], "var": stats["moving_variance"]}
            for layer, stats in variables["batch_stats"].items()
        },
    }
    for layer in renamed["params"]:
        if layer.startswith("bn"):
            params = renamed["params"][layer]
            renamed["params"][layer] = {"bias": params["beta"], "scale": params["gamma"]}
    images = jnp.asarray(np.random.default_rng(0).standard_normal((8, 28, 28, 1)), jnp.float32)
    run = lambda model, v: jax.jit(
        functools.partial(model.apply, is_training=True, mutable=["batch_stats"])
    )(v, images)
    jbn_logits, jbn_updates = run(jbn_model, variables)
    flax_logits, flax_updates = run(flax_model, renamed)
    np.testing.assert_allclose(jbn_logits, flax_logits, rtol=1e-4, atol=1e-4)
    for layer, stats in jbn_updates["batch_stats"].items():
        np.testing.assert_allclose(
            stats["moving_mean"], flax_updates["batch_stats"][layer]["mean"], rtol=1e-4, atol=1e-5
        )


def test_unknown_batch_norm_impl_is_refused():
    config = default.get_config().model
    config.batch_norm_impl = "torch"
    model = models.create_model(config, num_classes=10)
    with pytest.raises(ValueError, match="batch_norm_impl must be 'jbn' or 'flax'"):
        init(model, (28, 28, 1))
    config.batch_norm_impl = "flax"
    config.batch_norm.renorm = True
    with pytest.raises(ValueError, match="does not support \\['renorm'\\]"):
        init(models.create_model(config, num_classes=10), (28, 28, 1))

"""jbn.linen.BatchNorm, the drop-in for flax.linen.BatchNorm, run side by side with flax's layer;
the flax <-> jbn variable-name converters; train/resnet.py's blocks (flax's examples/imagenet
interface) switched by changing only the `norm = partial(...)` they are given."""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jbn_testing import F32_TOL, random_batches

import jbn
from train.resnet import BottleneckResNetBlock, ResNetBlock

CONFIGS = {
    "default": (dict(), {}),
    "axis1_momentum": (dict(axis=1, momentum=0.8), {}),
    "zero_scale_no_bias": (dict(scale_init=nn.initializers.zeros, use_bias=False), {}),
    "axis_tuple_mask": (
        dict(axis=(1, 3), momentum=0.7, epsilon=1e-3),
        {"mask": np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)[:, None, None, None]},
    ),
}


def _close_trees(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **F32_TOL), got, want)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_same_outputs_statistics_and_gradients_as_flax(config):
    kwargs, call = CONFIGS[config]
    shape = (8, 3, 2, 4)
    xs = random_batches(shape, steps=3, loc=0.5, spread=1.5)
    flax_layer = nn.BatchNorm(use_running_average=False, **kwargs)
    jbn_layer = jbn.linen.BatchNorm(use_running_average=False, **kwargs)
    variables = flax_layer.init(jax.random.key(0), xs[0])
    # Same variables, under flax's names: the drop-in initializes what flax does.
    _close_trees(jbn_layer.init(jax.random.key(0), xs[0]), variables)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: p + rng.uniform(0.5, 1.5, p.shape).astype(p.dtype), variables)
    params, stats = params["params"], variables["batch_stats"]
    cotangent = rng.standard_normal(shape).astype(np.float32)
    # Masked elements are padding: the loss ignores them (flax would pass their outputs'
    # gradients to scale and bias, jbn keeps them out of every shared gradient).
    cotangent = cotangent * call.get("mask", True)

    def loss(module, params, stats, x):
        y, updates = module.apply(
            {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"], **call
        )
        return jnp.sum(y * cotangent), (y, updates["batch_stats"])

    flax_stats = jbn_stats = stats
    for x in xs:
        grad = jax.value_and_grad(loss, argnums=(1, 3), has_aux=True)
        (_, (y_want, flax_stats)), grads_want = grad(flax_layer, params, flax_stats, x)
        (_, (y, jbn_stats)), grads = grad(jbn_layer, params, jbn_stats, x)
        np.testing.assert_allclose(y, y_want, **F32_TOL)
        _close_trees(jbn_stats, flax_stats)
        _close_trees(grads, grads_want)
    # Inference, with the mode given at the call instead of at construction.
    evaluate = lambda cls: cls(**kwargs).apply(
        {"params": params, "batch_stats": flax_stats}, xs[0], use_running_average=True
    )
    np.testing.assert_allclose(evaluate(jbn.linen.BatchNorm), evaluate(nn.BatchNorm), **F32_TOL)


def test_flax_arguments_defaults_and_call():
    flax_fields = {f: getattr(nn.BatchNorm, f) for f in nn.BatchNorm.__dataclass_fields__}
    for name, default in flax_fields.items():
        if name not in ("parent", "name"):
            assert getattr(jbn.linen.BatchNorm, name) == default, name
    layer = jbn.linen.BatchNorm(use_fast_variance=False, force_float32_reductions=False)
    x = np.ones((4, 3), np.float32)
    variables = layer.init(jax.random.key(0), x, use_running_average=True)
    # flax's merge_param: the mode is given once, here or at the call.
    with pytest.raises(ValueError, match="use_running_average"):
        jbn.linen.BatchNorm(use_running_average=True).apply(variables, x, use_running_average=True)
    # dtype=None promotes the input with param_dtype, as flax does.
    y = layer.apply(variables, x.astype(jnp.bfloat16), use_running_average=True)
    assert y.dtype == jnp.float32
    # jbn's checks name flax's argument too.
    with pytest.raises(ValueError, match=r"decay.*momentum"):
        jbn.linen.BatchNorm(momentum=1.5)
    with pytest.raises(TypeError, match=r"param_initializers.*scale_init"):
        jbn.linen.BatchNorm(scale_init=1.0)


# ---------------------------------------------------------------------------------------------
# The ResNet blocks of train/resnet.py, which call their batch norm as flax's examples/imagenet
# blocks do.


class TinyResNet(nn.Module):
    """A ResNet with two blocks; `batch_norm` is the only thing the switch changes."""

    batch_norm: object = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(nn.Conv, use_bias=False)
        norm = partial(self.batch_norm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        x = conv(4, (3, 3), name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = ResNetBlock(4, conv=conv, norm=norm, act=nn.relu, strides=(2, 2))(x)
        x = BottleneckResNetBlock(2, conv=conv, norm=norm, act=nn.relu)(x)
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def _train(model, variables, batches):
    tx = optax.sgd(0.1, momentum=0.9)
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state, x, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    losses = []
    for x, labels in batches:
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, labels)
        losses.append(float(loss))
    return {"params": params, "batch_stats": batch_stats}, losses


def test_resnet_switched_by_its_norm_partial_trains_and_loads_flax_checkpoints():
    rng = np.random.default_rng(0)
    images = rng.normal(1.0, 2.0, (4, 8, 8, 8, 3)).astype(np.float32)
    batches = [(x, (x.mean((1, 2, 3)) > 1).astype(np.int32)) for x in images]
    flax_model = TinyResNet()
    jbn_model = TinyResNet(batch_norm=jbn.linen.BatchNorm)
    init = lambda model: model.init(jax.random.key(0), images[0], train=False)
    variables = init(flax_model)
    _close_trees(init(jbn_model), variables)  # same names, shapes and initial values

    flax_trained, flax_losses = _train(flax_model, variables, batches)
    jbn_trained, jbn_losses = _train(jbn_model, variables, batches)
    np.testing.assert_allclose(jbn_losses, flax_losses, rtol=1e-4)
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4),
        jbn_trained,
        flax_trained,
    )

    # The flax-trained checkpoint loads unchanged and evaluates the same.
    evaluate = lambda model: model.apply(flax_trained, images[1], train=False)
    np.testing.assert_allclose(evaluate(jbn_model), evaluate(flax_model), **F32_TOL)
    # And through the converters, in jbn's names and back.
    converted = jbn.linen.from_flax_variables(flax_trained)
    assert set(converted["params"]["bn_init"]) == {"gamma", "beta"}
    assert set(converted["batch_stats"]["ResNetBlock_0"]["norm_proj"]) == {
        "moving_mean",
        "moving_variance",
    }
    assert set(converted["params"]["Dense_0"]) == {"kernel", "bias"}  # not a batch norm
    _close_trees(jbn.linen.to_flax_variables(converted), flax_trained)


def test_converted_flax_variables_load_into_jbn_modules():
    x = random_batches((16, 3), steps=1)[0]
    flax_layer = nn.BatchNorm(momentum=0.8)
    variables = flax_layer.init(jax.random.key(0), x, use_running_average=True)
    variables = {
        "params": {"scale": np.float32([0.5, 2, 3]), "bias": np.float32([1, 0, -1])},
        "batch_stats": {"mean": np.float32([1, 2, 3]), "var": np.float32([4, 0.5, 2])},
    }
    want = flax_layer.apply(variables, x, use_running_average=True)
    jbn_layer = jbn.BatchNorm(decay=0.8, epsilon=1e-5, scale=True)
    converted = jbn.linen.from_flax_variables(variables)
    np.testing.assert_allclose(jbn_layer.apply(converted, x, is_training=False), want, **F32_TOL)
    # jbn.nnx takes flax's names as well.
    model = jbn.nnx.BatchNorm(3, decay=0.8, epsilon=1e-5, scale=True, rngs=nnx.Rngs(0))
    jbn.nnx.from_linen_variables(model, variables)
    np.testing.assert_allclose(model(x, use_running_average=True), want, **F32_TOL)
    # Folding reads the drop-in's flax names.
    stats, affine, epsilon = jbn.batch_norm_inference_statistics(
        jbn.linen.BatchNorm(), variables["params"], variables["batch_stats"]
    )
    assert set(stats) == {"moving_mean", "moving_variance"} and set(affine) == {"gamma", "beta"}
    assert epsilon == 1e-5


def test_converters_refuse_what_does_not_convert():
    x = random_batches((8, 3), steps=1)[0]
    renorm = jbn.BatchNorm(renorm=True).init(jax.random.key(0), x, is_training=False)
    with pytest.raises(ValueError, match="moving_stddev"):
        jbn.linen.to_flax_variables(renorm)
    with pytest.raises(ValueError, match="batch_stats"):
        jbn.linen.from_flax_variables({"params": {"scale": np.ones(3)}})


def test_axis_name_under_vmap_as_flax_and_init_outside_it():
    # flax's init does not reduce over axis_name, so it may run in training mode outside the
    # mapped axis; under it the statistics are those of every member's batch together.
    xs = np.stack(random_batches((4, 3), steps=3, loc=0.5, spread=1.5))  # 3 "devices"
    results = []
    for cls in (nn.BatchNorm, jbn.linen.BatchNorm):
        layer = cls(use_running_average=False, momentum=0.5, axis_name="devices")
        variables = layer.init(jax.random.key(0), xs[0])
        apply = lambda x, layer=layer, variables=variables: layer.apply(
            variables, x, mutable=["batch_stats"]
        )
        results.append(jax.vmap(apply, axis_name="devices")(xs))
    _close_trees(results[1], results[0])
    want = (xs - xs.mean((0, 1))) / np.sqrt(xs.var((0, 1)) + 1e-5)
    np.testing.assert_allclose(results[1][0], want, **F32_TOL)


def test_a_layer_called_twice_shares_its_variables():
    class Twice(nn.Module):
        batch_norm: object

        @nn.compact
        def __call__(self, x):
            norm = self.batch_norm(use_running_average=True, name="shared")
            return norm(x) + norm(2 * x)

    x = random_batches((4, 3), steps=1)[0]
    variables = Twice(nn.BatchNorm).init(jax.random.key(0), x)
    assert jax.tree.map(np.shape, Twice(jbn.linen.BatchNorm).init(jax.random.key(0), x)) == (
        jax.tree.map(np.shape, variables)
    )
    variables = jax.tree.map(lambda v: v + 0.5, variables)
    np.testing.assert_allclose(
        Twice(jbn.linen.BatchNorm).apply(variables, x),
        Twice(nn.BatchNorm).apply(variables, x),
        **F32_TOL,
    )


def test_flax_argument_table_names_flax_arguments_of_the_same_meaning():
    # Against flax's own signatures: every entry is an argument of both flax layers and of
    # jbn's, and each converted value reaches jbn's layer unchanged.
    import dataclasses
    import inspect

    linen_fields = {field.name for field in dataclasses.fields(nn.BatchNorm)}
    nnx_parameters = set(inspect.signature(nnx.BatchNorm.__init__).parameters)
    for name, flax_name in jbn.linen.FLAX_ARGUMENTS.items():
        assert name in jbn.layer.LAYER_ARGUMENTS, name
        assert flax_name in linen_fields and flax_name in nnx_parameters, flax_name
    flax_layer = nnx.BatchNorm(
        6,
        momentum=0.8,
        epsilon=1e-4,
        use_bias=False,
        use_scale=True,
        axis=-1,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )
    options = jbn.nnx.from_flax(flax_layer).options
    for name, flax_name in jbn.linen.FLAX_ARGUMENTS.items():
        assert getattr(options, name) == getattr(flax_layer, flax_name), name
    assert (options.decay, options.center, options.scale) == (0.8, False, True)
    drop_in = jbn.linen.BatchNorm(momentum=0.8, use_bias=False, epsilon=1e-4)
    x = random_batches((4, 6), steps=1)[0]
    flax_module = nn.BatchNorm(momentum=0.8, use_bias=False, epsilon=1e-4)
    variables = flax_module.init(jax.random.key(0), x, use_running_average=False)
    expected, _ = flax_module.apply(
        variables, x, use_running_average=False, mutable=["batch_stats"]
    )
    y, _ = drop_in.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, expected, **F32_TOL)

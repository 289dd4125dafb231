"""jbn.BatchNorm's argument checks: every bad argument gets a ValueError or TypeError naming it, at
construction or trace time."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx
from jbn_testing import random_batches

import jbn

# ---------------------------------------------------------------------------------------------
# Constructor arguments.


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(data_format="NCWH"), ValueError, "data_format"),
        (dict(param_initializers={"scale": jnp.ones}), ValueError, "param_initializers.*scale"),
        (dict(param_initializers={"gamma": 1.0}), TypeError, "param_initializers"),
        # haiku refuses these too; both arguments are named.
        (
            dict(param_initializers={"gamma": jnp.ones}),
            ValueError,
            r"param_initializers\['gamma'\].*scale=False",
        ),
        (
            dict(center=False, param_initializers={"beta": jnp.zeros}),
            ValueError,
            r"param_initializers\['beta'\].*center=False",
        ),
        (dict(param_regularizers={"moving_mean": abs}), ValueError, "moving_mean"),
        (dict(renorm=True, renorm_clipping={"r_max": 3.0}), ValueError, "renorm_clipping.*r_max"),
        (dict(renorm_clipping={"rmax": 3.0}), ValueError, "renorm"),
        (dict(decay=1.0), ValueError, "decay"),
        (dict(renorm_decay=-0.1), ValueError, "renorm_decay"),
        (dict(epsilon=0.0), ValueError, "epsilon"),
        (dict(fused=True, renorm=True), ValueError, "fused"),
        (dict(fused="yes"), TypeError, "fused"),
        (dict(virtual_batch_size=0), ValueError, "virtual_batch_size"),
        (dict(axis_index_groups=[[0, 1]]), ValueError, "axis_name"),
        (dict(activation_fn="relu"), TypeError, "activation_fn"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        jbn.BatchNorm(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(dtype=jnp.int32), TypeError, "dtype"),
        (dict(param_dtype=jnp.int8), TypeError, "param_dtype"),
        (dict(decay="0.9"), TypeError, "decay"),
        (dict(epsilon="1e-3"), TypeError, "epsilon"),
        (dict(is_training="False"), TypeError, "is_training"),
        (dict(center="yes"), TypeError, "center"),
        (dict(data_format="NCHW", axis=1), ValueError, "data_format.*axis"),
        (dict(axis=1.5), TypeError, "axis must be an int or a sequence of ints"),
        (dict(decay=None, zero_debias_moving_mean=True), ValueError, "zero_debias"),
    ],
)
def test_more_bad_constructor_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        jbn.BatchNorm(**kwargs)


@pytest.mark.parametrize(
    ("clipping", "error", "pattern"),
    [
        ({"rmin": 2.0, "rmax": 1.0}, ValueError, r"renorm_clipping\['rmin'\].*rmax"),
        ({"dmax": -0.5}, ValueError, r"renorm_clipping\['dmax'\]"),
        ({"rmax": float("nan")}, ValueError, r"renorm_clipping\['rmax'\]"),
        ({"rmax": "3"}, TypeError, r"renorm_clipping\['rmax'\]"),
        ({"rmin": None, "dmax": [1.0]}, TypeError, r"renorm_clipping\['dmax'\]"),
    ],
)
def test_renorm_clipping_checked_at_construction(clipping, error, pattern):
    with pytest.raises(error, match=pattern):
        jbn.BatchNorm(renorm=True, renorm_clipping=clipping)


# ---------------------------------------------------------------------------------------------
# Inputs and call arguments.


@pytest.mark.parametrize("shape", [(8,), (2, 2, 2, 2, 2, 2)])
def test_bad_input_rank(shape):
    module = jbn.BatchNorm()
    with pytest.raises(ValueError, match="rank"):
        module.init(jax.random.key(0), jnp.ones(shape), is_training=False)


def test_bad_call_arguments():
    x = random_batches((4, 3), steps=1)[0]
    module = jbn.BatchNorm()
    variables = module.init(jax.random.key(0), x, is_training=False)
    train = lambda m, x, **kw: m.apply(
        variables, x, is_training=True, mutable=["batch_stats"], **kw
    )
    with pytest.raises(TypeError, match="floating"):
        module.init(jax.random.key(0), jnp.ones((4, 3), jnp.int32), is_training=False)
    with pytest.raises(TypeError, match="mask"):
        train(module, x, mask=np.ones(4, np.int32))
    with pytest.raises(ValueError, match="mask"):
        train(module, x, mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="batch_weights"):
        train(module, x, batch_weights=np.ones((4, 2)))
    with pytest.raises(ValueError, match="fused"):
        train(jbn.BatchNorm(fused=True), x, batch_weights=np.ones(4))
    renorm = jbn.BatchNorm(renorm=True)
    renorm_vars = renorm.init(jax.random.key(0), x, is_training=False)
    with pytest.raises(ValueError, match="batch_weights"):
        renorm.apply(
            renorm_vars, x, is_training=True, mutable=["batch_stats"], batch_weights=np.ones(4)
        )
    with pytest.raises(TypeError, match="is_training"):
        jax.jit(lambda flag: module.apply(variables, x, is_training=flag))(True)


def test_ghost_batches_need_a_divisible_batch_and_a_batch_axis_outside_the_features():
    x = random_batches((6, 3), steps=1)[0]
    ghost = jbn.BatchNorm(virtual_batch_size=4)
    variables = ghost.init(jax.random.key(0), x, is_training=False)
    with pytest.raises(ValueError, match="not divisible by virtual_batch_size=4"):
        ghost.apply(variables, x, is_training=True, mutable=["batch_stats"])
    x = random_batches((6, 4, 3), steps=1)[0]
    over_batch = jbn.BatchNorm(virtual_batch_size=2, axis=(0, 2))
    variables = over_batch.init(jax.random.key(0), x, is_training=False)
    with pytest.raises(ValueError, match="axis must not include 0 with virtual_batch_size"):
        over_batch.apply(variables, x, is_training=True, mutable=["batch_stats"])


def test_is_training_must_be_a_bool():
    x = random_batches((4, 3), steps=1)[0]
    module = jbn.BatchNorm(decay=0.5)
    variables = module.init(jax.random.key(0), x, is_training=False)
    for flag in ("False", 0, 1.0, np.array([True, False])):
        with pytest.raises(TypeError, match="is_training"):
            module.apply(variables, x, is_training=flag, mutable=["batch_stats"])
    # numpy and concrete jax booleans are real booleans.
    for flag in (np.bool_(False), jnp.asarray(False)):
        _, updates = module.apply(variables, x, is_training=flag, mutable=["batch_stats"])
        np.testing.assert_array_equal(updates["batch_stats"]["moving_mean"], np.zeros(3))
    _, updates = module.apply(variables, x, is_training=np.bool_(True), mutable=["batch_stats"])
    mean, _, _ = reference.moments(x, (0,))
    np.testing.assert_allclose(
        updates["batch_stats"]["moving_mean"],
        reference.moving_average(0.0, mean.ravel(), 0.5),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    ("kwargs", "call"),
    [
        (dict(), {}),
        (dict(fused=False), {}),
        (dict(renorm=True), {}),
        (dict(), {"batch_weights": np.ones(1, np.float32)}),
        (dict(data_format="NCHW"), {}),
    ],
)
def test_training_on_one_value_per_feature_is_refused(kwargs, call):
    # Every training path (fused, composite, renorm, weighted) reaches the same check. With one
    # value per feature the output would be all beta and 50 steps would collapse the moving
    # variance; PyTorch refuses it too.
    shape = (1, 4, 1, 1) if kwargs.get("data_format") == "NCHW" else (1, 4)
    x = np.full(shape, 3.0, np.float32)
    module = jbn.BatchNorm(**kwargs)
    variables = module.init(jax.random.key(0), x, is_training=False)
    with pytest.raises(ValueError, match=re.escape(f"x of shape {shape} has one (feature axes")):
        module.apply(variables, x, is_training=True, mutable=["batch_stats"], **call)
    # Inference on one example is what the moving statistics are for.
    y = module.apply(variables, x, is_training=False)
    stats = {
        k: np.reshape(v, (-1,) + (1,) * (x.ndim - 2)) for k, v in variables["batch_stats"].items()
    }
    want = reference.normalize(x, stats["moving_mean"], stats["moving_variance"], 0.0, None, 1e-3)
    np.testing.assert_allclose(y, want, rtol=1e-6)


def test_ghost_batches_of_one_value_per_feature_are_refused():
    x = random_batches((4, 3), steps=1)[0]
    ghost = jbn.BatchNorm(virtual_batch_size=1)
    variables = ghost.init(jax.random.key(0), x, is_training=False)
    with pytest.raises(ValueError, match="one per ghost batch of virtual_batch_size=1"):
        ghost.apply(variables, x, is_training=True, mutable=["batch_stats"])


def test_layer_options_checks_any_subset_of_the_arguments_with_the_modules_defaults():
    # The one call that validates a layer's arguments without building a layer (train/ checks
    # its config with it): missing arguments take jbn.BatchNorm's defaults.
    options = jbn.layer.layer_options(decay=0.9, renorm=True, renorm_clipping={"rmax": 3.0})
    assert (options.decay, options.renorm, options.rmax, options.rmin) == (0.9, True, 3.0, None)
    defaults = jbn.BatchNorm()
    for name in jbn.layer.LAYER_ARGUMENTS:
        if name not in ("decay", "renorm", "renorm_clipping"):
            assert getattr(options, name) == getattr(defaults, name), name
    with pytest.raises(ValueError, match="zero_debias_moving_mean"):
        jbn.layer.layer_options(decay=None, zero_debias_moving_mean=True)
    with pytest.raises(TypeError, match="momentum"):
        jbn.layer.layer_options(momentum=0.9)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **kw),
        jbn.layer.layer_options,
    ],
    ids=["jbn.nnx.BatchNorm", "jbn.layer.layer_options"],
)
def test_an_unknown_argument_is_a_type_error_naming_it_and_listing_the_arguments(make):
    # A flax or PyTorch name (momentum) given to jbn's layer: the error says which name is
    # unknown and what the layer's arguments are.
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['momentum'\]") as error:
        make(decay=0.9, momentum=0.9)
    listed = str(error.value).partition("its arguments are ")[2]
    assert listed.rstrip(".").split(", ") == list(jbn.layer.LAYER_ARGUMENTS)


def test_an_unknown_linen_argument_is_a_type_error_naming_it():
    # The linen module's fields are LayerArguments' (inherited): a name that is not one is
    # still refused by the generated constructor, naming it.
    with pytest.raises(TypeError, match="'momentum'"):
        jbn.BatchNorm(decay=0.9, momentum=0.9)


def test_layer_options_stay_immutable_and_hashable():
    # Static arguments (nnx.static, equinox's static field, jit) must hash, and a built layer's
    # options must not change under it; dataclasses.replace makes checked new ones.
    options = jbn.layer.layer_options(axis=[1], renorm=True, renorm_clipping={"rmax": 2.0})
    same = jbn.layer.layer_options(axis=(1,), renorm=True, renorm_clipping={"rmax": 2})
    assert options == same and hash(options) == hash(same)
    assert hash(jbn.layer.LayerOptions()) == hash(jbn.layer.LayerOptions())
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.epsilon = 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.new_name = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        del options.epsilon
    assert options.epsilon == 0.001 and not hasattr(options, "new_name")
    replaced = dataclasses.replace(options, epsilon=0.1)
    assert replaced.epsilon == 0.1 and replaced != options and replaced.axis == (1,)
    with pytest.raises(ValueError, match="epsilon"):
        dataclasses.replace(options, epsilon=-1.0)


@pytest.mark.parametrize(
    ("arguments", "call", "fused_op"),
    [
        (dict(), dict(), True),
        (dict(virtual_batch_size=2), dict(mask=np.array([True, True, False, True])), True),
        (dict(fused=False), dict(), False),
        (dict(), dict(batch_weights=np.ones(4)), False),
        (dict(renorm=True), dict(), False),
    ],
    ids=["default", "ghost+mask", "fused=False", "batch_weights", "renorm"],
)
def test_the_fused_op_runs_wherever_it_applies(arguments, call, fused_op):
    # The documented choice of `fused=None`: the fused op (one custom_jvp) in training unless
    # renorm or frequency weights rule it out; False always the composite path. Read from the
    # traced program, whose derivative would otherwise be autodiff's, silently slower.
    x = random_batches((4, 3), steps=1)[0]
    module = jbn.BatchNorm(**arguments)
    variables = module.init(jax.random.key(0), x, is_training=False)
    program = jax.make_jaxpr(
        lambda x: module.apply(variables, x, is_training=True, mutable=["batch_stats"], **call)
    )(x)
    assert ("custom_jvp_call" in str(program)) == fused_op

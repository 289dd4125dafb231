"""jbn.nnx.BatchNorm: same numbers as the linen module, flax.nnx.BatchNorm where semantics agree,
and the NNX transforms (nnx.jit + nnx.Optimizer, nnx.grad, nnx.vmap)."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from flax import nnx
from jbn_testing import F32_TOL, init_variables, random_batches

import jbn

MODES = {
    "fused": (dict(), {}),
    "composite_nchw": (dict(fused=False, data_format="NCHW"), {}),
    "ghost_masked": (
        dict(virtual_batch_size=2),
        {"mask": np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)},
    ),
    "renorm": (dict(renorm=True, renorm_decay=0.7, renorm_clipping={"rmax": 1.2, "dmax": 0.5}), {}),
    "zero_debias_unbiased": (dict(zero_debias_moving_mean=True, unbiased_moving_variance=True), {}),
    "cumulative": (dict(decay=None), {}),
    "weighted": (dict(), {"batch_weights": np.array([1, 2, 0, 1, 3, 1, 1, 0.5], np.float32)}),
    "axis_tuple": (dict(axis=(1, 3)), {}),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_same_outputs_statistics_and_gradients_as_linen(mode):
    kwargs, call = MODES[mode]
    kwargs = {"decay": 0.8, "scale": True, **kwargs}
    shape = (8, 3, 2, 3)
    xs = random_batches(shape, steps=3)
    linen = jbn.BatchNorm(**kwargs)
    variables = init_variables(linen, xs[0])
    axes = jbn.layer.feature_axes(len(shape), kwargs.get("data_format"), kwargs.get("axis"))
    features = tuple(shape[a] for a in axes)
    model = jbn.nnx.BatchNorm(
        features if len(features) > 1 else features[0], **kwargs, rngs=nnx.Rngs(0)
    )
    rng = np.random.default_rng(1)
    gamma = rng.uniform(0.5, 2, features).astype(np.float32)
    variables["params"]["gamma"] = gamma
    jbn.nnx.from_linen_variables(model, variables)
    cotangent = rng.standard_normal(shape).astype(np.float32)

    def linen_loss(params, stats, x):
        y, updates = linen.apply(
            {"params": params, "batch_stats": stats},
            x,
            is_training=True,
            mutable=["batch_stats"],
            **call,
        )
        return jnp.sum(y * cotangent), (y, updates["batch_stats"])

    def nnx_loss(model, x):
        y = model(x, use_running_average=False, **call)
        return jnp.sum(y * cotangent), y

    for x in xs:
        (_, (y_ref, stats_ref)), (param_grads_ref, grad_x_ref) = jax.value_and_grad(
            linen_loss, argnums=(0, 2), has_aux=True
        )(variables["params"], variables["batch_stats"], x)
        # nnx.grad of the model and the input; the call moves the statistics in place.
        (grads, grad_x), y = nnx.grad(nnx_loss, argnums=(0, 1), has_aux=True)(model, x)
        np.testing.assert_allclose(y, y_ref, **F32_TOL)
        np.testing.assert_allclose(grad_x, grad_x_ref, **F32_TOL)
        for name in ("gamma", "beta"):
            np.testing.assert_allclose(grads[name][...], param_grads_ref[name], **F32_TOL)
        got = jbn.nnx.to_linen_variables(model)["batch_stats"]
        assert set(got) == set(stats_ref)
        for name, value in stats_ref.items():
            np.testing.assert_allclose(got[name], value, **F32_TOL, err_msg=name)
            assert got[name].dtype == value.dtype
        variables = {**variables, "batch_stats": stats_ref}
    # Evaluation agrees too, and moves nothing.
    model.eval()
    y_eval = model(xs[0])
    np.testing.assert_allclose(y_eval, linen.apply(variables, xs[0], is_training=False), **F32_TOL)
    np.testing.assert_array_equal(
        jbn.nnx.to_linen_variables(model)["batch_stats"]["moving_mean"],
        variables["batch_stats"]["moving_mean"],
    )


@pytest.mark.parametrize(
    ("shape", "data_format", "flax_axis"),
    [((6, 4, 4, 3), "NHWC", -1), ((6, 3, 4, 4), "NCHW", 1), ((16, 5), "NHWC", -1)],
)
def test_matches_flax_nnx_batch_norm(shape, data_format, flax_axis):
    decay, epsilon = 0.8, 1e-3
    features = shape[flax_axis]
    ours = jbn.nnx.BatchNorm(
        features,
        decay=decay,
        scale=True,
        epsilon=epsilon,
        data_format=data_format,
        rngs=nnx.Rngs(0),
    )
    theirs = nnx.BatchNorm(
        features,
        momentum=decay,
        epsilon=epsilon,
        axis=flax_axis,
        use_fast_variance=False,
        rngs=nnx.Rngs(0),
    )
    for model in (ours, theirs):
        model.train()
    for x in random_batches(shape, steps=3):
        np.testing.assert_allclose(ours(x), theirs(x), **F32_TOL)
    np.testing.assert_allclose(ours.moving_mean[...], theirs.mean[...], **F32_TOL)
    np.testing.assert_allclose(ours.moving_variance[...], theirs.var[...], **F32_TOL)
    for model in (ours, theirs):
        model.eval()
    x = random_batches(shape, steps=1, seed=9)[0]
    np.testing.assert_allclose(ours(x), theirs(x), **F32_TOL)


class SmallNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.norm = jbn.nnx.BatchNorm(
            4,
            decay=0.9,
            scale=True,
            param_regularizers={"gamma": lambda g: 1e-3 * jnp.sum(g**2)},
            rngs=rngs,
        )
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.conv(x)))
        return self.head(jnp.mean(x, (1, 2)))


def test_nnx_jit_with_optimizer_trains_and_eval_is_deterministic():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6, 6, 1)).astype(np.float32) * 3 + 5
    labels = (x.mean((1, 2, 3)) > 5).astype(np.int32)
    model = SmallNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, labels):
        def loss_fn(model):
            logits = model(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss + jbn.nnx.regularization_loss(model)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    initial_mean = np.asarray(model.norm.moving_mean[...])
    losses = [float(train_step(model, optimizer, x, labels)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert not np.allclose(model.norm.moving_mean[...], initial_mean)
    model.eval()
    stats = np.asarray(model.norm.moving_variance[...])
    eval_step = nnx.jit(lambda model, x: model(x))
    first, second = eval_step(model, x), eval_step(model, x[::-1])[::-1]
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-6)  # per example, no batch stats
    np.testing.assert_array_equal(model.norm.moving_variance[...], stats)


def test_nnx_vmap_ensemble_called_twice():
    members, decay = 3, 0.5

    @nnx.split_rngs(splits=members)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return jbn.nnx.BatchNorm(3, decay=decay, use_running_average=False, rngs=rngs)

    ensemble = create(nnx.Rngs(0))

    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def forward(model, x):
        return model(x)

    xs = random_batches((members, 8, 3), steps=2)
    moving_mean = np.zeros((members, 3))
    for x in xs:  # flax#4760: the second call is where flax's own layer breaks
        y = forward(ensemble, x)
        want, mean, _ = reference.batch_norm(x, 1, None, None, 1e-3)
        np.testing.assert_allclose(y, want, **F32_TOL)
        moving_mean = reference.moving_average(moving_mean, mean[:, 0], decay)
    np.testing.assert_allclose(ensemble.moving_mean[...], moving_mean, rtol=1e-5)


class Nested(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.BatchNorm(3, momentum=0.9, epsilon=1e-3, rngs=rngs)
        self.blocks = nnx.List(
            [
                nnx.Sequential(nnx.Linear(3, 3, rngs=rngs), nnx.BatchNorm(3, rngs=rngs))
                for _ in range(2)
            ]
        )

    def __call__(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = nnx.relu(block(x))
        return x


def test_replace_flax_batch_norm_in_nested_model():
    model = Nested(nnx.Rngs(0))
    model.train()
    xs = random_batches((8, 3), steps=3)
    model(xs[0])  # move flax's statistics away from their initial values
    reference = nnx.clone(model)
    jbn.nnx.replace_flax_batch_norm(model)
    layers = [model.stem, *(block.layers[1] for block in model.blocks)]
    assert all(isinstance(layer, jbn.nnx.BatchNorm) for layer in layers)
    assert not any(isinstance(n, nnx.BatchNorm) for _, n in nnx.iter_graph(model))
    # flax's default one-pass variance differs from jbn's exact one by round-off only here.
    for x in xs[1:]:
        np.testing.assert_allclose(model(x), reference(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        model.stem.moving_variance[...], reference.stem.var[...], rtol=1e-5, atol=1e-6
    )
    model.eval()
    reference.eval()
    np.testing.assert_allclose(model(xs[0]), reference(xs[0]), rtol=1e-4, atol=1e-4)


def test_constructor_checks_are_those_of_linen():
    for kwargs, error in (
        (dict(decay="0.9"), TypeError),
        (dict(renorm=True, renorm_clipping={"rmax": float("nan")}), ValueError),
        (dict(dtype=jnp.int32), TypeError),
        (dict(use_running_average="False"), TypeError),
    ):
        name = next(iter(kwargs)) if "renorm_clipping" not in kwargs else "renorm_clipping"
        with pytest.raises(error, match=name):
            jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **kwargs)
    model = jbn.nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_running_average"):
        model(np.ones((2, 3), np.float32))
    # haiku's check: an initializer for a parameter the layer does not create.
    with pytest.raises(ValueError, match=r"param_initializers\['beta'\].*center=False"):
        jbn.nnx.BatchNorm(3, center=False, param_initializers={"beta": jnp.zeros}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_features"):
        model(np.ones((2, 4), np.float32), use_running_average=True)


def test_training_on_one_value_per_feature_is_refused_and_statistics_stay():
    model = jbn.nnx.BatchNorm(4, decay=0.5, rngs=nnx.Rngs(0))
    x = np.full((1, 4), 3.0, np.float32)
    model.train()
    with pytest.raises(ValueError, match=re.escape("x of shape (1, 4) has one (feature axes")):
        model(x)
    np.testing.assert_array_equal(model.moving_variance[...], np.ones(4))
    model.eval()  # one example at inference is what the moving statistics are for
    np.testing.assert_allclose(
        model(x), reference.normalize(x, 0.0, 1.0, 0.0, None, 1e-3), rtol=1e-6
    )


@pytest.mark.parametrize("kwargs", [dict(decay=0.0), dict(decay=0.5, renorm=True)])
def test_float64_parameters_keep_float64_statistics_under_x64(kwargs):
    # Issue 19: with float32 statistics, inference after a step with decay=0 on float64
    # N(1e4, 1) data differed from that step's training output by 2e-4.
    with jax.enable_x64():
        x = np.random.default_rng(0).normal(1e4, 1.0, (16, 3))
        model = jbn.nnx.BatchNorm(3, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **kwargs)
        assert {v.dtype for v in nnx.state(model, nnx.BatchStat).values()} == {np.dtype(np.float64)}
        y_train = model(x, use_running_average=False)
        y_eval = model(x, use_running_average=True)
        mean, variance, _ = reference.moments(x, 0, keepdims=False)
        if kwargs.get("renorm"):  # TF1's moving stddev, from sqrt(1) (the initial variance)
            stddev = reference.moving_average(1.0, np.sqrt(variance + 1e-3), kwargs["decay"])
            variance = stddev**2 - 1e-3
        else:
            np.testing.assert_allclose(y_eval, y_train, rtol=0, atol=1e-9)
        mean = reference.moving_average(0.0, mean, kwargs["decay"])
        np.testing.assert_allclose(model.moving_mean[...], mean, rtol=1e-12)
        np.testing.assert_allclose(model.moving_variance[...], variance, rtol=1e-9)
        want = reference.normalize(x, mean, variance, 0.0, None, 1e-3)
        np.testing.assert_allclose(y_eval, want, rtol=0, atol=1e-9)
        default = jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
        assert default.moving_mean[...].dtype == jnp.float32


def test_both_modules_take_every_layer_argument_with_the_same_default():
    # The arguments are declared once, as jbn.layer.LayerArguments' fields: they are the linen
    # module's fields, and the NNX module takes each of them by keyword with the same default.
    arguments = dataclasses.fields(jbn.layer.LayerArguments)
    assert tuple(field.name for field in arguments) == jbn.layer.LAYER_ARGUMENTS
    assert len(arguments) == 21 and "unbiased_moving_variance" in jbn.layer.LAYER_ARGUMENTS
    declared = lambda fields: [(f.name, f.type, f.default) for f in fields]
    linen_fields = dataclasses.fields(jbn.BatchNorm)
    assert declared(linen_fields[: len(arguments)]) == declared(arguments)
    assert [f.name for f in linen_fields[len(arguments) :]] == ["is_training", "parent", "name"]
    defaults = {field.name: field.default for field in arguments}
    explicit = jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **defaults)
    implicit = jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    assert explicit.options == implicit.options == jbn.layer.LayerOptions()
    assert jbn.BatchNorm(**defaults)._options() == jbn.BatchNorm()._options() == explicit.options
    parameters = inspect.signature(jbn.nnx.BatchNorm.__init__).parameters
    assert parameters["rngs"].default is inspect.Parameter.empty
    assert parameters["rngs"].kind is inspect.Parameter.KEYWORD_ONLY


def test_nnx_guide_example_runs():
    # The NNX guide's first example (the docs build runs it too; this runs it in both CI legs).
    guide = (pathlib.Path(__file__).parents[1] / "docs" / "guides" / "nnx.md").read_text()
    code = re.search(r"```\{code-cell\} ipython3\n(.*?)```", guide, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/guides/nnx.md", "exec"), namespace)
    assert namespace["losses"][-1] < namespace["losses"][0]


# ---------------------------------------------------------------------------------------------
# NNX conventions: trains by default, nnx.view, epsilon assignment, switching with an optimizer.


class ViewBlock(nnx.Module):
    """flax's module_test.py::test_view Block with jbn's layer for nnx.BatchNorm."""

    def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=False, rngs=rngs)
        self.batch_norm = jbn.nnx.BatchNorm(10, use_running_average=False, rngs=rngs)


@pytest.mark.parametrize("graph", [True, False])
def test_nnx_view_sets_the_mode_as_for_flax_layers(graph):
    block = ViewBlock(2, 5, rngs=nnx.Rngs(0))
    new_block = nnx.view(block, deterministic=True, use_running_average=True, graph=graph)
    assert new_block.dropout.deterministic is True
    assert new_block.batch_norm.use_running_average is True
    assert block.batch_norm.use_running_average is False  # a view, not a change
    assert new_block.linear.kernel is block.linear.kernel
    new_block = nnx.view(block, only=nnx.Dropout, deterministic=True, graph=graph)
    assert new_block.batch_norm.use_running_average is False
    with pytest.raises(ValueError, match=r"Unused keys found in nnx.view: \['unknown'\]"):
        nnx.view(block, use_running_average=True, unknown=True, graph=graph)
    with pytest.raises(TypeError, match="use_running_average"):
        nnx.view(block, use_running_average="True", graph=graph)
    assert "use_running_average" in nnx.view_info(block).split("BatchNorm:")[1]


@pytest.mark.parametrize("graph", [True, False])
def test_basic_view_example_trains_and_evaluates(graph):
    # flax's integration_test.py::test_basic_view_example, with jbn's layer.
    class Model(nnx.Module):
        def __init__(self, din, dmid, dout, rngs: nnx.Rngs):
            self.linear = nnx.Linear(din, dmid, rngs=rngs)
            self.bn = jbn.nnx.BatchNorm(dmid, decay=0.9, rngs=rngs)
            self.linear_out = nnx.Linear(dmid, dout, rngs=rngs)

        def __call__(self, x):
            return self.linear_out(nnx.relu(self.bn(self.linear(x))))

    model = Model(2, 16, 3, rngs=nnx.Rngs(0))
    train_model = nnx.view(model, use_running_average=False, graph=graph)
    eval_model = nnx.view(model, use_running_average=True, graph=graph)
    optimizer = nnx.Optimizer(train_model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit(graph=graph)
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    x = jax.random.normal(jax.random.key(0), (8, 2)) * 2 + 3
    y = jax.random.normal(jax.random.key(1), (8, 3))
    hidden = np.asarray(model.linear(x))
    train_step(train_model, optimizer, x, y)
    # The view shares the variables: the training step moved the statistics of both models.
    np.testing.assert_allclose(eval_model.bn.moving_mean[...], 0.1 * hidden.mean(0), rtol=1e-5)
    stats = np.asarray(model.bn.moving_variance[...])
    eval_model(x)
    np.testing.assert_array_equal(model.bn.moving_variance[...], stats)


def test_fresh_layer_trains_under_jit_like_nnx_batch_norm():
    """No model.train(): the default is training, as nnx.BatchNorm's (and TF1's
    is_training=True); eval()/train() switch it."""
    model = SmallNet(nnx.Rngs(0))
    flax_layer = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    assert model.norm.use_running_average is flax_layer.use_running_average is False
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x = random_batches((8, 6, 6, 1), steps=1)[0]

    @nnx.jit
    def train_step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    hidden = np.asarray(model.conv(x))
    train_step(model, optimizer, x)
    decay = model.norm.decay
    np.testing.assert_allclose(
        model.norm.moving_mean[...], (1 - decay) * hidden.mean((0, 1, 2)), rtol=1e-4, atol=1e-7
    )
    model.eval()
    assert model.norm.use_running_average is True
    model.train()
    assert model.norm.use_running_average is False


def test_assigned_epsilon_is_used_and_checked():
    x = random_batches((8, 3), steps=1)[0]
    model = jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    flax_layer = nnx.BatchNorm(3, momentum=model.decay, rngs=nnx.Rngs(0))
    model.epsilon = flax_layer.epsilon = 4.0  # large, so that it shows
    want, _, _ = reference.batch_norm(x, 0, None, None, 4.0)
    y = model(x)
    np.testing.assert_allclose(y, want, **F32_TOL)
    np.testing.assert_allclose(y, flax_layer(x), rtol=1e-4, atol=1e-5)
    model.eval()
    flax_layer.eval()
    np.testing.assert_allclose(model(x), flax_layer(x), **F32_TOL)
    moving_mean, moving_variance = model.moving_mean[...], model.moving_variance[...]
    want = (x - moving_mean) / np.sqrt(moving_variance + 4.0)
    np.testing.assert_allclose(model(x), want, **F32_TOL)
    for bad, error in ((0.0, ValueError), ("1e-3", TypeError)):
        with pytest.raises(error, match="epsilon"):
            model.epsilon = bad
    assert model.epsilon == 4.0


def test_assigned_decay_is_checked_at_once_and_used():
    x = random_batches((8, 3), steps=1)[0]
    model = jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    for bad, error in ((1.5, ValueError), ("0.9", TypeError)):
        with pytest.raises(error, match="decay"):
            model.decay = bad
    model.decay = 0.5
    model(x)
    np.testing.assert_allclose(model.moving_mean[...], 0.5 * x.mean(0), rtol=1e-6, atol=1e-7)


class FlaxNet(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, epsilon=1e-3, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.linear(x))


def test_replace_flax_batch_norm_before_or_after_the_optimizer():
    x = random_batches((8, 3), steps=1)[0]
    target = np.random.default_rng(1).standard_normal((8, 3)).astype(np.float32)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        optimizer.update(model, grads)

    def run(switch):
        model = FlaxNet(nnx.Rngs(0))
        if switch == "before":
            jbn.nnx.replace_flax_batch_norm(model)
        optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
        step(model, optimizer)  # Adam's moments are no longer zero
        if switch == "after":
            jbn.nnx.replace_flax_batch_norm(model, optimizer=optimizer)
        for _ in range(3):
            step(model, optimizer)
        return model

    flax_model = run(None)
    for switch in ("before", "after"):
        model = run(switch)
        assert isinstance(model.bn, jbn.nnx.BatchNorm)
        np.testing.assert_allclose(model.bn.gamma[...], flax_model.bn.scale[...], rtol=1e-4)
        np.testing.assert_allclose(model.bn.beta[...], flax_model.bn.bias[...], atol=1e-4)
        np.testing.assert_allclose(
            model.linear.kernel[...], flax_model.linear.kernel[...], rtol=1e-4, atol=1e-5
        )
    # Overrides that add or remove parameters cannot carry the optimizer's state over.
    model = FlaxNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
    with pytest.raises(ValueError, match="after replace_flax_batch_norm"):
        jbn.nnx.replace_flax_batch_norm(model, optimizer=optimizer, center=False)

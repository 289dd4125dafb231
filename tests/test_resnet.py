"""train/resnet.py switched from flax.linen.BatchNorm to jbn.linen.BatchNorm by its norm partial
alone, run side by side with flax's layer; benchmarks/resnet.py's main on tiny shapes."""

from __future__ import annotations

import re
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from benchmarks import resnet as resnet_benchmark
from train import resnet

# A deep network compounds float32 round-off: flax and jbn sum in different orders.
DEEP_TOL = dict(rtol=1e-4, atol=1e-5)


def tiny_resnet(batch_norm):
    # Two stages: the second starts with a stride-2 block, so it has the projection shortcut.
    return resnet.ResNet(
        stage_sizes=(1, 1),
        block_cls=resnet.ResNetBlock,
        num_classes=3,
        num_filters=2,
        batch_norm=batch_norm,
    )


def _close(got, want, tol):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **tol), got, want)


def test_the_norm_partial_alone_switches_the_resnet_to_jbn():
    rng = np.random.default_rng(0)
    images = rng.normal(0.5, 2.0, (6, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 6)
    flax_model, jbn_model = tiny_resnet(nn.BatchNorm), tiny_resnet(jbn.linen.BatchNorm)
    init = lambda model: jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)
    variables = init(flax_model)
    # Same names, shapes and initial values (the drop-in stores flax's names; the zero-init
    # scale of each block's last norm included), so no conversion is needed.
    _close(init(jbn_model), variables, dict(rtol=0, atol=0))
    assert set(variables["batch_stats"]["ResNetBlock_1"]) == {
        "BatchNorm_0",
        "BatchNorm_1",
        "norm_proj",
    }
    # Away from the initial values, so that every block's last scale is non-zero.
    variables = jax.tree.map(
        lambda v: v + rng.uniform(0.5, 1.0, v.shape).astype(v.dtype), variables
    )

    def train_loss(model):
        loss = partial(resnet_benchmark.training_loss, model)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(
            variables["params"], variables["batch_stats"], images, labels
        )

    (loss, (logits, stats)), grads = train_loss(jbn_model)
    (loss_want, (logits_want, stats_want)), grads_want = train_loss(flax_model)
    np.testing.assert_allclose(logits, logits_want, **DEEP_TOL)
    np.testing.assert_allclose(loss, loss_want, **DEEP_TOL)
    _close(stats, stats_want, DEEP_TOL)
    _close(grads, grads_want, DEEP_TOL)
    # Evaluation with the running statistics.
    evaluate = lambda model: jax.jit(lambda v: model.apply(v, images, train=False))(variables)
    np.testing.assert_allclose(evaluate(jbn_model), evaluate(flax_model), **DEEP_TOL)


def test_resnet18_shapes():
    model = resnet.ResNet18(num_classes=10, num_filters=2)
    x = jnp.zeros((2, 32, 32, 3))
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    params = shapes["params"]
    assert params["conv_init"]["kernel"].shape == (3, 3, 3, 2)  # the CIFAR stem
    assert [k for k in params if k.startswith("ResNetBlock")] == [
        f"ResNetBlock_{i}" for i in range(8)
    ]
    assert params["ResNetBlock_7"]["Conv_1"]["kernel"].shape == (3, 3, 16, 16)  # 8 x width
    assert "norm_proj" in params["ResNetBlock_2"] and "norm_proj" not in params["ResNetBlock_1"]
    logits = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False), shapes, jax.ShapeDtypeStruct(x.shape, x.dtype)
    )
    assert logits.shape == (2, 10)


def test_benchmark_runs_on_tiny_shapes(capsys):
    resnet_benchmark.main(
        "--batch 4 --image 8 --width 2 --blocks 1 --steps 1 --offsets 0 1e3 --reps 1 "
        "--compile-rounds 1".split()
    )
    out = capsys.readouterr().out
    assert "`python benchmarks/resnet.py --batch 4" in out.splitlines()[0]  # the command
    rows = {
        line.split("|")[1].strip(): [float(cell) for cell in line.split("|")[3:-1]]
        for line in out.splitlines()
        if line.startswith("| N(")
    }
    assert list(rows) == ["N(0, 1)", "N(1000, 1)"]
    # A float32 step of either variant is close to the float64 step from the same state.
    loss_errors = rows["N(0, 1)"][:2]
    assert all(0 <= error < 1e-4 for error in loss_errors), loss_errors
    for mode in ("train step", "eval step"):
        assert re.search(rf"^\| {mode} \|( [0-9.]+ \|){{3}}$", out, re.M), mode
        assert re.search(rf"^\| {mode} \|( [0-9.]+ \|){{5}}$", out, re.M), mode


def test_benchmark_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit) as raised:
        resnet_benchmark.main(["--batch", "1"])
    assert raised.value.code == 2
    assert "error: --batch must be at least 2" in capsys.readouterr().err

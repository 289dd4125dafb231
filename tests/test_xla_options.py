"""train/xla_options.py: what `cpu_convolutions` compiles, and that the numbers stay the same."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testing
from jax import lax

import jbn
from train import config_checks, devices, xla_options

NHWC = ("NHWC", "HWIO", "NHWC")
EIGEN = xla_options.compiler_options("eigen", "cpu")


def conv(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)


def conv_loss(x, kernel, cotangent):
    """A loss whose gradients are the convolution's input and kernel gradients."""
    return jnp.sum(conv(x, kernel) * cotangent)


def conv_inputs(shape=(4, 8, 8, 32), features=32):
    """Wide enough for XLA to hand the convolution to YNNPACK by default (>= 32 channels)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = rng.standard_normal((3, 3, shape[-1], features)).astype(np.float32)
    cotangent = rng.standard_normal((*shape[:-1], features)).astype(np.float32)
    return x, kernel, cotangent


def ynn_fusion_ops(compiled_text: str) -> set[str]:
    """The operations inside the YNNPACK fusions of a compiled HLO module."""
    bodies, name = {}, None
    for line in compiled_text.splitlines():
        header = re.match(r"^(%\S+) \(", line)
        if header:
            name = header.group(1)
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line)
    ops = set()
    for line in compiled_text.splitlines():
        if '"kind":"__ynn_fusion"' in line:
            called = re.search(r"calls=(%[^,\s]+)", line).group(1)
            for body_line in bodies[called]:
                op = re.search(r"= \S+ ([a-z-]+)\(", body_line)
                if op:
                    ops.add(op.group(1))
    return ops


def compiled_text(fn, *args, options) -> str:
    return jax.jit(fn, compiler_options=options).lower(*args).compile().as_text()


def test_eigen_takes_convolutions_out_of_ynnpack_and_keeps_its_reductions():
    x, kernel, cotangent = conv_inputs()

    def step(x, kernel):
        """The convolution's gradients and batch norm's statistics of its output."""
        grads = jax.grad(conv_loss, argnums=(0, 1))(x, kernel, cotangent)
        return grads, jbn.moments(conv(x, kernel), (0, 1, 2))

    default_ops = ynn_fusion_ops(compiled_text(step, x, kernel, options={}))
    eigen_ops = ynn_fusion_ops(compiled_text(step, x, kernel, options=EIGEN))
    assert "convolution" in default_ops  # XLA's default: YNNPACK convolutions
    assert "convolution" not in eigen_ops
    assert "reduce" in eigen_ops  # batch norm's statistics stay in YNNPACK


def test_eigen_and_ynnpack_compute_the_same_convolution():
    x, kernel, cotangent = conv_inputs((16, 16, 16, 64), 64)
    with jax.enable_x64():
        as64 = lambda a: jnp.asarray(a, jnp.float64)
        expected_value = np.asarray(conv(as64(x), as64(kernel)))
        expected_grads = jax.grad(conv_loss, argnums=(0, 1))(as64(x), as64(kernel), as64(cotangent))
    for options in ({}, EIGEN):
        value = jax.jit(conv, compiler_options=options)(x, kernel)
        grads = jax.jit(jax.grad(conv_loss, argnums=(0, 1)), compiler_options=options)(
            x, kernel, cotangent
        )
        # Sums of 576 (value, input gradient) and 4,096 (kernel gradient) products of unit
        # normals: float32 round-off; a wrong tap or transposed kernel is off by O(1).
        np.testing.assert_allclose(value, expected_value, rtol=1e-4, atol=1e-4)
        for grad, expected in zip(grads, expected_grads):
            np.testing.assert_allclose(grad, np.asarray(expected), rtol=1e-4, atol=5e-4)


def test_options_apply_to_cpu_and_eigen_only():
    assert EIGEN == {xla_options.YNN_FUSION_TYPES: xla_options.YNN_WITHOUT_CONVOLUTIONS}
    assert xla_options.compiler_options("ynnpack", "cpu") == {}
    assert xla_options.compiler_options("eigen", "gpu") == {}
    assert xla_options.compiler_options("eigen", "tpu") == {}


def test_unknown_choice_is_named():
    with pytest.raises(ValueError, match=r"cpu_convolutions must be one of \('eigen', 'ynnpack'\)"):
        xla_options.compiler_options("onednn", "cpu")
    with pytest.raises(config_checks.ConfigError, match="cpu_convolutions must be one of"):
        devices.device_layout(train_testing.smoke_config(cpu_convolutions="onednn"))


def test_an_xla_without_the_option_warns_and_keeps_its_defaults(monkeypatch):
    monkeypatch.setattr(xla_options, "YNN_WITHOUT_CONVOLUTIONS", "LIBRARY_FUSION_TYPE_UNKNOWN")
    with pytest.warns(UserWarning, match="does not accept the compiler options"):
        assert xla_options.compiler_options("eigen", "cpu") == {}


@pytest.mark.parametrize("choice", xla_options.CPU_CONVOLUTIONS)
def test_device_layout_compiles_the_steps_with_the_configs_choice(choice):
    layout = devices.device_layout(train_testing.smoke_config(cpu_convolutions=choice))
    assert dict(layout.compiler_options) == xla_options.compiler_options(choice, "cpu")
    x, kernel, cotangent = conv_inputs()
    step = layout.compile(lambda x, batch: jax.grad(conv_loss)(x, *batch), donate_state=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback on the jaxlib under test
        text = step.lower(x, (kernel, cotangent)).compile().as_text()
    assert ("convolution" in ynn_fusion_ops(text)) == (choice == "ynnpack")

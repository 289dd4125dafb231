"""Train-step throughput of the document's network: jbn vs flax.linen.BatchNorm vs PyTorch.

    python benchmarks/throughput.py [--batch 128] [--image 32,32,3] [--rounds 7] [--steps 8]
        [--scan 4] [--compile-rounds 3]

Every variant trains the same network (train/models.py: five 3x3 convs with BN + ReLU, Adam,
softmax cross-entropy) on the same random batch, and the variants are interleaved: each round
runs `--steps` steps of every variant in turn, so load changes on a shared machine hit all of
them alike. The table reports the median over rounds of images/s and ratios to `jbn`.

JAX variants, each compiled as the train app compiles its steps (on CPU with the XLA options of
the default config's `cpu_convolutions`, 'eigen': train/xla_options.py) unless said otherwise:
* jbn: `jbn.BatchNorm` (the default config's network, with the convolutions and max pools of
  train/layers.py), one jitted step per dispatch, the train state donated so XLA updates it in
  place;
* jbn-ynnpack-convs: `jbn` compiled with XLA's default options, i.e. with its YNNPACK
  convolutions (`cpu_convolutions='ynnpack'`);
* jbn-flax-layers: `jbn` with flax's own convolutions and max pools (`model.fast_layers=False`);
* flax: the default network with `flax.linen.BatchNorm(use_fast_variance=True)` (flax's
  default) in place of `jbn.BatchNorm`;
* jbn-scanN (with `--scan N`, N > 1): `jbn` with N steps in one dispatch, a `lax.scan` over a
  stack of N batches: the train loop's `steps_per_dispatch=N` (default 4);
* jbn-no-donate: `jbn` without buffer donation;
* no-bn: the network without batch norm (what BN costs).
PyTorch variants (if torch is installed, `pip install 'jbn[torch]'`): NCHW and channels_last,
`torch.nn.BatchNorm2d(momentum=1 - decay, eps=epsilon)`.

A second table gives the time to trace and compile the train step of `jbn`, `flax` and
`jbn-flax-layers` (all with the default config's XLA options), interleaved over
`--compile-rounds` rounds (each a fresh model and `jit`, so no cache is hit; the persistent
compilation cache is off), medians and ratios to `flax`.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# train/ and configs/ are imported from the repository root: the jbn wheel carries only jbn.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from train import models, xla_options

REPO = pathlib.Path(__file__).resolve().parent.parent


def default_config():
    """configs/default.py's config (configs/ is a folder of files, no package)."""
    spec = importlib.util.spec_from_file_location("default_config", REPO / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def default_model_config():
    """The `model` sub-config of configs/default.py."""
    return default_config().model


def compiler_options(cpu_convolutions: str | None = None) -> dict[str, str]:
    """The XLA options the train app compiles its steps with on this backend (train/devices.py),
    for `cpu_convolutions` (default: the default config's)."""
    choice = cpu_convolutions or default_config().cpu_convolutions
    return xla_options.compiler_options(choice, jax.default_backend())


def jax_loss(model) -> Callable:
    """loss_fn(params, batch_stats, images, labels) -> (mean cross-entropy, new batch_stats)."""

    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            is_training=True,
            mutable=["batch_stats", "losses"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates.get("batch_stats", batch_stats)

    return loss_fn


def jax_train_step(model, optimizer: optax.GradientTransformation) -> Callable:
    """step((params, batch_stats, opt_state), images, labels) -> the state after one step."""
    loss_fn = jax_loss(model)

    def step(state, images, labels):
        params, batch_stats, opt_state = state
        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    return step


def jax_initial_state(model, optimizer: optax.GradientTransformation, batch: np.ndarray) -> tuple:
    """(params, batch_stats, opt_state) of the network initialized from seed 0."""
    variables = model.init(jax.random.key(0), batch[:1], is_training=False)
    params = variables["params"]
    return params, variables.get("batch_stats", {}), optimizer.init(params)


def jax_variant(
    model_config,
    batch,
    labels,
    *,
    donate: bool,
    scan_steps: int = 1,
    cpu_convolutions: str | None = None,
) -> Callable:
    """Returns run(steps) that performs `steps` training steps (a multiple of scan_steps),
    compiled with `compiler_options(cpu_convolutions)`."""
    model = models.create_model(model_config, num_classes=10)
    optimizer = optax.adam(1e-3)
    state = jax_initial_state(model, optimizer, batch)
    step = jax_train_step(model, optimizer)

    images, labels = jnp.asarray(batch), jnp.asarray(labels)
    if scan_steps > 1:
        # As the train app's steps_per_dispatch: a scan over a stack of batches (copies of the
        # one batch here, but loop-variant to XLA, so nothing is hoisted out of the loop).
        images, labels = (jnp.stack([a] * scan_steps) for a in (images, labels))

        def multi_step(state, images, labels):
            def body(state, batch):
                return step(state, *batch), None

            return jax.lax.scan(body, state, (images, labels))[0]

        step_fn = multi_step
    else:
        step_fn = step
    compiled = jax.jit(
        step_fn,
        donate_argnums=(0,) if donate else (),
        compiler_options=compiler_options(cpu_convolutions),
    )
    holder = {"state": state}

    def run(steps: int) -> None:
        for _ in range(steps // scan_steps):
            holder["state"] = compiled(holder["state"], images, labels)
        jax.block_until_ready(holder["state"])

    return run


def compile_seconds(model_config, batch, labels) -> tuple[float, float]:
    """(trace + lower, XLA compile) seconds of a fresh donated train step of this network."""
    model = models.create_model(model_config, num_classes=10)
    optimizer = optax.adam(1e-3)
    state = jax_initial_state(model, optimizer, batch)
    step = jax.jit(
        jax_train_step(model, optimizer), donate_argnums=(0,), compiler_options=compiler_options()
    )
    start = time.perf_counter()
    lowered = step.lower(state, jnp.asarray(batch), jnp.asarray(labels))
    traced = time.perf_counter()
    lowered.compile()
    return traced - start, time.perf_counter() - traced


def torch_network(model_config, channels: int):
    """The document's network in PyTorch (NCHW modules), BN as `torch.nn.BatchNorm2d`."""
    import torch

    layers, in_channels = [], channels
    features = (*model_config.features, 10)
    for index, out_channels in enumerate(features):
        layers += [
            torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=True),
            torch.nn.BatchNorm2d(
                out_channels,
                eps=model_config.batch_norm.epsilon,
                momentum=1 - model_config.batch_norm.decay,
            ),
            torch.nn.ReLU(),
        ]
        if index < len(features) - 1:
            # ceil_mode: TF's SAME pooling of an odd map (7 -> 4) keeps the last row.
            layers.append(torch.nn.MaxPool2d(2, 2, ceil_mode=True))
        in_channels = out_channels
    # A 4x4/4 SAME average pool of the final 2x2 map that ignores padding is its mean.
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    return torch.nn.Sequential(*layers)


class TorchSetup(NamedTuple):
    """The PyTorch network, its Adam optimizer and one NCHW batch in a given memory format."""

    net: Any
    optimizer: Any
    images: Any
    targets: Any


def torch_setup(model_config, batch: np.ndarray, labels: np.ndarray, memory_format) -> TorchSetup:
    """`torch_network` initialized from seed 0, Adam 1e-3, and `batch` (NHWC) as NCHW tensors."""
    import torch

    torch.manual_seed(0)
    net = torch_network(model_config, batch.shape[-1]).to(memory_format=memory_format)
    images = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
    return TorchSetup(
        net=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        images=images.contiguous(memory_format=memory_format),
        targets=torch.from_numpy(labels.astype(np.int64)),
    )


def torch_train_steps(setup: TorchSetup, steps: int) -> None:
    import torch

    for _ in range(steps):
        setup.optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(setup.net(setup.images), setup.targets).backward()
        setup.optimizer.step()


def _torch_variants(model_config, batch, labels) -> dict[str, Callable]:
    try:
        import torch
    except ImportError:
        return {}
    return {
        name: functools.partial(
            torch_train_steps, torch_setup(model_config, batch, labels, memory_format)
        )
        for name, memory_format in (
            ("torch-nchw", torch.contiguous_format),
            ("torch-channels_last", torch.channels_last),
        )
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image", default="32,32,3", help="H,W,C (the document: CIFAR-10)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=8, help="steps per variant per round")
    parser.add_argument(
        "--scan",
        type=int,
        default=4,
        help="steps per dispatch of the jbn-scan variant (0 or 1: no such variant)",
    )
    parser.add_argument(
        "--compile-rounds", type=int, default=3, help="rounds of the compile-time table (0: none)"
    )
    args = parser.parse_args()
    scan = args.scan if args.scan > 1 else 0
    if scan and args.steps % scan:
        parser.error("--steps must be a multiple of --scan")
    # Compile times must not come from a cache on disk.
    jax.config.update("jax_enable_compilation_cache", False)

    rng = np.random.default_rng(0)
    shape = (args.batch, *(int(s) for s in args.image.split(",")))
    batch = rng.standard_normal(shape).astype(np.float32)
    labels = rng.integers(0, 10, args.batch).astype(np.int32)

    config = default_model_config()
    flax_config = config.copy_and_resolve_references()
    flax_config.batch_norm_impl = "flax"
    flax_layers_config = config.copy_and_resolve_references()
    flax_layers_config.fast_layers = False
    no_bn_config = config.copy_and_resolve_references()
    no_bn_config.use_batch_norm = False
    variant = functools.partial(jax_variant, batch=batch, labels=labels)
    variants: dict[str, Callable] = {
        "jbn": variant(config, donate=True),
        "jbn-ynnpack-convs": variant(config, donate=True, cpu_convolutions="ynnpack"),
        "jbn-flax-layers": variant(flax_layers_config, donate=True),
        "flax": variant(flax_config, donate=True),
        **({f"jbn-scan{scan}": variant(config, donate=True, scan_steps=scan)} if scan else {}),
        "jbn-no-donate": variant(config, donate=False),
        "no-bn": variant(no_bn_config, donate=True),
        **_torch_variants(config, batch, labels),
    }
    for run in variants.values():  # compile and warm up
        run(args.steps)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run(args.steps)
            samples[name].append(args.batch * args.steps / (time.perf_counter() - start))

    print(
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC "
        f"{cpu_model()} ({os.cpu_count()} CPUs) jax={jax.__version__} "
        f"torch={_torch_version()} batch={args.batch} image={args.image} "
        f"rounds={args.rounds}x{args.steps} steps"
    )
    print("| variant | images/s (median) | vs jbn |")
    print("|---|---|---|")
    reference = float(np.median(samples["jbn"]))
    for name, values in samples.items():
        median = float(np.median(values))
        print(f"| {name} | {median:.0f} | {median / reference:.2f} |")
    if args.compile_rounds > 0:
        print_compile_times(
            {"jbn": config, "flax": flax_config, "jbn-flax-layers": flax_layers_config},
            batch,
            labels,
            args.compile_rounds,
        )


def print_compile_times(configs: dict, batch, labels, rounds: int) -> None:
    """Median trace and compile seconds per network over interleaved rounds, vs `flax`."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, model_config in configs.items():
            samples[name].append(compile_seconds(model_config, batch, labels))
    medians = {name: np.median(np.asarray(values), axis=0) for name, values in samples.items()}
    reference = medians["flax"]
    print()
    print(f"Train-step compile time, medians of {rounds} interleaved rounds:")
    print("| network | trace+lower s | compile s | compile vs flax | total vs flax |")
    print("|---|---|---|---|---|")
    for name, (trace, compile_) in medians.items():
        print(
            f"| {name} | {trace:.2f} | {compile_:.2f} | {compile_ / reference[1]:.2f} | "
            f"{(trace + compile_) / reference.sum():.2f} |"
        )


def cpu_model() -> str:
    """The CPU's model name as `lscpu` reports it (Linux), else the platform's guess."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_version() -> str:
    try:
        import torch
    except ImportError:
        return "none"
    return torch.__version__


if __name__ == "__main__":
    main()

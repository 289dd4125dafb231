"""Where a train step of the document's network spends its time on CPU, and what changes it.

    python benchmarks/profile_step.py breakdown [--batch 128] [--rounds 7] [--steps 10]
    python benchmarks/profile_step.py xla-flags [--batch 128] [--rounds 5] [--steps 10]

`breakdown` times the parts of one step side by side (interleaved rounds, medians), for XLA
and for PyTorch on the same network and batch (32x32x3 images, Adam, BN + ReLU):
* step: the whole train step (forward, backward, Adam, moving averages);
* forward+backward: gradients only, no optimizer;
* forward: the training-mode forward pass alone;
* convolutions fwd+bwd: the five convolutions (with bias) alone, gradients w.r.t. the kernels
  and the input, in NHWC and in NCHW (XLA) / contiguous and channels_last (PyTorch);
* adam: the optimizer update alone on the network's parameters;
* dispatch: a jitted step that passes the whole train state through unchanged (donated), i.e.
  what calling a compiled step costs before any arithmetic;
* scan x5 / unrolled x5: five steps in one dispatch, by `lax.scan` and by an unrolled loop.

`xla-flags` runs the jbn step in a subprocess per XLA_FLAGS setting (flags are read once per
process), the default first and last, and reports images/s relative to the mean of the two
default runs (their spread says how much of a ratio is noise).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

FLAG_SETTINGS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "fast-math": "--xla_cpu_enable_fast_math=true",
    "no-eigen-threads": "--xla_cpu_multi_thread_eigen=false",
    "no-thunk-runtime": "--xla_cpu_use_thunk_runtime=false",
    "no-ynn-fusion": "--xla_cpu_experimental_ynn_fusion_type=",
}


SCAN = "jax scan x5 (per step, timed once)"


def median_rates(variants: dict[str, Callable[[int], None]], rounds: int, steps: int) -> dict:
    """Calls per second of each variant: medians over interleaved rounds."""
    for name, run in variants.items():  # compile and warm up
        run(5 if name == SCAN else steps)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    if SCAN in variants:
        start = time.perf_counter()
        variants[SCAN](5)
        samples[SCAN].append(5 / (time.perf_counter() - start))
    for _ in range(rounds):
        for name, run in variants.items():
            if name == SCAN:
                continue
            start = time.perf_counter()
            run(steps)
            samples[name].append(steps / (time.perf_counter() - start))
    return {name: float(np.median(values)) for name, values in samples.items()}


def jax_parts(batch: np.ndarray, labels: np.ndarray) -> dict[str, Callable[[int], None]]:
    import jax
    import jax.numpy as jnp
    import optax
    import throughput

    from train import models

    config = throughput.default_model_config()
    model = models.create_model(config, 10)
    images, targets = jnp.asarray(batch), jnp.asarray(labels)
    optimizer = optax.adam(1e-3)
    initial_state = throughput.jax_initial_state(model, optimizer, batch)
    params, batch_stats, opt_state = initial_state
    loss = throughput.jax_loss(model)
    train_step = throughput.jax_train_step(model, optimizer)
    step = lambda state: train_step(state, images, targets)

    def repeat(count):
        def steps(state):
            for _ in range(count):
                state = step(state)
            return state

        return steps

    def scan(count):
        return lambda state: jax.lax.scan(lambda s, _: (step(s), None), state, None, count)[0]

    def conv_stack(nchw: bool):
        kernels = [params[f"conv{i}"]["kernel"] for i in range(1, 6)]
        biases = [params[f"conv{i}"]["bias"] for i in range(1, 6)]
        x = jnp.transpose(images, (0, 3, 1, 2)) if nchw else images
        numbers = ("NCHW", "HWIO", "NCHW") if nchw else ("NHWC", "HWIO", "NHWC")
        bias_shape = (1, -1, 1, 1) if nchw else (1, 1, 1, -1)

        def forward(kernels, x):
            total = 0.0
            for index, (kernel, bias) in enumerate(zip(kernels, biases)):
                x = jax.lax.conv_general_dilated(
                    x, kernel, (1, 1), "SAME", dimension_numbers=numbers
                )
                x = jax.nn.relu(x + bias.reshape(bias_shape))
                if index < 4:  # the network's 2x2 max pools
                    window = (1, 1, 2, 2) if nchw else (1, 2, 2, 1)
                    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, window, "SAME")
                total = total + jnp.sum(x)
            return total

        grad = jax.jit(jax.grad(forward, argnums=(0, 1)))
        return lambda count: [jax.block_until_ready(grad(kernels, x)) for _ in range(count)]

    def donated(function, per_call: int = 1):
        compiled = jax.jit(function, donate_argnums=0)
        # A copy per variant: donation deletes the buffers it is given.
        holder = {"state": jax.tree.map(jnp.copy, initial_state)}

        def run(count):
            for _ in range(count // per_call):
                holder["state"] = compiled(holder["state"])
            jax.block_until_ready(holder["state"])

        return run

    grads_fn = jax.jit(jax.grad(loss, has_aux=True))
    forward_fn = jax.jit(loss)
    adam_fn = jax.jit(lambda grads, opt_state: optimizer.update(grads, opt_state, params))
    some_grads = jax.tree.map(jnp.ones_like, params)
    return {
        "jax step": donated(step),
        "jax forward+backward": lambda n: [
            jax.block_until_ready(grads_fn(params, batch_stats, images, targets)) for _ in range(n)
        ],
        "jax forward": lambda n: [
            jax.block_until_ready(forward_fn(params, batch_stats, images, targets))
            for _ in range(n)
        ],
        "jax convolutions fwd+bwd NHWC": conv_stack(nchw=False),
        "jax convolutions fwd+bwd NCHW": conv_stack(nchw=True),
        "jax adam": lambda n: [
            jax.block_until_ready(adam_fn(some_grads, opt_state)) for _ in range(n)
        ],
        "jax dispatch": donated(lambda state: state),
        "jax unrolled x5 (per step)": donated(repeat(5), per_call=5),
        # Timed once, outside the rounds: at about 15x a step it would dominate the run.
        SCAN: donated(scan(5), per_call=5),
    }


def torch_parts(batch: np.ndarray, labels: np.ndarray) -> dict[str, Callable[[int], None]]:
    try:
        import torch
    except ImportError:
        return {}
    import throughput

    config = throughput.default_model_config()
    parts = {}
    for layout, memory_format in (
        ("contiguous", torch.contiguous_format),
        ("channels_last", torch.channels_last),
    ):
        setup = throughput.torch_setup(config, batch, labels, memory_format)
        net, images = setup.net, setup.images
        targets = setup.targets
        convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]

        def forward_backward(n, net=net, images=images, targets=targets):
            for _ in range(n):
                net.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(net(images), targets).backward()

        def forward(n, net=net, images=images, targets=targets):
            with torch.no_grad():
                for _ in range(n):
                    torch.nn.functional.cross_entropy(net(images), targets)

        def conv_stack(n, convs=convs, images=images):
            for _ in range(n):
                x = images.detach().requires_grad_(True)
                total = 0.0
                for index, conv in enumerate(convs):
                    x = torch.relu(conv(x))
                    if index < 4:
                        x = torch.nn.functional.max_pool2d(x, 2, 2, ceil_mode=True)
                    total = total + x.sum()
                total.backward()

        def adam(n, net=net, optimizer=setup.optimizer):
            for parameter in net.parameters():
                parameter.grad = torch.ones_like(parameter)
            for _ in range(n):
                optimizer.step()

        parts.update(
            {
                f"torch step {layout}": functools.partial(throughput.torch_train_steps, setup),
                f"torch forward+backward {layout}": forward_backward,
                f"torch forward {layout}": forward,
                f"torch convolutions fwd+bwd {layout}": conv_stack,
                f"torch adam {layout}": adam,
            }
        )
    return parts


def breakdown(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((args.batch, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, args.batch).astype(np.int32)
    variants = {**jax_parts(batch, labels), **torch_parts(batch, labels)}
    rates = median_rates(variants, args.rounds, args.steps)
    step = rates["jax step"]
    print(header(args))
    print("| part | ms per call (median) | share of a jax step |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {1e3 / rate:.2f} | {step / rate:.2f} |")


def measure_in_subprocess(args: argparse.Namespace) -> None:
    """The child of `xla-flags`: prints one JSON line with the jbn step's images/s."""
    import jax
    import throughput

    rng = np.random.default_rng(0)
    batch = rng.standard_normal((args.batch, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, args.batch).astype(np.int32)
    run = throughput.jax_variant(
        throughput.default_model_config(), batch=batch, labels=labels, donate=True
    )
    rate = median_rates({"step": run}, args.rounds, args.steps)["step"]
    print(json.dumps({"images_per_s": rate * args.batch, "jax": jax.__version__}))


def xla_flags(args: argparse.Namespace) -> None:
    order = ["default", *[name for name in FLAG_SETTINGS if name != "default"], "default"]
    results: dict[str, list[float]] = {}
    for name in order:
        environment = dict(os.environ, XLA_FLAGS=FLAG_SETTINGS[name])
        command = [sys.executable, __file__, "child", f"--batch={args.batch}"]
        command += [f"--rounds={args.rounds}", f"--steps={args.steps}"]
        child = subprocess.run(command, env=environment, capture_output=True, text=True)
        if child.returncode != 0:
            reason = (child.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{name}: {FLAG_SETTINGS[name]} failed: {reason[:200]}", file=sys.stderr)
            results.setdefault(name, [])
            continue
        rate = json.loads(child.stdout.strip().splitlines()[-1])["images_per_s"]
        results.setdefault(name, []).append(rate)
    default = results["default"]
    reference = float(np.mean(default))
    print(header(args))
    print(f"default runs (first, last): {default[0]:.0f}, {default[-1]:.0f} images/s")
    print("| XLA_FLAGS | images/s | vs default |")
    print("|---|---|---|")
    for name, rates in results.items():
        if name == "default":
            continue
        flags = f"`{FLAG_SETTINGS[name]}`"
        if not rates:
            print(f"| {flags} | failed | - |")
        else:
            print(f"| {flags} | {rates[0]:.0f} | {rates[0] / reference:.2f} |")


def header(args: argparse.Namespace) -> str:
    import jax

    return (
        f"# {datetime.date.today()} {platform.node()} {platform.machine()} "
        f"{os.cpu_count()} CPUs jax={jax.__version__} batch={args.batch} "
        f"rounds={args.rounds}x{args.steps}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["breakdown", "xla-flags", "child"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    {"breakdown": breakdown, "xla-flags": xla_flags, "child": measure_in_subprocess}[args.mode](
        args
    )


if __name__ == "__main__":
    main()

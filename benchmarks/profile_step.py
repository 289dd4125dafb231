"""Where a train step of the document's network spends its time on CPU, and what changes it.

    python benchmarks/profile_step.py breakdown [--batch 128] [--rounds 7] [--steps 10]
    python benchmarks/profile_step.py convolutions [--batch 128] [--rounds 5] [--steps 10]
    python benchmarks/profile_step.py xla-flags [--batch 128] [--rounds 5] [--steps 10]
    python benchmarks/profile_step.py page-faults [--batch 128] [--rounds 5] [--steps 10]

`breakdown` times the parts of one step side by side (interleaved rounds, medians), for XLA
and for PyTorch on the same network and batch (32x32x3 images, Adam, BN + ReLU). The jax parts
are compiled as the train app compiles its steps (the default config's `cpu_convolutions`,
train/xla_options.py). "fast" is the default network (train/layers.py's convolutions and max
pools), "flax layers" the same network with flax's own (`model.fast_layers=False`):
* step: the whole train step (forward, backward, Adam, moving averages);
* forward+backward: gradients only, no optimizer;
* forward: the training-mode forward pass alone;
* convolutions fwd+bwd: the five convolutions alone, each on an input of its layer's shape,
  gradients w.r.t. the kernels and the inputs; XLA's in NHWC and NCHW, train/layers.py's
  (NHWC); PyTorch's contiguous and channels_last;
* max pools fwd+bwd: the four 2x2/2 max pools alone, each on an input of its layer's shape,
  gradients w.r.t. the inputs; flax's, train/layers.py's, PyTorch's;
* adam: the optimizer update alone on the network's parameters;
* dispatch: a jitted step that passes the whole train state through unchanged (donated), i.e.
  what calling a compiled step costs before any arithmetic;
* scan x5 / unrolled x5: five steps in one dispatch, by `lax.scan` and by an unrolled loop
  (`lax.scan` of the flax-layers step is timed once: it is many times slower).

`convolutions` times each of the network's five convolutions apart, on an input of its layer's
shape: the forward pass, the input gradient and the kernel gradient, in XLA with its default
YNNPACK convolutions (`cpu_convolutions='ynnpack'`), in XLA with Eigen's
(`cpu_convolutions='eigen'`), and in PyTorch (channels_last), interleaved, medians.

`page-faults` counts, with `getrusage`, the minor page faults and the system and user CPU
seconds of the jbn step (compiled as train/ compiles it) at one step per call and at 5 steps
per call (`lax.scan` over a stack of batches, as `steps_per_dispatch`), interleaved, medians
per step, with the images/s of the same calls.

`xla-flags` runs the jbn step in a subprocess per XLA_FLAGS setting (flags are read once per
process), compiled without the train app's options (XLA's defaults and the flags alone), the
default first and last, and reports images/s relative to the mean of the two default runs
(their spread says how much of a ratio is noise).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
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
    # What cpu_convolutions='eigen' asks for through jit's compiler_options.
    "no-ynn-convolutions": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
}


SCAN_FLAX_LAYERS = "jax scan x5 flax layers (per step, timed once)"
# The network's layer shapes for 32x32 inputs: conv (input, kernel) and max-pool input shapes.
CONV_SHAPES = [
    ((32, 32, 3), (3, 3, 3, 64)),
    ((16, 16, 64), (3, 3, 64, 64)),
    ((8, 8, 64), (3, 3, 64, 32)),
    ((4, 4, 32), (3, 3, 32, 16)),
    ((2, 2, 16), (3, 3, 16, 10)),
]
POOL_SHAPES = [(32, 32, 64), (16, 16, 64), (8, 8, 32), (4, 4, 16)]


def median_rates(variants: dict[str, Callable[[int], None]], rounds: int, steps: int) -> dict:
    """Calls per second of each variant: medians over interleaved rounds."""
    for name, run in variants.items():  # compile and warm up
        run(5 if name == SCAN_FLAX_LAYERS else steps)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    if SCAN_FLAX_LAYERS in variants:
        start = time.perf_counter()
        variants[SCAN_FLAX_LAYERS](5)
        samples[SCAN_FLAX_LAYERS].append(5 / (time.perf_counter() - start))
    for _ in range(rounds):
        for name, run in variants.items():
            if name == SCAN_FLAX_LAYERS:
                continue
            start = time.perf_counter()
            run(steps)
            samples[name].append(steps / (time.perf_counter() - start))
    return {name: float(np.median(values)) for name, values in samples.items()}


def jax_parts(batch: np.ndarray, labels: np.ndarray) -> dict[str, Callable[[int], None]]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    import throughput

    from train import layers, models

    config = throughput.default_model_config()
    flax_layers_config = config.copy_and_resolve_references()
    flax_layers_config.fast_layers = False
    images, targets = jnp.asarray(batch), jnp.asarray(labels)
    optimizer = optax.adam(1e-3)
    rng = np.random.default_rng(1)
    random = lambda shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32))

    def network(model_config):
        model = models.create_model(model_config, 10)
        train_step = throughput.jax_train_step(model, optimizer)
        state = throughput.jax_initial_state(model, optimizer, batch)
        return throughput.jax_loss(model), (lambda state: train_step(state, images, targets)), state

    loss, step, initial_state = network(config)
    _, flax_layers_step, flax_layers_state = network(flax_layers_config)
    params, batch_stats, opt_state = initial_state

    def repeat(step, count):
        def steps(state):
            for _ in range(count):
                state = step(state)
            return state

        return steps

    def scan(step, count):
        return lambda state: jax.lax.scan(lambda s, _: (step(s), None), state, None, count)[0]

    options = throughput.compiler_options()

    def timed(function, *args):
        compiled = jax.jit(function, compiler_options=options)
        return lambda count: [jax.block_until_ready(compiled(*args)) for _ in range(count)]

    def convolutions(conv, nchw: bool = False):
        inputs = [random((len(batch), *shape)) for shape, _ in CONV_SHAPES]
        kernels = [random(shape) * 0.1 for _, shape in CONV_SHAPES]
        if nchw:
            inputs = [jnp.transpose(x, (0, 3, 1, 2)) for x in inputs]
        numbers = ("NCHW", "HWIO", "NCHW") if nchw else ("NHWC", "HWIO", "NHWC")

        def loss(kernels, inputs):
            outputs = [
                conv(x, k, (1, 1), "SAME", dimension_numbers=numbers)
                for x, k in zip(inputs, kernels)
            ]
            return sum(jnp.sum(y) for y in outputs)

        return timed(jax.grad(loss, argnums=(0, 1)), kernels, inputs)

    def max_pools(pool):
        inputs = [random((len(batch), *shape)) for shape in POOL_SHAPES]
        loss = lambda inputs: sum(jnp.sum(pool(x, (2, 2), (2, 2), "SAME")) for x in inputs)
        return timed(jax.grad(loss), inputs)

    def donated(function, state, per_call: int = 1):
        compiled = jax.jit(function, donate_argnums=0, compiler_options=options)
        # A copy per variant: donation deletes the buffers it is given.
        holder = {"state": jax.tree.map(jnp.copy, state)}

        def run(count):
            for _ in range(count // per_call):
                holder["state"] = compiled(holder["state"])
            jax.block_until_ready(holder["state"])

        return run

    adam_fn = jax.jit(lambda grads, opt_state: optimizer.update(grads, opt_state, params))
    some_grads = jax.tree.map(jnp.ones_like, params)
    return {
        "jax step": donated(step, initial_state),
        "jax step flax layers": donated(flax_layers_step, flax_layers_state),
        "jax forward+backward": timed(
            jax.grad(loss, has_aux=True), params, batch_stats, images, targets
        ),
        "jax forward": timed(loss, params, batch_stats, images, targets),
        "jax convolutions fwd+bwd fast": convolutions(layers.conv_general_dilated),
        "jax convolutions fwd+bwd XLA NHWC": convolutions(jax.lax.conv_general_dilated),
        "jax convolutions fwd+bwd XLA NCHW": convolutions(jax.lax.conv_general_dilated, True),
        "jax max pools fwd+bwd fast": max_pools(layers.max_pool),
        "jax max pools fwd+bwd flax": max_pools(nn.max_pool),
        "jax adam": lambda n: [
            jax.block_until_ready(adam_fn(some_grads, opt_state)) for _ in range(n)
        ],
        "jax dispatch": donated(lambda state: state, initial_state),
        "jax unrolled x5 (per step)": donated(repeat(step, 5), initial_state, per_call=5),
        "jax scan x5 (per step)": donated(scan(step, 5), initial_state, per_call=5),
        # Timed once, outside the rounds: at many times a step it would dominate the run.
        SCAN_FLAX_LAYERS: donated(scan(flax_layers_step, 5), flax_layers_state, per_call=5),
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

        conv_inputs = [
            torch.randn(len(batch), shape[-1], *shape[:2]).contiguous(memory_format=memory_format)
            for shape, _ in CONV_SHAPES
        ]
        pool_inputs = [
            torch.randn(len(batch), shape[-1], *shape[:2]).contiguous(memory_format=memory_format)
            for shape in POOL_SHAPES
        ]

        def convolutions(n, convs=convs, inputs=conv_inputs):
            for _ in range(n):
                for conv in convs:
                    conv.zero_grad(set_to_none=True)
                xs = [x.detach().requires_grad_(True) for x in inputs]
                sum(conv(x).sum() for conv, x in zip(convs, xs)).backward()

        def max_pools(n, inputs=pool_inputs):
            for _ in range(n):
                xs = [x.detach().requires_grad_(True) for x in inputs]
                pool = torch.nn.functional.max_pool2d
                sum(pool(x, 2, 2, ceil_mode=True).sum() for x in xs).backward()

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
                f"torch convolutions fwd+bwd {layout}": convolutions,
                f"torch max pools fwd+bwd {layout}": max_pools,
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
    print("| part | ms per call (median) | share of a jax step (fast layers) |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {1e3 / rate:.2f} | {step / rate:.2f} |")


def convolution_parts(batch_size: int) -> dict[str, Callable[[int], None]]:
    """Forward, input gradient and kernel gradient of each layer's convolution, XLA and torch."""
    import jax
    import jax.numpy as jnp
    import throughput

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def pullback(x, kernel, cotangent):
        return jax.vjp(conv, x, kernel)[1](cotangent)

    functions = {
        "forward": conv,
        "input gradient": lambda x, k, dy: pullback(x, k, dy)[0],
        "kernel gradient": lambda x, k, dy: pullback(x, k, dy)[1],
    }
    rng = np.random.default_rng(1)
    parts = {}
    for index, (shape, kernel_shape) in enumerate(CONV_SHAPES, start=1):
        x = rng.standard_normal((batch_size, *shape)).astype(np.float32)
        kernel = (rng.standard_normal(kernel_shape) * 0.1).astype(np.float32)
        cotangent = rng.standard_normal((*x.shape[:-1], kernel_shape[-1])).astype(np.float32)
        arrays = [jnp.asarray(a) for a in (x, kernel, cotangent)]
        for choice in ("ynnpack", "eigen"):
            options = throughput.compiler_options(choice)
            for part, function in functions.items():
                compiled = jax.jit(function, compiler_options=options)
                operands = arrays[:2] if part == "forward" else arrays

                def run(count, compiled=compiled, operands=operands):
                    for _ in range(count):
                        jax.block_until_ready(compiled(*operands))

                parts[f"conv{index} {part} | XLA {choice}"] = run
        parts.update(torch_convolution_parts(index, x, kernel, cotangent))
    return parts


def torch_convolution_parts(index: int, x, kernel, cotangent) -> dict[str, Callable[[int], None]]:
    """The same convolution in PyTorch, channels_last, by `torch.ops.aten.convolution_backward`."""
    try:
        import torch
    except ImportError:
        return {}
    channels_last = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    x_t = channels_last(x).contiguous(memory_format=torch.channels_last)
    dy_t = channels_last(cotangent).contiguous(memory_format=torch.channels_last)
    kernel_t = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    kernel_t = kernel_t.contiguous(memory_format=torch.channels_last)

    def forward(count):
        with torch.no_grad():
            for _ in range(count):
                torch.nn.functional.conv2d(x_t, kernel_t, padding=1)

    def backward(mask):
        def run(count):
            for _ in range(count):
                torch.ops.aten.convolution_backward(
                    dy_t, x_t, kernel_t, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
                )

        return run

    return {
        f"conv{index} forward | torch channels_last": forward,
        f"conv{index} input gradient | torch channels_last": backward([True, False, False]),
        f"conv{index} kernel gradient | torch channels_last": backward([False, True, False]),
    }


def convolutions(args: argparse.Namespace) -> None:
    rates = median_rates(convolution_parts(args.batch), args.rounds, args.steps)
    milliseconds: dict[str, dict[str, float]] = {}
    for name, rate in rates.items():
        part, implementation = name.split(" | ")
        milliseconds.setdefault(part, {})[implementation] = 1e3 / rate
    columns = ["XLA ynnpack", "XLA eigen", "torch channels_last"]
    print(header(args))
    print(
        "| convolution | " + " | ".join(f"{c} ms" for c in columns) + " | ynnpack / eigen |"
        " eigen / torch |"
    )
    print("|---|" + "---|" * (len(columns) + 2))
    totals = dict.fromkeys(columns, 0.0)
    for part, times in milliseconds.items():
        cells = [f"{times[c]:.2f}" if c in times else "-" for c in columns]
        ratios = [times["XLA ynnpack"] / times["XLA eigen"]]
        if "torch channels_last" in times:
            ratios.append(times["XLA eigen"] / times["torch channels_last"])
        cells += [f"{r:.2f}" for r in ratios] + ["-"] * (2 - len(ratios))
        print(f"| {part} | " + " | ".join(cells) + " |")
        if not part.startswith("conv1 input"):  # the images need no gradient in training
            for column in columns:
                totals[column] += times.get(column, float("nan"))
    print(
        "| all a train step needs (no conv1 input gradient) | "
        + " | ".join(f"{totals[c]:.2f}" for c in columns)
        + f" | {totals['XLA ynnpack'] / totals['XLA eigen']:.2f}"
        + f" | {totals['XLA eigen'] / totals['torch channels_last']:.2f} |"
    )


def page_faults(args: argparse.Namespace) -> None:
    import resource

    import throughput

    rng = np.random.default_rng(0)
    batch = rng.standard_normal((args.batch, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, args.batch).astype(np.int32)
    config = throughput.default_model_config()
    runs = {
        f"{per_call} step(s) per call": throughput.jax_variant(
            config, batch=batch, labels=labels, donate=True, scan_steps=per_call
        )
        for per_call in (1, 5)
    }
    samples: dict[str, list[tuple[float, ...]]] = {name: [] for name in runs}
    for run in runs.values():  # compile and warm up
        run(args.steps)
    for _ in range(args.rounds):
        for name, run in runs.items():
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            run(args.steps)
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            samples[name].append(
                (
                    (after.ru_minflt - before.ru_minflt) / args.steps,
                    1e3 * (after.ru_stime - before.ru_stime) / args.steps,
                    1e3 * (after.ru_utime - before.ru_utime) / args.steps,
                    args.batch * args.steps / seconds,
                )
            )
    print(header(args))
    print(
        "| calls | minor page faults per step | system ms per step | user ms per step | images/s |"
    )
    print("|---|---|---|---|---|")
    for name, values in samples.items():
        faults, system, user, rate = np.median(np.asarray(values), axis=0)
        print(f"| {name} | {faults:.0f} | {system:.1f} | {user:.1f} | {rate:.0f} |")


def measure_in_subprocess(args: argparse.Namespace) -> None:
    """The child of `xla-flags`: prints one JSON line with the jbn step's images/s."""
    import jax
    import throughput

    rng = np.random.default_rng(0)
    batch = rng.standard_normal((args.batch, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, args.batch).astype(np.int32)
    run = throughput.jax_variant(
        throughput.default_model_config(),
        batch=batch,
        labels=labels,
        donate=True,
        cpu_convolutions="ynnpack",  # no compiler options: the flags alone
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
    import throughput

    return (
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC {throughput.cpu_model()} "
        f"({os.cpu_count()} CPUs) jax={jax.__version__} batch={args.batch} "
        f"rounds={args.rounds}x{args.steps}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "mode", choices=["breakdown", "convolutions", "page-faults", "xla-flags", "child"]
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.steps % 5:
        parser.error("--steps must be a multiple of 5 (the x5 variants run 5 steps per call)")
    modes = {
        "breakdown": breakdown,
        "convolutions": convolutions,
        "page-faults": page_faults,
        "xla-flags": xla_flags,
        "child": measure_in_subprocess,
    }
    modes[args.mode](args)


if __name__ == "__main__":
    main()

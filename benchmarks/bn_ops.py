"""Speed of batch-norm ops on CPU under jit, measured side by side in one process.

    python benchmarks/bn_ops.py [--reps 30] [--shapes 128,32,32,64 256,16,16,64]

For each NHWC float32 shape and each mode (training forward, training forward+backward with
loss = sum(y * r) for a fixed random r, eval forward) it times:

* jbn: `jbn.fused_batch_norm` (training) / `jbn.batch_normalization` with given stats (eval);
* flax-fast: `flax.linen.BatchNorm` defaults (one-pass E[x^2]-E[x]^2 variance: fast, but wrong
  when |mean| >> std);
* flax-2pass: `flax.linen.BatchNorm(use_fast_variance=False)` (stable);
* composite: `jnp.mean` + `jnp.var` + the normalization formula, plain autodiff;
* floor: the forward `x * a + b` elementwise over the same array, the memory-bound floor (one read,
  one write) that every variant of every mode is reported against. Forward+backward must read or
  write the activation about six times, so about 3x the floor is the physical limit there.

Variants are interleaved: each repetition runs every variant once, so load changes on a shared
machine hit all of them alike. Reported times are medians; ratios are of medians.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jbn

EPSILON = 1e-3


def _flax_fns(shape, use_fast_variance):
    module = nn.BatchNorm(epsilon=EPSILON, momentum=0.9, use_fast_variance=use_fast_variance)
    variables = module.init(jax.random.key(0), jnp.zeros(shape), use_running_average=False)
    stats = variables["batch_stats"]

    def train(x, scale, offset):
        y, _ = module.apply(
            {"params": {"scale": scale, "bias": offset}, "batch_stats": stats},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        return y

    def evaluate(x, scale, offset, mean, var):
        return module.apply(
            {"params": {"scale": scale, "bias": offset}, "batch_stats": {"mean": mean, "var": var}},
            x,
            use_running_average=True,
        )

    return train, evaluate


def _jbn_train(x, scale, offset):
    return jbn.fused_batch_norm(x, scale, offset, epsilon=EPSILON)[0]


def _jbn_eval(x, scale, offset, mean, var):
    return jbn.batch_normalization(x, mean, var, offset, scale, EPSILON)


def _composite_train(x, scale, offset):
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.var(x, axis=(0, 1, 2))
    return (x - mean) / jnp.sqrt(var + EPSILON) * scale + offset


def _composite_eval(x, scale, offset, mean, var):
    return (x - mean) / jnp.sqrt(var + EPSILON) * scale + offset


def _floor(x, scale, offset):
    return x * scale + offset


def _forward_backward(train_fn):
    def loss(x, scale, offset, r):
        return jnp.sum(train_fn(x, scale, offset) * r)

    return jax.grad(loss, argnums=(0, 1, 2))


def build_variants(shape):
    flax_fast_train, flax_fast_eval = _flax_fns(shape, True)
    flax_2pass_train, flax_2pass_eval = _flax_fns(shape, False)
    trains = {
        "jbn": _jbn_train,
        "flax-fast": flax_fast_train,
        "flax-2pass": flax_2pass_train,
        "composite": _composite_train,
    }
    evals = {
        "jbn": _jbn_eval,
        "flax-fast": flax_fast_eval,
        "flax-2pass": flax_2pass_eval,
        "composite": _composite_eval,
    }
    return {
        "train fwd": {k: jax.jit(f) for k, f in trains.items()},
        "train fwd+bwd": {k: jax.jit(_forward_backward(f)) for k, f in trains.items()},
        "eval fwd": {k: jax.jit(f) for k, f in evals.items()},
    }


def time_interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each zero-argument callable, the callables interleaved."""
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(s)) for name, s in samples.items()}


def variance_errors(shape, offset: float) -> dict[str, float]:
    """Max relative error of each variant's batch variance on N(offset, 1) data vs float64."""
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32) + np.float32(offset)
    reference = x.astype(np.float64).var(axis=(0, 1, 2))
    errors = {}
    _, _, var = jax.jit(_jbn_train_stats)(jnp.asarray(x))
    errors["jbn"] = var
    for name, fast in (("flax-fast", True), ("flax-2pass", False)):
        module = nn.BatchNorm(momentum=0.0, use_fast_variance=fast, use_running_average=False)
        variables = module.init(jax.random.key(0), x[:1])
        _, updated = jax.jit(lambda v, x, m=module: m.apply(v, x, mutable=["batch_stats"]))(
            variables, x
        )
        errors[name] = updated["batch_stats"]["var"]  # momentum 0: the batch variance itself
    errors["composite"] = jnp.var(jnp.asarray(x), axis=(0, 1, 2))
    return {
        k: float(np.max(np.abs(np.asarray(v) - reference) / reference)) for k, v in errors.items()
    }


def _jbn_train_stats(x):
    return jbn.fused_batch_norm(x, epsilon=EPSILON)


def main() -> None:
    import throughput  # beside this script: the CPU model, as every benchmark prints it

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--shapes", nargs="+", default=["128,32,32,64", "256,16,16,64"])
    args = parser.parse_args()

    print(
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC {throughput.cpu_model()}"
        f" ({os.cpu_count()} CPUs) jax={jax.__version__}"
    )
    print("| shape | mode | variant | median ms | vs floor | vs flax-fast | vs flax-2pass |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape_text in args.shapes:
        shape = tuple(int(s) for s in shape_text.split(","))
        channels = shape[-1]
        x = jnp.asarray(rng.standard_normal(shape, np.float32) * 2 + 3)
        r = jnp.asarray(rng.standard_normal(shape, np.float32))
        scale = jnp.asarray(rng.uniform(0.5, 1.5, channels).astype(np.float32))
        offset = jnp.asarray(rng.standard_normal(channels, np.float32))
        mean = jnp.asarray(rng.standard_normal(channels, np.float32))
        var = jnp.asarray(rng.uniform(0.5, 2, channels).astype(np.float32))
        floor = jax.jit(_floor)
        for mode, fns in build_variants(shape).items():
            call_args = {
                "train fwd": (x, scale, offset),
                "train fwd+bwd": (x, scale, offset, r),
                "eval fwd": (x, scale, offset, mean, var),
            }[mode]
            timed = {name: functools.partial(fn, *call_args) for name, fn in fns.items()}
            timed["floor"] = functools.partial(floor, x, scale, offset)
            times = time_interleaved(timed, args.reps)
            for name, seconds in times.items():
                print(
                    f"| {shape_text} | {mode} | {name} | {seconds * 1e3:.2f} "
                    f"| {seconds / times['floor']:.2f} | {seconds / times['flax-fast']:.2f} "
                    f"| {seconds / times['flax-2pass']:.2f} |",
                    flush=True,
                )
    shape = tuple(int(s) for s in args.shapes[0].split(","))
    print(f"\nBatch variance, max relative error vs float64, shape {args.shapes[0]}:\n")
    print("| data | jbn | flax-fast | flax-2pass | composite |")
    print("|---|---|---|---|---|")
    for offset in (0.0, 1e2, 1e4):
        errors = variance_errors(shape, offset)
        cells = " | ".join(
            f"{errors[k]:.1e}" for k in ("jbn", "flax-fast", "flax-2pass", "composite")
        )
        print(f"| N({offset:g}, 1) | {cells} |")


if __name__ == "__main__":
    main()

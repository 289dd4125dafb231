"""Train-step time of the device layouts: sharding vs pmap on 4 devices vs 1 device.

    python benchmarks/parallelism.py [--devices 4] [--batch 128] [--rounds 7] [--steps 10]

Every variant runs the train app's own step (train/devices.py: `DeviceLayout.compile` of
`train_step`, the state donated) on the document's network (configs/default.py: jbn.BatchNorm,
Adam 1e-3) with the same random Fashion-MNIST-shaped batch:

* 1 device: `jax.jit` on one device, the whole batch;
* sharding: one `jax.jit` over a mesh of the devices, state replicated, batch sharded
  (`NamedSharding(mesh, P('batch'))`); XLA inserts the collectives;
* pmap: `jax.pmap`, the batch reshaped to (devices, batch / devices, ...), explicit `pmean`s;
* sharding and pmap with per-device statistics (`model.sync_batch_stats=False`; sharding runs
  that step under `jax.shard_map`).

The variants are interleaved: each round runs `--steps` steps of every variant in turn, so load
changes on a shared machine hit all of them alike. Prints a markdown table of the median
steps/s over rounds and the ratios to 1 device. On a CPU the devices are simulated
(`jax_num_cpu_devices`) and share the cores.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

# configs/ is a folder of files imported from the repository root, as in the train app.
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def machine() -> str:
    """The CPU model (lscpu's 'Model name'), or what platform knows."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    for line in lscpu.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def build_variants(devices: int, batch: int) -> dict[str, tuple[Callable, dict, Any]]:
    """name -> (compiled step, {'state': replicated state}, laid-out batch)."""
    from configs import default
    from train import models, xla_options
    from train import train as train_lib
    from train.devices import OneDevice, Pmap, ShardedJit

    config = default.get_config()
    # The app's XLA options (train/devices.py's device_layout; pmap takes none).
    options = xla_options.compiler_options(config.cpu_convolutions, jax.default_backend())
    rng = np.random.default_rng(0)
    host_batch = {
        "image": rng.standard_normal((batch, 28, 28, 1)).astype(np.float32),
        "label": (np.arange(batch) % 10).astype(np.int32),
    }
    local = tuple(jax.local_devices()[:devices])
    compiler_options = tuple(options.items())
    layouts = {
        "1 device": (OneDevice(local[:1], 1, 0, compiler_options), True),
        "sharding": (ShardedJit(local, 1, 0, compiler_options), True),
        "pmap": (Pmap(local, 1, 0, compiler_options), True),
        "sharding, per-device statistics": (ShardedJit(local, 1, 0, compiler_options), False),
        "pmap, per-device statistics": (Pmap(local, 1, 0, compiler_options), False),
    }
    variants = {}
    for name, (layout, sync) in layouts.items():
        config.model.sync_batch_stats = sync
        model = models.create_model(config.model, 10, axis_name=layout.model_axis_name)
        state = train_lib.create_train_state(
            jax.random.key(0), model, (28, 28, 1), optax.adam(1e-3)
        )
        per_device = layout.statistics_rule(sync).per_device_step
        step = layout.compile(
            train_lib.train_step_averaging_statistics if per_device else train_lib.train_step,
            donate_state=True,
            per_device=per_device,
        )
        variants[name] = (step, {"state": layout.replicate(state)}, layout.shard(host_batch))
    return variants


def measure(variants: dict, rounds: int, steps: int) -> dict[str, float]:
    """Median steps/s per variant over interleaved rounds."""

    def run_steps(name: str, count: int) -> None:
        step, holder, batch = variants[name]
        for _ in range(count):
            holder["state"], _ = step(holder["state"], batch)
        jax.block_until_ready(holder["state"])

    for name in variants:  # compile and warm up
        run_steps(name, 2)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name in variants:
            start = time.perf_counter()
            run_steps(name, steps)
            samples[name].append(steps / (time.perf_counter() - start))
    return {name: float(np.median(values)) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    # Before any computation; only the CPU backend reads it (simulated devices).
    jax.config.update("jax_num_cpu_devices", args.devices)
    steps_per_s = measure(build_variants(args.devices, args.batch), args.rounds, args.steps)
    print(
        f"# {datetime.date.today()} {machine()}, {jax.device_count()} {jax.default_backend()} "
        f"devices, jax {jax.__version__}; batch {args.batch}, median of {args.rounds} "
        f"interleaved rounds of {args.steps} steps"
    )
    print("| layout | steps/s | images/s | time per step vs 1 device |")
    print("|---|---|---|---|")
    for name, rate in steps_per_s.items():
        ratio = steps_per_s["1 device"] / rate
        print(f"| {name} | {rate:.2f} | {rate * args.batch:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()

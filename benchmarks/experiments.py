"""Reproduce the document's claims on real data, one command per experiment.

    python benchmarks/experiments.py <experiment> [--epochs N] [--out runs/experiments]
        [--set FIELD=VALUE ...]

Each experiment trains configs from configs/ through `train.train.train_and_evaluate` (so runs
resume from their checkpoints when interrupted: rerun the same command), then writes
`<out>/<experiment>/results.json`, a plot `<out>/<experiment>/results.png`, and prints a
markdown table. All use Adam 1e-3 and seed 0 (same initialization and data order).

Experiments (each function's docstring has the details):
* bn_vs_no_bn: the document's network with and without batch norm;
* decay: moving-average decay 0.9, 0.99, 0.999 and 0.999 zero-debiased;
* small_batch: batches of 8 and 4 with and without batch renorm; ghost batch norm at 512;
* multi_device: 4 simulated CPU devices, synchronized vs per-device statistics vs 1 device;
* jbn_vs_flax: jbn.BatchNorm vs flax.linen.BatchNorm, steps and seconds to 90%.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import matplotlib
import ml_collections
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# train/ and configs/ (whose files import each other as `configs.<name>`) are imported from the
# repository root: the jbn wheel carries only jbn.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from train import data, metrics, models, train
from train import devices as device_layouts

REPO = pathlib.Path(__file__).resolve().parent.parent
TARGET_ACCURACY = 0.90


def load_config(name: str):
    """get_config() of configs/<name>.py, imported from the repository root like the CLI does."""
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run(config, workdir: pathlib.Path) -> dict:
    """Trains (or resumes) one run and returns its test curve (every evaluation)."""
    start = time.time()
    config.progress_bar = False
    result = train.train_and_evaluate(config, str(workdir))
    if result.stopped_by:
        raise SystemExit(f"{workdir} stopped by {result.stopped_by}; rerun to resume.")
    events = metrics.read_events(str(workdir / "metrics.jsonl"))
    evals = [e for e in events if e["event"] == "eval"]
    first_event_time = min((e["time"] for e in events), default=start)
    reached = next((e for e in evals if e["test_accuracy"] >= TARGET_ACCURACY), None)
    return {
        "epochs": [e["epoch"] for e in evals],
        "steps": [e["step"] for e in evals],
        "test_accuracy": [e["test_accuracy"] for e in evals],
        "test_loss": [e["test_loss"] for e in evals],
        "train_loss": [e["loss"] for e in events if e["event"] == "train"],
        # Median over the logged windows (the summary's figure covers only the last launch).
        "images_per_s": float(
            np.median([e["images_per_s"] for e in events if e["event"] == "train"])
        ),
        "steps_to_target": reached["step"] if reached else None,
        # From the first logged step (after compilation), including the evaluation passes.
        "seconds_to_target": reached["time"] - first_event_time if reached else None,
        # Time in training steps only (runs written before train_seconds existed: None).
        "train_seconds_to_target": reached.get("train_seconds") if reached else None,
        "summary": result.summary,
    }


# Applied to every config after loading (tests use it to swap in a small synthetic dataset).
BASE_OVERRIDES: dict[str, object] = {}


def configured(name: str, epochs: int, **overrides) -> ml_collections.ConfigDict:
    config = load_config(name)
    config.num_epochs = epochs
    config.update_from_flattened_dict({**BASE_OVERRIDES, **overrides})
    return config


def bn_vs_no_bn(epochs: int, out: pathlib.Path) -> tuple[dict, dict]:
    """The document's claim: BN trains faster and reaches a higher accuracy."""
    runs = {name: run(configured(name, epochs), out / name) for name in ("default", "no_bn")}
    return runs, {}


def decay(epochs: int, out: pathlib.Path) -> tuple[dict, dict]:
    """The document's decay advice (0.9) against 0.99 and TF1's 0.999, with and without
    zero-debiasing: test accuracy in inference mode, 4 evaluations per epoch.

    Training itself does not depend on the decay (training mode normalizes with the batch's
    statistics), so every run follows the same parameters; only the moving averages that
    inference uses differ. The finding "largest train-loss difference between the runs"
    checks that.
    """
    runs = {
        "decay=0.9": {"model.batch_norm.decay": 0.9},
        "decay=0.99": {"model.batch_norm.decay": 0.99},
        "decay=0.999": {"model.batch_norm.decay": 0.999},
        "decay=0.999 zero_debias": {
            "model.batch_norm.decay": 0.999,
            "model.batch_norm.zero_debias_moving_mean": True,
        },
    }
    results = {
        name: run(
            configured("default", epochs, eval_every_steps=117, **overrides), out / slug(name)
        )
        for name, overrides in runs.items()
    }
    losses = np.array([r["train_loss"] for r in results.values()])
    return results, {
        "largest train-loss difference between the runs": float(np.max(np.abs(losses - losses[0])))
    }


def small_batch(epochs: int, out: pathlib.Path) -> tuple[dict, dict]:
    """Ioffe (2017) in spirit: batches of 8 and 4 with plain BN and with batch renorm
    (r in [1/3, 3], |d| <= 5, his final clipping) against batch 128; and ghost batch norm
    (statistics of virtual batches of 32) against plain BN, both at batch 512. Same epochs
    (examples seen).

    At batches of 8 and 4 the moving averages use decay 0.99 (about 100 batches, 800 or 400
    examples, nearer decay 0.9 at batch 128); the document's 0.9 would average only 80 or 40.
    """
    renorm = {
        "model.batch_norm.renorm": True,
        "model.batch_norm.renorm_clipping.rmax": 3.0,
        "model.batch_norm.renorm_clipping.rmin": 1 / 3.0,
        "model.batch_norm.renorm_clipping.dmax": 5.0,
    }
    runs = {
        "batch 128": {"batch_size": 128, "eval_every_steps": 117},
        "batch 8": {"batch_size": 8, "model.batch_norm.decay": 0.99, "eval_every_steps": 1875},
        "batch 8 renorm": {
            "batch_size": 8,
            "model.batch_norm.decay": 0.99,
            "eval_every_steps": 1875,
            **renorm,
        },
        "batch 4": {"batch_size": 4, "model.batch_norm.decay": 0.99, "eval_every_steps": 3750},
        "batch 4 renorm": {
            "batch_size": 4,
            "model.batch_norm.decay": 0.99,
            "eval_every_steps": 3750,
            **renorm,
        },
        "batch 512": {"batch_size": 512, "eval_every_steps": 39},
        "batch 512 ghost 32": {
            "batch_size": 512,
            "model.batch_norm.virtual_batch_size": 32,
            "eval_every_steps": 39,
        },
    }
    results = {
        name: run(configured("default", epochs, **overrides), out / slug(name))
        for name, overrides in runs.items()
    }
    return results, {}


NUM_SIMULATED_DEVICES = 4


def multi_device(epochs: int, out: pathlib.Path) -> tuple[dict, dict]:
    """4 simulated CPU devices (pmap), batch 128 split 4 x 32: synchronized statistics (the
    global batch's, configs/multi_device.py) vs per-device statistics (each device normalizes
    its 32 examples, as flax's examples do), and 1 device at batch 128. Same seed and data order.

    Findings: the largest per-step train-loss difference to the 1-device run, and the step
    throughput of the three variants timed side by side (`sync_cost`).
    """
    jax.config.update("jax_num_cpu_devices", NUM_SIMULATED_DEVICES)  # before any computation
    runs = {
        "1 device": {"num_devices": 1},
        # pmap, as when README's results were measured (benchmarks/parallelism.py compares
        # it with the sharding layout).
        "4 devices, synchronized": {"num_devices": NUM_SIMULATED_DEVICES, "parallelism": "pmap"},
        "4 devices, per-device statistics": {
            "num_devices": NUM_SIMULATED_DEVICES,
            "parallelism": "pmap",
            "model.sync_batch_stats": False,
        },
    }
    results = {
        name: run(configured("default", epochs, log_every_steps=1, **overrides), out / slug(name))
        for name, overrides in runs.items()
    }
    reference = np.array(results["1 device"]["train_loss"])
    findings = {}
    for name in list(runs)[1:]:
        difference = np.abs(np.array(results[name]["train_loss"]) - reference)
        # Adam's first steps are lr * sign(gradient) for every parameter, so the round-off of
        # a different summation order (the conv biases before BN have gradient ~0) becomes
        # steps of size lr; the early steps show the layouts' equality, the later ones the
        # amplification of round-off that any change of summation order brings.
        findings[f"{name}: largest train-loss difference to 1 device, first 3 steps"] = float(
            difference[:3].max()
        )
        findings[f"{name}: same, all {len(difference)} steps"] = float(difference.max())
    findings.update(sync_cost(configured("default", epochs)))
    return results, findings


def sync_cost(config: ml_collections.ConfigDict, rounds: int = 7, steps: int = 10) -> dict:
    """Train steps/s of 1 device, 4 synchronized and 4 per-device, interleaved round by round."""
    image_shape = data.load_dataset(config.dataset).train.images.shape[1:]
    images = np.random.default_rng(0).standard_normal((config.batch_size, *image_shape))
    batch = {
        "image": images.astype(np.float32),
        "label": np.arange(config.batch_size, dtype=np.int32) % 10,
    }
    variants = {}
    for name, devices, sync in (
        ("1 device", 1, True),
        ("4 synchronized", NUM_SIMULATED_DEVICES, True),
        ("4 per-device", NUM_SIMULATED_DEVICES, False),
    ):
        variant_config = config.copy_and_resolve_references()
        variant_config.num_devices = devices
        variant_config.model.sync_batch_stats = sync
        variant_config.parallelism = "pmap"
        layout = device_layouts.device_layout(variant_config)
        model = models.create_model(variant_config.model, 10, axis_name=layout.model_axis_name)
        state = train.create_train_state(jax.random.key(0), model, image_shape, optax.adam(1e-3))
        variants[name] = (
            layout.compile(train.train_step, donate_state=True),
            {"state": layout.replicate(state)},
            layout.shard(batch),
        )

    def run_steps(name: str, count: int) -> None:
        step, holder, sharded = variants[name]
        for _ in range(count):
            holder["state"], _ = step(holder["state"], sharded)
        jax.block_until_ready(holder["state"])

    for name in variants:  # compile
        run_steps(name, 2)
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name in variants:
            start = time.perf_counter()
            run_steps(name, steps)
            samples[name].append(steps / (time.perf_counter() - start))
    median = {name: float(np.median(values)) for name, values in samples.items()}
    return {
        **{
            f"steps/s, {name} (median of {rounds} interleaved rounds)": median[name]
            for name in median
        },
        "synchronized / per-device step time (the cost of synchronization)": median["4 per-device"]
        / median["4 synchronized"],
    }


def jbn_vs_flax(epochs: int, out: pathlib.Path) -> tuple[dict, dict]:
    """The document's network with jbn.BatchNorm vs flax.linen.BatchNorm (flax's defaults),
    same seed and data order: steps and training seconds to 90% test accuracy."""
    runs = {
        name: run(
            configured("default", epochs, eval_every_steps=117, **{"model.batch_norm_impl": impl}),
            out / name,
        )
        for name, impl in (("jbn", "jbn"), ("flax", "flax"))
    }
    jbn_seconds, flax_seconds = (runs[n]["train_seconds_to_target"] for n in ("jbn", "flax"))
    findings = {}
    if jbn_seconds and flax_seconds:
        findings["flax / jbn training seconds to 90%"] = flax_seconds / jbn_seconds
    return runs, findings


def slug(name: str) -> str:
    return name.replace("=", "").replace(" ", "_").replace("/", "_")


class Experiment(NamedTuple):
    """One command: `function(epochs, out)` returns ({run name: run result}, findings)."""

    function: Callable[[int, pathlib.Path], tuple[dict, dict]]
    default_epochs: int


EXPERIMENTS = {
    "bn_vs_no_bn": Experiment(bn_vs_no_bn, 10),
    "decay": Experiment(decay, 3),
    "small_batch": Experiment(small_batch, 1),
    "multi_device": Experiment(multi_device, 1),
    "jbn_vs_flax": Experiment(jbn_vs_flax, 4),
}


def plot(runs: dict, path: pathlib.Path, title: str) -> None:
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run_result in runs.items():
        accuracy_axes.plot(run_result["epochs"], run_result["test_accuracy"], ".-", label=name)
        loss_axes.plot(run_result["epochs"], run_result["test_loss"], ".-", label=name)
    accuracy_axes.axhline(TARGET_ACCURACY, color="gray", linestyle=":")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (inference mode)", title=title)
    loss_axes.set(xlabel="epoch", ylabel="test loss", yscale="log")
    for axes in (accuracy_axes, loss_axes):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def table(runs: dict, findings: dict) -> str:
    """Markdown: one row per run, then test accuracy at the evaluation points all runs share."""
    lines = [
        "| run | steps | final test accuracy | best | steps to 90% | train s to 90% "
        "| wall s to 90% | images/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        steps = r["steps_to_target"] if r["steps_to_target"] is not None else "not reached"
        seconds, wall = (
            f"{r[key]:.0f}" if r[key] is not None else "-"
            for key in ("train_seconds_to_target", "seconds_to_target")
        )
        lines.append(
            f"| {name} | {r['steps'][-1]} | {r['test_accuracy'][-1]:.4f} "
            f"| {max(r['test_accuracy']):.4f} | {steps} | {seconds} | {wall} "
            f"| {r['images_per_s']:.0f} |"
        )
    shared = sorted(set.intersection(*(set(r["epochs"]) for r in runs.values())))
    lines += ["", "| epoch | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for epoch in shared:
        cells = " | ".join(
            f"{r['test_accuracy'][r['epochs'].index(epoch)]:.4f}" for r in runs.values()
        )
        lines.append(f"| {epoch:.2f} | {cells} |")
    if findings:
        lines += [""] + [f"- {name}: {value}" for name, value in findings.items()]
    return "\n".join(lines)


def parse_overrides(parser: argparse.ArgumentParser, assignments: list[str]) -> dict[str, object]:
    """`--set FIELD=VALUE` assignments as config overrides: values read as Python literals,
    anything else (e.g. a path) kept as a string; a malformed one is the parser's error."""
    overrides: dict[str, object] = {}
    for assignment in assignments:
        field, separator, value = assignment.partition("=")
        if not separator:
            parser.error(f"--set expects FIELD=VALUE, got {assignment!r}")
        try:
            overrides[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[field] = value  # a bare string such as a path
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--epochs", type=int, help="default: the experiment's own")
    parser.add_argument("--out", default="runs/experiments")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field of every run, e.g. --set dataset.data_dir=/data/fmnist",
    )
    args = parser.parse_args()
    BASE_OVERRIDES.update(parse_overrides(parser, args.set))
    experiment = EXPERIMENTS[args.experiment]
    out = pathlib.Path(args.out) / args.experiment
    os.makedirs(out, exist_ok=True)
    runs, findings = experiment.function(args.epochs or experiment.default_epochs, out)
    results = {
        "experiment": args.experiment,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "jax": jax.__version__,
        "runs": runs,
        "findings": findings,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(runs, out / "results.png", args.experiment)
    print(table(runs, findings))


if __name__ == "__main__":
    main()

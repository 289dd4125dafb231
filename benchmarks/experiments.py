"""Reproduce the document's claims on real data, one command per experiment.

    python benchmarks/experiments.py bn_vs_no_bn [--epochs 10] [--out runs/experiments]

Each experiment trains configs from configs/ through `train.train.train_and_evaluate` (so runs
resume from their checkpoints when interrupted: rerun the same command), then writes
`<out>/<experiment>/results.json`, a plot `<out>/<experiment>/results.png`, and prints a
markdown table.

Experiments:
* bn_vs_no_bn: the document's network with and without batch norm (configs/default.py,
  configs/no_bn.py), Adam 1e-3, batch 128, seed 0: test accuracy and loss per epoch, and the
  steps and wall seconds until test accuracy first reaches 90%.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from train import metrics, train

REPO = pathlib.Path(__file__).resolve().parent.parent
TARGET_ACCURACY = 0.90


def load_config(name: str):
    """get_config() of configs/<name>.py, imported from the repository root like the CLI does."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # configs import each other as `configs.<name>`
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run(config, workdir: pathlib.Path) -> dict:
    """Trains (or resumes) one run and returns its per-epoch test curve."""
    start = time.time()
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
        "steps_to_target": reached["step"] if reached else None,
        # From the first logged step (after compilation), including the evaluation passes.
        "seconds_to_target": reached["time"] - first_event_time if reached else None,
        "summary": result.summary,
    }


def bn_vs_no_bn(epochs: int, out: pathlib.Path) -> dict:
    results = {}
    for name in ("default", "no_bn"):
        config = load_config(name)
        config.num_epochs = epochs
        config.progress_bar = False
        results[name] = run(config, out / name)
    return results


EXPERIMENTS: dict[str, Callable[[int, pathlib.Path], dict]] = {"bn_vs_no_bn": bn_vs_no_bn}


def plot(results: dict, path: pathlib.Path, title: str) -> None:
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for name, run_result in results.items():
        accuracy_axes.plot(run_result["epochs"], run_result["test_accuracy"], "o-", label=name)
        loss_axes.plot(run_result["epochs"], run_result["test_loss"], "o-", label=name)
    accuracy_axes.axhline(TARGET_ACCURACY, color="gray", linestyle=":")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy", title=title)
    loss_axes.set(xlabel="epoch", ylabel="test loss")
    for axes in (accuracy_axes, loss_axes):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def table(results: dict) -> str:
    lines = [
        "| run | final test accuracy | best | steps to 90% | seconds to 90% |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        steps = r["steps_to_target"] if r["steps_to_target"] is not None else "not reached"
        seconds = f"{r['seconds_to_target']:.0f}" if r["seconds_to_target"] is not None else "-"
        lines.append(
            f"| {name} | {r['test_accuracy'][-1]:.4f} | {max(r['test_accuracy']):.4f} "
            f"| {steps} | {seconds} |"
        )
    lines.append("")
    lines.append("| epoch | " + " | ".join(results) + " |")
    lines.append("|---|" + "---|" * len(results))
    for index, epoch in enumerate(next(iter(results.values()))["epochs"]):
        cells = " | ".join(f"{r['test_accuracy'][index]:.4f}" for r in results.values())
        lines.append(f"| {epoch:g} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="runs/experiments")
    args = parser.parse_args()
    out = pathlib.Path(args.out) / args.experiment
    os.makedirs(out, exist_ok=True)
    results = EXPERIMENTS[args.experiment](args.epochs, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "results.png", args.experiment)
    print(table(results))


if __name__ == "__main__":
    main()

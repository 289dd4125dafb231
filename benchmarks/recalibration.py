"""Precise BN on the document's network: test accuracy with the moving averages vs recalibrated.

    nice -n 10 python benchmarks/recalibration.py [--epochs 5] [--batches 200]
        [--out runs/recalibration] [--results benchmarks/results/recalibration.md]

Trains configs/default.py on Fashion-MNIST with `model.batch_norm.decay` 0.9 (the document's) and
0.999 (TF1's default) for `--epochs` epochs, keeping every epoch's checkpoint, then recalibrates the
checkpoints after epoch 1 and after the last epoch with `train.recalibrate` over `--batches`
training batches, and writes a markdown table (decay, epochs, test accuracy with the moving
averages, recalibrated) with the command, the CPU model and the date to `--results`.

Resumable: the training runs resume from their checkpoints (rerun the same command), and
recalibration is deterministic, so a rerun recomputes the same table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import experiments  # noqa: E402

DECAYS = (0.9, 0.999)


def cpu_model() -> str:
    """The CPU model as `lscpu` names it ('unknown' without lscpu)."""
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def train_runs(epochs: int, out: pathlib.Path, overrides: dict) -> dict[float, pathlib.Path]:
    """Trains (or resumes) one run per decay, keeping every epoch's checkpoint."""
    workdirs = {}
    for decay in DECAYS:
        config = experiments.configured(
            "default",
            epochs,
            **{"model.batch_norm.decay": decay, "checkpoint_max_to_keep": epochs + 1, **overrides},
        )
        workdir = out / f"decay={decay}"
        experiments.run(config, workdir)
        workdirs[decay] = workdir
    return workdirs


def recalibrate_runs(workdirs: dict[float, pathlib.Path], epochs: int, batches: int) -> list[dict]:
    """Recalibrates each run's checkpoints after epoch 1 and the last epoch; the table's rows."""
    from train import recalibrate

    rows = []
    for decay, workdir in workdirs.items():
        steps = recalibrate.checkpoint_steps(str(workdir))
        steps_per_epoch = steps[-1] // epochs
        for epoch in sorted({1, epochs}):
            step = epoch * steps_per_epoch
            # The default last, so that its checkpoint is the one left in DIR/recalibrated.
            population, result = (
                recalibrate.recalibrate_run(
                    str(workdir), batches=batches, step=step, variance=variance
                )
                for variance in ("population", "batch")
            )
            rows.append(
                {
                    "decay": decay,
                    "epochs": epoch,
                    **result,
                    "population_test_accuracy": population["recalibrated_test_accuracy"],
                }
            )
            print(
                f"decay={decay} epoch {epoch}: moving averages "
                f"{result['moving_average_test_accuracy']:.4f}, recalibrated "
                f"{result['recalibrated_test_accuracy']:.4f} (population variance "
                f"{population['recalibrated_test_accuracy']:.4f})",
                flush=True,
            )
    return rows


def table(rows: list[dict], command: str) -> str:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    lines = [
        f"# {command}",
        "",
        f"{date}, {cpu_model()}, {os.cpu_count()} CPUs. Test accuracy (10,000 Fashion-MNIST test "
        "images, inference mode) with the moving averages the run kept, and with the statistics "
        "recomputed by `python -m train.recalibrate` over the first batches of the training "
        "data with the weights fixed: `--variance batch` (the default, fvcore's: the mean of the "
        "batch variances) and `--variance population` (the variance of all batches together).",
        "",
        "| decay | epochs | batches | moving averages | recalibrated | recalibrated, population "
        "variance |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['decay']} | {row['epochs']} | {row['batches']} | "
            f"{row['moving_average_test_accuracy']:.4f} | {row['recalibrated_test_accuracy']:.4f} "
            f"| {row['population_test_accuracy']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "runs" / "recalibration")
    parser.add_argument(
        "--results", type=pathlib.Path, default=REPO / "benchmarks/results/recalibration.md"
    )
    parser.add_argument(
        "--train-only", action="store_true", help="train (or resume) the runs, nothing else"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="config override for every run (Python literal), e.g. --set batch_size=64",
    )
    args = parser.parse_args(argv)
    overrides = experiments.parse_overrides(parser, args.set)
    workdirs = train_runs(args.epochs, args.out, overrides)
    if args.train_only:
        return
    rows = recalibrate_runs(workdirs, args.epochs, args.batches)
    command = "python benchmarks/recalibration.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--out")
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(table(rows, command.strip()))
    print(table(rows, command.strip()))


if __name__ == "__main__":
    main()

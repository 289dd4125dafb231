"""Command line: Precise BN for a trained run, its batch-norm statistics recomputed.

    python -m train.recalibrate --workdir runs/default [--batches 200] [--step S]
        [--variance batch|population]

Restores the run's latest verified checkpoint (or that of `--step`), recomputes every batch
norm's statistics for the checkpoint's fixed weights over the first `--batches` training batches
(`jbn.recalibrate_statistics`: training-mode batch statistics, each batch weighted by its
counted elements; 200 batches as fvcore's PreciseBN), evaluates the test set with the moving
averages and with the recalibrated statistics, and writes:

* `DIR/recalibrated/checkpoints/<step>`: the train state with the new `batch_stats` (everything
  else unchanged), saved, read back and verified like a training checkpoint, under the same
  step number (one at a time: a new recalibration replaces the directory);
* `DIR/recalibrated/config.json`: the run's config, so that `DIR/recalibrated` reads as a run:
  `python -m train.export --workdir DIR/recalibrated` exports the recalibrated model;
* `DIR/recalibrated/recalibration.json`: both test accuracies, the batches used, the source
  checkpoint and the digests of both states.

The recalibrated checkpoint lives in its own directory rather than as a new step of
`DIR/checkpoints/`: resuming and `train.export --workdir DIR` keep reading the training's own
state (a later step there would be taken for the newest training step and resumed from, and its
number would lie about the steps trained), and the moving averages stay available to compare.
Recalibrating again (any step) replaces `DIR/recalibrated`, an export inside it included.
Problems (no run, an unreadable checkpoint, missing data, a bad argument) print one `error:`
line and exit with 2.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

import jbn
from train import checkpoints, data, export, metrics, workdirs
from train import train as train_lib
from train.predict import USAGE_ERROR

DEFAULT_BATCHES = 200  # fvcore's PreciseBN default
OUTPUT_DIR = "recalibrated"
INFO_FILE = "recalibration.json"


def recalibration_batches(
    dataset: data.Dataset, config: Any, num_batches: int
) -> Iterator[dict[str, np.ndarray]]:
    """The first `num_batches` training batches as training draws them (epoch 0's order, then
    epoch 1's, ...), with the run's batch size and augmentation."""
    epochs = (
        data.train_batches(
            dataset,
            config.batch_size,
            seed=config.seed,
            epoch=epoch,
            augment=config.dataset.augment,
        )
        for epoch in itertools.count()
    )
    return itertools.islice(itertools.chain.from_iterable(epochs), num_batches)


def test_accuracy(state: train_lib.TrainState, dataset: data.Dataset, batch_size: int) -> float:
    """Inference-mode accuracy over every test example (`train.train.eval_step`), one device."""
    eval_fn = jax.jit(train_lib.eval_step)
    correct = count = 0.0
    for batch in data.eval_batches(dataset, batch_size):
        sums = eval_fn(state, batch)
        correct += float(sums["correct"])
        count += float(sums["count"])
    return correct / max(count, 1.0)


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the run's own checkpoints in `workdir`, oldest first."""
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return checkpointer.all_steps()
    finally:
        checkpointer.close()


def recalibrate_run(
    workdir: str,
    batches: int = DEFAULT_BATCHES,
    step: int | None = None,
    variance: str = "batch",
) -> dict[str, Any]:
    """Recalibrates the run in `workdir` (module docstring); returns what recalibration.json
    holds.

    Raises:
      ValueError: `batches` < 1 or `variance` unknown.
      export.ExportError, checkpoints.CheckpointError, data.DataError: as
        `train.export.restore_run` (no run, no such step, an unreadable checkpoint, no data).
      OSError: the output cannot be written.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be a positive integer, got {batches!r}.")
    if variance not in jbn.precise_bn.VARIANCES:
        raise ValueError(f"variance must be one of {jbn.precise_bn.VARIANCES}, got {variance!r}.")
    run = export.restore_run(workdir, step)
    dataset, config = run.dataset, run.config
    # The restored train state as training saved it (optimizer state included): only its
    # batch_stats change.
    state = run.train_state
    moving_accuracy = test_accuracy(state, dataset, config.eval_batch_size)

    def apply_fn(variables, batch):
        return run.model.apply(variables, batch["image"], is_training=True, mutable=["batch_stats"])

    batch_stats = jbn.recalibrate_statistics(
        apply_fn,
        run.variables,
        recalibration_batches(dataset, config, batches),
        num_batches=batches,
        variance=variance,
    )
    recalibrated = state.replace(batch_stats=batch_stats)
    recalibrated_accuracy = test_accuracy(recalibrated, dataset, config.eval_batch_size)

    out = os.path.join(workdir, OUTPUT_DIR)
    checkpoint_dir = os.path.join(out, "checkpoints")
    # One recalibration at a time: it replaces an earlier one (of any step, and its export),
    # all derived from the run's own checkpoints. Orbax never saves a step below its newest,
    # and the Checkpointer never overwrites a step.
    shutil.rmtree(out, ignore_errors=True)
    checkpointer = checkpoints.Checkpointer(checkpoint_dir, max_to_keep=1)
    try:
        checkpointer.save(run.step, recalibrated, config, data.data_fingerprint(dataset))
    finally:
        checkpointer.close()
    metrics.write_json(checkpoints.config_to_json(config), os.path.join(out, "config.json"))
    info = {
        "step": run.step,
        "batches": batches,
        "images": batches * config.batch_size,
        "variance": variance,
        "moving_average_test_accuracy": moving_accuracy,
        "recalibrated_test_accuracy": recalibrated_accuracy,
        "source": {"checkpoint": run.checkpoint, "state_sha256": run.state_sha256},
        "checkpoint": os.path.join(checkpoint_dir, str(run.step)),
        "state_sha256": metrics.tree_sha256(
            {"params": recalibrated.params, "batch_stats": recalibrated.batch_stats}
        ),
    }
    metrics.write_json(info, os.path.join(out, INFO_FILE))
    return info


def _describe(info: dict[str, Any], workdir: str) -> str:
    out = os.path.join(workdir, OUTPUT_DIR)
    return (
        f"Recalibrated step {info['step']} over {info['batches']} training batches "
        f"({info['images']} images, {info['variance']} variance) into {info['checkpoint']}.\n"
        f"Test accuracy: {info['moving_average_test_accuracy']:.4f} with the moving averages, "
        f"{info['recalibrated_test_accuracy']:.4f} recalibrated.\n"
        f"Export it with: python -m train.export --workdir {out}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m train.recalibrate",
        description="Recompute the batch-norm statistics of a trained run for its final weights "
        "(Precise BN) and re-evaluate it. Writes DIR/recalibrated/ (the checkpoint with the new "
        "statistics, its config, and recalibration.json with both test accuracies), replacing an "
        "earlier recalibration; export it with python -m train.export --workdir "
        "DIR/recalibrated. Exit status: 0 recalibrated, 2 an error (one error: line).",
    )
    parser.add_argument(
        "--workdir", required=True, metavar="DIR", help="the run's directory (its --workdir)"
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=DEFAULT_BATCHES,
        help=f"training batches to recompute the statistics over (default {DEFAULT_BATCHES})",
    )
    parser.add_argument(
        "--step", type=int, default=None, help="the checkpoint to recalibrate (default: latest)"
    )
    parser.add_argument(
        "--variance",
        choices=jbn.precise_bn.VARIANCES,
        default="batch",
        help="'batch': count-weighted mean of the batch variances (fvcore, default); "
        "'population': the variance of all batches together",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.batches < 1:
        print(f"error: --batches must be at least 1, got {args.batches}", file=sys.stderr)
        return USAGE_ERROR
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO
    workdir = workdirs.resolve(args.workdir)
    # Exclusive, as a training run: a run writing the workdir would race with the restore, and
    # two recalibrations with each other's DIR/recalibrated.
    info = workdirs.run_locked(
        workdir,
        lambda: recalibrate_run(workdir, args.batches, args.step, args.variance),
        shared=False,
        errors=(export.ExportError, checkpoints.CheckpointError, data.DataError),
        os_error="cannot write the recalibrated checkpoint",
    )
    if info is None:
        return USAGE_ERROR
    print(_describe(info, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

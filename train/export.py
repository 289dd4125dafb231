"""Command line: a trained run as a folded, serialized model that needs no Python to run.

    python -m train.export --workdir runs/default

Restores the run's latest checkpoint, folds every batch norm into the layer before it
(`jbn.fold_batch_norm`, so the exported graph has no batch-norm arithmetic left) and writes, in
`DIR/export/`:

* `model.jaxexport`: the bytes of a serialized `jax.export.Exported` (StableHLO, for CPU and
  CUDA) of `uint8 images (batch, H, W, C) -> float32 logits (batch, classes)`, with a symbolic
  batch size and the training's input normalization inside. Running it needs only JAX:
  `jax.export.deserialize(data).call(images)`.
* `model.json`: what the model takes and returns, the class names, the normalization, the
  checkpoint it comes from (step and `state_sha256`, the digest `summary.json` reports), and the
  test accuracy measured with the exported model itself.

Before writing, the exported model runs on the whole test set beside the checkpoint's eval-mode
model; an export whose logits disagree beyond float32 round-off is refused. Problems (no
checkpoint, an unreadable checkpoint, missing data) print one `error:` line and exit with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax import export

import jbn
from train import checkpoints, data, metrics, models, workdirs
from train import train as train_lib
from train.predict import INFO_FILE, USAGE_ERROR, export_paths

PLATFORMS = ("cpu", "cuda")
# The batch norms that can be folded: both are an affine map per feature at inference.
BATCH_NORM_TYPES = (jbn.BatchNorm, nn.BatchNorm)
# Exported and eval-mode logits may differ by this many float epsilons (of the model's dtype)
# times the largest logit: folding reorders a few float multiplications per layer.
ROUND_OFF_EPSILONS = 1000


class ExportError(Exception):
    """The run cannot be exported; the message says why and what to do."""


# ----------------------------------------------------------------------------- folding


class Fold(NamedTuple):
    """A batch norm and the layer whose output it normalizes, as module paths.

    `batch_norm` is the (bound) module itself, for its type and epsilon.
    """

    batch_norm_path: tuple[str, ...]
    layer_path: tuple[str, ...]
    batch_norm: nn.Module


def find_folds(
    model: nn.Module, variables: Mapping[str, Any], images: Any, **apply_kwargs
) -> list[Fold]:
    """Pairs every batch norm of `model` with the layer before it, found by data flow.

    Traces one inference call (`model.apply(variables, images, **apply_kwargs)`, shapes only)
    and records which module produced each batch norm's input. That module must hold a
    `kernel` parameter with its output features last (flax's `nn.Conv`, `nn.Dense`; TF-style
    NCHW convolutions with HWIO kernels) and optionally a per-feature `bias`, and its output must
    feed nothing but the batch norm (folding changes that output).

    Raises:
      ExportError: a batch norm whose input is not the output of such a layer.
    """
    produced_by: dict[int, tuple[Any, tuple[str, ...]]] = {}
    folds: list[Fold] = []

    def record(next_fun: Callable[..., Any], args, kwargs, context) -> Any:
        result = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return result
        if isinstance(module, BATCH_NORM_TYPES):
            x = args[0] if args else kwargs.get("x")
            # The object itself is kept beside its id, so an id cannot be reused meanwhile.
            source = produced_by.get(id(x))
            if source is None or source[0] is not x:
                raise ExportError(
                    f"cannot fold the batch norm {'/'.join(module.path)}: its input is not the "
                    "output of a layer with a kernel (convolution or dense layer)."
                )
            folds.append(Fold(module.path, source[1], module))
        elif module.has_variable("params", "kernel"):
            produced_by[id(result)] = (result, module.path)
        return result

    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(model.apply, **apply_kwargs), variables, images)
    return folds


def _variables_of(flat: Mapping[tuple[str, ...], Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The variables of the module at `path`, by name, from a flattened collection."""
    return {key[-1]: value for key, value in flat.items() if key[:-1] == path}


def fold_batch_norms(folds: Sequence[Fold], variables: Mapping[str, Any]) -> dict[str, Any]:
    """The `params` of the folded model: each fold's layer takes its batch norm's inference.

    The batch norms' own parameters are dropped; run the result with `folded_apply`.

    Raises:
      ExportError: a layer without a bias (the batch norm's offset would have nowhere to go),
        or whose kernel does not fit its batch norm.
    """
    flat_params = traverse_util.flatten_dict(dict(variables["params"]))
    flat_stats = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))
    for fold in folds:
        norm, layer = fold.batch_norm_path, fold.layer_path
        if (*layer, "bias") not in flat_params:
            raise ExportError(
                f"cannot fold {'/'.join(norm)} into {'/'.join(layer)}: the layer has no bias to "
                "take the batch norm's offset (give it one, e.g. use_bias=True)."
            )
        stats, affine, epsilon = jbn.batch_norm_inference_statistics(
            fold.batch_norm, _variables_of(flat_params, norm), _variables_of(flat_stats, norm)
        )
        try:
            kernel, bias = jbn.fold_batch_norm(
                flat_params[(*layer, "kernel")],
                flat_params.get((*layer, "bias")),
                stats,
                affine,
                epsilon=epsilon,
            )
        except ValueError as error:
            raise ExportError(
                f"cannot fold {'/'.join(norm)} into {'/'.join(layer)}: {error}"
            ) from None
        flat_params[(*layer, "kernel")] = kernel
        flat_params[(*layer, "bias")] = bias
        for name in _variables_of(flat_params, norm):
            del flat_params[(*norm, name)]
    return traverse_util.unflatten_dict(flat_params)


def folded_apply(model: nn.Module, params: Mapping[str, Any], images: Any, **apply_kwargs) -> Any:
    """`model`'s inference with folded `params` (`fold_batch_norms`): batch norms are skipped.

    A skipped batch norm still casts to its `dtype` and applies its `activation_fn`, if any.
    """

    def skip_batch_norm(next_fun: Callable[..., Any], args, kwargs, context) -> Any:
        module = context.module
        if not (isinstance(module, BATCH_NORM_TYPES) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["x"]
        if module.dtype is not None:
            x = x.astype(module.dtype)
        activation = getattr(module, "activation_fn", None)
        return x if activation is None else activation(x)

    with nn.intercept_methods(skip_batch_norm):
        return model.apply({"params": params}, images, **apply_kwargs)


# ----------------------------------------------------------------------------- exporting


def export_classifier(
    forward: Callable[[jax.Array], jax.Array],
    image_shape: tuple[int, int, int],
    mean: np.ndarray,
    std: np.ndarray,
    platforms: Sequence[str] = PLATFORMS,
) -> export.Exported:
    """Exports `uint8 (batch, H, W, C) -> float32 logits (batch, classes)` with symbolic batch.

    `forward` maps normalized float32 images to logits; the images are normalized as in
    training (`data.normalize_images` with the train set's `mean` and `std`) inside
    the exported graph. Whatever `forward` closes over (the parameters) becomes constants.
    """

    def serve(images: jax.Array) -> jax.Array:
        return forward(data.normalize_images(images, mean, std)).astype(jnp.float32)

    (batch,) = export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8)
    return export.export(jax.jit(serve), platforms=tuple(platforms))(images)


# ----------------------------------------------------------------------------- a run


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """The latest checkpoint of a run, with what is needed to rebuild and evaluate its model."""

    config: ml_collections.ConfigDict
    dataset: data.Dataset
    model: models.ConvNet
    variables: dict[str, Any]  # params and batch_stats
    step: int
    checkpoint: str  # its directory
    state_sha256: str  # as summary.json's: of params and batch_stats
    train_state: Any = None  # the whole restored train state, optimizer state included


def restore_run(workdir: str, step: int | None = None) -> RestoredRun:
    """Restores the latest checkpoint of the run in `workdir` (as training would resume it), or
    the one of `step`.

    Raises:
      ExportError: no run or no checkpoint (of `step`) in `workdir`.
      checkpoints.CheckpointError: the checkpoint cannot be read or does not fit the config.
      data.DataError: the run's dataset cannot be loaded.
    """
    config_path = os.path.join(workdir, "config.json")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    train_hint = f"train first: python -m train --config configs/default.py --workdir {workdir}"
    if not os.path.isfile(config_path) or not os.path.isdir(checkpoint_dir):
        raise ExportError(
            f"no trained run in {workdir} (no config.json or checkpoints/); {train_hint}"
        )
    try:
        with open(config_path) as file:
            config = ml_collections.ConfigDict(checkpoints.upgrade_config(json.load(file)))
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read {config_path}: {error}") from None
    checkpointer = checkpoints.Checkpointer(checkpoint_dir)
    try:
        if step is not None and step not in checkpointer.all_steps():
            raise ExportError(
                f"no checkpoint of step {step} in {checkpoint_dir}; it holds steps "
                f"{checkpointer.all_steps() or 'none'}"
            )
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise ExportError(f"no checkpoint in {checkpoint_dir}; {train_hint}")
        checkpointer.check_config(step, config)
        dataset = data.load_dataset(config.dataset)
        model = models.create_model(config.model, dataset.num_classes)
        steps_per_epoch = data.steps_per_epoch(dataset, config.batch_size)
        # A state of the structure training saves (optimizer state included).
        template, _ = train_lib.initial_train_state(config, model, dataset, steps_per_epoch)
        state = checkpointer.restore(step, template)
    finally:
        checkpointer.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return RestoredRun(
        config=config,
        dataset=dataset,
        model=model,
        variables=variables,
        step=int(state.step),
        checkpoint=os.path.join(checkpointer.directory, str(step)),
        state_sha256=metrics.tree_sha256(variables),
        train_state=state,
    )


def _run_test_accuracy(workdir: str, step: int) -> float | None:
    """The test accuracy the run itself recorded at `step` (None if it evaluated none there)."""
    events = metrics.read_events(os.path.join(workdir, metrics.METRICS_FILE))
    accuracies = [e["test_accuracy"] for e in events if e["event"] == "eval" and e["step"] == step]
    return accuracies[-1] if accuracies else None


def compare_on_test_set(
    exported: export.Exported,
    model_forward: Callable[[jax.Array], jax.Array],
    dataset: data.Dataset,
    batch_size: int,
) -> dict[str, float]:
    """Runs the exported model (on uint8 images) and `model_forward` (normalized) on every test
    image; returns both accuracies and the largest logit difference and logit."""
    test = dataset.test
    forward = jax.jit(model_forward)
    totals = {"exported_correct": 0, "model_correct": 0, "max_difference": 0.0, "max_logit": 0.0}
    for start in range(0, len(test.labels), batch_size):
        images, labels = (
            test.images[start : start + batch_size],
            test.labels[start : start + batch_size],
        )
        exported_logits = np.asarray(exported.call(images))
        model_logits = np.asarray(forward(data.normalize_images(images, dataset.mean, dataset.std)))
        totals["exported_correct"] += int(np.sum(exported_logits.argmax(-1) == labels))
        totals["model_correct"] += int(np.sum(model_logits.argmax(-1) == labels))
        difference = np.max(np.abs(exported_logits - model_logits.astype(np.float32)))
        totals["max_difference"] = max(totals["max_difference"], float(difference))
        totals["max_logit"] = max(totals["max_logit"], float(np.max(np.abs(model_logits))))
    count = max(len(test.labels), 1)
    return {
        "test_accuracy": totals["exported_correct"] / count,
        "model_test_accuracy": totals["model_correct"] / count,
        "test_examples": len(test.labels),
        "max_abs_logit_difference": totals["max_difference"],
        "max_abs_logit": totals["max_logit"],
    }


def export_run(workdir: str, platforms: Sequence[str] = PLATFORMS) -> dict[str, Any]:
    """Exports the latest checkpoint of the run in `workdir`; returns what model.json holds.

    Raises:
      ExportError, checkpoints.CheckpointError, data.DataError: see `restore_run`;
        ExportError also when the folded model disagrees with the checkpoint's.
      OSError: the export directory cannot be written.
    """
    run = restore_run(workdir)
    dataset, model = run.dataset, run.model
    image_shape = tuple(dataset.train.images.shape[1:])
    sample = jnp.zeros((1, *image_shape), jnp.float32)
    folds = find_folds(model, run.variables, sample, is_training=False)
    folded_params = fold_batch_norms(folds, run.variables)
    exported = export_classifier(
        lambda x: folded_apply(model, folded_params, x, is_training=False),
        image_shape,
        dataset.mean,
        dataset.std,
        platforms,
    )
    serialized = bytes(exported.serialize())
    # Measured with what is shipped: the deserialized bytes, not the object in memory.
    shipped = export.deserialize(bytearray(serialized))
    comparison = compare_on_test_set(
        shipped,
        lambda x: model.apply(run.variables, x, is_training=False),
        dataset,
        run.config.eval_batch_size,
    )
    tolerance = (
        ROUND_OFF_EPSILONS
        * float(jnp.finfo(jnp.dtype(run.config.model.dtype)).eps)
        * max(1.0, comparison["max_abs_logit"])
    )
    if not comparison["max_abs_logit_difference"] <= tolerance:
        raise ExportError(
            f"the folded model's logits differ from the checkpoint's eval-mode model's by up to "
            f"{comparison['max_abs_logit_difference']:.3g} (tolerance {tolerance:.3g}) on the "
            "test set; nothing was written. The folding does not match what the batch norm does "
            "at inference: please report this."
        )

    model_path, info_path = export_paths(workdir)
    info = {
        "format": "serialized jax.export.Exported; run with jax.export.deserialize(data).call",
        "model_file": os.path.basename(model_path),
        "model_sha256": hashlib.sha256(serialized).hexdigest(),
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "dataset": dataset.name,
        "class_names": list(data.class_names(dataset)),
        "input": {
            "shape": [None, *image_shape],
            "dtype": "uint8",
            "layout": "batch, height, width, channels, as the dataset stores images",
        },
        "normalization": {
            "formula": "(image / 255 - mean) / std per channel, inside the exported model",
            "mean": dataset.mean.tolist(),
            "std": dataset.std.tolist(),
        },
        "output": {"shape": [None, dataset.num_classes], "dtype": "float32", "values": "logits"},
        "batch_norm_folded": [
            {"batch_norm": "/".join(f.batch_norm_path), "into": "/".join(f.layer_path)}
            for f in folds
        ],
        "source": {
            "workdir": os.path.abspath(workdir),
            "checkpoint": run.checkpoint,
            "step": run.step,
            "state_sha256": run.state_sha256,
        },
        "test_accuracy": comparison["test_accuracy"],
        "test_examples": comparison["test_examples"],
        "run_test_accuracy": _run_test_accuracy(workdir, run.step),
        "model_test_accuracy": comparison["model_test_accuracy"],
        "max_abs_logit_difference": comparison["max_abs_logit_difference"],
    }
    os.makedirs(os.path.dirname(model_path), exist_ok=True)
    metrics.write_atomically(serialized, model_path)
    metrics.write_atomically(json.dumps(info, indent=2) + "\n", info_path)
    return info


def _describe(info: Mapping[str, Any], workdir: str) -> str:
    folded = info["batch_norm_folded"]
    folds = (
        f"{len(folded)} batch norms folded ({', '.join(f['batch_norm'] for f in folded)})"
        if folded
        else "the model has no batch norm, exported unfolded"
    )
    run_accuracy = info["run_test_accuracy"]
    run_note = "" if run_accuracy is None else f"; the run's own evaluation: {run_accuracy:.4f}"
    model_path, _ = export_paths(workdir)
    return (
        f"Exported step {info['source']['step']} ({folds}) for {', '.join(info['platforms'])} "
        f"to {model_path}, described in {INFO_FILE} beside it.\n"
        f"Test accuracy of the exported model: {info['test_accuracy']:.4f} on "
        f"{info['test_examples']} examples{run_note}."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m train.export",
        description=(
            "Fold the batch norms of a training run's latest checkpoint into the layers before "
            "them and write DIR/export/model.jaxexport (a serialized jax.export model: uint8 "
            "images in, float32 logits out) and DIR/export/model.json (what it takes and returns, "
            "class names, source checkpoint, test accuracy). The exported model is checked "
            "against the checkpoint's on the whole test set first. Classify images with it: "
            "python -m train.predict. Exit status: 0 exported, 2 nothing written."
        ),
    )
    parser.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help="the run's directory (the --workdir it was trained in)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # Orbax logs every restore at INFO; the summary line says what matters.
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    workdir = workdirs.resolve(args.workdir)
    # Refused while a training run holds the workdir: its checkpoint may be deleted under the
    # export (max_to_keep), and a model of a moving run is rarely the one wanted. A SIGINT
    # stops the run with a checkpoint to export; rerunning it resumes.
    info = workdirs.run_locked(
        workdir,
        lambda: export_run(workdir),
        shared=True,
        errors=(ExportError, checkpoints.CheckpointError, data.DataError),
        os_error="cannot write the export",
    )
    if info is None:
        return USAGE_ERROR
    print(_describe(info, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

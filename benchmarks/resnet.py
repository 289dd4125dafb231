"""ResNet-18 on 32x32 images with flax.linen.BatchNorm and with jbn.linen.BatchNorm, side by side.

    python benchmarks/resnet.py [--batch 32] [--image 32] [--width 64] [--blocks 2] [--steps 3]
        [--offsets 0 1000] [--reps 5] [--compile-rounds 2]

The model is train/resnet.py's ResNet-18 (`--blocks 2`; flax's examples/imagenet interface,
the CIFAR stem), 10 classes, trained with SGD (learning rate 0.1, momentum 0.9) on softmax
cross-entropy. The two variants differ only in the class of the `norm` partial
(`flax.linen.BatchNorm` with its defaults, i.e. the one-pass variance, or the drop-in
`jbn.linen.BatchNorm`), start from the same initial variables (the drop-in stores flax's names)
and see the same random batches
(N(0, 1) images plus `offset`, random labels).

Per-step error. Float32 runs of a ResNet drift apart within a few steps whatever the batch norm
(round-off grows through the network and the optimizer), so each step is compared from a
common state: the reference trajectory is the same model trained in float64 (jax's x64 mode,
flax's BatchNorm with the two-pass variance, independent of jbn); at each of `--steps` steps the
float64 state rounded to float32 is the common start, one float32 step of each variant and one
float64 step from that same (rounded) state are taken, and the table gives the float32 results'
relative errors: |loss - loss64| / |loss64|, and for params and batch_stats
||new - new64|| / ||new64 - start||, i.e. the error of what the step changed (over all layers,
and for batch_stats also the worst single layer). `--offsets` adds a constant to the images:
with a large one the first batch norm sees a mean well above its spread, where flax's one-pass
`E[x^2] - E[x]^2` loses digits (not all: the stem's zero padding makes the border pixels
differ, which bounds the ratio of mean to spread whatever the offset).

Speed. Train step (forward, backward, SGD update, the state donated) and eval step (logits with
the running statistics) of each variant, compiled with the train app's XLA options
(train/xla_options.py, the default config's `cpu_convolutions`), interleaved over `--reps`
repetitions (medians); then trace+lower and compile seconds of a fresh train and eval step of
each, interleaved over `--compile-rounds` rounds (medians). Ratios are jbn / flax: below 1 is
faster for jbn. On a machine shared with other jobs the ratios are noisy; rerun to compare.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jbn  # noqa: E402
from benchmarks import bn_ops, throughput  # noqa: E402
from train import resnet  # noqa: E402

NUM_CLASSES = 10
BATCH_NORMS: dict[str, Callable[..., nn.Module]] = {
    "flax": nn.BatchNorm,
    "jbn": jbn.linen.BatchNorm,
}
# The float64 reference: flax's layer with its two-pass variance (independent of jbn).
REFERENCE_BATCH_NORM = partial(nn.BatchNorm, use_fast_variance=False)

ERROR_KEYS = ("loss", "params", "batch_stats", "worst_layer")

State = tuple[Any, Any, Any]  # (params, batch_stats, opt_state)


def make_model(
    batch_norm: Callable[..., nn.Module], width: int, dtype: Any = jnp.float32, blocks: int = 2
):
    """train/resnet.py's ResNet-18 with `width` filters in its first stage (`blocks` per stage
    other than 2: a shallower or deeper ResNet of the same shape, for tests)."""
    return resnet.ResNet(
        stage_sizes=(blocks,) * 4,
        block_cls=resnet.ResNetBlock,
        num_classes=NUM_CLASSES,
        num_filters=width,
        dtype=dtype,
        batch_norm=batch_norm,
    )


def model_name(blocks: int) -> str:
    """ResNet-18 for 2 blocks per stage (2 convolutions each, plus the stem and the dense)."""
    return f"ResNet-{8 * blocks + 2}"


def optimizer() -> optax.GradientTransformation:
    return optax.sgd(0.1, momentum=0.9)


def initial_state(model: nn.Module, images: np.ndarray) -> State:
    """(params, batch_stats, opt_state) of `model` initialized from key 0."""
    variables = jax.jit(partial(model.init, train=False))(jax.random.key(0), images[:1])
    params = variables["params"]
    return params, variables["batch_stats"], optimizer().init(params)


def training_loss(model: nn.Module, params, batch_stats, images, labels):
    """`(loss, (logits, new batch_stats))` of one training-mode batch: the mean softmax
    cross-entropy, differentiable in `params` (`jax.value_and_grad(..., has_aux=True)`)."""
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates["batch_stats"])


def train_step(model: nn.Module) -> Callable[[State, jax.Array, jax.Array], tuple[State, Any]]:
    """step(state, images, labels) -> (state after one SGD step, the step's loss)."""
    tx = optimizer()

    def step(state, images, labels):
        params, batch_stats, opt_state = state
        (loss, (_, batch_stats)), grads = jax.value_and_grad(
            partial(training_loss, model), has_aux=True
        )(params, batch_stats, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    return step


def eval_step(model: nn.Module) -> Callable[[State, jax.Array], jax.Array]:
    """step(state, images) -> logits with the running statistics."""

    def step(state, images):
        params, batch_stats, _ = state
        return model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)

    return step


def random_batches(batch: int, image: int, steps: int, seed: int = 0) -> list[tuple]:
    """`steps` (images (batch, image, image, 3) float32 N(0, 1), labels (batch,) int32)."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.standard_normal((batch, image, image, 3)).astype(np.float32),
            rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
        )
        for _ in range(steps)
    ]


def _cast(tree: Any, dtype: Any) -> Any:
    """`tree` as numpy arrays, the floating ones in `dtype` (counters keep theirs)."""

    def cast(leaf):
        leaf = np.asarray(leaf)
        return leaf.astype(dtype) if np.issubdtype(leaf.dtype, np.floating) else leaf

    return jax.tree.map(cast, tree)


def _relative(got: Any, want: Any, start: Any) -> float:
    """||got - want|| / ||want - start|| over all leaves, in float64."""
    error = change = 0.0
    for g, w, s in zip(*(jax.tree.leaves(_cast(t, np.float64)) for t in (got, want, start))):
        error += float(np.sum((g - w) ** 2))
        change += float(np.sum((w - s) ** 2))
    return float(np.sqrt(error / change)) if change else float(np.sqrt(error))


def _worst(got: dict, want: dict, start: dict, parts: Callable) -> float:
    """The largest `_relative` error of one of the `parts(want)` ((path, subtree) pairs)."""
    worst = 0.0
    for path, part in parts(want):
        worst = max(worst, _relative(_at(got, path), part, _at(start, path)))
    return worst


def _layers(stats: dict, path: tuple = ()):
    """(path, statistics) of every batch-norm layer in a `batch_stats` tree."""
    if any(not isinstance(value, dict) for value in stats.values()):
        yield path, stats
        return
    for key, value in stats.items():
        yield from _layers(value, (*path, key))


def _at(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _enable_x64():
    """jax's x64 mode for a `with` block (jax.enable_x64 from jax 0.8, the experimental one
    before)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


def step_errors(
    batches: Sequence[tuple], offsets: Sequence[float], width: int, blocks: int = 2
) -> dict[float, list[dict[str, dict[str, float]]]]:
    """Per offset, per step, per variant, the float32 step's relative errors against the float64
    step from the same state (see the module docstring): {'loss', 'params', 'batch_stats',
    'worst_layer'} (the worst of the batch-norm layers' statistics)."""
    steps32 = {
        name: jax.jit(train_step(make_model(batch_norm, width, blocks=blocks)))
        for name, batch_norm in BATCH_NORMS.items()
    }
    step64 = jax.jit(train_step(make_model(REFERENCE_BATCH_NORM, width, jnp.float64, blocks)))
    initial = _cast(
        initial_state(make_model(nn.BatchNorm, width, blocks=blocks), batches[0][0]), np.float64
    )
    results = {}
    for offset in offsets:
        state64, rows = initial, []
        for images, labels in batches:
            images = images + np.float32(offset)
            start = _cast(state64, np.float32)  # the common float32 state
            with _enable_x64():
                new64, loss64 = step64(_cast(start, np.float64), images.astype(np.float64), labels)
                new64, loss64 = _cast(new64, np.float64), float(loss64)
            row = {}
            for name, step in steps32.items():
                (params, stats, _), loss = step(start, images, labels)
                params, stats = _cast(params, np.float64), _cast(stats, np.float64)
                row[name] = {
                    "loss": abs(float(loss) - loss64) / abs(loss64),
                    "params": _relative(params, new64[0], start[0]),
                    "batch_stats": _relative(stats, new64[1], start[1]),
                    "worst_layer": _worst(stats, new64[1], start[1], _layers),
                }
            rows.append(row)
            state64 = new64
        results[offset] = rows
    return results


def step_functions(
    batch_norm: Callable[..., nn.Module],
    images: np.ndarray,
    labels: np.ndarray,
    width: int,
    dtype: Any = jnp.float32,
    blocks: int = 2,
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(train, eval): zero-argument callables running one compiled step of the variant each
    (train donates and carries its state), for `bn_ops.time_interleaved`."""
    model = make_model(batch_norm, width, dtype, blocks)
    options = throughput.compiler_options()
    train = jax.jit(train_step(model), donate_argnums=(0,), compiler_options=options)
    evaluate = jax.jit(eval_step(model), compiler_options=options)
    images, labels = jnp.asarray(images, dtype), jnp.asarray(labels)
    holder = {"state": initial_state(model, images)}

    def run_train():
        holder["state"], loss = train(holder["state"], images, labels)
        return loss

    return run_train, lambda: evaluate(holder["state"], images)


def compile_seconds(
    batch_norm: Callable[..., nn.Module],
    images: np.ndarray,
    labels: np.ndarray,
    width: int,
    blocks: int = 2,
) -> tuple[float, float, float, float]:
    """(train trace+lower, train compile, eval trace+lower, eval compile) seconds of a fresh
    model's steps."""
    model = make_model(batch_norm, width, blocks=blocks)
    options = throughput.compiler_options()
    state = initial_state(model, images)
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    seconds = []
    for jitted, args in (
        (
            jax.jit(train_step(model), donate_argnums=(0,), compiler_options=options),
            (state, images, labels),
        ),
        (jax.jit(eval_step(model), compiler_options=options), (state, images)),
    ):
        start = time.perf_counter()
        lowered = jitted.lower(*args)
        traced = time.perf_counter()
        lowered.compile()
        seconds += [traced - start, time.perf_counter() - traced]
    return tuple(seconds)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image", type=int, default=32, help="height and width (3 channels)")
    parser.add_argument("--width", type=int, default=64, help="filters of the first stage")
    parser.add_argument(
        "--blocks", type=int, default=2, help="blocks per stage (2: ResNet-18; 1 for tests)"
    )
    parser.add_argument("--steps", type=int, default=3, help="steps of the error table")
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.0, 1000.0])
    parser.add_argument("--reps", type=int, default=5, help="timed steps of each variant")
    parser.add_argument("--compile-rounds", type=int, default=2, help="0: no compile table")
    args = parser.parse_args(argv)
    for name in ("batch", "image", "width", "blocks", "steps", "reps"):
        if getattr(args, name) < (2 if name == "batch" else 1):
            parser.error(f"--{name} must be at least {2 if name == 'batch' else 1}")
    if args.compile_rounds < 0:
        parser.error("--compile-rounds must be at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    command = " ".join(["python benchmarks/resnet.py", *(sys.argv[1:] if argv is None else argv)])
    print(
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC {throughput.cpu_model()} "
        f"({os.cpu_count()} CPUs) jax={jax.__version__} flax={flax.__version__} `{command}`"
    )
    batches = random_batches(args.batch, args.image, args.steps)
    print(
        "\nPer-step relative error of the float32 step vs the float64 step from the same state "
        f"({model_name(args.blocks)}, width {args.width}, batch {args.batch}, "
        f"{args.image}x{args.image}x3):\n"
    )
    print(
        "| images | step | loss flax | loss jbn | params flax | params jbn "
        "| batch_stats flax | batch_stats jbn | worst layer flax | worst layer jbn |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for offset, rows in step_errors(batches, args.offsets, args.width, args.blocks).items():
        for index, row in enumerate(rows):
            cells = " | ".join(
                f"{row[name][key]:.1e}" for key in ERROR_KEYS for name in BATCH_NORMS
            )
            print(f"| N({offset:g}, 1) | {index + 1} | {cells} |", flush=True)

    images, labels = batches[0]
    functions = {
        name: step_functions(batch_norm, images, labels, args.width, blocks=args.blocks)
        for name, batch_norm in BATCH_NORMS.items()
    }
    medians = {
        mode: bn_ops.time_interleaved(
            {name: pair[index] for name, pair in functions.items()}, args.reps
        )
        for index, mode in enumerate(("train step", "eval step"))
    }
    print(f"\nStep time, medians of {args.reps} interleaved steps (ratio jbn / flax):\n")
    print("| step | flax ms | jbn ms | jbn / flax |")
    print("|---|---|---|---|")
    for mode, times in medians.items():
        print(
            f"| {mode} | {times['flax'] * 1e3:.1f} | {times['jbn'] * 1e3:.1f} "
            f"| {times['jbn'] / times['flax']:.2f} |"
        )
    if args.compile_rounds:
        print_compile_times(images, labels, args.width, args.blocks, args.compile_rounds)


def print_compile_times(images, labels, width: int, blocks: int, rounds: int) -> None:
    """Median trace+lower and compile seconds per variant over interleaved rounds."""
    samples = {name: [] for name in BATCH_NORMS}
    # Compile times must not come from a cache on disk.
    cache_enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        for _ in range(rounds):
            for name, batch_norm in BATCH_NORMS.items():
                samples[name].append(compile_seconds(batch_norm, images, labels, width, blocks))
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_enabled)
    medians = {name: np.median(np.asarray(values), axis=0) for name, values in samples.items()}
    print(f"\nCompile time, medians of {rounds} interleaved rounds (ratio jbn / flax):\n")
    print(
        "| step | flax trace+lower s | flax compile s | jbn trace+lower s | jbn compile s "
        "| total jbn / flax |"
    )
    print("|---|---|---|---|---|---|")
    for mode, index in (("train step", 0), ("eval step", 2)):
        flax_s, jbn_s = medians["flax"][index : index + 2], medians["jbn"][index : index + 2]
        print(
            f"| {mode} | {flax_s[0]:.2f} | {flax_s[1]:.2f} | {jbn_s[0]:.2f} | {jbn_s[1]:.2f} "
            f"| {jbn_s.sum() / flax_s.sum():.2f} |"
        )


if __name__ == "__main__":
    main()

"""Training and evaluation of the document's network: train state, steps, loop.

Structure (as flax's examples/imagenet): `train_step` and `eval_step` are pure functions of
(state, batch), compiled for the run's device layout (`train/devices.py`); `setup` builds
everything a run needs (data, model, state restored from the workdir's latest checkpoint,
compiled steps); `events_at` says after which step to log, evaluate, save and stop,
`steps_in_dispatch` how many steps one call of the compiled program runs; and
`train_and_evaluate` runs the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax.training import train_state
from jax import lax

from train import checkpoints, data, devices, metrics, models, preemption
from train.config_checks import ConfigError, check_config


class DivergenceError(Exception):
    """Training produced NaN or infinity; the message names the step. Nothing after it is saved."""


class TrainState(train_state.TrainState):
    """Flax's train state plus the batch norm moving statistics (collection 'batch_stats')."""

    batch_stats: Any


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train_and_evaluate` leaves behind.

    state: the final (or, if stopped early, the saved) train state, one host copy.
    summary: the final summary (None when stopped early).
    stopped_by: None if training ran to the end, else 'SIGINT', 'SIGTERM' or 'stop_after_steps'.
    """

    state: TrainState
    summary: dict[str, Any] | None
    stopped_by: str | None


# ----------------------------------------------------------------------------- optimization


def create_learning_rate_schedule(
    optimizer_config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
    """The learning rate at each step.

    constant: lr.
    warmup:   lr * min(1, step / W), W = warmup_epochs * steps_per_epoch.
    cosine:   the warmup, then lr * (1 + cos(pi * (step - W) / (T - W))) / 2, T = total_steps.
    """
    peak = optimizer_config.learning_rate
    if optimizer_config.schedule == "constant":
        return optax.constant_schedule(peak)
    warmup_steps = round(optimizer_config.warmup_epochs * steps_per_epoch)
    if optimizer_config.schedule == "warmup":
        if warmup_steps == 0:
            return optax.constant_schedule(peak)
        return optax.linear_schedule(0.0, peak, transition_steps=warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=0.0,
    )


def create_optimizer(
    optimizer_config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """Adam (the document's), AdamW (decoupled weight decay) or SGD with momentum."""
    name = optimizer_config.name
    if name == "adam":
        return optax.adam(
            schedule, b1=optimizer_config.b1, b2=optimizer_config.b2, eps=optimizer_config.eps
        )
    if name == "adamw":
        return optax.adamw(
            schedule,
            b1=optimizer_config.b1,
            b2=optimizer_config.b2,
            eps=optimizer_config.eps,
            weight_decay=optimizer_config.weight_decay,
        )
    return optax.sgd(schedule, momentum=optimizer_config.momentum)


def create_train_state(
    rng: jax.Array,
    model: models.ConvNet,
    image_shape: tuple[int, ...],
    tx: optax.GradientTransformation,
) -> TrainState:
    """Initializes parameters and batch statistics for images of shape (H, W, C)."""
    # Inference mode: initialization needs no batch statistics (and no pmap axis for them).
    # Compiled as one program: op by op, the initializers' random number generation compiles
    # dozens of small programs, several seconds on CPU.
    init = jax.jit(functools.partial(model.init, is_training=False))
    variables = init(rng, jnp.zeros((1, *image_shape), jnp.float32))
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
    )
    # An int32 array, as after any step (TrainState.create leaves a Python int).
    return state.replace(step=jnp.zeros((), jnp.int32))


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """`num_train_steps`, or (when it is -1) `num_epochs` epochs of `steps_per_epoch`."""
    if config.num_train_steps > 0:
        return config.num_train_steps
    return steps_per_epoch * config.num_epochs


def initial_train_state(
    config: ml_collections.ConfigDict,
    model: models.ConvNet,
    dataset: data.Dataset,
    steps_per_epoch: int,
) -> tuple[TrainState, optax.Schedule]:
    """The state a run starts from (before any checkpoint), and its learning rate schedule."""
    schedule = create_learning_rate_schedule(
        config.optimizer, steps_per_epoch, total_train_steps(config, steps_per_epoch)
    )
    tx = create_optimizer(config.optimizer, schedule)
    image_shape = tuple(dataset.train.images.shape[1:])
    state = create_train_state(jax.random.key(config.seed), model, image_shape, tx)
    return state, schedule


# ----------------------------------------------------------------------------- steps


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example -log softmax(logits)[label]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(
    state: TrainState, batch: Mapping[str, jax.Array], axis_name: str | None = None
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch; under pmap, `axis_name` averages over devices.

    loss = mean cross-entropy + sum of the 'losses' sown by the model (batch norm parameter
    regularizers). Gradients are `pmean`ed, so every device applies the same update; the
    returned metrics (loss, accuracy) are averages over the global batch.
    """

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            is_training=True,
            mutable=["batch_stats", "losses"],
        )
        regularization = sum(jax.tree.leaves(updates.get("losses", {})), jnp.float32(0))
        loss = cross_entropy(logits, batch["label"]).mean() + regularization
        return loss, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    step_metrics = {"loss": loss, "accuracy": accuracy}
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        step_metrics = jax.lax.pmean(step_metrics, axis_name)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, step_metrics


def eval_step(
    state: TrainState, batch: Mapping[str, jax.Array], axis_name: str | None = None
) -> dict[str, jax.Array]:
    """Sums over the real (mask=True) examples: cross-entropy, correct predictions, count."""
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["image"],
        is_training=False,
    )
    weights = batch["mask"].astype(jnp.float32)
    sums = {
        "loss_sum": jnp.sum(cross_entropy(logits, batch["label"]) * weights),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * weights),
        "count": jnp.sum(weights),
    }
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums


def train_step_averaging_statistics(
    state: TrainState, batch: Mapping[str, jax.Array], axis_name: str
) -> tuple[TrainState, dict[str, jax.Array]]:
    """`train_step` with per-device batch statistics whose moving averages are then averaged.

    For the sharding layout with `model.sync_batch_stats=False`, run per device under shard_map:
    each device normalizes its own shard, and the devices' moving averages are averaged after
    every step, so the state stays replicated. The pmap layout instead keeps one moving average
    per device and averages them only when one copy is needed (evaluation, checkpoint). The two
    agree because the update is linear in the batch statistics, which training never reads
    back, except with renorm (its correction uses the moving statistics).
    """
    state, step_metrics = train_step(state, batch, axis_name=axis_name)
    return state.replace(
        batch_stats=devices.mean_float_leaves(state.batch_stats, axis_name)
    ), step_metrics


def scanned(
    step_fn: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """`step_fn` run over a stack of batches in one program: `lax.scan` over their leading axis.

    Returns steps(state, batches, axis_name=None) -> (state, metrics of every step, stacked).
    Each step computes what `step_fn` computes alone (tests/test_train.py checks that runs with
    and without stacking end bitwise equal); one dispatch of several steps saves the per-call
    costs of XLA:CPU, most of all its fresh buffers, which the kernel zero-fills page by page
    at every call (config.steps_per_dispatch).
    """

    def steps(state, batches, axis_name=None):
        return lax.scan(
            lambda state, batch: step_fn(state, batch, axis_name=axis_name), state, batches
        )

    return steps


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    eval_fn: Callable[..., Any],
    state: TrainState,
    dataset: data.Dataset,
    config: ml_collections.ConfigDict,
    layout: devices.DeviceLayout,
) -> dict[str, float]:
    """Test loss and accuracy over every test example (padding excluded through the mask)."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for batch in data.eval_batches(dataset, config.eval_batch_size):
        # Every replica holds the sums over the global batch (psum, or XLA's under sharding).
        sums = layout.unreplicate(eval_fn(state, layout.shard(batch)))
        for name, value in sums.items():
            totals[name] += float(value)
    count = max(totals["count"], 1.0)
    return {
        "test_loss": totals["loss_sum"] / count,
        "test_accuracy": totals["correct"] / count,
        "test_examples": totals["count"],
    }


# ----------------------------------------------------------------------------- events


class Cadence(NamedTuple):
    """The step counts that decide the loop's events (see `events_at`)."""

    steps_per_epoch: int
    total_steps: int
    log_every_steps: int
    eval_every_steps: int  # 0: only at the end of each epoch
    stop_after_steps: int | None


class Events(NamedTuple):
    """What the loop does after a training step.

    log: write the mean train metrics since the last log.
    evaluate: evaluate the whole test set, before saving.
    save: write a checkpoint.
    stopped_by: the stop request honoured at this step ('stop_after_steps' or a signal's name)
      or None.
    done: leave the loop (stopped, or the last step).
    """

    log: bool
    evaluate: bool
    save: bool
    stopped_by: str | None
    done: bool


def steps_in_dispatch(step: int, cadence: Cadence, steps_per_dispatch: int) -> int:
    """How many training steps the dispatch after step `step` runs: 1 or `steps_per_dispatch`.

    The loop acts (logs, evaluates, saves, stops) only between dispatches, so a dispatch runs
    `steps_per_dispatch` steps when none of its steps but the last has an event (`events_at`
    without a signal), and a single step otherwise. The last step of the run is an event, so no
    dispatch runs past it. Two sizes only: each is a program of its own to compile. A signal is
    honoured after the dispatch it arrives in.
    """
    for inner in range(step + 1, step + steps_per_dispatch):
        events = events_at(inner, cadence)
        if events.log or events.save or events.done:
            return 1
    return steps_per_dispatch


def events_at(step: int, cadence: Cadence, signal_name: str | None = None) -> Events:
    """What happens after training step `step` (counted from 1, over all epochs).

    Evaluation and a checkpoint at the end of every epoch, every `eval_every_steps` steps and at
    the last step; the train metrics every `log_every_steps` steps and at every evaluation. A
    stop, at step `stop_after_steps` or when a signal (`signal_name`, named in preference) asked
    for one, saves a checkpoint too, evaluating first only if an evaluation is due anyway.
    """
    evaluate = (
        step % cadence.steps_per_epoch == 0
        or step == cadence.total_steps
        or (cadence.eval_every_steps > 0 and step % cadence.eval_every_steps == 0)
    )
    stopped_by = signal_name or ("stop_after_steps" if step == cadence.stop_after_steps else None)
    return Events(
        log=evaluate or step % cadence.log_every_steps == 0,
        evaluate=evaluate,
        save=evaluate or stopped_by is not None,
        stopped_by=stopped_by,
        done=stopped_by is not None or step == cadence.total_steps,
    )


# ----------------------------------------------------------------------------- setup


class Run(NamedTuple):
    """Everything the training loop needs, built by `setup`."""

    config: ml_collections.ConfigDict
    workdir: str
    layout: devices.DeviceLayout
    dataset: data.Dataset
    data_fingerprint: str
    cadence: Cadence
    schedule: optax.Schedule
    state: TrainState  # the restored (or initial) state, laid out for the devices
    start_step: int
    resumed_from: int | None  # the checkpoint's step, None when starting afresh
    checkpointer: checkpoints.Checkpointer
    writer: metrics.MetricsWriter
    train_fn: Callable[..., Any]  # compiled train_step(state, batch)
    # compiled scanned(train_step)(state, stacked batches), or None (steps_per_dispatch == 1)
    train_steps_fn: Callable[..., Any] | None
    eval_fn: Callable[..., Any]  # compiled eval_step(state, batch)
    # The state with the devices' own moving statistics averaged (if the layout keeps them)
    average_statistics: Callable[[TrainState], TrainState]
    started: float  # time.perf_counter() when setup began


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Checks the config, loads the data, builds the model and restores the latest checkpoint.

    Raises:
      ConfigError: a config value that cannot work.
      checkpoints.CheckpointError: `workdir` holds checkpoints of another experiment or data.
    """
    started = time.perf_counter()
    layout = devices.device_layout(config)
    check_config(config, layout)
    on_cpu = layout.local_devices[0].platform == "cpu"
    if on_cpu and config.steps_per_dispatch > 1 and not config.model.fast_layers:
        warnings.warn(
            "steps_per_dispatch > 1 with model.fast_layers=False: inside lax.scan XLA:CPU runs "
            "the gradients of flax's own convolutions and max pools many times slower (a "
            "scanned step took 38x a single one: docs/results/speed.md, \"Where the step's time "
            "goes\"); set steps_per_dispatch=1 to compare flax's layers",
            stacklevel=2,
        )
    checkpointer = checkpoints.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint_max_to_keep
    )
    # Before the slow part: a workdir of another experiment fails at once.
    checkpointer.check_newest_config(config)
    dataset = data.load_dataset(config.dataset)
    data_fingerprint = data.data_fingerprint(dataset)
    try:  # batch_size against the dataset's size
        steps_per_epoch = data.steps_per_epoch(dataset, config.batch_size)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    model = models.create_model(config.model, dataset.num_classes, axis_name=layout.model_axis_name)
    state, schedule = initial_train_state(config, model, dataset, steps_per_epoch)
    resumed_from, state = checkpointer.restore_latest(
        state, config, data_fingerprint, report=print if layout.is_primary else lambda _: None
    )
    start_step = int(state.step)
    writer = metrics.MetricsWriter(workdir, keep_until_step=start_step, enabled=layout.is_primary)
    if layout.is_primary:
        metrics.write_json(checkpoints.config_to_json(config), os.path.join(workdir, "config.json"))
        if resumed_from is not None:
            print(f"Resuming from {checkpointer.directory}/{resumed_from} (step {start_step}).")
    train_fn, train_steps_fn, average_statistics = _compile_training(config, layout)
    return Run(
        config=config,
        workdir=workdir,
        layout=layout,
        dataset=dataset,
        data_fingerprint=data_fingerprint,
        cadence=Cadence(
            steps_per_epoch=steps_per_epoch,
            total_steps=total_train_steps(config, steps_per_epoch),
            log_every_steps=config.log_every_steps,
            eval_every_steps=config.eval_every_steps,
            stop_after_steps=config.stop_after_steps,
        ),
        schedule=schedule,
        state=layout.replicate(state),
        start_step=start_step,
        resumed_from=resumed_from,
        checkpointer=checkpointer,
        writer=writer,
        train_fn=train_fn,
        train_steps_fn=train_steps_fn,
        eval_fn=layout.compile(eval_step, donate_state=False),
        average_statistics=average_statistics,
        started=started,
    )


def _compile_training(
    config: ml_collections.ConfigDict, layout: devices.DeviceLayout
) -> tuple[Callable[..., Any], Callable[..., Any] | None, Callable[[TrainState], TrainState]]:
    """The compiled train step, the compiled multi-step program (None for one step per
    dispatch), and what makes one copy of the state out of the devices' own (the layout's
    `LocalStatistics` rule for `model.sync_batch_stats`)."""
    rule = layout.statistics_rule(config.model.sync_batch_stats)
    step_fn = train_step_averaging_statistics if rule.per_device_step else train_step
    train_fn = layout.compile(step_fn, donate_state=True, per_device=rule.per_device_step)
    train_steps_fn = None
    if config.steps_per_dispatch > 1:
        train_steps_fn = layout.compile(
            scanned(step_fn), donate_state=True, per_device=rule.per_device_step, stacked=True
        )
    if not rule.average_for_one_copy:
        return train_fn, train_steps_fn, lambda replicated: replicated
    average = layout.compile(devices.mean_float_leaves, donate_state=False)
    return (
        train_fn,
        train_steps_fn,
        lambda replicated: replicated.replace(batch_stats=average(replicated.batch_stats)),
    )


# ----------------------------------------------------------------------------- loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Trains per `config`, evaluating and checkpointing each epoch, resuming from `workdir`.

    The run is a pure function of the config: resuming from any checkpoint (including one
    written when SIGINT/SIGTERM or `stop_after_steps` stopped a run mid-epoch) ends with the
    same parameters as an uninterrupted run. With several devices and
    `model.sync_batch_stats=False` the per-device moving statistics are averaged at every
    evaluation and checkpoint, so a resumed run starts from the average and differs slightly.
    """
    run = setup(config, workdir)
    state, step, events, last_eval = run.state, run.start_step, None, None
    log = metrics.TrainLog(config.batch_size)
    progress = tqdm.tqdm(
        total=run.cadence.total_steps,
        initial=min(step, run.cadence.total_steps),
        unit="step",
        dynamic_ncols=True,
        disable=not (config.progress_bar and run.layout.is_primary),
    )
    batches, compiled = _train_batches(run), set()
    with preemption.StopRequests() as stop_requests, progress:
        while chunk := list(
            itertools.islice(
                batches, steps_in_dispatch(step, run.cadence, config.steps_per_dispatch)
            )
        ):
            state = _dispatch(run, state, chunk, log, compiled)
            step += len(chunk)
            progress.update(len(chunk))
            signal_name = stop_requests.signal_name
            if run.layout.any_process(signal_name is not None):  # every dispatch, every process
                signal_name = signal_name or "a signal to another process"
            events = events_at(step, run.cadence, signal_name)
            if events.log:
                _log_training(run, log, progress, step)
            if events.save:
                state, evaluated = _save(run, state, step, events.evaluate, log, stop_requests)
                last_eval = evaluated or last_eval
            if events.done:
                break
    stopped_by = events.stopped_by if events is not None else None
    return _finish(run, state, step, stopped_by, last_eval, log)


def _dispatch(
    run: Run,
    state: TrainState,
    chunk: list[dict[str, np.ndarray]],
    log: metrics.TrainLog,
    compiled: set[Callable[..., Any]],
) -> TrainState:
    """Runs `chunk`'s steps in one call, the train step's (one batch) or the multi-step
    program's (a stack), and adds their metrics to `log`.

    A program's first call compiles it. After the run's first dispatch (which TrainLog leaves
    out of the timing anyway) that call is waited for inside a pause: compiling is not training.
    `compiled` holds the programs called before.
    """
    if len(chunk) == 1:
        program, batch = run.train_fn, run.layout.shard(chunk[0])
    else:
        stacked = {name: np.stack([batch[name] for batch in chunk]) for name in chunk[0]}
        program, batch = run.train_steps_fn, run.layout.shard(stacked, stacked=True)
    timed = program in compiled or not compiled
    compiled.add(program)
    if timed:
        state, step_metrics = program(state, batch)
    else:
        jax.block_until_ready(state)  # the previous dispatch's time is training
        with log.pause():
            state, step_metrics = jax.block_until_ready(program(state, batch))
    log.add(run.layout.local_copy(step_metrics), steps=len(chunk), timed=timed)
    return state


def _train_batches(run: Run) -> Iterator[dict[str, np.ndarray]]:
    """The training batches from `run.start_step` on, epoch after epoch, to the last step."""
    start, per_epoch = run.start_step, run.cadence.steps_per_epoch
    if start >= run.cadence.total_steps:  # a finished run (or one shortened): nothing to train
        return
    for epoch in range(start // per_epoch, math.ceil(run.cadence.total_steps / per_epoch)):
        yield from data.train_batches(
            run.dataset,
            run.config.batch_size,
            seed=run.config.seed,
            epoch=epoch,
            start_step=max(start - epoch * per_epoch, 0),
            augment=run.config.dataset.augment,
        )


def _diverged_advice(run: Run) -> str:
    return (
        f"Nothing after it was saved; the finite checkpoints before it (if any) are in "
        f"{run.checkpointer.directory}. The run is deterministic, so rerunning the same command "
        "diverges again: lower optimizer.learning_rate (or add warmup) in a new --workdir."
    )


def _log_training(run: Run, log: metrics.TrainLog, progress: tqdm.tqdm, step: int) -> None:
    """Writes the train metrics since the last log; raises DivergenceError on a non-finite loss."""
    logged = log.flush()
    run.writer.write(
        "train",
        step,
        epoch=step / run.cadence.steps_per_epoch,
        learning_rate=float(run.schedule(step - 1)),
        **logged,
    )
    progress.set_postfix(
        loss=f"{logged['loss']:.3f}",
        acc=f"{logged['accuracy']:.3f}",
        img_s=f"{logged['images_per_s']:.0f}",
    )
    # The mean of the window's losses, already on the host: a NaN or infinity at any step since
    # the last log shows here, at no extra device sync.
    if not math.isfinite(logged["loss"]):
        raise DivergenceError(
            f"training diverged: the mean train loss of the steps up to step {step} is "
            f"{logged['loss']}. " + _diverged_advice(run)
        )


def _save(
    run: Run,
    state: TrainState,
    step: int,
    evaluate_first: bool,
    log: metrics.TrainLog,
    stop_requests: preemption.StopRequests,
) -> tuple[TrainState, dict[str, float] | None]:
    """Checkpoints (after evaluating the test set if asked) outside the timed training.

    Returns the state (one copy of the moving statistics) and the evaluation, if any.
    """
    jax.block_until_ready(state)  # the steps' time is not the pause's
    train_seconds = log.train_seconds()
    evaluated = None
    with log.pause():
        state = run.average_statistics(state)
        if evaluate_first:
            evaluated = evaluate(run.eval_fn, state, run.dataset, run.config, run.layout)
            epoch = step / run.cadence.steps_per_epoch
            run.writer.write("eval", step, epoch=epoch, train_seconds=train_seconds, **evaluated)
            if run.layout.is_primary:
                tqdm.tqdm.write(
                    f"step {step}/{run.cadence.total_steps} (epoch {epoch:.2f}): "
                    f"test loss {evaluated['test_loss']:.4f}, "
                    f"test accuracy {evaluated['test_accuracy']:.4f}"
                )
        host_state = run.layout.unreplicate(state)
        non_finite = checkpoints.non_finite_leaves(host_state)
        if non_finite:
            raise DivergenceError(
                f"training diverged by step {step}: NaN or infinity in "
                f"{', '.join(non_finite[:3])}{' ...' if len(non_finite) > 3 else ''}. "
                + _diverged_advice(run)
            )
        with stop_requests.finishing(f"the checkpoint of step {step}"):
            run.checkpointer.save(step, host_state, run.config, run.data_fingerprint)
    return state, evaluated


def _finish(
    run: Run,
    state: TrainState,
    step: int,
    stopped_by: str | None,
    last_eval: dict[str, float] | None,
    log: metrics.TrainLog,
) -> TrainResult:
    """Closes the run: the curves, and the summary unless it stopped early."""
    final_state = run.layout.unreplicate(state)
    run.checkpointer.close()
    if run.layout.is_primary:
        metrics.plot_curves(
            metrics.read_events(run.writer.path), os.path.join(run.workdir, metrics.CURVES_FILE)
        )
    if stopped_by and step < run.cadence.total_steps:  # (a stop at the last step changes nothing)
        run.writer.close()
        if run.layout.is_primary:
            print(
                f"Stopped by {stopped_by} at step {step}; checkpoint saved in "
                f"{run.checkpointer.directory}. Rerun the same command to resume."
            )
        return TrainResult(state=final_state, summary=None, stopped_by=stopped_by)

    if last_eval is None:  # resumed a finished run: nothing trained, evaluate once more
        last_eval = evaluate(run.eval_fn, state, run.dataset, run.config, run.layout)
    summary = {
        "dataset": run.dataset.name,
        "batch_norm": bool(run.config.model.use_batch_norm),
        "num_params": metrics.count_params(final_state.params),
        "steps": step,
        "epochs": step / run.cadence.steps_per_epoch,
        "test_accuracy": last_eval["test_accuracy"],
        "test_loss": last_eval["test_loss"],
        "test_examples": int(last_eval["test_examples"]),
        "wall_time_s": time.perf_counter() - run.started,
        "train_images_per_s": log.images_per_s(),
        "devices": run.layout.num_devices,
        "processes": run.layout.num_processes,
        "resumed_from_step": run.resumed_from,
        "data_fingerprint": run.data_fingerprint,
        "state_sha256": metrics.tree_sha256(
            {"params": final_state.params, "batch_stats": final_state.batch_stats}
        ),
    }
    summary_path = os.path.join(run.workdir, metrics.SUMMARY_FILE)
    previous = metrics.read_json(summary_path) if step == run.start_step else None
    if isinstance(previous, dict):
        # Relaunched after the end: nothing trained, so the timing of the run that trained stays.
        for key in ("wall_time_s", "train_images_per_s"):
            summary[key] = previous.get(key, summary[key])
    if run.layout.is_primary:
        metrics.write_summary(summary, summary_path)
    run.writer.close()
    return TrainResult(state=final_state, summary=summary, stopped_by=None)

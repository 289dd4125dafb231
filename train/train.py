"""Training and evaluation of the document's network: train state, steps, device layout, loop.

Structure (as flax's examples/imagenet): `train_step` and `eval_step` are pure functions of
(state, batch); `DeviceLayout` decides between one device (jit) and data parallelism over
devices, either one `jit` over a device mesh with the batch sharded (XLA inserts the
collectives, and batch norm sees the global batch) or `pmap` (gradients averaged with
`lax.pmean`, batch norm statistics synchronized through the pmap axis); `train_and_evaluate`
runs the epochs, evaluates on the whole test set after each and checkpoints, resuming from the
latest checkpoint of its workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train import checkpoints, data, metrics, models

# Name of the device axis (pmap's axis, the mesh's axis): pmap and shard_map average gradients
# and synchronize batch statistics over it.
AXIS_NAME = "batch"

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup", "cosine")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(Exception):
    """A config value that cannot work; the message names the field."""


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


def mean_float_leaves(tree: Any, axis_name: str) -> Any:
    """Cross-device mean of the floating-point leaves (integer counters are equal anyway)."""
    return jax.tree.map(
        lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree,
    )


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
    return state.replace(batch_stats=mean_float_leaves(state.batch_stats, axis_name)), step_metrics


# ----------------------------------------------------------------------------- devices

# config.parallelism: how a run with more than one device spreads the work.
PARALLELISMS = ("sharding", "pmap")


@dataclasses.dataclass(frozen=True)
class DeviceLayout:
    """How batches and state are spread over devices.

    parallelism=None: one device, `jit`, host batches used as they are.

    'sharding' (the default with several devices): one `jax.jit` over a `Mesh` of the devices
    of all `num_processes` processes (axis AXIS_NAME), the state replicated, the global batch
    sharded along its leading axis. Each process contributes its slice of every global batch
    (`jax.make_array_from_process_local_data`). XLA inserts the collectives: gradients, metrics
    and batch statistics are those of the global batch with `axis_name=None` in the model.
    Per-device batch statistics need explicit collectives, so that step runs under
    `jax.shard_map` (`compile(..., per_device=True)`).

    'pmap': `pmap` over `local_devices` of each process; each process reshapes its slice of the
    global batch to (local devices, per-device batch, ...), and the model and steps reduce over
    the pmap axis AXIS_NAME explicitly.
    """

    parallelism: str | None
    local_devices: tuple[jax.Device, ...]
    num_processes: int
    process_index: int

    @property
    def parallel(self) -> bool:
        return self.parallelism is not None

    @property
    def num_devices(self) -> int:
        return len(self.local_devices) * self.num_processes

    @property
    def is_primary(self) -> bool:
        return self.process_index == 0

    @property
    def model_axis_name(self) -> str | None:
        """The axis name the model's batch norm reduces over: only pmap names one."""
        return AXIS_NAME if self.parallelism == "pmap" else None

    @functools.cached_property
    def mesh(self) -> Mesh:
        """The 'sharding' layout's mesh: every device of every process, one axis AXIS_NAME.

        Auto axes: the step's in/out shardings are given and XLA's sharding propagation
        partitions everything in between (tests/multidevice checks jbn on Auto and Explicit
        meshes alike).
        """
        devices = jax.devices() if self.num_processes > 1 else self.local_devices
        return Mesh(np.asarray(devices), (AXIS_NAME,), axis_types=(AxisType.Auto,))

    @property
    def _replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def _batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(AXIS_NAME))

    def _process_slice(self, x: np.ndarray) -> np.ndarray:
        """This process's contiguous share of a global batch."""
        per_process = x.shape[0] // self.num_processes
        start = self.process_index * per_process
        return x[start : start + per_process]

    def shard(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """A global host batch (the same in every process) laid out for the compiled steps."""
        if self.parallelism is None:
            return dict(batch)
        if self.parallelism == "sharding":
            return {
                name: jax.make_array_from_process_local_data(
                    self._batch_sharding, self._process_slice(np.asarray(x)), np.shape(x)
                )
                for name, x in batch.items()
            }
        local_count = len(self.local_devices)

        def local_shards(x: np.ndarray) -> np.ndarray:
            x = self._process_slice(x)
            return x.reshape((local_count, x.shape[0] // local_count, *x.shape[1:]))

        return {name: local_shards(np.asarray(x)) for name, x in batch.items()}

    def replicate(self, tree: Any) -> Any:
        """A host pytree (the same in every process) copied to every device."""
        if self.parallelism is None:
            return tree
        if self.parallelism == "sharding":
            sharding = self._replicated
        else:  # pmap: a leading axis of one copy per local device, as flax.jax_utils.replicate
            local_count = len(self.local_devices)
            tree = jax.tree.map(lambda x: np.broadcast_to(x, (local_count, *np.shape(x))), tree)
            sharding = NamedSharding(Mesh(np.asarray(self.local_devices), ("local",)), P("local"))

        def put(x: Any) -> jax.Array:
            x = np.asarray(x)  # works in every process, for devices it cannot address too
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(put, tree)

    def local_copy(self, tree: Any) -> Any:
        """One replica of a replicated pytree, on a device of this process (no host copy)."""
        if self.parallelism == "pmap":
            return jax.tree.map(lambda x: x[0], tree)
        if self.parallelism == "sharding":
            return jax.tree.map(lambda x: x.addressable_data(0), tree)
        return tree

    def unreplicate(self, tree: Any) -> Any:
        """One host copy (of the first local device's replica)."""
        return jax.device_get(self.local_copy(tree))

    def compile(
        self, step: Callable[..., Any], donate_state: bool, per_device: bool = False
    ) -> Callable[..., Any]:
        """Compiles a `step(state, batch, axis_name=)` function for this layout.

        One device: `jit`. pmap: `pmap` with `axis_name=AXIS_NAME`. Sharding: `jit` with the
        state replicated and the batch sharded, in and out; `step` sees the global batch with
        `axis_name=None`, or, with `per_device`, runs on each device's shard under shard_map
        with `axis_name=AXIS_NAME` (and must make its outputs equal on all devices).
        """
        donate = (0,) if donate_state else ()
        if self.parallelism is None:
            return jax.jit(step, donate_argnums=donate)
        if self.parallelism == "pmap":
            return jax.pmap(
                functools.partial(step, axis_name=AXIS_NAME),
                axis_name=AXIS_NAME,
                devices=self.local_devices if self.num_processes == 1 else None,
                donate_argnums=donate,
            )
        if per_device:
            # check_vma=False: the step is written as for pmap (its gradients are local and it
            # pmeans them itself). With the check, JAX would already sum the gradient of the
            # replicated parameters over the devices, and the pmean would keep that sum.
            step = jax.shard_map(
                functools.partial(step, axis_name=AXIS_NAME),
                mesh=self.mesh,
                in_specs=(P(), P(AXIS_NAME)),
                out_specs=P(),
                check_vma=False,
            )
        return jax.jit(
            step,
            in_shardings=(self._replicated, self._batch_sharding),
            out_shardings=self._replicated,
            donate_argnums=donate,
        )

    def any_process(self, flag: bool) -> bool:
        """True if `flag` is True in any process (all processes must call this together)."""
        if self.num_processes == 1:
            return flag
        return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def device_layout(config: ml_collections.ConfigDict) -> DeviceLayout:
    """The layout `config.num_devices` and `config.parallelism` ask for, checked."""
    available = jax.local_devices()
    requested = config.num_devices
    num_processes = jax.process_count()
    parallelism = config.get("parallelism", "sharding")
    if parallelism not in PARALLELISMS:
        raise ConfigError(f"parallelism must be one of {PARALLELISMS}, got {parallelism!r}")
    if requested == -1:
        count = len(available)
    elif requested >= 1:
        count = requested
    else:
        raise ConfigError(f"num_devices must be -1 (all local devices) or >= 1, got {requested}")
    if count > len(available):
        raise ConfigError(
            f"num_devices={requested} but this process has {len(available)} "
            f"{jax.default_backend()} device(s); on CPU, simulate more with "
            f"--config.num_cpu_devices={count}"
        )
    if num_processes > 1 and count != len(available):
        raise ConfigError(
            f"a multi-process job uses all local devices; set num_devices=-1 (got {requested})"
        )
    return DeviceLayout(
        parallelism=parallelism if count > 1 or num_processes > 1 else None,
        local_devices=tuple(available[:count]),
        num_processes=num_processes,
        process_index=jax.process_index(),
    )


def check_config(config: ml_collections.ConfigDict, layout: DeviceLayout) -> None:
    """Raises ConfigError for values that cannot work (before any data is loaded)."""

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    devices = layout.num_devices
    for field in ("batch_size", "eval_batch_size"):
        size = config[field]
        require(size >= 1, f"{field} must be >= 1, got {size}")
        require(
            size % devices == 0,
            f"{field}={size} is not divisible by the {devices} devices "
            f"({layout.num_processes} process(es) x {len(layout.local_devices)} local)",
        )
    require(config.num_epochs >= 1, f"num_epochs must be >= 1, got {config.num_epochs}")
    require(
        config.num_train_steps == -1 or config.num_train_steps >= 1,
        f"num_train_steps must be -1 (num_epochs) or >= 1, got {config.num_train_steps}",
    )
    require(config.log_every_steps >= 1, "log_every_steps must be >= 1")
    require(
        config.eval_every_steps >= 0,
        f"eval_every_steps must be >= 0 (0: at the end of each epoch), got "
        f"{config.eval_every_steps}",
    )
    require(config.checkpoint_max_to_keep >= 1, "checkpoint_max_to_keep must be >= 1")
    stop = config.stop_after_steps
    require(stop is None or stop >= 1, f"stop_after_steps must be >= 1, got {stop}")

    optimizer = config.optimizer
    require(
        optimizer.name in OPTIMIZERS,
        f"optimizer.name must be one of {OPTIMIZERS}, got {optimizer.name!r}",
    )
    require(
        optimizer.schedule in SCHEDULES,
        f"optimizer.schedule must be one of {SCHEDULES}, got {optimizer.schedule!r}",
    )
    require(optimizer.learning_rate > 0, "optimizer.learning_rate must be > 0")
    require(optimizer.warmup_epochs >= 0, "optimizer.warmup_epochs must be >= 0")
    require(
        optimizer.weight_decay == 0 or optimizer.name == "adamw",
        "optimizer.weight_decay needs optimizer.name='adamw'",
    )

    model = config.model
    require(model.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {model.dtype!r}")
    require(len(model.features) >= 1, "model.features must name at least one convolution")
    require(0 <= model.decay < 1, f"model.decay must be in [0, 1), got {model.decay}")
    require(model.epsilon > 0, f"model.epsilon must be > 0, got {model.epsilon}")
    require(model.batch_norm_l2 >= 0, "model.batch_norm_l2 must be >= 0")
    ghost = model.virtual_batch_size
    per_device = config.batch_size // devices
    require(
        ghost is None or (ghost >= 1 and per_device % ghost == 0),
        f"model.virtual_batch_size={ghost} must divide the per-device batch {per_device}",
    )


# ----------------------------------------------------------------------------- stopping


class StopRequests(contextlib.AbstractContextManager):
    """Turns SIGINT/SIGTERM into a request to stop after the current step.

    A second signal of either kind restores the default handlers and raises KeyboardInterrupt,
    so an impatient user can still abort at once; inside `finishing(task)` (a checkpoint being
    written) the abort waits until the task is done, so that no write is torn.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._finishing: str | None = None
        self._abort_after: str | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            tqdm.tqdm.write(f"{name}: stopping after this step (again to abort).")
        elif self._finishing is not None:
            self._abort_after = name
            tqdm.tqdm.write(f"{name}: aborting once {self._finishing} is written.")
        else:
            self._restore()
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def finishing(self, task: str) -> Any:
        """Defers an abort (a second signal) until `task`, e.g. 'the checkpoint of step 5', ends.

        Raises KeyboardInterrupt after the block if a second signal came during it.
        """
        self._finishing = task
        try:
            yield
        finally:
            self._finishing = None
        if self._abort_after is not None:
            self._restore()
            raise KeyboardInterrupt(
                f"Aborted by a second {self._abort_after} after it finished writing {task}; "
                "rerunning the same command resumes from there."
            )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequests:
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()


# ----------------------------------------------------------------------------- loop


def count_params(params: Any) -> int:
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(params))


def evaluate(
    eval_fn: Callable[..., Any],
    state: TrainState,
    dataset: data.Dataset,
    config: ml_collections.ConfigDict,
    layout: DeviceLayout,
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


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    metrics.write_json(checkpoints.config_to_json(config), os.path.join(workdir, "config.json"))


class _TrainLog:
    """Averages step metrics between log events and times training throughput.

    Throughput leaves out this invocation's first step (it includes compilation) and the pauses
    for evaluation and checkpointing.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._window: list[dict[str, jax.Array]] = []
        self._window_images = 0
        self._window_start = self._clock_start = None
        self._paused = 0.0
        self.timed_images = 0

    def add(self, step_metrics: dict[str, jax.Array]) -> None:
        # Wait for the step before this one: the host prepares the next batch while a step
        # runs, yet never runs ahead by more than one, so the progress bar tells the truth.
        if self._window:
            jax.block_until_ready(self._window[-1])
        self._window.append(step_metrics)
        if self._clock_start is None:
            jax.block_until_ready(step_metrics)
            self._clock_start = self._window_start = time.perf_counter()
        else:
            self._window_images += self.batch_size
            self.timed_images += self.batch_size

    def flush(self) -> dict[str, float]:
        """Mean loss and accuracy since the last flush, and the images/s of those steps."""
        values = jax.device_get(self._window)
        seconds = time.perf_counter() - self._window_start
        logged = {
            name: float(np.mean([np.mean(v[name]) for v in values]))
            for name in ("loss", "accuracy")
        }
        logged["images_per_s"] = self._window_images / max(seconds, 1e-9)
        self._window, self._window_images = [], 0
        self._window_start = time.perf_counter()
        return logged

    @contextlib.contextmanager
    def pause(self) -> Any:
        start = time.perf_counter()
        yield
        paused = time.perf_counter() - start
        self._paused += paused
        if self._window_start is not None:
            self._window_start += paused

    def train_seconds(self) -> float:
        """Seconds spent in training steps so far (after the first), pauses excluded."""
        if self._clock_start is None:
            return 0.0
        return time.perf_counter() - self._clock_start - self._paused

    def images_per_s(self) -> float | None:
        if not self.timed_images:
            return None
        return self.timed_images / (time.perf_counter() - self._clock_start - self._paused)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Trains per `config`, evaluating and checkpointing each epoch, resuming from `workdir`.

    The run is a pure function of the config: resuming from any checkpoint (including one
    written when SIGINT/SIGTERM or `stop_after_steps` stopped a run mid-epoch) ends with the
    same parameters as an uninterrupted run. With several devices and
    `model.sync_batch_stats=False` the per-device moving statistics are averaged at every
    evaluation and checkpoint, so a resumed run starts from the average and differs slightly.
    """
    started = time.perf_counter()
    layout = device_layout(config)
    check_config(config, layout)
    checkpointer = checkpoints.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint_max_to_keep
    )
    # Before the slow part: a workdir of another experiment fails at once.
    checkpointer.check_newest_config(config)
    dataset = data.load_dataset(config.dataset)
    data_fingerprint = data.data_fingerprint(dataset)
    if config.batch_size > len(dataset.train.labels):
        raise ConfigError(
            f"batch_size={config.batch_size} exceeds the {len(dataset.train.labels)} training "
            f"examples of {dataset.name!r}"
        )
    steps_per_epoch = data.steps_per_epoch(dataset, config.batch_size)
    total_steps = (
        config.num_train_steps
        if config.num_train_steps > 0
        else steps_per_epoch * config.num_epochs
    )

    model = models.create_model(config.model, dataset.num_classes, axis_name=layout.model_axis_name)
    schedule = create_learning_rate_schedule(config.optimizer, steps_per_epoch, total_steps)
    tx = create_optimizer(config.optimizer, schedule)
    image_shape = tuple(dataset.train.images.shape[1:])
    state = create_train_state(jax.random.key(config.seed), model, image_shape, tx)
    resumed_from, state = checkpointer.restore_latest(
        state, config, data_fingerprint, report=print if layout.is_primary else lambda _: None
    )
    start_step = int(state.step)
    writer = metrics.MetricsWriter(workdir, keep_until_step=start_step, enabled=layout.is_primary)
    if layout.is_primary:
        _save_config(config, workdir)
        if resumed_from is not None:
            print(f"Resuming from {checkpointer.directory}/{resumed_from} (step {start_step}).")

    per_device_statistics = layout.parallel and not config.model.sync_batch_stats
    if per_device_statistics and layout.parallelism == "sharding":
        p_train_step = layout.compile(
            train_step_averaging_statistics, donate_state=True, per_device=True
        )
    else:
        p_train_step = layout.compile(train_step, donate_state=True)
    p_eval_step = layout.compile(eval_step, donate_state=False)
    if per_device_statistics and layout.parallelism == "pmap":
        # Every device keeps its own moving statistics; they are averaged whenever one copy
        # is needed (evaluation, checkpoint), as in flax's examples/imagenet.
        p_average = layout.compile(mean_float_leaves, donate_state=False)

        def one_copy(replicated: TrainState) -> TrainState:
            return replicated.replace(batch_stats=p_average(replicated.batch_stats))
    else:

        def one_copy(replicated: TrainState) -> TrainState:
            return replicated

    state = layout.replicate(state)
    step = start_step
    stopped_by = None
    last_eval: dict[str, float] | None = None
    log = _TrainLog(config.batch_size)
    progress = tqdm.tqdm(
        total=total_steps,
        initial=min(start_step, total_steps),
        unit="step",
        dynamic_ncols=True,
        disable=not (config.progress_bar and layout.is_primary),
    )
    report = progress.write if layout.is_primary else lambda message: None
    if start_step < total_steps:
        epochs = range(start_step // steps_per_epoch, math.ceil(total_steps / steps_per_epoch))
    else:  # a finished run (or one whose length was shortened): nothing left to train
        epochs = range(0)

    def pause_to_save(state: TrainState, step: int, *, evaluate_first: bool) -> TrainState:
        """Checkpoints (after evaluating the test set if asked) outside the timed training."""
        nonlocal last_eval
        jax.block_until_ready(state)  # the steps' time is not the pause's
        train_seconds = log.train_seconds()
        with log.pause():
            state = one_copy(state)
            if evaluate_first:
                last_eval = evaluate(p_eval_step, state, dataset, config, layout)
                writer.write(
                    "eval",
                    step,
                    epoch=step / steps_per_epoch,
                    train_seconds=train_seconds,
                    **last_eval,
                )
                report(
                    f"step {step}/{total_steps} (epoch {step / steps_per_epoch:.2f}): "
                    f"test loss {last_eval['test_loss']:.4f}, "
                    f"test accuracy {last_eval['test_accuracy']:.4f}"
                )
            host_state = layout.unreplicate(state)
            non_finite = checkpoints.non_finite_leaves(host_state)
            if non_finite:
                raise DivergenceError(
                    f"training diverged by step {step}: NaN or infinity in "
                    f"{', '.join(non_finite[:3])}{' ...' if len(non_finite) > 3 else ''}. "
                    + diverged_advice
                )
            with stop_requests.finishing(f"the checkpoint of step {step}"):
                checkpointer.save(step, host_state, config, data_fingerprint)
        return state

    diverged_advice = (
        f"Nothing after it was saved; the finite checkpoints before it (if any) are in "
        f"{checkpointer.directory}. The run is deterministic, so rerunning the same command "
        "diverges again: lower optimizer.learning_rate (or add warmup) in a new --workdir."
    )

    with StopRequests() as stop_requests, progress:
        for epoch in epochs:
            batches = data.train_batches(
                dataset,
                config.batch_size,
                seed=config.seed,
                epoch=epoch,
                start_step=step - epoch * steps_per_epoch,
                augment=config.dataset.augment,
            )
            for batch in batches:
                state, step_metrics = p_train_step(state, layout.shard(batch))
                step += 1
                progress.update(1)
                log.add(layout.local_copy(step_metrics))
                evaluate_now = (
                    step % steps_per_epoch == 0
                    or step == total_steps
                    or (config.eval_every_steps > 0 and step % config.eval_every_steps == 0)
                )
                if step % config.log_every_steps == 0 or evaluate_now:
                    logged = log.flush()
                    writer.write(
                        "train",
                        step,
                        epoch=step / steps_per_epoch,
                        learning_rate=float(schedule(step - 1)),
                        **logged,
                    )
                    progress.set_postfix(
                        loss=f"{logged['loss']:.3f}",
                        acc=f"{logged['accuracy']:.3f}",
                        img_s=f"{logged['images_per_s']:.0f}",
                    )
                    # The mean of the window's losses, already on the host: a NaN or infinity
                    # at any step since the last log shows here, at no extra device sync.
                    if not math.isfinite(logged["loss"]):
                        raise DivergenceError(
                            f"training diverged: the mean train loss of the steps up to step "
                            f"{step} is {logged['loss']}. " + diverged_advice
                        )
                if step == config.stop_after_steps:
                    stopped_by = "stop_after_steps"
                if layout.any_process(stop_requests.signal_name is not None):
                    stopped_by = stop_requests.signal_name or "a signal to another process"
                if stopped_by or step == total_steps or step % steps_per_epoch == 0:
                    break
                if evaluate_now:  # mid-epoch (eval_every_steps)
                    state = pause_to_save(state, step, evaluate_first=True)
            state = pause_to_save(state, step, evaluate_first=evaluate_now)
            if stopped_by:
                break

    final_state = layout.unreplicate(state)
    checkpointer.close()
    if layout.is_primary:
        metrics.plot_curves(
            metrics.read_events(writer.path), os.path.join(workdir, metrics.CURVES_FILE)
        )
    if stopped_by and step < total_steps:  # (a stop request at the last step changes nothing)
        writer.close()
        if layout.is_primary:
            print(
                f"Stopped by {stopped_by} at step {step}; checkpoint saved in "
                f"{checkpointer.directory}. Rerun the same command to resume."
            )
        return TrainResult(state=final_state, summary=None, stopped_by=stopped_by)

    if last_eval is None:  # resumed a finished run: nothing trained, evaluate once more
        last_eval = evaluate(p_eval_step, state, dataset, config, layout)
    summary = {
        "dataset": dataset.name,
        "batch_norm": bool(config.model.use_batch_norm),
        "num_params": count_params(final_state.params),
        "steps": step,
        "epochs": step / steps_per_epoch,
        "test_accuracy": last_eval["test_accuracy"],
        "test_loss": last_eval["test_loss"],
        "test_examples": int(last_eval["test_examples"]),
        "wall_time_s": time.perf_counter() - started,
        "train_images_per_s": log.images_per_s(),
        "devices": layout.num_devices,
        "processes": layout.num_processes,
        "resumed_from_step": resumed_from,
        "data_fingerprint": data_fingerprint,
        "state_sha256": checkpoints.tree_sha256(
            {"params": final_state.params, "batch_stats": final_state.batch_stats}
        ),
    }
    summary_path = os.path.join(workdir, metrics.SUMMARY_FILE)
    previous = metrics.read_json(summary_path) if step == start_step else None
    if isinstance(previous, dict):
        # Relaunched after the end: nothing trained, so the timing of the run that trained stays.
        for key in ("wall_time_s", "train_images_per_s"):
            summary[key] = previous.get(key, summary[key])
    if layout.is_primary:
        metrics.write_summary(summary, summary_path)
    writer.close()
    return TrainResult(state=final_state, summary=summary, stopped_by=None)

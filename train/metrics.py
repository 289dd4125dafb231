"""Run records: metrics.jsonl, TensorBoard events, curves.png, summary.json, and what goes in them.

`TrainLog` averages the step metrics between log events and times the training throughput;
`tree_sha256` is the digest of a state that checkpoints verify and summary.json reports.

Every record is an event: a JSON object with `event` ('train' or 'eval'), the global `step`,
the fractional `epoch` and scalar values. The same scalars go to TensorBoard as
'<event>/<name>'. Only the primary process (index 0) of a multi-process job writes.

Every file is strict JSON (a NaN or infinite number is written as `null`) and survives being cut
short: metrics.jsonl is append-only, its reader skips a torn line, and it is rewritten (when a
resumed run drops the records it will redo) like summary.json and config.json: into a temporary
file that then replaces the old one, so a crash leaves either the old or the new file whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorboardX
from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"


def finite_or_none(value: Any) -> Any:
    """`value` itself, or None for a NaN or infinite float (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _strict_json(data: Any, **kwargs: Any) -> str:
    """JSON text of `data` with non-finite floats (at any depth) as null."""
    return json.dumps(_jsonable(data), allow_nan=False, **kwargs)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return finite_or_none(value)


def write_atomically(data: str | bytes, path: str) -> None:
    """Writes text or bytes to `path` through a temporary file in the same directory and a
    rename: a crash leaves either the old file or the new one, whole.

    The file gets the mode any new file gets (0666 less the umask: 0644 under umask 022), so
    that other users can read what is shipped; a `tempfile` file would stay 0600.
    """
    # Not abspath's textual 'link/..': beside `path` as the kernel resolves it.
    directory = os.path.dirname(path) or os.curdir
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(descriptor, "wb" if isinstance(data, bytes) else "w") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_json(data: Any, path: str) -> None:
    """Strict, indented JSON (non-finite floats as null), written atomically."""
    write_atomically(_strict_json(data, indent=2, sort_keys=True) + "\n", path)


def read_json(path: str) -> Any | None:
    """The JSON in `path`, or None if it is missing, empty or cut short."""
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def read_events(path: str) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl file, oldest first (none if it does not exist).

    Lines that are not a JSON object (a record cut short by a crash or a full disk) are skipped.
    """
    if not os.path.exists(path):
        return []
    events = []
    with open(path) as file:
        for line in file:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "event" in event and "step" in event:
                events.append(event)
    return events


class MetricsWriter:
    """Appends events to `<workdir>/metrics.jsonl` and to TensorBoard.

    `keep_until_step`: events after this step are dropped from an existing metrics.jsonl, so that
    a run resumed from a checkpoint at that step (or restarted from scratch, step 0) does not
    keep the records of steps it is about to redo.
    """

    def __init__(self, workdir: str, *, keep_until_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        kept = [event for event in read_events(self.path) if event["step"] <= keep_until_step]
        # Also drops a torn last line, which the next append would otherwise extend.
        write_atomically("".join(_strict_json(event) + "\n" for event in kept), self.path)
        self._tensorboard = tensorboardX.SummaryWriter(logdir=workdir)

    def write(self, event: str, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        record = {"event": event, "step": int(step), "time": time.time()}
        record.update({name: float(value) for name, value in scalars.items()})
        with open(self.path, "a") as file:
            file.write(_strict_json(record) + "\n")
        for name, value in scalars.items():
            # A non-finite value (a diverged run) is null in metrics.jsonl and absent here.
            if name != "epoch" and math.isfinite(value):
                self._tensorboard.add_scalar(f"{event}/{name}", float(value), global_step=step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()


def plot_curves(events: Sequence[Mapping[str, Any]], path: str) -> None:
    """Saves loss and accuracy against step, train and test, as a PNG."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    series = [
        ("train", "loss", loss_axes, "train loss"),
        ("eval", "test_loss", loss_axes, "test loss"),
        ("train", "accuracy", accuracy_axes, "train accuracy"),
        ("eval", "test_accuracy", accuracy_axes, "test accuracy"),
    ]
    for event, name, axes, label in series:
        points = [(e["step"], e[name]) for e in events if e["event"] == event and name in e]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o" if event == "eval" else None, label=label)
    loss_axes.set(xlabel="step", ylabel="cross-entropy", title="loss")
    accuracy_axes.set(xlabel="step", ylabel="accuracy", title="accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        if axes.lines:  # nothing logged yet (a run stopped early): no legend to draw
            axes.legend()
    figure.savefig(path, dpi=100)


def tree_sha256(tree: Any) -> str:
    """SHA-256 of a pytree's leaves (names, dtypes, shapes and bytes): equal iff bitwise equal."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def count_params(params: Any) -> int:
    """The number of parameters (array elements) in a pytree."""
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(params))


class TrainLog:
    """Averages step metrics between log events and times training throughput.

    Throughput leaves out this invocation's first dispatch (it includes compilation), dispatches
    added with `timed=False`, and the pauses for evaluation and checkpointing.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._window: list[dict[str, jax.Array]] = []
        self._window_images = 0
        self._window_start = self._clock_start = None
        self._paused = 0.0
        self.timed_images = 0

    def add(self, step_metrics: dict[str, jax.Array], steps: int = 1, timed: bool = True) -> None:
        """Adds one dispatch's metrics: scalars for one step, stacked (steps,) for several.

        `timed=False`: its steps are left out of the throughput (the caller paused the clock
        around it, e.g. while it compiled).
        """
        # Wait for the dispatch before this one: the host prepares the next batches while a
        # dispatch runs, yet never runs ahead by more than one, so the progress bar tells the
        # truth.
        if self._window:
            jax.block_until_ready(self._window[-1])
        self._window.append(step_metrics)
        if self._clock_start is None:
            jax.block_until_ready(step_metrics)
            self._clock_start = self._window_start = time.perf_counter()
        elif timed:
            self._window_images += self.batch_size * steps
            self.timed_images += self.batch_size * steps

    def flush(self) -> dict[str, float]:
        """Mean loss and accuracy since the last flush, and the images/s of those steps."""
        values = jax.device_get(self._window)
        seconds = time.perf_counter() - self._window_start
        # The mean over steps: a dispatch of several steps holds one value per step.
        logged = {
            name: float(np.mean(np.concatenate([np.ravel(v[name]) for v in values])))
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


def write_summary(summary: Mapping[str, Any], path: str) -> None:
    write_json(summary, path)


def format_summary(summary: Mapping[str, Any]) -> str:
    """One line per field, for the terminal."""
    width = max(len(name) for name in summary)
    lines = []
    for name, value in summary.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"  {name:<{width}}  {text}")
    return "\n".join(lines)

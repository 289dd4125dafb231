"""Run records in the workdir: metrics.jsonl, TensorBoard events, curves.png and summary.json.

Every record is an event: a JSON object with `event` ('train' or 'eval'), the global `step`,
the fractional `epoch` and scalar values. The same scalars go to TensorBoard as
'<event>/<name>'. Only the primary process (index 0) of a multi-process job writes.

Every file is strict JSON (a NaN or infinite number is written as `null`) and survives being cut
short: metrics.jsonl is append-only, its reader skips a torn line, and it is rewritten (when a
resumed run drops the records it will redo) like summary.json and config.json: into a temporary
file that then replaces the old one, so a crash leaves either the old or the new file whole.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

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


def write_text_atomically(text: str, path: str) -> None:
    """Writes `text` to `path` through a temporary file in the same directory and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile(
        "w", dir=directory, prefix=f".{os.path.basename(path)}.", delete=False
    ) as file:
        temporary = file.name
        try:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        except BaseException:
            file.close()
            os.unlink(temporary)
            raise
    try:
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_json(data: Any, path: str) -> None:
    """Strict, indented JSON (non-finite floats as null), written atomically."""
    write_text_atomically(_strict_json(data, indent=2, sort_keys=True) + "\n", path)


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
        write_text_atomically("".join(_strict_json(event) + "\n" for event in kept), self.path)
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

"""Run records in the workdir: metrics.jsonl, TensorBoard events, curves.png and summary.json.

Every record is an event: a JSON object with `event` ('train' or 'eval'), the global `step`,
the fractional `epoch` and scalar values. The same scalars go to TensorBoard as
'<event>/<name>'. Only the primary process (index 0) of a multi-process job writes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import tensorboardX
from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"


def read_events(path: str) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl file, oldest first (none if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


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
        with open(self.path, "w") as file:
            file.writelines(json.dumps(event) + "\n" for event in kept)
        self._tensorboard = tensorboardX.SummaryWriter(logdir=workdir)

    def write(self, event: str, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        record = {"event": event, "step": int(step), "time": time.time()}
        record.update({name: float(value) for name, value in scalars.items()})
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            if name != "epoch":
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
    with open(path, "w") as file:
        json.dump(summary, file, indent=2, sort_keys=True)
        file.write("\n")


def format_summary(summary: Mapping[str, Any]) -> str:
    """One line per field, for the terminal."""
    width = max(len(name) for name in summary)
    lines = []
    for name, value in summary.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"  {name:<{width}}  {text}")
    return "\n".join(lines)

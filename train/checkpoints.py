"""Orbax checkpoints of the train state, with the run's config saved beside it.

Each checkpoint step holds two items: `state` (the train state as a plain state dict of host
arrays: step, params, batch_stats, opt_state) and `config` (the run's config as JSON). Resuming
compares the saved config with the current one and the saved arrays with the shapes the current
model expects, so a checkpoint of another experiment is never silently reused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, TypeVar

import flax.serialization
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

State = TypeVar("State")

# Config fields that only steer how a run executes or reports; a resumed run may change them.
# Everything else (model, optimizer, data, batch size, seed) must match the checkpoint.
RUN_CONTROL_FIELDS = frozenset(
    {
        "eval_batch_size",
        "log_every_steps",
        "eval_every_steps",
        "progress_bar",
        "checkpoint_max_to_keep",
        "stop_after_steps",
        # The saved state is device independent (one unreplicated copy); with synchronized
        # batch norm the device count does not change the math.
        "num_devices",
        "num_cpu_devices",
        "parallelism",
        "dataset.source",
        "dataset.data_dir",
        "dataset.tfds_data_dir",
        "dataset.tfds_download",
    }
)


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed: unreadable, or from a different experiment."""


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON-compatible nested dicts (tuples become lists)."""
    return json.loads(config.to_json())


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_mismatches(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two JSON configs that forbid resuming.

    The length of training (`num_epochs`, `num_train_steps`) may change unless the learning
    rate schedule depends on it (cosine).
    """
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    allowed = set(RUN_CONTROL_FIELDS)
    if current_flat.get("optimizer.schedule") != "cosine":
        allowed.update({"num_epochs", "num_train_steps"})
    missing = object()
    mismatches = []
    for key in sorted(saved_flat.keys() | current_flat.keys()):
        if key in allowed:
            continue
        old, new = saved_flat.get(key, missing), current_flat.get(key, missing)
        if old != new:
            old_text = "<absent>" if old is missing else repr(old)
            new_text = "<absent>" if new is missing else repr(new)
            mismatches.append(f"{key}: checkpoint {old_text}, now {new_text}")
    return mismatches


def _array_signatures(state_dict: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Maps 'params/conv1/kernel'-style paths to (shape, dtype)."""
    leaves = jax.tree_util.tree_flatten_with_path(state_dict)[0]
    return {
        "/".join(str(getattr(key, "key", key)) for key in path): (
            tuple(np.shape(leaf)),
            str(np.asarray(leaf).dtype),
        )
        for path, leaf in leaves
    }


def _signature_mismatches(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    saved_sig, expected_sig = _array_signatures(saved), _array_signatures(expected)
    mismatches = []
    for key in sorted(saved_sig.keys() | expected_sig.keys()):
        if key not in saved_sig:
            mismatches.append(f"{key}: missing from the checkpoint")
        elif key not in expected_sig:
            mismatches.append(f"{key}: in the checkpoint but not in the model")
        elif saved_sig[key] != expected_sig[key]:
            (old_shape, old_dtype), (new_shape, new_dtype) = saved_sig[key], expected_sig[key]
            mismatches.append(
                f"{key}: checkpoint {old_dtype}{list(old_shape)}, "
                f"model {new_dtype}{list(new_shape)}"
            )
    return mismatches


class Checkpointer:
    """Saves and restores `(train state, config)` pairs under `directory`, one per step."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                # Saves are small and rare; synchronous saving makes "saved" mean on disk.
                enable_async_checkpointing=False,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, config: ml_collections.ConfigDict) -> None:
        """Saves `state` (a pytree of host or single-device arrays) and `config` at `step`."""
        if step in self._manager.all_steps():
            return
        state_dict = jax.tree.map(np.asarray, flax.serialization.to_state_dict(state))
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state_dict),
                config=ocp.args.JsonSave(config_to_json(config)),
            ),
        )

    def check_config(self, step: int, config: ml_collections.ConfigDict) -> None:
        """Raises CheckpointError unless the config saved at `step` is compatible with `config`.

        Cheap (reads one small JSON file): call it before loading data or building the model.
        """
        location = os.path.join(self.directory, str(step))
        try:
            saved_config = self._manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            ).config
        except Exception as error:  # orbax raises many types; all mean "unreadable".
            raise CheckpointError(
                f"cannot read the config saved with checkpoint {location}: {error}"
            ) from error
        if not isinstance(saved_config, Mapping):
            raise CheckpointError(f"checkpoint {location} has no saved config")
        mismatches = config_mismatches(saved_config, config_to_json(config))
        if mismatches:
            raise CheckpointError(
                f"checkpoint {location} was written with a different config; use another "
                "--workdir or the checkpoint's config. Differences:\n  " + "\n  ".join(mismatches)
            )

    def restore(self, step: int, target: State) -> State:
        """Restores the state saved at `step` into the structure of `target`.

        Raises CheckpointError when the checkpoint cannot be read or holds arrays of other names,
        shapes or dtypes than `target`. Check the config first (`check_config`).
        """
        location = os.path.join(self.directory, str(step))
        expected = flax.serialization.to_state_dict(target)
        try:
            # No target: orbax would return the saved shapes anyway, whatever the target says.
            saved = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
            ).state
        except Exception as error:  # orbax raises many types; all mean "unreadable".
            raise CheckpointError(f"cannot read checkpoint {location}: {error}") from error
        mismatches = _signature_mismatches(saved, expected)
        if mismatches:
            raise CheckpointError(
                f"checkpoint {location} does not fit the model:\n  " + "\n  ".join(mismatches)
            )
        return flax.serialization.from_state_dict(target, saved)

    def close(self) -> None:
        self._manager.close()

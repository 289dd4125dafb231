"""Orbax checkpoints of the train state, verified on restore, with the run's config beside it.

Each checkpoint step holds three items: `state` (the train state as a plain state dict of host
arrays: step, params, batch_stats, opt_state), `config` (the run's config as JSON) and
`integrity` (JSON: the SHA-256 of the state's arrays and the fingerprint of the training data).
Orbax stores arrays compressed without a checksum, so flipped bits on disk would restore as
silently wrong weights: restoring recomputes the digest and refuses a mismatch. Resuming also
compares the saved config with the current one and the saved arrays with the shapes the current
model expects, so a checkpoint of another experiment is never silently reused.

A save is read back and verified before older checkpoints are deleted (`max_to_keep`), and a
non-finite state is never saved, so the newest intact checkpoints always survive. Resuming falls
back past unreadable or corrupt checkpoints to the newest intact one and moves the bad ones to
`<directory>.corrupt/` (they are never deleted).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import flax.serialization
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from train import metrics

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
        # The same convolutions to float32 round-off (the summation order differs).
        "cpu_convolutions",
        # The same steps, bitwise, however many run per call.
        "steps_per_dispatch",
        "dataset.source",
        "dataset.data_dir",
        "dataset.tfds_data_dir",
        "dataset.tfds_download",
    }
)


# Config fields renamed since runs were first saved: old dotted name -> today's. `upgrade_config`
# reads a saved config (config.json, a checkpoint's) in today's names, so older runs still resume
# and export.
RENAMED_FIELDS = {
    # jbn.BatchNorm's arguments moved into model.batch_norm under jbn's names (issue 22).
    **{
        f"model.{name}": f"model.batch_norm.{name}"
        for name in (
            "decay",
            "epsilon",
            "center",
            "scale",
            "zero_debias_moving_mean",
            "renorm",
            "renorm_decay",
            "virtual_batch_size",
        )
    },
    "model.renorm_rmax": "model.batch_norm.renorm_clipping.rmax",
    "model.renorm_dmax": "model.batch_norm.renorm_clipping.dmax",
}


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed: unreadable, corrupt, or from a different experiment."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint that cannot be read or fails verification; an older one may still be intact."""


def non_finite_leaves(tree: Any) -> list[str]:
    """'params/conv1/kernel'-style paths of the floating-point leaves holding NaN or infinity."""
    return [
        _path_name(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jax.dtypes.issubdtype(np.asarray(leaf).dtype, np.inexact)
        and not np.all(np.isfinite(np.asarray(leaf)))
    ]


def _first_line(error: Exception) -> str:
    """The error's type and first line: orbax's messages go on for a screen."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__} {lines[0]}" if lines else type(error).__name__


@contextlib.contextmanager
def _orbax_errors_unlogged() -> Iterator[None]:
    """Within the block: no absl log records below FATAL, and no 'Event loop is closed' echoes."""
    _quiet_abandoned_io()
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


def _quiet_abandoned_io() -> None:
    """Silences the echoes of a failed orbax read or write (installed once, before the first read).

    When one array of a checkpoint cannot be read or written, orbax gives up and closes its event
    loop, but tensorstore still completes the other reads and calls back into the closed loop: each
    callback would print a 'RuntimeError: Event loop is closed' traceback (through
    sys.unraisablehook), and asyncio logs the other failed reads as 'Task exception was never
    retrieved', although the failure has been reported. Other unraisable exceptions still reach
    the previous hook.
    """
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    previous = sys.unraisablehook
    if getattr(previous, "_jbn_quiet_abandoned_io", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jbn_quiet_abandoned_io = True
    sys.unraisablehook = hook


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _path_name(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(key, "key", key)) for key in path)


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


def upgrade_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved JSON config with the fields of RENAMED_FIELDS under today's names.

    Before `model.batch_norm.renorm_clipping`, the app clipped r below at 1 / `renorm_rmax`
    (the paper's rmin) and used the bounds only with `renorm=True`: the upgrade writes the
    bounds as they acted (none without renorm), so the run trains on exactly as before.
    """
    flat = _flatten(saved)
    if not RENAMED_FIELDS.keys() & flat.keys():
        return dict(saved)
    renorm = flat.get("model.renorm", False)
    for old, new in RENAMED_FIELDS.items():
        if old in flat:
            flat[new] = flat.pop(old)
    clipping = "model.batch_norm.renorm_clipping."
    if not renorm:
        flat[f"{clipping}rmax"] = flat[f"{clipping}dmax"] = None
    rmax = flat.get(f"{clipping}rmax")
    # rmax = 0 never trained (the config check refused its rmin = inf).
    flat[f"{clipping}rmin"] = None if rmax is None else 1.0 / rmax if rmax else math.inf
    flat.setdefault(f"{clipping}rmax", None)
    flat.setdefault(f"{clipping}dmax", None)
    return _unflatten(flat)


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dicts of `_flatten`'s dotted names."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *groups, key = name.split(".")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[key] = value
    return tree


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
        _path_name(path): (
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
    """Saves, verifies and restores `(train state, config)` pairs under `directory`, one per step.

    `max_to_keep`: the number of newest checkpoints kept; older ones are deleted only after a new
    save has been read back intact.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        # realpath, not abspath: 'link/..' is where the kernel puts it, as for the run's files.
        self.directory = os.path.realpath(directory)
        self.max_to_keep = max_to_keep
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                # Deleting old checkpoints is ours (`_delete_old`): only after verification.
                max_to_keep=None,
                create=True,
                # Saves are small and rare; synchronous saving makes "saved" mean on disk.
                enable_async_checkpointing=False,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def location(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(
        self,
        step: int,
        state: Any,
        config: ml_collections.ConfigDict,
        data_fingerprint: str | None = None,
    ) -> None:
        """Saves `state` (a pytree of host or single-device arrays) and `config` at `step`.

        The checkpoint is read back and checked against the digest of `state` before older
        checkpoints beyond `max_to_keep` are deleted.

        Raises:
          ValueError: `state` holds NaN or infinity (a diverged run must not replace finite
            checkpoints); nothing is written.
          CheckpointError: the checkpoint cannot be written (e.g. a full disk).
          CorruptCheckpointError: the checkpoint does not read back as written (a failing disk);
            the older checkpoints are kept.
        """
        if step in self._manager.all_steps():
            return
        state_dict = jax.tree.map(np.asarray, flax.serialization.to_state_dict(state))
        non_finite = non_finite_leaves(state_dict)
        if non_finite:
            raise ValueError(
                f"refusing to save a non-finite state at step {step}; NaN or infinity in "
                + ", ".join(non_finite)
            )
        integrity = {
            "state_sha256": metrics.tree_sha256(state_dict),
            "data_fingerprint": data_fingerprint,
        }
        try:
            # A failed write reaches us as the exception below; orbax's worker threads would
            # also log it, each with a traceback, and tensorstore echo it into a closed loop.
            with _orbax_errors_unlogged():
                self._manager.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state_dict),
                        config=ocp.args.JsonSave(config_to_json(config)),
                        integrity=ocp.args.JsonSave(integrity),
                    ),
                )
        except Exception as error:  # e.g. a full disk; orbax raises many types
            raise CheckpointError(
                f"cannot write checkpoint {self.location(step)}: {_first_line(error)}. The "
                "older checkpoints were kept."
            ) from error
        try:
            self._read_verified(step)
        except CorruptCheckpointError as error:
            raise CorruptCheckpointError(
                f"{error}. It was just written: the disk may be failing. The older checkpoints "
                "were kept."
            ) from error
        self._delete_old()

    def _delete_old(self) -> None:
        for step in self.all_steps()[: -self.max_to_keep]:
            self._manager.delete(step)

    def _read(self, step: int, **items: Any) -> Any:
        """Reads the named items of a checkpoint; anything orbax raises means it is unreadable."""
        # Installed before the read: tensorstore's threads can echo an abandoned read before
        # orbax's error reaches this frame.
        _quiet_abandoned_io()
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # orbax raises many types; all mean "unreadable".
            raise CorruptCheckpointError(
                f"cannot read checkpoint {self.location(step)}: {_first_line(error)}"
            ) from error

    def _read_verified(self, step: int) -> tuple[dict[str, Any], Mapping[str, Any]]:
        """The saved state dict and integrity record of `step`, after checking the digest."""
        integrity = self._read(step, integrity=ocp.args.JsonRestore()).integrity
        if not isinstance(integrity, Mapping) or "state_sha256" not in integrity:
            raise CorruptCheckpointError(
                f"checkpoint {self.location(step)} has no digest to verify it with"
            )
        # No target: orbax would return the saved shapes anyway, whatever the target says.
        state = self._read(step, state=ocp.args.StandardRestore()).state
        if metrics.tree_sha256(state) != integrity["state_sha256"]:
            raise CorruptCheckpointError(
                f"checkpoint {self.location(step)} is corrupt: its arrays do not match the "
                "SHA-256 digest saved with them (bytes changed on disk)"
            )
        return state, integrity

    def check_config(self, step: int, config: ml_collections.ConfigDict) -> None:
        """Raises CheckpointError unless the config saved at `step` is compatible with `config`.

        Cheap (reads one small JSON file): call it before loading data or building the model.
        An unreadable config raises CorruptCheckpointError.
        """
        location = self.location(step)
        saved_config = self._read(step, config=ocp.args.JsonRestore()).config
        if not isinstance(saved_config, Mapping):
            raise CorruptCheckpointError(f"checkpoint {location} has no saved config")
        mismatches = config_mismatches(upgrade_config(saved_config), config_to_json(config))
        if mismatches:
            raise CheckpointError(
                f"checkpoint {location} was written with a different config; use another "
                "--workdir or the checkpoint's config. Differences:\n  " + "\n  ".join(mismatches)
            )

    def check_newest_config(self, config: ml_collections.ConfigDict) -> None:
        """`check_config` for the newest checkpoint whose config is readable (if any).

        Unreadable checkpoints are skipped here; `restore_latest` reports them.
        """
        for step in reversed(self.all_steps()):
            try:
                self.check_config(step, config)
            except CorruptCheckpointError:
                continue
            return

    def restore(self, step: int, target: State) -> State:
        """Restores the state saved at `step` into the structure of `target`.

        Raises:
          CorruptCheckpointError: the checkpoint cannot be read, or its arrays do not match the
            digest saved with them.
          CheckpointError: it holds arrays of other names, shapes or dtypes than `target`.
            Check the config first (`check_config`).
        """
        saved, _ = self._read_verified(step)
        self._check_fits(step, saved, target)
        return flax.serialization.from_state_dict(target, saved)

    def _check_fits(self, step: int, saved: Mapping[str, Any], target: Any) -> None:
        mismatches = _signature_mismatches(saved, flax.serialization.to_state_dict(target))
        if mismatches:
            raise CheckpointError(
                f"checkpoint {self.location(step)} does not fit the model:\n  "
                + "\n  ".join(mismatches)
            )

    def restore_latest(
        self,
        target: State,
        config: ml_collections.ConfigDict,
        data_fingerprint: str | None = None,
        report: Callable[[str], None] = print,
    ) -> tuple[int | None, State]:
        """The newest intact checkpoint compatible with `config`, as (step, state).

        Returns (None, target) when there is no checkpoint. Checkpoints that cannot be read or
        fail verification are reported by path and skipped; once an intact one is found they are
        moved to `<directory>.corrupt/`, so that the steps they held can be saved again.

        Raises:
          CheckpointError: no checkpoint is intact (nothing is moved; the message says how to
            recover), or the newest intact one is of another config or model, or was trained on
            other data than `data_fingerprint` (when both are known).
        """
        corrupt: list[int] = []
        problems: list[str] = []
        for step in reversed(self.all_steps()):
            try:
                self.check_config(step, config)
                saved, integrity = self._read_verified(step)
            except CorruptCheckpointError as error:
                report(f"warning: {error}; trying an older checkpoint.")
                corrupt.append(step)
                problems.append(str(error))
                continue
            self._check_fits(step, saved, target)
            saved_fingerprint = integrity.get("data_fingerprint")
            if data_fingerprint and saved_fingerprint and saved_fingerprint != data_fingerprint:
                raise CheckpointError(
                    f"checkpoint {self.location(step)} was trained on different data "
                    f"({saved_fingerprint}) than the data loaded now ({data_fingerprint}); "
                    "point dataset.data_dir (or dataset.source) at the original data, or use "
                    "another --workdir"
                )
            if corrupt:
                moved_to = self._set_aside(corrupt)
                report(
                    f"Moved the unusable checkpoint(s) of step(s) {', '.join(map(str, corrupt))} "
                    f"to {moved_to}; using the newest intact one, {self.location(step)}."
                )
            return step, flax.serialization.from_state_dict(target, saved)
        if corrupt:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}:\n  "
                + "\n  ".join(problems)
                + f"\nTo start the run over, move them away (mv {self.directory} "
                f"{self.directory}.bad) and rerun the same command; to resume from one anyway, "
                "restore it from a backup."
            )
        return None, target

    def _set_aside(self, steps: list[int]) -> str:
        """Moves the given step directories to `<directory>.corrupt/` (process 0 only)."""
        destination = f"{self.directory}.corrupt"
        # Every process has finished reading before process 0 moves, and sees the moves after.
        _sync_processes("jbn: before setting corrupt checkpoints aside")
        if jax.process_index() == 0:
            os.makedirs(destination, exist_ok=True)
            for step in steps:
                target = os.path.join(destination, str(step))
                suffix = 1
                while os.path.exists(target):  # set aside before: keep both
                    suffix += 1
                    target = os.path.join(destination, f"{step}.{suffix}")
                os.replace(self.location(step), target)
        _sync_processes("jbn: corrupt checkpoints set aside")
        self._manager.reload()
        return destination

    def close(self) -> None:
        self._manager.close()

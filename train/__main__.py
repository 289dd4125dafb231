"""Command line: train the document's network per a config file.

    python -m train --config configs/default.py --workdir runs/default \\
        [--config.optimizer.learning_rate=3e-3 ...]

Rerunning the same command resumes from the latest checkpoint in --workdir. A multi-process job
runs the same command in every process, adding --coordinator_address, --num_processes and
--process_id (or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID).

Problems with the config, the data, the workdir, a checkpoint or the process group print one
message and exit with status 2; a diverged run (NaN or infinity) exits with status 3 without
saving; SIGINT/SIGTERM save a checkpoint and exit with status 128 + signal number (a second signal
aborts, after finishing a checkpoint being written, with 128 + its number). A second run into a
workdir that a run holds exits with status 2 (see train/workdirs.py).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from train import config_files, workdirs

if TYPE_CHECKING:
    from train.distributed import ProcessGroup

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process jobs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process in the job.")

USAGE_ERROR = 2
DIVERGED = 3


class WorkdirError(Exception):
    """The workdir cannot hold the run's files; the message names the path and the problem."""


def fail(message: str, status: int = USAGE_ERROR) -> None:
    """Prints one error message (no stack trace) and exits with `status`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def check_workdir(path: str) -> None:
    """Creates `path` if needed and checks that files can be written in it.

    Raises WorkdirError for a path that is a file, cannot be created, or lies on a read-only
    or full disk, before any time is spent loading data or compiling.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir {path} is not a directory (it is a file)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise WorkdirError(f"cannot create --workdir {path}: {error.strerror}") from None
    try:
        # Some bytes, flushed to disk: a full disk refuses them, not just the empty file.
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise WorkdirError(f"cannot write to --workdir {path}: {error.strerror}") from None


def _config_argument(argv: Sequence[str]) -> str | None:
    """The value of --config in `argv` (either spelling), or None."""
    value = None
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith("--config="):
            value = arg.removeprefix("--config=")
    return value


def _unknown_override(argv: Sequence[str]) -> str | None:
    """For the first `--config.<field>=` naming no field of the config file: a message.

    The config is loaded again here: after a failed override, absl holds none.
    """
    config_path = _config_argument(argv)
    overrides = [
        arg.removeprefix("--config.").split("=", 1)[0]
        for arg in argv
        if arg.startswith("--config.")
    ]
    if config_path is None:
        return None
    try:
        fields = list(config_files.field_names(config_files.load(config_path)))
    except config_files.ConfigFileError:  # reported before absl parses the flags
        return None
    for field in overrides:
        if field not in fields:
            closest = difflib.get_close_matches(field, fields, n=3, cutoff=0.0)
            return (
                f"{field!r} is not a config field of {config_path}; the closest are: "
                + ", ".join(closest)
            )
    return None


def help_text(argv: Sequence[str]) -> str:
    """--help: what the command does, its flags, and the config's fields with their values.

    The fields are those of the --config file in `argv`, else of configs/default.py.
    Raises config_files.ConfigFileError for a config file that does not load.
    """
    config_path = _config_argument(argv) or os.path.relpath(config_files.DEFAULT_CONFIG)
    lines = [__doc__.strip(), "", "Flags:"]
    for holder in (_CONFIG, _WORKDIR, _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID):
        lines.append(f"  --{holder.name}: {flags.FLAGS[holder.name].help}")
    lines += ["  -h, --help: show this help and exit (--helpfull: with absl's flags too).", ""]
    if not os.path.isfile(config_path.partition(":")[0]):
        lines.append(f"(No config fields to show: {config_path} does not exist.)")
        return "\n".join(lines)
    config = config_files.load(config_path)
    lines += [
        f"Config fields of {config_path}, with the values it gives them. Override any with",
        "--config.FIELD=VALUE, e.g. --config.optimizer.learning_rate=3e-3 (a rerun into the same",
        "--workdir may change only the fields that do not change the run's math):",
        config_files.describe_fields(config, config_path.partition(":")[0]),
    ]
    return "\n".join(lines)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing, with config errors (unknown override keys, bad values) as messages.

    Also answers --help/-h, and resolves --workdir once (`workdirs.resolve`): every file of the
    run goes under that one path.
    """
    try:
        if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv[1:]):
            print(help_text(argv))
            if "--helpfull" in argv[1:]:  # absl's own flags too
                print(f"\nAll flags:\n{flags.FLAGS.get_help()}")
            sys.exit(0)
        # Loaded once here to report a broken file in one line; absl loads it again after.
        config_argument = _config_argument(argv)
        if config_argument is not None:
            config_files.load(config_argument)
    except config_files.ConfigFileError as error:
        fail(str(error))
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:
        fail(str(error))
    except (KeyError, AttributeError, TypeError, ValueError) as error:
        # ml_collections raises these for unknown fields and values of the wrong type.
        fail(_unknown_override(argv) or f"bad --config override: {error}")
    if len(remaining) > 1:
        fail(f"unexpected arguments: {' '.join(remaining[1:])}")
    if _CONFIG.value is None:
        fail("--config is required (e.g. --config configs/default.py)")
    if not isinstance(_CONFIG.value, ml_collections.ConfigDict):
        try:  # a config that failed to load raises its load error on first access
            _CONFIG.value.keys()
        except Exception as error:
            fail(str(error))
        fail("--config must be a file whose get_config() returns a ConfigDict")
    if not _WORKDIR.value:
        fail("--workdir is required")
    flags.FLAGS.workdir = workdirs.resolve(_WORKDIR.value)
    try:
        check_workdir(_WORKDIR.value)
    except WorkdirError as error:
        fail(str(error))
    return remaining


@contextlib.contextmanager
def lock_workdir(workdir: str, group: ProcessGroup) -> Iterator[None]:
    """Holds `workdir`'s exclusive lock (`workdirs.lock`) for the block, in process 0 of the job.

    Process 0 holds it for the whole job: the processes of one job share the workdir (only
    process 0 writes the records; orbax coordinates the checkpoint writes of all), and a second
    job meets process 0's lock. When process 0 cannot take it, every process raises WorkdirBusy
    (they agree through `process_allgather`), so none waits in a collective for a process that
    has left. `group`: the job, already initialized (`distributed.initialize`).
    """
    with contextlib.ExitStack() as held:
        busy = None
        if group.process_id == 0:
            try:
                held.enter_context(workdirs.lock(workdir))
            except workdirs.WorkdirBusy as error:
                busy = error
        if group.num_processes > 1:
            # Imported here, as in `main`: usage errors should not wait for JAX to import.
            import numpy as np
            from jax.experimental import multihost_utils

            flags_of_all = multihost_utils.process_allgather(np.asarray(busy is not None))
            if busy is None and np.any(flags_of_all):
                busy = workdirs.WorkdirBusy(
                    f"--workdir {workdir} is in use by another training run (process 0 of this "
                    "job could not lock it)"
                )
        if busy is not None:
            raise busy
        yield


def main(argv: Sequence[str]) -> None:
    del argv
    config = _CONFIG.value
    # Orbax logs every checkpoint step at INFO; the progress bar and summary say what matters.
    logging.set_verbosity(logging.WARNING)
    # Imported here: JAX's devices must be configured (distributed.initialize) before any JAX
    # computation, and absl's usage errors should not wait for JAX to import.
    from train import checkpoints, config_checks, data, distributed, metrics
    from train import train as train_lib

    expected_errors = (
        config_checks.ConfigError,
        data.DataError,
        checkpoints.CheckpointError,
        distributed.DistributedError,
        workdirs.WorkdirBusy,
    )
    try:
        group = distributed.process_group_from(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
        )
        distributed.initialize(group, num_cpu_devices=config.num_cpu_devices)
        with lock_workdir(_WORKDIR.value, group):
            result = train_lib.train_and_evaluate(config, _WORKDIR.value)
    except expected_errors as error:
        fail(str(error))
    except train_lib.DivergenceError as error:
        fail(str(error), status=DIVERGED)
    except OSError as error:  # e.g. the disk filled up during the run
        where = f"{error.filename}: " if error.filename else ""
        fail(f"{where}{error.strerror or error}")
    except KeyboardInterrupt as error:  # a second signal while stopping, or a SIGINT before
        print(
            str(error) or "Aborted without saving; rerunning resumes from the latest checkpoint.",
            file=sys.stderr,
        )
        sys.exit(128 + getattr(error, "signum", signal.SIGINT))

    if result.summary is not None and group.process_id == 0:
        print("Summary (also in summary.json):")
        print(metrics.format_summary(result.summary))
    if result.summary is not None and group.num_processes > 1:
        # Every process ends with the same replicated state; this line lets one check that.
        print(
            f"process {group.process_id}/{group.num_processes}: step {result.summary['steps']}, "
            f"state_sha256 {result.summary['state_sha256']}"
        )
    distributed.shutdown()
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        sys.exit(128 + signal.Signals[result.stopped_by])


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

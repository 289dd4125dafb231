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
aborts, after finishing a checkpoint being written).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

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


def _config_fields(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    """Dotted names of every field, e.g. 'optimizer.learning_rate'."""
    for name, value in config.items():
        yield f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _config_fields(value, f"{prefix}{name}.")


def _unknown_override(argv: Sequence[str]) -> str | None:
    """For the first `--config.<field>=` naming no field of the config file: a message.

    The config is loaded again here: after a failed override, absl holds none.
    """
    config_path, overrides = None, []
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            config_path = argv[index + 1]
        elif arg.startswith("--config="):
            config_path = arg.removeprefix("--config=")
        elif arg.startswith("--config."):
            overrides.append(arg.removeprefix("--config.").split("=", 1)[0])
    if config_path is None:
        return None
    try:
        spec = importlib.util.spec_from_file_location("_jbn_config", config_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fields = list(_config_fields(module.get_config()))
    except Exception:  # the config file itself is broken: absl's message says how
        return None
    for field in overrides:
        if field not in fields:
            closest = difflib.get_close_matches(field, fields, n=3, cutoff=0.0)
            return (
                f"{field!r} is not a config field of {config_path}; the closest are: "
                + ", ".join(closest)
            )
    return None


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing, with config errors (unknown override keys, bad values) as messages."""
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
    try:
        check_workdir(_WORKDIR.value)
    except WorkdirError as error:
        fail(str(error))
    return remaining


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
    )
    try:
        group = distributed.process_group_from(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
        )
        distributed.initialize(group, num_cpu_devices=config.num_cpu_devices)
        result = train_lib.train_and_evaluate(config, _WORKDIR.value)
    except expected_errors as error:
        fail(str(error))
    except train_lib.DivergenceError as error:
        fail(str(error), status=DIVERGED)
    except OSError as error:  # e.g. the disk filled up during the run
        where = f"{error.filename}: " if error.filename else ""
        fail(f"{where}{error.strerror or error}")
    except KeyboardInterrupt as error:  # a second SIGINT while stopping
        print(
            str(error) or "Aborted without saving; rerunning resumes from the latest checkpoint.",
            file=sys.stderr,
        )
        sys.exit(128 + signal.SIGINT)

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

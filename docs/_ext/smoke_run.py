"""The training app run on which the guides' examples work (`configs/smoke.py`, one epoch).

The training and shipping guides both need a finished run; the first page built trains it into
`docs/_build/smoke_run` (seconds, synthetic data) and the other reuses it.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Relative to the repository root, where the commands run, so that what they print is short.
WORKDIR_ARG = "docs/_build/smoke_run"
WORKDIR = ROOT / WORKDIR_ARG
COMMAND = ["-m", "train", "--config", "configs/smoke.py", "--config.num_epochs=1"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `python ARGS...` in the repository root, prints its output, returns the result."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    print(result.stdout + result.stderr, end="")
    if check and result.returncode != 0:
        raise RuntimeError(f"python {' '.join(args)} exited with status {result.returncode}")
    return result


def workdir() -> pathlib.Path:
    """The finished smoke run's workdir, trained first if it is not there."""
    if not (WORKDIR / "summary.json").exists():
        result = run(*COMMAND, "--workdir", WORKDIR_ARG, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"the smoke run exited with status {result.returncode}")
    return WORKDIR

"""Runs one training job as several processes on this machine (multi-host, over loopback).

    python -m train.multihost_demo --workdir runs/multihost [--num_processes 2] \\
        [--config configs/smoke.py] [--config.num_train_steps=8 ...]

Starts `python -m train` once per process with --coordinator_address=127.0.0.1:<free port>,
--num_processes and --process_id, each process with one CPU device, so that the device layout
spans the processes (`--config.parallelism=sharding`, the default: one jit over a mesh of both
processes' devices; or `pmap`) and its collectives (gradient means, synchronized batch norm
statistics) cross them through Gloo over TCP. Every process reports the SHA-256 of its final
parameters and batch statistics; the demo exits 0 if all processes finished and agree, 1
otherwise. Arguments other than --num_processes are passed on to every process (--config
defaults to configs/smoke.py).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence

_REPORT = re.compile(r"^process (\d+)/(\d+): step (\d+), state_sha256 ([0-9a-f]{64})$", re.M)


def free_port() -> int:
    """A TCP port that is free on loopback now (the coordinator binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(num_processes: int, train_args: Sequence[str], timeout_s: float = 600) -> int:
    """Runs the processes to the end; prints each one's output and the verdict."""
    if not any(arg == "--config" or arg.startswith("--config=") for arg in train_args):
        train_args = ["--config=configs/smoke.py", *train_args]
    address = f"127.0.0.1:{free_port()}"
    # One CPU device per process, whatever XLA_FLAGS the caller has.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    # Files, not pipes: a process blocked on a full pipe would stall the collectives of all.
    logs = [tempfile.TemporaryFile() for _ in range(num_processes)]
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "train",
                *train_args,
                "--config.progress_bar=False",
                f"--coordinator_address={address}",
                f"--num_processes={num_processes}",
                f"--process_id={index}",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for index, log in enumerate(logs)
    ]
    reports, failed = {}, False
    for index, (process, log) in enumerate(zip(processes, logs, strict=True)):
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")
        log.close()
        print(f"----- process {index} (exit status {process.returncode}) -----\n{output}")
        failed |= process.returncode != 0
        reports.update(
            {int(match[1]): (int(match[3]), match[4]) for match in _REPORT.finditer(output)}
        )
    agree = len(reports) == num_processes and len(set(reports.values())) == 1
    if failed or not agree:
        print(f"FAILED: exit statuses {[p.returncode for p in processes]}, reports {reports}")
        return 1
    step, digest = reports[0]
    print(f"OK: {num_processes} processes finished at step {step} with state_sha256 {digest}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    args, train_args = parser.parse_known_args(argv)
    return run(args.num_processes, train_args)


if __name__ == "__main__":
    sys.exit(main())

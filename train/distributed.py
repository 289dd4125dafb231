"""Multi-process (multi-host) setup: joining the job before any JAX computation.

A multi-process job is described by a coordinator address, a process count and this process's
id, given as flags or as the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID. Every process runs the same command. Once joined, the device layout
(`train/devices.py`: the sharding layout's mesh, or pmap) spans the devices of all processes,
and each process feeds its own slice of every global batch.

On CPU the cross-process collectives go through Gloo over TCP
(`jax_cpu_collectives_implementation='gloo'`: JAX 0.10's default, set explicitly here so that
the job does not depend on it).
"""

from __future__ import annotations

import dataclasses
import os

import jax


class DistributedError(Exception):
    """An incomplete or inconsistent multi-process description."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits in a (possibly single-process) job."""

    coordinator_address: str | None
    num_processes: int
    process_id: int


def process_group_from(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> ProcessGroup:
    """Resolves the job description from arguments, falling back to environment variables.

    Nothing given anywhere means a single process.
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if address is None and count in (None, 1) and index in (None, 0):
        return ProcessGroup(None, 1, 0)
    if address is None or count is None or index is None:
        raise DistributedError(
            "a multi-process job needs all of --coordinator_address, --num_processes and "
            "--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); got "
            f"address={address!r}, num_processes={count!r}, process_id={index!r}"
        )
    if count < 1 or not 0 <= index < count:
        raise DistributedError(f"process_id must be in [0, {count}), got {index}")
    return ProcessGroup(address, count, index)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def initialize(group: ProcessGroup, num_cpu_devices: int = 0) -> None:
    """Configures JAX's devices; must run before any JAX computation.

    Joins the multi-process job described by `group` (no-op for one process) and, when
    `num_cpu_devices` > 0, asks XLA for that many CPU devices (simulated data parallelism).
    """
    if num_cpu_devices > 0:
        jax.config.update("jax_num_cpu_devices", num_cpu_devices)
    if group.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=group.coordinator_address,
            num_processes=group.num_processes,
            process_id=group.process_id,
        )


def shutdown() -> None:
    """Leaves the multi-process job (no-op for one process)."""
    if jax.process_count() > 1:
        jax.distributed.shutdown()

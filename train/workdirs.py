"""A run's directory (--workdir): one resolved path, worked in by one training run at a time.

`resolve` turns the path given on a command line into the one path every file of the run lives
under. `lock` holds `<workdir>/.lock` with flock(2) for as long as a training run (exclusively)
or a reader such as `train.export` (shared) works in the directory; whoever comes second is
refused at once with a `WorkdirBusy` naming the holder's pid. The kernel releases the lock when
the holder's process ends, however it ends (kill -9 included), so no lock is ever stale. The file
itself stays behind: deleting it would let a late process lock a new file of the same name while
another still holds the old one.

Command lines that work on a finished run (`train.export`, `train.recalibrate`) do it through
`run_locked`, which also turns their failures into one `error:` line:

    workdir = workdirs.resolve(args.workdir)
    info = workdirs.run_locked(
        workdir, lambda: export_run(workdir), shared=True,  # shared: only reads the run's files
        errors=(ExportError,), os_error="cannot write the export",
    )
    if info is None:
        return 2
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

LOCK_FILE = ".lock"

T = TypeVar("T")


class WorkdirBusy(Exception):
    """Another process holds the workdir's lock; the message names the workdir and the holder."""


def resolve(path: str) -> str:
    """`path` made absolute with every symlink and '..' resolved as the kernel resolves them.

    `os.path.abspath` drops 'link/..' as text, which names another directory than the kernel's
    when `link` is a symlink. Resolve once, at the start, and use only the result.
    """
    return os.path.realpath(path)


def _holder(descriptor: int) -> str:
    """'pid 123' (with ' on host' when it is another machine's) from the lock file's text."""
    pid, _, host = os.pread(descriptor, 256, 0).decode(errors="replace").strip().partition(" ")
    if not pid.isdigit():  # the holder has not written itself in yet
        return "pid unknown"
    return f"pid {pid}" if host in ("", socket.gethostname()) else f"pid {pid} on {host}"


@contextlib.contextmanager
def lock(workdir: str, *, shared: bool = False) -> Iterator[None]:
    """Holds the lock of `workdir` (an existing directory) for the block, without waiting.

    Exclusive (a training run, which writes): no other holder at all; the holder's pid and host
    are written into the lock file for the message others get. Shared (`shared=True`, a reader
    such as train.export): no exclusive holder; other readers may hold it too. A reader writes
    nothing: where there is no lock file (no directory, or no run since runs took the lock)
    it proceeds unlocked, as no run is writing there.

    Raises:
      WorkdirBusy: the lock is held in a conflicting mode (by another process, or by another
        `lock` of this one).
      OSError: an exclusive lock's file cannot be created or opened.
    """
    path = os.path.join(workdir, LOCK_FILE)
    try:
        descriptor = os.open(path, os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT, 0o666)
    except (FileNotFoundError, PermissionError):
        if not shared:
            raise
        descriptor = None  # (an unreadable lock file: another user's runs, unseen anyway)
    if descriptor is None:
        yield
        return
    try:
        try:
            fcntl.flock(descriptor, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusy(_busy_message(workdir, descriptor, shared)) from None
        if not shared:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _busy_message(workdir: str, descriptor: int, shared: bool) -> str:
    if not shared:
        try:  # a shared lock is still free: the holders are only readers
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            return (
                f"--workdir {workdir} is being read by another process (e.g. train.export); "
                "rerun when it has finished"
            )
    holder = _holder(descriptor)
    if shared:
        return (
            f"--workdir {workdir} is in use by a training run ({holder}); read it once the run "
            "has finished or stopped (a SIGINT saves a checkpoint; rerunning the same training "
            "command resumes it)"
        )
    return (
        f"--workdir {workdir} is in use by another training run ({holder}); wait for it to end "
        "or stop it, or use another --workdir"
    )


def run_locked(
    workdir: str,
    work: Callable[[], T],
    *,
    shared: bool,
    errors: tuple[type[Exception], ...],
    os_error: str,
) -> T | None:
    """`work()` holding `workdir`'s lock (`lock`), for a command line: a failure is one line.

    Returns what `work` returns (which must not be None). When the lock is busy or `work` raises
    one of `errors`, prints `error: <its message>` on stderr; when `work` raises another
    OSError (`errors` are caught first), prints `error: <os_error>: <its message>`. Either way
    returns None, without a traceback: the caller exits with status 2.
    """
    try:
        with lock(workdir, shared=shared):
            return work()
    except (*errors, WorkdirBusy) as error:
        print(f"error: {error}", file=sys.stderr)
    except OSError as error:
        print(f"error: {os_error}: {error}", file=sys.stderr)
    return None

"""Preemption: SIGINT/SIGTERM become a request to stop after the current step.

The training loop asks `StopRequests.signal_name` after every step, then saves a checkpoint and
stops; rerunning the same command resumes from it (exactly, see `train/train.py`).
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any

import tqdm


class Aborted(KeyboardInterrupt):
    """A second signal aborted the run; `signum` is that signal's number (exit 128 + signum)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum


class StopRequests(contextlib.AbstractContextManager):
    """Turns SIGINT/SIGTERM into a request to stop after the current step.

    A second signal of either kind restores the default handlers and raises `Aborted` (a
    KeyboardInterrupt), so an impatient user can still abort at once; inside `finishing(task)`
    (a checkpoint being written) the abort waits until the task is done, so that no write is torn.
    A SIGTERM within `DUPLICATE_S` of the SIGTERM that counted is the same request delivered twice
    (a scheduler or `kill` signalling both a launcher and its child, or the whole process group),
    not an impatient user: it is ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    DUPLICATE_S = 0.05

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._finishing: str | None = None
        self._abort_after: signal.Signals | None = None
        self._last_sigterm = -float("inf")

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM:
            if time.monotonic() - self._last_sigterm < self.DUPLICATE_S:
                return
            self._last_sigterm = time.monotonic()
        if self.signal_name is None:
            self.signal_name = name
            tqdm.tqdm.write(f"{name}: stopping after this step (again to abort).")
        elif self._finishing is not None:
            self._abort_after = signal.Signals(signum)
            tqdm.tqdm.write(f"{name}: aborting once {self._finishing} is written.")
        else:
            self._restore()
            raise Aborted(signum)

    @contextlib.contextmanager
    def finishing(self, task: str) -> Any:
        """Defers an abort (a second signal) until `task`, e.g. 'the checkpoint of step 5', ends.

        Raises `Aborted` after the block if a second signal came during it.
        """
        self._finishing = task
        try:
            yield
        finally:
            self._finishing = None
        if self._abort_after is not None:
            self._restore()
            raise Aborted(
                self._abort_after,
                f"Aborted by a second {self._abort_after.name} after it finished writing {task}; "
                "rerunning the same command resumes from there.",
            )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequests:
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()

"""SIGINT and SIGTERM become a request to stop between steps, so the run can save a resumable
checkpoint and exit cleanly instead of dying mid-step. A second Ctrl-C stops at once."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopSignals:
    """While entered, remembers the first SIGINT/SIGTERM instead of dying of it.

    ``requested`` holds the signal's number once one came (None before). Outside the main
    thread, where handlers cannot be installed, it does nothing.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        """The conventional exit status for the signal received (128 + its number)."""
        return 128 + (self.requested or 0)

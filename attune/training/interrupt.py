"""SIGINT and SIGTERM become a request to stop between steps, so the run can save a resumable
checkpoint and exit cleanly instead of dying mid-step. A second Ctrl-C stops at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any


class StopSignals:
    """While entered, remembers the first SIGINT/SIGTERM instead of dying of it.

    A second SIGINT stops at once: it raises ``KeyboardInterrupt`` with a one-line message
    saying which checkpoint is the latest complete one. Raised mid-save, it unwinds the save,
    which removes its partial folder (the checkpoints before it stay as they were). Further
    SIGINTs are then ignored, so that nothing interrupts that cleanup.

    ``requested`` holds the signal's number once one came (None before). Outside the main
    thread, where handlers cannot be installed, it does nothing.

    Args:
        latest: gives the latest complete checkpoint, for the second Ctrl-C's message.
    """

    def __init__(self, latest: Callable[[], Path | str | None] | None = None) -> None:
        self.requested: int | None = None
        self.latest = latest
        # what signal.signal returns: a handler, SIG_DFL/SIG_IGN, or None (not set from Python)
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            raise KeyboardInterrupt(self._stopped_now())
        self.requested = signum

    def _stopped_now(self) -> str:
        latest = self.latest() if self.latest is not None else None
        kept = (
            f"the latest complete checkpoint is {latest}; continue with resume_from_checkpoint=true"
            if latest is not None
            else "no checkpoint was saved"
        )
        return f"interrupted twice: stopped at once, without saving ({kept})"

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

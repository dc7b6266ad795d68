"""User-facing errors: a mistake in what the user gave us ends the run with one clear message.

Every module raises :class:`AttuneError` (or a subclass) for a problem the user can fix: a
broken config, a missing file, a malformed dataset row. The ``tune`` command line and every
recipe entry point run under :func:`exit_on_user_error`, which prints the message, without a
traceback, and exits with status 1. A traceback is shown only when asked for, with
``tune --debug`` or the ``ATTUNE_DEBUG=1`` environment variable (which torchrun passes on
to every worker process). Anything else that escapes is a bug in attune and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator

DEBUG_ENV = "ATTUNE_DEBUG"


class AttuneError(Exception):
    """A mistake in the user's input, explained in the message: what, where, how to fix.

    The message is normally one line. An error that gathers several problems at once (config
    validation) puts one problem on each line.
    """


class ConfigError(AttuneError):
    """A config file, override or component that cannot be loaded, merged or instantiated."""


def debug_enabled() -> bool:
    """Whether tracebacks were asked for (``--debug`` or ``ATTUNE_DEBUG``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class RunStopped(Exception):
    """A run that stopped early as asked (SIGINT/SIGTERM), its checkpoint saved and where to
    resume already said: not an error. Library code raises it; the command line exits with
    ``exit_code`` (128 + the signal's number, the shell's convention).

    Args:
        exit_code: the process's exit status.
    """

    def __init__(self, exit_code: int):
        super().__init__(f"stopped, exit status {exit_code}")
        self.exit_code = exit_code


def format_user_error(error: AttuneError, prefix: str = "error") -> str:
    """The text printed for a user error: ``"<prefix>: <message>"``."""
    return f"{prefix}: {error}"


@contextlib.contextmanager
def exit_on_user_error(prefix: str = "error") -> Iterator[None]:
    """Turn an :class:`AttuneError` into its message on stderr and ``exit(1)``.

    A ``KeyboardInterrupt`` that reaches here exits with status 130 and no traceback, with its
    message when it has one (where a training run stopped); code that must save work on an
    interrupt handles it before it gets this far. A :class:`RunStopped` exits quietly with its
    status.
    """
    try:
        yield
    except RunStopped as stopped:
        _close_progress_bars()
        raise SystemExit(stopped.exit_code) from None
    except AttuneError as error:
        if debug_enabled():
            traceback.print_exc()
        _close_progress_bars()
        print(format_user_error(error, prefix), file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt as interrupt:
        if debug_enabled():
            traceback.print_exc()
        _close_progress_bars()
        print(f"{prefix}: {str(interrupt) or 'interrupted'}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def _close_progress_bars() -> None:
    """Close the progress bars still drawn (a run stopped mid-way), so that the message gets a
    line of its own instead of continuing the bar's."""
    module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(module, "tqdm", None), "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


class CheckpointError(AttuneError):
    """A checkpoint folder or file that cannot be read: missing, corrupt, or not matching."""


class RewardError(AttuneError):
    """A reward function that fails on the completions it is given: it raised, or returned
    something other than one number per completion."""

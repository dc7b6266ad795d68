"""Atomic folder writes: a checkpoint appears whole under its name, or not at all."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Write a folder under a temporary name beside ``final``, then rename it into place.

    A crash or an error while writing (a full disk) leaves any earlier ``final`` untouched and
    removes the partial folder. An existing ``final`` is replaced only after the new one is
    complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    publish_folder(temporary, final)


def publish_folder(staging: Path, final: Path) -> None:
    """Rename a finished ``staging`` folder to ``final``, replacing an existing one only once
    the new one is in place under its name's parent."""
    retired = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(retired)
    staging.rename(final)
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (made if missing) for the block's duration.

    Processes that may build the same cached folder at once (every rank of a torchrun job,
    parallel test workers) take it first, so one builds and the others then find the result.
    The operating system releases it if the holder dies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

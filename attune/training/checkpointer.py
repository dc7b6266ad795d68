"""Checkpoints: ``output_dir/checkpoints/step_<N>/``, written whole or not at all, and checked
before a resume loads anything from them.

A checkpoint folder is what the run produces for users (a HF model folder, or a peft adapter
folder), with ``training_state/`` inside it: everything an exact resume needs besides the
weights the folder already holds (optimizer, schedule, data position, RNG states, and a LoRA
run's adapter tensors under attune's names) and ``manifest.json``, every file's size and
checksum, written last. The folder is written under a temporary name and renamed into place, so a crash, a
full disk or a second Ctrl-C mid-save leaves the earlier checkpoints intact, and the latest
``step_<N>`` is always complete.

Resuming never unpickles arbitrary objects: the training state is read with
``torch.load(weights_only=True)`` and the sharded state's metadata and values through
:mod:`attune.checkpoint.sharded`'s restricted reader.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from attune.checkpoint import publish_folder
from attune.checkpoint.manifest import check_manifest, write_manifest
from attune.checkpoint.sharded import (
    METADATA_FILE,
    RestrictedLoadPlanner,
    RestrictedReader,
    check_files,
    check_fits,
    load_failure,
    read_metadata,
)
from attune.distributed import World
from attune.errors import CheckpointError
from attune.tokenizer import Tokenizer

STATE_DIR = "training_state"
STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"step_(\d+)")

# A write that found no room: what to say, and what to do about it.
_FREE_SPACE = "free some space"
_NO_ROOM = {
    errno.ENOSPC: ("the disk is full", _FREE_SPACE),
    errno.EDQUOT: ("the disk quota is exceeded", _FREE_SPACE),
    errno.EFBIG: (
        "a file grew past the size the system allows",
        "raise the file size limit (ulimit -f)",
    ),
}
# The same, as the Rust writers (safetensors) spell it inside their messages.
_NO_ROOM_TEXT = {f"os error {number}": number for number in _NO_ROOM}


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it saves "in a single process" whenever no process group exists; that is
    the one-device case, and intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_step(folder: str | Path) -> int | None:
    """The step of a ``step_<N>`` checkpoint folder (None for another name)."""
    match = _STEP_DIR.fullmatch(Path(folder).name)
    return int(match.group(1)) if match else None


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a published checkpoint (its training state is written last)."""
    return (folder / STATE_DIR / STATE_FILE).is_file()


def newest_up_to(last_checkpoint: str | Path | None, step: int) -> Path | None:
    """The newest complete checkpoint of step ``step`` or earlier: ``last_checkpoint`` itself
    when its step is not later, else the newest such one beside it (in the same folder)."""
    if last_checkpoint is None:
        return None
    last = Path(last_checkpoint)
    last_step = checkpoint_step(last)
    if last_step is not None and last_step <= step:
        return last
    found = []
    if last.parent.is_dir():
        for path in last.parent.iterdir():
            number = checkpoint_step(path)
            if number is not None and number <= step and is_complete(path):
                found.append((number, path))
    return max(found)[1] if found else None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def unwrap_dcp_error(error: BaseException) -> BaseException:
    """The exception a torch.distributed.checkpoint call wrapped (it wraps everything, even a
    ``KeyboardInterrupt``, in a ``CheckpointException``), or ``error`` itself."""
    from torch.distributed.checkpoint.api import CheckpointException

    while isinstance(error, CheckpointException) and error.failures:
        error = error.failures[min(error.failures)][0]
    return error


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it was raised from or during, torch.distributed.checkpoint's
    wrapping taken off: ``torch.save`` reports a failed write (a full disk, an interrupt in
    the middle of it) as ``unexpected pos ...``, with the real cause as its context when it
    wrote to a Python file."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = unwrap_dcp_error(pending.pop())
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]


def _no_room(error: BaseException) -> tuple[str, str] | None:
    """Why a write failed for lack of room (``"the disk is full (No space left on device)"``)
    and what to do about it, or None when that was not the cause."""
    for current in _causes(error):
        if isinstance(current, OSError) and current.errno in _NO_ROOM:
            what, advice = _NO_ROOM[current.errno]
            return f"{what} ({current.strerror})", advice
        for text, number in _NO_ROOM_TEXT.items():
            if text in str(current):
                what, advice = _NO_ROOM[number]
                return f"{what} ({_first_line(current)})", advice
    return None


def _save_state(state: dict[str, Any], path: Path) -> None:
    # through a Python file, so that a failed write keeps its OSError (and errno) as the
    # context of torch's own error
    with open(path, "wb") as handle:
        torch.save(state, handle)


class Checkpointer:
    """Saves, finds and checks the run's checkpoints.

    Args:
        output_dir: the run's folder (the recipe passes its ``output_dir``).
        save_every_n_steps: save every N optimizer steps (None: only at the end).
        keep_last_n: keep only the newest N checkpoints (None: keep all).
        max_shard_size: the largest weights file of a saved model (``"5GB"``).
        save_merged: LoRA runs also write merged full weights into ``merged/``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        save_every_n_steps: int | None = None,
        keep_last_n: int | None = None,
        max_shard_size: int | str = "5GB",
        save_merged: bool = False,
    ):
        self.directory = Path(output_dir) / "checkpoints"
        self.save_every_n_steps = save_every_n_steps
        self.keep_last_n = keep_last_n
        self.max_shard_size = max_shard_size
        self.save_merged = save_merged
        # the run's tokenizer (set by the recipe's setup): saved folders get its chat template
        # and stop tokens (see Tokenizer.save_chat_settings); None writes the source's as is
        self.tokenizer: Tokenizer | None = None

    def due(self, step: int) -> bool:
        """Whether the periodic schedule saves after ``step``."""
        every = self.save_every_n_steps
        return every is not None and every > 0 and step % every == 0

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            step = checkpoint_step(path)
            if step is not None and is_complete(path):
                found.append((step, path))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def save(
        self,
        step: int,
        write_weights: Callable[[Path], None],
        state: dict[str, Any],
        sharded: dict[str, Any] | None = None,
        world: World | None = None,
    ) -> Path:
        """Write ``checkpoints/step_<step>`` and return it.

        ``write_weights(folder)`` writes the model or adapter files (main process); ``state``
        (plain values) goes to ``training_state/state.pt`` (main process); ``sharded`` (the
        optimizer and anything else sharded across processes) to ``training_state/sharded``
        with torch.distributed.checkpoint, every process writing its own shards. All of it
        goes into a temporary folder, which gets its manifest and is then renamed into place.

        Raises:
            CheckpointError: the disk is full (or a file size limit was reached); nothing of
                this step is kept, and the message names the latest complete checkpoint.
        """
        world = world or World()
        final = self.directory / f"step_{step}"
        staging = self.directory / f".step_{step}.partial"
        if world.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        world.barrier()
        try:
            if world.is_main:
                write_weights(staging)
            world.barrier()
            if sharded:
                with _single_process_quiet():
                    dcp.save(sharded, checkpoint_id=str(staging / STATE_DIR / SHARDED_DIR))
            if world.is_main:
                (staging / STATE_DIR).mkdir(exist_ok=True)
                _save_state(state, staging / STATE_DIR / STATE_FILE)
                write_manifest(staging, staging / STATE_DIR / MANIFEST_FILE)
        except BaseException as error:
            if world.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            raise self._save_error(step, error) from None
        world.barrier()
        if world.is_main:
            publish_folder(staging, final)
            if self.keep_last_n:
                for old in self.checkpoints()[: -self.keep_last_n]:
                    shutil.rmtree(old, ignore_errors=True)
        world.barrier()
        return final

    def _save_error(self, step: int, error: BaseException) -> BaseException:
        """What to raise for a save that failed (its partial folder already removed): a
        full disk as one line naming what is still complete; an interrupt or a bug as what
        it was (torch.distributed.checkpoint's wrapping taken off)."""
        interrupt = next((e for e in _causes(error) if isinstance(e, KeyboardInterrupt)), None)
        if interrupt is not None:
            return interrupt
        no_room = _no_room(error)
        if no_room is None:
            return unwrap_dcp_error(error)
        reason, advice = no_room
        latest = self.latest()
        kept = (
            f"the latest complete checkpoint is still {latest}; {advice}, then continue with "
            "resume_from_checkpoint=true"
            if latest is not None
            else f"no earlier checkpoint was saved; {advice}"
        )
        return CheckpointError(
            f"cannot save checkpoint step_{step} in {self.directory}: {reason}. Nothing of "
            f"step {step} was kept, and {kept}"
        )

    # Checks before a resume --------------------------------------------------------------

    def verify(self, folder: str | Path) -> None:
        """Check a checkpoint before anything is loaded from it: every file against its
        manifest (checkpoints written before attune wrote manifests have none, and skip
        this), the training state readable as plain values, the sharded state's metadata
        trusted and its files as long as it says.

        Raises:
            CheckpointError: what is wrong, naming the file within ``folder``.
        """
        folder = Path(folder)
        manifest = folder / STATE_DIR / MANIFEST_FILE
        if manifest.is_file():
            check_manifest(folder, manifest)
        _read_state(folder / STATE_DIR / STATE_FILE, f"{STATE_DIR}/{STATE_FILE}")
        sharded = folder / STATE_DIR / SHARDED_DIR
        if sharded.is_dir():
            label = f"{STATE_DIR}/{SHARDED_DIR}"
            metadata = read_metadata(sharded / METADATA_FILE, f"{label}/{METADATA_FILE}")
            check_files(sharded, metadata, label)

    def sound_alternative(self, excluding: str | Path) -> Path | None:
        """The newest complete checkpoint other than ``excluding`` that passes
        :meth:`verify`, or None."""
        excluded = Path(excluding).resolve()
        for folder in reversed(self.checkpoints()):
            if folder.resolve() == excluded:
                continue
            try:
                self.verify(folder)
            except CheckpointError:
                continue
            return folder
        return None

    def resume_error(self, folder: str | Path, problem: str) -> CheckpointError:
        """The error for a checkpoint that cannot be resumed because of a bad file: the
        folder, the problem, and the newest other checkpoint that passes its checks."""
        other = self.sound_alternative(folder)
        if other is not None:
            instead = f"resume from {other.name} instead: resume_from_checkpoint={other}"
        else:
            instead = (
                f"no other checkpoint in {self.directory} passes its checks; start without "
                "resume_from_checkpoint"
            )
        return CheckpointError(f"cannot resume from {folder}: {problem}; {instead}")

    def check_resumable(self, folder: str | Path) -> None:
        """:meth:`verify`, failing with :meth:`resume_error`'s message."""
        try:
            self.verify(folder)
        except CheckpointError as error:
            raise self.resume_error(folder, str(error)) from None

    # Loading -----------------------------------------------------------------------------

    def load_sharded(
        self, folder: Path, template: dict[str, Any], mismatch_hint: str = ""
    ) -> dict[str, Any]:
        """Fill ``template`` (the sharded state as this run lays it out, possibly on another
        number of processes) from a checkpoint's ``training_state/sharded``.

        Args:
            folder: the checkpoint.
            template: the state to fill, in place.
            mismatch_hint: what differs between the checkpoint's settings and the run's, when
                known, said first when the checkpoint's tensors do not fit the template.

        Raises:
            CheckpointError: the metadata is corrupt or not trusted, a file is missing or
                truncated, or a tensor is missing or has another shape (naming it).
        """
        folder = Path(folder)
        sharded = folder / STATE_DIR / SHARDED_DIR
        label = f"{STATE_DIR}/{SHARDED_DIR}"
        try:
            metadata = read_metadata(sharded / METADATA_FILE, f"{label}/{METADATA_FILE}")
            check_files(sharded, metadata, label)
        except CheckpointError as error:
            raise self.resume_error(folder, str(error)) from None
        try:
            check_fits(metadata, template)
        except CheckpointError as error:
            what = mismatch_hint or "it does not fit this run"
            raise CheckpointError(
                f"cannot resume from {folder}: {what} ({error}); resume with the model and "
                "settings it was trained with, or train afresh in another output_dir"
            ) from None
        try:
            with _single_process_quiet():
                dcp.load(
                    template,
                    storage_reader=RestrictedReader(sharded),
                    planner=RestrictedLoadPlanner(),
                )
        except BaseException as error:
            cause = unwrap_dcp_error(error)
            if not isinstance(cause, Exception):
                raise cause from None  # an interrupt
            problem = (
                str(cause)
                if isinstance(cause, CheckpointError)
                else f"{label} cannot be read ({_first_line(cause)})"
            )
            raise self.resume_error(folder, problem) from None
        return template

    def load_state(self, folder: Path) -> dict[str, Any]:
        """The training state of a checkpoint folder (loaded with ``weights_only=True``).

        Raises:
            CheckpointError: it is missing, corrupt, or holds more than plain values.
        """
        folder = Path(folder)
        try:
            return _read_state(folder / STATE_DIR / STATE_FILE, f"{STATE_DIR}/{STATE_FILE}")
        except CheckpointError as error:
            raise self.resume_error(folder, str(error)) from None


def _read_state(path: Path, label: str) -> dict[str, Any]:
    """A training state file, loaded with ``weights_only=True``, as one-line errors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{label} is missing: not a resumable checkpoint") from None
    except Exception as error:
        raise load_failure(error, label) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{label} is not an attune training state")
    return state

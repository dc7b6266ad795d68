"""Checkpoints: ``output_dir/checkpoints/step_<N>/``, written whole or not at all.

A checkpoint folder is what the run produces for users (a HF model folder, or a peft adapter
folder), with ``training_state/`` inside it: everything an exact resume needs besides the
weights the folder already holds (optimizer, schedule, data position, RNG states, and a LoRA
run's adapter tensors under attune's names). The folder is written under a temporary name and
renamed into place, so a crash or a full disk mid-save leaves the earlier checkpoints intact,
and the latest ``step_<N>`` is always complete.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from attune.checkpoint import publish_folder
from attune.errors import CheckpointError
from attune.training.distributed import World

STATE_DIR = "training_state"
STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"
_STEP_DIR = re.compile(r"step_(\d+)")


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it saves "in a single process" whenever no process group exists; that is
    the one-device case, and intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Checkpointer:
    """Saves and finds the run's checkpoints.

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

    def due(self, step: int) -> bool:
        """Whether the periodic schedule saves after ``step``."""
        every = self.save_every_n_steps
        return bool(every) and step % every == 0

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _STEP_DIR.fullmatch(path.name)
            if match and (path / STATE_DIR / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
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
        goes into a temporary folder that is renamed into place once complete.
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
                torch.save(state, staging / STATE_DIR / STATE_FILE)
        except BaseException:
            if world.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        world.barrier()
        if world.is_main:
            publish_folder(staging, final)
            if self.keep_last_n:
                for old in self.checkpoints()[: -self.keep_last_n]:
                    shutil.rmtree(old, ignore_errors=True)
        world.barrier()
        return final

    def load_sharded(self, folder: Path, template: dict[str, Any]) -> dict[str, Any]:
        """Fill ``template`` (the sharded state as this run lays it out, possibly on another
        number of processes) from a checkpoint's ``training_state/sharded``."""
        with _single_process_quiet():
            dcp.load(template, checkpoint_id=str(Path(folder) / STATE_DIR / SHARDED_DIR))
        return template

    def load_state(self, folder: Path) -> dict[str, Any]:
        """The training state of a checkpoint folder (loaded with ``weights_only=True``)."""
        path = Path(folder) / STATE_DIR / STATE_FILE
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(
                f"{folder}: no {STATE_DIR}/{STATE_FILE}; not a resumable checkpoint"
            ) from None
        except Exception as error:
            raise CheckpointError(f"{path}: cannot be read ({error})") from None

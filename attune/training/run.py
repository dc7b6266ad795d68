"""A run's setting: this process among the others, its device, dtypes and seed, and its
folder (``output_dir``, with the resolved config kept in it)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from attune.config import parse
from attune.cpu import bf16_notice
from attune.distributed import World, init_world, shutdown
from attune.errors import ConfigError, RunStopped
from attune.host_memory import keep_freed_host_memory
from attune.training.runtime import autocast, resolve_device, resolve_dtype, seed_everything

CONFIG_FILE = "config.yaml"


@dataclass
class Run:
    """Where and how this process trains.

    Attributes:
        device: the device of the model and batches.
        dtype: the dtype of the weights.
        autocast: the forward pass's autocast dtype name, or None.
        output_dir: the run's folder.
        world: this process among the data-parallel processes.
        exit_callbacks: what :meth:`at_exit` registered.
    """

    device: torch.device
    dtype: torch.dtype
    autocast: str | None
    output_dir: Path
    world: World = field(default_factory=World)
    exit_callbacks: list[Callable[[BaseException | None], None]] = field(
        default_factory=list, repr=False
    )

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    def precision(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context for one forward pass (or a no-op)."""
        return autocast(self.device, self.autocast)

    def print(self, line: str) -> None:
        """A line on stdout from the main process (one write, so lines never interleave)."""
        if self.is_main:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def at_exit(self, callback: Callable[[BaseException | None], None]) -> None:
        """Have :func:`start_run` call ``callback(error)`` when the run ends, however it ends:
        ``error`` is None at a normal end, else the exception ending it (a stop signal's
        :class:`~attune.errors.RunStopped`, say). The last registered is called first."""
        self.exit_callbacks.append(callback)

    def exit(self, error: BaseException | None) -> None:
        """Call the :meth:`at_exit` callbacks, once each."""
        while self.exit_callbacks:
            self.exit_callbacks.pop()(error)


def make_output_dir(path: Path) -> None:
    """Create a run's folder, or say in one line why it cannot be.

    Raises:
        ConfigError: the folder cannot be created or written to.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"output_dir: cannot create {path} ({error.strerror}); choose a folder you can write to"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {path} is not writable; choose a folder you can write to")


@contextlib.contextmanager
def start_run(cfg: DictConfig) -> Iterator[Run]:
    """Join the processes (under torchrun), seed, resolve the device and dtypes, create
    ``output_dir`` and keep the resolved config in it (``config.yaml``). Leaving the block
    leaves the process group, whatever happened inside it."""
    requested = cfg.get("device", "auto")
    device_type = resolve_device(requested).type
    world = init_world(device_type)
    run: Run | None = None
    ending: BaseException | None = None
    stopping = _StopOutsideTheSteps()
    try:
        run = Run(
            device=resolve_device(requested, world.local_rank),
            dtype=resolve_dtype(cfg.get("dtype", "fp32")),
            autocast=cfg.get("autocast"),
            output_dir=Path(cfg.output_dir),
            world=world,
        )
        if run.autocast is not None:
            resolve_dtype(run.autocast)  # a bad name fails now, not at the first forward pass
        if run.device.type == "cpu":  # each step's activations reused, not faulted in anew
            keep_freed_host_memory()
        if run.is_main:  # the probe takes half a second, and only where the notice is due
            notice = bf16_notice(run.device, run.dtype, run.autocast)
            if notice is not None:
                run.print(notice)
        seed_everything(cfg.get("seed", 0))
        if run.output_dir.exists() and not run.output_dir.is_dir():
            raise ConfigError(
                f"output_dir: {run.output_dir} is a file, not a folder; choose another output_dir"
            )
        if run.is_main:
            make_output_dir(run.output_dir)
            OmegaConf.save(cfg, run.output_dir / CONFIG_FILE, resolve=True)
        world.barrier()
        yield run
    except BaseException as error:
        ending = error
        raise
    finally:
        try:
            if run is not None:
                run.exit(ending)
        finally:
            stopping.close()
            shutdown(world)


class _StopOutsideTheSteps:
    """SIGTERM outside the training steps (setting up, the final save and evaluation), where
    the loop's :class:`~attune.training.interrupt.StopSignals` is not listening, stops the run
    as SIGINT does (an exception, so the trackers are closed as killed and partial writes are
    undone) instead of killing the process on the spot. The loop installs its own handler over
    this one while it runs steps. Main thread only; :meth:`close` puts the previous back."""

    def __init__(self) -> None:
        self.previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    @staticmethod
    def _handle(signum: int, frame: Any) -> None:
        print(
            "stopped by SIGTERM outside the training steps (setting up or finishing); "
            "resume_from_checkpoint=true continues from the latest complete checkpoint",
            file=sys.stderr,
            flush=True,
        )
        raise RunStopped(128 + signum)

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def recipe(schema: Mapping[str, Any]) -> Callable[[Callable[[DictConfig, Run], Any]], Any]:
    """Decorate a training recipe's body ``(cfg, run)``: the script's entry point reads and
    checks the config against ``schema`` (:func:`attune.config.parse`) and runs the body inside
    :func:`start_run`::

        @training.recipe(SCHEMA)
        def recipe_main(cfg, run):
            ...

        if __name__ == "__main__":
            recipe_main()
    """

    def decorate(body: Callable[[DictConfig, Run], Any]) -> Any:
        @functools.wraps(body)
        def run_recipe(cfg: DictConfig) -> Any:
            with start_run(cfg) as run:
                return body(cfg, run)

        return parse(schema)(run_recipe)

    return decorate

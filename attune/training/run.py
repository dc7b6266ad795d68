"""A run's setting and its outputs: device, dtype, seed, output folder, what a checkpoint
writes, and where a resume starts."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from attune.errors import ConfigError
from attune.models import TransformerDecoder, save_pretrained
from attune.peft import LoraSettings, merged_state_dict, save_adapter
from attune.training.checkpointer import Checkpointer
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
        rank, world_size: this process among the data-parallel processes.
    """

    device: torch.device
    dtype: torch.dtype
    autocast: str | None
    output_dir: Path
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def precision(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context for one forward pass (or a no-op)."""
        return autocast(self.device, self.autocast)

    def print(self, line: str) -> None:
        """A line on stdout from the main process (one write, so lines never interleave)."""
        if self.is_main:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


def start_run(cfg: DictConfig) -> Run:
    """Seed, resolve the device and dtypes, create ``output_dir`` and keep the resolved config
    in it (``config.yaml``)."""
    run = Run(
        device=resolve_device(cfg.get("device", "auto")),
        dtype=resolve_dtype(cfg.get("dtype", "fp32")),
        autocast=cfg.get("autocast"),
        output_dir=Path(cfg.output_dir),
    )
    if run.autocast is not None:
        resolve_dtype(run.autocast)  # a bad name fails now, not at the first forward pass
    seed_everything(cfg.get("seed", 0))
    if run.is_main:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run.output_dir / CONFIG_FILE, resolve=True)
    return run


def weights_writer(
    model: TransformerDecoder, checkpointer: Checkpointer, lora: LoraSettings | None = None
) -> Callable[[Path], None]:
    """What a checkpoint folder holds: the full model as a HF folder, or for a LoRA run the
    peft adapter (and, with ``save_merged``, the merged model in ``merged/``). Tokenizer files
    are copied from the folder the model was loaded from."""
    source = model.config.source

    def write_model(folder: Path) -> None:
        save_pretrained(model, folder, source=source, max_shard_size=checkpointer.max_shard_size)

    def write_adapter(folder: Path) -> None:
        save_adapter(model, folder, lora, base_model_name_or_path=source, tokenizer_source=source)
        if checkpointer.save_merged:
            save_pretrained(
                model,
                folder / "merged",
                source=source,
                max_shard_size=checkpointer.max_shard_size,
                state=merged_state_dict(model),
            )

    return write_model if lora is None else write_adapter


def resume_point(
    checkpointer: Checkpointer, resume: bool
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its training state, or ``(None, None)``.

    Raises:
        ConfigError: ``resume_from_checkpoint`` is set but there is no checkpoint.
    """
    if not resume:
        return None, None
    folder = checkpointer.latest()
    if folder is None:
        raise ConfigError(
            f"resume_from_checkpoint=true, but {checkpointer.directory} holds no complete "
            "checkpoint; start without it"
        )
    return folder, checkpointer.load_state(folder)

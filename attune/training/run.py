"""A run's setting and its outputs: device, dtype, seed, processes, the model built for them,
what a checkpoint writes, and where a resume starts."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from attune.config import instantiate
from attune.errors import CheckpointError, ConfigError
from attune.models import TransformerDecoder, load_weights, save_pretrained
from attune.peft import LoraSettings, apply_lora, is_adapter_key, merge_state_dict, save_adapter
from attune.quantization import QuantizationScheme, insert_fake_quantization
from attune.training.checkpointer import STATE_DIR, STATE_FILE, Checkpointer, is_complete
from attune.training.distributed import (
    World,
    full_state_dict,
    init_world,
    materialize,
    shard_model,
    shutdown,
)
from attune.training.runtime import (
    autocast,
    resolve_device,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
)

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
    """

    device: torch.device
    dtype: torch.dtype
    autocast: str | None
    output_dir: Path
    world: World = field(default_factory=World)

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
    finally:
        shutdown(world)


def setup_model(
    node: Any,
    run: Run,
    lora: LoraSettings | None = None,
    weights: str | Path | None = None,
    cpu_offload: bool = False,
    fake_quantization: QuantizationScheme | None = None,
) -> TransformerDecoder:
    """Build the ``model`` component for this process, with LoRA adapters when given.

    On one process the model loads as the component loads it. Under torchrun it is built on
    the meta device, sharded with FSDP2 (per layer, then the root), and each process loads
    only its shards; adapters start with the values one process would give them.

    Args:
        node: the ``model`` config component (called with ``dtype`` and ``device``).
        run: the run.
        lora: adapter settings, or None for full training.
        weights: a HF folder to load the weights from instead of the model's own (the
            checkpoint a full run resumes from).
        cpu_offload: keep sharded parameters and optimizer state on the CPU.
        fake_quantization: quantization-aware training under this scheme: fake quantizers
            go in before sharding (FSDP2 then holds the swapped layers' parameters).
    """
    distributed = run.world.distributed
    model = instantiate(node, dtype=run.dtype, device="meta" if distributed else run.device)
    if lora is not None:
        apply_lora(model, lora)
    if fake_quantization is not None:
        insert_fake_quantization(model, fake_quantization)
    try:
        if distributed:
            compute = resolve_dtype(run.autocast) if run.autocast else None
            shard_model(model, run.world, compute_dtype=compute, cpu_offload=cpu_offload)
            materialize(model, run.device, weights or model.config.source, lora)
        elif weights is not None:
            load_weights(model, weights, ignore=is_adapter_key)
    except CheckpointError as error:
        if weights is None:
            raise
        # a checkpoint of another model (another hidden size, layer count...): say which
        # checkpoint, not only which tensor
        raise CheckpointError(
            f"cannot resume from {weights}: its weights do not load into this run's model "
            f"({error}); resume with the model it was trained with, or train afresh in another "
            "output_dir"
        ) from None
    return model


def weights_writer(
    model: TransformerDecoder,
    checkpointer: Checkpointer,
    state: Mapping[str, torch.Tensor],
    lora: LoraSettings | None = None,
):
    """Writes a checkpoint folder's weights from the model's full ``state``: the HF folder,
    or for a LoRA run the peft adapter (and, with ``save_merged``, the merged model in
    ``merged/``). Tokenizer files are copied from the folder the model was loaded from, then
    the run's tokenizer adds its chat template and stop tokens."""
    source = model.config.source
    size = checkpointer.max_shard_size
    tokenizer = checkpointer.tokenizer

    def write(folder: Path) -> None:
        if lora is None:
            save_pretrained(model, folder, source=source, max_shard_size=size, state=state)
            if tokenizer is not None:
                tokenizer.save_chat_settings(folder)
            return
        save_adapter(
            model,
            folder,
            lora,
            base_model_name_or_path=source,
            tokenizer_source=source,
            state=state,
        )
        if checkpointer.save_merged:
            merged = merge_state_dict(state, lora)
            save_pretrained(
                model, folder / "merged", source=source, max_shard_size=size, state=merged
            )
        for written in (folder, folder / "merged"):
            if tokenizer is not None and written.is_dir():
                tokenizer.save_chat_settings(written)

    return write


def _owner(
    model: torch.nn.Module, companions: Mapping[str, torch.nn.Module] | None
) -> torch.nn.Module:
    """The module whose parameters the optimizer holds: the model, or the model and the
    modules trained beside it (PPO's value model), under one root with stable names."""
    if not companions:
        return model
    return torch.nn.ModuleDict({"model": model, **companions})


def _sharded_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lora: bool,
    companions: Mapping[str, torch.nn.Module] | None = None,
):
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model = _owner(model, companions)
    sharded: dict[str, Any] = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    if lora:
        model_state = get_model_state_dict(model)
        sharded["adapter"] = {k: v for k, v in model_state.items() if is_adapter_key(k)}
    return sharded


def save_checkpoint(
    checkpointer: Checkpointer,
    step: int,
    run: Run,
    model: TransformerDecoder,
    optimizer: torch.optim.Optimizer,
    lora: LoraSettings | None,
    state: dict[str, Any],
    companions: Mapping[str, TransformerDecoder] | None = None,
) -> Path:
    """Write ``checkpoints/step_<step>``: the weights (gathered from every process), the
    optimizer (and adapters) sharded with torch.distributed.checkpoint, and ``state`` (the
    loop's own: step, data position, schedule...) with the RNG states. Each of
    ``companions`` (models trained beside the main one, such as PPO's value model) is written
    whole as a HF folder ``<name>/`` inside it. A collective."""
    full = full_state_dict(model, run.world)
    plain = {**state, "rng": rng_state()}
    sharded = _sharded_state(model, optimizer, lora is not None, companions)
    write_model = weights_writer(model, checkpointer, full, lora)
    extra = {
        name: (module, full_state_dict(module, run.world))
        for name, module in (companions or {}).items()
    }

    def writer(folder: Path) -> None:
        write_model(folder)
        for name, (module, module_state) in extra.items():
            save_pretrained(
                module,
                folder / name,
                source=module.config.source,
                max_shard_size=checkpointer.max_shard_size,
                state=module_state,
            )

    return checkpointer.save(step, writer, plain, sharded=sharded, world=run.world)


def restore_checkpoint(
    checkpointer: Checkpointer,
    folder: Path,
    model: TransformerDecoder,
    optimizer: torch.optim.Optimizer,
    lora: LoraSettings | None,
    companions: Mapping[str, torch.nn.Module] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint's optimizer (and adapters) into this run's layout, which may have
    another number of processes, restore the RNG states, and return the loop's state. The
    companions' weights are not loaded here: they are built from their folders
    (``step_<N>/<name>``) as the main model is from the checkpoint.

    Raises:
        CheckpointError: a file is corrupt or not trusted, or the checkpoint's tensors do not
            fit this run (another model shape, another ``lora.rank``), naming the folder.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    owner = _owner(model, companions)
    # everything is read and checked before anything of this run is changed
    state = checkpointer.load_state(folder)
    template = _sharded_state(model, optimizer, lora is not None, companions)
    sharded = checkpointer.load_sharded(folder, template, _lora_difference(folder, lora))
    if lora is not None:
        set_model_state_dict(owner, sharded["adapter"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(owner, optimizer, sharded["optimizer"])
    set_rng_state(state["rng"])
    return state


def _lora_difference(folder: Path, lora: LoraSettings | None) -> str:
    """How the checkpoint's adapter settings differ from this run's, for a message ("" when
    they do not, or cannot be told)."""
    from attune.peft.adapter import CONFIG_FILE

    path = Path(folder) / CONFIG_FILE
    saved = None
    if path.is_file():
        try:
            saved = json.loads(path.read_text()).get("r")
        except (OSError, ValueError, AttributeError):
            saved = None
    if lora is None:
        return "it is a LoRA checkpoint, and this run trains the full model" if saved else ""
    if saved is not None and saved != lora.rank:
        return f"it was trained with lora.rank={saved}, and this run has lora.rank={lora.rank}"
    return ""


def resume_point(checkpointer: Checkpointer, resume: bool | str | None) -> Path | None:
    """The checkpoint to resume from, checked (:meth:`Checkpointer.check_resumable`), or None.

    Args:
        checkpointer: the run's checkpointer.
        resume: ``resume_from_checkpoint``: true for the newest complete checkpoint, or a
            checkpoint folder (a path, or ``step_<N>`` within the run's checkpoints).

    Raises:
        ConfigError: ``resume_from_checkpoint`` is set but there is no such checkpoint.
        CheckpointError: the checkpoint is not complete, a file of it is missing, truncated,
            changed since it was written, or not trusted.
    """
    if isinstance(resume, str) and resume.strip().lower() in ("true", "false"):
        resume = resume.strip().lower() == "true"
    if not resume:
        return None
    if resume is True:
        folder = checkpointer.latest()
        if folder is None:
            raise ConfigError(
                f"resume_from_checkpoint=true, but {checkpointer.directory} holds no complete "
                "checkpoint; start without it"
            )
    else:
        folder = Path(str(resume)).expanduser()
        if not folder.is_dir() and (checkpointer.directory / str(resume)).is_dir():
            folder = checkpointer.directory / str(resume)
        if not folder.is_dir():
            raise ConfigError(
                f"resume_from_checkpoint={resume}: no such checkpoint folder (give true for the "
                f"newest, a folder, or step_<N> in {checkpointer.directory})"
            )
        if not is_complete(folder):
            raise CheckpointError(
                f"resume_from_checkpoint={resume}: {folder} is not a complete checkpoint (it "
                f"has no {STATE_DIR}/{STATE_FILE})"
            )
    checkpointer.check_resumable(folder)
    return folder

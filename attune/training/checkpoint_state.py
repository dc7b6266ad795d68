"""What a training run's checkpoint holds, and how a run continues from one: the model exported
for users (a HF folder, or a peft adapter), the optimizer (and adapters) sharded with
torch.distributed.checkpoint so that another number of processes can load them, the loop's own
state and the RNG states; and which checkpoint a resume starts from. Where and how the files
are written (atomically, with a manifest) is :class:`~attune.training.checkpointer.Checkpointer`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from attune.errors import CheckpointError, ConfigError
from attune.models import TransformerDecoder, save_pretrained
from attune.peft import LoraSettings, is_adapter_key, merge_state_dict, save_adapter
from attune.training.checkpointer import STATE_DIR, STATE_FILE, Checkpointer, is_complete
from attune.training.run import Run
from attune.training.runtime import rng_state, set_rng_state
from attune.training.sharding import full_state_dict


def weights_writer(
    model: TransformerDecoder,
    checkpointer: Checkpointer,
    state: Mapping[str, torch.Tensor],
    lora: LoraSettings | None = None,
) -> Callable[[Path], None]:
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
    groups = state.get("param_groups")
    if groups is not None and groups != len(optimizer.param_groups):
        raise _grouping_error(folder, groups, len(optimizer.param_groups))
    template = _sharded_state(model, optimizer, lora is not None, companions)
    sharded = checkpointer.load_sharded(folder, template, _lora_difference(folder, lora))
    if lora is not None:
        set_model_state_dict(owner, sharded["adapter"], options=StateDictOptions(strict=False))
    try:
        set_optimizer_state_dict(owner, optimizer, sharded["optimizer"])
    except (KeyError, ValueError) as error:
        raise _grouping_error(folder, "?", len(optimizer.param_groups)) from error
    set_rng_state(state["rng"])
    return state


def _grouping_error(folder: Path, saved: int | str, ours: int) -> CheckpointError:
    return CheckpointError(
        f"cannot resume from {folder}: its optimizer has {saved} parameter group(s) and this "
        f"run's {ours}; resume with the weight-decay grouping it was written with (a "
        "checkpoint from before norms and biases were left out of weight decay resumes with "
        "optimizer.decay_norms_and_biases=true)"
    )


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

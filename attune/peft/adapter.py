"""Adapters in peft's format, so ``PeftModel.from_pretrained(base, folder)`` loads them.

A folder holds ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``,
``target_modules``, ``base_model_name_or_path``, ...) and ``adapter_model.safetensors`` with
peft's tensor names: ``base_model.model.`` + the HF module name + ``.lora_A.weight`` /
``.lora_B.weight`` / ``.lora_magnitude_vector``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from attune.errors import CheckpointError
from attune.models import TransformerDecoder
from attune.models.families import family_of, llama_keys_from_hf, llama_keys_to_hf
from attune.models.hf import copy_tokenizer_files
from attune.peft.lora import LoraSettings, adapter_state_dict, apply_lora, is_adapter_key

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _adapted_layers(state: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted({name.rsplit(".lora_", 1)[0] for name in state if is_adapter_key(name)})


def save_adapter(
    model: TransformerDecoder,
    folder: str | Path,
    settings: LoraSettings,
    base_model_name_or_path: str | None = None,
    tokenizer_source: str | Path | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's adapters as a peft adapter folder (``folder`` must exist).

    Args:
        model: a model with :func:`~attune.peft.lora.apply_lora` applied.
        folder: where to write.
        settings: the adapters' settings.
        base_model_name_or_path: the base model's Hub id or folder, for peft to find it.
        tokenizer_source: a folder whose tokenizer files to copy beside the adapter.
        state: the model's full state dict, when it is not ``model.state_dict()`` (a sharded
            model's, gathered).

    Raises:
        CheckpointError: a layer HF stores fused with others (Phi-3's q/k/v), which peft cannot
            name on the HF model.
    """
    family = family_of(model.config.hf_config)
    state = state if state is not None else model.state_dict()
    layers = _adapted_layers(state)
    fused = sorted({n.rsplit(".", 1)[-1] for n in layers} & set(family.fused_modules))
    if fused:
        raise CheckpointError(
            f"{model.config.hf_config['model_type']} stores {', '.join(fused)} fused with other "
            "projections, so a peft adapter cannot name them; adapt other layers (o_proj, "
            "down_proj) or save merged weights (checkpointer.save_merged=true)"
        )
    tensors = {}
    for name, tensor in state.items():
        if is_adapter_key(name):
            tensors[PEFT_PREFIX + llama_keys_to_hf(name)] = tensor.detach().contiguous().cpu()
    folder = Path(folder)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "use_rslora": settings.use_rslora,
        "use_dora": settings.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_source is not None:
        copy_tokenizer_files(tokenizer_source, folder)
    return folder


def read_adapter_settings(folder: str | Path) -> LoraSettings:
    """The :class:`LoraSettings` of a peft LoRA adapter folder."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}; is this a LoRA adapter folder?")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointError(f"{path}: per-layer ranks or alphas are not supported")
    return LoraSettings(
        rank=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        target_modules=config["target_modules"],
        use_rslora=config.get("use_rslora", False),
        use_dora=config.get("use_dora", False),
    )


def load_adapter(model: TransformerDecoder, folder: str | Path) -> LoraSettings:
    """Apply a peft LoRA adapter folder to ``model`` (adapters added, weights loaded).

    Raises:
        CheckpointError: no adapter in the folder, or its tensors do not fit the model.
    """
    settings = read_adapter_settings(folder)
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE}")
    apply_lora(model, settings)
    expected = adapter_state_dict(model)
    loaded: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(str(weights)).items():
        if not name.startswith(PEFT_PREFIX):
            continue
        ours = llama_keys_from_hf(name.removeprefix(PEFT_PREFIX)).replace(".default", "")
        if ours not in expected:
            raise CheckpointError(f"{weights}: tensor '{name}' does not fit this model")
        if tensor.shape != expected[ours].shape:
            raise CheckpointError(
                f"{weights}: tensor '{name}' has shape {tuple(tensor.shape)}, the model's is "
                f"{tuple(expected[ours].shape)}"
            )
        loaded[ours] = tensor
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise CheckpointError(f"{weights}: lacks {', '.join(missing[:3])}")
    model.load_state_dict(loaded, strict=False)
    return settings

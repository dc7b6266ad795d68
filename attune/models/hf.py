"""Building a decoder from a Hugging Face folder: its ``config.json`` and its weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from attune.checkpoint import iter_safetensors, weight_files
from attune.errors import CheckpointError
from attune.models.config import DecoderConfig
from attune.models.decoder import TransformerDecoder
from attune.models.families import family_of

# Old checkpoints store RoPE tables; the decoder computes its own.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder, as a dict.

    Raises:
        CheckpointError: the file is missing or not JSON.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {folder}; is it a Hugging Face model folder?")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def decoder_config(hf_config: dict[str, Any]) -> DecoderConfig:
    """The DecoderConfig for any supported family's ``config.json``."""
    return family_of(hf_config).config_from_hf(hf_config)


def from_hf_config(config: dict[str, Any] | str | Path) -> TransformerDecoder:
    """A randomly initialised decoder shaped by a ``config.json`` (a dict, file or folder)."""
    if not isinstance(config, dict):
        path = Path(config)
        config = read_hf_config(path if path.is_dir() else path.parent)
    return TransformerDecoder(decoder_config(config))


def from_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> TransformerDecoder:
    """Build the model a HF folder describes and load its weights.

    The model is built on the meta device and each tensor, memory-mapped from disk, is moved
    once into ``dtype`` on ``device``, so host memory stays near one copy of the weights.

    Raises:
        CheckpointError: no config or weights, an unsupported family, a corrupt file, a
            missing or unexpected tensor, or a shape mismatch (named, with both shapes).
    """
    hf_config = read_hf_config(path)
    family = family_of(hf_config)
    config = family.config_from_hf(hf_config)
    with torch.device("meta"):
        model = TransformerDecoder(config)
    expected = dict(model.state_dict(keep_vars=True))
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    loaded: dict[str, torch.Tensor] = {}
    for hf_name, file, tensor in iter_safetensors(weight_files(path)):
        if hf_name.endswith(_IGNORED_SUFFIXES):
            continue
        name = family.key_from_hf(hf_name)
        if config.tie_embeddings and name == "lm_head.weight":
            continue  # tied: the embedding is the output projection
        if name not in expected:
            raise CheckpointError(
                f"{file.name}: tensor '{hf_name}' does not belong to a "
                f"{hf_config['model_type']} model of this config"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{file.name}: tensor '{hf_name}' has shape {tuple(tensor.shape)}, but the "
                f"config makes it {tuple(expected[name].shape)}"
            )
        loaded[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        names = ", ".join(family.key_to_hf(n) for n in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: the weights lack {names}{more}")
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    model.rotary.inv_freq = torch.empty(0, device=device)
    model.rotary.reset_parameters()
    return model

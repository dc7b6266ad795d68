"""Checkpoints of random weights in Hugging Face's format, for benchmarks of any size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from attune.checkpoint import write_safetensors
from attune.models import from_hf_config
from attune.models.families import family_of


def write_random_checkpoint(
    folder: Path, hf_config: dict[str, Any], shard_mb: int = 5000, seed: int = 0
) -> int:
    """``config.json`` and safetensors shards of N(0, 0.02) weights in the config's
    ``torch_dtype`` (bf16 by default); returns the weights' size in bytes."""
    dtype = getattr(torch, hf_config.get("torch_dtype", "bfloat16"))
    with torch.device("meta"):
        model = from_hf_config(hf_config)
    generator = torch.Generator().manual_seed(seed)
    state = {
        name: (torch.randn(t.shape, generator=generator) * 0.02).to(dtype)
        for name, t in model.state_dict().items()
    }
    tensors = family_of(hf_config).state_to_hf(state, model.config)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, folder, max_shard_bytes=shard_mb * 10**6)
    (folder / "config.json").write_text(json.dumps(hf_config))
    return sum(t.numel() * t.element_size() for t in tensors.values())

"""A model over many processes with FSDP2: each decoder layer and the root sharded, weights
loaded straight into shards, the full state gathered for saving. The processes themselves (the
group, its teardown) are :mod:`attune.distributed`'s.

On one process none of this is used and the model is an ordinary module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from attune.distributed import World
from attune.errors import ConfigError
from attune.models import TransformerDecoder, load_weights
from attune.models.rope import RotaryEmbedding
from attune.peft import LoRAGroupedExperts, LoRALinear, LoraSettings, is_adapter_key


def shard_model(
    model: TransformerDecoder,
    world: World,
    compute_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> None:
    """FSDP2: shard each decoder layer, then the rest at the root.

    Args:
        model: the model (on the meta device, or materialized).
        world: the processes to shard over.
        compute_dtype: gather parameters in this dtype for the forward and backward passes
            (gradients are reduced in fp32); None keeps the parameters' dtype.
        cpu_offload: keep parameters, gradients and optimizer state on the CPU.
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    options = {
        "mesh": world.mesh,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None
        ),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    for layer in model.layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)


@contextlib.contextmanager
def unsharded_root(module: nn.Module) -> Iterator[None]:
    """Inside the block, a sharded model's root-level parameters (embedding, final norm,
    output head) are whole, so its head can run outside its forward pass; a collective on
    entry (every rank enters together). Nothing happens to a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _shard_of(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not hasattr(target, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    sharded: Any = target  # a DTensor: it has a mesh and placements
    return distribute_tensor(full, sharded.device_mesh, sharded.placements, src_data_rank=None)


@torch.no_grad()
def materialize(
    model: TransformerDecoder, device: torch.device, weights: str | Path, lora: LoraSettings | None
) -> None:
    """Give a model built on the meta device (and sharded) real storage on ``device``, load
    the HF folder ``weights`` into it shard by shard, and initialise any LoRA adapters exactly
    as on one device (the same full values, drawn in the same order, then sliced)."""
    if lora is not None and lora.quantize_base:
        raise ConfigError(
            "lora.quantize_base (QLoRA) runs on one process; for several, use plain LoRA with "
            "bf16 weights"
        )
    model.to_empty(device=device)
    load_weights(model, weights, ignore=is_adapter_key)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters(device)
        if isinstance(module, LoRALinear):
            a = torch.empty(module.lora_A.weight.shape, dtype=module.lora_A.weight.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            _local(module.lora_A.weight).copy_(_local(_shard_of(a, module.lora_A.weight)))
            _local(module.lora_B.weight).zero_()
            if module.lora_magnitude_vector is not None:
                # rows are sharded alike for the weight and its per-row magnitude
                norms = _local(module.weight).float().norm(dim=1)
                _local(module.lora_magnitude_vector).copy_(norms)
        if isinstance(module, LoRAGroupedExperts):  # a mixture of experts' expert adapters
            for name, full in module.initial_adapter().items():
                param = module.get_parameter(name)
                _local(param).copy_(_local(_shard_of(full.to(param.dtype), param)))


def full_state_dict(model: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the main process, on the CPU (an empty dict on the
    others). A collective: every process must call it."""
    if not world.distributed:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))

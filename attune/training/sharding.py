"""A model over many processes with FSDP2: each decoder layer and the root sharded, weights
loaded straight into shards, the full state gathered for saving; with expert parallelism, a
mixture of experts' experts split over the processes instead (:func:`split_experts`). The
processes themselves (the group, its teardown) are :mod:`attune.distributed`'s.

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
from attune.models.moe import ExpertParallel, GroupedExperts, sparse_blocks
from attune.models.rope import RotaryEmbedding
from attune.peft import LoRAGroupedExperts, LoRALinear, LoraSettings, is_adapter_key


def check_expert_parallel(
    model: nn.Module, processes: int, degree: int, cpu_offload: bool = False
) -> None:
    """Refuse, in one line, an ``expert_parallel_degree`` this run cannot have.

    Raises:
        ConfigError: the degree does not divide the number of processes, the model has no
            experts or a number that the processes do not divide, or CPU offload is on.
    """
    if degree == 1:
        return
    key = f"expert_parallel_degree={degree}"
    if processes == 1:
        raise ConfigError(
            f"{key} splits the experts over {degree} processes, and this run has one; launch "
            f"it with tune run --nproc_per_node {degree}, or set expert_parallel_degree=1"
        )
    if processes % degree:
        raise ConfigError(
            f"{key} does not divide this run's {processes} processes; choose a divisor of "
            f"{processes} (1 for none)"
        )
    experts = next((block.experts.num_experts for block in sparse_blocks(model)), None)
    if experts is None:
        raise ConfigError(
            f"{key}: the model has no mixture-of-experts layer to split; set "
            "expert_parallel_degree=1"
        )
    if experts % processes:
        raise ConfigError(
            f"{key}: the model's {experts} experts per layer do not split evenly over the "
            f"{processes} processes that store them; run on a number of processes that "
            f"divides {experts}"
        )
    if cpu_offload:
        raise ConfigError(
            f"{key} and cpu_offload=true do not go together yet; turn one of them off"
        )


def split_experts(model: nn.Module, world: World, degree: int) -> set[nn.Parameter]:
    """Expert parallelism: each mixture-of-experts layer's experts split over groups of
    ``degree`` processes, each process of a group running ``experts / degree`` of them on the
    rows the group's processes send it (:class:`~attune.models.moe.ExpertParallel`).

    Every expert parameter (adapters included) becomes a DTensor sharded on its first, expert,
    dimension over all the processes, as FSDP2 would shard it. With ``degree`` processes in
    all, a process's shard is its experts; with fewer (``processes = degree x replicas``), the
    processes ``j * replicas .. (j + 1) * replicas - 1`` hold between them group position
    ``j``'s experts and gather them for each forward pass. On disk and in the optimizer's
    state an expert tensor is thus the same ``Shard(0)`` DTensor as without expert
    parallelism: checkpoints resume on any number of processes and degree, and the tensors
    gathered whole export as every other.

    Returns:
        The split parameters, which FSDP2 must leave alone.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh, processes = world.mesh, world.world_size
    replica_group = None
    if degree == processes:
        group = mesh.get_group()
    else:  # rank j * replicas + i: position j in its expert group, i among its replicas
        groups = init_device_mesh(
            mesh.device_type, (degree, processes // degree),
            mesh_dim_names=("expert", "expert_replica"),
        )  # fmt: skip
        group, replica_group = groups.get_group("expert"), groups.get_group("expert_replica")
    # FSDP averages gradients over the processes; the experts' sum every process's tokens
    parallel = ExpertParallel(group, replica_group, gradient_scale=1 / processes)
    split: set[nn.Parameter] = set()
    for module in model.modules():
        if not isinstance(module, GroupedExperts):
            continue
        for name, param in list(module.named_parameters()):
            if param.is_meta:  # built on the meta device: only the shape matters
                rows = param.shape[0] // processes
                local = torch.empty((rows, *param.shape[1:]), dtype=param.dtype, device="meta")
                tensor = DTensor.from_local(
                    local, mesh, [Shard(0)], run_check=False, shape=param.shape,
                    stride=param.stride(),
                )  # fmt: skip
            else:
                tensor = distribute_tensor(param.detach(), mesh, [Shard(0)])
            owner_name, _, leaf = name.rpartition(".")
            sharded = nn.Parameter(tensor, requires_grad=param.requires_grad)
            setattr(module.get_submodule(owner_name), leaf, sharded)
            split.add(sharded)
        module.expert_parallel = parallel
    return split


def shard_model(
    model: TransformerDecoder,
    world: World,
    compute_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
    expert_parallel_degree: int = 1,
) -> None:
    """FSDP2: shard each decoder layer, then the rest at the root.

    Args:
        model: the model (on the meta device, or materialized).
        world: the processes to shard over.
        compute_dtype: gather parameters in this dtype for the forward and backward passes
            (gradients are reduced in fp32); None keeps the parameters' dtype.
        cpu_offload: keep parameters, gradients and optimizer state on the CPU.
        expert_parallel_degree: over how many processes to split a mixture of experts'
            experts (:func:`split_experts`; 1: none, FSDP2 shards them as the rest; else a
            divisor of the number of processes). Routers, attention and shared experts stay
            FSDP2's.

    Raises:
        ConfigError: the degree does not fit the run (:func:`check_expert_parallel`).
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
    check_expert_parallel(model, world.world_size, expert_parallel_degree, cpu_offload)
    if expert_parallel_degree > 1:
        options["ignored_params"] = split_experts(model, world, expert_parallel_degree)
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

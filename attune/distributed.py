"""The processes of a run and the reductions across them, device-agnostic: the ground floor
every layer that joins the process group, sums, averages or agrees across ranks goes through.

Launched by torchrun (``tune run --nproc_per_node N ...``), every process runs the same recipe
and joins the group (:func:`init_world`); alone, a process joins nothing.

On one process (no process group, or a group of one) every function returns its input as it
is, so the same code runs on one device and under torchrun. Tensors are reduced on the device
the backend needs (the current accelerator for NCCL, the CPU for gloo) and come back on the
device they came from.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """How many processes share the run (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def collective_device() -> torch.device:
    """Where the default group's backend reduces tensors: the current accelerator for NCCL
    (and other device backends), the CPU for gloo."""
    backend = dist.get_backend()
    if backend == "gloo":
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        return torch.device("cpu")
    # torch 2.6 names it current_device_idx; later releases current_device_index
    index = getattr(torch.accelerator, "current_device_index", None)
    index = index or torch.accelerator.current_device_idx
    return torch.device(accelerator.type, index())


def all_ranks_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every process, on its own device (itself on one process)."""
    return _reduced(tensor, dist.ReduceOp.SUM)


def all_ranks_max(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s elementwise maximum over every process (itself on one process)."""
    return _reduced(tensor, dist.ReduceOp.MAX)


def _reduced(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    if not is_distributed():
        return tensor
    where = collective_device()
    reduced = tensor.detach().to(where, copy=True)
    dist.all_reduce(reduced, op=op)
    return reduced.to(tensor.device)


def all_ranks_sums(values: Sequence[int | float]) -> list:
    """Numbers each summed over every process, in one collective (themselves on one process):
    integers stay exact integers when they all are, else every sum is a float (float64)."""
    if not is_distributed():
        return list(values)
    exact = all(isinstance(value, int) and not isinstance(value, bool) for value in values)
    totals = torch.tensor(list(values), dtype=torch.long if exact else torch.float64)
    return all_ranks_sum(totals).tolist()


def every_rank(value: Any) -> list[Any]:
    """``value`` from every process, in rank order (``[value]`` on one process): plain data
    this run made itself (lists of numbers and token ids), a collective every process calls."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective: every process must ask)."""
    if not is_distributed():
        return bool(flag)
    return bool(all_ranks_max(torch.tensor([int(flag)])).item())


@dataclass
class World:
    """This process among the data-parallel processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: Any = None  # a 1-D DeviceMesh when distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (a collective: every process must ask)."""
        return any_rank(flag)


def init_world(device_type: str) -> World:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); one process alone
    joins nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World()
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    mesh = init_device_mesh(device_type, (world_size,))
    return World(dist.get_rank(), world_size, local_rank, mesh)


def shutdown(world: World) -> None:
    """Leave the process group. Every rank first waits for the others, so no collective is in
    flight while the group is torn down (a gloo group destroyed mid-collective, or left to the
    interpreter's exit, can abort the process)."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

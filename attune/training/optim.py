"""Optimizers from a config component, and learning-rate schedules with warmup.

Any ``torch.optim`` optimizer (or another class taking ``params`` first) is a config component::

    optimizer:
      _component_: torch.optim.AdamW
      lr: 2e-5
      weight_decay: 0.01

When the config sets neither ``fused`` nor ``foreach`` and the optimizer has a fused kernel for
the parameters' device, the fused one is used (one kernel per step instead of one per tensor).
For parameters sharded by FSDP2 (DTensors) only Adam's and AdamW's fused kernels are used: the
others (SGD, Adagrad) have no DTensor rule in torch 2.13 and would fail at the first step.

A schedule is a component too; the recipe passes the optimizer and the number of steps::

    lr_scheduler:
      _component_: attune.training.cosine_with_warmup
      num_warmup_steps: 100
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from attune.config import Expects, import_component, instantiate

OPTIMIZER = Expects(
    "an optimizer (a class taking the parameters first, with step() and zero_grad(), such as "
    "torch.optim.AdamW)",
    attributes=("step", "zero_grad"),
    minimums={"lr": 0.0, "weight_decay": 0.0},
)
"""What the ``optimizer`` slot takes."""

# fused kernels with a DTensor sharding rule (torch 2.13)
_FUSED_ON_DTENSORS = (torch.optim.Adam, torch.optim.AdamW)


def build_optimizer(node: Mapping[str, Any], params: Iterable[torch.nn.Parameter]) -> Any:
    """Instantiate the ``optimizer`` component over ``params``, fused where it can be."""
    params = list(params)
    extra: dict[str, Any] = {}
    optimizer_class = import_component(node["_component_"])
    try:
        accepted = inspect.signature(optimizer_class).parameters
    except (TypeError, ValueError):
        accepted = {}
    devices = {param.device.type for param in params}
    if (
        "fused" in accepted
        and "fused" not in node
        and "foreach" not in node
        and devices <= {"cuda", "cpu"}
        and all(param.dtype.is_floating_point for param in params)
        and (
            optimizer_class in _FUSED_ON_DTENSORS
            or not any(isinstance(param, DTensor) for param in params)
        )
    ):
        extra["fused"] = True
    return instantiate(node, params, **extra)


def _warmup(step: int, num_warmup_steps: int) -> float | None:
    if step < num_warmup_steps:
        return (step + 1) / (num_warmup_steps + 1)
    return None


def _decayed(
    shape: Callable[[float], float],
    step: int,
    num_warmup_steps: int,
    num_training_steps: int,
    min_lr_ratio: float,
):
    """Warmup, then ``shape(progress)`` (1 -> 0 over the rest) scaled into [min_lr_ratio, 1]."""
    warm = _warmup(step, num_warmup_steps)
    if warm is not None:
        return warm
    progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape(min(progress, 1.0))


def _cosine_shape(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _linear_shape(progress: float) -> float:
    return 1.0 - progress


def _constant(step: int, num_warmup_steps: int) -> float:
    warm = _warmup(step, num_warmup_steps)
    return 1.0 if warm is None else warm


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup over ``num_warmup_steps``, then a half cosine down to
    ``min_lr_ratio`` times the optimizer's learning rate at ``num_training_steps``."""
    return LambdaLR(
        optimizer,
        functools.partial(
            _decayed,
            _cosine_shape,
            num_warmup_steps=num_warmup_steps,
            num_training_steps=num_training_steps,
            min_lr_ratio=min_lr_ratio,
        ),
    )


def linear_with_warmup(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup, then a straight line down to ``min_lr_ratio`` of the learning rate."""
    return LambdaLR(
        optimizer,
        functools.partial(
            _decayed,
            _linear_shape,
            num_warmup_steps=num_warmup_steps,
            num_training_steps=num_training_steps,
            min_lr_ratio=min_lr_ratio,
        ),
    )


def constant_with_warmup(
    optimizer: torch.optim.Optimizer, num_training_steps: int, num_warmup_steps: int = 0
) -> LambdaLR:
    """Linear warmup, then the optimizer's learning rate unchanged."""
    del num_training_steps  # the same signature as the other schedules
    return LambdaLR(optimizer, functools.partial(_constant, num_warmup_steps=num_warmup_steps))

"""Optimizers from a config component, and learning-rate schedules with warmup.

Any ``torch.optim`` optimizer (or another class taking ``params`` first) is a config component::

    optimizer:
      _component_: torch.optim.AdamW
      lr: 2e-5
      weight_decay: 0.01

With a non-zero ``weight_decay``, biases and norm weights are not decayed, as transformers'
``Trainer`` does (``Trainer.get_decay_parameter_names``): a parameter whose lowercased name
contains ``bias``, ``layernorm`` or ``rmsnorm``, has a part named ``norm`` or ending in ``_norm``
(attune's RMSNorms: ``input_layernorm``, ``post_attention_layernorm``, the Gemma sandwich norms,
``q_norm``/``k_norm`` and the final ``norm``) goes in a second group with ``weight_decay: 0``;
everything else decays, LoRA's and DoRA's 1-D magnitude vectors included (transformers decays
them too). The rule reads names only: transformers also spares ``nn.LayerNorm`` modules by type
whatever their names, which attune's models do not use. One key of the optimizer node, read here and not passed to the optimizer, turns it
off::

    optimizer:
      _component_: torch.optim.AdamW
      weight_decay: 0.01
      decay_norms_and_biases: true   # one group: every tensor decays (default false)

With ``weight_decay`` zero, or nothing excluded, there is one group, as before. The split needs
the parameters' names: :func:`build_optimizer` takes ``(name, parameter)`` pairs
(``model.named_parameters()``); given bare parameters, every tensor decays.

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
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from attune.config import Expects, import_component, instantiate
from attune.errors import ConfigError

OPTIMIZER = Expects(
    "an optimizer (a class taking the parameters first, with step() and zero_grad(), such as "
    "torch.optim.AdamW)",
    attributes=("step", "zero_grad"),
    minimums={"lr": 0.0, "weight_decay": 0.0},
    own_keys=("decay_norms_and_biases",),
)
"""What the ``optimizer`` slot takes."""

# fused kernels with a DTensor sharding rule (torch 2.13)
_FUSED_ON_DTENSORS = (torch.optim.Adam, torch.optim.AdamW)


DECAY_NORMS_AND_BIASES = "decay_norms_and_biases"
"""The optimizer node's key that makes biases and norm weights decay too (default false)."""

# transformers' Trainer.get_decay_parameter_names (5.x), on lowercased names
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")

Params = Iterable[torch.nn.Parameter] | Iterable[tuple[str, torch.nn.Parameter]]


def decays(name: str) -> bool:
    """Whether weight decay applies to the parameter called ``name``: not to biases and norm
    weights (transformers' rule, on the name alone)."""
    return _NO_DECAY.search(name.lower()) is None


def build_optimizer(node: Mapping[str, Any], params: Params) -> Any:
    """Instantiate the ``optimizer`` component over ``params``, fused where it can be.

    ``params`` are parameters, or ``(name, parameter)`` pairs such as
    ``model.named_parameters()``; with names and a non-zero ``weight_decay``, biases and norm
    weights get a group of their own without decay unless the node sets
    ``decay_norms_and_biases: true`` (see the module's docstring).
    """
    items: list[Any] = list(params)
    named = [item for item in items if isinstance(item, tuple)]
    if named and len(named) != len(items):
        raise TypeError("build_optimizer: give parameters or (name, parameter) pairs, not both")
    flat = [param for _, param in named] if named else items
    decay_all = node.get(DECAY_NORMS_AND_BIASES, False)
    if not isinstance(decay_all, bool):
        raise ConfigError(
            f"optimizer.{DECAY_NORMS_AND_BIASES}: expected true or false, got {decay_all!r}"
        )
    if DECAY_NORMS_AND_BIASES in node:
        node = _without(node, DECAY_NORMS_AND_BIASES)
    extra: dict[str, Any] = {}
    optimizer_class = import_component(node["_component_"])
    accepted: Mapping[str, inspect.Parameter]
    try:
        accepted = inspect.signature(optimizer_class).parameters
    except (TypeError, ValueError):
        accepted = {}
    devices = {param.device.type for param in flat}
    if (
        "fused" in accepted
        and "fused" not in node
        and "foreach" not in node
        and devices <= {"cuda", "cpu"}
        and all(param.dtype.is_floating_point for param in flat)
        and (
            optimizer_class in _FUSED_ON_DTENSORS
            or not any(isinstance(param, DTensor) for param in flat)
        )
    ):
        extra["fused"] = True
    groups: list[Any] = flat
    default = accepted["weight_decay"].default if "weight_decay" in accepted else 0.0
    if default is inspect.Parameter.empty:
        default = 0.0
    if named and not decay_all and node.get("weight_decay", default):
        decayed = [param for name, param in named if decays(name)]
        kept = [param for name, param in named if not decays(name)]
        if kept:
            groups = [{"params": kept, "weight_decay": 0.0}]
            if decayed:
                groups.insert(0, {"params": decayed})
    return instantiate(node, groups, **extra)


def _without(node: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``node`` less ``key``; a DictConfig stays one at its place in the config (so that
    messages name it and interpolations resolve), without changing the config."""
    if isinstance(node, DictConfig):
        content = {k: v for k, v in node.items_ex(resolve=False) if k != key}
        return DictConfig(content, key=node._key(), parent=node._get_parent())
    return {k: v for k, v in node.items() if k != key}


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

"""Device, dtype, autocast, seeds and random-number state: the run's physical setting."""

from __future__ import annotations

import contextlib
import random
import resource
import sys
from typing import Any

import numpy as np
import torch

from attune.errors import ConfigError
from attune.suggest import did_you_mean

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Under torchrun, ``cuda`` means this process's GPU (``cuda:<local rank>``).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: '{name}' is not a device (use auto, cpu or cuda)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda was asked for, but this machine has no GPU")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """A dtype from its config name (``fp32``, ``bf16``, ``fp16`` or the torch names)."""
    if name not in DTYPES:
        hint = did_you_mean(str(name), DTYPES)
        raise ConfigError(f"dtype: unknown '{name}'{hint} (use fp32 or bf16)")
    return DTYPES[name]


def autocast(device: torch.device, dtype_name: str | None) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass: None (off) or a dtype name such as ``bf16``."""
    if dtype_name is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=resolve_dtype(dtype_name))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The state of the generators training draws from (Python's and torch's), for an exact
    resume; it holds only tensors and plain values, so it loads with ``weights_only=True``."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(_as_python_state(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state: Any) -> tuple:
    # a saved tuple may come back as lists; random.setstate wants the nested tuple
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def peak_memory_gb(device: torch.device) -> float:
    """The most memory used so far: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def state_memory_gb(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """This process's memory for parameters, gradients and optimizer state (its shards, when
    the model is sharded), in GiB. Gradients count as the trainable parameters' size, which a
    step holds between the backward pass and the optimizer (they are freed after it)."""

    def local_bytes(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return local.numel() * local.element_size()

    total = 0
    for param in model.parameters():
        total += local_bytes(param) * (2 if param.requires_grad else 1)
    for state in optimizer.state.values():
        total += sum(local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total / 2**30

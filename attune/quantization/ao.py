"""Every call attune makes into torchao, in one place.

torchao's API moves from release to release (module paths, config classes, packing formats),
so nothing else in attune imports it: a new torchao is one edit here. The tested range is
pinned in ``pyproject.toml``.

What is used, and why these pieces:

- QAT: ``QATConfig(base_config, step="prepare")`` swaps ``nn.Linear`` / ``nn.Embedding`` for
  torchao's fake-quantized twins (same parameter names, so checkpoints keep their keys); the
  fake quantizers are ``FakeQuantizerBase`` modules with an ``enabled`` switch.
- Quantization (PTQ, and QAT's convert, which quantizes with the numerics the fake quantizers
  imitated): ``quantize_`` with the ``Intx*`` configs (int1 to int8 weights, optionally int8
  dynamic activations), whose ``IntxUnpackedToInt8Tensor`` weights run on any device (the
  packed ``Int4WeightOnlyConfig`` needs CUDA-only kernels).
- Serialisation: torchao's safetensors flattening, the format transformers' ``TorchAoConfig``
  writes and reads, so an exported folder loads in transformers as it is.
- NF4 for QLoRA's frozen base weights.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn

# Loggers that print a line per CUDA-only kernel library a CPU build cannot load, and a
# deprecation note from torch's pytree on torchao's enums: noise for a user, not a problem.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="torchao")
            warnings.filterwarnings("ignore", message=".*(torchao|cpp extensions|CUDA).*")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _quietly(function: Callable) -> Callable:
    """Run ``function`` with torchao's noise filtered: torchao imports some modules lazily,
    and each first import may print again."""

    @functools.wraps(function)
    def quiet(*args: Any, **kwargs: Any) -> Any:
        with _quiet():
            return function(*args, **kwargs)

    return quiet


@_quietly
def _torchao() -> Any:
    import torchao
    import torchao.quantization
    import torchao.quantization.qat

    return torchao


# Base configs ------------------------------------------------------------------------------


@_quietly
def linear_config(bits: int, dynamic_activations: bool, group_size: int | None) -> Any:
    """torchao's config for a linear layer's weights.

    Args:
        bits: the weights' integer width (1 to 8), symmetric.
        dynamic_activations: also quantize the layer's input to int8, per token, at run time.
        group_size: values per quantization group along the input dimension (None: one
            group per output channel).
    """
    ao = _torchao().quantization
    from torchao.quantization.granularity import PerAxis, PerGroup

    granularity = PerGroup(group_size) if group_size is not None else PerAxis(0)
    dtype = getattr(torch, f"int{bits}")
    if dynamic_activations:
        return ao.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=dtype, weight_granularity=granularity
        )
    return ao.IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


# QAT ----------------------------------------------------------------------------------------

FilterFn = Callable[[nn.Module, str], bool]


@_quietly
def insert_fake_quantization(model: nn.Module, base_config: Any, filter_fn: FilterFn) -> None:
    """Swap the modules ``filter_fn`` picks (``nn.Linear`` or ``nn.Embedding``) for torchao's
    fake-quantized twins imitating ``base_config``; parameters keep their names."""
    ao = _torchao().quantization
    ao.quantize_(model, ao.qat.QATConfig(base_config, step="prepare"), filter_fn=filter_fn)


@_quietly
def fake_quantizers(base_config: Any) -> tuple[nn.Module | None, nn.Module]:
    """Standalone fake quantizers for one linear layer under ``base_config``: the
    activations' (None for weight-only schemes) and the weight's. For layers torchao does not
    know (LoRA's), which apply them themselves."""
    probe = nn.Linear(base_config_group(base_config), 1, bias=False, device="meta")
    holder = nn.Sequential(probe)
    insert_fake_quantization(
        holder, base_config, lambda module, name: isinstance(module, nn.Linear)
    )
    swapped = holder[0]
    # casts: torchao's fake-quantized linear sets these attributes, which nn.Module's typing
    # cannot see
    return (
        cast("nn.Module | None", swapped.activation_fake_quantizer),
        cast(nn.Module, swapped.weight_fake_quantizer),
    )


def base_config_group(base_config: Any) -> int:
    """An input width any group size of ``base_config`` divides (for a probe layer)."""
    granularity = getattr(base_config, "weight_granularity", None) or getattr(
        base_config, "granularity", None
    )
    return getattr(granularity, "group_size", None) or 1


def set_fake_quantization(model: nn.Module, enabled: bool) -> int:
    """Switch every fake quantizer in ``model`` on or off; returns how many there are."""
    base = _torchao().quantization.qat.FakeQuantizerBase
    count = 0
    for module in model.modules():
        if isinstance(module, base):
            module.enabled = enabled
            count += 1
    return count


# Quantization and serialisation -------------------------------------------------------------


@_quietly
def quantize_weight(weight: torch.Tensor, config: Any) -> torch.Tensor:
    """``weight`` (``[out, in]``) quantized as a linear layer's under ``config``: a torchao
    tensor that ``F.linear`` (and ``F.embedding``, for weight-only configs) runs on."""
    ao = _torchao().quantization
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    ao.quantize_(layer, config, filter_fn=lambda module, name: True)
    return layer.weight.detach()


@_quietly
def flatten_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Quantized tensors as plain tensors plus the metadata that rebuilds them (torchao's
    safetensors layout, which transformers reads)."""
    _torchao()
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    plain = {name: tensor.detach() for name, tensor in state.items()}
    return flatten_tensor_state_dict(plain)


@_quietly
def unflatten_state(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flatten_state`: quantized tensors rebuilt from their parts.

    Raises:
        ValueError: the metadata is not torchao's, or a tensor's parts are missing.
    """
    _torchao()
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    from torchao.prototype.safetensors.safetensors_utils import is_metadata_torchao

    if not is_metadata_torchao(metadata):
        raise ValueError("the safetensors metadata is not torchao's")
    rebuilt, leftover = unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise ValueError(f"tensors without metadata: {', '.join(sorted(leftover)[:3])}")
    return rebuilt


@_quietly
def config_dict(config: Any) -> dict[str, Any]:
    """A torchao config as the JSON transformers' ``TorchAoConfig`` keeps in ``config.json``."""
    _torchao()
    from torchao.core.config import config_to_dict

    return config_to_dict(config)


@_quietly
def per_module_config(per_module: dict[str, Any], default: Any) -> Any:
    """Configs for named modules and ``default`` for every other one (``FqnToConfig``, whose
    first matching key wins)."""
    ao = _torchao().quantization
    return ao.FqnToConfig({**per_module, "re:.*": default})


# NF4 (QLoRA) --------------------------------------------------------------------------------


@_quietly
def to_nf4(weight: torch.Tensor, block_size: int, scaler_block_size: int) -> torch.Tensor:
    """``weight`` in 4-bit NormalFloat, blocks of ``block_size`` values with double-quantized
    scales in blocks of ``scaler_block_size``."""
    _torchao()
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4 as nf4

    return nf4(weight, block_size, scaler_block_size)


def linear_nf4(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` with an NF4 weight, dequantized on the fly in ``x``'s dtype."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4 as linear

    return linear(input=x, weight=weight)

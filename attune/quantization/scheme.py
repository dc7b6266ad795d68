"""What to quantize and how: the ``quantization`` config component, and fake quantization of a
decoder for quantization-aware training.

Schemes (torchao's numerics, the same in QAT's fake quantization and in the converted model):

========================  ==========================================================
``8da4w``                 int8 dynamic per-token activations, int4 symmetric weights
                          in groups of ``group_size`` input values (default 32; None
                          for one group per output channel)
``int4_weight_only``      int4 symmetric weights in groups, activations as they are
``int8_weight_only``      int8 symmetric weights in groups
========================  ==========================================================

Other widths follow the same names, ``8da<b>w`` and ``int<b>_weight_only`` for 1 to 8 bits
(``8da2w``, ``int3_weight_only``): torchao's integer formats cover them all.

Every linear layer of the decoder is quantized; the output head (``lm_head``) is kept in full
precision unless ``output`` is set, as is usual (it is the most sensitive layer), and the
embedding table only when ``embedding`` is set (weight-only, at the scheme's width). A model whose output
head is its embedding matrix (tied) shares one tensor: it follows ``embedding``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, cast

from torch import nn

from attune.errors import ConfigError
from attune.quantization import ao

SCHEMES = ("8da4w", "int4_weight_only", "int8_weight_only")
_SCHEME_PATTERN = re.compile(r"(?:8da(?P<dynamic>[1-8])w|int(?P<weight_only>[1-8])_weight_only)")
OUTPUT_NAMES = ("lm_head", "score")
# adapters train in full precision: they are folded into the base weights before quantizing
ADAPTER_NAMES = ("lora_A", "lora_B")


@dataclass
class QuantizationScheme:
    """The ``quantization`` component: a scheme and the layers it covers.

    Args:
        scheme: ``8da4w``, ``int4_weight_only`` or ``int8_weight_only``.
        group_size: input values per weight quantization group (smaller groups: more scales,
            less error); None for one group per output channel.
        embedding: also quantize the embedding table (weight-only).
        output: also quantize the output head (``lm_head``).
    """

    scheme: str = "8da4w"
    group_size: int | None = 32
    embedding: bool = False
    output: bool = False
    bits: int = field(init=False)
    dynamic_activations: bool = field(init=False)

    def __post_init__(self) -> None:
        match = _SCHEME_PATTERN.fullmatch(str(self.scheme))
        if match is None:
            raise ConfigError(
                f"quantization.scheme: '{self.scheme}' is not one of {', '.join(SCHEMES)} "
                "(or another width: 8da<bits>w, int<bits>_weight_only, bits 1 to 8)"
            )
        self.dynamic_activations = match["dynamic"] is not None
        self.bits = int(match["dynamic"] or match["weight_only"])
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(
                f"quantization.group_size must be a positive integer, got {self.group_size}"
            )

    def linear_config(self) -> Any:
        """torchao's config for the linear layers."""
        return ao.linear_config(self.bits, self.dynamic_activations, self.group_size)

    def embedding_config(self) -> Any:
        """torchao's config for the embedding table: weight-only (a lookup has no
        activations to quantize), at the scheme's width."""
        return ao.linear_config(self.bits, False, self.group_size)

    def describe(self) -> str:
        groups = f"groups of {self.group_size}" if self.group_size else "per channel"
        extra = [
            name for name, on in (("embedding", self.embedding), ("output", self.output)) if on
        ]
        also = f", also {' and '.join(extra)}" if extra else ""
        return f"{self.scheme} ({groups}{also})"

    def check_fits(self, model: nn.Module) -> None:
        """Raise a one-line error if a layer to quantize does not split into whole groups.

        Raises:
            ConfigError: names the layer, its width and the group size.
        """
        if self.group_size is None:
            return
        tied = bool(getattr(model, "ties_embeddings", False))
        for name, module in model.named_modules():
            width = _quantized_width(module, name, self, tied)
            if width is not None and width % self.group_size:
                raise ConfigError(
                    f"quantization.group_size={self.group_size} does not divide the "
                    f"{width} inputs of layer '{name}'; pick a divisor of {width}"
                )


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _quantized_width(
    module: nn.Module, name: str, scheme: QuantizationScheme, tied: bool
) -> int | None:
    """The grouped width of a layer the scheme quantizes, or None if it is left alone. A head
    tied to the embedding is the embedding's tensor: it is quantized as the embedding (at
    export), never as a linear layer of its own."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim if scheme.embedding else None
    if _leaf(name) in ADAPTER_NAMES:
        return None
    if _leaf(name) in OUTPUT_NAMES and (tied or not scheme.output):
        return None
    if isinstance(module, nn.Linear) or _applies_its_own(module):
        # cast: the layers that apply their own quantization (LoRA's) carry in_features too,
        # which nn.Module's typing cannot see
        return cast(int, module.in_features)
    return None


def insert_fake_quantization(model: nn.Module, scheme: QuantizationScheme) -> None:
    """Prepare ``model`` for quantization-aware training: every layer the scheme covers
    computes with fake-quantized weights (and activations, for ``8da4w``) in the forward pass
    and straight-through gradients in the backward pass. Parameter names do not change.

    LoRA layers fake-quantize their frozen base weight (and their input); the adapters train
    in full precision. Call it before sharding the model, on any device (meta included).

    Raises:
        ConfigError: the group size does not divide a layer's width.
    """
    scheme.check_fits(model)
    base = scheme.linear_config()
    tied = bool(getattr(model, "ties_embeddings", False))

    def covered(module: nn.Module, name: str) -> bool:
        return _quantized_width(module, name, scheme, tied) is not None

    ao.insert_fake_quantization(
        model, base, lambda module, name: type(module) is nn.Linear and covered(module, name)
    )
    for name, module in model.named_modules():
        # layers of our own that apply fake quantizers themselves (LoRA's)
        if _applies_its_own(module) and covered(module, name):
            module.activation_fake_quantizer, module.weight_fake_quantizer = ao.fake_quantizers(
                base
            )
    if scheme.embedding:
        ao.insert_fake_quantization(
            model, scheme.embedding_config(), lambda module, name: type(module) is nn.Embedding
        )
    tie_again = getattr(model, "tie_weights", None)
    if tie_again is not None:
        tie_again()  # the swapped embedding holds the same parameter; keep the head on it


def _applies_its_own(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear) and hasattr(module, "weight_fake_quantizer")


def set_fake_quantization(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on or off (QAT may start after some full-precision steps)."""
    ao.set_fake_quantization(model, enabled)

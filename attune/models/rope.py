"""Rotary position embeddings, with the scaling variants HF checkpoints use.

The rotation pairs dimension ``i`` with ``i + head_dim / 2`` ("rotate half"), as HF's
implementation does, so HF query/key weights load with no permutation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None = None
) -> torch.Tensor:
    """The per-pair rotation speeds, ``[head_dim // 2]``, after any scaling.

    Args:
        head_dim: width of one attention head.
        theta: the RoPE base.
        scaling: HF ``rope_scaling`` parameters: ``linear`` divides the speeds by ``factor``;
            ``llama3`` slows only the low frequencies, smoothly, as Llama 3.1 does.

    Raises:
        ValueError: a scaling type this module does not implement.
    """
    # float32, as HF computes it, so the angles match to the last bit
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(
        f"RoPE scaling type '{rope_type}' is not supported (supported: "
        f"{', '.join(SUPPORTED_ROPE_TYPES)})"
    )


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions.

    Args:
        head_dim: width of one attention head.
        theta: the RoPE base.
        scaling: HF ``rope_scaling`` parameters, or None.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.register_buffer(
            "inv_freq", rope_inverse_frequencies(head_dim, theta, scaling), persistent=False
        )

    def reset_parameters(self) -> None:
        """Recompute the table (after the module was built on the meta device)."""
        self.inv_freq = rope_inverse_frequencies(self.head_dim, self.theta, self.scaling).to(
            self.inv_freq.device
        )

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            positions: ``[batch, seq]`` integer positions.

        Returns:
            ``(cos, sin)``, each ``[batch, seq, head_dim]`` in float32.
        """
        angles = positions.float()[..., None] * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[batch, heads, seq, head_dim]``) by the tables from :class:`RotaryEmbedding`."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + _rotate_half(x) * sin

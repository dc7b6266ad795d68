"""Rotary position embeddings, with the scaling variants HF checkpoints use.

The rotation pairs dimension ``i`` with ``i + head_dim / 2`` ("rotate half"), as HF's
implementation does, so HF query/key weights load with no permutation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None = None
) -> torch.Tensor:
    """The per-pair rotation speeds, ``[head_dim // 2]``, after any scaling.

    Args:
        head_dim: width of one attention head.
        theta: the RoPE base.
        scaling: HF ``rope_scaling`` parameters: ``linear`` divides the speeds by ``factor``;
            ``llama3`` slows only the low frequencies, smoothly, as Llama 3.1 does;
            ``longrope`` (Phi-3) divides them by per-pair ``short_factor`` values here;
            ``dynamic`` (NTK) leaves them as they are up to ``max_position_embeddings``.

    Raises:
        ValueError: a scaling type this module does not implement.
    """
    # float32, as HF computes it, so the angles match to the last bit
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in ("default", "dynamic"):  # dynamic changes only past the trained length
        return inv_freq
    assert scaling is not None  # any other type was read from the scaling parameters
    if rope_type == "longrope":  # the short factors; RotaryEmbedding switches to the long ones
        return inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float32)
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
        rotary_dim: how many leading dimensions of each head rotate (the head width, or a
            fraction of it with a partial rotary factor).
        theta: the RoPE base.
        scaling: HF ``rope_scaling`` parameters, or None. With ``longrope``, positions past
            ``original_max_position_embeddings`` switch the whole pass to the long factors,
            and cos/sin are scaled by the attention factor, as HF does. With ``dynamic``,
            positions past ``max_position_embeddings`` raise the base for the whole pass.
    """

    inv_freq: torch.Tensor
    long_inv_freq: torch.Tensor

    def __init__(self, rotary_dim: int, theta: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.scaling = scaling
        self.longrope = (scaling or {}).get("rope_type") == "longrope"
        self.dynamic = (scaling or {}).get("rope_type") == "dynamic"
        self.register_buffer("inv_freq", torch.empty(rotary_dim // 2), persistent=False)
        self.register_buffer("long_inv_freq", torch.empty(rotary_dim // 2), persistent=False)
        self.attention_factor = 1.0
        self.reset_parameters()

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """Compute the tables, on ``device`` (after the module was built on the meta device)."""
        device = device if device is not None else self.inv_freq.device
        self.long_inv_freq = torch.empty(0, device=device)
        self.inv_freq = rope_inverse_frequencies(self.rotary_dim, self.theta, self.scaling).to(
            device
        )
        if self.longrope:
            scaling = self.scaling
            assert scaling is not None  # longrope was read from it
            long = {**scaling, "short_factor": scaling["long_factor"]}
            self.long_inv_freq = rope_inverse_frequencies(self.rotary_dim, self.theta, long).to(
                device
            )
            factor = scaling.get("factor") or (
                scaling["max_position_embeddings"] / scaling["original_max_position_embeddings"]
            )
            attention_factor = scaling.get("attention_factor")
            if attention_factor is None:
                original = scaling["original_max_position_embeddings"]
                attention_factor = (
                    1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
                )
            self.attention_factor = attention_factor

    def _dynamic_inverse_frequencies(self, seq_len: int) -> torch.Tensor:
        scaling = self.scaling
        assert scaling is not None  # dynamic was read from it
        base = _dynamic_ntk_base(
            self.theta,
            self.rotary_dim,
            seq_len,
            scaling["factor"],
            scaling["max_position_embeddings"],
        )
        return rope_inverse_frequencies(self.rotary_dim, base)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            positions: ``[batch, seq]`` integer positions.

        Returns:
            ``(cos, sin)``, each ``[batch, seq, rotary_dim]`` in float32.
        """
        inv_freq = self.inv_freq
        if self.longrope or self.dynamic:
            scaling = self.scaling
            assert scaling is not None  # longrope and dynamic were read from it
            seq_len = int(positions.max()) + 1
            if self.longrope and seq_len > scaling["original_max_position_embeddings"]:
                inv_freq = self.long_inv_freq
            if self.dynamic and seq_len > scaling["max_position_embeddings"]:
                inv_freq = self._dynamic_inverse_frequencies(seq_len).to(inv_freq.device)
        angles = positions.float()[..., None] * inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def _dynamic_ntk_base(theta: float, dim: int, seq_len: int, factor: float, trained: int) -> float:
    """Dynamic NTK scaling: the RoPE base for a pass reaching ``seq_len`` positions."""
    return theta * ((factor * seq_len / trained) - (factor - 1)) ** (dim / (dim - 2))


class _RotateHalf(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin`` (float32) in three passes over ``x`` (two of them over halves)
    where autograd's composition takes five (a negation, a ``cat``, two products and a sum),
    and its backward, the rotation transposed, likewise in place; nothing of ``x`` is kept
    for the backward pass. On a 2-core CPU RoPE took ~4.5% of a LoRA step (measured by
    removing it); this halves that.

    The tables repeat their first half (:class:`RotaryEmbedding` concatenates the angles with
    themselves), so the sine's first half serves both halves of the rotation.

    Shapes: ``x`` ``[batch, heads, seq, dim]``; ``cos``, ``sin`` ``[batch, 1, seq, dim]`` ->
    ``[batch, heads, seq, dim]``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        sin_half = sin[..., :half]
        ctx.save_for_backward(cos, sin_half)
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin_half, value=-1)
        out[..., half:].addcmul_(x[..., :half], sin_half)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin_half = ctx.saved_tensors
        half = grad.shape[-1] // 2
        grad_x = grad * cos
        grad_x[..., :half].addcmul_(grad[..., half:], sin_half)
        grad_x[..., half:].addcmul_(grad[..., :half], sin_half, value=-1)
        return grad_x, None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[batch, heads, seq, head_dim]``) by the tables from :class:`RotaryEmbedding`;
    with partial rotary, dimensions past the tables' width pass through unrotated."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    if x.dtype == torch.float32:
        rotated = _RotateHalf.apply(rotated, cos, sin)
    else:  # HF's composition, rounded as HF rounds it in half precision
        first, second = rotated.chunk(2, dim=-1)
        rotated = rotated * cos + torch.cat((-second, first), dim=-1) * sin
    return rotated if passed.shape[-1] == 0 else torch.cat((rotated, passed), dim=-1)

"""Scaled-dot-product attention on the CPU in bf16/fp16: which precision, which shapes.

PyTorch's CPU flash-attention backward in bf16/fp16 keeps memory for every new sequence length
it sees (about 5 MB each, measured on torch 2.13: 400 random lengths grew a process by 1.6 GB),
so a fine-tuning run on packed documents or batches padded to their longest row grows step after
step. Two remedies, chosen by the CPU:

- Without AMX (bf16 matrix tiles), the reduced-precision kernel is also slower than float32
  (measured on AVX-512 with avx512_bf16: 13-15 ms against 8 ms per forward and backward of
  random lengths), so attention runs in float32 (:func:`compute_dtype`): faster, no growth,
  and more exact. Inputs are cast up and the output back down.
- With AMX, the bf16 kernel is the fast one, and lengths are padded up to a multiple of
  :data:`LENGTH_BUCKET` (zeros at the end) so it meets a few shapes only. Padding at the end is
  exact for causal attention: real queries never see later keys, and the padded queries'
  outputs are dropped (their zero gradients add nothing to the real keys').

On GPUs and in float32 attention is PyTorch's, unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

LENGTH_BUCKET = 32
_REDUCED = (torch.bfloat16, torch.float16)


@functools.cache
def _cpu_has_amx() -> bool:
    return bool(torch.cpu._is_amx_tile_supported())


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype attention runs in for activations of ``dtype`` on ``device``."""
    if device.type == "cpu" and dtype in _REDUCED and not _cpu_has_amx():
        return torch.float32
    return dtype


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """:func:`torch.nn.functional.scaled_dot_product_attention`, in the precision and shapes
    that suit the device (see the module's docstring).

    Args:
        q: ``[batch, heads, seq, head_dim]``.
        k: ``[batch, kv_heads, keys, head_dim]``.
        v: ``[batch, kv_heads, keys, head_dim]``.
        attn_mask: bool ``[batch or 1, 1, seq, keys]``, True where a query may attend a key.
        is_causal: causal attention (``seq == keys``) instead of a mask.
        scale: the query scale.
        enable_gqa: query heads share K/V heads in groups.

    Returns:
        ``[batch, heads, seq, head_dim]`` in ``q``'s dtype.
    """
    dtype = q.dtype
    compute = compute_dtype(dtype, q.device)
    if compute != dtype:
        with torch.autocast(q.device.type, enabled=False):
            out = F.scaled_dot_product_attention(
                q.to(compute),
                k.to(compute),
                v.to(compute),
                attn_mask=attn_mask,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        return out.to(dtype)
    if _pads_lengths(q, k, v):
        return padded_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


def _pads_lengths(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    # only the backward keeps memory per length, so inference runs unpadded
    return (
        q.device.type == "cpu"
        and q.dtype in _REDUCED
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and q.shape[2] == k.shape[2]
        and q.shape[2] % LENGTH_BUCKET != 0
    )


def padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """Self-attention over lengths padded up to a multiple of :data:`LENGTH_BUCKET`.

    Equal to unpadded attention for causal attention or a ``[.., seq, seq]`` mask: padded keys
    are masked off (or come after every real query), and padded queries attend only themselves
    under a mask, so no row is empty. Shapes and ``options`` (``is_causal``, ``scale``,
    ``enable_gqa``) as :func:`scaled_dot_product_attention`.
    """
    seq = q.shape[2]
    extra = -seq % LENGTH_BUCKET
    q, k, v = (F.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
    if attn_mask is not None:
        attn_mask = F.pad(attn_mask, (0, extra, 0, extra), value=False)
        padded = torch.arange(seq, seq + extra, device=attn_mask.device)
        attn_mask[..., padded, padded] = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **options)[:, :, :seq]

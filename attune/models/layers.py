"""The building blocks of the decoder: RMSNorm, grouped-query attention, the gated MLP.

Module and parameter names follow Hugging Face's (``self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm``, ...), so checkpoints and peft adapters map onto them by name alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attune.models.config import DecoderConfig
from attune.models.kv_cache import KVCache
from attune.models.masks import DocumentBlockMask, DocumentSpans
from attune.models.moe import SparseMoE
from attune.models.rope import apply_rope
from attune.models.sdpa import scaled_dot_product_attention

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class _RMSNormFunction(torch.autograd.Function):
    """``weight * x / sqrt(mean(x^2) + eps)`` in float32 with a backward of four passes over
    ``x`` where autograd's composition of the same formula takes about eight (a pass for each
    product, power and reduction, and the sums of their gradients). RMSNorm is memory-bound, so
    passes are its cost: ~2% of a LoRA step on a 2-core CPU, measured by removing the norms.

    Shapes: ``x`` ``[..., dim]``; ``weight`` ``[dim]`` -> ``[..., dim]``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # the mean square in one pass (pow then mean makes a squared copy first)
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()
        inverse = mean_square.div_(x.shape[-1]).add_(eps).rsqrt_()  # [..., 1]
        ctx.save_for_backward(x, weight, inverse)
        return (x * inverse).mul_(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, inverse = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x).mul_(inverse).reshape(-1, x.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            # d(x r)/dx for r = (mean(x^2) + eps)^-1/2, applied to g = grad * weight:
            # r g - x r^3 mean(g x)
            scaled = grad * weight
            coefficient = torch.linalg.vecdot(scaled, x, dim=-1).unsqueeze(-1)
            coefficient.mul_(inverse.pow(3)).div_(x.shape[-1])
            grad_x = scaled.mul_(inverse).addcmul_(x, coefficient, value=-1)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as HF does.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the square root.
        offset: the scale is ``offset + weight`` (Gemma stores its weights minus 1).
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` -> ``[..., dim]``, in the input's dtype."""
        if x.dtype == self.weight.dtype == torch.float32 and not self.offset:
            normed: torch.Tensor = _RMSNormFunction.apply(x, self.weight, self.eps)
            return normed
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma scales in float32, then casts
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def project(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Each of ``layers`` applied to ``x``; where the layers' class computes several
    projections of one input at once (a ``project_together`` static method, as LoRA's
    :class:`~attune.peft.lora.LoRALinear` has, returning None when it cannot), it does.

    Shapes: ``[..., in]`` -> one ``[..., out_i]`` for each layer.
    """
    together = getattr(type(layers[0]), "project_together", None)
    projected = together(x, layers) if together is not None else None
    return projected if projected is not None else [layer(x) for layer in layers]


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads, RoPE and scaled-dot-product attention.

    K/V heads are shared by groups of query heads without being copied (SDPA's
    ``enable_gqa``).

    Args:
        config: the decoder's shape.
        layer_index: which layer this is (its sliding window comes from the config).
    """

    def __init__(self, config: DecoderConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        assert config.sliding_windows is not None  # DecoderConfig.__post_init__ fills it
        self.sliding_window = config.sliding_windows[layer_index]
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(
            self.num_heads * self.head_dim, config.hidden_size, bias=config.output_bias
        )
        self.q_norm: RMSNorm | None
        self.k_norm: RMSNorm | None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_offset)
        else:
            self.q_norm = self.k_norm = None
        self.scale = config.query_scale or self.head_dim**-0.5
        self.softcap = config.attn_softcap

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | DocumentSpans | DocumentBlockMask | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[batch, seq, hidden]``.
            rope: ``(cos, sin)``, each ``[batch, seq, head_dim]``.
            mask: ``[batch or 1, 1, seq, past + seq]`` bool, True where a query may attend a
                key; None for plain causal attention; or the packed documents' spans or block
                mask.
            cache: past keys and values; this pass's are added to it.

        Returns:
            ``[batch, seq, hidden]``.
        """
        batch, seq, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(batch, seq, self.num_heads, self.head_dim)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        if isinstance(mask, DocumentSpans | DocumentBlockMask):
            out = mask.attend(q, k, v, self.scale)
        elif self.softcap is None:
            out = scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.scale,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )
        else:
            out = self._softcapped_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def _softcapped_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention with ``cap * tanh(scores / cap)`` scores, which SDPA cannot express.

        Query heads are grouped over their shared K/V head by broadcasting, not by copying.
        ``[batch, heads, seq, dim]`` queries -> ``[batch, heads, seq, dim]``.
        """
        assert self.softcap is not None  # forward calls this only with a softcap
        batch, heads, seq, dim = q.shape
        groups = heads // self.num_kv_heads
        q = q.view(batch, self.num_kv_heads, groups, seq, dim)
        scores = q @ k[:, :, None].transpose(-1, -2) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None:
            keys = k.shape[2]
            mask = torch.ones(seq, keys, dtype=torch.bool, device=q.device).tril(keys - seq)
        mask = mask if mask.dim() == 2 else mask[:, :, None]
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.float().softmax(dim=-1).to(q.dtype)
        return (weights @ v[:, :, None]).view(batch, heads, seq, dim)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU with ``silu``, GeGLU with ``gelu``.

    Args:
        config: the decoder's shape.
        intermediate_size: the inner width (default: the config's ``intermediate_size``).
    """

    def __init__(self, config: DecoderConfig, intermediate_size: int | None = None):
        super().__init__()
        hidden, bias = config.hidden_size, config.mlp_bias
        inner = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., hidden]`` -> ``[..., hidden]``."""
        gate, up = project(x, (self.gate_proj, self.up_proj))
        return self.down_proj(self.activation(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks, each added to the residual stream.

    Args:
        config: the decoder's shape.
        layer_index: position of this layer in the stack.
    """

    def __init__(self, config: DecoderConfig, layer_index: int):
        super().__init__()
        norm = lambda: RMSNorm(config.hidden_size, config.norm_eps, config.norm_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(config, layer_index)
        # HF's names: with sandwich norms, post_attention_layernorm normalises the attention
        # output; without them, it is the norm before the MLP.
        self.post_attention_layernorm = norm()
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.sandwich_norms = config.sandwich_norms
        self.mlp: GatedMLP | SparseMoE = (
            SparseMoE(config, layer_index)
            if config.moe_layers is not None and config.moe_layers[layer_index]
            else GatedMLP(config)
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | DocumentSpans | DocumentBlockMask | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``[batch, seq, hidden]`` -> ``[batch, seq, hidden]``; see :class:`Attention`."""
        attended = self.self_attn(self.input_layernorm(x), rope, mask, cache)
        if not self.sandwich_norms:
            x = x + attended
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

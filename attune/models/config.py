"""The shape of a decoder: every family maps its HF ``config.json`` onto this one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DecoderConfig:
    """Everything a :class:`~attune.models.decoder.TransformerDecoder` is built from.

    Args:
        vocab_size: rows of the embedding and the output projection.
        hidden_size: model width.
        intermediate_size: width of the gated MLP.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (fewer than ``num_heads`` for grouped-query attention).
        head_dim: width of one head (not always ``hidden_size // num_heads``).
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: HF-style RoPE scaling parameters (``{"rope_type": "llama3", ...}``), or None.
        max_seq_len: longest sequence the model is meant for (HF ``max_position_embeddings``).
        tie_embeddings: the output projection shares the embedding's weight.
        attention_bias: q/k/v projections carry a bias (Qwen2).
        output_bias: the attention output projection carries a bias.
        mlp_bias: the MLP projections carry biases.
        qk_norm: per-head RMSNorm on queries and keys before RoPE (Qwen3).
        sliding_windows: per layer, how many past tokens a query may see (None: all).
        activation: the MLP's gate activation (``silu``; ``gelu_pytorch_tanh`` for GeGLU).
        norm_offset: RMSNorm scales by ``offset + weight`` (Gemma stores ``weight - 1``: 1.0).
        embed_scale: the embeddings are multiplied by this (Gemma: ``sqrt(hidden_size)``).
        sandwich_norms: norms after attention and after the MLP too, before each residual
            add (Gemma 2 and 3).
        attn_softcap: attention scores become ``cap * tanh(scores / cap)`` (Gemma 2).
        final_softcap: the same on the output logits (Gemma 2).
        query_scale: scale of the attention scores (default ``head_dim ** -0.5``).
        local_rope_theta: RoPE base of sliding-window layers, when it differs (Gemma 3).
        rotary_dim: how many leading dimensions of each head rotate (default: all).
        num_experts: experts of each mixture-of-experts layer (None: a dense model).
        num_experts_per_tok: experts each token is routed to (top-k).
        moe_intermediate_size: width of each expert's gated MLP.
        norm_topk_prob: the chosen experts' probabilities are renormalised to sum to 1.
        moe_layers: per layer, whether its MLP is a mixture of experts (default: all, when
            ``num_experts`` is set); the others keep a dense MLP of ``intermediate_size``.
        shared_expert_intermediate_size: width of the shared expert every token also goes
            through, scaled by a sigmoid gate (Qwen2-MoE); None: no shared expert.
        router_aux_loss_coef: weight of the router's load-balancing loss in training.
        router_jitter_noise: multiplicative noise on a MoE layer's input in training (Mixtral).
        router_weights_in_float: the routing weights stay float32 (Mixtral) instead of being
            cast to the activations' dtype (Qwen).
        num_labels: with a number, the output is a ``score`` head of that many values per
            token (value and reward models, HF ``*ForSequenceClassification``) instead of the
            language-model head.
        hf_config: the checkpoint's own ``config.json``, kept to write it back unchanged.
        source: the folder the weights were loaded from, if any (its tokenizer files are copied
            into saved checkpoints, and adapters name it as their base model).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False
    output_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: list[int | None] | None = None
    activation: str = "silu"
    norm_offset: float = 0.0
    embed_scale: float | None = None
    sandwich_norms: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_scale: float | None = None
    local_rope_theta: float | None = None
    rotary_dim: int | None = None
    num_experts: int | None = None
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = False
    moe_layers: list[bool] | None = None
    shared_expert_intermediate_size: int | None = None
    router_aux_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0
    router_weights_in_float: bool = False
    num_labels: int | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)
    source: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.num_experts is not None:
            if self.moe_intermediate_size is None:
                raise ValueError("a mixture-of-experts config needs moe_intermediate_size")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                    f"num_experts ({self.num_experts})"
                )
            if self.moe_layers is None:
                self.moe_layers = [True] * self.num_layers
            if len(self.moe_layers) != self.num_layers:
                raise ValueError(
                    f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers"
                )
        if self.sliding_windows is None:
            self.sliding_windows = [None] * self.num_layers
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError(
                f"sliding_windows has {len(self.sliding_windows)} entries for "
                f"{self.num_layers} layers"
            )

"""One decoder for every supported family: embeddings, N layers, final norm, output projection."""

from __future__ import annotations

from typing import TypeGuard, cast

import torch
from torch import nn

from attune.models.config import DecoderConfig
from attune.models.kv_cache import KVCache
from attune.models.layers import DecoderLayer, RMSNorm
from attune.models.masks import (
    DocumentBlockMask,
    DocumentSpans,
    attention_mask,
    positions_from_document_ids,
)
from attune.models.rope import RotaryEmbedding


class TransformerDecoder(nn.Module):
    """A decoder-only transformer language model.

    Attribute names match HF's ``*ForCausalLM`` without the ``model.`` prefix, so weights map by
    name. With ``tie_embeddings`` the output projection is the embedding matrix itself. With
    ``num_labels`` the output is a ``score`` head instead (HF ``*ForSequenceClassification``).

    Args:
        config: the model's shape; see :class:`DecoderConfig`.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        rotary_dim = config.rotary_dim or config.head_dim
        self.rotary = RotaryEmbedding(rotary_dim, config.rope_theta, config.rope_scaling)
        # sliding-window layers may turn at their own RoPE base (Gemma 3)
        self.rotary_local = (
            RotaryEmbedding(rotary_dim, config.local_rope_theta)
            if config.local_rope_theta is not None
            else None
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, config.norm_offset)
        if config.num_labels is None:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        else:
            self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.tie_weights()

    @property
    def ties_embeddings(self) -> bool:
        """Whether the output projection is the embedding matrix."""
        return self.config.tie_embeddings and self.config.num_labels is None

    def tie_weights(self) -> None:
        """Share the embedding with the output projection when the config says so."""
        if self.ties_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for decoding ``batch_size`` rows of up to ``max_len`` tokens."""
        config = self.config
        weight = self.embed_tokens.weight
        return KVCache(
            batch_size,
            max_len,
            config.num_layers,
            config.num_kv_heads,
            config.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        output_last: int | None = None,
    ) -> torch.Tensor:
        """
        Args:
            tokens: ``[batch, seq]`` token ids.
            positions: ``[batch, seq]`` RoPE positions; by default counting on from the
                cached tokens, or restarting at each document when ``document_ids`` is given.
            document_ids: ``[batch, seq]`` for packed rows: attention stays within a document.
            padding_mask: ``[batch, cached + seq]`` bool, True for real tokens.
            cache: a :class:`KVCache` (from :meth:`make_cache`): attention also sees the
                cached tokens, and this pass's keys and values are added to it.
            return_hidden: return the final normed hidden states instead of logits, so a loss
                can apply :meth:`output` to the positions it trains, in chunks.
            output_last: the final norm and the output head on the last this many positions
                only (a generation's prompt needs its last logits alone), so the result has
                that many positions; None: all.

        Returns:
            Logits ``[batch, seq, vocab]`` (scores ``[batch, seq, num_labels]`` with a score
            head), or hidden states ``[batch, seq, hidden]``.
        """
        batch, seq = tokens.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            if document_ids is not None:
                positions = positions_from_document_ids(document_ids)
            else:
                positions = torch.arange(past, past + seq, device=tokens.device).expand(batch, seq)
        rope = self.rotary(positions)
        local_rope = self.rotary_local(positions) if self.rotary_local is not None else rope
        masks: dict[int | None, torch.Tensor | DocumentSpans | DocumentBlockMask | None] = {}
        x = self.embed_tokens(tokens)
        if self.config.embed_scale is not None:
            # rounded to the activations' dtype first, as HF does
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        for layer in self.layers:
            # (nn.ModuleList's items are typed as plain modules)
            window = cast(DecoderLayer, layer).self_attn.sliding_window
            if window not in masks:
                effective_window = window if window is not None and window < past + seq else None
                spans = None
                if self._attends_per_document(document_ids, past, effective_window):
                    spans = DocumentSpans.from_document_ids(document_ids, padding_mask)
                if spans is not None:
                    masks[window] = spans
                elif self._attends_by_blocks(document_ids, past):
                    masks[window] = DocumentBlockMask.build(
                        document_ids, padding_mask, effective_window
                    )
                else:
                    masks[window] = attention_mask(
                        seq,
                        document_ids=document_ids,
                        padding_mask=padding_mask,
                        sliding_window=effective_window,
                        past_len=past,
                        device=tokens.device,
                    )
            x = layer(x, rope if window is None else local_rope, masks[window], cache)
        if cache is not None:
            cache.advance(seq)
        if output_last is not None:
            x = x[:, -output_last:]
        x = self.norm(x)
        return x if return_hidden else self.output(x)

    def _attends_per_document(
        self, document_ids: torch.Tensor | None, past: int, window: int | None
    ) -> TypeGuard[torch.Tensor]:
        # On the CPU, attention run per document beats a block-causal mask; GPU kernels skip
        # masked blocks themselves, and would pay a host sync and many small launches instead
        return (
            document_ids is not None
            and document_ids.device.type == "cpu"
            and past == 0
            and window is None
            and self.config.attn_softcap is None
        )

    def _attends_by_blocks(
        self, document_ids: torch.Tensor | None, past: int
    ) -> TypeGuard[torch.Tensor]:
        # Flex attention on GPUs (compiled Triton kernels); soft-capped scores keep the mask
        return (
            document_ids is not None
            and document_ids.device.type == "cuda"
            and past == 0
            and self.config.attn_softcap is None
        )

    def frozen_head_weight(self) -> torch.Tensor | None:
        """The output head's ``[vocab, hidden]`` weight when :meth:`output` is nothing but a
        product with it that trains nothing: a plain bias-free ``nn.Linear`` (not adapted,
        quantized, sharded or hooked), frozen, without soft-capping; None otherwise.

        Losses use it to compute the hidden states' gradient while they compute the loss
        (:func:`attune.models.chunked_head.frozen_head_cross_entropy`), instead of running the
        head again in the backward pass.
        """
        head = getattr(self, "lm_head", None)
        if (
            self.config.num_labels is not None
            or self.config.final_softcap is not None
            or type(head) is not nn.Linear
            or head.bias is not None
            or head._forward_hooks
            or head._forward_pre_hooks
        ):
            return None
        weight = head.weight
        if weight.requires_grad or type(weight) not in (torch.Tensor, nn.Parameter):
            return None
        return weight

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on final hidden states: ``[..., hidden]`` -> ``[..., vocab]`` logits
        (soft-capped when the config says so), or ``[..., num_labels]`` scores."""
        if self.config.num_labels is not None:
            return self.score(hidden)
        logits = self.lm_head(hidden)
        if self.config.final_softcap is not None:
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits

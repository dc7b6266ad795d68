"""Attention masks: causal, per document for packed rows, padding, sliding windows.

A mask is a bool tensor ``[batch or 1, 1, seq, seq]``: True where query ``i`` may attend key
``j``. None stands for plain causal attention, which lets SDPA take its fastest kernels.
Packed rows skip the scores between documents that a mask would compute and discard: on the
CPU through :class:`DocumentSpans` (causal attention run on each document alone), on GPUs
through :class:`DocumentBlockMask` (flex attention over the blocks the mask leaves, compiled).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from attune.models.sdpa import scaled_dot_product_attention


def attention_mask(
    seq_len: int,
    *,
    document_ids: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    past_len: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """The mask for one forward pass.

    Args:
        seq_len: number of query tokens in this pass.
        document_ids: ``[batch, seq]``; in a packed row, tokens attend only within their
            own document.
        padding_mask: ``[batch, past_len + seq]`` bool, True for real tokens; nothing
            attends padding.
        sliding_window: a query sees only the last ``sliding_window`` positions, itself
            included (HF's convention).
        past_len: tokens already in the KV cache; queries are positions
            ``past_len .. past_len + seq_len - 1`` of the key sequence.
        device: where to build it (defaults to the inputs' device).

    Returns:
        The bool mask ``[batch or 1, 1, seq_len, past_len + seq_len]``, or None when it would
        be plain causal attention without a cache.
    """
    plain = document_ids is None and padding_mask is None and sliding_window is None
    if plain and past_len == 0:
        return None
    if device is None:
        source = document_ids if document_ids is not None else padding_mask
        device = source.device if source is not None else None
    query = torch.arange(past_len, past_len + seq_len, device=device)[:, None]
    key = torch.arange(past_len + seq_len, device=device)[None, :]
    mask = (key <= query)[None]
    if sliding_window is not None:
        mask = mask & (query - key < sliding_window)[None]
    if document_ids is not None:
        mask = mask & (document_ids[:, :, None] == document_ids[:, None, :])
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, :].bool()
    # A padding query that may attend nothing would give NaN; let every query see itself.
    mask = mask | (key == query)[None]
    return mask[:, None]


def positions_from_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at each document start: ``[batch, seq]`` -> ``[batch, seq]``."""
    seq_len = document_ids.shape[-1]
    index = torch.arange(seq_len, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index))
    return index - torch.cummax(start_index, dim=-1).values


@dataclass(frozen=True)
class DocumentSpans:
    """The documents of packed rows, as ``(row, start, end)`` token ranges.

    Attention within each document alone is what the block-causal mask describes, at the cost
    of the documents' own squares instead of the row's: on the CPU, where SDPA's kernels do
    not skip masked blocks, about 35% less attention time for rows of a few documents.

    Args:
        spans: ``(row, start, end)`` for every document, in row and position order.
    """

    spans: tuple[tuple[int, int, int], ...]
    padding: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def from_document_ids(
        cls, document_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> DocumentSpans | None:
        """Spans from ``[batch, seq]`` document ids (a document is a run of equal ids).

        With a ``[batch, seq]`` ``padding_mask``, documents wholly of padding go to
        ``padding`` (nothing attends them; their outputs are zeros), and None is returned when a
        document mixes padding with real tokens (the mask then says what to do).
        """
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        seq_len = document_ids.shape[1]
        real = padding_mask.cpu().tolist() if padding_mask is not None else None
        spans: list[tuple[int, int, int]] = []
        padding: list[tuple[int, int, int]] = []
        for row, row_starts in enumerate(starts.cpu().tolist()):
            begins = [index for index, start in enumerate(row_starts) if start]
            for begin, end in zip(begins, [*begins[1:], seq_len], strict=True):
                kinds = set(real[row][begin:end]) if real is not None else {True}
                if len(kinds) > 1:
                    return None
                (spans if True in kinds else padding).append((row, begin, end))
        return cls(tuple(spans), tuple(padding))

    # Compiled layers run this eagerly: traced, the spans would be constants, and every new
    # batch a recompilation (measured: one per step until dynamo's limit, then eager anyway)
    @torch.compiler.disable
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Causal attention within each span.

        Args:
            q: ``[batch, heads, seq, head_dim]``.
            k: ``[batch, kv_heads, seq, head_dim]`` (shared by groups of query heads).
            v: ``[batch, kv_heads, seq, head_dim]``.
            scale: the query scale.

        Returns:
            ``[batch, heads, seq, head_dim]``.
        """
        batch, heads, seq, _ = q.shape
        gqa = k.shape[1] != heads
        # Documents never cross rows, so the batch's tokens are one sequence to cut: q, k and v
        # as [batch * seq, heads, dim] (the layout the projections wrote them in), split once,
        # and the outputs joined by one cat straight into the layout o_proj reads. In backward
        # that is one copy of each gradient (split's cat) and none of the output's, where
        # cutting rows then documents copied each twice (cat and stack) and the output once more.
        documents = sorted(
            [(row * seq + start, end - start, True) for row, start, end in self.spans]
            + [(row * seq + start, end - start, False) for row, start, end in self.padding]
        )
        sizes = [size for _, size, _ in documents]

        def tokens_first(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(batch * seq, x.shape[1], x.shape[-1])

        pieces = []
        for (_, size, real), q_doc, k_doc, v_doc in zip(
            documents,
            tokens_first(q).split(sizes),
            tokens_first(k).split(sizes),
            tokens_first(v).split(sizes),
            strict=True,
        ):
            if real:
                out = scaled_dot_product_attention(
                    q_doc.transpose(0, 1)[None],
                    k_doc.transpose(0, 1)[None],
                    v_doc.transpose(0, 1)[None],
                    is_causal=True,
                    scale=scale,
                    enable_gqa=gqa,
                )[0].transpose(0, 1)
            else:  # padding: nothing attends it, its outputs are zeros
                out = q.new_zeros(size, heads, v.shape[-1])
            pieces.append(out)
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        return out.reshape(batch, seq, heads, v.shape[-1]).transpose(1, 2)


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    # flex attention is only fast compiled (eager, it computes every score); packed rows have
    # one shape, so one static compilation serves the run
    return torch.compile(flex_attention, dynamic=False)


@dataclass(frozen=True)
class DocumentBlockMask:
    """The mask of :func:`attention_mask` as flex attention's block mask, for GPUs.

    Flex attention skips the blocks that the mask leaves empty (most of a packed row's square
    when it holds several documents) and computes the rest with the mask applied, in a compiled
    kernel, so packed rows cost about their documents' squares with no host sync and no
    per-document launches.

    Args:
        block_mask: the flex attention block mask.
    """

    block_mask: BlockMask

    @classmethod
    def build(
        cls,
        document_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        sliding_window: int | None = None,
    ) -> DocumentBlockMask:
        """The block mask for packed rows, with the semantics of :func:`attention_mask`.

        Args:
            document_ids: ``[batch, seq]``; a query attends keys of its own document only.
            padding_mask: ``[batch, seq]`` bool, True for real tokens; nothing attends padding
                (a padding query attends itself).
            sliding_window: a query sees only the last ``sliding_window`` positions.
        """
        batch, seq = document_ids.shape
        real = padding_mask.bool() if padding_mask is not None else None

        def allowed(b, h, q, k):
            keep = (k <= q) & (document_ids[b, q] == document_ids[b, k])
            if sliding_window is not None:
                keep = keep & (q - k < sliding_window)
            if real is not None:
                keep = keep & real[b, k]
            return keep | (q == k)

        return cls(create_block_mask(allowed, batch, None, seq, seq, device=document_ids.device))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention under the block mask; shapes as :meth:`DocumentSpans.attend`."""
        compiled = q.device.type == "cuda" and not torch.compiler.is_compiling()
        # inside a compiled layer flex attention is compiled with it
        # cast: torch types flex_attention's result as a union over return_lse and
        # return_aux, both off here, so it is one tensor
        kernel = cast(
            Callable[..., torch.Tensor], _compiled_flex_attention() if compiled else flex_attention
        )
        return kernel(
            q, k, v, block_mask=self.block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )

"""Attention masks: causal, per document for packed rows, padding, sliding windows.

A mask is a bool tensor ``[batch or 1, 1, seq, seq]``: True where query ``i`` may attend key
``j``. None stands for plain causal attention, which lets SDPA take its fastest kernels.
"""

from __future__ import annotations

import torch


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

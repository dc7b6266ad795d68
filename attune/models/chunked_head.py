"""The output head applied a chunk of positions at a time, each chunk's logits recomputed.

A model's logits are ``[positions, vocab]``; in fp32 for a 128k vocabulary that is 0.5 MB per
position, more than the rest of a small model's activations. Losses that need only some
positions (SFT's trained tokens, a preference pair's completions, PPO's responses) select
those positions' final hidden states and pass them through :func:`head_by_chunks`: it runs a
function of a chunk (which projects it through the head and reduces the logits) one chunk at
a time, and under autograd wraps each call in :func:`torch.utils.checkpoint.checkpoint`, so
the chunk's logits are recomputed in the backward pass instead of kept. At most one chunk of
logits exists at a time, forward or backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint


def head_by_chunks(
    function: Callable[..., torch.Tensor],
    rows: tuple[torch.Tensor, ...],
    constants: tuple = (),
    chunk_size: int = 1024,
) -> Iterator[torch.Tensor]:
    """``function(*row_chunks, *constants)`` for each ``chunk_size`` rows, in order.

    The caller reduces the pieces (sums them, concatenates them) and decides what an empty
    selection gives: no piece is yielded when ``rows`` hold no rows. Grad mode is read as each
    piece is made, so consume the iterator where it is created.

    Args:
        function: one chunk -> its result, typically ``output(hidden).float()`` reduced over
            the vocabulary (a ``[chunk]`` log-probability, a summed loss).
        rows: tensors sliced together along their first dimension, each ``[n, ...]``: the
            selected positions' final hidden states ``[n, hidden]``, their targets ``[n]``, a
            reference model's hidden states ``[n, reference_hidden]``.
        constants: passed to every call after the chunks: the output head(s)
            (``[chunk, hidden]`` -> ``[chunk, vocab]``).
        chunk_size: rows per call.

    Yields:
        Each chunk's result, from rows ``[start, start + chunk_size)``; when grad is enabled,
        computed under non-reentrant activation checkpointing (its intermediates recomputed in
        the backward pass).
    """
    for start in range(0, rows[0].shape[0], chunk_size):
        chunk = (*(tensor[start : start + chunk_size] for tensor in rows), *constants)
        if torch.is_grad_enabled():
            yield checkpoint(function, *chunk, use_reentrant=False)
        else:
            yield function(*chunk)

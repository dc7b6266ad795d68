"""The output head applied a chunk of positions at a time, each chunk's logits recomputed.

A model's logits are ``[positions, vocab]``; in fp32 for a 128k vocabulary that is 0.5 MB per
position, more than the rest of a small model's activations. Losses that need only some
positions (SFT's trained tokens, a preference pair's completions, PPO's responses) select
those positions' final hidden states and pass them through :func:`head_by_chunks`: it runs a
function of a chunk (which projects it through the head and reduces the logits) one chunk at
a time, and under autograd wraps each call in :func:`torch.utils.checkpoint.checkpoint`, so
the chunk's logits are recomputed in the backward pass instead of kept. At most one chunk of
logits exists at a time, forward or backward.

A frozen head (LoRA's, a plain linear layer) needs no recomputation: nothing of it trains, so
:func:`frozen_head_cross_entropy` computes the hidden states' gradient in the same pass as the
loss, chunk by chunk, and the backward pass only scales it. That spares the head's forward
product and the log-softmax a second time (a LoRA step on the anchors' rows: ~4% faster).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

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


def frozen_head_weight(output: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """The ``[vocab, hidden]`` weight ``output`` multiplies by, when ``output`` is a model's
    ``output`` method and the model says its head is a plain frozen product
    (``model.frozen_head_weight()``); None for any other callable or head."""
    model = getattr(output, "__self__", None)
    find = getattr(model, "frozen_head_weight", None)
    if find is None or output != getattr(model, "output", None):
        return None
    weight: torch.Tensor | None = find()
    return weight


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            chunk_targets = targets[start:end, None]
            log_probs = torch.log_softmax(torch.mm(hidden[start:end], weight.t()).float(), -1)
            total -= log_probs.gather(1, chunk_targets).sum()
            if grad is not None:
                # d(-log p_target)/d logits = softmax - one_hot(target)
                probs = log_probs.exp_()
                probs.scatter_add_(1, chunk_targets, probs.new_full(chunk_targets.shape, -1.0))
                torch.mm(probs.to(weight.dtype), weight, out=grad[start:end])
        ctx.grad_hidden = grad
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad = ctx.grad_hidden
        return (grad * grad_total.to(grad.dtype) if grad is not None else None), None, None, None


def frozen_head_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, for a head that
    trains nothing.

    Equal to ``F.cross_entropy(output(hidden).float(), targets, reduction="sum")`` computed
    through :func:`head_by_chunks` (tested), with the same bound on memory (one chunk of fp32
    logits at a time), but one pass: each chunk's gradient with respect to ``hidden`` is made
    as its loss is and kept (``[n, hidden]``, the size of ``hidden``), so the backward pass
    runs no head product and no softmax again. The weight gets no gradient.

    Args:
        hidden: ``[n, hidden]`` final hidden states of the trained positions.
        weight: ``[vocab, hidden]`` the head's weight (frozen).
        targets: ``[n]`` token ids.
        chunk_size: positions projected to logits at once.

    Returns:
        The fp32 scalar loss, summed over positions.
    """
    loss: torch.Tensor = _FrozenHeadCrossEntropy.apply(hidden, weight, targets, chunk_size)
    return loss

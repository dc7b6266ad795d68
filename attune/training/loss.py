"""Next-token cross-entropy without full-vocabulary fp32 logits.

A language model's logits are ``[batch, seq, vocab]``; in fp32 for a 128k vocabulary that is
0.5 MB per token, more than the rest of a small model's activations. :class:`ChunkedCrossEntropy`
instead takes the final hidden states, keeps only the positions that are trained (the prompt,
padding and the last position are never projected), and projects them in chunks with
:func:`attune.models.chunked_head.head_by_chunks`, each chunk's logits recomputed in the
backward pass rather than saved; a frozen head's gradient is made in the forward pass instead
(:func:`attune.models.chunked_head.frozen_head_cross_entropy`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attune.config import Expects
from attune.data.collate import IGNORE_INDEX
from attune.models.chunked_head import (
    frozen_head_cross_entropy,
    frozen_head_weight,
    head_by_chunks,
)

SFT_LOSS = Expects(
    "an SFT loss (called with hidden states, labels and the output head, as "
    "attune.training.ChunkedCrossEntropy is)",
    positional=3,
)
"""What the ``loss`` slot of a fine-tuning recipe takes."""


def _chunk_loss(
    hidden: torch.Tensor, targets: torch.Tensor, output: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    logits = output(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


class ChunkedCrossEntropy:
    """Summed next-token cross-entropy over trained positions, computed in chunks.

    Args:
        chunk_size: trained positions projected to logits at once.

    Call it with the model's final hidden states ``[batch, seq, hidden]``, the labels
    ``[batch, seq]`` (aligned with the tokens; -100 is not trained) and the model's output head
    (``model.output``: ``[n, hidden]`` -> ``[n, vocab]``). It returns the summed loss (fp32
    scalar) and the number of trained positions, so that gradient accumulation can divide by
    the tokens of the whole step.
    """

    def __init__(self, chunk_size: int = 1024):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size

    def __call__(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        output: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, int]:
        targets = labels[:, 1:]
        trained = targets != IGNORE_INDEX
        selected = hidden[:, :-1][trained]  # [n, hidden]
        targets = targets[trained]
        total = hidden.new_zeros((), dtype=torch.float32)
        if selected.shape[0] == 0:
            return total + 0.0 * hidden.sum(), 0  # keeps the graph for a step with no tokens
        weight = frozen_head_weight(output)
        if weight is not None and torch.is_grad_enabled() and selected.requires_grad:
            # a frozen head (LoRA's): the gradient made with the loss, no recomputation
            loss = frozen_head_cross_entropy(selected, weight, targets, self.chunk_size)
            return loss, int(targets.shape[0])
        for chunk_loss in head_by_chunks(
            _chunk_loss, (selected, targets), (output,), self.chunk_size
        ):
            total = total + chunk_loss
        return total, int(targets.shape[0])


def token_count(labels: torch.Tensor) -> int:
    """How many positions of a batch's labels are trained (after the shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())

"""Knowledge distillation's losses: a divergence between the student's and the teacher's
next-token distributions, mixed with the ordinary cross-entropy, without full-vocabulary logits.

The divergences (``p`` the teacher's distribution, ``q`` the student's, both of the logits
divided by ``temperature``; a sum over the vocabulary at each trained position):

- ``forward_kl``: KL(p ‖ q) = Σ p (log p - log q), mean-seeking (torchtune's and Hinton's KD).
- ``reverse_kl``: KL(q ‖ p) = Σ q (log q - log p), mode-seeking (MiniLLM).
- ``symmetric_kl``: (KL(p ‖ q) + KL(q ‖ p)) / 2, the mean of the two, so that its scale is
  that of either direction.
- ``jsd``: TRL GKD's generalized Jensen-Shannon divergence with ``beta``: with the mixture
  m = (1 - beta) q + beta p, JSD(beta) = beta KL(p ‖ m) + (1 - beta) KL(q ‖ m); at the ends, as
  TRL defines them, ``beta = 0`` is the forward KL and ``beta = 1`` the reverse KL (the
  mixture formula itself vanishes there).

As in TRL, the divergence is not multiplied by ``temperature ** 2``. The step's loss is
``(1 - kd_ratio) * CE + kd_ratio * KD``, both summed over the trained positions (label not
-100, as SFT trains) so that gradient accumulation divides by the step's trained tokens; the
cross-entropy uses the student's untempered logits over its whole vocabulary. In on-policy
distillation (:mod:`attune.training.on_policy`) the completions the student generated have no
reference answer: their positions add to KD only (0 to CE), so that the loss stays the same
mixture of the two sums.

Memory: the student's and the teacher's final hidden states (``[batch, seq, hidden]``, far
smaller than logits) are kept; the trained positions go through both output heads a chunk at a
time with :func:`attune.models.chunked_head.head_by_chunks`, and each chunk's logits (the
student's, and the teacher's under ``no_grad``) are recomputed in the backward pass instead of
kept, so at most one chunk of ``[chunk, vocab]`` logits of each model exists at a time.

Vocabularies: teacher and student share a tokenizer (the recipe checks), but their checkpoints
may pad the embedding to different sizes (a multiple of 64 or 128). The divergence is taken
over the shared ids ``[0, min(student_vocab, teacher_vocab))``: the padded rows beyond it are
never real tokens. The cross-entropy keeps the student's full vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attune.config import Expects
from attune.data.collate import IGNORE_INDEX
from attune.errors import ConfigError
from attune.models.chunked_head import head_by_chunks

DIVERGENCES = ("forward_kl", "reverse_kl", "symmetric_kl", "jsd")

KD_LOSS = Expects(
    "a distillation loss (called with the student's hidden states, labels and output head and "
    "the teacher's hidden states and output head, as attune.training.DistillationLoss is)",
    positional=5,
)
"""What the ``loss`` slot of the knowledge distillation recipe takes."""


class DistillationLossError(ConfigError, ValueError):
    """A distillation loss configured with a value outside its range."""


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, from log-probabilities ``[n, vocab]``."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The divergence ``kind`` at each row, ``[n]`` (fp32), of logits ``[n, vocab]``.

    A teacher with a larger (padded) vocabulary is compared on the student's ids, and the
    other way round: both are cut to the shared ``min`` of the two sizes.
    """
    shared = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = F.log_softmax(student_logits[..., :shared].float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits[..., :shared].float() / temperature, dim=-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return _kl(log_p, log_q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return _kl(log_q, log_p)
    if kind == "symmetric_kl":
        return 0.5 * (_kl(log_p, log_q) + _kl(log_q, log_p))
    if kind == "jsd":
        log_m = torch.logaddexp(log_q + math.log(1 - beta), log_p + math.log(beta))
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    raise DistillationLossError(f"loss.kind must be one of {', '.join(DIVERGENCES)}, got {kind!r}")


@dataclass
class DistillationTerms:
    """One batch's distillation loss.

    Attributes:
        loss: ``(1 - kd_ratio) * ce + kd_ratio * kd`` (fp32 scalar, with its graph).
        tokens: trained positions.
        ce: the summed cross-entropy (detached).
        kd: the summed divergence (detached).
    """

    loss: torch.Tensor
    tokens: int
    ce: torch.Tensor
    kd: torch.Tensor


class DistillationLoss:
    """Summed cross-entropy and divergence from a teacher over the trained positions, computed
    a chunk of positions at a time (see the module's notes).

    Args:
        kind: ``forward_kl``, ``reverse_kl``, ``symmetric_kl`` or ``jsd``.
        beta: the generalized JSD's weight of the teacher in the mixture, in [0, 1] (``jsd``
            only; TRL GKD's ``beta``).
        temperature: both models' logits are divided by it for the divergence (> 0).
        kd_ratio: the divergence's share of the loss, in [0, 1] (0: plain SFT, 1: only KD).
        chunk_size: trained positions projected to logits at once.

    Call it with the student's final hidden states ``[batch, seq, hidden]``, the labels
    ``[batch, seq]`` (aligned with the tokens; -100 is not trained), the student's output head,
    the teacher's final hidden states ``[batch, seq, teacher_hidden]`` (no graph) and the
    teacher's output head; and, for on-policy distillation, ``generated`` (``[batch]`` bool):
    the rows whose completion the student generated, whose tokens count in the divergence
    only (they have no reference answer to take the cross-entropy of).
    """

    def __init__(
        self,
        kind: str = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        kd_ratio: float = 0.5,
        chunk_size: int = 1024,
    ):
        if kind not in DIVERGENCES:
            raise DistillationLossError(
                f"loss.kind must be one of {', '.join(DIVERGENCES)}, got {kind!r}"
            )
        # `not x > 0` and `not 0 <= x <= 1` also reject NaN
        if not 0.0 <= beta <= 1.0:
            raise DistillationLossError(f"loss.beta must be in [0, 1], got {beta}")
        if not temperature > 0:
            raise DistillationLossError(
                f"loss.temperature must be > 0, got {temperature}; set a positive temperature"
            )
        if not 0.0 <= kd_ratio <= 1.0:
            raise DistillationLossError(
                f"loss.kd_ratio must be in [0, 1], got {kd_ratio} (0: cross-entropy only, "
                "1: distillation only)"
            )
        if chunk_size < 1:
            raise DistillationLossError(f"loss.chunk_size must be positive, got {chunk_size}")
        self.kind = kind
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.kd_ratio = float(kd_ratio)
        self.chunk_size = chunk_size

    def _chunk(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        teacher_hidden: torch.Tensor,
        output: Callable[[torch.Tensor], torch.Tensor],
        teacher_output: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``[ce, kd]`` summed over one chunk of positions."""
        logits = output(hidden).float()
        with torch.no_grad():
            teacher_logits = teacher_output(teacher_hidden).float()
        ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        kd = divergence(logits, teacher_logits, self.kind, self.beta, self.temperature).sum()
        return torch.stack([ce, kd])

    def __call__(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        output: Callable[[torch.Tensor], torch.Tensor],
        teacher_hidden: torch.Tensor,
        teacher_output: Callable[[torch.Tensor], torch.Tensor],
        generated: torch.Tensor | None = None,
    ) -> DistillationTerms:
        targets = labels[:, 1:]
        trained = targets != IGNORE_INDEX
        selected = hidden[:, :-1][trained]  # [n, hidden]
        teacher_selected = teacher_hidden[:, :-1][trained].detach()  # [n, teacher_hidden]
        if generated is not None:  # no cross-entropy on the student's own completions
            own = generated.to(device=targets.device, dtype=torch.bool)[:, None]
            targets = targets.masked_fill(own, IGNORE_INDEX)  # (cross_entropy ignores -100)
        targets = targets[trained]
        sums = hidden.new_zeros(2, dtype=torch.float32)
        if selected.shape[0] == 0:
            zero = sums.sum() + 0.0 * hidden.sum()  # keeps the graph for a step with no tokens
            return DistillationTerms(zero, 0, sums[0], sums[1])
        for piece in head_by_chunks(
            self._chunk,
            (selected, targets, teacher_selected),
            (output, teacher_output),
            self.chunk_size,
        ):
            sums = sums + piece
        ce, kd = sums[0], sums[1]
        loss = (1 - self.kd_ratio) * ce + self.kd_ratio * kd
        return DistillationTerms(loss, int(targets.shape[0]), ce.detach(), kd.detach())

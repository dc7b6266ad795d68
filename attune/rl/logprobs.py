"""Log-probabilities of whole completions, without full-vocabulary fp32 logits.

Preference and policy-gradient losses compare how likely a model finds each completion: the sum
of its trained tokens' log-probabilities. Only the trained positions are projected to the
vocabulary, a chunk at a time, by :func:`attune.models.chunked_head.head_by_chunks` (each
chunk's logits recomputed in the backward pass instead of kept).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attune.data.collate import IGNORE_INDEX
from attune.models import TransformerDecoder
from attune.models.chunked_head import head_by_chunks
from attune.precision import Precision, entered


def _by_chunks(
    function: Callable[..., torch.Tensor],
    rows: tuple[torch.Tensor, ...],
    constants: tuple,
    chunk_size: int,
) -> torch.Tensor:
    """:func:`~attune.models.chunked_head.head_by_chunks`' pieces concatenated, or with no
    rows the function's own empty result, of the right shape."""
    pieces = list(head_by_chunks(function, rows, constants, chunk_size))
    if not pieces:
        return function(*(tensor[:0] for tensor in rows), *constants)
    return torch.cat(pieces)


def tempered(
    output: Callable[[torch.Tensor], torch.Tensor], temperature: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """An output head whose fp32 logits are divided by the sampling ``temperature``: the
    distribution completions were sampled from, which an RL objective's ratios and KL must be
    computed under (TRL's GRPO and PPO do the same). The head itself at temperature 1."""
    if temperature == 1.0:
        return output
    return lambda hidden: output(hidden).float() / temperature


def _chunk_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, output: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    logits = output(hidden).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def token_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    output: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``log p(target | hidden)`` for selected positions.

    Args:
        hidden: ``[n, hidden]`` final hidden states of the positions that predict ``targets``.
        targets: ``[n]`` token ids.
        output: the model's output head (``[n, hidden]`` -> ``[n, vocab]``).
        chunk_size: positions projected at once.

    Returns:
        ``[n]`` fp32 log-probabilities.
    """
    return _by_chunks(_chunk_logprobs, (hidden, targets), (output,), chunk_size)


def _chunk_logprobs_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, output: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    log_p = output(hidden).float().log_softmax(-1)
    with torch.no_grad():
        entropy = -(log_p.exp() * log_p).sum(-1)
    return torch.stack([log_p.gather(-1, targets[:, None]).squeeze(-1), entropy], dim=-1)


def token_logprobs_and_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    output: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(target | hidden)`` (differentiable) and the next-token distribution's entropy
    (no gradient) at selected positions, the head projected once.

    Args:
        hidden: ``[n, hidden]`` final hidden states of the positions that predict ``targets``.
        targets: ``[n]`` token ids.
        output: the model's output head (``[n, hidden]`` -> ``[n, vocab]``).
        chunk_size: positions projected at once.

    Returns:
        ``([n] log-probabilities, [n] entropies)``, fp32.
    """
    both = _by_chunks(_chunk_logprobs_entropy, (hidden, targets), (output,), chunk_size)
    return both[:, 0], both[:, 1].detach()


def _chunk_kl(
    hidden: torch.Tensor,
    reference_hidden: torch.Tensor,
    output: Callable[[torch.Tensor], torch.Tensor],
    reference_output: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    log_p = output(hidden).float().log_softmax(-1)
    with torch.no_grad():
        log_q = reference_output(reference_hidden).float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def token_kl(
    hidden: torch.Tensor,
    reference_hidden: torch.Tensor,
    output: Callable[[torch.Tensor], torch.Tensor],
    reference_output: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``KL(p || q)`` of two models' next-token distributions, summed over the whole
    vocabulary, at selected positions; differentiable in ``hidden`` (``q`` is a frozen
    reference).

    Args:
        hidden: ``[n, hidden]`` the model's final hidden states at the positions.
        reference_hidden: ``[n, reference_hidden]`` the reference's, at the same positions.
        output, reference_output: their output heads (``[n, hidden]`` -> ``[n, vocab]``).
        chunk_size: positions projected at once.

    Returns:
        ``[n]`` fp32 divergences.
    """
    return _by_chunks(_chunk_kl, (hidden, reference_hidden), (output, reference_output), chunk_size)


def _chunk_statistics(
    hidden: torch.Tensor,
    reference_hidden: torch.Tensor,
    targets: torch.Tensor,
    output: Callable[[torch.Tensor], torch.Tensor],
    reference_output: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    log_p = output(hidden).float().log_softmax(-1)
    log_q = reference_output(reference_hidden).float().log_softmax(-1)
    p = log_p.exp()
    picked = targets[:, None]
    return torch.stack(
        [
            log_p.gather(-1, picked).squeeze(-1),
            log_q.gather(-1, picked).squeeze(-1),
            -(p * log_p).sum(-1),
            (p * (log_p - log_q)).sum(-1),
        ],
        dim=-1,
    )


@torch.no_grad()
def token_statistics(
    hidden: torch.Tensor,
    reference_hidden: torch.Tensor,
    targets: torch.Tensor,
    output: Callable[[torch.Tensor], torch.Tensor],
    reference_output: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
) -> torch.Tensor:
    """A policy's and its reference's view of sampled tokens, each head projected once.

    Args:
        hidden: ``[n, hidden]`` the policy's final hidden states at the positions that predict
            ``targets``.
        reference_hidden: ``[n, reference_hidden]`` the reference's, at the same positions.
        targets: ``[n]`` token ids.
        output, reference_output: their output heads (``[n, hidden]`` -> ``[n, vocab]``).
        chunk_size: positions projected at once.

    Returns:
        ``[n, 4]`` fp32, no gradient: the policy's log-probability of each target, the
        reference's, the policy's entropy, and KL(policy || reference) over the vocabulary.
    """
    return _by_chunks(
        _chunk_statistics,
        (hidden, reference_hidden, targets),
        (output, reference_output),
        chunk_size,
    )


def sequence_logprobs(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    output: Callable[[torch.Tensor], torch.Tensor],
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed log-probability of its trained tokens, and how many there are.

    Args:
        hidden: ``[rows, seq, hidden]`` the model's final hidden states.
        labels: ``[rows, seq]`` labels aligned with the tokens (-100: not trained); position
            ``i`` predicts label ``i + 1``.
        output: the model's output head.
        sequence_ids: ``[rows, seq]`` which sequence each token belongs to, for rows that pack
            several (-1 or anything for untrained positions); None: each row is one sequence.
        num_sequences: how many sequences (default: the rows, or the largest id + 1).
        chunk_size: trained positions projected to logits at once.

    Returns:
        ``([num_sequences] fp32 summed log-probabilities, [num_sequences] token counts)``.
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    if sequence_ids is None:
        rows = torch.arange(labels.shape[0], device=labels.device)
        sequence_ids = rows[:, None].expand_as(labels)
        num_sequences = labels.shape[0] if num_sequences is None else num_sequences
    ids = sequence_ids[:, 1:][trained]
    if num_sequences is None:
        num_sequences = int(ids.max()) + 1 if ids.numel() else 0
    logprobs = token_logprobs(hidden[:, :-1][trained], targets[trained], output, chunk_size)
    sums = torch.zeros(num_sequences, device=hidden.device, dtype=torch.float32)
    sums = sums.index_add(0, ids, logprobs)
    counts = torch.bincount(ids, minlength=num_sequences)
    return sums, counts


@dataclass
class PairLogprobs:
    """A batch's preference pairs as the model scores them.

    Attributes:
        chosen: ``[pairs]`` fp32 summed log-probabilities of the chosen completions.
        rejected: ``[pairs]`` the same for the rejected ones.
        chosen_tokens: ``[pairs]`` completion tokens of each chosen sequence.
        rejected_tokens: ``[pairs]`` the same for the rejected ones.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def pair_logprobs(
    model: TransformerDecoder,
    batch: dict[str, torch.Tensor],
    precision: Precision | None = None,
    chunk_size: int = 1024,
) -> PairLogprobs:
    """One forward pass over a preference batch (from
    :func:`~attune.data.collate.preference_collate` or ``preference_pack_collate``, on the
    model's device): every pair's chosen and rejected completion log-probabilities.

    Args:
        model: a decoder (``model(tokens, return_hidden=True)`` and ``model.output``).
        batch: ``tokens``, ``labels``, ``sequence_ids``, ``pairs`` and, packed,
            ``document_ids``.
        precision: makes the forward pass's autocast context (None: none).
        chunk_size: trained positions projected to logits at once.
    """
    pairs = int(batch["pairs"])
    inputs = {name: batch[name] for name in ("padding_mask", "document_ids") if name in batch}
    with entered(precision):
        hidden = model(batch["tokens"], return_hidden=True, **inputs)
        sums, counts = sequence_logprobs(
            hidden,
            batch["labels"],
            model.output,
            batch.get("sequence_ids"),
            num_sequences=2 * pairs,
            chunk_size=chunk_size,
        )
    return PairLogprobs(sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:])

"""Reward-model training: a decoder with a scalar ``score`` head, trained on preference pairs
so that the chosen reply scores higher than the rejected one (Bradley–Terry).

A sequence's reward is the score head read at its reply's last trained token, the end-of-turn
token: that is where a generated response ends (its stop token), so the model is read in PPO
exactly where it was trained. transformers' ``*ForSequenceClassification`` reads the last
non-padding token, so it gives the same score to a sequence cut after that token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attune.config import Expects
from attune.data.collate import IGNORE_INDEX
from attune.models import TransformerDecoder
from attune.precision import Precision, entered
from attune.rl.preference_losses import PreferenceLossError


def sequence_end_positions(
    labels: torch.Tensor, sequence_ids: torch.Tensor, count: int
) -> torch.Tensor:
    """``[count]`` flat indices (``row * seq + column``) of each sequence's last trained token.

    Args:
        labels: ``[rows, seq]`` labels (-100 where not trained).
        sequence_ids: ``[rows, seq]`` each token's sequence (-1 on padding).
        count: the number of sequences.
    """
    flat = torch.arange(labels.numel(), device=labels.device).view_as(labels)
    trained = labels != IGNORE_INDEX
    last = torch.full((count,), -1, dtype=torch.long, device=labels.device)
    return last.scatter_reduce(0, sequence_ids[trained], flat[trained], reduce="amax")


def pair_rewards(
    model: TransformerDecoder,
    batch: dict[str, torch.Tensor],
    precision: Precision | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over a preference batch (padded or packed, on the model's device):
    each pair's ``(chosen, rejected)`` rewards, ``[pairs]`` fp32 each."""
    pairs = int(batch["pairs"])
    inputs = {name: batch[name] for name in ("padding_mask", "document_ids") if name in batch}
    with entered(precision):
        hidden = model(batch["tokens"], return_hidden=True, **inputs)
        ends = sequence_end_positions(batch["labels"], batch["sequence_ids"], 2 * pairs)
        rewards = model.output(hidden.reshape(-1, hidden.shape[-1])[ends]).squeeze(-1).float()
    return rewards[:pairs], rewards[pairs:]


PAIR_LOSS = Expects(
    "a reward-model pair loss (called with the chosen and rejected rewards and margin=, as "
    "attune.rl.BradleyTerryLoss is)",
    positional=2,
    keywords=("margin",),
)
"""What the ``loss`` slot of the reward-model recipe takes."""


@dataclass
class BradleyTerryLoss:
    """``-log sigmoid(r_chosen - r_rejected - margin)`` per pair (Bradley–Terry; with a margin as
    in Llama 2, from the data's ``margin`` column when it has one, else ``margin``), plus
    ``center_rewards_coefficient * (r_chosen + r_rejected)^2``, which keeps rewards centred on 0
    (Eisenstein et al., 2023; TRL's option of the same name).

    Args:
        margin: the margin of every pair without one of its own.
        center_rewards_coefficient: the weight of the centring term (0: none).
    """

    margin: float = 0.0
    center_rewards_coefficient: float = 0.0

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient < 0:
            raise PreferenceLossError(
                f"loss.center_rewards_coefficient must be >= 0, got "
                f"{self.center_rewards_coefficient}"
            )

    def __call__(
        self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[pairs]`` losses, not reduced."""
        margins = margin.float() if margin is not None else self.margin
        losses = -F.logsigmoid(chosen - rejected - margins)
        if self.center_rewards_coefficient:
            losses = losses + self.center_rewards_coefficient * (chosen + rejected) ** 2
        return losses


class RewardObjective:
    """A batch of pairs -> ``(summed per-pair loss, summed statistics)``, for
    :func:`attune.training.accumulated_backward`: the loss, ``accuracy`` (the chosen reply
    scores higher), ``margin`` (chosen minus rejected), ``rewards/chosen`` and
    ``rewards/rejected``.

    Args:
        loss: the pair loss.
    """

    def __init__(self, loss: BradleyTerryLoss):
        self.loss = loss

    def __call__(
        self,
        model: TransformerDecoder,
        batch: dict[str, torch.Tensor],
        precision: Precision | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = pair_rewards(model, batch, precision)
        losses = self.loss(chosen, rejected, batch.get("margin"))
        chosen, rejected = chosen.detach(), rejected.detach()
        stats = {
            "loss": losses.detach().sum(),
            "accuracy": (chosen > rejected).float().sum(),
            "margin": (chosen - rejected).sum(),
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
        }
        return losses.sum(), stats

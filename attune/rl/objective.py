"""A preference loss with its reference: what one micro-batch of pairs costs and shows.

:class:`PreferenceObjective` scores a batch's pairs under the policy and the reference (live,
precomputed, or none for reference-free losses), applies the loss, and returns the summed
per-pair loss with the statistics a run logs, summed over the pairs so that accumulation over
micro-batches and ranks can divide by the pairs of the whole step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attune.models import TransformerDecoder
from attune.precision import Precision
from attune.rl.logprobs import PairLogprobs, pair_logprobs
from attune.rl.preference_losses import PreferenceLoss
from attune.rl.reference import ReferenceLogprobs

STATISTICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
    "logps/accuracy",
)
"""What :class:`PreferenceObjective` sums over pairs: the loss; the implicit rewards and the
share of pairs whose chosen reward is higher (``rewards/accuracy``, 0 at a tie); the policy's
summed completion log-probabilities and the share of pairs where the chosen reply is the more
likely one (``logps/accuracy``, the policy's own preference, reference aside)."""


class PreferenceObjective:
    """A batch of pairs -> ``(summed per-pair loss, summed statistics)``.

    Args:
        loss: a preference loss (:mod:`attune.rl.preference_losses`).
        reference: scores a batch under the reference model (live), or None.
        cache: the dataset's precomputed reference log-probabilities, or None.
        chunk_size: positions projected to logits at once.

    A loss that uses a reference needs ``reference`` or ``cache``.
    """

    def __init__(
        self,
        loss: PreferenceLoss,
        reference: Callable[[dict[str, torch.Tensor]], PairLogprobs] | None = None,
        cache: ReferenceLogprobs | None = None,
        chunk_size: int = 1024,
    ):
        if loss.uses_reference and reference is None and cache is None:
            raise ValueError(f"{type(loss).__name__} needs a reference model or precomputed one")
        self.loss = loss
        self.reference = reference
        self.cache = cache
        self.chunk_size = chunk_size

    def reference_logprobs(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.loss.uses_reference:
            return None, None
        if self.cache is not None:
            return self.cache.lookup(batch["pair_index"])
        assert self.reference is not None, "checked when the objective was made"
        scored = self.reference(batch)
        return scored.chosen, scored.rejected

    def __call__(
        self,
        policy: TransformerDecoder,
        batch: dict[str, torch.Tensor],
        precision: Precision | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # the reference first: its activations are gone before the policy's are made
        reference = self.reference_logprobs(batch)
        scores = pair_logprobs(policy, batch, precision, self.chunk_size)
        out = self.loss(
            scores.chosen,
            scores.rejected,
            *reference,
            scores.chosen_tokens,
            scores.rejected_tokens,
        )
        chosen, rejected = scores.chosen.detach(), scores.rejected.detach()
        stats = {
            "loss": out.losses.detach().sum(),
            "rewards/chosen": out.chosen_rewards.sum(),
            "rewards/rejected": out.rejected_rewards.sum(),
            "rewards/accuracy": (out.chosen_rewards > out.rejected_rewards).float().sum(),
            "logps/chosen": chosen.sum(),
            "logps/rejected": rejected.sum(),
            "logps/accuracy": (chosen > rejected).float().sum(),
        }
        return out.losses.sum(), stats


def mean_statistics(pairs: int, sums: dict[str, float]) -> dict[str, float]:
    """Summed statistics -> their means per pair, with ``rewards/margin``."""
    means = {name: value / max(pairs, 1) for name, value in sums.items()}
    means["rewards/margin"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means

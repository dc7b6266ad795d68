"""Training on preference pairs, shared by DPO (and its family) and reward models: one optimizer
step over a batch of pairs, the loss being the mean over the step's pairs on every rank, and
held-out pairs' statistics (how often the chosen reply wins). What a pair's loss is, the
method's objective, stays in its recipe."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from attune.precision import Precision
from attune.training.data import eval_batches
from attune.training.divergence import check_finite
from attune.training.evaluate import evaluated_sums
from attune.training.step import accumulated_backward

if TYPE_CHECKING:
    from attune.data import TokenizedDataset
    from attune.training.loop import TrainingLoop
    from attune.training.run import Run

PairObjective = Callable[
    [torch.nn.Module, dict[str, torch.Tensor], Precision | None],
    tuple[torch.Tensor, dict[str, torch.Tensor]],
]
"""``(model, batch of pairs, precision) -> (summed loss, summed statistics)``."""


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    """How many pairs a batch holds."""
    return int(batch["pairs"])


def pairwise_step(
    loop: TrainingLoop,
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    objective: PairObjective,
    run: Run,
    max_grad_norm: float | None,
    means_of: Callable[[int, dict[str, float]], dict[str, float]] | None = None,
) -> dict[str, float]:
    """One optimizer step of ``loop`` over a step's batches of pairs: forward and backward
    (the gradient of the mean loss per pair over every rank), the divergence checks, the
    update, and the step's metrics logged. Returns the statistics' means.

    Args:
        loop: the training loop, inside its step.
        model: the model trained.
        micro_batches: the step's batches of pairs.
        objective: a batch -> its summed loss and statistics.
        run: the run.
        max_grad_norm: clip the gradients' norm to this (None: no clipping).
        means_of: ``(pairs, sums)`` -> the statistics' means (default: each sum over pairs).
    """
    pairs, input_tokens, sums = accumulated_backward(
        model,
        micro_batches,
        pair_count,
        lambda batch: objective(model, batch, run.precision),
        run.device,
    )
    means = (means_of or per_pair)(pairs, sums)
    check_finite(means["loss"], loop.step, loop.last_saved)
    grad_norm = loop.optimizer_step(max_grad_norm)
    loop.count(input_tokens)
    loop.log({**means, "pairs": pairs, "grad_norm": grad_norm})
    return means


def per_pair(pairs: int, sums: dict[str, float]) -> dict[str, float]:
    """Each summed statistic's mean per pair."""
    return {name: value / max(pairs, 1) for name, value in sums.items()}


class HeldOutPairs:
    """Preference pairs held out of training: their statistics as ``val_*`` metrics, and a
    line before and after training saying how often the chosen reply wins. Each rank scores
    its share; every call is a collective.

    Args:
        dataset: the pairs, or None (then nothing is measured or said).
        model: the model scored.
        summed_of: a batch (on the device) -> its statistics summed over its pairs.
        run: the run.
        batch_size: pairs scored at once.
        pad_id: the padding token.
        accuracy: the statistic that is the share of pairs the chosen reply wins.
        wins: how the report says so ("the chosen reply scores higher").
        means_of: ``(pairs, sums)`` -> the statistics' means (default: each sum over pairs).
        every: measure every this many steps (None: only before and after training).
    """

    def __init__(
        self,
        dataset: TokenizedDataset | None,
        model: torch.nn.Module,
        summed_of: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
        run: Run,
        *,
        batch_size: int,
        pad_id: int,
        accuracy: str,
        wins: str,
        means_of: Callable[[int, dict[str, float]], dict[str, float]] | None = None,
        every: int | None = None,
    ):
        self.dataset = dataset
        self.model = model
        self.summed_of = summed_of
        self.run = run
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.accuracy = accuracy
        self.wins = wins
        self.means_of = means_of or per_pair
        self.every = every

    def metrics(self) -> dict[str, float]:
        """Each statistic's mean over the held-out pairs, as ``val_<name>``."""
        world = self.run.world
        assert self.dataset is not None, "metrics() of HeldOutPairs without a dataset"
        batches = eval_batches(
            self.dataset, self.batch_size, self.pad_id, world.rank, world.world_size
        )
        pairs, sums = evaluated_sums(
            self.model, batches, pair_count, self.summed_of, self.run.device
        )
        return {f"val_{name}": value for name, value in self.means_of(pairs, sums).items()}

    def due(self, step: int) -> bool:
        """Whether a measurement is due after ``step``."""
        every = self.every
        return self.dataset is not None and every is not None and every > 0 and step % every == 0

    def report(self, when: str) -> None:
        """Say how often the chosen reply wins, ``when`` (``before``, ``after``) training."""
        if self.dataset is not None:
            share = self.metrics()[f"val_{self.accuracy}"]
            self.run.print(
                f"{when} training: {self.wins} in {share:.0%} of {len(self.dataset)} held-out pairs"
            )

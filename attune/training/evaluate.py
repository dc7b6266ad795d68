"""Measuring a model on held-out data as it trains, each rank scoring its share and the sums
gathered over all ranks: any statistics summed over batches (:func:`evaluated_sums`), and the
loss per trained token (:func:`held_out_loss`, and :class:`HeldOutLoss` every N steps).
Preference pairs' statistics are :class:`attune.training.pairwise.HeldOutPairs`'."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from attune.distributed import all_ranks_sum, is_distributed
from attune.precision import Precision
from attune.training.data import eval_batches
from attune.training.loss import token_count
from attune.training.step import summed_loss, to_device

if TYPE_CHECKING:
    from attune.data import TokenizedDataset
    from attune.training.run import Run


@torch.no_grad()
def evaluated_sums(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    units: Callable[[dict[str, torch.Tensor]], int],
    summed_of: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    device: torch.device,
) -> tuple[int, dict[str, float]]:
    """Statistics summed over ``batches`` on all ranks, without gradients and with the model in
    eval mode (put back after).

    Args:
        model: the model.
        batches: this rank's batches, on any device.
        units: how many units (trained tokens, pairs, ...) a batch has.
        summed_of: a batch (on ``device``) -> statistics summed over its units.
        device: where the model is.

    Returns:
        The units and each statistic's sum, over every rank.
    """
    was_training = model.training
    model.eval()
    total, sums = 0, dict[str, float]()
    for batch in batches:
        total += units(batch)
        for name, value in summed_of(to_device(batch, device)).items():
            sums[name] = sums.get(name, 0.0) + float(value)
    model.train(was_training)
    if is_distributed():
        totals = all_ranks_sum(torch.tensor([float(total), *sums.values()], dtype=torch.float64))
        total = int(totals[0])
        sums = dict(zip(sums, totals[1:].tolist(), strict=True))
    return total, sums


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: Callable,
    device: torch.device,
    precision: Precision | None = None,
) -> float:
    """The mean loss per trained token over ``batches`` (all ranks), with the model in eval
    mode (put back to train mode after)."""

    def summed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": summed_loss(model, batch, loss_fn, precision)[0]}

    tokens, sums = evaluated_sums(
        model, batches, lambda batch: token_count(batch["labels"]), summed, device
    )
    return sums.get("loss", 0.0) / max(tokens, 1)


def held_out_loss(
    model: torch.nn.Module,
    dataset: TokenizedDataset,
    loss_fn: Any,
    batch_size: int,
    pad_id: int,
    run: Run,
) -> float:
    """The mean loss per trained token of ``dataset`` (each rank scores its share)."""
    batches = eval_batches(dataset, batch_size, pad_id, run.world.rank, run.world.world_size)
    return evaluate(model, batches, loss_fn, run.device, run.precision)


class HeldOutLoss:
    """The ``validation_dataset``'s loss every ``eval_every_n_steps`` steps of a run.

    Args:
        cfg: the run's config (``eval_every_n_steps``, ``batch_size``).
        model: the model being trained.
        dataset: the validation dataset, or None (then the loss is never due).
        loss_fn: the loss, as :func:`held_out_loss` takes it.
        pad_id: the padding token.
        run: the run.
    """

    def __init__(
        self,
        cfg: Any,
        model: torch.nn.Module,
        dataset: TokenizedDataset | None,
        loss_fn: Any,
        pad_id: int,
        run: Run,
    ):
        self.every = cfg.get("eval_every_n_steps")
        self.batch_size = cfg.batch_size
        self.model, self.dataset, self.loss_fn = model, dataset, loss_fn
        self.pad_id, self.run = pad_id, run

    def due(self, step: int) -> bool:
        return self.dataset is not None and bool(self.every) and step % self.every == 0

    def __call__(self) -> float:
        assert self.dataset is not None, "due() says when there is a dataset"
        return held_out_loss(
            self.model, self.dataset, self.loss_fn, self.batch_size, self.pad_id, self.run
        )

"""One optimizer step of supervised training, with token-exact gradient accumulation.

The loss of a step is the mean over every trained token of all its micro-batches (on all
ranks), not the mean of per-micro-batch means: each micro-batch's summed loss is divided by the
step's total token count before its backward pass. Batch 4 x 1 micro-batch and batch 1 x 4
micro-batches therefore give the same gradient, whatever the sequence lengths.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from attune.errors import AttuneError
from attune.training.checkpointer import newest_up_to
from attune.training.data import eval_batches
from attune.training.loss import token_count

if TYPE_CHECKING:
    from attune.data import TokenizedDataset
    from attune.training.run import Run

MODEL_INPUTS = ("padding_mask", "document_ids")


class TrainingError(AttuneError):
    """A run that cannot go on (a NaN loss, say)."""


@dataclass
class StepResult:
    """What one optimizer step's forward and backward passes saw."""

    loss: float
    trained_tokens: int
    input_tokens: int


def input_count(batch: dict[str, torch.Tensor]) -> int:
    """Input tokens of a batch, padding aside."""
    mask = batch.get("padding_mask")
    return int(mask.sum()) if mask is not None else batch["tokens"].numel()


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def all_ranks_sums(values: Sequence[int | float], device: torch.device) -> list:
    """``values`` each summed over every rank, in one collective (themselves on one process):
    integers stay integers when they all are, else every sum is a float."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    exact = all(isinstance(value, int) for value in values)
    totals = torch.tensor(values, device=device, dtype=torch.long if exact else torch.float64)
    dist.all_reduce(totals)
    return totals.tolist()


def summed_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: Callable,
    precision: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, int]:
    """The summed next-token loss of one batch (on the model's device) and its token count."""
    inputs = {name: batch[name] for name in MODEL_INPUTS if name in batch}
    with precision if precision is not None else contextlib.nullcontext():
        hidden = model(batch["tokens"], return_hidden=True, **inputs)
        return loss_fn(hidden, batch["labels"], model.output)


def accumulated_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    units: Callable[[dict[str, torch.Tensor]], int],
    summed_loss_of: Callable[
        [dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]
    ],
    device: torch.device,
) -> tuple[int, int, dict[str, float]]:
    """Forward and backward over a step's micro-batches so that the gradient is that of the
    mean loss per unit (trained token, preference pair, ...) over the whole step on every rank,
    whatever the micro-batches' sizes; gradients accumulate in ``.grad``.

    Args:
        model: the model being trained.
        micro_batches: the step's batches, on any device.
        units: how many units a batch has (counted before any forward pass).
        summed_loss_of: a batch (on ``device``) -> its loss summed over its units, and
            statistics summed over them (detached scalars: rewards, log-probs, ...).
        device: where the model is.

    Returns:
        The step's units, its input tokens (padding aside) and each statistic's sum, all over
        every rank.
    """
    total, input_tokens = all_ranks_sums(
        [
            sum(units(batch) for batch in micro_batches),
            sum(input_count(batch) for batch in micro_batches),
        ],
        device,
    )
    # FSDP averages gradients over ranks, but each rank's loss is already its share of the
    # global mean: scale by the world size so the average is the sum (gloo has no
    # pre-multiplied sum to ask FSDP for instead)
    scale = dist.get_world_size() if _is_sharded(model) else 1
    sums: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        loss, stats = summed_loss_of(to_device(batch, device))
        (loss * (scale / max(total, 1))).backward()
        for name, value in stats.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
    if not sums:
        return total, input_tokens, {}
    stacked = torch.stack(list(sums.values()))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
    return total, input_tokens, dict(zip(sums, stacked.tolist(), strict=True))


def backward_step(
    model: torch.nn.Module,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    loss_fn: Callable,
    device: torch.device,
    precision: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> StepResult:
    """Forward and backward over a step's micro-batches, token-exact; gradients accumulate in
    ``.grad``.

    Args:
        model: the model (``model(tokens, return_hidden=True)`` and ``model.output``).
        micro_batches: the step's batches (``tokens``, ``labels``, maybe ``padding_mask`` and
            ``document_ids``), on any device.
        loss_fn: a :class:`~attune.training.loss.ChunkedCrossEntropy` or alike.
        device: where the model is.
        precision: makes the autocast context for the forward pass (None: none).

    Returns:
        The step's mean loss per trained token, the number of trained tokens and the number of
        input tokens (padding aside), all over every rank.
    """

    def summed(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        context = precision() if precision is not None else None
        loss, _ = summed_loss(model, batch, loss_fn, context)
        return loss, {"loss": loss}

    total, input_tokens, sums = accumulated_backward(
        model, micro_batches, lambda batch: token_count(batch["labels"]), summed, device
    )
    return StepResult(sums["loss"] / max(total, 1), total, input_tokens)


GROWTH_LIMIT = 10.0
"""An update that multiplies the norm of the trained weights by more than this is divergence:
even a high learning rate moves them by a small fraction of their size per step, while one far
too high (Adam moves every weight by about the learning rate) multiplies it by orders of
magnitude at once, leaving finite weights that only produce a NaN a step or two later."""


def _as_float(norm: torch.Tensor) -> float:
    # with sharded (DTensor) tensors the norm is a DTensor of the global norm
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _weights_norm(parameters: list[torch.nn.Parameter]) -> float:
    """The 2-norm of all the parameters together (the same on every rank when sharded)."""
    return _as_float(torch.nn.utils.get_total_norm([p.detach() for p in parameters]))


@dataclass
class UpdateCheck:
    """How :func:`optimizer_step` checks each update of a run.

    Attributes:
        diverged: ``diverged(problem, stepped)`` makes the error raised when an update goes
            wrong (``stepped``: whether the optimizer had stepped).
        weights_norm: the trained weights' norm after the last update (None: not known yet,
            as at the start or after a resume), so that each step measures it once.
    """

    diverged: Callable[[str, bool], BaseException]
    weights_norm: float | None = None


def optimizer_step(
    parameters: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    max_grad_norm: float | None,
    check: UpdateCheck | None = None,
) -> float | None:
    """Clip gradients (when ``max_grad_norm`` is set), step the optimizer and the schedule, and
    clear the gradients. Returns the gradient norm before clipping, when clipped.

    Args:
        parameters: the trained parameters.
        optimizer: their optimizer.
        scheduler: the learning-rate schedule, or None.
        max_grad_norm: clip the gradients' global norm to this (None: no clipping).
        check: when given, the update is checked: a non-finite gradient norm stops before the
            step; weights that the step leaves non-finite, or whose norm it multiplies by more
            than :data:`GROWTH_LIMIT`, stop after it.
    """
    parameters = list(parameters)
    norm = None
    if max_grad_norm is not None or check is not None:
        total = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        norm = _as_float(total)
        if check is not None and not math.isfinite(norm):
            raise check.diverged(f"the gradient norm is {norm}", False)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(parameters, max_grad_norm, total)
    if check is not None and check.weights_norm is None:
        check.weights_norm = _weights_norm(parameters)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if check is not None:
        before, after = check.weights_norm, _weights_norm(parameters)
        check.weights_norm = after
        if not math.isfinite(after):
            raise check.diverged(f"the update left the weights' norm {after}", True)
        if before > 0 and after > GROWTH_LIMIT * before:
            raise check.diverged(
                f"the update multiplied the weights' norm by {after / before:.3g} (from "
                f"{before:.4g} to {after:.4g}): training diverges",
                True,
            )
    return norm if max_grad_norm is not None else None


def stopped(problem: str, step: int, good_checkpoint: str | Path | None) -> TrainingError:
    """The error that stops a diverging run: what went wrong at which step, and the newest
    checkpoint whose weights are good (or that none was saved)."""
    kept = (
        f"the last good checkpoint is {good_checkpoint}"
        if good_checkpoint
        else "no good checkpoint was saved before it"
    )
    return TrainingError(
        f"{problem} at step {step}; training stopped ({kept}). Lower the learning rate, check "
        "the data, or use fp32"
    )


def check_finite(loss: float, step: int, last_checkpoint: str | None) -> None:
    """Stop the run on a NaN or infinite loss, naming the step and the checkpoint to go back to.

    The weights that gave this loss are those after step ``step - 1``: a checkpoint of that
    step holds them, so the one named is the newest of an earlier step (``last_checkpoint``,
    the latest saved, or one beside it).
    """
    if math.isfinite(loss):
        return
    raise stopped(f"the loss is {loss}", step, newest_up_to(last_checkpoint, step - 2))


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
    total, sums = 0, {}
    for batch in batches:
        total += units(batch)
        for name, value in summed_of(to_device(batch, device)).items():
            sums[name] = sums.get(name, 0.0) + float(value)
    model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = [float(total), *sums.values()]
        totals = torch.tensor(values, device=device, dtype=torch.float64)
        dist.all_reduce(totals)
        total = int(totals[0])
        sums = dict(zip(sums, totals[1:].tolist(), strict=True))
    return total, sums


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: Callable,
    device: torch.device,
    precision: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> float:
    """The mean loss per trained token over ``batches`` (all ranks), with the model in eval
    mode (put back to train mode after)."""

    def summed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        context = precision() if precision is not None else None
        return {"loss": summed_loss(model, batch, loss_fn, context)[0]}

    tokens, sums = evaluated_sums(
        model, batches, lambda batch: token_count(batch["labels"]), summed, device
    )
    return sums.get("loss", 0.0) / max(tokens, 1)


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
        self.means_of = means_of or (lambda n, sums: {k: v / max(n, 1) for k, v in sums.items()})
        self.every = every

    def metrics(self) -> dict[str, float]:
        """Each statistic's mean over the held-out pairs, as ``val_<name>``."""
        world = self.run.world
        batches = eval_batches(
            self.dataset, self.batch_size, self.pad_id, world.rank, world.world_size
        )
        pairs, sums = evaluated_sums(
            self.model, batches, lambda batch: int(batch["pairs"]), self.summed_of,
            self.run.device,
        )  # fmt: skip
        return {f"val_{name}": value for name, value in self.means_of(pairs, sums).items()}

    def due(self, step: int) -> bool:
        """Whether a measurement is due after ``step``."""
        return self.dataset is not None and bool(self.every) and step % self.every == 0

    def report(self, when: str) -> None:
        """Say how often the chosen reply wins, ``when`` (``before``, ``after``) training."""
        if self.dataset is not None:
            share = self.metrics()[f"val_{self.accuracy}"]
            self.run.print(
                f"{when} training: {self.wins} in {share:.0%} of {len(self.dataset)} held-out pairs"
            )


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

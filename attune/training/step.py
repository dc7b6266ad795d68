"""One optimizer step of supervised training, with token-exact gradient accumulation.

The loss of a step is the mean over every trained token of all its micro-batches (on all
ranks), not the mean of per-micro-batch means: each micro-batch's summed loss is divided by the
step's total token count before its backward pass. Batch 4 x 1 micro-batch and batch 1 x 4
micro-batches therefore give the same gradient, whatever the sequence lengths. The update
itself (clipping, the optimizer and the schedule) is checked for divergence
(:mod:`attune.training.divergence`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from attune.distributed import all_ranks_sum, all_ranks_sums, world_size
from attune.models.moe import aux_loss_coef, router_aux_loss
from attune.precision import Precision, entered
from attune.training.divergence import GROWTH_LIMIT, UpdateCheck, as_float, weights_norm
from attune.training.loss import token_count

MODEL_INPUTS = ("padding_mask", "document_ids")


@dataclass
class StepResult:
    """What one optimizer step's forward and backward passes saw."""

    loss: float
    trained_tokens: int
    input_tokens: int
    extras: dict[str, float] = field(default_factory=dict)


def input_count(batch: dict[str, torch.Tensor]) -> int:
    """Input tokens of a batch, padding aside."""
    mask = batch.get("padding_mask")
    return int(mask.sum()) if mask is not None else batch["tokens"].numel()


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def summed_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    loss_fn: Callable,
    precision: Precision | None = None,
) -> tuple[torch.Tensor, int]:
    """The summed next-token loss of one batch (on the model's device) and its token count."""
    inputs = {name: batch[name] for name in MODEL_INPUTS if name in batch}
    with entered(precision):
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
        ]
    )
    # FSDP averages gradients over ranks, but each rank's loss is already its share of the
    # global mean: scale by the world size so the average is the sum (gloo has no
    # pre-multiplied sum to ask FSDP for instead)
    scale = world_size() if _is_sharded(model) else 1
    sums: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        batch = to_device(batch, device)
        loss, stats = summed_loss_of(batch)
        # a mixture of experts adds its router's load-balancing loss (transformers' aux loss),
        # weighted by the batch's units so that accumulation keeps the step's mean exact
        aux = router_aux_loss(model, batch.get("padding_mask"))
        if aux is not None:
            count = units(batch)
            loss = loss + aux_loss_coef(model) * aux * count
            stats = {**stats, "router_aux_loss": aux.detach() * count}
        (loss * (scale / max(total, 1))).backward()
        for name, value in stats.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
    if not sums:
        return total, input_tokens, {}
    stacked = all_ranks_sum(torch.stack(list(sums.values())))
    return total, input_tokens, dict(zip(sums, stacked.tolist(), strict=True))


def backward_step(
    model: torch.nn.Module,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    loss_fn: Callable,
    device: torch.device,
    precision: Precision | None = None,
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
        input tokens (padding aside), all over every rank; for a mixture of experts,
        ``extras`` holds the mean router load-balancing loss (``router_aux_loss``).
    """

    def summed(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, _ = summed_loss(model, batch, loss_fn, precision)
        return loss, {"loss": loss}

    total, input_tokens, sums = accumulated_backward(
        model, micro_batches, lambda batch: token_count(batch["labels"]), summed, device
    )
    extras = {name: value / max(total, 1) for name, value in sums.items() if name != "loss"}
    return StepResult(sums["loss"] / max(total, 1), total, input_tokens, extras)


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
        norm = as_float(total)
        if check is not None and not math.isfinite(norm):
            raise check.diverged(f"the gradient norm is {norm}", False)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(parameters, max_grad_norm, total)
    if check is not None and check.weights_norm is None:
        check.weights_norm = weights_norm(parameters)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if check is not None:
        before, after = check.weights_norm or 0.0, weights_norm(parameters)
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

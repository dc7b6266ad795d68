"""What stops a diverging run: a NaN or infinite loss, a non-finite gradient, an update that
wrecks the weights; and which checkpoint is still good to go back to."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from attune.errors import AttuneError
from attune.training.checkpointer import newest_up_to


class TrainingError(AttuneError):
    """A run that cannot go on (a NaN loss, say)."""


GROWTH_LIMIT = 10.0
"""An update that multiplies the norm of the trained weights by more than this is divergence:
even a high learning rate moves them by a small fraction of their size per step, while one far
too high (Adam moves every weight by about the learning rate) multiplies it by orders of
magnitude at once, leaving finite weights that only produce a NaN a step or two later."""


def as_float(norm: torch.Tensor) -> float:
    # with sharded (DTensor) tensors the norm is a DTensor of the global norm
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def weights_norm(parameters: list[torch.nn.Parameter]) -> float:
    """The 2-norm of all the parameters together (the same on every rank when sharded)."""
    return as_float(torch.nn.utils.get_total_norm([p.detach() for p in parameters]))


@dataclass
class UpdateCheck:
    """How :func:`attune.training.step.optimizer_step` checks each update of a run.

    Attributes:
        diverged: ``diverged(problem, stepped)`` makes the error raised when an update goes
            wrong (``stepped``: whether the optimizer had stepped).
        weights_norm: the trained weights' norm after the last update (None: not known yet,
            as at the start or after a resume), so that each step measures it once.
    """

    diverged: Callable[[str, bool], BaseException]
    weights_norm: float | None = None


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

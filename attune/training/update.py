"""The end of a step of token-level training, shared by SFT and knowledge distillation: the
loss checked, the optimizer's update, the step's metrics, and the held-out loss when due."""

from __future__ import annotations

from attune.training.divergence import check_finite
from attune.training.evaluate import HeldOutLoss
from attune.training.loop import TrainingLoop
from attune.training.step import StepResult


def update_and_log(
    loop: TrainingLoop,
    result: StepResult,
    max_grad_norm: float | None,
    held_out: HeldOutLoss | None = None,
) -> None:
    """After a step's forward and backward passes: stop on a non-finite loss, clip and update
    (:meth:`TrainingLoop.optimizer_step`), count the input tokens, log ``loss``,
    ``trained_tokens``, ``grad_norm`` and the step's ``extras`` (a method's own terms, a
    mixture of experts' router loss), and the held-out loss (``val_loss``) when due. The
    recipe then ends the step (``loop.end_step()``)."""
    check_finite(result.loss, loop.step, loop.last_saved)
    grad_norm = loop.optimizer_step(max_grad_norm)
    loop.count(result.input_tokens)
    loop.log(
        {
            "loss": result.loss,
            "trained_tokens": result.trained_tokens,
            "grad_norm": grad_norm,
            **result.extras,
        }
    )
    if held_out is not None and held_out.due(loop.step):
        loop.log_now({"val_loss": held_out()})

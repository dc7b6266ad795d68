"""Knowledge distillation's teacher and its step: the teacher built frozen (eval mode, no
gradients, in ``teacher_dtype``, sharded like the student under torchrun), its vocabulary
checked against the student's, and one optimizer step's forward and backward passes of the
student against it (:func:`distillation_step`, token-exact as SFT's).

With ``offload_teacher``, the teacher holds no device memory between steps: on one process it
lives on the CPU and comes to the device for each step's passes; under torchrun its shards stay
on the CPU (FSDP2's CPU offload) and each layer is gathered onto the device as it runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from attune import config
from attune.data.collate import IGNORE_INDEX
from attune.errors import ConfigError
from attune.models import TransformerDecoder
from attune.precision import entered
from attune.tokenizer import Tokenizer
from attune.training.distillation import DistillationLoss
from attune.training.frozen import brought_to
from attune.training.loss import token_count
from attune.training.run import Run
from attune.training.runtime import resolve_dtype
from attune.training.setup import build_model
from attune.training.sharding import unsharded_root
from attune.training.step import MODEL_INPUTS, StepResult, accumulated_backward

TEACHER_KEYS = {
    "teacher": config.Component(provided=("dtype", "device")),
    "teacher_dtype": config.Field(str | None, required=False),
    "teacher_tokenizer": config.Component(required=False),
    "offload_teacher": config.Field(bool, required=False),
}
"""The keys of a recipe with a distillation teacher: its component (any supported family that
shares the student's tokenizer), its weights' dtype, its tokenizer when its folder has none,
and whether it waits on the CPU between steps."""


def check_teacher_path(cfg: Any) -> None:
    """A ``teacher.path`` that names no folder, said in one line before any work."""
    path = (cfg.get("teacher") or {}).get("path")
    if path is not None and not os.path.exists(os.path.expanduser(str(path))):
        raise ConfigError(
            f"teacher.path: no teacher model at {path}; point it at the teacher's HF folder "
            "(tune download <repo id> fetches one)"
        )


def teacher_dtype(cfg: Any, run: Run) -> torch.dtype:
    """``teacher_dtype`` when the config gives one; else bf16 on a GPU, the run's dtype
    elsewhere."""
    name = cfg.get("teacher_dtype")
    if name is not None:
        return resolve_dtype(name)
    return torch.bfloat16 if run.device.type == "cuda" else run.dtype


def check_vocabularies(student: Tokenizer, teacher: Tokenizer) -> None:
    """Stop with one line when the teacher's tokenizer maps any token to another id than the
    student's: distillation compares the two next-token distributions id by id."""
    ours = student.backend.get_vocab(with_added_tokens=True)
    theirs = teacher.backend.get_vocab(with_added_tokens=True)
    if ours == theirs:
        return
    by_id = {index: token for token, index in theirs.items()}
    for token, index in sorted(ours.items(), key=lambda item: item[1]):
        if by_id.get(index) != token:
            other = by_id.get(index)
            found = f"{other!r}" if other is not None else "no token"
            raise ConfigError(
                f"teacher: its tokenizer differs from the student's (id {index} is {token!r} "
                f"for the student, {found} for the teacher; vocabularies of {len(ours)} and "
                f"{len(theirs)} tokens); distillation needs a teacher of the same tokenizer"
            )
    raise ConfigError(
        f"teacher: its tokenizer differs from the student's (the teacher has {len(theirs)} "
        f"tokens, the student {len(ours)}); distillation needs a teacher of the same tokenizer"
    )


def _check_embedding(model: TransformerDecoder, tokenizer: Tokenizer, which: str) -> None:
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"{which}: its output head has {model.config.vocab_size} rows for a tokenizer of "
            f"{tokenizer.vocab_size} tokens"
        )


def teacher_tokenizer(cfg: Any, teacher: TransformerDecoder | None = None) -> Tokenizer | None:
    """The teacher's tokenizer: the ``teacher_tokenizer`` component, else the one in the
    teacher's folder (``teacher.path``, or the folder the built teacher was loaded from);
    None when there is none to read."""
    if cfg.get("teacher_tokenizer") is not None:
        return config.instantiate(cfg.teacher_tokenizer)
    folder = (cfg.get("teacher") or {}).get("path")
    if folder is None and teacher is not None:
        folder = teacher.config.source
    if folder is None or not os.path.isfile(os.path.join(str(folder), "tokenizer.json")):
        return None
    return Tokenizer.from_pretrained(folder)


def build_teacher(
    cfg: Any, run: Run, tokenizer: Tokenizer, student: TransformerDecoder
) -> TransformerDecoder:
    """The ``teacher`` component frozen: eval mode, no gradients, in :func:`teacher_dtype`,
    sharded like the student under torchrun; its tokenizer checked against the student's
    first when its folder is known (``teacher.path``), else once it is built."""
    theirs = teacher_tokenizer(cfg)
    if theirs is not None:
        check_vocabularies(tokenizer, theirs)
    offload = bool(cfg.get("offload_teacher", False))
    distributed = run.world.distributed
    dtype = teacher_dtype(cfg, run)
    teacher = build_model(cfg.teacher, run, cpu_offload=offload and distributed, dtype=dtype)
    teacher.requires_grad_(False)
    teacher.eval()
    if offload and not distributed:
        teacher.to("cpu")  # brought to the device by each distillation_step
    if theirs is None:
        theirs = teacher_tokenizer(cfg, teacher)
        if theirs is not None:
            check_vocabularies(tokenizer, theirs)
    _check_embedding(student, tokenizer, "model")
    _check_embedding(teacher, tokenizer, "teacher")
    return teacher


def distillation_step(
    student: TransformerDecoder,
    teacher: TransformerDecoder,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    loss_fn: DistillationLoss,
    run: Run,
    offload_teacher: bool = False,
) -> StepResult:
    """Forward and backward over a step's micro-batches against the teacher, token-exact:
    gradients accumulate in the student's ``.grad``.

    With ``offload_teacher`` on one process, the teacher is brought from the CPU to the
    device for the step and back after it (a sharded teacher's CPU offload is FSDP2's own).
    Micro-batches from :class:`~attune.training.on_policy.OnPolicy` carry ``generated``
    rows, passed on to the loss.

    The teacher's final hidden states come from its forward pass under ``no_grad``; its head
    runs in the loss a chunk at a time (again in the backward pass, where the student's chunk
    is recomputed), so a sharded teacher's root (embedding, norm, head) stays gathered for the
    step.

    Returns:
        The step's mean loss per trained token, its trained and input tokens, and in
        ``extras`` the mean cross-entropy (``ce_loss``) and divergence (``kd_loss``) per
        trained token, and with on-policy batches the share of trained tokens the student
        generated (``on_policy_share``), all over every rank.
    """

    def summed(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = {name: batch[name] for name in MODEL_INPUTS if name in batch}
        generated = batch.get("generated")
        extra = {} if generated is None else {"generated": generated}
        with torch.no_grad(), entered(run.precision):
            teacher_hidden = teacher(batch["tokens"], return_hidden=True, **inputs)
        with entered(run.precision):
            hidden = student(batch["tokens"], return_hidden=True, **inputs)
            terms = loss_fn(
                hidden, batch["labels"], student.output, teacher_hidden, teacher.output, **extra
            )
        stats = {"loss": terms.loss, "ce_loss": terms.ce, "kd_loss": terms.kd}
        if generated is not None:
            own = (batch["labels"][:, 1:] != IGNORE_INDEX) & generated[:, None]
            stats["on_policy_share"] = own.sum().float()
        return terms.loss, stats

    offload = offload_teacher and not run.world.distributed
    with brought_to(teacher, run.device, offload), unsharded_root(teacher):
        total, input_tokens, sums = accumulated_backward(
            student, micro_batches, lambda batch: token_count(batch["labels"]), summed, run.device
        )
    means = {name: value / max(total, 1) for name, value in sums.items()}
    loss = means.pop("loss")
    return StepResult(loss, total, input_tokens, means)

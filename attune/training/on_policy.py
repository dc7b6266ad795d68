"""On-policy distillation (GKD): a share ``lmbda`` of each step's examples get their completion
from the student itself, decoded with the KV cache (:func:`attune.models.generate`), in place of
the dataset's; the teacher then scores those tokens as it scores the dataset's.

Which examples, and each one's sampling, are seeded by the run's ``seed``, the step and the
example's place in the step's global batch (ranks x micro-batches x rows, in the sampler's
global order), never by the process: the same global batch on any number of processes, with
any micro-batch size, picks and samples the same completions, and a resumed run picks and
samples what the uninterrupted one did.

A generated completion has no reference answer: its tokens count in the divergence only (their
cross-entropy is left out; GKD trains on the student's own outputs with the divergence alone).
Each micro-batch that went through :class:`OnPolicy` with ``lmbda > 0`` carries ``generated``
(``[batch]`` bool), the rows whose completion the student wrote.

The prompt of an example is everything before its first trained token (the assistant's
answer, as the chat template lays it out); multi-turn conversations are cut at their first
answer. Packed batches (several examples to a row) are refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from attune import config
from attune.data.collate import IGNORE_INDEX, pad_collate
from attune.distributed import any_rank
from attune.errors import ConfigError
from attune.models import TransformerDecoder, generate
from attune.tokenizer import Tokenizer
from attune.training.keys import SAMPLING_KEYS, sampling_options
from attune.training.run import Run

ON_POLICY_KEYS = {
    "lmbda": config.Field(float, required=False),
    **SAMPLING_KEYS,
}
"""The keys of on-policy distillation: ``lmbda`` (the share of examples the student completes)
and the sampling of those completions (``max_new_tokens``, ``temperature``, ``top_k``,
``top_p``)."""

DEFAULT_MAX_NEW_TOKENS = 128  # TRL GKD's default


def check_lmbda(cfg: Any) -> None:
    """``lmbda`` outside [0, 1], said in one line before any work."""
    lmbda = cfg.get("lmbda")
    # `not 0 <= x <= 1` also rejects NaN
    if lmbda is not None and not 0.0 <= lmbda <= 1.0:
        raise ConfigError(
            f"lmbda must be in [0, 1], got {lmbda} (the share of each batch whose completions "
            "the student generates; 0: none, 1: all)"
        )


def check_on_policy_loss(loss_fn: Callable, lmbda: float | None) -> None:
    """A loss that cannot take ``generated`` (the rows the student completed), said in one line
    before any work when the run generates (``lmbda > 0``); it would fail at the first step
    that does, after the setup and maybe hours of steps on the dataset's own completions."""
    if not lmbda:
        return
    # an nn.Module's __call__ takes **kwargs whatever its forward takes: read the forward
    target = loss_fn.forward if isinstance(loss_fn, torch.nn.Module) else loss_fn
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): leave it to the call
        return
    if any(p.name == "generated" or p.kind is p.VAR_KEYWORD for p in parameters):
        return
    name = getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__)
    raise ConfigError(
        f"loss: {name} takes no `generated` keyword, which on-policy "
        f"distillation (lmbda={lmbda}) passes it: add `generated=None` to its signature (the "
        "[batch] bool rows the student completed), or set lmbda=0"
    )


def row_seed(seed: int, step: int, position: int) -> int:
    """The seed of one example's on-policy choice and sampling: a function of the run's seed,
    the step and the example's place in the step's global batch, nothing else."""
    return ((seed * 1_000_003 + step) * 1_000_033 + position) % (2**63 - 1)


class OnPolicy:
    """Replaces the completions of a seeded share of each step's examples with the student's own.

    Args:
        lmbda: the share of examples whose completion the student generates, in [0, 1]
            (0: none, every batch as the dataset gives it; TRL GKD's ``lmbda``).
        max_new_tokens: the longest completion generated.
        sampling: :func:`attune.models.generate`'s ``temperature``, ``top_k`` and ``top_p``.
        stop_tokens: tokens that end a completion (kept in it, and trained).
        pad_id: the padding token.
        seed: the run's seed.
        batch_size: rows of a micro-batch on one process.
        rank, world_size: this process among the data-parallel ones; with more than one, the
            processes decode in step (a sharded student's forward pass is a collective).
    """

    def __init__(
        self,
        lmbda: float = 0.0,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        sampling: dict[str, Any] | None = None,
        stop_tokens: Sequence[int] = (),
        pad_id: int = 0,
        seed: int = 0,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ):
        check_lmbda({"lmbda": lmbda})
        self.lmbda = float(lmbda)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or {"temperature": 1.0}
        self.stop_tokens = list(stop_tokens)
        self.pad_id = pad_id
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def from_config(cls, cfg: Any, run: Run, tokenizer: Tokenizer) -> OnPolicy:
        """The settings a config gives (:data:`ON_POLICY_KEYS`, ``seed``, ``batch_size``)."""
        return cls(
            lmbda=cfg.get("lmbda") or 0.0,
            max_new_tokens=cfg.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS,
            sampling=sampling_options(cfg, temperature=1.0),
            stop_tokens=tokenizer.stop_token_ids,
            pad_id=tokenizer.padding_id,
            seed=cfg.get("seed", 0),
            batch_size=cfg.batch_size,
            rank=run.world.rank,
            world_size=run.world.world_size,
        )

    def check_dataset(self, dataset: Any) -> None:
        """A packed dataset with ``lmbda > 0``, said in one line."""
        if self.lmbda > 0 and getattr(dataset, "packed", False):
            raise ConfigError(
                "lmbda: on-policy distillation completes one example per row, and the dataset "
                "is packed; set dataset.packed: false (or lmbda: 0)"
            )

    def position(self, micro_batch: int, row: int) -> int:
        """An example's place in the step's global batch (the sampler deals the global order
        out to the ranks in turn)."""
        return (micro_batch * self.batch_size + row) * self.world_size + self.rank

    def __call__(
        self,
        student: TransformerDecoder,
        micro_batches: Sequence[dict[str, torch.Tensor]],
        step: int,
    ) -> list[dict[str, torch.Tensor]]:
        """The step's micro-batches, the chosen rows' completions generated by ``student``
        (eval mode, no gradients), each batch with its ``generated`` rows; the batches as
        they are when ``lmbda`` is 0."""
        if self.lmbda == 0:
            return list(micro_batches)
        return [self._mixed(student, batch, k, step) for k, batch in enumerate(micro_batches)]

    def _mixed(
        self, student: TransformerDecoder, batch: dict[str, torch.Tensor], k: int, step: int
    ) -> dict[str, torch.Tensor]:
        tokens, labels = batch["tokens"], batch["labels"]
        mask = batch.get("padding_mask")
        lengths = mask.sum(-1).tolist() if mask is not None else [tokens.shape[1]] * len(tokens)
        rows = [
            {"tokens": tokens[i, :n].tolist(), "labels": labels[i, :n].tolist()}
            for i, n in enumerate(lengths)
        ]
        device = student.embed_tokens.weight.device
        chosen, prompts, generators = [], [], []
        for i, row in enumerate(rows):
            source = torch.Generator().manual_seed(row_seed(self.seed, step, self.position(k, i)))
            pick = torch.rand((), generator=source).item()
            sampling_seed = int(torch.randint(2**62, (), generator=source))
            trained = [t for t, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
            # a row trained from its first token has no prompt to complete: it stays as it is
            if pick < self.lmbda and trained and trained[0] > 0:
                chosen.append(i)
                prompts.append(row["tokens"][: trained[0]])
                generators.append(torch.Generator(device).manual_seed(sampling_seed))
        # a sharded student's forward is a collective: a process with nothing to complete
        # decodes a stand-in while the others decode theirs
        anyone = any_rank(bool(prompts)) if self.world_size > 1 else bool(prompts)
        if not prompts and anyone:
            self._generate(student, [rows[0]["tokens"][:1]], [torch.Generator(device)])
        elif prompts:
            completions = self._generate(student, prompts, generators)
            for i, prompt, completion in zip(chosen, prompts, completions, strict=True):
                rows[i] = {
                    "tokens": prompt + completion,
                    "labels": [IGNORE_INDEX] * len(prompt) + completion,
                }
        mixed = pad_collate(rows, self.pad_id)
        generated = torch.zeros(len(rows), dtype=torch.bool)
        generated[chosen] = True
        return {**mixed, "generated": generated}

    def _generate(
        self,
        student: TransformerDecoder,
        prompts: list[list[int]],
        generators: list[torch.Generator],
    ) -> list[list[int]]:
        was_training = student.training
        student.eval()
        try:
            return generate(
                student,
                prompts,
                self.max_new_tokens,
                **self.sampling,
                stop_tokens=self.stop_tokens,
                pad_id=self.pad_id,
                generator=generators,
                all_ranks=self.world_size > 1,
            )
        finally:
            student.train(was_training)

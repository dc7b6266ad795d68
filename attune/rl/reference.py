"""The reference model of preference training, live or precomputed.

DPO and its relatives compare the policy with a frozen reference. Three ways to have it:

- LoRA: the policy itself with its adapters switched off (:func:`attune.peft.disabled_adapters`),
  so no second copy of the weights is held;
- full training: a frozen copy of the starting model (sharded like the policy under FSDP);
- precomputed: every pair's reference log-probabilities computed once before training
  (:class:`ReferenceLogprobs`), cached on disk beside the run, after which the reference
  model is not needed at all.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from attune.data.collate import preference_collate
from attune.data.tokenized import TokenizedDataset
from attune.distributed import all_ranks_sum
from attune.models import TransformerDecoder
from attune.precision import Precision
from attune.rl.logprobs import PairLogprobs, pair_logprobs


def reference_fingerprint(dataset: TokenizedDataset, model_source: str | Path | None) -> str:
    """What the cached log-probabilities depend on: the tokenized examples kept and the
    reference model's checkpoint."""
    table = getattr(dataset.table, "_fingerprint", None)
    key = json.dumps(
        {
            "table": table,
            "examples": len(dataset),
            "max_seq_len": dataset.max_seq_len,
            "model": str(model_source),
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


@dataclass
class ReferenceLogprobs:
    """Every pair's reference log-probabilities, by dataset index.

    Attributes:
        chosen: ``[examples]`` fp32 summed log-probabilities of the chosen completions.
        rejected: ``[examples]`` the same for the rejected ones.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor

    def lookup(self, pair_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[pairs]`` dataset indices -> the pairs' ``(chosen, rejected)``, on their device."""
        index = pair_index.cpu()
        device = pair_index.device
        return self.chosen[index].to(device), self.rejected[index].to(device)

    def save(self, path: Path, fingerprint: str) -> None:
        """Write to ``path`` (atomically: a crash leaves no torn file)."""
        partial = path.with_name(f".{path.name}.partial")
        tensors = {"chosen": self.chosen.contiguous(), "rejected": self.rejected.contiguous()}
        save_file(tensors, str(partial), metadata={"fingerprint": fingerprint})
        partial.replace(path)

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> ReferenceLogprobs | None:
        """The cache at ``path`` when it was made for ``fingerprint``, else None."""
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("fingerprint") != fingerprint:
                return None
        tensors = load_file(str(path))
        return cls(tensors["chosen"], tensors["rejected"])

    @classmethod
    @torch.no_grad()
    def compute(
        cls,
        score: Callable[[dict[str, torch.Tensor]], PairLogprobs],
        dataset: TokenizedDataset,
        batch_size: int,
        pad_id: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> ReferenceLogprobs:
        """One pass over the whole dataset with the reference model.

        Args:
            score: a batch on ``device`` -> its pairs' log-probabilities under the reference.
            dataset: the preference dataset.
            batch_size: pairs per forward pass.
            pad_id: the padding token.
            device: where the reference model is.
            rank, world_size: ranks share the pairs (every rank makes the same number of
                forward passes, as sharded models need) and end with all of them.
        """
        size = len(dataset)
        share = list(range(rank, size, world_size))
        passes = math.ceil(math.ceil(size / world_size) / batch_size)
        # ranks with fewer pairs repeat their first one, to make the same forward passes
        padded = share + [share[0] if share else 0] * (passes * batch_size - len(share))
        keep = torch.tensor([True] * len(share) + [False] * (len(padded) - len(share)))
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=padded,
            collate_fn=functools.partial(preference_collate, pad_id=pad_id),
        )
        chosen = torch.zeros(size, dtype=torch.float32)
        rejected = torch.zeros(size, dtype=torch.float32)
        for number, batch in enumerate(loader):
            batch = {name: value.to(device) for name, value in batch.items()}
            scored = score(batch)
            kept = keep[number * batch_size : number * batch_size + len(batch["pair_index"])]
            index = batch["pair_index"].cpu()[kept]
            chosen[index] = scored.chosen.float().cpu()[kept]
            rejected[index] = scored.rejected.float().cpu()[kept]
        if world_size > 1:
            # each pair was scored on exactly one rank; the others hold zeros for it
            chosen, rejected = all_ranks_sum(torch.stack([chosen, rejected])).unbind(0)
        return cls(chosen, rejected)


@contextlib.contextmanager
def reference_context(model: TransformerDecoder) -> Iterator[None]:
    """No gradients, and the model in eval mode inside the block (put back after)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def reference_scorer(
    model: TransformerDecoder,
    adapters_off: bool,
    precision: Precision | None = None,
) -> Callable[[dict[str, torch.Tensor]], PairLogprobs]:
    """A batch -> its pairs' reference log-probabilities, from ``model`` (the policy with its
    adapters switched off when ``adapters_off``, else a frozen reference copy), without
    gradients."""
    from attune.peft import disabled_adapters

    def score(batch: dict[str, torch.Tensor]) -> PairLogprobs:
        adapters = disabled_adapters(model) if adapters_off else contextlib.nullcontext()
        with reference_context(model), adapters:
            return pair_logprobs(model, batch, precision)

    return score

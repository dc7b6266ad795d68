"""Micro-batches for one rank, a step's worth at a time, with a position that resumes exactly.

A step consumes ``gradient_accumulation_steps`` micro-batches of ``batch_size`` items (examples,
or packs) on every rank, all from the sampler's global order. The stream counts what the
training loop has taken, not what the DataLoader prefetched, so a checkpoint's position is the
first item not yet trained on. An epoch's last micro-batches that do not fill a whole step are
skipped, so every step has the same shape of work.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from attune.data.tokenized import TokenizedDataset


class BatchStream:
    """Steps of micro-batches from a :class:`TokenizedDataset`.

    Args:
        dataset: the tokenized dataset.
        batch_size: items per micro-batch on this rank.
        gradient_accumulation_steps: micro-batches per optimizer step.
        pad_id: the padding token.
        seed: the seed of the data order.
        rank, world_size: this process's place among the data-parallel ranks.
        shuffle: a new permutation every epoch (otherwise dataset order).
        max_steps_per_epoch: end an epoch after this many steps (None: the whole epoch).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        gradient_accumulation_steps: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        max_steps_per_epoch: int | None = None,
        num_workers: int = 0,
    ):
        self.sampler = dataset.sampler(seed, rank, world_size, shuffle)
        self.loader = DataLoader(
            dataset.loading_view(),
            batch_size=batch_size,
            sampler=self.sampler,
            collate_fn=dataset.collate_fn(pad_id),
            num_workers=num_workers,
        )
        self.accumulation = gradient_accumulation_steps
        self.items_per_step = batch_size * world_size * gradient_accumulation_steps
        self.max_steps_per_epoch = max_steps_per_epoch
        self.position = 0  # items of this epoch consumed by the steps taken, all ranks together

    @classmethod
    def from_config(
        cls, cfg: Any, dataset: TokenizedDataset, pad_id: int, world: Any
    ) -> BatchStream:
        """The stream a recipe's config asks for: ``batch_size``, ``gradient_accumulation_steps``,
        ``seed``, ``max_steps_per_epoch`` and ``num_workers``, on this process's rank."""
        return cls(
            dataset,
            batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.get("gradient_accumulation_steps", 1),
            pad_id=pad_id,
            seed=cfg.get("seed", 0),
            rank=world.rank,
            world_size=world.world_size,
            max_steps_per_epoch=cfg.get("max_steps_per_epoch"),
            num_workers=cfg.get("num_workers", 0),
        )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def steps_per_epoch(self) -> int:
        """Optimizer steps in a whole epoch."""
        total = len(self.sampler.units(self.sampler.epoch)) // self.items_per_step
        if self.max_steps_per_epoch is not None:
            total = min(total, self.max_steps_per_epoch)
        return total

    def steps_done_in_epoch(self) -> int:
        return self.position // self.items_per_step

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.sampler.set_epoch(epoch)
        self.position = 0

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The rest of this epoch, a step (a list of micro-batches) at a time."""
        remaining = self.steps_per_epoch() - self.steps_done_in_epoch()
        if remaining <= 0:
            return
        self.sampler.consumed = self.position
        micro_batches: list[dict[str, torch.Tensor]] = []
        for batch in self.loader:
            micro_batches.append(batch)
            if len(micro_batches) == self.accumulation:
                self.position += self.items_per_step
                yield micro_batches
                micro_batches = []
                remaining -= 1
                if remaining == 0:
                    return

    def state_dict(self) -> dict[str, Any]:
        """The position after the last step taken (not what the loader prefetched)."""
        return self.sampler.state_dict(consumed=self.position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.position = self.sampler.consumed


def eval_batches(
    dataset: TokenizedDataset,
    batch_size: int,
    pad_id: int,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """The whole dataset in order, this rank's share, for a validation pass."""
    sampler = dataset.sampler(seed=0, rank=rank, world_size=world_size, shuffle=False)
    return DataLoader(
        dataset.loading_view(),
        batch_size=batch_size,
        sampler=_Replay(sampler),
        collate_fn=dataset.collate_fn(pad_id),
    )


class _Replay:
    """A sampler that starts its epoch afresh each time it is iterated."""

    def __init__(self, sampler: Any):
        self.sampler = sampler

    def __len__(self) -> int:
        self.sampler.set_epoch(0)
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        self.sampler.set_epoch(0)
        return iter(self.sampler)

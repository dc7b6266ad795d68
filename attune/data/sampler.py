"""A sampler whose global order of samples depends on the seed alone.

Each epoch is one permutation of the dataset, drawn from a generator seeded with
``seed + epoch`` (as :class:`torch.utils.data.DistributedSampler` does). A rank takes the
positions ``rank, rank + world_size, ...`` of it, so at every step the ranks together consume
the next ``world_size`` samples of the same global sequence, whatever the number of ranks or
the micro-batch size: ranks x micro-batch x accumulation is what makes a global batch, and
it is filled from the same sequence. The tail of an epoch that does not fill every rank is
dropped (fewer than ``world_size`` samples).

The sampler remembers how many samples of the epoch were drawn globally, so a run can save
its position and resume it exactly, mid-epoch. A DataLoader with worker processes draws
indices ahead of their use; the training loop then saves the position it actually reached
(``state_dict(consumed=...)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class GlobalOrderSampler(Sampler[Any]):
    """Indices for one rank, from a seeded global order, resumable mid-epoch.

    Subclasses yield other units made from the same order (:meth:`units`), such as packs.

    Args:
        num_samples: the dataset's length.
        seed: the seed of every epoch's permutation.
        rank: this process's rank.
        world_size: the number of ranks reading the dataset.
        shuffle: permute each epoch (otherwise the order is 0, 1, 2, ...).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.consumed = 0  # items of this epoch consumed by all ranks together
        self._cached_epoch: int | None = None
        self._cached_units: list[Any] = []

    def global_order(self, epoch: int) -> list[int]:
        """The whole epoch's sequence of dataset indices, as every rank sees it."""
        if not self.shuffle:
            return list(range(self.num_samples))
        # seeded as torch's DistributedSampler is, so a seed gives the order torchtune and
        # TRL draw for it: runs of the same data can be compared batch for batch
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def units(self, epoch: int) -> list[Any]:
        """The epoch's global sequence of what the sampler yields: here, dataset indices."""
        return self.global_order(epoch)

    def _epoch_units(self) -> list[Any]:
        if self._cached_epoch != self.epoch:
            self._cached_units, self._cached_epoch = self.units(self.epoch), self.epoch
        return self._cached_units

    def __len__(self) -> int:
        """How many items this rank yields in the rest of the epoch."""
        total = len(self._epoch_units())
        usable = total - total % self.world_size
        return max(usable - self.consumed, 0) // self.world_size

    def __iter__(self) -> Iterator[Any]:
        units = self._epoch_units()
        usable = len(units) - len(units) % self.world_size
        for start in range(self.consumed, usable, self.world_size):
            # advance first: a checkpoint taken after this item was used resumes past it
            self.consumed = start + self.world_size
            yield units[start + self.rank]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch = epoch
        self.consumed = 0

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The position to save with a checkpoint.

        Args:
            consumed: samples of this epoch the ranks have used together, when that is less
                than the sampler has drawn (DataLoader workers prefetch).
        """
        position = self.consumed if consumed is None else consumed
        return {
            "epoch": self.epoch,
            "consumed": position,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a saved position (same seed and dataset size as when it was saved)."""
        if state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's data order used seed {state['seed']}, this run {self.seed}"
            )
        saved_size = state.get("num_samples", self.num_samples)
        if saved_size != self.num_samples:
            raise ValueError(
                f"the checkpoint was taken on a dataset of {saved_size} samples, this run has "
                f"{self.num_samples}: the data changed, so its position cannot be resumed"
            )
        self.epoch = state["epoch"]
        self.consumed = state["consumed"]

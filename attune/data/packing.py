"""Packing on the fly: whole examples laid end to end in rows of ``max_seq_len`` tokens.

Packs are cut from the sampler's global order, greedily: examples join the current pack in
order until the next one does not fit, which starts a new pack. Only the examples' lengths are
needed for that (one integer each); the tokens are read from the on-disk dataset when a pack is
loaded, so memory does not grow with the dataset. Since packs come from the global order, the
sequence of packs depends on the seed only; ranks take every ``world_size``-th pack, and a
run resumes at the exact pack it stopped at.

An example is never split across packs. Each keeps its own document id in the batch, so the
model attends within it only and restarts its positions (see :func:`attune.data.collate.
pack_collate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from attune.data.sampler import GlobalOrderSampler


def greedy_packs(order: Sequence[int], lengths: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Split ``order`` into consecutive runs whose lengths sum to at most ``max_seq_len``.

    Raises:
        ValueError: an example is longer than ``max_seq_len`` (truncate or drop it first).
    """
    packs: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index in order:
        length = lengths[index]
        if length > max_seq_len:
            raise ValueError(f"example {index} has {length} tokens, more than {max_seq_len}")
        if current and filled + length > max_seq_len:
            packs.append(current)
            current, filled = [], 0
        current.append(index)
        filled += length
    if current:
        packs.append(current)
    return packs


class PackingSampler(GlobalOrderSampler):
    """Packs of dataset indices for one rank, cut from the seeded global order.

    Args:
        lengths: each example's number of tokens.
        max_seq_len: the most tokens in a pack.
        seed, rank, world_size, shuffle: as for :class:`GlobalOrderSampler`.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        super().__init__(len(lengths), seed, rank, world_size, shuffle)
        self.lengths = lengths
        self.max_seq_len = max_seq_len

    def units(self, epoch: int) -> list[list[int]]:
        return greedy_packs(self.global_order(epoch), self.lengths, self.max_seq_len)


class PackedDataset(Dataset):
    """A dataset read a pack at a time: ``packed[[3, 9, 4]]`` is those three examples.

    Args:
        dataset: any dataset of examples (``dataset[i]`` is one).
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, pack: Sequence[int]) -> list[Any]:
        return [self.dataset[index] for index in pack]

"""The ground floor of reductions across ranks: itself on one process, sums and agreement over
two gloo processes (exact integers stay integers)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attune import distributed


def test_one_process_returns_its_own_values():
    assert not distributed.is_distributed() and distributed.world_size() == 1
    assert distributed.all_ranks_sums([3, 1.5]) == [3, 1.5]
    value = torch.tensor([1.0, 2.0])
    assert distributed.all_ranks_sum(value) is value
    assert distributed.any_rank(True) and not distributed.any_rank(False)


def _worker(rank: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        sums = distributed.all_ranks_sums([rank + 1, 2**40 + rank])
        floats = distributed.all_ranks_sums([0.5 * (rank + 1), 1])
        tensor = distributed.all_ranks_sum(torch.tensor([rank, 10.0], dtype=torch.float32))
        anyone = distributed.any_rank(rank == 1)
        torch.save(
            {"sums": sums, "floats": floats, "tensor": tensor, "any": anyone},
            f"{results}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_sum_and_agree(tmp_path):
    results = str(tmp_path / "result")
    mp.spawn(_worker, args=(str(tmp_path / "store"), results), nprocs=2)
    for rank in (0, 1):
        got = torch.load(f"{results}.{rank}")
        assert got["sums"] == [3, 2**41 + 1]  # exact: 2**41 + 1 does not survive float32
        assert all(isinstance(value, int) for value in got["sums"])
        assert got["floats"] == [1.5, 2.0]
        assert got["tensor"].tolist() == [1.0, 20.0]
        assert got["any"] is True

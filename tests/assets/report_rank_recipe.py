"""A test-only recipe: each process reports its rank, world size and config to a JSON file.

Under torchrun it joins a gloo process group and all-reduces its rank, so the report proves
the processes really talked to each other.
"""

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from attune import config
from attune.errors import AttuneError

SCHEMA = {
    "output_dir": str,
    "message": str,
    "fail_on_rank": config.Field(int | None, required=False),
    "model": config.Component(required=False),
}


@config.parse(SCHEMA)
def recipe_main(cfg):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, rank_sum = 0, 0
    if world_size > 1:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        total = torch.tensor([rank])
        dist.all_reduce(total)
        rank_sum = int(total.item())
    if cfg.get("fail_on_rank") == rank:
        raise AttuneError(f"asked to fail on rank {rank}")
    model = config.instantiate(cfg.get("model"))
    report = {
        "rank": rank,
        "world_size": world_size,
        "rank_sum": rank_sum,
        "message": cfg.message,
        "model": repr(model),
    }
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    print(f"rank {rank} of {world_size}: {cfg.message}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    recipe_main()

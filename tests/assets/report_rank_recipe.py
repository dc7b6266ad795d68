"""A test-only recipe: each process reports its rank, world size and config to a JSON file.

Under torchrun it joins a gloo process group and all-reduces its rank, so the report proves
the processes really talked to each other.
"""

import json
import os
import sys
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
    if world_size == 1:
        return report(cfg, rank=0, world_size=1, rank_sum=0)
    # A gloo group still alive at interpreter exit can abort the process: always destroy it.
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        total = torch.tensor([rank])
        dist.all_reduce(total)
        report(cfg, rank, world_size, int(total.item()))
    finally:
        dist.destroy_process_group()


def report(cfg, rank, world_size, rank_sum):
    if cfg.get("fail_on_rank") == rank:
        raise AttuneError(f"asked to fail on rank {rank}")
    model = config.instantiate(cfg.get("model"))
    result = {
        "rank": rank,
        "world_size": world_size,
        "rank_sum": rank_sum,
        "message": cfg.message,
        "model": repr(model),
    }
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    # One write per line: workers share the pipe, and a short write to it is atomic, where
    # print's separate newline write could interleave with the other worker's line.
    sys.stdout.write(f"rank {rank} of {world_size}: {cfg.message}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    recipe_main()

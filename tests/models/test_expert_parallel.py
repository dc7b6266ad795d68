"""Expert parallelism's dispatch on gloo processes: the experts split between them, rows sent to
their experts' processes and back by all-to-all, equal the whole layer run locally (forward and
backward), with every process in the expert group and with the experts' shards gathered over
replicas. Its own module, light to import, since each process imports it."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attune import models
from attune.models import moe

EXPERTS = 8


def tiny_moe_config():
    return models.DecoderConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=8, num_experts=EXPERTS, num_experts_per_tok=2,
        moe_intermediate_size=12,
    )  # fmt: skip


def routing(processes: int):
    """Each process's rows, routing and upstream gradients: the last process routes only to
    the second half of the experts; expert 2 gets no row at all."""
    x = torch.randn(processes, 10, 16)
    scores = torch.rand(processes, 10, EXPERTS)
    scores[..., 2] = -1
    scores[-1, :, : EXPERTS // 2] = -1
    indices = scores.topk(2, dim=-1).indices
    return x, indices, torch.rand(processes, 10, 2), torch.randn(processes, 10, 16)


def _worker(rank: int, processes: int, store: str, results: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from attune.distributed import World
    from attune.training.sharding import split_experts

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=processes)
    try:
        world = World(rank, processes, rank, init_device_mesh("cpu", (processes,)))
        for degree in degrees(processes):
            torch.manual_seed(0)  # the same experts and rows on every process
            experts = moe.GroupedExperts(tiny_moe_config())
            x, indices, weights, upstream = routing(processes)
            assert len(split_experts(experts, world, degree)) == 2
            assert experts.expert_parallel is not None
            experts.expert_parallel.gradient_scale = 1.0  # sums, as the whole layer's
            mine = x[rank].clone().requires_grad_()
            out = experts(mine, indices[rank], weights[rank])
            (out * upstream[rank]).sum().backward()
            grads = {n: p.grad.to_local() for n, p in experts.named_parameters()}
            saved = {"out": out.detach(), "x": mine.grad, **grads}
            torch.save(saved, f"{results}.{degree}.{rank}")
    finally:
        dist.destroy_process_group()


def degrees(processes: int) -> list[int]:
    """Expert groups of every process, of some (each process's experts gathered from its
    replicas' shards), of one (all experts gathered, no all-to-all)."""
    return [d for d in (processes, 2, 1) if d <= processes and processes % d == 0]


@pytest.mark.parametrize(
    "processes",
    [2, pytest.param(4, marks=pytest.mark.skipif((os.cpu_count() or 1) < 4, reason="4 cores"))],
)
def test_dispatch_equals_the_local_layer_forward_and_backward(tmp_path, processes):
    """Outputs and the rows' gradients equal the whole layer's on each process's rows; each
    process's shard of an expert's gradient sums every process's contributions."""
    results = str(tmp_path / "result")
    mp.spawn(_worker, args=(processes, str(tmp_path / "store"), results), nprocs=processes)
    torch.manual_seed(0)
    experts = moe.GroupedExperts(tiny_moe_config())
    x, indices, weights, upstream = routing(processes)
    x.requires_grad_()
    rows = processes * 10
    out = experts(x.view(rows, 16), indices.view(rows, 2), weights.view(rows, 2))
    (out.view(processes, 10, 16) * upstream).sum().backward()
    assert experts.down_proj.grad[2].abs().sum() == 0
    stored = EXPERTS // processes
    for degree in degrees(processes):
        for rank in range(processes):
            got = torch.load(f"{results}.{degree}.{rank}")
            torch.testing.assert_close(got["out"], out.view(processes, 10, 16)[rank])
            torch.testing.assert_close(got["x"], x.grad[rank])
            for name in ("gate_up_proj", "down_proj"):
                wanted = experts.get_parameter(name).grad[rank * stored : (rank + 1) * stored]
                torch.testing.assert_close(got[name], wanted, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("processes", "degree", "experts", "cpu_offload", "message"),
    [
        (1, 2, EXPERTS, False, "this run has one; launch it with tune run --nproc_per_node 2"),
        (4, 3, EXPERTS, False, "does not divide this run's 4 processes"),
        (4, 2, None, False, "no mixture-of-experts layer"),
        (4, 2, 6, False, "6 experts per layer do not split evenly over the 4 processes"),
        (2, 2, EXPERTS, True, "cpu_offload=true do not go together yet"),
    ],
)
def test_a_degree_the_run_cannot_have_is_refused(processes, degree, experts, cpu_offload, message):
    from attune.errors import ConfigError
    from attune.training.sharding import check_expert_parallel

    config = tiny_moe_config()
    model = torch.nn.Linear(2, 2) if experts is None else moe.SparseMoE(config)
    if experts is not None:
        model.experts.num_experts = experts
    with pytest.raises(ConfigError, match=message):
        check_expert_parallel(model, processes, degree, cpu_offload)
    check_expert_parallel(model, processes, 1, cpu_offload)  # none is always fine

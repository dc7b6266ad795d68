import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from attune.training import build_optimizer


@pytest.fixture
def one_process_mesh():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_plain_parameters_get_the_fused_kernel():
    param = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = build_optimizer({"_component_": "torch.optim.SGD", "lr": 0.1}, [param])
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize(
    ("component", "fused"),
    [("torch.optim.AdamW", True), ("torch.optim.SGD", None), ("torch.optim.Adagrad", None)],
)
def test_sharded_parameters_are_fused_only_where_a_dtensor_rule_exists(
    one_process_mesh, component, fused
):
    param = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), one_process_mesh, [Shard(0)]))
    param.grad = distribute_tensor(torch.ones(4, 4), one_process_mesh, [Shard(0)])
    before = param.full_tensor().clone()
    optimizer = build_optimizer({"_component_": component, "lr": 0.1}, [param])
    assert optimizer.defaults.get("fused") is fused
    optimizer.step()  # a fused kernel without a DTensor rule fails here
    assert not torch.equal(param.full_tensor(), before)

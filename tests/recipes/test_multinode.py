"""Many machines, simulated on one: two torchrun agents (``--nnodes 2``, one process each) meet
through a c10d rendezvous on localhost and train with the losses of one process."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.conftest import tune_command
from tests.recipes.conftest import losses, run_tune_in_process, write_config


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_give_the_losses_of_one_process(tmp_path, checkpoint):
    overrides = {"max_steps": 4}
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    single = write_config(tmp_path / "one", checkpoint, "tiny/full", **overrides)
    result = run_tune_in_process(
        "run", "full_finetune_single_device", "--config", str(single), "batch_size=4"
    )
    assert result.returncode == 0, result.stderr[-3000:]

    nodes = write_config(tmp_path / "two", checkpoint, "tiny/full", **overrides)
    endpoint = f"127.0.0.1:{_free_port()}"
    launcher = [
        *tune_command(),
        "run",
        "--nnodes", "2",
        "--nproc_per_node", "1",
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", endpoint,
        "--rdzv_id", "attune-multinode-test",
    ]  # fmt: skip
    agents = [
        subprocess.Popen(
            [*launcher, "full_finetune_distributed", "--config", str(nodes), "batch_size=2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [agent.communicate(timeout=240) for agent in agents]
    for agent, (_, err) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, err[-3000:]
    one, two = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5, (one, two)

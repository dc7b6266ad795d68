"""Device, dtype, autocast, seeds and random-number state."""

import random

import numpy as np
import pytest
import torch

from attune.errors import ConfigError
from attune.training.runtime import (
    autocast,
    peak_memory_gb,
    resolve_device,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
    state_memory_gb,
)

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("fp32", torch.float32), ("bf16", torch.bfloat16), ("float16", torch.float16)],
)
def test_dtype_names(name, dtype):
    assert resolve_dtype(name) is dtype


def test_an_unknown_dtype_is_one_line_with_a_hint():
    with pytest.raises(ConfigError) as error:
        resolve_dtype("bf61")
    assert str(error.value) == "dtype: unknown 'bf61'; did you mean 'bf16'? (use fp32 or bf16)"


def test_a_bad_device_is_one_line():
    with pytest.raises(ConfigError) as error:
        resolve_device("gpu")
    assert "\n" not in str(error.value)
    assert str(error.value) == "device: 'gpu' is not a device (use auto, cpu or cuda)"


@no_gpu
def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_refused():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    with pytest.raises(
        ConfigError, match=r"^device: cuda was asked for, but this machine has no GPU$"
    ):
        resolve_device("cuda:1")


def test_autocast_none_changes_nothing_and_a_name_casts():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), None):
        assert torch.is_autocast_enabled("cpu") is False
        assert (a @ b).dtype is torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype is torch.bfloat16
    with pytest.raises(ConfigError, match="dtype: unknown"):
        autocast(torch.device("cpu"), "int3")


def draws():
    return random.random(), torch.rand(3), torch.randint(0, 1000, (2,))


def test_rng_state_round_trip_reproduces_the_draws_through_a_weights_only_save(tmp_path):
    seed_everything(5)
    draws()
    torch.save(rng_state(), tmp_path / "rng.pt")
    first = draws()
    draws()  # the generators move on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = draws()
    assert first[0] == again[0]
    assert torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])


def test_seed_everything_seeds_python_numpy_and_torch():
    seed_everything(2**32 + 7)  # numpy takes it modulo 2**32
    first = (random.random(), np.random.rand(), torch.rand(1))
    seed_everything(2**32 + 7)
    assert (random.random(), np.random.rand(), torch.rand(1)) == first
    seed_everything(8)
    assert random.random() != first[0]


def test_state_memory_counts_trainable_twice_frozen_once_and_optimizer_state():
    model = torch.nn.Linear(4, 4)  # weight 16 floats, bias 4
    model.bias.requires_grad_(False)
    sgd = torch.optim.SGD([model.weight], lr=0.1)  # no state
    assert state_memory_gb(model, sgd) * 2**30 == 16 * 4 * 2 + 4 * 4
    model.weight.grad = torch.ones_like(model.weight)
    adam = torch.optim.Adam([model.weight], lr=0.1)
    adam.step()  # exp_avg and exp_avg_sq (16 floats each), step (one float)
    assert state_memory_gb(model, adam) * 2**30 == 16 * 4 * 2 + 4 * 4 + 16 * 4 * 2 + 4


def test_peak_memory_on_the_cpu_is_the_process_peak():
    peak = peak_memory_gb(torch.device("cpu"))
    assert 0.01 < peak < 1024  # this process holds at least torch: tens of MiB at least

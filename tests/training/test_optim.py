"""build_optimizer (fused kernels, weight decay groups) and the learning-rate schedules."""

import ast
import functools
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from attune import models
from attune.errors import ConfigError
from attune.models.families import llama_keys_to_hf
from attune.peft import LoraSettings, apply_lora
from attune.training.optim import (
    build_optimizer,
    constant_with_warmup,
    cosine_with_warmup,
    linear_with_warmup,
)


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


# --- weight decay groups: transformers' Trainer as the referee ------------------------------

DECAYING = {"_component_": "torch.optim.AdamW", "lr": 0.1, "weight_decay": 0.5}


def transformers_decay_names(model: torch.nn.Module) -> set[str]:
    """``transformers.Trainer.get_decay_parameter_names(model)``, run from transformers'
    own source: importing ``transformers.trainer`` itself would cost this suite seconds."""
    from transformers import trainer_pt_utils
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

    source = importlib.util.find_spec("transformers.trainer").origin
    tree = ast.parse(Path(source).read_text(encoding="utf-8"))
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    method = next(
        n
        for n in trainer.body
        if isinstance(n, ast.FunctionDef) and n.name == "get_decay_parameter_names"
    )
    namespace = {
        "nn": torch.nn,
        "get_parameter_names": trainer_pt_utils.get_parameter_names,
        "ALL_LAYERNORM_LAYERS": ALL_LAYERNORM_LAYERS,
    }
    exec(compile(ast.Module([method], []), source, "exec"), namespace)
    return set(namespace["get_decay_parameter_names"](None, model))


def undecayed_names(optimizer, model: torch.nn.Module) -> set[str]:
    names = {id(param): name for name, param in model.named_parameters()}
    return {
        names[id(param)]
        for group in optimizer.param_groups
        if group["weight_decay"] == 0
        for param in group["params"]
    }


@pytest.mark.parametrize(
    "case",
    [
        "llama_gqa_untied",
        "qwen2_tied_biases",  # q/k/v biases
        "qwen3_qk_norm",  # q_norm, k_norm
        "gemma2_softcaps_sandwich_sliding",  # pre/post feed-forward norms
        "gemma3_local_global_rope_qk_norm",
    ],
)
def test_undecayed_tensors_are_those_transformers_trainer_leaves_undecayed(case):
    transformers = pytest.importorskip("transformers")
    from tests.models.hf_reference import CASES, TINY

    config_class, extra = CASES[case]
    hf_config = getattr(transformers, config_class)(**{**TINY, **extra})
    reference = transformers.AutoModelForCausalLM.from_config(hf_config)
    model = models.from_hf_config(hf_config.to_dict())
    hf_names = {name for name, _ in reference.named_parameters()}
    assert {llama_keys_to_hf(name) for name, _ in model.named_parameters()} == hf_names
    expected = hf_names - transformers_decay_names(reference)

    optimizer = build_optimizer(DECAYING, model.named_parameters())
    actual = {llama_keys_to_hf(name) for name in undecayed_names(optimizer, model)}
    assert actual == expected
    assert any("norm" in name for name in actual)  # the split is not empty
    assert len(actual) < len(hf_names)
    assert optimizer.param_groups[0]["weight_decay"] == 0.5


def tiny_qwen2():
    torch.manual_seed(0)
    return models.from_hf_config(
        dict(
            model_type="qwen2",
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    )


def step_with_zero_gradients(optimizer, model):
    """One step with zero gradients: Adam's update is 0, so only decay moves a tensor."""
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    return {name: not torch.equal(param, before[name]) for name, param in model.named_parameters()}


def test_a_step_decays_weights_but_not_biases_or_norms():
    model = tiny_qwen2()
    optimizer = build_optimizer(DECAYING, model.named_parameters())
    moved = step_with_zero_gradients(optimizer, model)
    assert {name for name, m in moved.items() if not m} == {
        "layers.0.input_layernorm.weight",
        "layers.0.self_attn.q_proj.bias",
        "layers.0.self_attn.k_proj.bias",
        "layers.0.self_attn.v_proj.bias",
        "layers.0.post_attention_layernorm.weight",
        "norm.weight",
    }
    # decoupled decay: each decayed weight shrinks by lr * weight_decay
    fresh = tiny_qwen2()
    assert torch.allclose(model.lm_head.weight, fresh.lm_head.weight * (1 - 0.1 * 0.5))


def test_decay_norms_and_biases_true_decays_every_tensor_in_one_group():
    model = tiny_qwen2()
    node = OmegaConf.create({"optimizer": {**DECAYING, "decay_norms_and_biases": True}})
    optimizer = build_optimizer(node.optimizer, model.named_parameters())
    assert len(optimizer.param_groups) == 1
    assert all(step_with_zero_gradients(optimizer, model).values())
    assert "decay_norms_and_biases" in node.optimizer  # the config itself is left as it was


def test_without_decay_or_without_names_there_is_one_group_as_before():
    """weight_decay 0 (the tiny configs), bare parameters (the old call), or nothing to
    exclude (LoRA's adapters alone): the one group of a flat parameter list."""
    model = tiny_qwen2()
    no_decay = {"_component_": "torch.optim.AdamW", "lr": 0.1, "weight_decay": 0.0}
    assert len(build_optimizer(no_decay, model.named_parameters()).param_groups) == 1
    assert len(build_optimizer(DECAYING, model.parameters()).param_groups) == 1
    # AdamW decays by default (0.01): a node without weight_decay still splits
    default = {"_component_": "torch.optim.AdamW", "lr": 0.1}
    assert len(build_optimizer(default, model.named_parameters()).param_groups) == 2

    apply_lora(model, LoraSettings(rank=2, target_modules="all-linear", use_dora=True))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(name.endswith("lora_magnitude_vector") for name, _ in trainable)
    optimizer = build_optimizer(DECAYING, trainable)
    assert len(optimizer.param_groups) == 1  # DoRA's magnitudes decay, as under transformers
    assert optimizer.param_groups[0]["weight_decay"] == 0.5


def test_two_groups_keep_the_fused_kernel_and_interpolations():
    model = tiny_qwen2()
    node = OmegaConf.create(
        {
            "base_lr": 0.25,
            "optimizer": {**DECAYING, "lr": "${base_lr}", "decay_norms_and_biases": False},
        }
    ).optimizer
    optimizer = build_optimizer(node, model.named_parameters())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    assert optimizer.defaults["fused"] is True
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.25]


def test_a_bad_option_or_mixed_parameters_are_refused():
    model = tiny_qwen2()
    with pytest.raises(
        ConfigError, match=r"optimizer\.decay_norms_and_biases: expected true or false"
    ):
        build_optimizer({**DECAYING, "decay_norms_and_biases": "no"}, model.named_parameters())
    mixed = [*model.named_parameters(), model.lm_head.weight]
    with pytest.raises(TypeError, match="not both"):
        build_optimizer(DECAYING, mixed)


@pytest.mark.parametrize("name", ["foreach", "fused"])
def test_a_config_that_chooses_the_kernel_is_obeyed(name):
    param = torch.nn.Parameter(torch.randn(4, 4))
    node = {"_component_": "torch.optim.AdamW", "lr": 0.1, name: False}
    optimizer = build_optimizer(node, [param])
    assert not optimizer.defaults.get("fused")


def test_parameters_off_cpu_and_cuda_do_not_get_the_fused_kernel():
    on_meta = torch.nn.Parameter(torch.randn(4, 4, device="meta"))
    node = {"_component_": "torch.optim.SGD", "lr": 0.1}
    assert build_optimizer(node, [on_meta]).defaults.get("fused") is None


# --- schedules -------------------------------------------------------------------------------


def schedule_lrs(factory, steps=10, **kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = factory(optimizer, **kwargs)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return values


TOTAL, WARMUP = 12, 3


@pytest.mark.parametrize(
    ("ours", "theirs", "kwargs"),
    [
        (cosine_with_warmup, "get_cosine_schedule_with_warmup", {"num_training_steps": TOTAL}),
        (linear_with_warmup, "get_linear_schedule_with_warmup", {"num_training_steps": TOTAL}),
        (constant_with_warmup, "get_constant_schedule_with_warmup", {}),
        (
            functools.partial(cosine_with_warmup, min_lr_ratio=0.1),
            "get_cosine_with_min_lr_schedule_with_warmup",
            {"num_training_steps": TOTAL, "min_lr_rate": 0.1},
        ),
    ],
)
def test_schedules_after_warmup_equal_transformers(ours, theirs, kwargs):
    transformers = pytest.importorskip("transformers")
    reference = getattr(transformers, theirs)
    mine = schedule_lrs(ours, steps=TOTAL, num_training_steps=TOTAL, num_warmup_steps=WARMUP)
    expected = schedule_lrs(reference, steps=TOTAL, num_warmup_steps=WARMUP, **kwargs)
    # warmup differs on purpose: ours starts at lr/(warmup+1), not at 0 (a first step that
    # changes nothing), and reaches the full rate where transformers' does
    assert mine[:WARMUP] == pytest.approx([1 / 4, 2 / 4, 3 / 4])
    assert expected[0] == 0
    assert mine[WARMUP:] == pytest.approx(expected[WARMUP:], abs=1e-12)


def test_schedules_by_hand_at_warmup_middle_and_past_the_end():
    lrs = functools.partial(schedule_lrs, steps=14, num_training_steps=10, num_warmup_steps=2)
    cosine = lrs(functools.partial(cosine_with_warmup, min_lr_ratio=0.2))
    assert cosine[1] == pytest.approx(2 / 3)
    assert cosine[6] == pytest.approx(0.2 + 0.8 * 0.5)  # halfway through the decay
    assert cosine[10:] == pytest.approx([0.2] * 4)  # held at the floor past the end
    linear = lrs(linear_with_warmup)
    assert linear[2] == 1.0 and linear[4] == pytest.approx(1 - 2 / 8)
    assert linear[10:] == [0.0] * 4
    assert lrs(constant_with_warmup) == pytest.approx([1 / 3, 2 / 3] + [1.0] * 12)
    no_warmup = schedule_lrs(cosine_with_warmup, steps=3, num_training_steps=2)
    assert no_warmup == pytest.approx([1.0, 0.5, 0.0])

"""LoRA on mixture-of-experts models: one adapter per expert on the grouped weights, applied in
the grouped product; merging is exact; the router stays frozen; and the adapter attune writes
loads in peft (``target_parameters``) on the transformers model with the same logits."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from attune import models
from attune.errors import CheckpointError, ConfigError
from attune.models import moe
from attune.peft import (
    LoRAGroupedExperts,
    LoRALinear,
    LoraSettings,
    adapter_state_dict,
    apply_lora,
    disabled_adapters,
    load_adapter,
    merge_lora,
    merge_state_dict,
    merged_state_dict,
    save_adapter,
)
from tests.models.hf_reference import make_checkpoint, padded_batch

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# (reference case, settings): ranks that are not multiples of 8 take the padded-rank path
CASES = {
    "qwen3_moe_attention_and_experts": (
        "qwen3_moe_dense_layer_normalised_top3",
        LoraSettings(rank=3, alpha=5, target_modules=ATTENTION, target_parameters=EXPERTS),
    ),
    "qwen3_moe_all_linear_dense_layer_mlp": (
        "qwen3_moe_dense_layer_normalised_top3",
        LoraSettings(rank=4, alpha=8, target_modules="all-linear", use_rslora=True),
    ),
    "qwen3_moe_sliding_experts_only": (
        "qwen3_moe_every_second_layer_sliding",
        LoraSettings(rank=8, alpha=4, target_modules=[], target_parameters=EXPERTS),
    ),
    "qwen2_moe_shared_expert_all_linear": (
        "qwen2_moe_shared_expert_sliding_layers",
        LoraSettings(rank=2, alpha=4, target_modules="all-linear"),
    ),
    "mixtral_attention_and_experts": (
        "mixtral_sliding_window",
        LoraSettings(rank=4, alpha=16, target_modules=ATTENTION, target_parameters=EXPERTS),
    ),
    "mixtral_some_layers_one_projection_each": (
        "mixtral_sliding_window",
        LoraSettings(
            rank=2,
            alpha=2,
            target_modules=["v_proj"],
            target_parameters=["layers.0.mlp.experts.down_proj", "2.mlp.experts.gate_up_proj"],
        ),
    ),
}


@pytest.fixture(params=["grouped_mm", "padded_bmm"])
def path(request, monkeypatch):
    """Each test on both paths of the grouped product: torch's grouped matrix product, and
    the padded batched product of a backend without one."""
    key = ("cpu", torch.float32)
    if request.param == "padded_bmm":
        monkeypatch.setitem(moe._GROUPED_MM_WORKS, key, False)
    else:
        monkeypatch.delitem(moe._GROUPED_MM_WORKS, key, raising=False)
        with torch.enable_grad():  # probed afresh, with autograd on
            if not moe._grouped_mm_works(torch.device("cpu"), torch.float32):
                pytest.skip("this torch has no grouped matrix product on the CPU")
    return request.param


def randomize_adapters(model, seed=1):
    """Training would move B off zero; do it at random so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_(0, 0.2, generator=generator)
            if isinstance(module, LoRAGroupedExperts):
                for b in module.lora_B.values():
                    b.normal_(0, 0.2, generator=generator)


def adapted(case, folder):
    reference_case, settings = CASES[case]
    make_checkpoint(reference_case, folder)
    model = models.from_pretrained(folder).eval()
    apply_lora(model, settings)
    randomize_adapters(model)
    return model, settings


def logits(model, tokens, mask):
    with torch.no_grad():
        return model(tokens, padding_mask=mask)


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_adapter_loads_in_peft_on_the_transformers_model_with_the_same_logits(
    tmp_path, case, path
):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model, settings = adapted(case, tmp_path / "base")
    tokens, mask = padded_batch(model.config.vocab_size)
    ours = logits(model, tokens, mask)
    with torch.no_grad():
        base = logits(models.from_pretrained(tmp_path / "base").eval(), tokens, mask)
    assert (ours - base)[mask].abs().max().item() > 1e-2  # the adapters matter

    folder = tmp_path / "adapter"
    folder.mkdir()
    save_adapter(model, folder, settings, base_model_name_or_path=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", attn_implementation="eager"
    )
    reference = peft.PeftModel.from_pretrained(hf, folder).eval()
    with torch.no_grad():
        expected = reference(input_ids=tokens, attention_mask=mask.long()).logits
    assert (ours - expected)[mask].abs().max().item() < 1e-4

    # and attune reads the folder back
    again = models.from_pretrained(tmp_path / "base").eval()
    load_adapter(again, folder)
    assert (logits(again, tokens, mask) - ours)[mask].abs().max().item() < 1e-6


def test_peft_names_and_layouts_of_expert_adapters(tmp_path):
    model, settings = adapted("mixtral_attention_and_experts", tmp_path / "base")
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_adapter(model, folder, settings)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(ATTENTION)
    assert config["target_parameters"] == sorted(EXPERTS)
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.mlp.experts."
    experts = model.layers[1].mlp.experts
    a, b = experts.lora_A["gate_up_proj"], experts.lora_B["gate_up_proj"]  # [E, r, in], [E, out, r]
    peft_a = tensors[prefix + "base_layer.lora_A.weight"]  # gate_up_proj: the inner wrapper
    peft_b = tensors[prefix + "base_layer.lora_B.weight"]
    assert peft_a.shape == (5 * 4, 64) and peft_b.shape == (224, 4 * 5)
    # expert e's A is rows e*r..e*r+r-1; its rank k of B is column k*E + e
    assert torch.equal(peft_a[2 * 4 : 3 * 4], a[2].detach())
    assert torch.equal(peft_b[:, 3 * 5 + 2], b[2, :, 3].detach())
    assert tensors[prefix + "lora_A.weight"].shape == (5 * 4, 112)  # down_proj: the outer one


def test_dense_layer_mlp_of_qwen3_moe_is_named_as_a_parameter_for_peft(tmp_path):
    """peft (0.21, transformers 5) retargets target_modules gate_proj/up_proj/down_proj of a
    qwen3_moe model to the experts; attune names the dense layers' ones as parameters."""
    model, settings = adapted("qwen3_moe_all_linear_dense_layer_mlp", tmp_path / "base")
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_adapter(model, folder, settings)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(ATTENTION)
    assert config["target_parameters"] == sorted(
        [*EXPERTS, "gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    )
    # with dropout, peft could not build those adapters: refused before writing
    dropout = LoraSettings(rank=2, target_modules=["q_proj", "down_proj"], dropout=0.1)
    plain = models.from_pretrained(tmp_path / "base")
    apply_lora(plain, dropout)
    with pytest.raises(CheckpointError, match=r"reads down_proj on a qwen3_moe.*dropout=0"):
        save_adapter(plain, folder, dropout)


@pytest.mark.parametrize(
    "case", ["qwen3_moe_attention_and_experts", "qwen2_moe_shared_expert_all_linear"]
)
def test_merged_weights_give_the_adapted_models_logits(tmp_path, case):
    model, settings = adapted(case, tmp_path / "base")
    tokens, mask = padded_batch(model.config.vocab_size)
    ours = logits(model, tokens, mask)
    plain = models.from_pretrained(tmp_path / "base").eval()
    plain.load_state_dict(merged_state_dict(model))
    assert (logits(plain, tokens, mask) - ours)[mask].abs().max().item() < 1e-4
    from_state = merge_state_dict(model.state_dict(), settings)
    from_modules = merged_state_dict(model)
    assert from_state.keys() == from_modules.keys()
    for name, tensor in from_modules.items():
        assert (tensor - from_state[name]).abs().max().item() < 1e-5, name
    merge_lora(model)
    assert not any(isinstance(m, LoRAGroupedExperts | LoRALinear) for m in model.modules())
    assert type(model.layers[0].mlp.experts) is moe.GroupedExperts
    assert (logits(model, tokens, mask) - ours)[mask].abs().max().item() < 1e-4


def test_only_adapters_train_the_router_stays_frozen_and_adapters_start_as_a_no_op(tmp_path):
    make_checkpoint("qwen2_moe_shared_expert_sliding_layers", tmp_path)
    model = models.from_pretrained(tmp_path)
    tokens, mask = padded_batch(model.config.vocab_size)
    before = logits(model.eval(), tokens, mask)
    targets = apply_lora(model, LoraSettings(rank=4, target_modules="all-linear"))
    assert "layers.0.mlp.experts.gate_up_proj" in targets
    assert "layers.0.mlp.shared_expert_gate" in targets  # a linear layer, as in peft
    assert not any(".mlp.gate" in t and "shared" not in t for t in targets)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model))
    assert "layers.0.mlp.experts.lora_A.gate_up_proj" in trainable
    assert (logits(model, tokens, mask) - before).abs().max().item() < 1e-5

    randomize_adapters(model)
    model.train()
    model(tokens, padding_mask=mask).logsumexp(-1).mean().backward()
    experts = model.layers[0].mlp.experts
    assert experts.lora_A["down_proj"].grad.abs().sum() > 0
    assert experts.gate_up_proj.grad is None and model.layers[0].mlp.gate.weight.grad is None
    # the base model inside disabled_adapters
    model.eval()
    with disabled_adapters(model):
        assert (logits(model, tokens, mask) - before).abs().max().item() < 1e-5


def loop_over_experts(x, indices, weights, experts):
    """The plain reference: each expert's tokens through its MLP with its own adapters."""
    out = torch.zeros_like(x)

    def linear(rows, name, e):
        y = F.linear(rows, getattr(experts, name)[e])
        a, b = experts.lora_A[name][e], experts.lora_B[name][e]
        return y + F.linear(F.linear(rows, a), b) * experts.scaling

    for e in range(experts.num_experts):
        token, slot = torch.where(indices == e)
        gate, up = linear(x[token], "gate_up_proj", e).chunk(2, dim=-1)
        y = linear(F.silu(gate) * up, "down_proj", e)
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


@pytest.mark.parametrize("rank", [3, 8])
def test_grouped_lora_equals_a_loop_over_experts_forward_and_backward(path, rank):
    torch.manual_seed(0)
    config = models.DecoderConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
    )
    experts = LoRAGroupedExperts(
        moe.GroupedExperts(config), ["gate_up_proj", "down_proj"], rank, alpha=6.0
    )
    with torch.no_grad():
        for b in experts.lora_B.values():
            b.normal_(0, 0.3)
    x = torch.randn(10, 16, requires_grad=True)
    indices = torch.tensor([[0, 1], [0, 2], [3, 0], [1, 0], [0, 4]] * 2)  # expert 5: idle
    weights = torch.rand(10, 2)
    upstream = torch.randn(10, 16)
    parameters = [x, *experts.lora_A.values(), *experts.lora_B.values()]

    out = experts(x, indices, weights)
    grads = torch.autograd.grad((out * upstream).sum(), parameters)
    expected = loop_over_experts(x, indices, weights, experts)
    wanted = torch.autograd.grad((expected * upstream).sum(), parameters)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for actual, reference in zip(grads, wanted, strict=True):
        torch.testing.assert_close(actual, reference, atol=1e-5, rtol=1e-5)
    assert experts.lora_A["down_proj"].grad is None  # (autograd.grad leaves .grad alone)
    assert grads[2][5].abs().sum() == 0  # the idle expert's down_proj A learns nothing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rank", [4, 16])
def test_grouped_lora_on_cuda_in_bf16_equals_a_loop_over_experts(rank):
    """The GPU's grouped product (bf16; rank 4 takes the padded-rank path) against the loop in
    float32 over the same bf16 values."""
    torch.manual_seed(0)
    config = models.DecoderConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
    )
    base = moe.GroupedExperts(config)
    experts = LoRAGroupedExperts(base, ["gate_up_proj", "down_proj"], rank, alpha=2.0 * rank)
    with torch.no_grad():
        for b in experts.lora_B.values():
            b.normal_(0, 0.3)
    experts = experts.to("cuda", torch.bfloat16)
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    indices = torch.randint(0, 7, (64, 2), device="cuda")  # expert 7: idle
    indices[:, 1] = (indices[:, 0] + 1) % 7
    weights = torch.rand(64, 2, device="cuda")
    upstream = torch.randn(64, 64, device="cuda")
    parameters = [x, *experts.lora_A.values(), *experts.lora_B.values()]
    out = experts(x, indices, weights)
    grads = torch.autograd.grad((out.float() * upstream).sum(), parameters)

    exact = copy.deepcopy(experts).float()
    x32 = x.detach().float().requires_grad_()
    expected = loop_over_experts(x32, indices, weights, exact)
    wanted = torch.autograd.grad(
        (expected * upstream).sum(), [x32, *exact.lora_A.values(), *exact.lora_B.values()]
    )
    scale = expected.abs().max()
    assert (out.float() - expected).abs().max() < 0.03 * scale
    for actual, reference in zip(grads, wanted, strict=True):
        assert (actual.float() - reference).abs().max() < 0.03 * reference.abs().max()


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_moe")
    make_checkpoint("qwen3_moe_dense_layer_normalised_top3", folder)
    return folder


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            LoraSettings(target_modules="all-linear", dropout=0.05),
            r"^lora.dropout=0.05: adapters on the experts' grouped weights "
            r"\(layers.0.mlp.experts.gate_up_proj...\) take no dropout.*set lora.dropout=0; "
            r"or name lora.target_modules instead of all-linear to leave the experts out$",
        ),
        (
            LoraSettings(target_modules=ATTENTION, target_parameters=EXPERTS, use_dora=True),
            r"^lora.use_dora: DoRA is not supported on the experts' grouped weights",
        ),
        (
            LoraSettings(target_modules="all-linear", quantize_base=True),
            r"^lora.quantize_base: QLoRA keeps linear layers in NF4, not the experts'",
        ),
        (
            LoraSettings(target_parameters=["mlp.experts.gate_up_prj"]),
            r"no parameter 'mlp.experts.gate_up_prj'.*did you mean 'mlp.experts.gate_up_proj'",
        ),
        (
            LoraSettings(target_parameters=["mlp.gate.weight"]),
            r"names layers.0.mlp.gate.weight, which LoRA does not adapt.*router \(mlp.gate\) "
            "stays frozen",
        ),
        (
            LoraSettings(target_modules=["gate_up_proj"]),
            r"no linear layer 'gate_up_proj' \(the experts' gate_up_proj is a grouped weight.*"
            r"lora.target_parameters",
        ),
    ],
)
def test_bad_expert_settings_are_refused_in_one_line(moe_folder, settings, message):
    model = models.from_pretrained(moe_folder)
    with pytest.raises(ConfigError, match=message) as error:
        apply_lora(model, settings)
    assert "\n" not in str(error.value)


def test_target_parameters_on_a_dense_model_are_refused(tmp_path):
    make_checkpoint("llama_gqa_untied", tmp_path)
    with pytest.raises(
        ConfigError, match=r"no parameter 'mlp\.experts\.down_proj'; this model has no experts"
    ):
        apply_lora(models.from_pretrained(tmp_path), LoraSettings(target_parameters=EXPERTS[1:]))

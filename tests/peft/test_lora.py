"""LoRA, DoRA and QLoRA: merging is exact, and exported adapters load in peft with the same
logits (peft is the referee for the format and the arithmetic)."""

import pytest
import torch

from attune import models
from attune.errors import CheckpointError, ConfigError
from attune.peft import (
    LoRALinear,
    LoraSettings,
    adapter_state_dict,
    apply_lora,
    load_adapter,
    merge_lora,
    merged_state_dict,
    save_adapter,
)
from tests.models.hf_reference import make_checkpoint

TOKENS = torch.tensor([[5, 17, 42, 8, 91, 3, 66, 20]])


def randomize_adapters(model, seed=1):
    """Training would move B off zero; do it at random so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_(0, 0.2, generator=generator)
                if module.lora_magnitude_vector is not None:
                    module.lora_magnitude_vector.mul_(1 + 0.1 * torch.rand(
                        module.lora_magnitude_vector.shape, generator=generator
                    ))  # fmt: skip


SETTINGS = {
    "lora": LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora_all_linear": LoraSettings(
        rank=4, alpha=8, target_modules="all-linear", use_rslora=True
    ),
    "dora_with_head": LoraSettings(
        rank=4, alpha=16, target_modules=["q_proj", "o_proj", "up_proj", "lm_head"], use_dora=True
    ),
}


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "base"
    make_checkpoint("llama_gqa_untied", folder)
    return folder


def test_only_adapters_train_and_they_start_as_a_no_op(checkpoint):
    model = models.from_pretrained(checkpoint)
    with torch.no_grad():
        before = model(TOKENS)
    targets = apply_lora(model, SETTINGS["dora_with_head"])
    assert "layers.0.self_attn.q_proj" in targets and "lm_head" in targets
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model))
    assert any(name.endswith("lora_magnitude_vector") for name in trainable)
    with torch.no_grad():
        assert torch.allclose(model(TOKENS), before, atol=1e-5)


@pytest.mark.parametrize("case", sorted(SETTINGS))
def test_merged_weights_give_the_adapted_models_logits(checkpoint, case):
    model = models.from_pretrained(checkpoint)
    apply_lora(model, SETTINGS[case])
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(TOKENS)
        plain = models.from_pretrained(checkpoint)
        plain.load_state_dict(merged_state_dict(model))
        assert (plain(TOKENS) - adapted).abs().max().item() < 1e-4
        assert (merge_lora(model)(TOKENS) - adapted).abs().max().item() < 1e-4
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("case", sorted(SETTINGS))
def test_exported_adapter_loads_in_peft_with_the_same_logits(checkpoint, tmp_path, case):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = models.from_pretrained(checkpoint)
    apply_lora(model, SETTINGS[case])
    randomize_adapters(model)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_adapter(model, folder, SETTINGS[case], base_model_name_or_path=str(checkpoint))
    base = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, attn_implementation="eager"
    )
    reference = peft.PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        difference = (reference(TOKENS).logits - model(TOKENS)).abs().max().item()
    assert difference < 1e-4

    # and attune reads the folder back
    again = models.from_pretrained(checkpoint)
    assert load_adapter(again, folder).use_dora == SETTINGS[case].use_dora
    with torch.no_grad():
        assert (again(TOKENS) - model(TOKENS)).abs().max().item() < 1e-6


def test_qlora_keeps_the_base_in_nf4_and_trains_adapters(checkpoint):
    model = models.from_pretrained(checkpoint)
    settings = LoraSettings(rank=4, alpha=8, target_modules="all-linear", quantize_base=True)
    apply_lora(model, settings)
    layer = model.layers[0].self_attn.q_proj
    assert type(layer.weight).__name__ == "NF4Tensor"
    randomize_adapters(model)
    loss = model(TOKENS).logsumexp(-1).mean()
    loss.backward()
    assert layer.lora_A.weight.grad is not None and layer.weight.grad is None
    # merging dequantizes: the merged plain model matches the quantized adapted one
    with torch.no_grad():
        plain = models.from_pretrained(checkpoint)
        plain.load_state_dict(merged_state_dict(model))
        assert (plain(TOKENS) - model(TOKENS)).abs().max().item() < 1e-3


def test_bad_target_names_and_tied_heads_are_refused(checkpoint, tmp_path):
    model = models.from_pretrained(checkpoint)
    with pytest.raises(ConfigError, match=r"no linear layer 'q_prj'.*did you mean 'q_proj'"):
        apply_lora(model, LoraSettings(target_modules=["q_prj"]))
    tied = tmp_path / "tied"
    make_checkpoint("llama_mha_tied", tied)
    with pytest.raises(ConfigError, match="lm_head is the embedding matrix"):
        apply_lora(models.from_pretrained(tied), LoraSettings(target_modules=["lm_head"]))


def test_fused_phi3_projections_cannot_be_exported_as_a_peft_adapter(tmp_path):
    folder = tmp_path / "phi3"
    make_checkpoint("phi3_fused_tensors", folder)
    model = models.from_pretrained(folder)
    apply_lora(model, LoraSettings(target_modules=["q_proj", "o_proj"]))
    out = tmp_path / "adapter"
    out.mkdir()
    with pytest.raises(CheckpointError, match=r"stores q_proj fused.*save_merged"):
        save_adapter(model, out, LoraSettings(target_modules=["q_proj", "o_proj"]))


@pytest.mark.parametrize("case", sorted(SETTINGS))
def test_merging_a_state_dict_equals_merging_the_modules(checkpoint, case):
    from attune.peft import merge_state_dict

    model = models.from_pretrained(checkpoint)
    apply_lora(model, SETTINGS[case])
    randomize_adapters(model)
    from_modules = merged_state_dict(model)
    from_state = merge_state_dict(model.state_dict(), SETTINGS[case])
    assert from_modules.keys() == from_state.keys()
    for name, tensor in from_modules.items():
        assert (tensor - from_state[name]).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_lora_path_equals_the_modules_composition(dropout, bias):
    from attune.peft.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(12, 20, bias=bias), rank=4, alpha=8, dropout=dropout)
    torch.nn.init.normal_(layer.lora_B.weight)  # B starts at zero: make the update count
    x = torch.randn(3, 5, 12, requires_grad=True)
    assert layer._plain_lora(x)

    def composed(x: torch.Tensor) -> torch.Tensor:  # what the module computed before fusing
        adapter_input = layer.lora_dropout(x)
        update = layer.lora_B(layer.lora_A(adapter_input)) * layer.scaling
        out = torch.nn.functional.linear(x, layer.weight) + update
        return out if layer.bias is None else out + layer.bias

    results = []
    for forward in (layer, composed):
        torch.manual_seed(1)  # the same dropout mask
        out = forward(x)
        grads = torch.autograd.grad(
            out.square().sum(), (x, layer.lora_A.weight, layer.lora_B.weight)
        )
        results.append((out, *grads))
    for fused, expected in zip(*results, strict=True):
        assert fused.shape == expected.shape
        torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)
    # a frozen input (the first layer's, under LoRA) gets no gradient and needs none
    frozen = torch.randn(2, 12)
    out = layer(frozen)
    (grad_a,) = torch.autograd.grad(out.sum(), (layer.lora_A.weight,))
    assert grad_a.abs().sum() > 0


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_torch_compile_traces_the_fused_lora_path_whole(dropout):
    from attune.peft.lora import LoRALinear

    layer = LoRALinear(torch.nn.Linear(12, 20), rank=4, alpha=8, dropout=dropout)
    x = torch.randn(3, 5, 12, requires_grad=True)
    assert layer._plain_lora(x)
    torch._dynamo.reset()
    # a graph break around each adapted projection made compiled LoRA slower than eager
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0


def _three_projections(**options):
    torch.manual_seed(0)
    layers = [
        LoRALinear(torch.nn.Linear(12, out, bias=bias), rank=4, alpha=8, **options)
        for out, bias in ((16, False), (8, True), (8, False))
    ]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B.weight)  # B starts at zero: make the update count
    return layers


def _outputs_and_grads(forward, layers, x, used=(0, 1, 2)):
    outs = forward(x)
    loss = sum((outs[i] * (i + 1)).square().sum() for i in used)
    params = [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
    inputs = [x, *params] if x.requires_grad else params
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [outs[i] for i in used], grads


@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2)])
@pytest.mark.parametrize("input_grad", [True, False])
def test_projections_of_one_input_equal_each_layers_own_forward(used, input_grad):
    from attune.models.layers import project

    layers = _three_projections()
    x = torch.randn(3, 5, 12, requires_grad=input_grad)
    assert LoRALinear.project_together(x, layers) is not None  # the shared path is taken
    together = _outputs_and_grads(lambda x: project(x, layers), layers, x, used)
    each = _outputs_and_grads(lambda x: [layer(x) for layer in layers], layers, x, used)
    for got, expected in zip(together[0] + list(together[1]), each[0] + list(each[1]), strict=True):
        if expected is None:  # an unused projection's adapters get no gradient either way
            assert got is None or not got.any()
            continue
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_projections_that_need_their_own_forward_are_called_one_by_one():
    from attune.models.layers import project

    x = torch.randn(2, 12)
    refused = {
        "dropout": _three_projections(dropout=0.1),
        "dora": _three_projections(use_dora=True),
        "mixed ranks": [*_three_projections()[:2], LoRALinear(torch.nn.Linear(12, 8), 2, 8)],
        "a plain layer": [*_three_projections()[:2], torch.nn.Linear(12, 8)],
    }
    hooked = _three_projections()
    calls = []
    hooked[1].register_forward_hook(lambda module, args, out: calls.append(module))
    refused["a forward hook"] = hooked
    disabled = _three_projections()
    disabled[2].adapter_enabled = False
    refused["adapters off"] = disabled
    for why, layers in refused.items():
        for layer in layers:
            layer.eval()  # dropout draws nothing: both sides comparable
        assert LoRALinear.project_together(x, layers) is None, why
        outs = project(x, layers)
        for out, layer in zip(outs, layers, strict=True):
            torch.testing.assert_close(out, layer(x), msg=why)
    assert calls and calls[0] is hooked[1]  # the hook ran inside project


def test_torch_compile_traces_the_shared_projections_whole():
    from attune.models.layers import project

    layers = _three_projections()
    x = torch.randn(3, 5, 12, requires_grad=True)
    torch._dynamo.reset()
    assert torch._dynamo.explain(lambda x: project(x, layers))(x).graph_break_count == 0

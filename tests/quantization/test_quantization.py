"""Fake quantization and quantized export: the converted model computes what the
fake-quantized one did, and transformers (the referee for the torchao folder format) loads
what attune writes with the same logits."""

import json

import pytest
import torch

from attune import models
from attune.errors import CheckpointError, ConfigError
from attune.peft import LoRALinear, LoraSettings, apply_lora
from attune.quantization import (
    QuantizationScheme,
    insert_fake_quantization,
    load_quantized,
    save_quantized,
    set_fake_quantization,
)
from tests.models.hf_reference import make_checkpoint

TOKENS = torch.tensor([[5, 17, 42, 8, 91, 3, 66, 20], [9, 1, 77, 31, 4, 58, 12, 60]])
# the reference checkpoints' layers are 64 and 112 wide: groups of 16 divide both
SCHEMES = {
    "8da4w": QuantizationScheme("8da4w", group_size=16),
    "int4_weight_only+embedding": QuantizationScheme("int4_weight_only", 16, embedding=True),
    "int8_weight_only+output": QuantizationScheme("int8_weight_only", None, output=True),
}
# The converted model applies the very arithmetic the fake quantizers imitate; what is left
# is float rounding in another order (dequantize-then-matmul against quantize-dequantize).
CONVERT_ATOL = 1e-4


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama") / "base"
    make_checkpoint("llama_gqa_untied", folder)
    return folder


def logits(model):
    with torch.no_grad():
        return model(TOKENS)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_converted_model_computes_what_the_fake_quantized_one_did(untied, tmp_path, name):
    scheme = SCHEMES[name]
    model = models.from_pretrained(untied)
    full = logits(model)
    keys = list(model.state_dict())
    insert_fake_quantization(model, scheme)
    assert list(model.state_dict()) == keys  # checkpoints and HF key maps still apply
    fake = logits(model)
    assert (fake - full).abs().max() > 1e-3  # it does quantize
    set_fake_quantization(model, False)
    torch.testing.assert_close(logits(model), full, rtol=0, atol=0)
    set_fake_quantization(model, True)

    folder = save_quantized(model, tmp_path / "quantized", scheme, source=untied)
    converted = load_quantized(folder)
    torch.testing.assert_close(logits(converted), fake, rtol=0, atol=CONVERT_ATOL)
    quantized = converted.layers[0].self_attn.q_proj.weight
    assert type(quantized) is not torch.nn.Parameter and type(quantized) is not torch.Tensor
    assert (type(converted.embed_tokens.weight) is torch.nn.Parameter) != scheme.embedding
    assert (type(converted.lm_head.weight) is torch.nn.Parameter) != scheme.output


@pytest.mark.parametrize(
    ("case", "scheme"),
    [
        ("llama_gqa_untied", SCHEMES["8da4w"]),
        ("qwen2_tied_biases", SCHEMES["int4_weight_only+embedding"]),
        ("phi3_fused_tensors", SCHEMES["int8_weight_only+output"]),
    ],
)
def test_transformers_loads_the_quantized_folder_with_the_same_logits(tmp_path, case, scheme):
    transformers = pytest.importorskip("transformers")
    make_checkpoint(case, tmp_path / "base")
    model = models.from_pretrained(tmp_path / "base")
    folder = save_quantized(model, tmp_path / "quantized", scheme, source=tmp_path / "base")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "torchao"
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        theirs = reference(TOKENS).logits
    if case.startswith("phi3"):
        # fused projections are quantized whole; attune says plainly it cannot split them
        with pytest.raises(CheckpointError, match="fused projections"):
            load_quantized(folder)
        insert_fake_quantization(model, scheme)
        ours = logits(model)
    else:
        ours = logits(load_quantized(folder))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=CONVERT_ATOL)


def test_lora_layers_fake_quantize_their_base_and_train_adapters_in_full_precision(untied):
    scheme = SCHEMES["8da4w"]
    plain = models.from_pretrained(untied)
    insert_fake_quantization(plain, scheme)
    model = models.from_pretrained(untied)
    apply_lora(model, LoraSettings(rank=4, alpha=8, target_modules="all-linear"))
    insert_fake_quantization(model, scheme)
    # B starts at zero: the adapted model is the fake-quantized base
    torch.testing.assert_close(logits(model), logits(plain), rtol=0, atol=1e-6)
    layer = model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.weight_fake_quantizer is not None
    assert type(layer.lora_A) is torch.nn.Linear and type(layer.lora_B) is torch.nn.Linear
    model(TOKENS).sum().backward()
    assert layer.weight.grad is None and layer.lora_A.weight.grad is not None


def test_a_group_size_that_does_not_divide_a_layer_is_one_line(untied):
    model = models.from_pretrained(untied)
    with pytest.raises(ConfigError, match=r"does not divide the 112 inputs of layer .*down_proj"):
        insert_fake_quantization(model, QuantizationScheme("8da4w", group_size=32))
    with pytest.raises(ConfigError, match="not one of 8da4w"):
        QuantizationScheme("int3")


def test_a_quantized_folder_is_not_read_as_full_precision(untied, tmp_path):
    model = models.from_pretrained(untied)
    folder = save_quantized(model, tmp_path / "q", SCHEMES["8da4w"], source=untied)
    with pytest.raises(CheckpointError, match=r"attune\.quantization\.load_quantized"):
        models.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="not a torchao-quantized"):
        load_quantized(untied)


def test_a_bf16_export_computes_in_the_dtype_it_is_loaded_in(untied, tmp_path):
    scheme = SCHEMES["int4_weight_only+embedding"]  # weight-only: no activation rounding
    model = models.from_pretrained(untied, dtype=torch.bfloat16)
    folder = save_quantized(model, tmp_path / "q", scheme, source=untied)
    as_bf16 = load_quantized(folder, dtype=torch.bfloat16)
    as_fp32 = load_quantized(folder, dtype=torch.float32)
    assert logits(as_bf16).dtype == torch.bfloat16 and logits(as_fp32).dtype == torch.float32
    # the same integers and scales, dequantized and multiplied in either dtype; what is left is
    # bf16's rounding (the full-precision model's own bf16/fp32 gap here is 0.08, logits ~4)
    torch.testing.assert_close(logits(as_bf16).float(), logits(as_fp32), rtol=0, atol=0.25)

"""Mixture-of-experts blocks: the grouped path equals a loop over experts, the load-balancing
loss equals transformers', and checkpoints in transformers 5's grouped layout load too.

Logits parity with transformers for each MoE family (odd tiny configs) is in
``test_hf_parity.py``, whose cases include them.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers.models.qwen3_moe import modeling_qwen3_moe

from attune import models
from attune.errors import CheckpointError
from attune.models import moe
from tests.models.hf_reference import make_checkpoint, padded_batch


def loop_over_experts(x, indices, weights, experts):
    """The plain reference: each expert's tokens through its MLP, weighted and summed."""
    out = torch.zeros_like(x)
    for expert in range(experts.num_experts):
        token, slot = torch.where(indices == expert)
        gate, up = F.linear(x[token], experts.gate_up_proj[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, experts.down_proj[expert])
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


def tiny_moe_config(**overrides):
    fields = dict(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
    )
    return models.DecoderConfig(**{**fields, **overrides})


@pytest.mark.parametrize("path", ["grouped_mm", "padded_bmm"])
def test_grouped_experts_equal_a_loop_over_experts_forward_and_backward(path, monkeypatch):
    if path == "padded_bmm":  # as on a backend without torch._grouped_mm
        monkeypatch.setitem(moe._GROUPED_MM_WORKS, ("cpu", torch.float32), False)
    elif not moe._grouped_mm_works(torch.device("cpu"), torch.float32):
        pytest.skip("this torch has no grouped matrix product on the CPU")
    torch.manual_seed(0)
    experts = moe.GroupedExperts(tiny_moe_config())
    x = torch.randn(10, 16, requires_grad=True)
    # expert 5 gets no token at all; expert 0 gets most
    indices = torch.tensor([[0, 1], [0, 2], [3, 0], [1, 0], [0, 4]] * 2)
    weights = torch.rand(10, 2)
    upstream = torch.randn(10, 16)
    out = experts(x, indices, weights)
    (out * upstream).sum().backward()
    grads = (x.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
    x.grad = experts.gate_up_proj.grad = experts.down_proj.grad = None
    expected = loop_over_experts(x, indices, weights, experts)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    for actual, wanted in zip(
        grads, (x.grad, experts.gate_up_proj.grad, experts.down_proj.grad), strict=True
    ):
        torch.testing.assert_close(actual, wanted, atol=1e-6, rtol=1e-5)
    assert experts.down_proj.grad[5].abs().sum() == 0  # the idle expert learns nothing


def test_load_balancing_loss_equals_transformers():
    torch.manual_seed(0)
    layers = [torch.randn(14, 6) for _ in range(3)]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -3:] = 0
    for attention_mask in (None, mask):
        expected = modeling_qwen3_moe.load_balancing_loss_func(tuple(layers), 6, 2, attention_mask)
        token_mask = None if attention_mask is None else attention_mask.bool().reshape(-1)
        actual = moe.load_balancing_loss(layers, top_k=2, token_mask=token_mask)
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_router_aux_loss_of_a_training_forward_equals_transformers_aux_loss(tmp_path):
    reference = make_checkpoint("qwen3_moe_dense_layer_normalised_top3", tmp_path)
    model = models.from_pretrained(tmp_path).train()
    tokens, mask = padded_batch(reference.config.vocab_size)
    with torch.no_grad():
        out = reference(input_ids=tokens, attention_mask=mask.long(), output_router_logits=True)
        model(tokens, padding_mask=mask)
    aux = moe.router_aux_loss(model, token_mask=mask)
    torch.testing.assert_close(aux, out.aux_loss, atol=1e-5, rtol=1e-5)
    assert model.config.router_aux_loss_coef == reference.config.router_aux_loss_coef
    loads = moe.expert_load(model)
    assert sorted(loads) == ["moe/layer_0/max_load", "moe/layer_2/max_load"]  # layer 1 dense
    assert all(1.0 <= value <= 6 / 3 for value in loads.values())
    model.eval()
    model(tokens)
    assert moe.router_aux_loss(model) is None  # nothing kept outside training


def test_a_checkpoint_in_transformers_5_grouped_layout_loads(tmp_path):
    reference = make_checkpoint("qwen2_moe_shared_expert_sliding_layers", tmp_path / "hf")
    grouped = {"model." + name: t.contiguous() for name, t in reference.model.state_dict().items()}
    grouped["lm_head.weight"] = reference.lm_head.weight.detach()
    assert "model.layers.0.mlp.experts.gate_up_proj" in grouped
    (tmp_path / "grouped").mkdir()
    save_file(grouped, tmp_path / "grouped" / "model.safetensors")
    (tmp_path / "grouped" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    model = models.from_pretrained(tmp_path / "grouped").eval()
    tokens, mask = padded_batch(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(input_ids=tokens, attention_mask=mask.long()).logits
        actual = model(tokens, padding_mask=mask)
    assert (actual - expected)[mask].abs().max().item() < 1e-4


def test_a_missing_expert_is_named(tmp_path):
    make_checkpoint("mixtral_sliding_window", tmp_path)
    path = tmp_path / "model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(path)
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"lack model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        models.from_pretrained(tmp_path)


def test_a_config_with_more_chosen_than_experts_is_refused(tmp_path):
    config = transformers.MixtralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
        num_experts_per_tok=3,
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="num_experts_per_tok"):
        models.from_hf_config(config.to_dict())


def test_the_grouped_product_probe_is_not_fooled_by_inference_mode(monkeypatch):
    monkeypatch.setattr(moe, "_GROUPED_MM_WORKS", {})
    with torch.inference_mode():
        first = moe._grouped_mm_works(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(moe, "_GROUPED_MM_WORKS", {})
    assert first == moe._grouped_mm_works(torch.device("cpu"), torch.float32)


def test_the_probe_runs_inside_an_activation_checkpointed_layer(monkeypatch):
    from torch.distributed._composable import checkpoint

    monkeypatch.setattr(moe, "_GROUPED_MM_WORKS", {})
    block = moe.SparseMoE(tiny_moe_config()).train()
    checkpoint(block)
    block(torch.randn(2, 3, 16)).sum().backward()
    assert ("cpu", torch.float32) in moe._GROUPED_MM_WORKS

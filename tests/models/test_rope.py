"""RoPE against transformers' own rotation (``apply_rotary_pos_emb``), values and gradients."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from attune.models.rope import RotaryEmbedding, apply_rope


def _inputs(rotary_dim: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    batch, heads, seq = 2, 3, 7
    # as the attention layer has it: [batch, seq, heads, dim] memory seen as [batch, heads, ...]
    x = torch.randn(batch, seq, heads, head_dim, generator=generator).transpose(1, 2)
    positions = torch.arange(seq).repeat(batch, 1) + torch.tensor([[0], [5]])
    cos, sin = RotaryEmbedding(rotary_dim, 10_000.0)(positions)
    upstream = torch.randn(batch, heads, seq, head_dim, generator=generator)
    return x, cos, sin, upstream


@pytest.mark.parametrize("rotary_dim", [16, 8], ids=["full", "partial"])
def test_apply_rope_matches_transformers_values_and_gradients(rotary_dim: int) -> None:
    x, cos, sin, upstream = _inputs(rotary_dim, head_dim=16)
    ours_in = x.detach().clone().requires_grad_()
    ours = apply_rope(ours_in, cos, sin)
    (ours * upstream).sum().backward()

    theirs_in = x.detach().clone().requires_grad_()
    rotated, _ = apply_rotary_pos_emb(
        theirs_in[..., :rotary_dim], theirs_in[..., :rotary_dim], cos, sin
    )
    theirs = torch.cat((rotated, theirs_in[..., rotary_dim:]), dim=-1)
    (theirs * upstream).sum().backward()

    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=0, atol=1e-6)


def test_apply_rope_leaves_its_input_alone_and_works_without_grad() -> None:
    x, cos, sin, _ = _inputs(16, head_dim=16)
    before = x.clone()
    with torch.no_grad():
        out = apply_rope(x, cos, sin)
    assert torch.equal(x, before)
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_apply_rope_in_bf16_is_transformers_to_the_bit() -> None:
    x, cos, sin, _ = _inputs(16, head_dim=16)
    x = x.bfloat16()
    expected, _ = apply_rotary_pos_emb(x, x, cos.bfloat16(), sin.bfloat16())
    assert torch.equal(apply_rope(x, cos, sin), expected)

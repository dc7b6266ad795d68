import pytest
import torch
import torch.nn.functional as F

from attune.models import sdpa
from attune.models.masks import attention_mask


def _qkv(seq, dtype=torch.float32, batch=2, heads=4, kv_heads=2, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, seq, dim), (batch, kv_heads, seq, dim), (batch, kv_heads, seq, dim)]
    return [
        torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype).requires_grad_()
        for shape in shapes
    ]


def _output_and_grads(attend, q, k, v, **kwargs):
    out = attend(q, k, v, scale=0.3, enable_gqa=True, **kwargs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out.float() * weights).sum(), (q, k, v))
    return out, grads


@pytest.mark.parametrize("seq", [5, 33, 64])
def test_padded_causal_attention_equals_unpadded_in_outputs_and_gradients(seq):
    q, k, v = _qkv(seq)
    want, want_grads = _output_and_grads(F.scaled_dot_product_attention, q, k, v, is_causal=True)
    got, got_grads = _output_and_grads(sdpa.padded_attention, q, k, v, is_causal=True)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_padded_attention_under_a_document_and_padding_mask_equals_unpadded():
    seq = 21
    q, k, v = _qkv(seq)
    document_ids = torch.tensor([[0] * 8 + [1] * 13, [0] * 15 + [1] * 6])
    padding = torch.ones(2, seq, dtype=torch.bool)
    padding[1, 18:] = False
    mask = attention_mask(seq, document_ids=document_ids, padding_mask=padding)
    want, want_grads = _output_and_grads(F.scaled_dot_product_attention, q, k, v, attn_mask=mask)
    got, got_grads = _output_and_grads(sdpa.padded_attention, q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_bf16_attention_on_a_cpu_without_amx_runs_in_float32(monkeypatch):
    monkeypatch.setattr(sdpa, "_cpu_has_amx", lambda: False)
    q, k, v = _qkv(19, torch.bfloat16)
    want = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, scale=0.3, enable_gqa=True
    ).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast would cast it back to bf16
        got = sdpa.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_bf16_training_attention_with_amx_meets_only_bucketed_lengths(monkeypatch):
    monkeypatch.setattr(sdpa, "_cpu_has_amx", lambda: True)
    lengths = []
    real = F.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        lengths.append(q.shape[2])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    for seq in (7, 40, 64):
        q, k, v = _qkv(seq, torch.bfloat16)
        out = sdpa.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert out.shape[2] == seq
        with torch.no_grad():  # inference keeps its own lengths
            sdpa.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert lengths == [32, 7, 64, 40, 64, 64]


def test_float32_and_non_cpu_dtypes_are_left_alone():
    assert sdpa.compute_dtype(torch.float32, torch.device("cpu")) == torch.float32
    assert sdpa.compute_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16

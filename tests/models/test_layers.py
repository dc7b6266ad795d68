"""The decoder's layers against transformers' own modules (values and gradients)."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from attune.models.layers import RMSNorm


@pytest.mark.parametrize("weight_trains", [True, False], ids=["full", "frozen"])
def test_rms_norm_matches_transformers_values_and_gradients(weight_trains: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    dim = 24
    # a strided input, as a transposed or sliced activation would be
    x = torch.randn(3, dim, 5, generator=generator).transpose(1, 2) * 3
    weight = torch.randn(dim, generator=generator)
    upstream = torch.randn(3, 5, dim, generator=generator)

    ours, theirs = RMSNorm(dim, eps=1e-5), LlamaRMSNorm(dim, eps=1e-5)
    results = []
    for norm in (ours, theirs):
        with torch.no_grad():
            norm.weight.copy_(weight)
        norm.weight.requires_grad_(weight_trains)
        inputs = x.detach().clone().requires_grad_()
        out = norm(inputs)
        (out * upstream).sum().backward()
        results.append((out, inputs.grad, norm.weight.grad))

    (out, grad_x, grad_w), (ref, ref_grad_x, ref_grad_w) = results
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-5, atol=1e-6)
    if weight_trains:
        torch.testing.assert_close(grad_w, ref_grad_w, rtol=1e-5, atol=1e-5)
    else:
        assert grad_w is None


def test_rms_norm_in_bf16_is_transformers_to_the_bit() -> None:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
    ours, theirs = RMSNorm(16, eps=1e-6).bfloat16(), LlamaRMSNorm(16, eps=1e-6).bfloat16()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    assert torch.equal(ours(x), theirs(x))

"""The chunked output projection: its pieces, concatenated, equal one projection of every row,
in value and gradient; no rows yield no piece."""

import torch
import torch.nn.functional as F

from attune.models.chunked_head import (
    frozen_head_cross_entropy,
    head_by_chunks,
)


def _logprobs(hidden, targets, output):
    return -F.cross_entropy(output(hidden).float(), targets, reduction="none")


def test_pieces_equal_one_projection_in_value_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 11, (10,))

    pieces = list(head_by_chunks(_logprobs, (hidden, targets), (head,), chunk_size=4))
    assert [piece.shape[0] for piece in pieces] == [4, 4, 2]
    chunked = torch.cat(pieces)
    chunked.sum().backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()

    hidden.grad, head.weight.grad = None, None
    whole = _logprobs(hidden, targets, head)
    whole.sum().backward()
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], head.weight.grad)


def test_no_grad_and_no_rows():
    head = torch.nn.Linear(8, 11, bias=False)
    with torch.no_grad():
        pieces = list(
            head_by_chunks(_logprobs, (torch.randn(3, 8), torch.zeros(3).long()), (head,))
        )
    assert len(pieces) == 1 and not pieces[0].requires_grad
    empty = (torch.randn(0, 8), torch.zeros(0).long())
    assert list(head_by_chunks(_logprobs, empty, (head,), chunk_size=2)) == []


def _summed_loss(hidden, targets, output):
    return F.cross_entropy(output(hidden).float(), targets, reduction="sum")


def test_a_frozen_heads_one_pass_loss_equals_the_recomputed_chunks():
    """Loss and the hidden states' gradient of :func:`frozen_head_cross_entropy` equal the
    checkpointed chunks' (fp32 to rounding, bf16 to bf16's), scaled by the upstream
    gradient, with uneven chunks."""
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        torch.manual_seed(0)
        head = torch.nn.Linear(16, 37, bias=False).to(dtype).requires_grad_(False)
        hidden = torch.randn(11, 16, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, 37, (11,))

        reference = sum(head_by_chunks(_summed_loss, (hidden, targets), (head,), chunk_size=4))
        (reference * 0.25).backward()
        expected = hidden.grad.clone()
        hidden.grad = None

        loss = frozen_head_cross_entropy(hidden, head.weight, targets, chunk_size=4)
        (loss * 0.25).backward()
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, reference, rtol=1e-6, atol=tolerance)
        torch.testing.assert_close(hidden.grad, expected, rtol=tolerance, atol=tolerance)

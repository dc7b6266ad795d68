"""The chunked output projection: its pieces, concatenated, equal one projection of every row,
in value and gradient; no rows yield no piece."""

import torch
import torch.nn.functional as F

from attune.models.chunked_head import head_by_chunks


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

"""Packed rows: each document gets the logits it would get alone."""

import torch

from attune import models
from attune.models.masks import positions_from_document_ids
from tests.models.hf_reference import make_checkpoint


def test_two_documents_in_one_row_match_running_each_alone(tmp_path):
    make_checkpoint(
        "qwen2_sliding_layers", tmp_path
    )  # sliding layers too: windows stay per document
    model = models.from_pretrained(tmp_path).eval()
    generator = torch.Generator().manual_seed(3)
    first = torch.randint(0, 96, (1, 7), generator=generator)
    second = torch.randint(0, 96, (1, 5), generator=generator)
    packed = torch.cat([first, second], dim=1)
    document_ids = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        together = model(packed, document_ids=document_ids)
        alone = torch.cat([model(first), model(second)], dim=1)
    assert (together - alone).abs().max().item() < 1e-5


def test_positions_restart_at_each_document():
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert positions_from_document_ids(document_ids).tolist() == [
        [0, 1, 2, 0, 1, 0],
        [0, 1, 2, 3, 4, 5],
    ]

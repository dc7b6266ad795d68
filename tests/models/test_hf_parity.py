"""Every family: attune's logits equal transformers' for the same tiny random checkpoint."""

import pytest
import torch

from attune import models
from tests.models.hf_reference import CASES, make_checkpoint, padded_batch

TOLERANCE = 1e-4  # fp32, max abs diff (DESIGN.md section 3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    reference = make_checkpoint(case, tmp_path)
    model = models.from_pretrained(tmp_path).eval()
    tokens, mask = padded_batch(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(input_ids=tokens, attention_mask=mask.long()).logits
        actual = model(tokens, padding_mask=mask)
    assert actual.shape == expected.shape
    assert (actual - expected)[mask].abs().max().item() < TOLERANCE
    # the comparison is not vacuous: logits vary across tokens well beyond the tolerance
    assert expected[mask].std().item() > 100 * TOLERANCE

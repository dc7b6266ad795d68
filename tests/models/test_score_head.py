"""Scalar heads: HF ``*ForSequenceClassification`` checkpoints load with the same scores."""

import pytest
import torch
import transformers

from attune import models
from tests.models.hf_reference import CASES, TINY, padded_batch


@pytest.mark.parametrize("case", ["llama_mha_tied", "qwen2_tied_biases"])
def test_sequence_classification_scores_match_transformers(case, tmp_path):
    config_class, extra = CASES[case]
    config = getattr(transformers, config_class)(**{**TINY, **extra, "num_labels": 1})
    torch.manual_seed(0)
    reference = transformers.AutoModelForSequenceClassification.from_config(
        config, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0.0, 0.15)
    reference.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path).eval()
    assert model.config.num_labels == 1 and not hasattr(model, "lm_head")
    tokens, mask = padded_batch(TINY["vocab_size"])
    tokens[~mask] = TINY["pad_token_id"]  # HF pools at the last token before the padding
    tokens[mask] = tokens[mask].clamp(min=1)
    with torch.no_grad():
        expected = reference(input_ids=tokens, attention_mask=mask.long()).logits
        per_token = model(tokens, padding_mask=mask)
    last = mask.sum(dim=1) - 1
    actual = per_token[torch.arange(2), last]
    assert actual.shape == expected.shape == (2, 1)
    assert (actual - expected).abs().max().item() < 1e-4

    saved = models.save_pretrained(model, tmp_path / "saved")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(saved).eval()
    with torch.no_grad():
        assert torch.allclose(
            again(input_ids=tokens, attention_mask=mask.long()).logits, expected, atol=1e-4
        )

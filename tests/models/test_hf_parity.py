"""Every family: attune's logits equal transformers' for the same tiny random checkpoint."""

import pytest
import torch
import transformers

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


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_folder_loads_in_transformers_with_the_same_logits(case, tmp_path):
    source = tmp_path / "source"
    make_checkpoint(case, source)
    (source / "chat_template.jinja").write_text("{{ messages }}")
    model = models.from_pretrained(source).eval()
    with torch.no_grad():  # stand in for training: every weight moves
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    saved = models.save_pretrained(model, tmp_path / "saved", source=source, max_shard_size="50KB")
    assert (saved / "model.safetensors.index.json").is_file()  # sharded, with its index
    assert (saved / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (saved / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".saved.*"))  # nothing left of the atomic write
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager")
    tokens, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = model(tokens, padding_mask=mask)
        actual = reloaded.eval()(input_ids=tokens, attention_mask=mask.long()).logits
    assert (actual - expected)[mask].abs().max().item() < TOLERANCE

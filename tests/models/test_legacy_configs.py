"""Checkpoints on the Hub mostly carry configs written by transformers 4 (``rope_theta`` and
``rope_scaling``, no ``layer_types``). The same checkpoint described either way builds the
same model."""

import json

import pytest
import torch

from attune import models
from tests.models.hf_reference import CASES, make_checkpoint, padded_batch


def as_transformers_4(config: dict) -> dict:
    """Rewrite a transformers 5 config.json the way transformers 4 wrote it."""
    config = dict(config)
    parameters = config.pop("rope_parameters")
    layer_types = config.pop("layer_types", None)
    if config["model_type"] == "gemma3_text":
        full, local = parameters["full_attention"], parameters["sliding_attention"]
        config["rope_local_base_freq"] = local["rope_theta"]
        parameters = full
        sliding = [kind == "sliding_attention" for kind in layer_types]
        pattern = sliding.index(False) + 1
        assert sliding == [(i + 1) % pattern != 0 for i in range(len(sliding))]
        config["sliding_window_pattern"] = pattern
    config["rope_theta"] = parameters["rope_theta"]
    if "partial_rotary_factor" in parameters:
        config["partial_rotary_factor"] = parameters["partial_rotary_factor"]
    scaling = {
        k: v for k, v in parameters.items() if k not in ("rope_theta", "partial_rotary_factor")
    }
    if scaling["rope_type"] == "default":
        config["rope_scaling"] = None
    else:  # the oldest configs spell it "type"
        config["rope_scaling"] = {"type": scaling.pop("rope_type"), **scaling}
    return config


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_4_configs_build_the_same_model(case, tmp_path):
    make_checkpoint(case, tmp_path)
    tokens, mask = padded_batch(96)
    with torch.no_grad():
        expected = models.from_pretrained(tmp_path)(tokens, padding_mask=mask)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(as_transformers_4(json.loads(path.read_text()))))
    with torch.no_grad():
        actual = models.from_pretrained(tmp_path)(tokens, padding_mask=mask)
    assert torch.equal(actual, expected)
